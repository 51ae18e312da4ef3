"""Per-token estimators of the KL divergence to a reference policy, and the two places a KL penalty can go.

Pure functions on per-token log-probabilities ``[B, T]`` of the *sampled* tokens: ``logp_BT`` under the policy being
trained (the sampling policy, up to off-policyness) and ``ref_logp_BT`` under the frozen reference. With
``log r = ref_logp - logp`` (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

* ``k1 = -log r``: unbiased for KL(pi || ref) under samples from pi, high variance, can be negative;
* ``k2 = (log r)^2 / 2``: biased (its expectation is an f-divergence that agrees with KL to second order in
  log r), low variance, never negative;
* ``k3 = (r - 1) - log r``: unbiased for KL(pi || ref) and never negative (r - 1 >= log r), low variance.

What each gives as a *loss* (its gradient, not its value, is what trains the policy). Per token, with the sample
held fixed, d k / d logp is ``k1: 1``, ``k2: (logp - ref)``, ``k3: 1 - ref / pi``; multiplied by grad log pi and
averaged over samples from pi (for which E[grad log pi] = 0):

* ``k1`` in the loss: E[grad log pi] = 0, the gradient is pure noise (not the KL gradient);
* ``k2`` in the loss: E[(log pi - log ref) grad log pi] = grad KL(pi || ref), the correct reverse-KL gradient;
* ``k3`` in the loss (GRPO's and verl's ``low_var_kl``): E[(1 - ref / pi) grad log pi] = -sum ref grad log pi =
  grad KL(ref || pi), the gradient of the *forward* KL, although its value estimates the reverse one.

(These are the known observations of Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation
for RL", and Zhang et al. 2025, "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning";
tests/test_rl_losses.py checks all three against exact expectations over a small categorical distribution.)

*In the reward* the KL is a detached penalty subtracted from the reward (``kl_penalty_token_rewards`` for GAE and
REINFORCE++, ``kl_penalty_sequence_rewards`` for outcome-reward estimators): with ``k1`` this is the classic RLHF
reward r - beta log(pi / ref) (Ziegler et al. 2019, Ouyang et al. 2022), whose policy gradient is the gradient of
the KL-regularised objective. *In the loss* (``kl_loss``) it is beta * k added to the per-token policy loss and
aggregated with it (GRPO, Shao et al. 2024, arXiv:2402.03300, uses k3 there).

Names: ``k1``, ``k2``, ``k3`` (verl's ``kl``/``k1``, ``mse``/``k2``, ``low_var_kl``/``k3``; verl also clamps
log r to [-20, 20] and k3 to [-10, 10], here ``max_log_ratio`` optionally clamps log r). TRL 1.16's GRPO ``beta``
term is ``kl_loss(..., estimator="k3", old_logp_BT=old)`` by default (``use_bias_correction_kl=True``: k3 times the
ratio) and ``kl_loss(..., estimator="k3")`` with ``use_bias_correction_kl=False``; with its sequence-level importance
sampling TRL weights the KL by the sequence ratio instead, which has no equivalent here. Everything is in float32 at
least; masked positions give 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpost.losses.preference import _f32
from jaxpost.losses.registry import Registry

Mask = Float[Array, "B T"]


def _log_r(logp_BT: Array, ref_logp_BT: Array, mask_BT: Mask | None, max_log_ratio: float | None) -> Array:
    """log r = ref - logp in float32, 0 where masked (so garbage in padding never reaches a value or gradient)."""
    log_r_BT = _f32(ref_logp_BT) - _f32(logp_BT)
    if mask_BT is not None:
        log_r_BT = jnp.where(jnp.asarray(mask_BT) > 0, log_r_BT, 0.0)
    if max_log_ratio is not None:
        log_r_BT = jnp.clip(log_r_BT, -max_log_ratio, max_log_ratio)
    return log_r_BT


def k1(logp_BT: Float[Array, "B T"], ref_logp_BT: Float[Array, "B T"], mask_BT: Mask | None = None, *,
       max_log_ratio: float | None = None) -> Float[Array, "B T"]:
    """k1 = -log r = logp - ref_logp per token (0 where masked). Schulman 2020."""
    return -_log_r(logp_BT, ref_logp_BT, mask_BT, max_log_ratio)


def k2(logp_BT: Float[Array, "B T"], ref_logp_BT: Float[Array, "B T"], mask_BT: Mask | None = None, *,
       max_log_ratio: float | None = None) -> Float[Array, "B T"]:
    """k2 = (log r)^2 / 2 per token (0 where masked). Schulman 2020."""
    return 0.5 * jnp.square(_log_r(logp_BT, ref_logp_BT, mask_BT, max_log_ratio))


def k3(logp_BT: Float[Array, "B T"], ref_logp_BT: Float[Array, "B T"], mask_BT: Mask | None = None, *,
       max_log_ratio: float | None = None) -> Float[Array, "B T"]:
    """k3 = (r - 1) - log r = expm1(log r) - log r per token (0 where masked). Schulman 2020; GRPO's KL term."""
    log_r_BT = _log_r(logp_BT, ref_logp_BT, mask_BT, max_log_ratio)
    return jnp.expm1(log_r_BT) - log_r_BT


