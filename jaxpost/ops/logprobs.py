"""Per-token log-probabilities (and entropy) of targets under softmax(h @ W / temperature).

`token_logprobs` is the one entry every loss uses; no training path builds the full [tokens x vocab] logits.
It dispatches to
- the Pallas kernels ("pallas_tpu", "pallas_gpu"; kernels/fused_logprobs, wrapped in jaxpost/ops/fused.py): logit
  tiles live only in on-chip memory, with an online softmax over vocabulary blocks;
- "chunked", pure XLA: a `jax.custom_vjp` scans over token chunks in the forward pass, keeps only the per-token
  log-sum-exp (and entropy), and recomputes logits in the backward pass. The backward pass scans over vocabulary
  chunks when a column block fits the budget (the gradient of W is then written once per block and only the small
  [tokens x D] gradient of h is accumulated), else over token chunks (the [D x V] gradient of W is accumulated).
  Every matmul is 2-D ([tokens, D] @ [D, V]): XLA:CPU turns 3-D contractions over (batch, tokens) into transposes
  of the [tokens x V] operand. Under a mesh, XLA's partitioner splits it like any other matmul;
- "naive": the full logits, the reference for tests and benchmarks.
The entropy is computed only when it is asked for.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxpost.ops import fused

IMPLS = ("auto", "pallas_tpu", "pallas_gpu", "chunked", "naive")
DEFAULT_CHUNK_BUDGET_BYTES = 64 * 2**20
_F32_TEMPS_PER_LOGIT = 4  # [chunk x vocab] float32 arrays alive at once in the backward pass
_MIN_VOCAB_BLOCK = 256  # narrower column blocks make poor matmuls: use token chunks in the backward pass instead


class TokenLogprobs(NamedTuple):
    logp: Float[Array, "..."]
    lse: Float[Array, "..."]
    entropy: Float[Array, "..."] | None


def _logits(h_ND, w_DV, inv_temp):
    z_NV = jnp.dot(h_ND, w_DV, preferred_element_type=jnp.float32)
    return z_NV if inv_temp == 1.0 else z_NV * inv_temp


def _stats(h_ND, w_DV, t_N, inv_temp, entropy: bool):
    """Float32 (logp, lse, entropy or None) of N tokens, all from one [N, V] block of logits."""
    z_NV = _logits(h_ND, w_DV, inv_temp)
    lse_N = jax.nn.logsumexp(z_NV, axis=-1)
    logp_N = jnp.take_along_axis(z_NV, t_N[:, None], axis=-1)[:, 0] - lse_N
    ent_N = None
    if entropy:
        p_NV = jnp.exp(z_NV - lse_N[:, None])
        ent_N = lse_N - jnp.sum(p_NV * z_NV, axis=-1)
    return logp_N, lse_N, ent_N


def _flat(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _naive(h_BTD, w_DV, t_BT, temperature, entropy):
    B, T = t_BT.shape
    outs = _stats(_flat(h_BTD), w_DV, _flat(t_BT), 1.0 / temperature, entropy)
    return tuple(None if o is None else o.reshape(B, T) for o in outs)


def _scan(body, init, xs, n: int):
    """`jax.lax.scan`, or one direct call of the body when there is a single chunk."""
    if n == 1:
        carry, y = body(init, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], y)
    return jax.lax.scan(body, init, xs)


def _to_chunks(x, n_chunks):
    """[B, T, ...] -> [n_chunks, B, T // n_chunks, ...] (scan axis first)."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, n_chunks, T // n_chunks, *x.shape[2:]), 1, 0)


def _from_chunks(x):
    n, B, C = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * C, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked(h_BTD, w_DV, t_BT, temperature, n_chunks, entropy, v_chunks):
    """n_chunks: token chunks (forward, and backward when v_chunks == 0); v_chunks: vocabulary chunks of the
    backward pass (0: use token chunks); entropy: whether the entropy is computed (else it is None)."""
    out, _ = _chunked_fwd(h_BTD, w_DV, t_BT, temperature, n_chunks, entropy, v_chunks)
    return out


def _chunked_fwd(h_BTD, w_DV, t_BT, temperature, n_chunks, entropy, v_chunks):
    inv_temp = 1.0 / temperature

    def body(_, xs):
        h_BCD, t_BC = xs
        B, C = t_BC.shape
        outs = _stats(_flat(h_BCD), w_DV, _flat(t_BC), inv_temp, entropy)
        return None, tuple(o.reshape(B, C) for o in outs if o is not None)

    _, outs = _scan(body, None, (_to_chunks(h_BTD, n_chunks), _to_chunks(t_BT, n_chunks)), n_chunks)
    outs = [_from_chunks(o) for o in outs]
    logp, lse = outs[:2]
    ent = outs[2] if entropy else None
    return (logp, lse, ent), (h_BTD, w_DV, t_BT, lse, ent)


def _dlogits(z_NV, t_N, lse_N, ent_N, glp_N, gl_N, ge_N, inv_temp, v0=0):
    """d(sum glp*logp + gl*lse + ge*entropy)/dz, times d z / d(h W) = inv_temp: [N, V] float32.

    d logp/dz = onehot(t) - p;  d lse/dz = p;  d entropy/dz = -p * (z - E_p[z]),  E_p[z] = lse - entropy.
    """
    p_NV = jnp.exp(z_NV - lse_N[:, None])
    if ge_N is None:
        dz_NV = p_NV * (gl_N - glp_N)[:, None]
    else:
        ez_N = lse_N - ent_N
        dz_NV = p_NV * ((gl_N - glp_N)[:, None] - ge_N[:, None] * (z_NV - ez_N[:, None]))
    cols_V = v0 + jnp.arange(z_NV.shape[1], dtype=t_N.dtype)
    dz_NV = dz_NV + jnp.where(t_N[:, None] == cols_V[None, :], glp_N[:, None], 0.0)
    return dz_NV if inv_temp == 1.0 else dz_NV * inv_temp


def _chunked_bwd(temperature, n_chunks, entropy, v_chunks, res, cts):
    h_BTD, w_DV, t_BT, lse_BT, ent_BT = res
    g_logp, g_lse, g_ent = cts
    inv_temp = 1.0 / temperature
    V = w_DV.shape[1]
    if not entropy:
        g_ent = None

    if v_chunks:
        h_ND = _flat(h_BTD)
        flat = [None if x is None else _flat(x) for x in (t_BT, lse_BT, ent_BT, g_logp, g_lse, g_ent)]
        Vc = V // v_chunks

        def vbody(carry, i):
            dh_ND, dw_DV = carry
            v0 = i * Vc
            w_DC = jax.lax.dynamic_slice_in_dim(w_DV, v0, Vc, axis=1)
            z_NC = _logits(h_ND, w_DC, inv_temp)
            dz_NC = _dlogits(z_NC, *flat, inv_temp, v0)
            dh_ND = dh_ND + jnp.dot(dz_NC.astype(w_DV.dtype), w_DC.T, preferred_element_type=jnp.float32)
            dw_DC = jnp.dot(h_ND.T, dz_NC.astype(h_ND.dtype), preferred_element_type=jnp.float32)
            dw_DV = jax.lax.dynamic_update_slice_in_dim(dw_DV, dw_DC, v0, axis=1)
            return (dh_ND, dw_DV), None

        init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros(w_DV.shape, jnp.float32))
        (dh_ND, dw_DV), _ = _scan(vbody, init, jnp.arange(v_chunks), v_chunks)
        return dh_ND.reshape(h_BTD.shape).astype(h_BTD.dtype), dw_DV.astype(w_DV.dtype), None

    def body(dw_DV, xs):
        h_BCD, t_BC, lse_BC, ent_BC, glp_BC, gl_BC, ge_BC = xs
        B, C = t_BC.shape
        h_ND = _flat(h_BCD)
        z_NV = _logits(h_ND, w_DV, inv_temp)
        dz_NV = _dlogits(z_NV, _flat(t_BC), _flat(lse_BC), None if ent_BC is None else _flat(ent_BC), _flat(glp_BC),
                         _flat(gl_BC), None if ge_BC is None else _flat(ge_BC), inv_temp)
        dh_ND = jnp.dot(dz_NV.astype(w_DV.dtype), w_DV.T, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(h_ND.T, dz_NV.astype(h_ND.dtype), preferred_element_type=jnp.float32)
        return dw_DV, dh_ND.reshape(B, C, -1).astype(h_BCD.dtype)

    chunks = [None if x is None else _to_chunks(x, n_chunks)
              for x in (h_BTD, t_BT, lse_BT, ent_BT, g_logp, g_lse, g_ent)]
    dw_DV, dh = _scan(body, jnp.zeros(w_DV.shape, jnp.float32), chunks, n_chunks)
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


def _num_vocab_chunks(N: int, V: int, budget_bytes: int) -> int:
    """Vocabulary chunks of the backward pass: the smallest divisor n of V whose [N x V / n] float32 temporaries fit
    the budget, or 0 (use token chunks) when such blocks would be narrower than `_MIN_VOCAB_BLOCK` columns, or when
    the vocabulary is split over a `tensor` mesh axis (slicing a sharded axis would gather it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.shape.get("tensor", 1) > 1:
        return 0
    max_cols = budget_bytes // (N * 4 * _F32_TEMPS_PER_LOGIT)
    for n in range(1, V + 1):
        if V % n == 0 and V // n <= max_cols:
            return n if V // n >= min(V, _MIN_VOCAB_BLOCK) else 0
    return 0


def default_impl(backend: str | None = None) -> str:
    """What impl="auto" picks: the Pallas kernel on TPU and NVIDIA GPU, the chunked XLA path elsewhere."""
    backend = backend or jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend, "chunked")


def token_logprobs(
    hidden: Float[Array, "*N D"],
    unembed: Float[Array, "D V"],
    targets: Int[Array, "*N"],
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    vocab_major: bool = False,
    chunk_budget_bytes: int | None = None,
) -> TokenLogprobs:
    """log softmax(hidden @ unembed / temperature)[targets], the log-sum-exp and optionally the entropy.

    hidden [N, D] or [B, T, D]; unembed [D, V] (or [V, D] with `vocab_major=True`: the tied embedding table as it is
    stored, no transposed copy); targets int [N] or [B, T], each in [0, V). Outputs are float32, shaped like
    `targets`; all three are differentiable with respect to hidden and unembed through a custom VJP that recomputes
    logit tiles (targets get no gradient). Reductions run in float32 whatever the input dtype.

    impl:
      "auto"        `default_impl()`: "pallas_tpu" on TPU, "pallas_gpu" on GPU, "chunked" elsewhere;
      "pallas_tpu"  the Mosaic TPU kernels of kernels/fused_logprobs/tpu.py (interpret mode on CPU);
      "pallas_gpu"  the Pallas GPU kernels of kernels/fused_logprobs/gpu.py (interpret mode on CPU);
      "chunked"     pure XLA: custom VJP over token / vocabulary chunks whose float32 [chunk x vocab] temporaries
                    stay within `chunk_budget_bytes` (default 64 MiB);
      "naive"       full [N, V] logits: the reference, for tests and benchmarks only.
    The Pallas impls shard over the mesh set with `jax.set_mesh`: tokens over (data, fsdp), the vocabulary over
    `tensor` (see jaxpost/ops/fused.py). `chunk_budget_bytes` also bounds the GPU backward's dz tile (default 512 MiB).
    """
    if impl not in IMPLS:
        raise ValueError(f"token_logprobs: impl must be one of {IMPLS}, got {impl!r}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"token_logprobs: hidden {hidden.shape} and targets {targets.shape} disagree")
    d_axis = 1 if vocab_major else 0
    if unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[d_axis]:
        layout = "[V, D] (vocab_major)" if vocab_major else "[D, V]"
        raise ValueError(f"token_logprobs: hidden {hidden.shape} does not match unembed {unembed.shape}, "
                         f"expected {layout}")
    if impl == "auto":
        impl = default_impl()
    temperature = float(temperature)
    if impl in fused.KERNELS:
        D = hidden.shape[-1]
        h_ND, t_N = hidden.reshape(-1, D), targets.reshape(-1).astype(jnp.int32)
        V = unembed.shape[0 if vocab_major else 1]
        spec = fused.make_spec(impl, N=h_ND.shape[0], V=V, temperature=temperature, entropy=bool(return_entropy),
                               vocab_major=vocab_major, chunk_budget_bytes=chunk_budget_bytes)
        logp, lse, ent = fused.fused_logprobs(h_ND, unembed, t_N, spec)
        shape = targets.shape
        return TokenLogprobs(logp.reshape(shape), lse.reshape(shape),
                             None if ent is None else ent.reshape(shape))

    w_DV = unembed.T if vocab_major else unembed
    flat = hidden.ndim == 2
    h_BTD = hidden[None] if flat else hidden
    t_BT = (targets[None] if flat else targets).astype(jnp.int32)
    if impl == "naive":
        logp, lse, ent = _naive(h_BTD, w_DV, t_BT, temperature, return_entropy)
    else:
        budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
        B, T = t_BT.shape
        V = w_DV.shape[1]
        n_chunks = _num_chunks(B, T, V, budget)
        v_chunks = _num_vocab_chunks(B * T, V, budget)
        logp, lse, ent = _chunked(h_BTD, w_DV, t_BT, temperature, n_chunks, bool(return_entropy), v_chunks)
    if flat:
        logp, lse = logp[0], lse[0]
        ent = None if ent is None else ent[0]
    return TokenLogprobs(logp, lse, ent if return_entropy else None)


def token_log_sum_sq_probs(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    *,
    temperature: float = 1.0,
    vocab_major: bool = False,
    chunk_budget_bytes: int | None = None,
) -> Float[Array, "B T"]:
    """log sum_v p_v^2 of each position's next-token distribution p = softmax(hidden @ unembed / temperature):
    logsumexp(2 z) - 2 logsumexp(z), float32 [B, T], detached (no gradient flows: a weight, not a loss term).

    WPO's sampling-aligned log-probability is logp_t - log sum_v p_v^2 (Zhou et al. 2024, arXiv:2406.11827, Eq. 2;
    TRL's ``log_sum_sq_probs``). Computed in token chunks like the chunked log-prob path, so no [tokens x vocab]
    array outlives its chunk.
    """
    if temperature <= 0:
        raise ValueError(f"token_log_sum_sq_probs: temperature must be > 0, got {temperature}")
    h_BTD = jax.lax.stop_gradient(hidden)
    w_DV = jax.lax.stop_gradient(unembed.T if vocab_major else unembed)
    B, T = h_BTD.shape[:2]
    n_chunks = _num_chunks(B, T, w_DV.shape[1], chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES)
    inv_temp = 1.0 / temperature

    def body(_, h_BCD):
        Bc, C = h_BCD.shape[:2]
        z_NV = _logits(_flat(h_BCD), w_DV, inv_temp)
        out_N = jax.nn.logsumexp(2.0 * z_NV, axis=-1) - 2.0 * jax.nn.logsumexp(z_NV, axis=-1)
        return None, out_N.reshape(Bc, C)

    _, out = _scan(body, None, _to_chunks(h_BTD, n_chunks), n_chunks)
    return _from_chunks(out)
