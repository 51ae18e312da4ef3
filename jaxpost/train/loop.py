"""The host loop shared by every recipe: feed batches, dispatch steps, log, evaluate, checkpoint.

Step N is dispatched before step N-1's metrics are read, so logging never stalls the device. Checkpoints hold the
data-iterator state taken right after the batch of the saved step was drawn, so a resumed run draws exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("jaxpost")


class MetricsLog:
    """Append-only `metrics.jsonl` (one JSON object per line, each with `step`). Opening it to resume at step s drops
    lines logged after s by the interrupted run, so the file reads as one uninterrupted run."""

    def __init__(self, path: str, *, resume_step: int = 0):
        self.path = path
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line)
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, (np.ndarray, np.generic, jax.Array)):
            v = np.asarray(v).item() if np.asarray(v).size == 1 else np.asarray(v).tolist()
        out[k] = v
    return out


def train_loop(
    *,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    state: Any,
    batches: Iterator,
    to_device: Callable[[Any], Any],
    start_step: int,
    steps: int,
    metrics_log: MetricsLog,
    checkpoint: Callable[[int, Any], None] | None = None,
    checkpoint_every: int = 0,
    evaluate: Callable[[int, Any], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    host_metrics: Callable[[], dict] | None = None,
    desc: str = "train",
    stop_at: int | None = None,
) -> Any:
    """Runs steps start_step+1 .. steps (or only up to `stop_at`, as a preempted job would: a later call with the
    same arguments from the last checkpoint continues the same run). `checkpoint(step, state)` is called right after step `step` is dispatched
    (before the next batch is drawn); `evaluate(step, state)` returns metrics to log; `host_metrics()` adds host-side
    counters (e.g. data statistics) to every logged line. Returns the final state."""
    pending: tuple[int, dict, float] | None = None
    last_time = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, desc=desc, dynamic_ncols=True, mininterval=1.0)

    def flush(pending):
        nonlocal last_time
        step, metrics, _ = pending
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "step_time_s": now - last_time}
        last_time = now
        if "tokens" in record and record["step_time_s"] > 0:
            record["tokens_per_s"] = record["tokens"] / record["step_time_s"]
        if host_metrics is not None:
            record.update(host_metrics())
        metrics_log.write(record)
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm") if k in record}, refresh=False)
        if step % log_every == 0 or step == steps:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.5g}" for k, v in record.items()
                                                      if isinstance(v, float) and k != "step"))

    last = steps if stop_at is None else min(stop_at, steps)
    for step in range(start_step + 1, last + 1):
        batch = to_device(next(batches))
        state, metrics = step_fn(state, batch)
        if pending is not None:  # step N-1's metrics are read while step N runs
            flush(pending)
        pending = (step, metrics, time.perf_counter())
        if checkpoint is not None and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            checkpoint(step, state)
        if evaluate is not None and eval_every and step % eval_every == 0 and step != steps:
            flush(pending)
            pending = None
            metrics_log.write({"step": step, **evaluate(step, state)})
            last_time = time.perf_counter()
    if pending is not None:
        flush(pending)
    bar.close()
    return state
