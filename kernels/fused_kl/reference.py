"""Plain-jnp reference for the fused KL core: both full float32 [N, V] logits, gradients by autodiff.

The oracle the kernels are tested against, never a training path. Definitions (T = temperature):

    lq = log_softmax(h_s W_s / T)  (student),   lp = log_softmax(h_t W_t / T)  (teacher)
    forward: KL(p || q) = sum_v p (lp - lq),    reverse: KL(q || p) = sum_v q (lq - lp)
    jsd:     beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1 (GKD, TRL's convention)

W is [D, V], or [V, D] with `vocab_major`; the two models may have different widths D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.fused_logprobs.reference import logits


def token_kl(hs_ND, ws, ht_ND, wt, *, kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
             student_vocab_major: bool = False, teacher_vocab_major: bool = False) -> Float[Array, " N"]:
    """Per-token float32 divergence [N]; differentiable in every input by plain autodiff (no stop_gradient here)."""
    lq_NV = jax.nn.log_softmax(logits(hs_ND, ws, temperature=temperature, vocab_major=student_vocab_major), axis=-1)
    lp_NV = jax.nn.log_softmax(logits(ht_ND, wt, temperature=temperature, vocab_major=teacher_vocab_major), axis=-1)
    if kind == "forward":
        return jnp.sum(jnp.exp(lp_NV) * (lp_NV - lq_NV), axis=-1)
    if kind == "reverse":
        return jnp.sum(jnp.exp(lq_NV) * (lq_NV - lp_NV), axis=-1)
    if kind == "jsd":
        lm_NV = jnp.logaddexp(lp_NV + jnp.log(beta), lq_NV + jnp.log1p(-beta))
        return (beta * jnp.sum(jnp.exp(lp_NV) * (lp_NV - lm_NV), axis=-1)
                + (1 - beta) * jnp.sum(jnp.exp(lq_NV) * (lq_NV - lm_NV), axis=-1))
    raise ValueError(f"reference.token_kl: kind must be 'forward', 'reverse' or 'jsd', got {kind!r}")
