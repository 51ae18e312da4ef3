"""Per-token log-probabilities (and entropy) of targets under softmax(h @ W / temperature).

`token_logprobs` is the one entry every loss uses. The "chunked" implementation never materialises the full
[tokens x vocab] logits: a `jax.custom_vjp` scans over token chunks in the forward pass, keeps only the per-token
log-sum-exp, and recomputes each chunk's logits in the backward pass. "naive" builds the full logits and exists as
the reference for tests and benchmarks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IMPLS = ("auto", "chunked", "naive")
DEFAULT_CHUNK_BUDGET_BYTES = 64 * 2**20
_F32_TEMPS_PER_LOGIT = 4  # [chunk x vocab] float32 arrays alive at once in the backward pass


class TokenLogprobs(NamedTuple):
    logp: Float[Array, "..."]
    lse: Float[Array, "..."]
    entropy: Float[Array, "..."] | None


def _chunk_stats(h_BCD, w_DV, t_BC, inv_temp):
    """Float32 (logp, lse, entropy, logits) for one chunk."""
    z_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32) * inv_temp
    lse_BC = jax.nn.logsumexp(z_BCV, axis=-1)
    z_t_BC = jnp.take_along_axis(z_BCV, t_BC[..., None], axis=-1)[..., 0]
    p_BCV = jnp.exp(z_BCV - lse_BC[..., None])
    ent_BC = lse_BC - jnp.sum(p_BCV * z_BCV, axis=-1)
    return z_t_BC - lse_BC, lse_BC, ent_BC, z_BCV, p_BCV


def _naive(h_BTD, w_DV, t_BT, temperature):
    logp, lse, ent, _, _ = _chunk_stats(h_BTD, w_DV, t_BT, 1.0 / temperature)
    return logp, lse, ent


def _to_chunks(x, n_chunks):
    """[B, T, ...] -> [n_chunks, B, T // n_chunks, ...] (scan axis first)."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, n_chunks, T // n_chunks, *x.shape[2:]), 1, 0)


def _from_chunks(x):
    n, B, C = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * C, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(h_BTD, w_DV, t_BT, temperature, n_chunks):
    out, _ = _chunked_fwd(h_BTD, w_DV, t_BT, temperature, n_chunks)
    return out


def _chunked_fwd(h_BTD, w_DV, t_BT, temperature, n_chunks):
    inv_temp = 1.0 / temperature

    def body(_, xs):
        h_BCD, t_BC = xs
        logp, lse, ent, _, _ = _chunk_stats(h_BCD, w_DV, t_BC, inv_temp)
        return None, (logp, lse, ent)

    _, outs = jax.lax.scan(body, None, (_to_chunks(h_BTD, n_chunks), _to_chunks(t_BT, n_chunks)))
    logp, lse, ent = (_from_chunks(o) for o in outs)
    return (logp, lse, ent), (h_BTD, w_DV, t_BT, lse, ent)


def _chunked_bwd(temperature, n_chunks, res, cts):
    h_BTD, w_DV, t_BT, lse_BT, ent_BT = res
    g_logp, g_lse, g_ent = cts
    inv_temp = 1.0 / temperature
    V = w_DV.shape[1]

    def body(dw_DV, xs):
        h_BCD, t_BC, lse_BC, ent_BC, glp_BC, gl_BC, ge_BC = xs
        z_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32) * inv_temp
        p_BCV = jnp.exp(z_BCV - lse_BC[..., None])
        # d logp/dz = onehot(t) - p;  d lse/dz = p;  d entropy/dz = -p * (z - E_p[z]),  E_p[z] = lse - entropy.
        ez_BC = lse_BC - ent_BC
        dz_BCV = p_BCV * ((gl_BC - glp_BC)[..., None] - ge_BC[..., None] * (z_BCV - ez_BC[..., None]))
        dz_BCV = dz_BCV + glp_BC[..., None] * jax.nn.one_hot(t_BC, V, dtype=jnp.float32)
        dz_BCV = dz_BCV * inv_temp
        dh_BCD = jnp.einsum("bcv,dv->bcd", dz_BCV.astype(w_DV.dtype), w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, dz_BCV.astype(h_BCD.dtype),
                                   preferred_element_type=jnp.float32)
        return dw_DV, dh_BCD.astype(h_BCD.dtype)

    chunks = [_to_chunks(x, n_chunks) for x in (h_BTD, t_BT, lse_BT, ent_BT, g_logp, g_lse, g_ent)]
    dw_DV, dh = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), chunks)
    return _from_chunks(dh), dw_DV.astype(w_DV.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _num_chunks(B: int, T: int, V: int, budget_bytes: int) -> int:
    """Smallest divisor of T whose chunks keep B * (T / n) * V float32 temporaries within the budget."""
    per_token = V * 4 * _F32_TEMPS_PER_LOGIT
    max_tokens_per_chunk = max(1, budget_bytes // per_token)
    for n in range(1, T + 1):
        if T % n == 0 and B * (T // n) <= max_tokens_per_chunk:
            return n
    return T


def token_logprobs(
    hidden: Float[Array, "*N D"],
    unembed: Float[Array, "D V"],
    targets: Int[Array, "*N"],
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
) -> TokenLogprobs:
    """log softmax(hidden @ unembed / temperature)[targets], the log-sum-exp and optionally the entropy.

    hidden [N, D] or [B, T, D]; unembed [D, V]; targets int [N] or [B, T]. Outputs are float32, shaped like
    `targets`; all are differentiable with respect to hidden and unembed (targets get no gradient). Reductions run in
    float32 whatever the input dtype.

    impl: "auto" (the best for the backend; "chunked" on every backend until the Pallas kernels land), "chunked"
    (custom_vjp over token chunks; `chunk_budget_bytes` bounds the float32 [chunk x vocab] temporaries), "naive"
    (full logits: reference only).
    """
    if impl not in IMPLS:
        raise ValueError(f"token_logprobs: impl must be one of {IMPLS}, got {impl!r}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"token_logprobs: hidden {hidden.shape} and targets {targets.shape} disagree")
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(f"token_logprobs: hidden {hidden.shape} does not match unembed {unembed.shape}")
    flat = hidden.ndim == 2
    h_BTD = hidden[None] if flat else hidden
    t_BT = (targets[None] if flat else targets).astype(jnp.int32)
    temperature = float(temperature)
    if impl == "naive":
        logp, lse, ent = _naive(h_BTD, unembed, t_BT, temperature)
    else:
        B, T = t_BT.shape
        n_chunks = _num_chunks(B, T, unembed.shape[1], chunk_budget_bytes)
        logp, lse, ent = _chunked(h_BTD, unembed, t_BT, temperature, n_chunks)
    if flat:
        logp, lse, ent = logp[0], lse[0], ent[0]
    return TokenLogprobs(logp, lse, ent if return_entropy else None)
