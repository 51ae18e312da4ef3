"""Optimizer: AdamW with warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxpost.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(logical_axes) -> object:
    """True for weight matrices (two or more axes besides the stacked "layers" axis, not a bias), False for norm
    scales and biases, from a tree of logical-axis tuples (`LM.logical_axes`)."""
    def is_matrix(path, axes):
        name = str(getattr(path[-1], "key", path[-1]))
        return sum(a != "layers" for a in axes) >= 2 and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(is_matrix, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: OptimConfig, total_steps: int, *, logical_axes=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) and its schedule. Weight decay applies to weight matrices only: with `logical_axes` the
    mask comes from `decay_mask` (stacked per-layer norm scales are 2-D but are not matrices); without, ndim >= 2."""
    schedule = lr_schedule(cfg, total_steps)
    mask = decay_mask(logical_axes) if logical_axes is not None else (
        lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=mask))
    return optax.chain(*parts), schedule
