"""Fused log-prob/entropy kernels for GPU (Pallas, Triton lowering). Run on CPU with `interpret=True` for tests.

jax 0.10.2 lowers `pallas_call` on NVIDIA GPUs through Triton (`jax.experimental.pallas.triton`); Mosaic GPU
(`plgpu.kernel`, Hopper warpgroup MMA) takes over in later releases. The Triton form keeps one kernel source for
Ampere and Hopper and runs in interpret mode on CPU.

Forward (`partial_stats`): grid (token blocks, vocabulary splits). Each program loops over its vocabulary blocks;
each [bn, bv] logit tile is a K-loop of [bn, bd] x [bd, bv] dots accumulated in float32 registers and folded into the
online-softmax stats at once (`common.block_update`), so no logit reaches global memory. Splitting the vocabulary
over the grid's second axis keeps the GPU busy when N is small (scoring a few sequences); the splits' stats combine
exactly (`common.combine`).

Backward (`grads`): a GPU program cannot hold a [bn, D] float32 accumulator for dh (D is 4096 for an 8B model)
without re-running the logit matmul once per D block, and atomics over dh/dW would be both slow and
non-deterministic. So the backward scans over vocabulary chunks: a Pallas kernel recomputes each logit tile of the
chunk and writes d loss / dz for it in the input dtype (bf16: the [N, chunk] tile is the only large temporary,
bounded by `chunk_budget_bytes`), and the two gradient matmuls dh += dz @ W_c^T and dW_c = h^T @ dz run as XLA dots
(cuBLAS/cuDNN GEMMs on the tensor cores). dW is written once per chunk; only the [N, D] float32 dh accumulates.

Every load is masked past N, D and V: no shape needs to be a multiple of a block and W is never padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.fused_logprobs import common

DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_V = 128
DEFAULT_BLOCK_D = 64
DEFAULT_CHUNK_BUDGET_BYTES = 512 * 2**20
_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs


def _pow2_at_most(x: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(x, cap):
        p *= 2
    return max(p, 1)


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def block_sizes(N: int, D: int, V: int, block_n=None, block_v=None, block_d=None) -> tuple[int, int, int]:
    """Power-of-two tiles (Triton's requirement), at least 16 wide for the tensor-core dots, no larger than needed."""
    bn = min(block_n or DEFAULT_BLOCK_N, max(16, _pow2_at_least(N)))
    bv = min(block_v or DEFAULT_BLOCK_V, max(16, _pow2_at_least(V)))
    bd = min(block_d or DEFAULT_BLOCK_D, max(16, _pow2_at_least(D)))
    return bn, bv, bd


def _logit_tile(h_ref, w_ref, r0, v0, *, N, D, V, bn, bv, bd, inv_temp, vocab_major):
    """Float32 [bn, bv] logits of rows r0.. and columns v0.., a K-loop over D in blocks of bd."""
    rows = r0 + jnp.arange(bn)
    cols = v0 + jnp.arange(bv)

    def kstep(k, acc):
        ks = k * bd + jnp.arange(bd)
        h = plgpu.load(h_ref.at[pl.ds(r0, bn), pl.ds(k * bd, bd)],
                       mask=(rows < N)[:, None] & (ks < D)[None, :], other=0.0)
        if vocab_major:
            w = plgpu.load(w_ref.at[pl.ds(v0, bv), pl.ds(k * bd, bd)],
                           mask=(cols < V)[:, None] & (ks < D)[None, :], other=0.0)
            return acc + pl.dot(h, w, trans_b=True)
        w = plgpu.load(w_ref.at[pl.ds(k * bd, bd), pl.ds(v0, bv)],
                       mask=(ks < D)[:, None] & (cols < V)[None, :], other=0.0)
        return acc + pl.dot(h, w)

    z = jax.lax.fori_loop(0, pl.cdiv(D, bd), kstep, jnp.zeros((bn, bv), jnp.float32))
    return z if inv_temp == 1.0 else z * inv_temp


def _fwd_kernel(t_ref, h_ref, w_ref, m_ref, l_ref, s_ref, zt_ref, *, N, D, V, bn, bv, bd, inv_temp, vocab_major,
                entropy, blocks_per_split):
    i, split = pl.program_id(0), pl.program_id(1)
    r0 = i * bn
    rmask = r0 + jnp.arange(bn) < N
    t = plgpu.load(t_ref.at[pl.ds(r0, bn)], mask=rmask, other=-1)[:, None]
    first = split * blocks_per_split
    n_blocks = jnp.minimum(blocks_per_split, pl.cdiv(V, bv) - first)

    def vstep(jj, carry):
        v0 = (first + jj) * bv
        z = _logit_tile(h_ref, w_ref, r0, v0, N=N, D=D, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                        vocab_major=vocab_major)
        cols = v0 + jnp.arange(bv)[None, :]
        return common.block_update(*carry, z, cols, t, valid=cols < V, entropy=entropy)

    zeros = jnp.zeros((bn, 1), jnp.float32)
    init = (jnp.full((bn, 1), common.NEG_INIT, jnp.float32), zeros, zeros, zeros)
    m, l, s, zt = jax.lax.fori_loop(0, n_blocks, vstep, init)
    for ref, x in ((m_ref, m), (l_ref, l), (s_ref, s), (zt_ref, zt)):
        plgpu.store(ref.at[split, pl.ds(r0, bn)], x[:, 0], mask=rmask)


def partial_stats(h_ND, w, t_N, *, inv_temp: float = 1.0, vocab_major: bool = False, entropy: bool = True,
                  block_n=None, block_v=None, block_d=None, num_splits: int | None = None, num_warps: int = 4,
                  num_stages: int = 3, interpret: bool = False):
    """Online-softmax stats (m, l, s, zt), each float32 [N], of h_ND @ w over all of w's columns (see `common`).
    Targets outside [0, V) contribute zt = 0 (how a vocabulary shard sees targets held by another shard)."""
    N, D = h_ND.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    bn, bv, bd = block_sizes(N, D, V, block_n, block_v, block_d)
    n_nb, n_vb = pl.cdiv(N, bn), pl.cdiv(V, bv)
    if num_splits is None:
        num_splits = max(1, min(n_vb, -(-_TARGET_PROGRAMS // n_nb)))
    per_split = -(-n_vb // num_splits)
    num_splits = -(-n_vb // per_split)  # no empty split
    kernel = functools.partial(_fwd_kernel, N=N, D=D, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                               vocab_major=vocab_major, entropy=entropy, blocks_per_split=per_split)
    stats = pl.pallas_call(
        kernel,
        grid=(n_nb, num_splits),
        out_shape=[jax.ShapeDtypeStruct((num_splits, N), jnp.float32)] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_logprobs_fwd",
    )(t_N.astype(jnp.int32), h_ND, w)
    return common.combine(*stats) if num_splits > 1 else tuple(x[0] for x in stats)


def _dz_kernel(*refs, N, D, V, bn, bv, bd, inv_temp, vocab_major, entropy):
    if entropy:
        t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, h_ref, w_ref, dz_ref = refs
    else:
        t_ref, lse_ref, ez_ref, glp_ref, gl_ref, h_ref, w_ref, dz_ref = refs
        ge_ref = None
    i, j = pl.program_id(0), pl.program_id(1)
    r0, v0 = i * bn, j * bv
    rmask = r0 + jnp.arange(bn) < N

    def vec(ref, other=0.0):
        return plgpu.load(ref.at[pl.ds(r0, bn)], mask=rmask, other=other)[:, None]

    z = _logit_tile(h_ref, w_ref, r0, v0, N=N, D=D, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                    vocab_major=vocab_major)
    cols = v0 + jnp.arange(bv)[None, :]
    dz = common.dlogits(z, cols, vec(t_ref, -1), vec(lse_ref), vec(ez_ref), vec(glp_ref), vec(gl_ref),
                        None if ge_ref is None else vec(ge_ref), inv_temp=inv_temp, valid=cols < V)
    plgpu.store(dz_ref.at[pl.ds(r0, bn), pl.ds(v0, bv)], dz.astype(dz_ref.dtype),
                mask=rmask[:, None] & (cols < V))


def dlogits(h_ND, w, vecs, *, inv_temp, vocab_major, entropy, block_n=None, block_v=None, block_d=None,
            num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """d loss / d(h @ w) as a [N, V] array in h's dtype (V = the columns of this `w`, a chunk of the vocabulary)."""
    N, D = h_ND.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    bn, bv, bd = block_sizes(N, D, V, block_n, block_v, block_d)
    kernel = functools.partial(_dz_kernel, N=N, D=D, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                               vocab_major=vocab_major, entropy=entropy)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(N, bn), pl.cdiv(V, bv)),
        out_shape=jax.ShapeDtypeStruct((N, V), h_ND.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_logprobs_dz",
    )(*vecs, h_ND, w)


def chunk_columns(N: int, V: int, itemsize: int, budget_bytes: int, bv: int) -> int:
    """Vocabulary columns per backward chunk: the [N, chunk] dz tile within the budget, a multiple of bv."""
    cols = max(bv, (budget_bytes // max(1, N * itemsize)) // bv * bv)
    return min(cols, -(-V // bv) * bv)


def grads(h_ND, w, t_N, lse_N, ez_N, glp_N, gl_N, ge_N=None, *, inv_temp: float = 1.0, vocab_major: bool = False,
          dh_dtype=None, dw_dtype=None, block_n=None, block_v=None, block_d=None,
          chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES, interpret: bool = False):
    """(dh [N, D], dw shaped like w) of sum(glp * logp + gl * lse + ge * entropy); `ge_N` None: no entropy term.
    lse_N and ez_N (= E_p[z] = lse - entropy) are the complete forward stats (global over vocabulary shards)."""
    N, D = h_ND.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    entropy = ge_N is not None
    _, bv, _ = block_sizes(N, D, V, block_n, block_v, block_d)
    C = chunk_columns(N, V, jnp.dtype(h_ND.dtype).itemsize, chunk_budget_bytes, bv)
    t_N = t_N.astype(jnp.int32)
    f32 = [x.astype(jnp.float32) for x in (lse_N, ez_N, glp_N, gl_N) + ((ge_N,) if entropy else ())]
    kw = dict(inv_temp=inv_temp, vocab_major=vocab_major, entropy=entropy, block_n=block_n, block_v=block_v,
              block_d=block_d, interpret=interpret)
    v_axis = 0 if vocab_major else 1

    def chunk_grads(w_c, v0):
        dz_NC = dlogits(h_ND, w_c, [t_N - v0] + f32, **kw)
        if vocab_major:  # w_c [C, D]
            dh = jnp.dot(dz_NC, w_c, preferred_element_type=jnp.float32)
            dw_c = jnp.dot(dz_NC.T, h_ND, preferred_element_type=jnp.float32)
        else:  # w_c [D, C]
            dh = jnp.dot(dz_NC, w_c.T, preferred_element_type=jnp.float32)
            dw_c = jnp.dot(h_ND.T, dz_NC, preferred_element_type=jnp.float32)
        return dh, dw_c.astype(dw_dtype or w.dtype)

    n_full, rem = divmod(V, C)
    dh_ND = jnp.zeros((N, D), jnp.float32)
    dw = jnp.zeros(w.shape, dw_dtype or w.dtype)
    if n_full:
        def body(carry, c):
            dh_ND, dw = carry
            v0 = c * C
            dh_c, dw_c = chunk_grads(jax.lax.dynamic_slice_in_dim(w, v0, C, axis=v_axis), v0)
            return (dh_ND + dh_c, jax.lax.dynamic_update_slice_in_dim(dw, dw_c, v0, axis=v_axis)), None

        (dh_ND, dw), _ = jax.lax.scan(body, (dh_ND, dw), jnp.arange(n_full))
    if rem:  # the ragged last chunk: a static slice, no padding of w
        v0 = n_full * C
        dh_c, dw_c = chunk_grads(jax.lax.slice_in_dim(w, v0, V, axis=v_axis), v0)
        dh_ND = dh_ND + dh_c
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, v0, axis=v_axis)
    return dh_ND.astype(dh_dtype or h_ND.dtype), dw
