"""Preference-optimisation losses: the DPO family (every TRL ``loss_type``), SimPO, ORPO, KTO.

Pure functions on per-sequence log-probabilities. No model, no config: a train step computes the log-probs (summed
over each completion's tokens with ``jaxpost.ops.token_logprobs``), picks a loss by name from a registry and reduces.

Conventions shared by every loss here
-------------------------------------
* Inputs are ``[B]`` arrays: ``chosen_logps_B`` / ``rejected_logps_B`` are the policy's log-probabilities of the
  chosen / rejected completion *summed over its tokens*; ``ref_*`` the same under the frozen reference model;
  ``*_tokens_B`` the number of completion tokens (needed by the length-normalised losses and the SFT term).
* Every loss returns ``(loss_B, metrics)``: the per-example loss ``[B]`` and a dict of ``[B]`` arrays (or scalars,
  documented where so). Nothing is reduced: the global loss is ``sum(loss_B) / B_global`` summed over every
  micro-batch and device, which is what makes gradient accumulation and data parallelism give the full-batch mean.
  Padding examples are the caller's business (multiply ``loss_B`` by a 0/1 mask; all losses stay finite on zeros).
  Exception: ``aot`` / ``aot_unpaired`` sort over the batch, see their docstring.
* Metrics are ``stop_gradient``-ed and follow TRL's names: ``chosen_rewards = beta * (pi_c - ref_c)``,
  ``rejected_rewards``, ``margins = chosen_rewards - rejected_rewards``, ``accuracies = 1[chosen > rejected]``,
  ``chosen_logps`` / ``rejected_logps`` (the policy log-probs the loss used).
* Arithmetic is in float32 at least (bfloat16 inputs are promoted; float64 inputs stay float64, for tests).
* Hyperparameters are keyword-only; defaults are TRL's (``DPOConfig``, ``CPOConfig``, ``ORPOConfig``, ``KTOConfig``).

Notation in the docstrings: ``s_c = pi_c - ref_c`` and ``s_r = pi_r - ref_r`` (per-response log-ratios, TRL's
``chosen_logratios``/``rejected_logratios``), ``h = s_c - s_r`` (TRL's ``logits`` / ``delta_score``), ``n_c``/``n_r``
completion token counts, ``sigma`` the logistic function.

TRL references: ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss`` in TRL 1.x, ``DPOTrainer.dpo_loss``
before), ``cpo_trainer.py`` (SimPO), ``orpo_trainer.py``, ``kto_trainer.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxpost.losses.registry import Registry

Metrics = dict[str, Array]
LossOutput = tuple[Float[Array, "B"], Metrics]
TokenCount = Float[Array, "B"] | None


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _f32(x) -> Array:
    """At least float32 (bfloat16 -> float32, integer counts -> float32; float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(value: Any, ok: Callable[[float], bool], msg: str) -> None:
    """Validate a hyperparameter when it is a concrete Python number (traced values are left alone)."""
    if isinstance(value, Real) and not ok(value):
        raise ValueError(f"{msg}, got {value}")


def _per_token(logps_B: Array, tokens_B: TokenCount, loss: str) -> Array:
    """Length-normalise: logps / max(n, 1) (TRL clamps the completion length at 1)."""
    if tokens_B is None:
        raise ValueError(f"{loss} is length-normalised: pass chosen_tokens_B and rejected_tokens_B")
    return logps_B / jnp.maximum(_f32(tokens_B), 1.0)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); x is clamped to <= -1e-6 so 0 stays finite."""
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _pair_metrics(chosen_rewards_B: Array, rejected_rewards_B: Array, chosen_logps_B: Array,
                  rejected_logps_B: Array, **extra: Array) -> Metrics:
    metrics = {
        "chosen_rewards": chosen_rewards_B,
        "rejected_rewards": rejected_rewards_B,
        "margins": chosen_rewards_B - rejected_rewards_B,
        "accuracies": (chosen_rewards_B > rejected_rewards_B).astype(chosen_rewards_B.dtype),
        "chosen_logps": chosen_logps_B,
        "rejected_logps": rejected_logps_B,
        **extra,
    }
    return jax.tree.map(jax.lax.stop_gradient, metrics)


def _sft_nll(chosen_logps_B: Array, chosen_tokens_B: TokenCount, sft_denominator, what: str) -> Array:
    """Per-example NLL of the chosen completion: -logp_c / d, d = n_c (default) or the caller's sft_denominator."""
    den = chosen_tokens_B if sft_denominator is None else sft_denominator
    if den is None:
        raise ValueError(f"{what} needs chosen_tokens_B (per-sequence token mean) or sft_denominator")
    return -chosen_logps_B / jnp.maximum(_f32(den), 1.0)


def _add_sft(loss_B: Array, metrics: Metrics, chosen_logps_B: Array, chosen_tokens_B: TokenCount,
             sft_weight, sft_denominator) -> LossOutput:
    """loss + sft_weight * NLL(chosen). Skipped entirely when sft_weight is the Python number 0."""
    if isinstance(sft_weight, Real) and sft_weight == 0:
        return loss_B, metrics
    nll_B = _sft_nll(chosen_logps_B, chosen_tokens_B, sft_denominator, "sft_weight > 0")
    metrics = {**metrics, "preference_loss": jax.lax.stop_gradient(loss_B), "sft_loss": jax.lax.stop_gradient(nll_B)}
    return loss_B + sft_weight * nll_B, metrics


