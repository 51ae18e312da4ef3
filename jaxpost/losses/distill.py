"""Knowledge distillation: the aggregation of a per-token divergence, Hinton's KD mix, and the dense reward of
on-policy distillation.

Pure functions on arrays. The per-token divergence itself (forward / reverse KL, GKD's JSD(beta) over the full
vocabulary, or the forward KL against the teacher's top-k) is `jaxpost.ops.token_kl` / `token_kl_topk`, which needs
both models' hidden states and output layers and so lives in ops/; this module only says which divergence a name
means (`DISTILL_LOSSES`) and how its per-token values become a loss.

Two ways to distil, and where each lives:

* Logit distillation (KD, GKD): the student matches the teacher's whole next-token distribution on every loss token
  of a batch of rows, a loss = sum_t D(p_teacher(.|x_<t) || q_student(.|x_<t)) / (loss tokens of the global batch)
  (`distill_token_loss`; the objective `jaxpost.train.distill.Distill`). The rows may be fixed data (supervised KD,
  Hinton et al. 2015; Kim & Rush 2016's sequence-level KD on teacher outputs) or the student's own samples
  (on-policy GKD, Agarwal et al. 2024, arXiv:2306.13649; MiniLLM, Gu et al. 2024, arXiv:2306.08543).
* Sampled-token on-policy distillation: the student samples y ~ q, the teacher scores the sampled tokens only, and
  the per-token reward r_t = log p(y_t) - log q(y_t) drives a policy-gradient update (`on_policy_distill_advantages`
  with `jaxpost.losses.POLICY_LOSSES["reinforce"]`): Thinking Machines Lab, "On-Policy Distillation" (2025),
  Qwen3 technical report (arXiv:2505.09388, "on-policy distillation" of the small models). It needs the teacher's
  log-prob of one token per position, not its whole distribution (so a teacher behind an API that returns
  log-probs of given tokens suffices).
"""

from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpost.losses.advantages import _reverse_masked_scan
from jaxpost.losses.preference import _check, _f32
from jaxpost.losses.registry import Registry


def distill_token_loss(kl_BT: Float[Array, "B T"], mask_BT: Float[Array, "B T"]) -> tuple[Array, Array]:
    """(sum over every (b, t) of kl * mask, sum of mask): the token mean of a per-token divergence over the global
    batch, as a numerator and its denominator.

    `kl_BT` is any per-token divergence (`jaxpost.ops.token_kl`'s output, float32). Masked positions are dropped with
    `where` (garbage or inf there reaches neither the value nor a gradient). Sum the numerators over micro-batches and
    devices and divide once by the summed denominator (or, as the step does, divide each micro-batch's numerator by
    the whole step's denominator): the result is exactly the full-batch token mean under any split, never a mean of
    micro-batch means. GKD's TRL implementation (`generalized_jsd_loss(reduction="batchmean")`) divides the sum over
    the local batch's loss tokens instead, which is this only with one micro-batch on one device.
    """
    m_BT = _f32(jnp.asarray(mask_BT) > 0)
    return jnp.sum(jnp.where(m_BT > 0, _f32(kl_BT), 0.0)), jnp.sum(m_BT)


def kd_scale(temperature: float, *, scale_by_t2: bool):
    """The factor of the distillation term: T^2 (Hinton et al. 2015) or 1 (TRL's GKD, MiniLLM)."""
    return temperature * temperature if scale_by_t2 else 1.0


