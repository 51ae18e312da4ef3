"""Fused token-KL kernels for GPU (Pallas, Triton lowering). Run on CPU with `interpret=True` for tests.

The structure of kernels/fused_logprobs/gpu.py (whose K-looped logit tile and block sizes it reuses), with two models
per tile (see that module for why Triton on jax 0.10.2):

Forward (`partial_stats`): grid (token blocks, vocabulary splits). Each program loops over its vocabulary blocks,
computes the student's and the teacher's [bn, bv] logit tiles (K-loops over D_s and D_t in float32 registers) and folds
them into the five online stats of `common.block_update`; no logit reaches global memory. Vocabulary splits keep the
GPU busy at small N; their stats combine exactly (`common.combine`). The JSD's second pass (`jsd_sums`) has the same
grid and loop, recomputes both tiles given the log-sum-exps of the first, and sums `common.jsd_block_sums` (plain
sums: the splits add up).

Backward (`grads`): as in the log-prob core, a scan over vocabulary chunks: a Pallas kernel recomputes both tiles and
writes the student's dz for the chunk in h_s's dtype (the [N, chunk] tile is the only large temporary, bounded by
`chunk_budget_bytes`), and dh_s += dz @ W_s,c^T, dW_s,c = h_s^T @ dz run as XLA GEMMs. dW_s is written once per chunk.

Every load is masked past N, D and V: no shape needs to be a multiple of a block and W is never padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.fused_kl import common
from kernels.fused_logprobs.gpu import (
    _TARGET_PROGRAMS,
    DEFAULT_CHUNK_BUDGET_BYTES,
    _logit_tile,
    block_sizes,
    chunk_columns,
)

__all__ = ["DEFAULT_CHUNK_BUDGET_BYTES", "block_sizes", "grads", "jsd_sums", "partial_stats"]


def _tiles(hs_ref, ws_ref, ht_ref, wt_ref, r0, v0, *, N, Ds, Dt, V, bn, bv, bd, inv_temp, svm, tvm):
    kw = dict(N=N, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp)
    zs = _logit_tile(hs_ref, ws_ref, r0, v0, D=Ds, vocab_major=svm, **kw)
    zt = _logit_tile(ht_ref, wt_ref, r0, v0, D=Dt, vocab_major=tvm, **kw)
    return zs, zt


def _fwd_kernel(hs_ref, ws_ref, ht_ref, wt_ref, *out_refs, student_weights, blocks_per_split, **kw):
    i, split = pl.program_id(0), pl.program_id(1)
    N, V, bn, bv = kw["N"], kw["V"], kw["bn"], kw["bv"]
    r0 = i * bn
    rmask = r0 + jnp.arange(bn) < N
    first = split * blocks_per_split
    n_blocks = jnp.minimum(blocks_per_split, pl.cdiv(V, bv) - first)

    def vstep(jj, carry):
        v0 = (first + jj) * bv
        zs, zt = _tiles(hs_ref, ws_ref, ht_ref, wt_ref, r0, v0, **kw)
        valid = (v0 + jnp.arange(bv))[None, :] < V
        return common.block_update(*carry, zs, zt, student_weights=student_weights, valid=valid)

    neg, zeros = jnp.full((bn, 1), common.NEG_INIT, jnp.float32), jnp.zeros((bn, 1), jnp.float32)
    stats = jax.lax.fori_loop(0, n_blocks, vstep, (neg, zeros, neg, zeros, zeros))
    for ref, x in zip(out_refs, stats):
        plgpu.store(ref.at[split, pl.ds(r0, bn)], x[:, 0], mask=rmask)


def _dims(hs_ND, ws, ht_ND, svm, block_n, block_v, block_d):
    (N, Ds), Dt = hs_ND.shape, ht_ND.shape[1]
    V = ws.shape[0] if svm else ws.shape[1]
    bn, bv, bd = block_sizes(N, max(Ds, Dt), V, block_n, block_v, block_d)
    return N, Ds, Dt, V, bn, bv, bd


def partial_stats(hs_ND, ws, ht_ND, wt, *, kind: str, inv_temp: float = 1.0, student_vocab_major: bool = False,
                  teacher_vocab_major: bool = False, block_n=None, block_v=None, block_d=None,
                  num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """Online stats (ms, ls, mt, lt, acc), each float32 [N], over all columns of ws / wt (see `common`)."""
    student_weights = common.weights_student(kind)
    N, Ds, Dt, V, bn, bv, bd = _dims(hs_ND, ws, ht_ND, student_vocab_major, block_n, block_v, block_d)
    n_nb, num_splits, per_split = _vocab_splits(N, V, bn, bv, num_splits)
    kernel = functools.partial(_fwd_kernel, N=N, Ds=Ds, Dt=Dt, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                               svm=student_vocab_major, tvm=teacher_vocab_major, student_weights=student_weights,
                               blocks_per_split=per_split)
    stats = pl.pallas_call(
        kernel,
        grid=(n_nb, num_splits),
        out_shape=[jax.ShapeDtypeStruct((num_splits, N), jnp.float32)] * 5,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_kl_fwd",
    )(hs_ND, ws, ht_ND, wt)
    if num_splits == 1:
        return tuple(x[0] for x in stats)
    return common.combine(*stats, student_weights=student_weights)


def _vocab_splits(N: int, V: int, bn: int, bv: int, num_splits: int | None) -> tuple[int, int, int]:
    """(token blocks, vocabulary splits, vocabulary blocks per split): by default enough splits that the grid has
    about _TARGET_PROGRAMS programs; never an empty split."""
    n_nb, n_vb = pl.cdiv(N, bn), pl.cdiv(V, bv)
    if num_splits is None:
        num_splits = max(1, min(n_vb, -(-_TARGET_PROGRAMS // n_nb)))
    per_split = -(-n_vb // num_splits)
    return n_nb, -(-n_vb // per_split), per_split


def _jsd_kernel(lse_s_ref, lse_t_ref, hs_ref, ws_ref, ht_ref, wt_ref, pm_ref, qm_ref, *, beta, blocks_per_split,
                **kw):
    i, split = pl.program_id(0), pl.program_id(1)
    N, V, bn, bv = kw["N"], kw["V"], kw["bn"], kw["bv"]
    r0 = i * bn
    rmask = r0 + jnp.arange(bn) < N
    first = split * blocks_per_split
    n_blocks = jnp.minimum(blocks_per_split, pl.cdiv(V, bv) - first)
    lse_s = plgpu.load(lse_s_ref.at[pl.ds(r0, bn)], mask=rmask, other=0.0)[:, None]
    lse_t = plgpu.load(lse_t_ref.at[pl.ds(r0, bn)], mask=rmask, other=0.0)[:, None]

    def vstep(jj, carry):
        v0 = (first + jj) * bv
        zs, zt = _tiles(hs_ref, ws_ref, ht_ref, wt_ref, r0, v0, **kw)
        valid = (v0 + jnp.arange(bv))[None, :] < V
        pm, qm = common.jsd_block_sums(zs, zt, lse_s, lse_t, beta=beta, valid=valid)
        return carry[0] + pm, carry[1] + qm

    zeros = jnp.zeros((bn, 1), jnp.float32)
    sums = jax.lax.fori_loop(0, n_blocks, vstep, (zeros, zeros))
    for ref, x in zip((pm_ref, qm_ref), sums):
        plgpu.store(ref.at[split, pl.ds(r0, bn)], x[:, 0], mask=rmask)


def jsd_sums(hs_ND, ws, ht_ND, wt, lse_s_N, lse_t_N, *, beta: float, inv_temp: float = 1.0,
             student_vocab_major: bool = False, teacher_vocab_major: bool = False, block_n=None, block_v=None,
             block_d=None, num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
             interpret: bool = False):
    """The JSD's second pass: (sum_v p (lp - lm), sum_v q (lq - lm)), each float32 [N], over all columns of ws / wt,
    given both models' log-sum-exps over the whole vocabulary (see `common`)."""
    N, Ds, Dt, V, bn, bv, bd = _dims(hs_ND, ws, ht_ND, student_vocab_major, block_n, block_v, block_d)
    n_nb, num_splits, per_split = _vocab_splits(N, V, bn, bv, num_splits)
    kernel = functools.partial(_jsd_kernel, N=N, Ds=Ds, Dt=Dt, V=V, bn=bn, bv=bv, bd=bd, inv_temp=inv_temp,
                               svm=student_vocab_major, tvm=teacher_vocab_major, beta=beta,
                               blocks_per_split=per_split)
    sums = pl.pallas_call(
        kernel,
        grid=(n_nb, num_splits),
        out_shape=[jax.ShapeDtypeStruct((num_splits, N), jnp.float32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_kl_jsd",
    )(lse_s_N.astype(jnp.float32), lse_t_N.astype(jnp.float32), hs_ND, ws, ht_ND, wt)
    return tuple(jnp.sum(x, axis=0) for x in sums)


def _dz_kernel(lse_s_ref, lse_t_ref, mom_ref, g_ref, hs_ref, ws_ref, ht_ref, wt_ref, dz_ref, *, kind, beta, **kw):
    i, j = pl.program_id(0), pl.program_id(1)
    N, V, bn, bv = kw["N"], kw["V"], kw["bn"], kw["bv"]
    r0, v0 = i * bn, j * bv
    rmask = r0 + jnp.arange(bn) < N

    def vec(ref):
        return plgpu.load(ref.at[pl.ds(r0, bn)], mask=rmask, other=0.0)[:, None]

    zs, zt = _tiles(hs_ref, ws_ref, ht_ref, wt_ref, r0, v0, **kw)
    valid = (v0 + jnp.arange(bv))[None, :] < V
    dz = common.dlogits(zs, zt, vec(lse_s_ref), vec(lse_t_ref), vec(mom_ref), vec(g_ref), kind=kind,
                        inv_temp=kw["inv_temp"], beta=beta, valid=valid)
    plgpu.store(dz_ref.at[pl.ds(r0, bn), pl.ds(v0, bv)], dz.astype(dz_ref.dtype), mask=rmask[:, None] & valid)


def dlogits(hs_ND, ws_c, ht_ND, wt_c, vecs, *, kind, inv_temp, student_vocab_major, teacher_vocab_major,
            beta: float = 0.5, block_n=None, block_v=None, block_d=None, num_warps: int = 4, num_stages: int = 3,
            interpret: bool = False):
    """The student's g * d div / d(h_s W_s) on the columns of this chunk (ws_c, wt_c): [N, C] in h_s's dtype."""
    N, Ds, Dt, V, bn, bv, bd = _dims(hs_ND, ws_c, ht_ND, student_vocab_major, block_n, block_v, block_d)
    kernel = functools.partial(_dz_kernel, kind=kind, beta=beta, N=N, Ds=Ds, Dt=Dt, V=V, bn=bn, bv=bv, bd=bd,
                               inv_temp=inv_temp, svm=student_vocab_major, tvm=teacher_vocab_major)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(N, bn), pl.cdiv(V, bv)),
        out_shape=jax.ShapeDtypeStruct((N, V), hs_ND.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_kl_dz",
    )(*vecs, hs_ND, ws_c, ht_ND, wt_c)


def grads(hs_ND, ws, ht_ND, wt, lse_s_N, lse_t_N, moment_N, g_N, *, kind: str, inv_temp: float = 1.0,
          beta: float = 0.5, student_vocab_major: bool = False, teacher_vocab_major: bool = False, dh_dtype=None,
          dw_dtype=None, block_n=None, block_v=None, block_d=None,
          chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES, interpret: bool = False):
    """(dh_s [N, D_s], dw_s shaped like ws) of sum_n g_n div_n; lse_s, lse_t, moment are the forward's stats (global
    over vocabulary shards); `beta` is used by kind "jsd" only."""
    common.check_kind(kind)
    N, Ds, _, V, _, bv, _ = _dims(hs_ND, ws, ht_ND, student_vocab_major, block_n, block_v, block_d)
    C = chunk_columns(N, V, jnp.dtype(hs_ND.dtype).itemsize, chunk_budget_bytes, bv)
    vecs = [x.astype(jnp.float32) for x in (lse_s_N, lse_t_N, moment_N, g_N)]
    kw = dict(kind=kind, inv_temp=inv_temp, beta=beta, student_vocab_major=student_vocab_major,
              teacher_vocab_major=teacher_vocab_major, block_n=block_n, block_v=block_v, block_d=block_d,
              interpret=interpret)
    s_axis, t_axis = (0 if student_vocab_major else 1), (0 if teacher_vocab_major else 1)

    def chunk_grads(ws_c, wt_c):
        dz_NC = dlogits(hs_ND, ws_c, ht_ND, wt_c, vecs, **kw)
        if student_vocab_major:  # ws_c [C, D]
            dh = jnp.dot(dz_NC, ws_c, preferred_element_type=jnp.float32)
            dw_c = jnp.dot(dz_NC.T, hs_ND, preferred_element_type=jnp.float32)
        else:  # ws_c [D, C]
            dh = jnp.dot(dz_NC, ws_c.T, preferred_element_type=jnp.float32)
            dw_c = jnp.dot(hs_ND.T, dz_NC, preferred_element_type=jnp.float32)
        return dh, dw_c.astype(dw_dtype or ws.dtype)

    n_full, rem = divmod(V, C)
    dh_ND = jnp.zeros((N, Ds), jnp.float32)
    dw = jnp.zeros(ws.shape, dw_dtype or ws.dtype)
    if n_full:
        def body(carry, c):
            dh_ND, dw = carry
            v0 = c * C
            dh_c, dw_c = chunk_grads(jax.lax.dynamic_slice_in_dim(ws, v0, C, axis=s_axis),
                                     jax.lax.dynamic_slice_in_dim(wt, v0, C, axis=t_axis))
            return (dh_ND + dh_c, jax.lax.dynamic_update_slice_in_dim(dw, dw_c, v0, axis=s_axis)), None

        (dh_ND, dw), _ = jax.lax.scan(body, (dh_ND, dw), jnp.arange(n_full))
    if rem:  # the ragged last chunk: a static slice, no padding of W
        v0 = n_full * C
        dh_c, dw_c = chunk_grads(jax.lax.slice_in_dim(ws, v0, V, axis=s_axis),
                                 jax.lax.slice_in_dim(wt, v0, V, axis=t_axis))
        dh_ND = dh_ND + dh_c
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, v0, axis=s_axis)
    return dh_ND.astype(dh_dtype or hs_ND.dtype), dw