def _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B):
    c_B, r_B = _f32(chosen_logps_B), _f32(rejected_logps_B)
    s_c_B = c_B - _f32(ref_chosen_logps_B)
    s_r_B = r_B - _f32(ref_rejected_logps_B)
    return c_B, r_B, s_c_B, s_r_B


#: f-divergences of f-DPO (Wang et al. 2023): TRL's ``f_divergence_type`` values.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The losses that take ``f_divergence`` (those built on the score difference h, as in TRL 1.16).
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"})


def f_divergence_scores(s_B: Array, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Array:
    """The score f'(t) of a log-ratio s = log t = log(pi / ref) under f-DPO's divergence:
    reverse_kl s (standard DPO); forward_kl 1 - exp(-s); js_divergence log 2 + log sigma(s);
    alpha_divergence (exp((alpha - 1) s) - 1) / (alpha - 1) with (alpha - 1) s clamped at 80 (reverse_kl when
    alpha = 1).

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", arXiv:2309.16240: the implicit reward beta f'(pi / ref) replaces beta log(pi / ref). Exactly
    TRL 1.16's ``f_divergence_type`` / ``f_alpha_divergence_coef`` (``DPOTrainer._compute_loss``).
    """
    if f_divergence == "reverse_kl":
        return s_B
    if f_divergence == "forward_kl":
        return -jnp.expm1(-s_B)
    if f_divergence == "js_divergence":
        return jnp.log(2.0) + jax.nn.log_sigmoid(s_B)
    if f_divergence == "alpha_divergence":
        if isinstance(f_alpha, Real) and abs(f_alpha - 1.0) < 1e-6:
            return s_B
        return jnp.expm1(jnp.minimum((f_alpha - 1.0) * s_B, 80.0)) / (f_alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")


def _scores(s_c_B, s_r_B, f_divergence, f_alpha):
    return f_divergence_scores(s_c_B, f_divergence, f_alpha), f_divergence_scores(s_r_B, f_divergence, f_alpha)


_F_DOC = """
        f_divergence, f_alpha: f-DPO's divergence (``f_divergence_scores``): the scores f'(pi / ref) of the chosen
            and rejected responses replace the log-ratios s_c, s_r in h (default reverse_kl: plain DPO).
"""


def _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator, **extra) -> LossOutput:
    metrics = _pair_metrics(beta * s_c_B, beta * s_r_B, c_B, r_B, **extra)
    return _add_sft(loss_B, metrics, c_B, chosen_tokens_B, sft_weight, sft_denominator)


_COMMON_DOC = """
    Common keyword arguments (every DPO-family loss accepts them, so a step can call any registered loss alike):
        chosen_tokens_B, rejected_tokens_B: completion token counts [B] (required by ipo and sigmoid_norm, and by
            the SFT term unless sft_denominator is given; ignored otherwise).
        sft_weight: weight of an NLL term on the chosen completion (TRL ``loss_type=[..., "sft"]`` with
            ``loss_weights``, earlier TRL ``rpo_alpha``; RPO, Pang et al. 2024, arXiv:2404.19733). 0 disables it.
        sft_denominator: per-example denominator of that NLL, -logp_c / d. Default d = n_c (each sequence's token
            mean, the RPO paper's form). TRL takes the token mean over the batch's chosen tokens instead: pass
            d = (total chosen tokens in the global batch) / (global batch size), a scalar, and the global mean of
            the per-example term is exactly TRL's.
"""


def _doc(f: Callable) -> Callable:
    f.__doc__ = (f.__doc__ or "") + _COMMON_DOC
    if "f_divergence" in f.__code__.co_varnames:
        f.__doc__ += _F_DOC
    return f


# ----------------------------------------------------------------------------------------------------------------------
# DPO family: per-example losses on (policy, reference) log-probs of (chosen, rejected) pairs


@_doc
def dpo_sigmoid(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens_B: TokenCount = None,
                rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None,
                f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """DPO: loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, Eq. 7 (eps = 0). eps > 0 is
    conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"), the label-smoothed form TRL < 1.0
    applied under ``loss_type="sigmoid"``; TRL 1.x dropped the smoothing there, which is eps = 0, the default.
    Zero margin (h = 0) gives log 2.
    """
    _check(label_smoothing, lambda v: 0.0 <= v <= 0.5, "label_smoothing must lie in [0, 0.5]")
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    z_B = beta * (f_c_B - f_r_B)
    loss_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_robust(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
               ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
               beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens_B: TokenCount = None,
               rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None,
               f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Robust DPO: loss = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409: an unbiased loss when each label is flipped with
    probability eps in [0, 0.5) (TRL ``label_smoothing``; the paper suggests 0.1). eps = 0 is plain DPO; h = 0 gives
    log 2 for every eps.
    """
    _check(label_smoothing, lambda v: 0.0 <= v < 0.5, "robust DPO needs label_smoothing in [0, 0.5)")
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    z_B = beta * (f_c_B - f_r_B)
    loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B)
              + label_smoothing * jax.nn.log_sigmoid(-z_B)) / (1.0 - 2.0 * label_smoothing)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_hinge(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
              ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
              beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
              sft_weight: float = 0.0, sft_denominator=None,
              f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Hinge: loss = max(0, 1 - beta h); beta is the reciprocal of the margin.

    SLiC (Zhao et al. 2023, arXiv:2305.10425) with the normalised likelihood of RSO (Liu et al. 2023,
    "Statistical Rejection Sampling Improves Preference Optimization", arXiv:2309.06657). h = 0 gives 1.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    loss_B = jax.nn.relu(1.0 - beta * (f_c_B - f_r_B))
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_ipo(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
            ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
            beta: float = 0.1, length_normalize: bool = True, chosen_tokens_B: TokenCount = None,
            rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None,
            f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """IPO: loss = (h' - 1 / (2 beta))^2, beta the paper's tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, Eq. 17. TRL (and by default here) length-normalises: h' = s_c / n_c - s_r / n_r (TRL < 1.0
    averaged the log-probs over tokens, TRL 1.x divides the log-ratios; the same thing), which the IPO authors
    confirmed is the form behind their results. ``length_normalize=False`` gives the paper's literal h' = h on summed
    log-probs (token counts not needed). h' = 0 gives 1 / (4 beta^2). The reward metrics use the summed log-ratios
    (as TRL 1.x logs them).
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    if length_normalize:
        h_B = _per_token(f_c_B, chosen_tokens_B, "ipo") - _per_token(f_r_B, rejected_tokens_B, "ipo")
    else:
        h_B = f_c_B - f_r_B
    loss_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_sigmoid_norm(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                     ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                     beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
                     sft_weight: float = 0.0, sft_denominator=None,
                     f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Length-normalised DPO: loss = -log sigma(beta (s_c / n_c - s_r / n_r)).

    TRL's ``sigmoid_norm``: SimPO's length normalisation (Meng et al. 2024, arXiv:2405.14734) kept with the
    reference model, i.e. the length-normalised DPO of Tulu 3 (Lambert et al. 2024, arXiv:2411.15124). For the
    reference-free SimPO with a target margin see ``simpo``. Zero margin gives log 2.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    h_B = _per_token(f_c_B, chosen_tokens_B, "sigmoid_norm") - _per_token(f_r_B, rejected_tokens_B, "sigmoid_norm")
    loss_B = -jax.nn.log_sigmoid(beta * h_B)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_exo_pair(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, label_smoothing: float = 1e-3, chosen_tokens_B: TokenCount = None,
                 rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None,
                 f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """EXO (pairwise): loss = KL(q || p), q = (sigma(beta h), sigma(-beta h)), p = (1 - eps, eps):
    sigma(beta h) [log sigma(beta h) - log(1 - eps)] + sigma(-beta h) [log sigma(-beta h) - log eps].

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856, Eq. 16
    (K = 2). eps must be in (0, 1); TRL reads it from ``label_smoothing`` and recommends 1e-3 (TRL < 1.0 silently
    replaced 0 by 1e-3), which is the default here. h = 0 gives -log 2 - log(eps (1 - eps)) / 2.
    """
    _check(label_smoothing, lambda v: 0.0 < v < 1.0, "exo_pair needs label_smoothing (epsilon) in (0, 1), e.g. 1e-3")
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    z_B = beta * (f_c_B - f_r_B)
    log_qw_B, log_ql_B = jax.nn.log_sigmoid(z_B), jax.nn.log_sigmoid(-z_B)
    loss_B = (jnp.exp(log_qw_B) * (log_qw_B - jnp.log1p(-label_smoothing))
              + jnp.exp(log_ql_B) * (log_ql_B - jnp.log(label_smoothing)))
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_nca_pair(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
                 sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """NCA (pairwise): loss = -log sigma(beta s_c) - 1/2 log sigma(-beta s_c) - 1/2 log sigma(-beta s_r).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv:2402.05369:
    optimises each response's absolute likelihood rather than the relative one. s_c = s_r = 0 gives 2 log 2.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    rc_B, rr_B = beta * s_c_B, beta * s_r_B
    loss_B = -jax.nn.log_sigmoid(rc_B) - 0.5 * jax.nn.log_sigmoid(-rc_B) - 0.5 * jax.nn.log_sigmoid(-rr_B)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_bco_pair(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, delta: float | Float[Array, ""] = 0.0, chosen_tokens_B: TokenCount = None,
                 rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """BCO (pairwise): loss = -log sigma(beta s_c - delta) - log sigma(-(beta s_r - delta)).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656: a
    binary classifier whose logit is the implicit reward, with a reward shift delta. TRL < 1.0 set delta to the
    running mean of the batch-mean reward (``RunningMoments``), updated with the current batch *before* the loss;
    TRL 1.x uses delta = 0 (the default here). The running mean is a cross-step statistic, so it is an input: keep it
    in the train state and update it with ``bco_update_delta`` (detached: no gradient flows into delta).
    s_c = s_r = 0 and delta = 0 give 2 log 2.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    delta = jax.lax.stop_gradient(_f32(delta))
    loss_B = -jax.nn.log_sigmoid(beta * s_c_B - delta) - jax.nn.log_sigmoid(-(beta * s_r_B - delta))
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


def bco_update_delta(delta: Float[Array, ""], count: Float[Array, ""], batch_reward_mean: Float[Array, ""], *,
                     batch_count: float = 1.0) -> tuple[Array, Array]:
    """TRL's ``RunningMoments`` mean update, as ``bco_pair`` uses it: delta += (x - delta) * k / (count + k).

    x is the batch-mean reward, mean(concat(chosen_rewards, rejected_rewards)) = mean over B of
    (chosen_rewards + rejected_rewards) / 2, a scalar per step (k = 1); under data parallelism TRL gathers one such
    scalar per process (k = number of processes, x their mean). Start from delta = 0, count = 0 (TRL: 1e-24).
    Returns (new_delta, new_count), both detached.
    """
    x = jax.lax.stop_gradient(_f32(batch_reward_mean))
    delta, count = _f32(delta), _f32(count)
    total = count + batch_count
    return delta + (x - delta) * batch_count / total, total


@_doc
def dpo_sppo_hard(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                  ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                  beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
                  sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """SPPO (hard labels): loss = (s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675, Eq. 4.7 with
    the winning probability set to 1 for the winner and 0 for the loser (TRL's approximation; the paper's soft
    probabilities come from a preference model outside the loss). s_c = s_r = 0 gives 1 / (2 beta^2).
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    loss_B = (s_c_B - 0.5 / beta) ** 2 + (s_r_B + 0.5 / beta) ** 2
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


def _sorted_sigmoid(d_B: Array, beta: float, label_smoothing: float) -> Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * d_B) - label_smoothing * jax.nn.log_sigmoid(-beta * d_B)


@_doc
def dpo_aot(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
            ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
            beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens_B: TokenCount = None,
            rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """AOT (paired): d_i = sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i, loss_i = DPO sigmoid loss of d_i.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882:
    first-order stochastic dominance of the policy's log-ratio distribution over the reference's, via sorted
    quantiles. BATCH-LEVEL: entry i of ``loss_B`` is the i-th quantile, not example i, and the loss changes with
    how the batch is split (TRL sorts per device and notes that larger per-device batches help). For a global
    sort, all-gather the four log-prob arrays before calling. Its mean is invariant to permuting the batch. Padding
    pairs take part in the sort, so a 0/1 mask on ``loss_B`` does not remove them: give AOT unpadded batches. The
    metrics and the SFT term stay per example.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    d_B = jnp.sort(c_B - r_B) - jnp.sort(_f32(ref_chosen_logps_B) - _f32(ref_rejected_logps_B))
    loss_B = _sorted_sigmoid(d_B, beta, label_smoothing)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_aot_unpaired(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                     ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                     beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens_B: TokenCount = None,
                     rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0,
                     sft_denominator=None) -> LossOutput:
    """AOT (unpaired): d_i = sort(s_c)_i - sort(s_r)_i, loss_i = DPO sigmoid loss of d_i.

    Melnyk et al. 2024, arXiv:2406.05882, for unpaired data: the chosen log-ratio distribution should dominate the
    rejected one. TRL 1.x calls it ``aot_unpaired`` (TRL < 1.0 ``aot_pair``; both names are registered).
    Batch-level like ``dpo_aot``: read its note on splitting.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    d_B = jnp.sort(s_c_B) - jnp.sort(s_r_B)
    loss_B = _sorted_sigmoid(d_B, beta, label_smoothing)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_apo_zero(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
                 sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """APO-zero: loss = 1 - sigma(beta s_c) + sigma(beta s_r).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", arXiv:2408.06266,
    Eq. 7: raise the chosen likelihood, lower the rejected (when the model is worse than the chosen answers).
    s_c = s_r = 0 gives 1.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    loss_B = 1.0 - jax.nn.sigmoid(beta * s_c_B) + jax.nn.sigmoid(beta * s_r_B)
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_apo_down(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None,
                 sft_weight: float = 0.0, sft_denominator=None) -> LossOutput:
    """APO-down: loss = sigma(beta s_c) + 1 - sigma(beta h).

    D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8: lower both likelihoods, the rejected one more (when the model
    is already better than the chosen answers). s_c = s_r = 0 gives 1.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    loss_B = jax.nn.sigmoid(beta * s_c_B) + 1.0 - jax.nn.sigmoid(beta * (s_c_B - s_r_B))
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


@_doc
def dpo_discopop(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"],
                 ref_chosen_logps_B: Float[Array, "B"], ref_rejected_logps_B: Float[Array, "B"], *,
                 beta: float = 0.1, tau: float = 0.05, chosen_tokens_B: TokenCount = None,
                 rejected_tokens_B: TokenCount = None, sft_weight: float = 0.0, sft_denominator=None,
                 f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): with x = beta h and m = sigma(x / tau),
    loss = (1 - m) (-log sigma(x)) + m exp(-x).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    arXiv:2406.08414, Eq. 5; tau is TRL's ``discopop_tau`` (paper and TRL default 0.05). The exponential term is
    computed as exp(-x + log sigma(x / tau)), equal in value, so that a very negative x gives a finite loss and
    gradient where exp(-x) alone would overflow. x = 0 gives (log 2 + 1) / 2.
    """
    c_B, r_B, s_c_B, s_r_B = _logratios(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    f_c_B, f_r_B = _scores(s_c_B, s_r_B, f_divergence, f_alpha)
    x_B = beta * (f_c_B - f_r_B)
    m_B = jax.nn.sigmoid(x_B / tau)
    loss_B = -(1.0 - m_B) * jax.nn.log_sigmoid(x_B) + jnp.exp(-x_B + jax.nn.log_sigmoid(x_B / tau))
    return _finish(loss_B, beta, c_B, r_B, s_c_B, s_r_B, chosen_tokens_B, sft_weight, sft_denominator)


#: Keyword arguments of the pairwise losses that are data, not hyperparameters.
_PREFERENCE_DATA = ("sft_denominator",)

DPO_LOSSES = Registry("DPO loss", {
    "sigmoid": dpo_sigmoid,
    "hinge": dpo_hinge,
    "ipo": dpo_ipo,
    "exo_pair": dpo_exo_pair,
    "nca_pair": dpo_nca_pair,
    "robust": dpo_robust,
    "bco_pair": dpo_bco_pair,
    "sppo_hard": dpo_sppo_hard,
    "aot": dpo_aot,
    "aot_unpaired": dpo_aot_unpaired,
    "aot_pair": dpo_aot_unpaired,  # the TRL < 1.0 name of aot_unpaired
    "apo_zero": dpo_apo_zero,
    "apo_down": dpo_apo_down,
    "discopop": dpo_discopop,
    "sigmoid_norm": dpo_sigmoid_norm,
}, data=_PREFERENCE_DATA)
"""TRL ``DPOConfig.loss_type`` -> loss. Uniform call: ``f(pi_c, pi_r, ref_c, ref_r, chosen_tokens_B=...,
rejected_tokens_B=..., **hyperparameters)``. TRL's ``"sft"`` loss type is the ``sft_weight`` argument of each."""

BATCH_LEVEL_DPO_LOSSES = frozenset({"aot", "aot_unpaired", "aot_pair"})
"""Losses whose per-entry values depend on the whole batch (sorting): not invariant to micro-batch splits."""


def get_dpo_loss(name: str) -> Callable[..., LossOutput]:
    """The DPO-family loss registered under TRL's ``loss_type`` name."""
    return DPO_LOSSES.get(name)


# ----------------------------------------------------------------------------------------------------------------------
# per-token inputs of the preference losses: length desensitisation (LD-DPO), WPO's weights


def ld_sequence_logps(chosen_logp_BT: Float[Array, "B T"], chosen_mask_BT: Float[Array, "B T"],
                      rejected_logp_BT: Float[Array, "B T"], rejected_mask_BT: Float[Array, "B T"], *,
                      ld_alpha: float) -> tuple[Float[Array, "B"], Float[Array, "B"]]:
    """LD-DPO's length-desensitised sequence log-probs of a pair: the first min(n_c, n_r) completion tokens of each
    response count fully, the rest (the longer response's tail) with weight ld_alpha:

        logp = sum_{k <= min(n_c, n_r)} logp_k + ld_alpha sum_{k > min(n_c, n_r)} logp_k

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411; TRL
    ``DPOConfig.ld_alpha`` (applied to the policy's and the reference's log-probs alike). k counts completion tokens
    (mask positions) from the first; ld_alpha = 1 is plain DPO, 0 cuts the longer response at the shorter's length.
    Feed the results to any DPO loss in place of the summed log-probs.
    """
    _check(ld_alpha, lambda v: 0.0 <= v <= 1.0, "ld_alpha must lie in [0, 1]")
    mc_BT, mr_BT = _f32(jnp.asarray(chosen_mask_BT) > 0), _f32(jnp.asarray(rejected_mask_BT) > 0)
    shared_B1 = jnp.minimum(jnp.sum(mc_BT, -1), jnp.sum(mr_BT, -1))[:, None]

    def weighted(logp_BT, m_BT):
        rank_BT = jnp.cumsum(m_BT, axis=-1)
        w_BT = jnp.where(rank_BT <= shared_B1, 1.0, ld_alpha) * m_BT
        return jnp.sum(jnp.where(m_BT > 0, _f32(logp_BT), 0.0) * w_BT, axis=-1)

    return weighted(chosen_logp_BT, mc_BT), weighted(rejected_logp_BT, mr_BT)


def wpo_weights(logp_BT: Float[Array, "B T"], log_sum_sq_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"]
                ) -> Float[Array, "B"]:
    """WPO's per-response weight exp(mean_t (logp_t - log sum_v p_v(t)^2)) over the completion tokens, detached.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv:2406.11827, Eq. 2 with the
    sampling-aligned probabilities: how likely the current policy is to produce the response, normalised by each
    position's sum of squared probabilities (``jaxpost.ops.token_log_sum_sq_probs``). A pair's loss is multiplied
    by w(chosen) w(rejected) (TRL ``DPOConfig.use_weighting``), which makes off-policy pairs count less.
    """
    m_BT = _f32(jnp.asarray(mask_BT) > 0)
    d_BT = jnp.where(m_BT > 0, _f32(logp_BT) - _f32(log_sum_sq_BT), 0.0)
    mean_B = jnp.sum(d_BT, axis=-1) / jnp.maximum(jnp.sum(m_BT, axis=-1), 1.0)
    return jax.lax.stop_gradient(jnp.exp(mean_B))


# ----------------------------------------------------------------------------------------------------------------------
# reference-free pairwise losses


def alpha_reward(mean_logps_B: Array, alpha: float) -> Array:
    """AlphaPO's reward shape r = (1 - p^(-alpha)) / alpha of p = exp(mean log-prob), -expm1(-alpha m) / alpha;
    alpha = 0 gives m itself (SimPO's length-normalised log-likelihood). Gupta et al. 2025, "AlphaPO: Reward
    Shape Matters for LLM Alignment", arXiv:2501.03884; TRL ``CPOConfig.alpha``."""
    if isinstance(alpha, Real) and alpha == 0:
        return mean_logps_B
    return -jnp.expm1(-alpha * mean_logps_B) / alpha


def simpo(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"], *,
          chosen_tokens_B: Float[Array, "B"], rejected_tokens_B: Float[Array, "B"], beta: float = 0.1,
          gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 0.0, sft_weight: float = 0.0,
          sft_denominator=None) -> LossOutput:
    """SimPO: with z = beta (pi_c / n_c - pi_r / n_r) - gamma,
    loss = -(1 - eps) log sigma(z) - eps log sigma(-z).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv:2405.14734:
    no reference model, length-normalised rewards beta * pi / n, target reward margin gamma. TRL implements it in
    ``CPOTrainer`` (``loss_type="simpo"``, ``simpo_gamma``, label smoothing, averaged log-probs): beta, gamma and eps
    default to TRL's ``CPOConfig`` (the paper tunes beta in 2..10, gamma / beta in 0.3..1.6). ``sft_weight`` is
    TRL's ``cpo_alpha`` (TRL default 1.0 for CPO; SimPO uses 0, the default here); ``sft_denominator`` as in the DPO
    losses.
    Inputs are summed log-probs and token counts; equal per-token log-probs give log(1 + e^gamma).
    ``alpha`` != 0 is AlphaPO (registered as ``alphapo``): the rewards beta * pi / n become beta * r with
    r = (1 - p^(-alpha)) / alpha, p = exp(pi / n) (``alpha_reward``; TRL ``CPOConfig(loss_type="alphapo", alpha=...)``,
    whose own default alpha 0 is SimPO). Metrics: rewards (beta * pi / n, or beta * r), ``chosen_logps``/
    ``rejected_logps`` the per-token means.
    """
    c_B, r_B = _f32(chosen_logps_B), _f32(rejected_logps_B)
    mc_B, mr_B = _per_token(c_B, chosen_tokens_B, "simpo"), _per_token(r_B, rejected_tokens_B, "simpo")
    rc_B, rr_B = alpha_reward(mc_B, alpha), alpha_reward(mr_B, alpha)
    z_B = beta * (rc_B - rr_B) - gamma
    loss_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)
    metrics = _pair_metrics(beta * rc_B, beta * rr_B, mc_B, mr_B)
    return _add_sft(loss_B, metrics, c_B, chosen_tokens_B, sft_weight, sft_denominator)


def _cpo(form: str, chosen_logps_B, rejected_logps_B, chosen_tokens_B, rejected_tokens_B, beta, label_smoothing,
         alpha, sft_weight, sft_denominator) -> LossOutput:
    c_B, r_B = _f32(chosen_logps_B), _f32(rejected_logps_B)
    if form == "ipo":  # TRL averages the log-probs over tokens for ipo, sums them for sigmoid and hinge
        xc_B, xr_B = _per_token(c_B, chosen_tokens_B, "cpo_ipo"), _per_token(r_B, rejected_tokens_B, "cpo_ipo")
    else:
        xc_B, xr_B = c_B, r_B
    rc_B, rr_B = alpha_reward(xc_B, alpha), alpha_reward(xr_B, alpha)
    h_B = rc_B - rr_B
    if form == "sigmoid":
        loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    elif form == "hinge":
        loss_B = jax.nn.relu(1.0 - beta * h_B)
    else:
        loss_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    metrics = _pair_metrics(beta * rc_B, beta * rr_B, c_B, r_B)
    return _add_sft(loss_B, metrics, c_B, chosen_tokens_B, sft_weight, sft_denominator)


def cpo(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"], *,
        chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None, beta: float = 0.1,
        label_smoothing: float = 0.0, alpha: float = 0.0, sft_weight: float = 1.0, sft_denominator=None
        ) -> LossOutput:
    """CPO: the DPO sigmoid loss without a reference, on summed log-probs, plus an NLL term on the chosen response:
    loss = -(1 - eps) log sigma(beta (pi_c - pi_r)) - eps log sigma(-beta (pi_c - pi_r)) + sft_weight NLL(chosen).

    Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417, Eq. 3 (the reference dropped: the
    paper's uniform-reference approximation); TRL ``CPOTrainer`` ``loss_type="sigmoid"``, whose ``cpo_alpha``
    (default 1.0, the default of ``sft_weight`` here) weighs the NLL. TRL takes that NLL as the token mean over the
    batch's chosen tokens: ``sft_denominator`` = total chosen tokens / batch size reproduces it (see the DPO
    losses); the default is each sequence's token mean. ``alpha`` != 0 applies AlphaPO's reward shape
    (``alpha_reward``) to the summed log-probs, as TRL does. pi_c = pi_r gives log 2 + the NLL term.
    """
    return _cpo("sigmoid", chosen_logps_B, rejected_logps_B, chosen_tokens_B, rejected_tokens_B, beta,
                label_smoothing, alpha, sft_weight, sft_denominator)


def cpo_hinge(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"], *,
              chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None, beta: float = 0.1,
              alpha: float = 0.0, sft_weight: float = 1.0, sft_denominator=None) -> LossOutput:
    """CPO with the hinge loss: max(0, 1 - beta (pi_c - pi_r)) on summed log-probs + sft_weight NLL(chosen).
    TRL ``CPOTrainer`` ``loss_type="hinge"`` (SLiC without a reference). See ``cpo`` for the NLL term."""
    return _cpo("hinge", chosen_logps_B, rejected_logps_B, chosen_tokens_B, rejected_tokens_B, beta, 0.0, alpha,
                sft_weight, sft_denominator)


def cpo_ipo(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"], *,
            chosen_tokens_B: TokenCount = None, rejected_tokens_B: TokenCount = None, beta: float = 0.1,
            alpha: float = 0.0, sft_weight: float = 1.0, sft_denominator=None) -> LossOutput:
    """CPO with the IPO loss: (pi_c / n_c - pi_r / n_r - 1 / (2 beta))^2 on per-token mean log-probs (TRL averages
    them for ipo) + sft_weight NLL(chosen). TRL ``CPOTrainer`` ``loss_type="ipo"``. See ``cpo``."""
    return _cpo("ipo", chosen_logps_B, rejected_logps_B, chosen_tokens_B, rejected_tokens_B, beta, 0.0, alpha,
                sft_weight, sft_denominator)


def orpo(chosen_logps_B: Float[Array, "B"], rejected_logps_B: Float[Array, "B"], *,
         chosen_tokens_B: Float[Array, "B"], rejected_tokens_B: Float[Array, "B"], beta: float = 0.1,
         sft_denominator=None, nll_logps_B: Float[Array, "B"] | None = None,
         nll_tokens_B: Float[Array, "B"] | None = None) -> LossOutput:
    """ORPO: loss = NLL(chosen) - beta log sigma(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv:2403.07691, Eq. 6-7
    (L_SFT + lambda L_OR; beta is the paper's lambda, TRL ``ORPOConfig.beta`` = 0.1). As in TRL, log p is the
    per-token mean log-prob m = pi / n, and log odds = m - log(1 - exp(m)).
    Inputs: the summed log-probs and token counts of both completions; from them the loss takes m_c, m_r and the
    chosen NLL. NLL(chosen) = -pi_c / d with d = n_c (per-sequence token mean, the paper's L_SFT) by default; TRL
    takes the token mean over the whole batch's chosen tokens, obtained exactly with
    ``sft_denominator = total chosen tokens / global batch size`` (see the DPO losses).
    ``nll_logps_B`` / ``nll_tokens_B``: the summed log-probs and count of the tokens the NLL covers, when they are not
    the chosen completion's: TRL's ``ORPOTrainer`` takes the NLL over the chosen row's prompt *and* completion (every
    non-padding target: ``labels = input_ids`` where attended), the paper over the completion (the default; the
    preference objective's ``orpo_nll="sequence"`` passes the full row). With TRL's form, d = nll_tokens by
    default, or ``sft_denominator`` = total such tokens / batch size for TRL's batch token mean.
    log(1 - exp(m)) is evaluated stably and with m clamped to <= -1e-6, so padded rows (pi = 0) stay finite.
    Metrics: ``chosen_rewards = beta m_c`` (TRL), ``nll``, ``log_odds_ratio`` (log sigma(...), TRL logs its mean),
    ``log_odds_chosen`` (the log odds ratio itself).
    """
    c_B, r_B = _f32(chosen_logps_B), _f32(rejected_logps_B)
    mc_B, mr_B = _per_token(c_B, chosen_tokens_B, "orpo"), _per_token(r_B, rejected_tokens_B, "orpo")
    log_odds_B = (mc_B - mr_B) - (_log1mexp(mc_B) - _log1mexp(mr_B))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)
    if (nll_logps_B is None) != (nll_tokens_B is None):
        raise ValueError("orpo: pass nll_logps_B and nll_tokens_B together (the NLL's tokens), or neither")
    if nll_logps_B is None:
        nll_B = _sft_nll(c_B, chosen_tokens_B, sft_denominator, "orpo")
    else:
        nll_B = _sft_nll(_f32(nll_logps_B), nll_tokens_B, sft_denominator, "orpo")
    loss_B = nll_B - beta * ratio_B
    metrics = _pair_metrics(beta * mc_B, beta * mr_B, mc_B, mr_B, nll=nll_B, log_odds_ratio=ratio_B,
                            log_odds_chosen=log_odds_B)
    return loss_B, metrics


REFERENCE_FREE_LOSSES = Registry("reference-free loss", {
    "simpo": simpo,
    "alphapo": simpo,  # SimPO with AlphaPO's reward shape: set alpha != 0 (TRL's CPOConfig loss_type="alphapo")
    "cpo": cpo,
    "cpo_hinge": cpo_hinge,
    "cpo_ipo": cpo_ipo,
    "orpo": orpo,
}, data=_PREFERENCE_DATA)
"""Uniform call: ``f(pi_c, pi_r, chosen_tokens_B=..., rejected_tokens_B=..., **hyperparameters)``."""


def get_reference_free_loss(name: str) -> Callable[..., LossOutput]:
    return REFERENCE_FREE_LOSSES.get(name)


# ----------------------------------------------------------------------------------------------------------------------
# unpaired: KTO


def kto_kl_sums(kl_logps_B: Float[Array, "B"], ref_kl_logps_B: Float[Array, "B"], *,
                mask_B: Float[Array, "B"] | None = None) -> tuple[Array, Array]:
    """Sum and count of pi(y'|x) - ref(y'|x) over the KL completions (mismatched pairs), for the KTO baseline.

    In KTO the reference point z0 = KL(pi || ref) is estimated on completions y' paired with the wrong prompts x
    (TRL shifts the batch's completions by one). Sum these over every micro-batch and device (``psum``), then
    ``kto_kl_baseline(sum, count)`` gives one global, detached, clamped estimate to pass to every micro-batch.
    """
    d_B = _f32(kl_logps_B) - _f32(ref_kl_logps_B)
    m_B = jnp.ones_like(d_B) if mask_B is None else _f32(mask_B)
    return jnp.sum(d_B * m_B), jnp.sum(m_B)


def kto_kl_baseline(kl_sum: Float[Array, ""], kl_count: Float[Array, ""]) -> Float[Array, ""]:
    """z0 = max(0, stop_gradient(kl_sum / kl_count)): TRL's ``(KL_logps - ref_KL_logps).mean().detach()``, gathered
    and averaged across processes, ``.clamp(min=0)``. TRL averages per-process means (equal to this global mean when
    processes hold equally many KL completions) and recomputes it for each micro-batch; computing it once over the
    whole step's batch, as here, is the lower-variance choice the KTO paper's batch-level estimate describes.
    """
    return jnp.maximum(jax.lax.stop_gradient(_f32(kl_sum) / jnp.maximum(_f32(kl_count), 1.0)), 0.0)


def kto(logps_B: Float[Array, "B"], ref_logps_B: Float[Array, "B"], desirable_B: Bool[Array, "B"], *,
        kl: Float[Array, ""] | float, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> LossOutput:
    """KTO: with r = pi - ref and z0 = kl,
    loss = w_D (1 - sigma(beta (r - z0))) for desirable examples, w_U (1 - sigma(beta (z0 - r))) for undesirable.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306, the loss
    TRL's ``KTOTrainer`` (``loss_type="kto"``) cites as Eq. 7. TRL's scalar is the mean over all examples, desirable
    and undesirable alike: mean(loss_B). Unpaired: each example is one completion with a desirable/undesirable label.
    ``kl`` is the batch KL baseline z0, a batch statistic and therefore an input: compute it with
    ``kto_kl_sums`` + ``kto_kl_baseline`` over the whole step's batch (then the per-example losses of any
    micro-batch split sum to the full-batch loss), or per micro-batch to mimic TRL exactly. It is detached and
    clamped at 0 here as well. r = z0 gives w / 2 either way.
    Metrics: ``rewards = beta r``, ``desirable`` (1/0), ``chosen_rewards`` / ``rejected_rewards`` (beta r on
    desirable / undesirable rows, 0 elsewhere: divide their sums by the sums of ``desirable`` / 1 - ``desirable``;
    TRL's ``rewards/margins`` is the difference of those two means), ``logps`` and scalar ``kl``.
    """
    r_B = _f32(logps_B) - _f32(ref_logps_B)
    z0 = jnp.maximum(jax.lax.stop_gradient(_f32(kl)), 0.0)
    d_B = jnp.asarray(desirable_B).astype(bool)
    loss_B = jnp.where(d_B, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r_B - z0))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r_B))))
    return loss_B, _unpaired_metrics(beta * r_B, d_B, _f32(logps_B), kl=z0)


def apo_zero_unpaired(logps_B: Float[Array, "B"], ref_logps_B: Float[Array, "B"], desirable_B: Bool[Array, "B"], *,
                      beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                      kl: Float[Array, ""] | float | None = None) -> LossOutput:
    """Unpaired APO-zero: loss = w_D (1 - sigma(beta r)) if desirable, w_U sigma(beta r) otherwise, r = pi - ref.

    D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7 split over unpaired examples (TRL ``KTOTrainer``,
    ``loss_type="apo_zero_unpaired"``; no KL baseline, ``kl`` is accepted and ignored so both KTO losses share a call).
    r = 0 gives w / 2.
    """
    del kl
    r_B = _f32(logps_B) - _f32(ref_logps_B)
    d_B = jnp.asarray(desirable_B).astype(bool)
    loss_B = jnp.where(d_B, desirable_weight * (1.0 - jax.nn.sigmoid(beta * r_B)),
                       undesirable_weight * jax.nn.sigmoid(beta * r_B))
    return loss_B, _unpaired_metrics(beta * r_B, d_B, _f32(logps_B))


def _unpaired_metrics(rewards_B: Array, d_B: Array, logps_B: Array, **scalars: Array) -> Metrics:
    d = d_B.astype(rewards_B.dtype)
    metrics = {"rewards": rewards_B, "desirable": d, "chosen_rewards": rewards_B * d,
               "rejected_rewards": rewards_B * (1.0 - d), "logps": logps_B, **scalars}
    return jax.tree.map(jax.lax.stop_gradient, metrics)


UNPAIRED_LOSSES = Registry("unpaired loss", {"kto": kto, "apo_zero_unpaired": apo_zero_unpaired}, data=("kl",))
"""TRL ``KTOConfig.loss_type`` -> loss. Uniform call: ``f(pi, ref, desirable_B, kl=..., **hyperparameters)``."""


def get_unpaired_loss(name: str) -> Callable[..., LossOutput]:
    return UNPAIRED_LOSSES.get(name)