def kd_mix(nll_sum: Float[Array, ""], kd_sum: Float[Array, ""], *, alpha: float, temperature: float,
           scale_by_t2: bool) -> Float[Array, ""]:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531), Sec. 2:

        (1 - alpha) NLL(y | q_1) + alpha s KL(p_T || q_T),   s = T^2 if scale_by_t2 else 1,

    p_T, q_T the teacher's and the student's softmax at temperature T, NLL the student's hard-label loss at T = 1.
    The T^2: the soft term's gradient wrt the student's logits is (q_T - p_T) / T, and in the high-temperature limit
    (zero-meaned logits z_s, z_t over V classes) KL ~ sum_v (z_s,v - z_t,v)^2 / (2 V T^2), so its gradients shrink as
    1/T^2; multiplying by T^2 keeps the relative weight of the hard and soft terms roughly unchanged when T changes.
    TRL's GKD (`generalized_jsd_loss`) divides the logits by T and does *not* scale by T^2, neither does MiniLLM:
    `scale_by_t2` has no default, so every caller says which convention it follows (at T = 1 both agree).

    Inputs are sums over the same tokens (or means: the mix is linear), e.g. `jaxpost.losses.sft_nll`'s and
    `distill_token_loss`'s numerators; the result is their mix, to be divided by the same denominator.
    """
    _check(alpha, lambda v: 0.0 <= v <= 1.0, "kd_mix alpha must lie in [0, 1]")
    _check(temperature, lambda v: v > 0.0, "kd_mix temperature must be > 0")
    return (1.0 - alpha) * _f32(nll_sum) + alpha * kd_scale(temperature, scale_by_t2=scale_by_t2) * _f32(kd_sum)


def on_policy_distill_advantages(student_logp_BT: Float[Array, "B T"], teacher_logp_BT: Float[Array, "B T"],
                                 mask_BT: Float[Array, "B T"], *, gamma: float = 0.0) -> Float[Array, "B T"]:
    """The dense per-token reward of on-policy distillation, as detached per-token advantages [B, T]:

        r_t = log p_teacher(y_t | y_<t) - log q_student(y_t | y_<t),   A_t = sum_{k >= t, valid} gamma^(k - t) r_k

    on tokens y sampled from the student (0 on masked tokens; masked tokens are skipped by the discounting). r_t is
    minus the single-sample estimate of the per-token reverse KL, KL(q || p)(. | y_<t) = E_{y~q}[log q(y) - log p(y)]
    (Schulman's k1, `jaxpost.losses.k1(student, teacher)`; the same as `kl_penalty_token_rewards` of a zero task
    reward with beta = 1). Agarwal et al. 2024 (GKD, arXiv:2306.13649) train on student samples with a full-vocabulary
    divergence (reverse KL, JSD); Thinking Machines Lab's "On-Policy Distillation" (2025) and Qwen3
    (arXiv:2505.09388) use this sampled per-token reward with a policy-gradient update, `POLICY_LOSSES["reinforce"]`
    (or "ppo" off-policy) and the `token_mean` aggregation.

    gamma (the discount of the reward-to-go):
      0 (the default; the post's "discount factor of zero"): each token is rewarded by its own r_t. With the
        prefix held fixed, E_{y_t~q}[-r_t grad log q(y_t)] = grad KL(q || p)(. | y_<t) exactly (sum_y q grad log q = 0):
        the per-position reverse-KL gradient, ignoring how y_t changes the later positions' KL (a biased but
        lower-variance estimate of the sequence gradient).
      1: A_t = sum_{k >= t} r_k, the REINFORCE estimator of the gradient of the whole sequence's reverse KL
        KL(q(y|x) || p(y|x)) = E_q[sum_t (log q - log p)(y_t)] (unbiased; rewards before t drop out by causality).
      in between: a discounted compromise (as REINFORCE++'s returns, `reinforce_pp`).
    The advantages are not whitened or baselined: the expected reward is already minus a KL, on every token.
    """
    _check(gamma, lambda v: 0.0 <= v <= 1.0, "on_policy_distill_advantages gamma must lie in [0, 1]")
    m_BT = _f32(jnp.asarray(mask_BT) > 0)
    r_BT = jnp.where(m_BT > 0, _f32(teacher_logp_BT) - _f32(student_logp_BT), 0.0)
    if isinstance(gamma, Real) and gamma == 0.0:
        return jax.lax.stop_gradient(r_BT)

    def step(g_B, r_B):
        g_B = r_B + gamma * g_B
        return g_B, g_B

    ret_TB = _reverse_masked_scan(step, jnp.zeros_like(m_BT[:, 0]), (r_BT.T,), m_BT.T)
    return jax.lax.stop_gradient(ret_TB.T)


# ----------------------------------------------------------------------------------------------------------------------
# Which divergence a name means: the arguments of `jaxpost.ops.token_kl` (or token_kl_topk).


class Divergence(NamedTuple):
    """A per-token divergence: `kind` is a `jaxpost.ops.token_kl` kind ("forward", "reverse", "jsd") or "topk"
    (`token_kl_topk`: forward KL against the teacher's renormalised top-k); `beta` JSD's mixture weight (unused by
    the others); `temperature` divides both models' logits."""

    kind: str
    beta: float
    temperature: float


def _divergence(kind: str, beta: float, temperature: float) -> Divergence:
    _check(temperature, lambda v: v > 0.0, f"{kind} temperature must be > 0")
    return Divergence(kind, float(beta), float(temperature))


def forward_kl_divergence(*, temperature: float = 1.0) -> Divergence:
    """KL(p || q) = sum_v p (log p - log q): mean-seeking, standard KD (Hinton et al. 2015; TRL GKD beta = 0)."""
    return _divergence("forward", 0.0, temperature)


def reverse_kl_divergence(*, temperature: float = 1.0) -> Divergence:
    """KL(q || p) = sum_v q (log q - log p): mode-seeking (MiniLLM, Gu et al. 2024; TRL GKD beta = 1)."""
    return _divergence("reverse", 1.0, temperature)


def jsd_divergence(*, beta: float = 0.5, temperature: float = 1.0) -> Divergence:
    """GKD's generalised JSD, beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (Agarwal et al. 2024,
    arXiv:2306.13649, Eq. 1, in TRL 1.16's convention: beta = 0 / 1 are exactly the forward / reverse KL; TRL's
    default beta is 0.5)."""
    _check(beta, lambda v: 0.0 <= v <= 1.0, "jsd beta must lie in [0, 1]")
    return _divergence("jsd", beta, temperature)


def topk_forward_kl_divergence(*, temperature: float = 1.0) -> Divergence:
    """KL(p~ || q) against the teacher's top-k renormalised (sparse / offline KD from stored teacher top-k
    log-probs; `jaxpost.ops.token_kl_topk`, equal to the forward KL when k = V)."""
    return _divergence("topk", 0.0, temperature)


DISTILL_LOSSES = Registry("distillation loss", {
    "forward_kl": forward_kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "jsd": jsd_divergence,
    "topk_forward_kl": topk_forward_kl_divergence,
})
"""Name -> `f(**hyperparameters) -> Divergence`: `DISTILL_LOSSES.get(name)(**DISTILL_LOSSES.kwargs(name, cfg))` gives
the divergence a config names (its `temperature`, and `beta` for jsd), never a branch on the name."""


def get_distill_loss(name: str, **hparams) -> Divergence:
    """The divergence registered under `name` (`DISTILL_LOSSES`) with its hyperparameters."""
    return DISTILL_LOSSES.get(name)(**hparams)
