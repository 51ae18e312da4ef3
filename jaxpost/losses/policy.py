"""Policy-gradient losses (PPO-clip with DAPO's clip-higher and dual-clip, GSPO, REINFORCE), the PPO value loss, the
entropy bonus, and the loss aggregations that make micro-batching and data parallelism exact.

Pure functions on per-token arrays ``[B, T]``: ``logp_BT`` (log-probs of the sampled tokens under the policy being
trained, the only input that carries a gradient), ``old_logp_BT`` (under the policy that sampled them, or the policy
at the start of this PPO epoch; detached), advantages (``[B]`` per sequence or ``[B, T]`` per token, from
``jaxpost.losses.advantages``; detached) and the response mask ``mask_BT``.

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


def _adv_BT(advantages, shape) -> Array:
    """Detached float32 advantages broadcast to [B, T] ([B] -> the same value on every token)."""
    a = jax.lax.stop_gradient(_f32(advantages))
    if a.ndim == 1:
        a = a[:, None]
    return jnp.broadcast_to(a, shape)


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


def metric_means(metrics: Metrics) -> dict[str, Array]:
    """Divide each summed metric by its denominator (after summing over micro-batches / psum over devices)."""
    return {k: s / jnp.maximum(n, 1.0) for k, (s, n) in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------------
# policy losses


def ppo_clip(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
             mask_BT: Float[Array, "B T"], *, eps_low: float = 0.2, eps_high: float | None = None,
             dual_clip: float | None = None) -> PolicyLossOutput:
    """PPO-clip per token, with asymmetric clipping and optional dual-clip:

        rho_t = exp(logp_t - old_logp_t)
        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)
        dual-clip (c > 1), for A_t < 0 only: l_t = min(l_t, -c A_t)

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. 7 (eps_high = eps_low =
    0.2, the default); DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, Eq. 10: eps_low = 0.2, eps_high = 0.28);
    dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
    arXiv:1912.09729, Eq. 5: bounds the loss of a negative-advantage token whose ratio has grown large; verl's
    ``clip_ratio_c``, default 3 there, off here). GRPO and DAPO are this loss with their advantages and aggregation.

    Metrics (sum, count) over tokens: ``clip_frac_low`` (rho < 1 - eps_low and A < 0: clipped below, no gradient),
    ``clip_frac_high`` (rho > 1 + eps_high and A > 0), ``clip_frac`` (either; TRL's and verl's ``clipfrac``),
    ``clip_frac_dual`` (A < 0 and rho > c), ``ratio`` (mean rho), ``approx_kl`` (k3 estimate of KL(old || new),
    (rho - 1) - log rho), ``approx_kl_k1`` (-log rho, verl's ``ppo_kl``). With old == new every clip fraction is 0,
    the ratio 1 and the gradient that of REINFORCE: -A_t grad logp_t.
    """
    eps_high = _eps_high(eps_low, eps_high)
    _check_clip(eps_low, eps_high, dual_clip)
    m_BT = _mask(mask_BT)
    log_ratio_BT = _log_ratio(logp_BT, old_logp_BT, m_BT)
    a_BT = _adv_BT(advantages, m_BT.shape)
    ratio_BT = jnp.exp(log_ratio_BT)
    loss_BT = jnp.maximum(-a_BT * ratio_BT, -a_BT * jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high))
    low_BT = (ratio_BT < 1.0 - eps_low) & (a_BT < 0)
    high_BT = (ratio_BT > 1.0 + eps_high) & (a_BT > 0)
    extra = {}
    if dual_clip is not None:
        loss_BT = jnp.where(a_BT < 0, jnp.minimum(loss_BT, -dual_clip * a_BT), loss_BT)
        extra["clip_frac_dual"] = (ratio_BT > dual_clip) & (a_BT < 0)
    loss_BT = jnp.where(m_BT > 0, loss_BT, 0.0)
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
         mask_BT: Float[Array, "B T"], *, eps_low: float = 3e-4, eps_high: float | None = 4e-4) -> PolicyLossOutput:
    """GSPO-token: the sequence-level ratio, clipped per sequence, with the token-level gradient form.

        s_i = exp( (1 / |y_i|) sum_t (logp_{i,t} - old_logp_{i,t}) )            (sequence ratio, length-normalised)
        s_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})]                        (value s_i, gradient s_i grad logp_t)
        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t})

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, Eq. 13-14 (GSPO-token; verl's
    ``loss_mode="gspo"``). Clipping is decided per sequence (every token of a sequence shares the ratio), so a clipped
    sequence contributes no gradient at all. Advantages may differ per token (the point of GSPO-token); with one
    advantage per sequence and ``seq_mean_token_mean`` aggregation (the paper's 1/G sum_i; verl hard-codes it for
    GSPO) the loss and its gradient equal the sequence form ``gspo_seq``. Default eps_low = 3e-4, eps_high = 4e-4
    are the paper's (sequence ratios sit much closer to 1 than token ratios).

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
    a_BT = _adv_BT(advantages, m_BT.shape)
    loss_BT = jnp.maximum(-a_BT * s_BT, -a_BT * jnp.clip(s_BT, 1.0 - eps_low, 1.0 + eps_high))
    loss_BT = jnp.where(m_BT > 0, loss_BT, 0.0)
    s_B = jnp.exp(seq_log_ratio_B)
    a_B = jnp.sum(a_BT * m_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    return loss_BT, _gspo_metrics(s_B, a_B, valid_B, eps_low, eps_high, log_ratio_BT, m_BT)


def gspo_seq(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
             mask_BT: Float[Array, "B T"], *, eps_low: float = 3e-4, eps_high: float | None = 4e-4
             ) -> PolicyLossOutput:
    """GSPO, sequence form: l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), s_i as in ``gspo``.

    Zheng et al. 2025, arXiv:2507.18071, Eq. 5-7: the gradient flows through s_i itself,
    grad s_i = s_i (1 / |y_i|) sum_t grad logp_t. A_i is one advantage per sequence: ``advantages`` [B], or [B, T]
    reduced by its mean over the sequence's response tokens. The per-token loss returned is l_i on every response
    token of sequence i, so ``seq_mean_token_mean`` aggregation gives the paper's 1/G sum_i l_i (``token_mean`` would
    weight sequences by length). Metrics as ``gspo``.
    """
    eps_high = _eps_high(eps_low, eps_high)
    _check_clip(eps_low, eps_high)
    m_BT = _mask(mask_BT)
    n_B, valid_B, log_ratio_BT, seq_log_ratio_B = _gspo_sequence_terms(logp_BT, old_logp_BT, m_BT)
    a = jax.lax.stop_gradient(_f32(advantages))
    a_B = a if a.ndim == 1 else jnp.sum(a * m_BT, axis=-1) / jnp.maximum(n_B, 1.0)
    s_B = jnp.exp(seq_log_ratio_B)
    loss_B = jnp.maximum(-a_B * s_B, -a_B * jnp.clip(s_B, 1.0 - eps_low, 1.0 + eps_high))
    loss_BT = jnp.where(m_BT > 0, loss_B[:, None], 0.0)
    return loss_BT, _gspo_metrics(s_B, a_B, valid_B, eps_low, eps_high, log_ratio_BT, m_BT)


def reinforce(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], advantages: Advantages,
              mask_BT: Float[Array, "B T"]) -> PolicyLossOutput:
    """Plain REINFORCE (on-policy policy gradient): l_t = -A_t logp_t.

    Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning"; with
    RLOO or GRPO advantages this is RLOO's / on-policy GRPO's estimator. No ratio and no clipping: the gradient is
    -A_t grad logp_t, equal to ``ppo_clip``'s when old == new. ``old_logp_BT`` enters the metrics only (``ratio``,
    ``approx_kl``, ``approx_kl_k1``, which show how off-policy the batch is).
    """
    m_BT = _mask(mask_BT)
    a_BT = _adv_BT(advantages, m_BT.shape)
    loss_BT = jnp.where(m_BT > 0, -a_BT * _f32(logp_BT), 0.0)
    return loss_BT, _ratio_metrics(_log_ratio(logp_BT, old_logp_BT, m_BT), m_BT)


