"""Plots of `metrics.jsonl` curves, written as PNG into the workdir: a grid of labelled panels read at a glance."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxpost.train.loop import read_metrics  # noqa: E402

#: Units of metrics, by name or suffix (the y label of a panel).
_UNITS = (("_time_s", "seconds"), ("_per_s", "per second"), ("_frac", "fraction"), ("accuracy", "fraction"),
          ("accuracies", "fraction"), ("response_length", "tokens"), ("tokens", "tokens"), ("lr", "learning rate"),
          ("kl", "nats"), ("entropy", "nats"), ("loss", "loss"))


def unit_of(key: str) -> str:
    for pattern, unit in _UNITS:
        if key.endswith(pattern) or key.startswith(pattern.strip("_")):
            return unit
    return ""


def plot_metrics(workdir: str, keys: tuple[str, ...], *, filename: str = "metrics.png", title: str = "",
                 xlabel: str = "step", ncols: int = 3) -> str | None:
    """One panel per key found in `workdir/metrics.jsonl` (value against step), laid out in a grid of `ncols`
    columns, each titled with its key and labelled with its unit. Returns the PNG path (None: nothing to plot)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return None
    cols = min(ncols, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit_of(key))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    out = os.path.join(workdir, filename)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
