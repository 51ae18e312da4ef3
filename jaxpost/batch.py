"""The batch layout every train step reads, and how a step's batch is split and placed.

A row is one tokenised sequence (or several packed ones) of length T, as five arrays (`ROW_KEYS`):

    inputs, targets   int32    x[:-1] and x[1:] of each document
    loss_mask         float32  1 on the targets the loss counts
    segment_ids       int32    1, 2, ... per packed document; 0 on padding
    positions         int32    0, 1, ... within each document

Objectives add their own per-row or per-unit arrays (a DPO pair's `pair_mask`, RL's `advantages`, ...). A step reads
its batch as [A, n, ...] arrays: A micro-batches of n rows (`split_microbatches`), laid out over the mesh by the
logical activation rules (`microbatch_shardings`): micro-batch rows over the data-parallel axes of the "batch" rule,
or replicated when the units (rows, pairs, examples) of a micro-batch do not divide evenly, so that a unit is never
split across devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxpost.sharding import ACTIVATION_RULES, logical_to_spec, replicated

#: The arrays of a row, in every pipeline (SFT, preference pairs, KTO examples, rollouts) and every step.
ROW_KEYS: tuple[str, ...] = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def split_microbatches(batch: Mapping[str, np.ndarray], grad_accum: int, *, keys: Iterable[str] | None = None
                       ) -> dict[str, np.ndarray]:
    """Host arrays [N, ...] -> [grad_accum, N / grad_accum, ...]: micro-batch i holds rows i*n .. (i+1)*n - 1 of
    every array (so interleaved pair rows [2B] and their pair vectors [B] stay aligned). `keys` selects the arrays
    (default: all of `batch`; keys absent from `batch` are skipped)."""
    keys = list(batch) if keys is None else [k for k in keys if k in batch]
    out = {}
    for k in keys:
        v = np.asarray(batch[k])
        if v.shape[0] % grad_accum:
            raise ValueError(f"batch array {k!r} of {v.shape[0]} rows does not split into grad_accum={grad_accum} "
                             f"micro-batches")
        out[k] = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
    return out


def data_parallel_size(mesh) -> int:
    """How many ways the logical "batch" axis splits on `mesh`."""
    axes = ACTIVATION_RULES["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def rows_sharding(mesh, rows: int, ndim: int, *, rows_axis: int = 1) -> NamedSharding:
    """Arrays whose dimension `rows_axis` holds `rows` rows ([A, rows, ...] micro-batches by default, [rows, ...]
    with rows_axis=0): that dimension takes the logical "batch" axis, every other dimension is replicated (a
    dimension the mesh does not divide evenly stays replicated)."""
    logical = [None] * ndim
    logical[rows_axis] = "batch"
    shape = [1] * ndim
    shape[rows_axis] = rows
    return NamedSharding(mesh, logical_to_spec(logical, ACTIVATION_RULES, mesh, shape))


def microbatch_shardings(mesh, layout: Mapping[str, tuple[int, int]], units_per_micro: int) -> dict:
    """Shardings of a step's [A, n, ...] batch. `layout[key] = (rows per unit, ndim)`: e.g. a DPO pair (the unit)
    has 2 rows in the ROW_KEYS arrays and 1 in `pair_mask`. Units stay whole on a device: when `units_per_micro`
    does not divide over the data-parallel devices, every array is replicated."""
    if units_per_micro % data_parallel_size(mesh):
        return {k: replicated(mesh) for k in layout}
    return {k: rows_sharding(mesh, per_unit * units_per_micro, ndim) for k, (per_unit, ndim) in layout.items()}


def device_put_batch(batch: Mapping[str, np.ndarray], shardings: Mapping, *, rows_axis: int = 1) -> dict:
    """Host arrays of this process -> global jax.Arrays laid out by `shardings` (one code path for one or many
    processes: each process passes its own slice of the global batch, `rows_axis` the axis of its rows)."""
    out = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in shardings}
    n = jax.process_count()
    for k, v in out.items():
        if n > 1 and v.shape[rows_axis] != np.shape(batch[k])[rows_axis] * n:
            raise ValueError(f"batch array {k!r}: the global batch must split over the data-parallel devices of the "
                             f"{n} processes (its sharding {shardings[k].spec} keeps it whole on every process)")
    return out


def process_rows(x: jax.Array) -> np.ndarray:
    """This process's rows (axis 0) of a global array laid out by rows, on the host: the inverse of
    `device_put_batch` (with rows_axis=0); the whole array in a one-process run."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
