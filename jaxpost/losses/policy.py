"""Policy-gradient losses (PPO-clip with DAPO's clip-higher, dual-clip and two-sided clipping; GSPO and LUSPO;
RLOO's sequence ratio; REINFORCE; CISPO, SAPO, VESPO), the PPO value loss, the entropy bonus, and the loss
aggregations that make micro-batching and data parallelism exact. docs/losses.md maps each to TRL and verl.

Pure functions on per-token arrays ``[B, T]``: ``logp_BT`` (log-probs of the sampled tokens under the policy being
trained, the only input that carries a gradient), ``old_logp_BT`` (under the policy that sampled them, or the policy
at the start of this PPO epoch; detached), advantages (``[B]`` per sequence or ``[B, T]`` per token, from
``jaxpost.losses.advantages``; detached) and the response mask ``mask_BT``.

Every loss also takes ``is_weight_BT``, the detached rollout-correction weight of each token
(``jaxpost.losses.correction``: truncated or masked importance sampling between the sampler and the trainer); it
multiplies the per-token loss (VESPO folds it into its sequence weight instead).

Every loss returns ``(loss_BT, metrics)``: the per-token loss ``[B, T]`` (0 on masked tokens, whatever the inputs
hold there) and a dict ``name -> (sum, count)`` of scalars, each metric a sum over this batch and its denominator,
so that metrics too add up over micro-batches and devices (``metric_means`` divides at the end).

Aggregation: the scalar to differentiate is ``aggregate_loss(loss_BT, mask_BT, mode=..., denominator=D)`` where D
is the *global* denominator of the whole step's batch, ``loss_denominator(mask_BT_full, mode=...)`` (under data
parallelism: the psum of the per-device values; over micro-batches: their sum; it depends on the masks only, so the
step computes it before the first micro-batch). Each micro-batch then contributes numerator / D, and the sum of the
contributions and of their gradients over any split into micro-batches and devices is the full-batch loss and
gradient, exactly. This makes the gradient-accumulation normalisation bug that hit TRL and veRL (a mean of
per-micro-batch means, which weights tokens by the inverse size of their micro-batch) impossible by construction.
Modes (``LOSS_AGGREGATIONS``):

* ``token_mean``: sum over all response tokens of l_t / (response tokens in the global batch). DAPO's token-level
  loss (Yu et al. 2025, arXiv:2503.14476, Eq. 12); TRL ``loss_type="dapo"`` (global ``num_items_in_batch``); verl
  ``token-mean``. TRL's ``bnpo`` is the same per local batch (not global).
* ``seq_mean_token_mean``: sum over sequences of (mean of l_t over that sequence's tokens) / (sequences in the global
  batch). The GRPO paper's 1/G sum_i 1/|o_i| sum_t (Shao et al. 2024); TRL ``loss_type="grpo"``; verl
  ``seq-mean-token-mean``. GSPO's natural mode.
* ``seq_mean_token_sum``: sum over all response tokens of l_t / (sequences in the global batch): each sequence's
  token sum, averaged over sequences. verl ``seq-mean-token-sum``; TRL's ``luspo`` normalisation.
* ``seq_mean_token_sum_norm``: sum over sequences of (sum of l_t) / (sequences in the global batch x max_length),
  max_length a constant (e.g. the sampler's maximum number of new tokens). Dr.GRPO (Liu et al. 2025,
  arXiv:2503.20783); TRL ``loss_type="dr_grpo"`` (B x ``max_completion_length`` per process); verl
  ``seq-mean-token-sum-norm`` divides by a constant only (``loss_scale_factor``, default the padded length).

"Sequences" counts the rows with at least one response token (padding rows are left out, as in verl).

A step composes, per micro-batch, e.g. for GRPO with a KL term in the loss and an entropy bonus:

    loss_BT, metrics = get_policy_loss("ppo")(logp_BT, old_logp_BT, adv_B, mask_BT, eps_low=0.2, eps_high=0.28)
    loss_BT += kl_loss(logp_BT, ref_logp_BT, mask_BT, beta=0.04) + entropy_bonus(ent_BT, mask_BT, coef=1e-3)
    loss = aggregate_loss(loss_BT, mask_BT, mode="token_mean", denominator=D)

and the PPO critic ``aggregate_loss(value_loss(...)[0], mask_BT, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpost.losses.preference import _check, _f32
from jaxpost.losses.registry import Registry

Metrics = dict[str, tuple[Array, Array]]
PolicyLossOutput = tuple[Float[Array, "B T"], Metrics]
Advantages = Float[Array, "B"] | Float[Array, "B T"]


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _mask(mask_BT) -> Array:
    return _f32(jnp.asarray(mask_BT) > 0)


def _adv_BT(advantages, m_BT) -> Array:
    """Detached float32 advantages broadcast to [B, T] ([B] -> the same value on every token), 0 on masked tokens
    (so garbage there never multiplies a log-prob into a NaN gradient)."""
    a = jax.lax.stop_gradient(_f32(advantages))
    if a.ndim == 1:
        a = a[:, None]
    return jnp.where(m_BT > 0, jnp.broadcast_to(a, m_BT.shape), 0.0)


def _log_ratio(logp_BT, old_logp_BT, m_BT) -> Array:
    """logp - stop_gradient(old_logp) in float32, 0 on masked tokens (so padding never reaches exp or a gradient)."""
    d_BT = _f32(logp_BT) - jax.lax.stop_gradient(_f32(old_logp_BT))
    return jnp.where(m_BT > 0, d_BT, 0.0)


def _token_metrics(m_BT: Array, **values_BT: Array) -> Metrics:
    """name -> (sum over valid tokens, number of valid tokens), detached."""
    n = jnp.sum(m_BT)
    return {k: (jax.lax.stop_gradient(jnp.sum(_f32(v) * m_BT)), n) for k, v in values_BT.items()}


def _seq_metrics(valid_B: Array, **values_B: Array) -> Metrics:
    """name -> (sum over valid sequences, number of valid sequences), detached."""
    n = jnp.sum(valid_B)
    return {k: (jax.lax.stop_gradient(jnp.sum(_f32(v) * valid_B)), n) for k, v in values_B.items()}


def _ratio_metrics(log_ratio_BT: Array, m_BT: Array) -> Metrics:
    """Token-level ratio and KL(old || new) estimates: ratio mean, k3 = (ratio - 1) - log ratio, k1 = -log ratio."""
    return _token_metrics(m_BT, ratio=jnp.exp(log_ratio_BT), approx_kl=jnp.expm1(log_ratio_BT) - log_ratio_BT,
                          approx_kl_k1=-log_ratio_BT)


def _eps_high(eps_low, eps_high):
    return eps_low if eps_high is None else eps_high


def _check_clip(eps_low, eps_high, dual_clip=None) -> None:
    _check(eps_low, lambda v: 0.0 <= v < 1.0, "eps_low must lie in [0, 1)")
    _check(eps_high, lambda v: v >= 0.0, "eps_high must be >= 0")
    if dual_clip is not None:
        _check(dual_clip, lambda v: v > 1.0, "dual_clip (c) must be > 1")


def _check_delta(delta) -> None:
    if delta is not None:
        _check(delta, lambda v: v > 1.0, "delta (the two-sided clip's upper bound on the ratio) must be > 1")


def _apply_is(loss_BT: Array, is_weight_BT, m_BT: Array) -> Array:
    """loss x the detached rollout-correction weight (``jaxpost.losses.correction``), 0 on masked tokens."""
    if is_weight_BT is not None:
        loss_BT = loss_BT * jax.lax.stop_gradient(jnp.where(m_BT > 0, _f32(is_weight_BT), 1.0))
    return jnp.where(m_BT > 0, loss_BT, 0.0)


def metric_means(metrics: Metrics) -> dict[str, Array]:
    """Divide each summed metric by its denominator (after summing over micro-batches / psum over devices)."""
    return {k: s / jnp.maximum(n, 1.0) for k, (s, n) in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------------
# policy losses


def ppo_clip(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
             mask_BT: Float[Array, "B T"], *, eps_low: float = 0.2, eps_high: float | None = None,
             dual_clip: float | None = None, delta: float | None = None,
             is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """PPO-clip per token, with asymmetric clipping and optional dual-clip or two-sided (delta) clipping:

        rho_t = exp(logp_t - old_logp_t)
        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)
        dual-clip (c > 1), for A_t < 0 only: l_t = min(l_t, -c A_t)
        delta (> 1): rho_t in the first term is min(rho_t, delta) (value and gradient), for every sign of A_t

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. 7 (eps_high = eps_low =
    0.2, the default); DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, Eq. 10: eps_low = 0.2, eps_high = 0.28);
    dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
    arXiv:1912.09729, Eq. 5: bounds the loss of a negative-advantage token whose ratio has grown large; verl's
    ``clip_ratio_c``, default 3 there, off here). ``delta`` is INTELLECT-2's two-sided clipping (Prime Intellect
    2025, arXiv:2505.07291; TRL ``GRPOConfig.delta``, exactly TRL's ``coef_1 = clamp(coef_1, max=delta)`` before the
    min; off by default, TRL recommends delta > 1 + eps_high): with A < 0 it bounds the loss at delta |A| like
    dual-clip with c = delta. GRPO and DAPO are this loss with their advantages and aggregation.
    ``is_weight_BT``: the rollout-correction weight (``jaxpost.losses.correction``), detached, multiplied onto l_t.

    Metrics (sum, count) over tokens: ``clip_frac_low`` (rho < 1 - eps_low and A < 0: clipped below, no gradient),
    ``clip_frac_high`` (rho > 1 + eps_high and A > 0), ``clip_frac`` (either; TRL's and verl's ``clipfrac``),
    ``clip_frac_dual`` (A < 0 and rho > c), ``ratio`` (mean rho), ``approx_kl`` (k3 estimate of KL(old || new),
    (rho - 1) - log rho), ``approx_kl_k1`` (-log rho, verl's ``ppo_kl``). With old == new every clip fraction is 0,
    the ratio 1 and the gradient that of REINFORCE: -A_t grad logp_t.
    """
    eps_high = _eps_high(eps_low, eps_high)
    _check_clip(eps_low, eps_high, dual_clip)
    _check_delta(delta)
    m_BT = _mask(mask_BT)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    a_BT = _adv_BT(advantages, m_BT)
    ratio_BT = jnp.exp(log_ratio_BT)
    extra = {}
    unclipped_BT = ratio_BT
    if delta is not None:
        unclipped_BT = jnp.minimum(ratio_BT, delta)
        extra["clip_frac_delta"] = ratio_BT > delta
    loss_BT = jnp.maximum(-a_BT * unclipped_BT, -a_BT * jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high))
    low_BT = (ratio_BT < 1.0 - eps_low) & (a_BT < 0)
    high_BT = (ratio_BT > 1.0 + eps_high) & (a_BT > 0)
    if dual_clip is not None:
        loss_BT = jnp.where(a_BT < 0, jnp.minimum(loss_BT, -dual_clip * a_BT), loss_BT)
        extra["clip_frac_dual"] = (ratio_BT > dual_clip) & (a_BT < 0)
    loss_BT = _apply_is(loss_BT, is_weight_BT, m_BT)
    metrics = {**_token_metrics(m_BT, clip_frac_low=low_BT, clip_frac_high=high_BT, clip_frac=low_BT | high_BT,
                                **extra),
               **_ratio_metrics(log_ratio_BT, m_BT)}
    return loss_BT, metrics


def _gspo_sequence_terms(logp_BT, old_logp_BT, m_BT):
    n_B = jnp.sum(m_BT, axis=-1)
    valid_B = _f32(n_B > 0)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    seq_log_ratio_B = jnp.sum(log_ratio_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    return n_B, valid_B, log_ratio_BT, seq_log_ratio_B


def _gspo_metrics(s_B, a_B, valid_B, eps_low, eps_high, log_ratio_BT, m_BT) -> Metrics:
    low_B = (s_B < 1.0 - eps_low) & (a_B < 0)
    high_B = (s_B > 1.0 + eps_high) & (a_B > 0)
    return {**_seq_metrics(valid_B, clip_frac_low=low_B, clip_frac_high=high_B, clip_frac=low_B | high_B,
                           seq_ratio=s_B),
            **_ratio_metrics(log_ratio_BT, m_BT)}


def gspo(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
         mask_BT: Float[Array, "B T"], *, eps_low: float = 3e-4, eps_high: float | None = 4e-4,
         is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """GSPO-token: the sequence-level ratio, clipped per sequence, with the token-level gradient form.

        s_i = exp( (1 / |y_i|) sum_t (logp_{i,t} - old_logp_{i,t}) )            (sequence ratio, length-normalised)
        s_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})]                        (value s_i, gradient s_i grad logp_t)
        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t})

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, Eq. 13-14 (GSPO-token; verl's
    ``loss_mode="gspo"``). Clipping is decided per sequence (every token of a sequence shares the ratio), so a clipped
    sequence contributes no gradient at all. Advantages may differ per token (the point of GSPO-token); with one
    advantage per sequence and ``seq_mean_token_mean`` aggregation (the paper's 1/G sum_i; verl hard-codes it for
    GSPO) the loss and its gradient equal the sequence form ``gspo_seq``. With one advantage per sequence, any
    aggregation, this is also TRL's ``importance_sampling_level="sequence"`` for its clipped loss types (same values
    and gradients; TRL's default epsilon is 0.2 there), as long as a rollout-correction weight, if any, is constant
    within each sequence: a token-level weight scales each token's gradient here, while TRL's sequence form spreads
    the sequence's mean weight over its tokens (``gspo_seq`` is TRL's form there too). Default eps_low = 3e-4,
    eps_high = 4e-4 are the paper's (sequence ratios sit much closer to 1 than token ratios).

    Metrics: clip fractions and ``seq_ratio`` per sequence (sum, number of sequences); ``ratio``/``approx_kl`` per
    token as in ``ppo_clip``.
    """
    eps_high = _eps_high(eps_low, eps_high)
    _check_clip(eps_low, eps_high)
    m_BT = _mask(mask_BT)
    n_B, valid_B, log_ratio_BT, seq_log_ratio_B = _gspo_sequence_terms(logp_BT, old_logp_BT, m_BT)
    lp_BT = _f32(logp_BT)
    token_term_BT = jnp.where(m_BT > 0, lp_BT - jax.lax.stop_gradient(lp_BT), 0.0)  # value 0, gradient grad logp
    s_BT = jnp.exp(jax.lax.stop_gradient(seq_log_ratio_B)[:, None] + token_term_BT)
    a_BT = _adv_BT(advantages, m_BT)
    loss_BT = jnp.maximum(-a_BT * s_BT, -a_BT * jnp.clip(s_BT, 1.0 - eps_low, 1.0 + eps_high))
    loss_BT = _apply_is(loss_BT, is_weight_BT, m_BT)
    s_B = jnp.exp(seq_log_ratio_B)
    a_B = jnp.sum(a_BT * m_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    return loss_BT, _gspo_metrics(s_B, a_B, valid_B, eps_low, eps_high, log_ratio_BT, m_BT)


def gspo_seq(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
             mask_BT: Float[Array, "B T"], *, eps_low: float = 3e-4, eps_high: float | None = 4e-4,
             is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """GSPO, sequence form: l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), s_i as in ``gspo``.

    Zheng et al. 2025, arXiv:2507.18071, Eq. 5-7: the gradient flows through s_i itself,
    grad s_i = s_i (1 / |y_i|) sum_t grad logp_t. A_i is one advantage per sequence: ``advantages`` [B], or [B, T]
    reduced by its mean over the sequence's response tokens. The per-token loss returned is l_i on every response
    token of sequence i, so ``seq_mean_token_mean`` aggregation gives the paper's 1/G sum_i l_i (``token_mean`` would
    weight sequences by length). Metrics as ``gspo``.
    """
    return _sequence_clip(logp_BT, old_logp_BT, advantages, mask_BT, eps_low, eps_high, is_weight_BT, mean=True)


def _sequence_clip(logp_BT, old_logp_BT, advantages, mask_BT, eps_low, eps_high, is_weight_BT, *, mean: bool):
    """PPO-clip on one ratio per sequence, exp(mean (mean=True, GSPO) or sum (RLOO) of the token log-ratios), the
    sequence's loss on each of its response tokens."""
    eps_high = _eps_high(eps_low, eps_high)
    _check_clip(eps_low, eps_high)
    m_BT = _mask(mask_BT)
    n_B, valid_B, log_ratio_BT, seq_log_ratio_B = _gspo_sequence_terms(logp_BT, old_logp_BT, m_BT)
    if not mean:
        seq_log_ratio_B = jnp.sum(log_ratio_BT, axis=-1)
    a = jax.lax.stop_gradient(_f32(advantages))
    a_B = a if a.ndim == 1 else jnp.sum(a * m_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    s_B = jnp.exp(seq_log_ratio_B)
    loss_B = jnp.maximum(-a_B * s_B, -a_B * jnp.clip(s_B, 1.0 - eps_low, 1.0 + eps_high))
    loss_BT = _apply_is(jnp.broadcast_to(loss_B[:, None], m_BT.shape), is_weight_BT, m_BT)
    return loss_BT, _gspo_metrics(s_B, a_B, valid_B, eps_low, eps_high, log_ratio_BT, m_BT)


def luspo(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
          mask_BT: Float[Array, "B T"], *, eps_low: float = 3e-4, eps_high: float | None = 4e-4,
          is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """LUSPO: GSPO's sequence loss l_i (``gspo_seq``) scaled by the sequence's length, |y_i| l_i.

    "Length-Unbiased Sequence Policy Optimization" (arXiv:2602.05261; TRL ``loss_type="luspo"`` with
    ``importance_sampling_level="sequence"``). GSPO's length-normalised ratio makes a sequence's gradient
    s_i A_i (1 / |y_i|) sum_t grad logp_t, so long sequences get less weight per token; scaling by |y_i| restores
    s_i A_i sum_t grad logp_t. The per-token loss returned is l_i on every response token, and the scaling by |y_i|
    is the aggregation ``seq_mean_token_sum`` (sum over tokens / number of sequences, TRL's
    ``(per_token_loss * mask).sum(-1).mean()``), which ``RLLossConfig`` requires with this loss. Defaults are
    GSPO's eps (TRL's config default epsilon = 0.2 applies when set there). Metrics as ``gspo``.
    """
    return _sequence_clip(logp_BT, old_logp_BT, advantages, mask_BT, eps_low, eps_high, is_weight_BT, mean=True)


def rloo_seq(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
             mask_BT: Float[Array, "B T"], *, eps_low: float = 0.2, eps_high: float | None = None,
             is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """RLOO's sequence-level PPO-clip: s_i = exp(sum_t (logp_t - old_logp_t)) (the ratio of the whole sequence's
    probabilities, not GSPO's geometric mean), l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i).

    TRL's ``RLOOTrainer`` (``_compute_loss``: ``log_ratio = logps - old_logps`` on summed log-probs,
    ``loss = per_sequence_loss.mean()``); use it with ``seq_mean_token_mean`` (the mean over sequences) and RLOO
    advantages. On-policy (s = 1) the gradient is -A_i sum_t grad logp_t per sequence. l_i is returned on every
    response token of sequence i. Metrics as ``gspo`` (``seq_ratio`` is s_i).
    """
    return _sequence_clip(logp_BT, old_logp_BT, advantages, mask_BT, eps_low, eps_high, is_weight_BT, mean=False)


def reinforce(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
              mask_BT: Float[Array, "B T"], *, is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """Plain REINFORCE (on-policy policy gradient): l_t = -A_t logp_t.

    Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning"; with
    RLOO or GRPO advantages this is RLOO's / on-policy GRPO's estimator. No ratio and no clipping: the gradient is
    -A_t grad logp_t, equal to ``ppo_clip``'s when old == new. ``old_logp_BT`` enters the metrics only (``ratio``,
    ``approx_kl``, ``approx_kl_k1``, which show how off-policy the batch is).
    """
    m_BT = _mask(mask_BT)
    a_BT = _adv_BT(advantages, m_BT)
    loss_BT = _apply_is(-a_BT * jnp.where(m_BT > 0, _f32(logp_BT), 0.0), is_weight_BT, m_BT)
    return loss_BT, _ratio_metrics(_log_ratio(logp_BT, old_logp_BT, m_BT), m_BT)


def cispo(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
          mask_BT: Float[Array, "B T"], *, clip_max: float = 5.0, clip_min: float | None = None,
          is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """CISPO: clip the importance weight, not the update, and keep every token's gradient:

        l_t = -sg(clip(rho_t, clip_min, clip_max)) A_t logp_t,   rho_t = exp(logp_t - old_logp_t)

    MiniMax 2025, "MiniMax-M1", arXiv:2506.13585, Eq. 4-5: PPO's clip zeroes the gradient of tokens whose ratio
    left the trust region (often the rare "However"/"Wait" tokens of a reasoning trace); CISPO bounds their weight
    instead (a REINFORCE form with a truncated IS weight). The bounds are on the weight itself: ``clip_max`` is
    TRL's ``epsilon_high`` for ``loss_type="cispo"`` (TRL: ``clamp(coef_1, max=epsilon_high)``, no lower bound;
    ScaleRL's eps_max, recommended 5.0, the default here); verl's ``loss_mode="cispo"`` clips to
    [1 - clip_ratio_low, 1 + clip_ratio_high], i.e. clip_min = 1 - clip_ratio_low, clip_max = 1 + clip_ratio_high.
    TRL and the paper aggregate it as ``token_mean``. On-policy the gradient is REINFORCE's, -A_t grad logp_t.
    Metrics: ``clip_frac`` (tokens whose weight was clipped), ``clip_frac_high`` / ``clip_frac_low`` (capped at
    clip_max / raised to clip_min, whatever the sign of A: the weight is clipped either way), ``clip_frac_high_pos``
    (capped with A > 0: TRL's ``cispo_clip_ratio``), ratio metrics.
    """
    _check(clip_max, lambda v: v > 0.0, "cispo clip_max must be > 0")
    m_BT = _mask(mask_BT)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    ratio_BT = jnp.exp(log_ratio_BT)
    w_BT = jax.lax.stop_gradient(jnp.clip(ratio_BT, clip_min, clip_max))
    a_BT = _adv_BT(advantages, m_BT)
    loss_BT = _apply_is(-w_BT * a_BT * jnp.where(m_BT > 0, _f32(logp_BT), 0.0), is_weight_BT, m_BT)
    high_BT = ratio_BT > clip_max
    low_BT = (ratio_BT < clip_min) if clip_min is not None else jnp.zeros_like(high_BT)
    return loss_BT, {**_token_metrics(m_BT, clip_frac=high_BT | low_BT, clip_frac_high=high_BT, clip_frac_low=low_BT,
                                      clip_frac_high_pos=high_BT & (a_BT > 0)),
                     **_ratio_metrics(log_ratio_BT, m_BT)}


def sapo(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
         mask_BT: Float[Array, "B T"], *, tau_pos: float = 1.0, tau_neg: float = 1.05,
         is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """SAPO: a soft, temperature-controlled gate in place of the hard clip:

        l_t = -(4 / tau) sigmoid(tau (rho_t - 1)) A_t,   tau = tau_pos if A_t > 0 else tau_neg

    Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347 (Qwen); TRL ``loss_type="sapo"`` with
    ``sapo_temperature_pos`` = 1.0 and ``sapo_temperature_neg`` = 1.05 (the defaults here). The gradient is
    -A_t 4 sigma (1 - sigma) rho_t grad logp_t: exactly REINFORCE's at rho = 1, decaying smoothly as the ratio leaves
    1 (faster for negative advantages, tau_neg > tau_pos), instead of PPO's cut to zero. TRL aggregates it per
    sequence (``seq_mean_token_mean``, its "grpo" normalisation). Metrics: ``gate`` (4 sigma (1 - sigma), the
    gradient's scale relative to REINFORCE at rho = 1), ratio metrics.
    """
    _check(tau_pos, lambda v: v > 0.0, "sapo tau_pos must be > 0")
    _check(tau_neg, lambda v: v > 0.0, "sapo tau_neg must be > 0")
    m_BT = _mask(mask_BT)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    ratio_BT = jnp.exp(log_ratio_BT)
    a_BT = _adv_BT(advantages, m_BT)
    tau_BT = jnp.where(a_BT > 0, tau_pos, tau_neg)
    sig_BT = jax.nn.sigmoid(tau_BT * (ratio_BT - 1.0))
    loss_BT = _apply_is(-sig_BT * 4.0 / tau_BT * a_BT, is_weight_BT, m_BT)
    return loss_BT, {**_token_metrics(m_BT, gate=4.0 * sig_BT * (1.0 - sig_BT)), **_ratio_metrics(log_ratio_BT, m_BT)}


def vespo(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
          mask_BT: Float[Array, "B T"], *, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
          lambda_neg: float = 2.0, is_weight_BT: Float[Array, "B T"] | None = None) -> PolicyLossOutput:
    """VESPO: a smooth Gamma-shaped weight on the sequence importance ratio, REINFORCE form:

        log w_i = clamp(sum_t clamp(logp_t - old_logp_t, -20, 20) [+ sum_t log is_weight_t], log 1e-8, 20)
        phi_i = exp(lambda + k log w_i - lambda w_i)   (= e^lambda w^k e^(-lambda w), phi(1) = 1; detached)
        l_t = -phi_i A_t logp_t,   (k, lambda) = (k_pos, lambda_pos) if A >= 0 else (k_neg, lambda_neg)

    "Variational Sequence-Level Soft Policy Optimization" (arXiv:2602.10693) as TRL 1.16 defines it
    (``GRPOTrainer.get_gamma_weights``, ``loss_type="vespo"``, defaults k_pos 2, lambda_pos 3, k_neg 3,
    lambda_neg 2): the ratio is the sequence's product of token ratios (a sum of log-ratios, not GSPO's mean);
    phi down-weights sequences whose ratio is far from 1 on either side, smoothly. A rollout-correction weight is
    folded into w (its log clamped to [log 1e-8, 20]) instead of multiplying the loss, as TRL does. TRL aggregates it
    as ``token_mean``. On-policy (w = 1, phi = 1) the gradient is REINFORCE's. Metrics: ``phi`` per sequence,
    ratio metrics.
    """
    m_BT = _mask(mask_BT)
    n_B = jnp.sum(m_BT, axis=-1)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    lower = math.log(1e-8)
    log_w_B = jnp.sum(jnp.clip(log_ratio_BT, -20.0, 20.0) * m_BT, axis=-1)
    if is_weight_BT is not None:
        log_is_BT = jnp.clip(jnp.log(_f32(is_weight_BT)), lower, 20.0)
        log_w_B = log_w_B + jnp.sum(jnp.where(m_BT > 0, log_is_BT, 0.0), axis=-1)
    log_w_B = jax.lax.stop_gradient(jnp.clip(log_w_B, lower, 20.0))
    a_BT = _adv_BT(advantages, m_BT)
    nonneg_BT = a_BT >= 0
    k_BT = jnp.where(nonneg_BT, k_pos, k_neg)
    lam_BT = jnp.maximum(jnp.where(nonneg_BT, lambda_pos, lambda_neg), 1e-4)
    phi_BT = jnp.exp(lam_BT + k_BT * log_w_B[:, None] - lam_BT * jnp.exp(log_w_B)[:, None])
    phi_BT = jnp.nan_to_num(phi_BT, nan=0.0, posinf=0.0, neginf=0.0)
    loss_BT = jnp.where(m_BT > 0, -phi_BT * a_BT * jnp.where(m_BT > 0, _f32(logp_BT), 0.0), 0.0)
    phi_B = jnp.sum(phi_BT * m_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    return loss_BT, {**_seq_metrics(_f32(n_B > 0), phi=phi_B), **_ratio_metrics(log_ratio_BT, m_BT)}


POLICY_LOSSES = Registry("policy loss", {
    "ppo": ppo_clip,
    "gspo": gspo,
    "gspo_seq": gspo_seq,
    "luspo": luspo,
    "rloo_seq": rloo_seq,
    "reinforce": reinforce,
    "cispo": cispo,
    "sapo": sapo,
    "vespo": vespo,
}, hparams={
    "cispo": {"clip_max": "cispo_clip_max", "clip_min": "cispo_clip_min"},
    "sapo": {"tau_pos": "sapo_tau_pos", "tau_neg": "sapo_tau_neg"},
    "vespo": {"k_pos": "vespo_k_pos", "lambda_pos": "vespo_lambda_pos", "k_neg": "vespo_k_neg",
              "lambda_neg": "vespo_lambda_neg"},
})
"""Name -> per-token policy loss. Uniform call: ``f(logp_BT, old_logp_BT, advantages, mask_BT, *,
is_weight_BT=None, **hyper)``; hyperparameters (keyword <- ``RLLossConfig`` field): ppo ``eps_low, eps_high,
dual_clip, delta``; gspo, gspo_seq, luspo, rloo_seq ``eps_low, eps_high``; reinforce none; cispo ``clip_max <-
cispo_clip_max, clip_min <- cispo_clip_min``; sapo ``tau_pos <- sapo_tau_pos, tau_neg <- sapo_tau_neg``; vespo
``k_pos, lambda_pos, k_neg, lambda_neg <- vespo_*``."""

#: The aggregation a policy loss is defined with, where it has one (``RLLossConfig`` checks it).
REQUIRED_AGGREGATION = {"luspo": "seq_mean_token_sum"}


def get_policy_loss(name: str) -> Callable[..., PolicyLossOutput]:
    """The policy loss registered under ``name`` (``POLICY_LOSSES``)."""
    return POLICY_LOSSES.get(name)


# ----------------------------------------------------------------------------------------------------------------------
# value loss and entropy bonus


def value_loss(values_BT: Float[Array, "B T"], old_values_BT: Float[Array, "B T"], returns_BT: Float[Array, "B T"],
               mask_BT: Float[Array, "B T"], *, clip_eps: float | None = 0.2) -> PolicyLossOutput:
    """PPO value loss with value clipping, per token:

        l_t = 0.5 max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)

    (``clip_eps=None``: 0.5 (V_t - R_t)^2). Schulman et al. 2017 (the clipped value objective of the PPO reference
    implementation, OpenAI baselines ppo2); eps_v = 0.2 was TRL's ``cliprange_value`` (its PPOTrainer, gone from
    TRL 1.x; verl defaults to 0.5).
    Aggregate it like the policy loss. ``returns_BT`` from ``gae``; ``values_BT`` carries the gradient.
    Metrics: ``vf_clip_frac`` (tokens where the clipped term is the larger), ``vf_error`` ((V - R)^2).
    """
    _check(clip_eps, lambda v: v > 0.0, "clip_eps must be > 0 (or None)")
    m_BT = _mask(mask_BT)
    v_BT = _f32(values_BT)
    v_old_BT = jax.lax.stop_gradient(_f32(old_values_BT))
    r_BT = jax.lax.stop_gradient(_f32(returns_BT))
    v_BT, v_old_BT, r_BT = (jnp.where(m_BT > 0, x, 0.0) for x in (v_BT, v_old_BT, r_BT))
    l1_BT = jnp.square(v_BT - r_BT)
    if clip_eps is None:
        loss_BT, clipped_BT = 0.5 * l1_BT, jnp.zeros_like(l1_BT)
    else:
        l2_BT = jnp.square(v_old_BT + jnp.clip(v_BT - v_old_BT, -clip_eps, clip_eps) - r_BT)
        loss_BT, clipped_BT = 0.5 * jnp.maximum(l1_BT, l2_BT), l2_BT > l1_BT
    loss_BT = jnp.where(m_BT > 0, loss_BT, 0.0)
    return loss_BT, _token_metrics(m_BT, vf_clip_frac=clipped_BT, vf_error=l1_BT)


def entropy_bonus(entropy_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, coef: float) -> Float[Array, "B T"]:
    """Entropy bonus as a per-token loss term: -coef * H_t (0 on masked tokens); add it to the policy loss before
    aggregation. H_t is the entropy of the policy's next-token distribution (``token_logprobs(..., entropy=True)``);
    verl's ``entropy_coeff``."""
    m_BT = _mask(mask_BT)
    return jnp.where(m_BT > 0, -coef * _f32(entropy_BT), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# aggregation: (numerator, denominator) per batch; the global loss is sum(numerators) / sum(denominators)


def _seq_counts(m_BT: Array) -> tuple[Array, Array]:
    n_B = jnp.sum(m_BT, axis=-1)
    return n_B, jnp.sum(_f32(n_B > 0))


def token_mean(loss_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, max_length: int | None = None
               ) -> tuple[Array, Array]:
    """(sum_{b,t} l m, sum_{b,t} m): the token mean over the global batch. ``max_length`` unused."""
    m_BT = _mask(mask_BT)
    return jnp.sum(jnp.where(m_BT > 0, _f32(loss_BT), 0.0)), jnp.sum(m_BT)


def seq_mean_token_mean(loss_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, max_length: int | None = None
                        ) -> tuple[Array, Array]:
    """(sum_b (sum_t l m) / n_b, #sequences with n_b > 0): the mean over sequences of per-sequence token means."""
    m_BT = _mask(mask_BT)
    n_B, n_seq = _seq_counts(m_BT)
    per_seq_B = jnp.sum(jnp.where(m_BT > 0, _f32(loss_BT), 0.0), axis=-1) / jnp.maximum(n_B, 1.0)
    return jnp.sum(per_seq_B), n_seq


def seq_mean_token_sum_norm(loss_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *,
                            max_length: int | None = None) -> tuple[Array, Array]:
    """(sum_{b,t} l m, #sequences with n_b > 0 x max_length): Dr.GRPO's constant normaliser; max_length required."""
    if max_length is None:
        raise ValueError("seq_mean_token_sum_norm needs max_length (a constant, e.g. the maximum response length)")
    m_BT = _mask(mask_BT)
    _, n_seq = _seq_counts(m_BT)
    return jnp.sum(jnp.where(m_BT > 0, _f32(loss_BT), 0.0)), n_seq * float(max_length)


def seq_mean_token_sum(loss_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, max_length: int | None = None
                       ) -> tuple[Array, Array]:
    """(sum_{b,t} l m, #sequences with n_b > 0): the mean over sequences of per-sequence token sums (verl
    ``seq-mean-token-sum``; LUSPO's). ``max_length`` unused."""
    m_BT = _mask(mask_BT)
    _, n_seq = _seq_counts(m_BT)
    return jnp.sum(jnp.where(m_BT > 0, _f32(loss_BT), 0.0)), n_seq


LOSS_AGGREGATIONS = Registry("loss aggregation", {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
})
"""Name -> ``f(loss_BT, mask_BT, *, max_length=None) -> (numerator, denominator)``; both are sums over rows, so they
add over micro-batches and psum over devices. The denominator depends on the mask (and max_length) only."""


def get_loss_aggregation(name: str) -> Callable[..., tuple[Array, Array]]:
    """The loss aggregation registered under ``name`` (``LOSS_AGGREGATIONS``)."""
    return LOSS_AGGREGATIONS.get(name)


def loss_denominator(mask_BT: Float[Array, "B T"], *, mode: str, max_length: int | None = None) -> Float[Array, ""]:
    """This batch's share of the global denominator of ``mode``: response tokens (token_mean), sequences with a
    response token (seq_mean_token_mean), or those times max_length (seq_mean_token_sum_norm). Call it on the whole
    step's batch, or sum it over micro-batches and ``psum`` it over data-parallel devices, and pass the result to
    every ``aggregate_loss`` call of the step."""
    m_BT = _mask(mask_BT)
    return get_loss_aggregation(mode)(jnp.zeros_like(m_BT), m_BT, max_length=max_length)[1]


def aggregate_loss(loss_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, mode: str,
                   denominator: Float[Array, ""] | float) -> Float[Array, ""]:
    """This micro-batch's contribution numerator / denominator to the global loss of ``mode``.

    ``denominator`` is the global one (``loss_denominator`` of the whole step's batch; detached, clamped at 1 so an
    empty batch gives 0). Summed over micro-batches and devices, the contributions (and their gradients) are the
    full-batch loss (and gradient), whatever the split.
    """
    if isinstance(denominator, Real) and denominator < 0:
        raise ValueError(f"denominator must be >= 0, got {denominator}")
    num, _ = get_loss_aggregation(mode)(loss_BT, mask_BT, max_length=1)  # the numerator does not use max_length
    return num / jnp.maximum(jax.lax.stop_gradient(_f32(denominator)), 1.0)
