"""Shared fixtures for the tests: tiny configs, random SFT batches, meshes."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxpost.config import MeshConfig, ModelConfig
from jaxpost.sharding import make_mesh


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig.tiny(**kw)


def random_batch(rng: np.random.Generator, B: int, T: int, V: int, *, n_docs: int = 1) -> dict:
    """An SFT batch of random tokens; with n_docs > 1 each row packs n_docs documents of random lengths."""
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(2, T - 1), size=n_docs - 1, replace=False)) if n_docs > 1 else []
        bounds = [0, *cuts, T - int(rng.integers(0, 3))]
        for d in range(n_docs):
            lo, hi = bounds[d], bounds[d + 1]
            segment_ids[b, lo:hi] = d + 1
            positions[b, lo:hi] = np.arange(hi - lo)
    loss_mask = ((rng.random((B, T)) > 0.3) & (segment_ids > 0)).astype(np.float32)
    return dict(inputs=rng.integers(0, V, (B, T)).astype(np.int32),
                targets=rng.integers(0, V, (B, T)).astype(np.int32),
                loss_mask=loss_mask, segment_ids=segment_ids, positions=positions)


def single_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def mesh_of(data: int, fsdp: int, tensor: int):
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def cached_lm(cfg: ModelConfig):
    """(LM, params) per config, built once per test session (initialisation compiles slowly on CPU)."""
    from jaxpost.models import LM
    lm = LM(cfg)
    return lm, lm.init(jax.random.PRNGKey(0))


def sft_single_and_sharded(lm, tx, schedule, batch: dict, shape, *, grad_accum: int, rows: int, steps: int = 2):
    """(single-device, sharded) results of `steps` SFT steps from the same seed-0 state on one device and on a
    (data, fsdp, tensor) = `shape` mesh: each (host metrics, host params, the final sharded state)."""
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import create_train_state

    out = []
    for mesh in (single_device_mesh(), mesh_of(*shape)):
        state, shardings = create_train_state(lm, tx, mesh, seed=0)
        step = make_step(lm, tx, schedule, SFT(lm),
                         mesh=mesh, state_shardings=shardings, units=rows, grad_accum=grad_accum)
        for _ in range(steps):
            state, metrics = step(state, batch)
        out.append((jax.device_get(metrics), jax.device_get(state.params), state))
    return tuple(out)


def trl_reference():
    """tests/trl_reference.py (TRL 1.16's own loss code; imports torch); skips the calling test when torch or trl is
    not importable."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from tests import trl_reference as module

    return module
