"""Data-iterator states of a multi-process run: gathered into one checkpoint, and handed back to each process of a
run with the same or another number of processes.

Every pipeline reads its slice `[process_index::process_count]` of one shuffled example stream, so each process has
its own iterator state. A checkpoint holds all of them (`gather_process_states`: `{"process_states": [s_0, ...]}`;
a one-process run keeps its plain state). `state_for_process` picks this process's state back out:

- the same process count: process i resumes from s_i;
- a reader every process runs identically (the RL prompt stream, process_count 1 in its settings): s_0;
- another process count: the slices are cut again. After k elements of its slice in each of P processes, the stream's
  first k * P elements are consumed, so each of P' processes continues at element k * P / P' of its new slice: the
  same global batches as an uninterrupted run. This needs one document per row (no packing: a packer holds
  partly filled rows in its state) and equal positions in every process (true when no example is dropped); the
  counters (`stats`) are summed and dealt out again.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

_PROCESS_KEYS = ("process_index", "process_count", "num_packing_bins")


def gather_process_states(state: Mapping[str, Any]) -> dict[str, Any]:
    """This process's JSON-serialisable iterator state -> the checkpoint's data item (the same on every process).
    A collective: every process calls it at the same step."""
    if jax.process_count() == 1:
        return dict(state)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return {"process_states": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]}


def process_states(saved: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-process states of a checkpoint's data item (one for a one-process run)."""
    return [dict(s) for s in saved["process_states"]] if "process_states" in saved else [dict(saved)]


def state_for_process(saved: Mapping[str, Any], target: Mapping[str, Any], process_index: int | None = None,
                      process_count: int | None = None) -> dict[str, Any]:
    """The state process `process_index` of `process_count` (default: this one) resumes from (module docstring).
    `target` is a state of the iterator it will be set on (its `get_state()` when fresh), for its settings.
    Raises ValueError when the states cannot be cut again exactly."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    states = process_states(saved)
    if not states[0] or len(states) == process_count:
        return states[process_index] if states[0] else {}
    config = dict(target.get("config", {}))
    saved_config = states[0].get("config", {})
    if config.get("process_count", 1) == 1 and saved_config.get("process_count", 1) == 1:
        return states[0]  # every process reads the whole stream
    others = {k: v for k, v in config.items() if k not in _PROCESS_KEYS}
    for s in states:
        theirs = {k: v for k, v in s.get("config", {}).items() if k not in _PROCESS_KEYS}
        if theirs != others:
            raise ValueError(f"cannot resume: the pipeline settings differ from the saved state (saved {theirs}, "
                             f"now {others})")
    if config.get("packing"):
        raise ValueError(f"cannot resume a packed pipeline saved by {len(states)} processes on {process_count}: "
                         "packing keeps partly filled rows in each process's state; resume on "
                         f"{len(states)} processes, or use data.packing=False")
    positions = [_position(s) for s in states]
    if len(set(positions)) != 1:
        raise ValueError(f"cannot resume on {process_count} processes: the {len(states)} saved processes stopped at "
                         f"different positions of their slices {positions} (examples were dropped); resume on "
                         f"{len(states)} processes")
    consumed = positions[0] * len(states)
    if consumed % process_count:
        raise ValueError(f"cannot resume on {process_count} processes: {consumed} consumed examples do not split "
                         f"evenly")
    out = copy.deepcopy(states[0])
    out["config"] = config
    out["grain"]["parent"]["next_index"] = consumed // process_count
    if "counts" in out["grain"]:
        out["grain"]["counts"] = _deal([s["grain"]["counts"] for s in states], process_index, process_count)
    if "stats" in out:
        out["stats"] = _deal([s["stats"] for s in states], process_index, process_count)
    return out


def _position(state: Mapping[str, Any]) -> int:
    """Elements of its slice a process consumed: a one-document-per-row pipeline's grain state is the counting
    stage's `{"parent": {"next_index": k}, "counts": ...}` (the batching and padding stages hold nothing)."""
    try:
        return int(state["grain"]["parent"]["next_index"])
    except (KeyError, TypeError):
        raise ValueError(f"cannot cut this iterator state for another process count: {str(state)[:200]}") from None


def _deal(counters: Sequence[Mapping[str, int]], process_index: int, process_count: int) -> dict[str, int]:
    """Counter totals over the saved processes, dealt out to `process_count` processes (the first ones take the
    remainder), so that their sum stays the total."""
    out = {}
    for k in counters[0]:
        total = sum(int(c[k]) for c in counters)
        out[k] = total // process_count + int(process_index < total % process_count)
    return out
