"""Fused log-prob/entropy kernels for TPU (Pallas Mosaic). Run on CPU with `interpret=True` for tests.

Forward: a grid (token blocks, vocabulary blocks); the vocabulary axis is innermost and sequential ("arbitrary"), so
each token block keeps its online-softmax stats (`common.block_update`) in VMEM scratch across vocabulary blocks and
writes them once at the last block. The [bn, bv] logit tile lives only in VMEM/vregs: no [N, V] array is ever
written to HBM.

Backward: two kernels in the manner of flash attention's dq and dkv kernels. `dh`: grid (token blocks, vocabulary
blocks) that recomputes each logit tile, forms d loss / dz and accumulates dz @ W_blk^T into a [bn, D] float32 VMEM
accumulator. `dw`: grid (vocabulary blocks, token blocks) that accumulates h_blk^T @ dz into a [D, bv] accumulator.
Each recomputes the logits once, so forward + backward costs 4 matmuls of 2*N*D*V flops plus the forward's one.

Ragged shapes: N and V need not be multiples of the blocks. The edge blocks read past the arrays (undefined values,
NaN in interpret mode); logits of columns past V are masked to -inf, W columns past V and h rows past N are zeroed
before they enter a matmul that would spread them, and writes past the arrays are dropped. W is never padded.

Per-token vectors travel as [N, 1] float32 / int32 arrays (a block's last dim equals the array's, as Mosaic asks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.fused_logprobs import common

DEFAULT_BLOCK_N = 256
DEFAULT_BLOCK_V = 512


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_sizes(N: int, V: int, block_n: int | None, block_v: int | None) -> tuple[int, int]:
    """Token blocks a multiple of 8 and vocabulary blocks a multiple of 128 (TPU tiles), no larger than needed."""
    bn = min(block_n or DEFAULT_BLOCK_N, _round_up(N, 8))
    bv = min(block_v or DEFAULT_BLOCK_V, _round_up(V, 128))
    return bn, bv


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _logit_tile(h, w, inv_temp, vocab_major):
    """[bn, D] x ([D, bv] | [bv, D]) -> float32 [bn, bv]."""
    z = _dot(h, w, ((1,), (1,)) if vocab_major else ((1,), (0,)))
    return z if inv_temp == 1.0 else z * inv_temp


def _cols(j, bv, shape):
    return j * bv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _vmem_limit(*nbytes) -> int:
    """Scoped VMEM to ask for: the blocks (double-buffered) and scratch, with headroom, within 16..100 MiB."""
    need = int(sum(nbytes) * 1.5) + (4 << 20)
    return max(16 << 20, min(need, 100 << 20))


def _fwd_kernel(t_ref, h_ref, w_ref, m_ref, l_ref, s_ref, zt_ref, m_sc, l_sc, s_sc, zt_sc, *,
                inv_temp, vocab_major, entropy, V, bv, n_vblocks):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, common.NEG_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        zt_sc[...] = jnp.zeros(zt_sc.shape, jnp.float32)

    z = _logit_tile(h_ref[...], w_ref[...], inv_temp, vocab_major)
    cols = _cols(j, bv, z.shape)
    valid = (cols < V) if V % bv else None
    m, l, s, zt = common.block_update(m_sc[...], l_sc[...], s_sc[...], zt_sc[...], z, cols, t_ref[...],
                                      valid=valid, entropy=entropy)
    m_sc[...], l_sc[...], zt_sc[...] = m, l, zt
    if entropy:
        s_sc[...] = s

    @pl.when(j == n_vblocks - 1)
    def _write():
        m_ref[...], l_ref[...], s_ref[...], zt_ref[...] = m_sc[...], l_sc[...], s_sc[...], zt_sc[...]


def partial_stats(h_ND, w, t_N, *, inv_temp: float = 1.0, vocab_major: bool = False, entropy: bool = True,
                  block_n: int | None = None, block_v: int | None = None, interpret: bool = False):
    """Online-softmax stats (m, l, s, zt), each float32 [N], of h_ND @ w over all of w's columns (see `common`).
    Targets outside [0, V) contribute zt = 0 (how a vocabulary shard sees targets held by another shard)."""
    N, D = h_ND.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    bn, bv = block_sizes(N, V, block_n, block_v)
    grid = (pl.cdiv(N, bn), pl.cdiv(V, bv))
    vec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    w_spec = pl.BlockSpec((bv, D), lambda i, j: (j, 0)) if vocab_major else pl.BlockSpec((D, bv), lambda i, j: (0, j))
    kernel = functools.partial(_fwd_kernel, inv_temp=inv_temp, vocab_major=vocab_major, entropy=entropy, V=V, bv=bv,
                               n_vblocks=grid[1])
    out_shape = [jax.ShapeDtypeStruct((N, 1), jnp.float32)] * 4
    isz = jnp.dtype(h_ND.dtype).itemsize
    limit = _vmem_limit(2 * bn * D * isz, 2 * D * bv * jnp.dtype(w.dtype).itemsize, 3 * bn * bv * 4)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[vec, pl.BlockSpec((bn, D), lambda i, j: (i, 0)), w_spec],
        out_specs=[vec] * 4,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 4,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=limit),
        interpret=interpret,
        name="fused_logprobs_fwd",
    )(t_N.astype(jnp.int32)[:, None], h_ND, w)
    return tuple(o[:, 0] for o in outs)


def _dz_tile(z, cols, t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, *, inv_temp, valid):
    ge = None if ge_ref is None else ge_ref[...]
    return common.dlogits(z, cols, t_ref[...], lse_ref[...], ez_ref[...], glp_ref[...], gl_ref[...], ge,
                          inv_temp=inv_temp, valid=valid)


def _split_refs(refs, entropy):
    """(t, lse, ez, glp, gl, ge | None, h, w, out, acc) from a kernel's positional refs."""
    if entropy:
        return refs
    t, lse, ez, glp, gl, h, w, out, acc = refs
    return t, lse, ez, glp, gl, None, h, w, out, acc


