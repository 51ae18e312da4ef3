"""Plots of `metrics.jsonl` curves, written as PNG into the workdir."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxpost.train.loop import read_metrics  # noqa: E402


def plot_metrics(workdir: str, keys: tuple[str, ...], *, filename: str = "metrics.png", title: str = "") -> str | None:
    """One panel per key found in `workdir/metrics.jsonl` (value against step). Returns the PNG path."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in records if key in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = os.path.join(workdir, filename)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