POLICY_LOSSES = Registry("policy loss", {
    "ppo": ppo_clip,
    "gspo": gspo,
    "gspo_seq": gspo_seq,
    "reinforce": reinforce,
})
"""Name -> per-token policy loss. Uniform call: ``f(logp_BT, old_logp_BT, advantages, mask_BT, **hyper)``;
hyperparameters: ppo ``eps_low, eps_high, dual_clip``; gspo, gspo_seq ``eps_low, eps_high``; reinforce none."""


def get_policy_loss(name: str) -> Callable[..., PolicyLossOutput]:
    """The policy loss registered under ``name`` (ppo, gspo, gspo_seq, reinforce)."""
    return POLICY_LOSSES.get(name)


# ----------------------------------------------------------------------------------------------------------------------
# value loss and entropy bonus


def value_loss(values_BT: Float[Array, "B T"], old_values_BT: Float[Array, "B T"], returns_BT: Float[Array, "B T"],
               mask_BT: Float[Array, "B T"], *, clip_eps: float | None = 0.2) -> PolicyLossOutput:
    """PPO value loss with value clipping, per token:

        l_t = 0.5 max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)

    (``clip_eps=None``: 0.5 (V_t - R_t)^2). Schulman et al. 2017 (the clipped value objective of the PPO reference
    implementation, OpenAI baselines ppo2); eps_v = 0.2 is TRL's ``cliprange_value`` (verl defaults to 0.5).
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


LOSS_AGGREGATIONS = Registry("loss aggregation", {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
})
"""Name -> ``f(loss_BT, mask_BT, *, max_length=None) -> (numerator, denominator)``; both are sums over rows, so they
add over micro-batches and psum over devices. The denominator depends on the mask (and max_length) only."""


def get_loss_aggregation(name: str) -> Callable[..., tuple[Array, Array]]:
    """The loss aggregation registered under ``name`` (token_mean, seq_mean_token_mean, seq_mean_token_sum_norm)."""
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
