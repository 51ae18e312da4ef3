"""The host loop shared by every recipe: feed batches, dispatch steps, log, evaluate, checkpoint.

Step N is dispatched before step N-1's metrics are read, so logging never stalls the device. Checkpoints hold the
data-iterator state taken right after the batch of the saved step was drawn, so a resumed run draws exactly the
batches an uninterrupted run would have.

Faults (docs/reliability.md):
- SIGTERM / SIGINT (a preemption): the loop finishes the running step, checkpoints it (`checkpoint(step, state)`,
  unless that step was just saved), writes its metrics and raises `Preempted`, a `SystemExit` with status 128 +
  the signal number (143 for SIGTERM, 130 for SIGINT). Running the same command again continues exactly. A second
  signal while that happens gets the previous handler (the default: the process ends at once).
- A skipped step (non-finite loss or gradient: the step builder leaves params and optimizer state unchanged and
  reports `skipped`) is logged with its number and counted (`skipped_total`); `max_bad_steps` skipped steps in a
  row raise `NonFiniteError` before any later checkpoint is started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("jaxpost")


class Preempted(SystemExit):
    """Raised by `train_loop` after a SIGTERM / SIGINT once the running step is checkpointed: exits the process with
    status 128 + the signal number (143 for SIGTERM, 130 for SIGINT); `step` is the step saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return (f"preempted by {signal.Signals(self.signum).name} after step {self.step} (checkpointed): run the same "
                f"command again to continue; exit status {self.code}")


class NonFiniteError(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient (each one skipped)."""


class MetricsLog:
    """Append-only `metrics.jsonl` (one JSON object per line, each with `step`). Opening it to resume at step s drops
    lines logged after s by the interrupted run, so the file reads as one uninterrupted run. In a multi-process run
    process 0 writes it (the metrics are global); every process reads it."""

    def __init__(self, path: str, *, resume_step: int = 0):
        self.path = path
        self.skipped_total = 0.0  # skipped updates logged up to the resume step (`train_loop`'s running count)
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
                        self.skipped_total += float(rec.get("skipped", 0.0) or 0.0)
        self.writer = jax.process_index() == 0
        if self.writer:  # replaced atomically: another process may be reading it
            with open(path + ".tmp", "w") as f:
                f.writelines(line + "\n" for line in kept)
            os.replace(path + ".tmp", path)

    def write(self, record: dict) -> None:
        if not self.writer:
            return
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
    max_bad_steps: int | None = None,
    handle_signals: bool = True,
) -> Any:
    """Runs steps start_step+1 .. steps (or only up to `stop_at`, as a preempted job would: a later call with the
    same arguments from the last checkpoint continues the same run). `checkpoint(step, state)` is called right after
    step `step` is dispatched (before the next batch is drawn); `evaluate(step, state)` returns metrics to log;
    `host_metrics()` adds host-side counters (e.g. data statistics) to every logged line. Returns the final state.

    Faults (module docstring): with `handle_signals` (and on the main thread) SIGTERM / SIGINT end the loop after
    the running step with its checkpoint and `Preempted`; `max_bad_steps` consecutive skipped steps (metric
    `skipped` > 0) raise `NonFiniteError` (None: never)."""
    pending: tuple[int, dict, float] | None = None
    bad = {"run": 0, "first": 0, "total": metrics_log.skipped_total}
    signals: list[int] = []
    last_time = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, desc=desc, dynamic_ncols=True, mininterval=1.0,
               disable=jax.process_index() != 0)

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
        stop = count_skipped(step, record) if "skipped" in record else None
        metrics_log.write(record)
        if stop is not None:
            raise stop
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm") if k in record}, refresh=False)
        if step % log_every == 0 or step == steps:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.5g}" for k, v in record.items()
                                                      if isinstance(v, float) and k != "step"))

    def count_skipped(step, record) -> NonFiniteError | None:
        """Adds the running count to `record`, logs a skipped step; the error to raise once it is logged."""
        skipped = record["skipped"]
        bad["total"] += skipped
        record["skipped_total"] = bad["total"]
        if not skipped:
            bad["run"] = 0
            return None
        bad["run"] += 1
        bad["first"] = bad["first"] if bad["run"] > 1 else step
        log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): update skipped, params and "
                    "optimizer state unchanged (%d in a row, %d in all)", step, record.get("loss"),
                    record.get("grad_norm"), bad["run"], bad["total"])
        if max_bad_steps and bad["run"] >= max_bad_steps:
            return NonFiniteError(
                f"steps {bad['first']}..{step}: {bad['run']} consecutive steps had a non-finite loss or gradient "
                f"(max_bad_steps={max_bad_steps}); each was skipped, so the params and optimizer state are still "
                f"those of step {bad['first'] - 1} and so are those of every checkpoint; stopping (look for a bad "
                f"batch, a too-high learning rate, or raise TrainConfig.max_bad_steps)")
        return None

    def on_signal(signum, frame):
        signals.append(signum)
        restore_handlers()  # a second signal gets the previous behaviour
        log.warning("%s received: finishing the running step, then checkpointing and exiting",
                    signal.Signals(signum).name)

    previous = {}

    def restore_handlers():
        while previous:
            sig, handler = previous.popitem()
            signal.signal(sig, handler)

    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

    def preempt(step, state, saved):
        """Ends the loop after `step` (already dispatched): its metrics, its checkpoint unless saved, Preempted."""
        if pending is not None:
            flush(pending)
        if checkpoint is not None and not saved and step > start_step:
            checkpoint(step, state)
        raise Preempted(signals[0], step)

    last = steps if stop_at is None else min(stop_at, steps)
    saved = False
    try:
        for step in range(start_step + 1, last + 1):
            if signals:  # arrived after the previous step's check: that step is the running one
                preempt(step - 1, state, saved)
            batch = to_device(next(batches))
            state, metrics = step_fn(state, batch)
            if pending is not None:  # step N-1's metrics are read while step N runs
                flush(pending)
            pending = (step, metrics, time.perf_counter())
            saved = checkpoint is not None and checkpoint_every and (step % checkpoint_every == 0 or step == steps)
            if saved:
                checkpoint(step, state)
            if signals:
                preempt(step, state, saved)
            if evaluate is not None and eval_every and step % eval_every == 0 and step != steps:
                flush(pending)
                pending = None
                metrics_log.write({"step": step, **evaluate(step, state)})
                last_time = time.perf_counter()
        if pending is not None:
            flush(pending)
    finally:
        restore_handlers()
        bar.close()
    return state
