"""Plain-jnp reference for the fused log-prob/entropy core: full float32 logits, gradients by autodiff.

This is the oracle the kernels are tested against, never a training path. The kernels share its definitions:

    z = (h @ W) / temperature                    (W is [D, V], or [V, D] when `vocab_major`)
    lse = logsumexp(z),  logp = z[target] - lse,  entropy = lse - sum(softmax(z) * z)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def logits(h_ND, w, *, temperature: float = 1.0, vocab_major: bool = False) -> Float[Array, "N V"]:
    """Float32 [N, V] logits of [N, D] hidden states; `w` is [D, V], or [V, D] with `vocab_major`."""
    dims = (((1,), (1,)), ((), ())) if vocab_major else (((1,), (0,)), ((), ()))
    z_NV = jax.lax.dot_general(h_ND, w, dims, preferred_element_type=jnp.float32)
    return z_NV / temperature


def token_logprobs(h_ND: Float[Array, "N D"], w, t_N: Int[Array, " N"], *, temperature: float = 1.0,
                   vocab_major: bool = False):
    """(logp, lse, entropy), each float32 [N]; differentiable in `h_ND` and `w` by plain autodiff."""
    z_NV = logits(h_ND, w, temperature=temperature, vocab_major=vocab_major)
    lse_N = jax.nn.logsumexp(z_NV, axis=-1)
    logp_N = jnp.take_along_axis(z_NV, t_N[:, None], axis=-1)[:, 0] - lse_N
    p_NV = jnp.exp(z_NV - lse_N[:, None])
    ent_N = lse_N - jnp.sum(p_NV * z_NV, axis=-1)
    return logp_N, lse_N, ent_N