def _dh_kernel(*refs, inv_temp, vocab_major, entropy, V, bv, n_vblocks):
    t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, h_ref, w_ref, dh_ref, acc = _split_refs(refs, entropy)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    w = w_ref[...]
    z = _logit_tile(h_ref[...], w, inv_temp, vocab_major)
    cols = _cols(j, bv, z.shape)
    valid = None
    if V % bv:
        valid = cols < V
        wcols = _cols(j, bv, (1, bv))
        w = jnp.where(wcols.T < V, w, 0) if vocab_major else jnp.where(wcols < V, w, 0)
    dz = _dz_tile(z, cols, t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, inv_temp=inv_temp, valid=valid)
    acc[...] += _dot(dz.astype(w.dtype), w, ((1,), (0,)) if vocab_major else ((1,), (1,)))

    @pl.when(j == n_vblocks - 1)
    def _write():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _dw_kernel(*refs, inv_temp, vocab_major, entropy, N, V, bn, bv, n_nblocks):
    t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, h_ref, w_ref, dw_ref, acc = _split_refs(refs, entropy)
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    h = h_ref[...]
    z = _logit_tile(h, w_ref[...], inv_temp, vocab_major)
    cols = _cols(j, bv, z.shape)
    valid = (cols < V) if V % bv else None
    dz = _dz_tile(z, cols, t_ref, lse_ref, ez_ref, glp_ref, gl_ref, ge_ref, inv_temp=inv_temp, valid=valid)
    if N % bn:
        rows = i * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
        h = jnp.where(rows < N, h, 0)
        dz = jnp.where(rows < N, dz, 0.0)
    dz = dz.astype(h.dtype)
    # vocab-major dW block is [bv, D] = dz^T @ h; else [D, bv] = h^T @ dz.
    acc[...] += _dot(dz, h, ((0,), (0,))) if vocab_major else _dot(h, dz, ((0,), (0,)))

    @pl.when(i == n_nblocks - 1)
    def _write():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def grads(h_ND, w, t_N, lse_N, ez_N, glp_N, gl_N, ge_N=None, *, inv_temp: float = 1.0, vocab_major: bool = False,
          dh_dtype=None, dw_dtype=None, block_n: int | None = None, block_v: int | None = None,
          interpret: bool = False):
    """(dh [N, D], dw shaped like w) of sum(glp * logp + gl * lse + ge * entropy); `ge_N` None: no entropy term.
    lse_N and ez_N (= E_p[z] = lse - entropy) are the complete forward stats (global over vocabulary shards)."""
    N, D = h_ND.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    bn, bv = block_sizes(N, V, block_n, block_v)
    entropy = ge_N is not None
    vecs = [t_N.astype(jnp.int32), lse_N, ez_N, glp_N, gl_N] + ([ge_N] if entropy else [])
    vecs = [v[:, None] if v.dtype == jnp.int32 else v.astype(jnp.float32)[:, None] for v in vecs]
    n_nb, n_vb = pl.cdiv(N, bn), pl.cdiv(V, bv)
    hsz, wsz = jnp.dtype(h_ND.dtype).itemsize, jnp.dtype(w.dtype).itemsize
    limit = _vmem_limit(2 * bn * D * hsz, 2 * D * bv * wsz, bn * D * 4, D * bv * 4, 4 * bn * bv * 4)
    statics = dict(inv_temp=inv_temp, vocab_major=vocab_major, entropy=entropy, V=V, bv=bv)

    # dh: tokens outer (parallel), vocabulary inner (accumulated).
    vec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    w_spec = pl.BlockSpec((bv, D), lambda i, j: (j, 0)) if vocab_major else pl.BlockSpec((D, bv), lambda i, j: (0, j))
    h_spec = pl.BlockSpec((bn, D), lambda i, j: (i, 0))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **statics, n_vblocks=n_vb),
        grid=(n_nb, n_vb),
        in_specs=[vec] * len(vecs) + [h_spec, w_spec],
        out_specs=h_spec,
        out_shape=jax.ShapeDtypeStruct((N, D), dh_dtype or h_ND.dtype),
        scratch_shapes=[pltpu.VMEM((bn, D), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit),
        interpret=interpret,
        name="fused_logprobs_dh",
    )(*vecs, h_ND, w)

    # dw: vocabulary outer (parallel), tokens inner (accumulated).
    vec = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
    w_spec = pl.BlockSpec((bv, D), lambda j, i: (j, 0)) if vocab_major else pl.BlockSpec((D, bv), lambda j, i: (0, j))
    w_block = (bv, D) if vocab_major else (D, bv)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **statics, N=N, bn=bn, n_nblocks=n_nb),
        grid=(n_vb, n_nb),
        in_specs=[vec] * len(vecs) + [pl.BlockSpec((bn, D), lambda j, i: (i, 0)), w_spec],
        out_specs=w_spec,
        out_shape=jax.ShapeDtypeStruct(w.shape, dw_dtype or w.dtype),
        scratch_shapes=[pltpu.VMEM(w_block, jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit),
        interpret=interpret,
        name="fused_logprobs_dw",
    )(*vecs, h_ND, w)
    return dh, dw
