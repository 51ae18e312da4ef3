"""Advantage estimators for policy-gradient RL with verifiable rewards, and the reward shaping around them.

Pure functions on arrays, computed once per step on the whole rollout batch (they are statistics of the batch, not
per-example losses), then fed to the policy loss micro-batch by micro-batch. Everything returned is float32 and
``stop_gradient``-ed.

Layout: ``B = n_prompts * G`` rows, the G samples of one prompt in consecutive rows (``group_size=G``); per-token
arrays are ``[B, T]`` with a response mask ``mask_BT`` (1 on the response tokens whose log-probs the loss uses). A
device or host that holds part of the batch must hold whole groups (split rows at multiples of G).

Two kinds of estimator, both registered in ``ADVANTAGE_ESTIMATORS``:

* sequence level (``SEQUENCE_LEVEL_ESTIMATORS``: grpo, dr_grpo, rloo, reinforce):
  ``f(rewards_B, *, group_size, mask_B=None, **hyper) -> advantages_B``, one advantage per sequence ``[B]`` (policy
  losses broadcast it over the sequence's tokens; ``broadcast_to_tokens`` does it explicitly). ``mask_B`` marks real
  rows (padding rows, e.g. the groups a dynamic-sampling filter dropped, get 0 and take no part in any statistic).
* token level (``TOKEN_LEVEL_ESTIMATORS``: reinforce_pp, gae): ``f(token_rewards_BT, mask_BT, *, **hyper) ->
  (advantages_BT, returns_BT)``, per token ``[B, T]``. Build ``token_rewards_BT`` with ``sequence_to_token_rewards``
  (the outcome reward on the last response token) and, for a KL penalty in the reward,
  ``jaxpost.losses.kl.kl_penalty_token_rewards``.

Masks are respected everywhere: masked rows or tokens get advantage 0 and never enter a mean, a standard deviation or
a discounted sum (a masked token inside a response, e.g. a tool observation, is skipped, not treated as an end).

Batch-wide statistics (grpo's ``scale="batch"``, reinforce_pp's whitening, ``masked_whiten``) are computed over the
array passed in. Inside ``jit`` with a sharded global batch that is the global batch; inside ``shard_map`` pass
``axis_name`` and the sums are ``psum``-ed over that mesh axis, giving the same global statistic on every device.

Conventions and where TRL and verl differ:
* GRPO's std uses Bessel's correction (ddof=1, ``torch.std``'s default, both TRL and verl) and the epsilon is added
  to the std, not under the square root: A = (r - mean) / (std + eps). eps defaults to 1e-6 (verl's
  ``compute_grpo_outcome_advantage``); TRL's ``GRPOTrainer`` uses 1e-4. A group whose rewards are all equal gets
  A = 0 either way. A group with a single (valid) member gets A = 0 (TRL; verl instead uses mean 0, std 1, i.e.
  A = r / (1 + eps)).
* ``scale`` follows TRL's ``scale_rewards``: "group" (GRPO), "batch" (group mean, std of the rewards over the whole
  batch; "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", Liu et al. 2025), "none" (Dr.GRPO; verl's
  ``norm_adv_by_std_in_grpo=False``).
* Whitening (reinforce_pp, ``masked_whiten``) follows verl's ``masked_whiten``: mean and unbiased variance (ddof=1)
  over the valid tokens, (x - mean) * rsqrt(var + 1e-8).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxpost.losses.preference import _f32
from jaxpost.losses.registry import Registry

RowMask = Bool[Array, "B"] | Float[Array, "B"] | None


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _psum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _row_mask(rewards_B: Array, mask_B: RowMask) -> Array:
    return jnp.ones_like(rewards_B) if mask_B is None else _f32(jnp.asarray(mask_B) > 0)


def _groups(x_B: Array, group_size: int) -> Array:
    """[B] -> [N, G]; B must be a multiple of G (a static check)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if x_B.ndim != 1 or x_B.shape[0] % group_size:
        raise ValueError(f"expected rewards [B] with B a multiple of group_size={group_size}, got shape {x_B.shape}")
    return x_B.reshape(-1, group_size)


