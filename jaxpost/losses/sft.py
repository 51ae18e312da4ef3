"""Supervised fine-tuning loss."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def sft_nll(logp_BT: Float[Array, "B T"], loss_mask_BT: Float[Array, "B T"]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Summed token negative log-likelihood and its denominator.

    Returns (sum over every (b, t) of -logp * mask, sum of mask). The global token mean is
    sum(nll_sum) / sum(n_tokens) over all micro-batches and devices; summing first and dividing once is what makes
    gradient accumulation and data parallelism give exactly the full-batch token mean (never a mean of means).
    """
    mask = loss_mask_BT.astype(jnp.float32)
    return -jnp.sum(logp_BT.astype(jnp.float32) * mask), jnp.sum(mask)