KL_ESTIMATORS = Registry("KL estimator", {"k1": k1, "k2": k2, "k3": k3})
"""Name -> per-token estimator. Uniform call: ``f(logp_BT, ref_logp_BT, mask_BT=None, *, max_log_ratio=None)``."""


def get_kl_estimator(name: str) -> Callable[..., Float[Array, "B T"]]:
    """The per-token KL estimator registered under ``name`` (k1, k2, k3)."""
    return KL_ESTIMATORS.get(name)


def kl_loss(logp_BT: Float[Array, "B T"], ref_logp_BT: Float[Array, "B T"], mask_BT: Mask, *, beta: float,
            estimator: str = "k3", max_log_ratio: float | None = None,
            old_logp_BT: Float[Array, "B T"] | None = None) -> Float[Array, "B T"]:
    """KL in the loss: beta * k(logp, ref) per token, to add to the per-token policy loss before aggregation.

    The gradient flows through ``logp_BT`` only (the reference is detached). See the module docstring for what each
    estimator's gradient is: k2 gives grad KL(pi || ref), k3 (GRPO, the default) grad KL(ref || pi), k1 nothing in
    expectation. Masked positions give 0.

    ``old_logp_BT`` (the sampling policy's log-probs) makes it importance-weighted: beta * k * rho_t with
    rho_t = exp(logp_t - sg(old_logp_t)), differentiable (its value is 1 on-policy, its gradient is not 0). This is
    TRL's ``use_bias_correction_kl=True`` (``per_token_kl * coef_1``; TRL 1.16's default) and DeepSeek-V3.2's
    unbiased KL (arXiv:2512.02556, Eq. 7): E_old[rho k3] = KL(pi || ref) for samples from the old policy, and its
    gradient E_pi[grad k3 + k3 grad log pi] = grad KL(pi || ref), the reverse-KL gradient that plain k3 in the loss
    does not give (tests/test_rl_losses.py checks both exactly over a categorical distribution).
    """
    kl_BT = beta * get_kl_estimator(estimator)(logp_BT, jax.lax.stop_gradient(_f32(ref_logp_BT)), mask_BT,
                                               max_log_ratio=max_log_ratio)
    if old_logp_BT is None:
        return kl_BT
    m_BT = jnp.asarray(mask_BT) > 0
    log_rho_BT = jnp.where(m_BT, _f32(logp_BT) - jax.lax.stop_gradient(_f32(old_logp_BT)), 0.0)
    return jnp.where(m_BT, kl_BT * jnp.exp(log_rho_BT), 0.0)


def kl_penalty_token_rewards(token_rewards_BT: Float[Array, "B T"], kl_BT: Float[Array, "B T"],
                             mask_BT: Mask, *, beta: float) -> Float[Array, "B T"]:
    """KL in the reward, per token: r_t - beta * kl_t on response tokens, 0 elsewhere; detached (a reward).

    For the token-level estimators (``gae``, ``reinforce_pp``): the outcome reward sits on the last response token
    (``sequence_to_token_rewards``) and every response token pays its KL, as in InstructGPT-style PPO and
    REINFORCE++ (Hu 2025, arXiv:2501.03262). ``kl_BT`` is usually ``k1(logp_BT, ref_logp_BT, mask_BT)`` of the
    rollout policy.
    """
    m_BT = _f32(mask_BT)
    out_BT = (_f32(token_rewards_BT) - beta * _f32(kl_BT)) * m_BT
    return jax.lax.stop_gradient(out_BT)


def kl_penalty_sequence_rewards(rewards_B: Float[Array, "B"], kl_BT: Float[Array, "B T"], mask_BT: Mask, *,
                                beta: float) -> Float[Array, "B"]:
    """KL in the reward, per sequence: r - beta * sum_t kl_t over the response tokens; detached (a reward).

    For the outcome-reward estimators (``grpo``, ``rloo``, ...): with k1 this is r - beta log(pi(y|x) / ref(y|x)),
    the KL-regularised sequence reward (RLOO, Ahmadian et al. 2024, arXiv:2402.14740).
    """
    pen_B = jnp.sum(_f32(kl_BT) * _f32(mask_BT), axis=-1)
    return jax.lax.stop_gradient(_f32(rewards_B) - beta * pen_B)