def _group_mean_std(r_B: Array, m_B: Array, group_size: int, ddof: int) -> tuple[Array, Array, Array]:
    """Per-row (group mean, group std, number of valid rows in the group), over the valid rows of each group.

    std = sqrt(sum (r - mean)^2 / (n - ddof)), and 0 where n <= ddof (one valid member: r - mean = 0 anyway).
    Masked rows' rewards are ignored (replaced by 0 before any arithmetic, so inf / NaN padding is harmless).
    """
    r_NG, m_NG = _groups(r_B, group_size), _groups(m_B, group_size)
    r_NG = jnp.where(m_NG > 0, r_NG, 0.0)
    n_N = jnp.sum(m_NG, axis=-1)
    # shifted mean: pivot on a member of the group, so that equal rewards give r - mean = 0 exactly in float32
    # (sum(0.3 x 8) / 8 is not 0.3, and the std ~1e-8 would blow the rounding error up to O(1e-2) advantages)
    pivot_N = jnp.max(jnp.where(m_NG > 0, r_NG, -jnp.inf), axis=-1)
    pivot_N = jnp.where(n_N > 0, pivot_N, 0.0)
    mean_N = pivot_N + jnp.sum((r_NG - pivot_N[:, None]) * m_NG, axis=-1) / jnp.maximum(n_N, 1.0)
    ss_N = jnp.sum(jnp.square(r_NG - mean_N[:, None]) * m_NG, axis=-1)
    std_N = jnp.where(n_N > ddof, jnp.sqrt(ss_N / jnp.maximum(n_N - ddof, 1.0)), 0.0)
    rep = lambda x_N: jnp.repeat(x_N, group_size)
    return rep(mean_N), rep(std_N), rep(n_N)


def _global_mean_var(x: Array, m: Array, ddof: int, axis_name: str | None) -> tuple[Array, Array]:
    """Mean and variance (sum of squared deviations / (n - ddof)) of x over the valid entries of the global batch."""
    n = _psum(jnp.sum(m), axis_name)
    mean = _psum(jnp.sum(x * m), axis_name) / jnp.maximum(n, 1.0)
    ss = _psum(jnp.sum(jnp.square(x - mean) * m), axis_name)
    var = jnp.where(n > ddof, ss / jnp.maximum(n - ddof, 1.0), 0.0)
    return mean, var


def _reverse_masked_scan(step: Callable, init, xs_TB: tuple, m_TB: Array):
    """Scan t = T-1 .. 0; at masked positions the carry passes through unchanged and the output is 0."""

    def body(carry, x):
        m_B, *rest = x
        new_carry, out_B = step(carry, *rest)
        keep = m_B > 0
        carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
        return carry, jnp.where(keep, out_B, 0.0)

    _, out_TB = jax.lax.scan(body, init, (m_TB, *xs_TB), reverse=True)
    return out_TB


def masked_whiten(x_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, eps: float = 1e-8, ddof: int = 1,
                  shift_mean: bool = True, axis_name: str | None = None) -> Float[Array, "B T"]:
    """(x - mean) * rsqrt(var + eps) over the valid tokens of the global batch; 0 where masked.

    verl's ``masked_whiten`` (unbiased variance, ddof=1; OpenRLHF uses ddof=0); ``shift_mean=False`` adds the mean
    back (scale only). PPO implementations (verl; TRL < 1.0's PPOTrainer) whiten the GAE advantages with it.
    ``axis_name``: psum the statistics over that mesh axis inside ``shard_map``.
    """
    x_BT, m_BT = _f32(x_BT), _f32(jnp.asarray(mask_BT) > 0)
    x_BT = jnp.where(m_BT > 0, x_BT, 0.0)
    mean, var = _global_mean_var(x_BT, m_BT, ddof, axis_name)
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out_BT = out_BT + mean
    return jax.lax.stop_gradient(out_BT * m_BT)


def broadcast_to_tokens(advantages_B: Float[Array, "B"], mask_BT: Float[Array, "B T"]) -> Float[Array, "B T"]:
    """Per-sequence advantages [B] -> per-token [B, T] (the same value on every response token, 0 elsewhere)."""
    return _f32(advantages_B)[:, None] * _f32(jnp.asarray(mask_BT) > 0)


