"""Rollout-trainer mismatch correction: truncated and masked importance sampling between the sampler and the trainer.

The sampler that produced a rollout and the trainer that learns from it compute the "same" policy differently: an
inference engine with other kernels, or the sampler in bfloat16 and the trainer in float32. Its tokens then come
from pi_sampler, not from the pi_old the PPO ratio divides by, and the policy gradient is biased by
pi_old / pi_sampler (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
https://fengyao.notion.site/off-policy-rl). The correction multiplies each token's policy loss by a detached
importance weight w = pi_old / pi_sampler, truncated or masked to keep its variance bounded:

    token level      log w_t = old_logp_t - sampler_logp_t                       (one weight per token)
    sequence level   log w_i = sum_t (old_logp_t - sampler_logp_t)               (one weight per sequence)
    *_truncate       w <- clip(w, clip_min, clip_max)                            (TIS)
    *_mask           w <- 0 where w < clip_min or w > clip_max, else w            (MIS: the sample is dropped)

Modes and defaults are TRL 1.16's (``GRPOConfig.vllm_importance_sampling_mode`` = "sequence_mask",
``vllm_importance_sampling_clip_max`` = 3.0, ``..._clip_min`` = None): ``token_truncate``, ``token_mask``,
``sequence_truncate``, ``sequence_mask``; ``none`` turns the correction off. verl's equivalents are
``rollout_is="token"|"sequence"`` with ``rollout_is_threshold`` (truncate) and its rejection-sampling modes (mask).
The weight is computed once per iteration from the scoring pass (``RolloutConfig.old_logp="trainer"``: the
trainer's old log-probs) and the sampler's log-probs, and enters every policy loss as ``is_weight_BT``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpost.losses.preference import _f32

#: The correction modes (module docstring); "none" disables it.
CORRECTION_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_correction(mode: str, clip_min: float | None, clip_max: float | None) -> None:
    """A clear error for a mode that does not exist or bounds that cannot hold."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"rollout correction mode must be one of {CORRECTION_MODES}, got {mode!r}")
    if clip_min is not None and clip_min < 0:
        raise ValueError(f"rollout correction clip_min must be >= 0 (or None), got {clip_min}")
    if clip_max is not None and clip_min is not None and clip_max < clip_min:
        raise ValueError(f"rollout correction needs clip_min <= clip_max, got {clip_min} > {clip_max}")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"rollout correction {mode!r} needs a bound: clip_max (TRL default 3.0) and/or clip_min")


def rollout_correction(old_logp_BT: Float[Array, "B T"], sampler_logp_BT: Float[Array, "B T"],
                       mask_BT: Float[Array, "B T"], *, mode: str = "sequence_mask", clip_min: float | None = None,
                       clip_max: float | None = 3.0) -> tuple[Float[Array, "B T"], dict[str, Array]]:
    """(weights [B, T], metrics) of the importance correction from the sampler's policy to the trainer's.

    ``old_logp_BT``: the trainer's log-probs of the sampled tokens under the params that sampled them (the scoring
    pass); ``sampler_logp_BT``: the sampler's own log-probs of the same tokens; ``mask_BT``: the response mask.
    Weights are detached, 1 where masked (and everywhere with mode "none"); a sequence-level weight is repeated on
    each of the sequence's tokens. A NaN sampler log-prob (a token the sampler could not score) counts as no
    difference, as in TRL; an infinite difference gives an infinite ratio, truncated to a bound or masked, as in TRL.
    Metrics, means over the response tokens with a finite difference unless said: ``mismatch_k1`` (mean of
    sampler_logp - old_logp, the k1 estimate of KL(pi_sampler || pi_old) per token), ``mismatch_k3`` (its k3
    estimate, never negative), ``logp_diff_mean`` / ``logp_diff_max`` (|old - sampler|, TRL's
    ``sampling_logp_difference``), ``is_weight_mean`` / ``is_weight_min`` / ``is_weight_max`` (over tokens, or over
    sequences at sequence level, before masking rows out of the loss), ``is_clipped_frac`` (the fraction of tokens,
    or sequences, whose weight was truncated or masked).
    """
    check_correction(mode, clip_min, clip_max)
    m_BT = _f32(jnp.asarray(mask_BT) > 0)
    raw_BT = _f32(old_logp_BT) - _f32(sampler_logp_BT)
    d_BT = jnp.where((m_BT > 0) & ~jnp.isnan(raw_BT), raw_BT, 0.0)  # NaN: no difference (TRL); +-inf stays
    finite_BT = m_BT * jnp.isfinite(raw_BT)  # the metrics average the finite differences
    fd_BT = jnp.where(finite_BT > 0, raw_BT, 0.0)
    n = jnp.maximum(jnp.sum(finite_BT), 1.0)
    metrics = {"mismatch_k1": jnp.sum(-fd_BT) / n,
               "mismatch_k3": jnp.sum((jnp.expm1(fd_BT) - fd_BT) * finite_BT) / n,
               "logp_diff_mean": jnp.sum(jnp.abs(fd_BT)) / n,
               "logp_diff_max": jnp.max(jnp.abs(fd_BT), initial=0.0)}
    if mode == "none":
        return jnp.ones_like(m_BT), jax.tree.map(jax.lax.stop_gradient, metrics)
    sequence = mode.startswith("sequence")
    if sequence:
        valid_B = jnp.sum(m_BT, axis=-1) > 0
        w = jnp.exp(jnp.sum(d_BT, axis=-1))  # [B]
        unit_mask = _f32(valid_B)
    else:
        w = jnp.exp(d_BT)  # [B, T]
        unit_mask = m_BT
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    outside = (w < lo) | (w > hi)
    w_corr = jnp.clip(w, lo, hi) if mode.endswith("truncate") else jnp.where(outside, 0.0, w)
    units = jnp.maximum(jnp.sum(unit_mask), 1.0)
    valid = unit_mask > 0
    any_valid = jnp.any(valid)
    metrics.update(is_weight_mean=jnp.sum(w * unit_mask) / units,
                   is_weight_min=jnp.where(any_valid, jnp.min(jnp.where(valid, w, jnp.inf)), 0.0),
                   is_weight_max=jnp.where(any_valid, jnp.max(jnp.where(valid, w, -jnp.inf)), 0.0),
                   is_clipped_frac=jnp.sum(_f32(outside) * unit_mask) / units)
    w_BT = w_corr[:, None] * jnp.ones_like(m_BT) if sequence else w_corr
    w_BT = jnp.where(m_BT > 0, w_BT, 1.0)
    return jax.lax.stop_gradient(w_BT), jax.tree.map(jax.lax.stop_gradient, metrics)