def sequence_to_token_rewards(rewards_B: Float[Array, "B"], mask_BT: Float[Array, "B T"]) -> Float[Array, "B T"]:
    """The outcome reward of each sequence placed on its last response token, 0 elsewhere (rows without a response
    token get nothing). The input of the token-level estimators."""
    m_BT = _f32(jnp.asarray(mask_BT) > 0)
    from_end_BT = jnp.cumsum(m_BT[:, ::-1], axis=-1)[:, ::-1]  # valid tokens at or after t
    last_BT = m_BT * (from_end_BT == 1.0)
    return jax.lax.stop_gradient(_f32(rewards_B)[:, None] * last_BT)


# ----------------------------------------------------------------------------------------------------------------------
# sequence-level (outcome reward) estimators


def grpo(rewards_B: Float[Array, "B"], *, group_size: int, scale: str = "group", eps: float = 1e-6, ddof: int = 1,
         mask_B: RowMask = None, axis_name: str | None = None) -> Float[Array, "B"]:
    """GRPO: A_i = (r_i - mean_g(r)) / (std + eps), one advantage per sequence [B].

    Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, Sec. 4.1.2 (outcome supervision). mean_g is the mean over
    the G samples of the same prompt. ``scale`` (TRL's ``scale_rewards``): "group" divides by the group's std (the
    paper), "batch" by the std of all rewards in the global batch, "none" not at all (= ``dr_grpo``). The std has
    ``ddof`` (default 1, Bessel) and eps is added to it (default 1e-6, verl; TRL uses 1e-4). Groups whose rewards are
    all equal get 0; masked rows (``mask_B``) get 0 and are left out of every statistic. ``axis_name`` psums the
    batch statistic of ``scale="batch"`` inside ``shard_map`` (the group statistics need no communication as long as
    groups are not split across devices).
    """
    m_B = _row_mask(_f32(rewards_B), mask_B)
    r_B = jnp.where(m_B > 0, _f32(rewards_B), 0.0)
    mean_B, std_B, _ = _group_mean_std(r_B, m_B, group_size, ddof)
    adv_B = r_B - mean_B
    if scale == "group":
        adv_B = adv_B / (std_B + eps)
    elif scale == "batch":
        _, var = _global_mean_var(r_B, m_B, ddof, axis_name)
        adv_B = adv_B / (jnp.sqrt(var) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return jax.lax.stop_gradient(adv_B * m_B)


def dr_grpo(rewards_B: Float[Array, "B"], *, group_size: int, mask_B: RowMask = None) -> Float[Array, "B"]:
    """Dr.GRPO: A_i = r_i - mean_g(r), no division by the std; one advantage per sequence [B].

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783: the std
    normalisation weights prompts by the inverse spread of their rewards (a difficulty bias), and the per-sequence
    length normalisation 1/|o_i| biases lengths; the second is removed by the loss aggregation
    ``seq_mean_token_sum_norm`` (a constant normaliser: global sequences x max length), which goes with this
    estimator. Equal to ``grpo(..., scale="none")``.
    """
    return grpo(rewards_B, group_size=group_size, scale="none", mask_B=mask_B)


def _normalize_batch(adv_B: Array, m_B: Array, eps: float, ddof: int, axis_name: str | None) -> Array:
    """(A - mean) / (std + eps) over the valid rows of the global batch (TRL's ``normalize_advantages``)."""
    mean, var = _global_mean_var(adv_B, m_B, ddof, axis_name)
    return (adv_B - mean) / (jnp.sqrt(var) + eps)


def rloo(rewards_B: Float[Array, "B"], *, group_size: int, mask_B: RowMask = None, normalize: bool = False,
         eps: float = 1e-4, ddof: int = 1, axis_name: str | None = None) -> Float[Array, "B"]:
    """RLOO: A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_g(r)) within each group; per sequence [B].

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
    in LLMs", arXiv:2402.14740 (Kool et al. 2019's leave-one-out baseline). n is the number of valid rows in the
    group; a group with fewer than 2 valid rows has no baseline and gets 0 (verl uses baseline 0 there, A = r; TRL
    NaN, then 0). For a KL-regularised reward use ``kl_penalty_sequence_rewards`` first.
    ``normalize``: then standardise over the valid rows of the global batch, (A - mean) / (std + eps), std with
    ``ddof`` (TRL ``RLOOConfig.normalize_advantages``, default off: ddof 1, eps 1e-4, the defaults here; TRL leaves
    rows of single-member groups out of that statistic, here they take part with A = 0). ``axis_name`` psums it
    inside ``shard_map``.
    """
    m_B = _row_mask(_f32(rewards_B), mask_B)
    r_B = jnp.where(m_B > 0, _f32(rewards_B), 0.0)
    mean_B, _, n_B = _group_mean_std(r_B, m_B, group_size, 0)
    adv_B = jnp.where(n_B >= 2, n_B / jnp.maximum(n_B - 1.0, 1.0) * (r_B - mean_B), 0.0)
    if normalize:
        adv_B = _normalize_batch(adv_B, m_B, eps, ddof, axis_name)
    return jax.lax.stop_gradient(adv_B * m_B)


def reinforce_returns(rewards_B: Float[Array, "B"], *, group_size: int, mask_B: RowMask = None,
                      normalize: bool = False, eps: float = 1e-4, ddof: int = 1,
                      axis_name: str | None = None) -> Float[Array, "B"]:
    """REINFORCE without a baseline: A_i = r_i, one advantage per sequence [B]; ``normalize`` standardises it over
    the valid rows of the global batch, (r - mean) / (std + eps) with ``ddof`` (a batch-mean baseline and scale;
    eps 1e-4 and ddof 1 as TRL's advantage normalisation). ``group_size`` is accepted for the uniform call and
    unused: no statistic is per group. Williams 1992; the plain baseline-free estimator the group baselines
    (grpo, rloo) improve on.
    """
    del group_size
    m_B = _row_mask(_f32(rewards_B), mask_B)
    adv_B = jnp.where(m_B > 0, _f32(rewards_B), 0.0)
    if normalize:
        adv_B = _normalize_batch(adv_B, m_B, eps, ddof, axis_name)
    return jax.lax.stop_gradient(adv_B * m_B)


# ----------------------------------------------------------------------------------------------------------------------
# token-level estimators


def reinforce_pp(token_rewards_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, gamma: float = 1.0,
                 whiten: bool = True, eps: float = 1e-8, ddof: int = 1, axis_name: str | None = None
                 ) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """REINFORCE++: per-token discounted returns G_t = sum_{k >= t} gamma^(k - t) r_k, whitened over the global batch.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", arXiv:2501.03262:
    r_t = [t is the last response token] r(x, y) - beta KL_t (build it with ``sequence_to_token_rewards`` and
    ``kl_penalty_token_rewards``), no critic, advantages A_t = (G_t - mean) / std with mean and std over every valid
    token of the global batch (``masked_whiten``: ddof=1, rsqrt(var + eps), as verl). The batch statistic is computed
    here, so pass the whole step's batch (or, inside ``shard_map``, its shard and ``axis_name``). Returns
    (advantages_BT, returns_BT), 0 on masked tokens; masked tokens are skipped by the discounting (verl resets the sum
    there instead; the two agree on contiguous responses).
    """
    r_BT, m_BT = _f32(token_rewards_BT), _f32(jnp.asarray(mask_BT) > 0)

    def step(g_B, r_B):
        g_B = r_B + gamma * g_B
        return g_B, g_B

    ret_TB = _reverse_masked_scan(step, jnp.zeros_like(m_BT[:, 0]), (r_BT.T,), m_BT.T)
    ret_BT = ret_TB.T
    adv_BT = masked_whiten(ret_BT, m_BT, eps=eps, ddof=ddof, axis_name=axis_name) if whiten else ret_BT
    return jax.lax.stop_gradient(adv_BT), jax.lax.stop_gradient(ret_BT)


def gae(token_rewards_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"], *, values_BT: Float[Array, "B T"],
        gamma: float = 1.0, lam: float = 0.95) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns R_t = A_t + V_t.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438, Eq. 16; for PPO with a value model. ``token_rewards_BT`` is usually zero except on the last
    response token (``sequence_to_token_rewards``, minus a per-token KL penalty if any); ``values_BT`` the value
    model's predictions V(s_t) aligned with the tokens. V after the last valid token is 0 (the episode ends).
    Masked tokens are skipped: they get 0, and the recursion links each valid token to the next valid one (as verl's
    multi-turn GAE). gamma = 1 and lam = 0.95 were TRL's PPO defaults (TRL < 1.0; verl: lam = 1). Returns
    (advantages_BT, returns_BT); the advantages are not whitened (verl and TRL < 1.0 whiten them for PPO:
    ``masked_whiten``).
    """
    r_BT, m_BT, v_BT = _f32(token_rewards_BT), _f32(jnp.asarray(mask_BT) > 0), _f32(values_BT)
    v_BT = jnp.where(m_BT > 0, v_BT, 0.0)

    def step(carry, r_B, v_B):
        next_v_B, next_a_B = carry
        a_B = r_B + gamma * next_v_B - v_B + gamma * lam * next_a_B
        return (v_B, a_B), a_B

    zeros_B = jnp.zeros_like(m_BT[:, 0])  # (like the inputs: varying over a shard_map axis)
    adv_BT = _reverse_masked_scan(step, (zeros_B, zeros_B), (r_BT.T, v_BT.T), m_BT.T).T
    ret_BT = (adv_BT + v_BT) * m_BT
    return jax.lax.stop_gradient(adv_BT), jax.lax.stop_gradient(ret_BT)


_NORMALIZE = {"normalize": "normalize", "eps": "adv_eps", "ddof": "adv_ddof"}

ADVANTAGE_ESTIMATORS = Registry("advantage estimator", {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce": reinforce_returns,
    "reinforce_pp": reinforce_pp,
    "gae": gae,
}, hparams={"grpo": {"scale": "grpo_scale", "eps": "grpo_eps", "ddof": "grpo_ddof"}, "dr_grpo": (),
            "rloo": _NORMALIZE, "reinforce": _NORMALIZE,
            "reinforce_pp": {"gamma": "gamma", "eps": "whiten_eps", "ddof": "whiten_ddof"}, "gae": ("gamma", "lam")})
"""Name -> estimator. Sequence level: ``f(rewards_B, *, group_size, mask_B=None, **hyper) -> [B]``; token level:
``f(token_rewards_BT, mask_BT, **hyper) -> ([B, T], [B, T])`` (gae also needs ``values_BT=``)."""

SEQUENCE_LEVEL_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce"})
"""Estimators of one advantage per sequence from outcome rewards [B] and groups of G consecutive rows."""

TOKEN_LEVEL_ESTIMATORS = frozenset({"reinforce_pp", "gae"})
"""Estimators of per-token advantages and returns from per-token rewards [B, T]."""


def get_advantage_estimator(name: str) -> Callable:
    """The advantage estimator registered under ``name`` (``ADVANTAGE_ESTIMATORS``)."""
    return ADVANTAGE_ESTIMATORS.get(name)


# ----------------------------------------------------------------------------------------------------------------------
# DAPO's reward shaping and dynamic-sampling filter


def overlong_penalty(lengths_B: Float[Array, "B"], *, max_length: int, cache_length: int,
                     penalty_factor: float = 1.0) -> Float[Array, "B"]:
    """DAPO's soft overlong punishment, to add to the reward: with L = max_length, C = cache_length,

        0                          if |y| <= L - C
        ((L - C) - |y|) / C        if L - C < |y| <= L      (linear from 0 down to -1)
        -1                         if |y| > L

    times ``penalty_factor``. Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476, Eq. 13 (L = 20480, C = 4096 there; verl's ``overlong_buffer.len`` and ``penalty_factor``).
    ``lengths_B`` are response lengths in tokens.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    n_B = _f32(lengths_B)
    pen_B = jnp.clip(((max_length - cache_length) - n_B) / cache_length, -1.0, 0.0)
    return penalty_factor * pen_B


def dynamic_sampling_keep(rewards_B: Float[Array, "B"], *, group_size: int) -> Bool[Array, "N"]:
    """DAPO's dynamic sampling filter: keep mask [N = B / G] of the groups whose rewards are not all equal.

    Yu et al. 2025, arXiv:2503.14476, Eq. 11 (0 < #correct < G): a group with zero reward std has zero GRPO
    advantages and contributes no gradient. The filtering itself (and over-sampling to refill the batch) happens on
    the host; expand to rows with ``jnp.repeat(keep_N, G)``. Tests max > min, i.e. std > 0 exactly.
    """
    r_NG = _groups(_f32(rewards_B), group_size)
    return jnp.max(r_NG, axis=-1) > jnp.min(r_NG, axis=-1)
