"""Fused token-KL kernels for TPU (Pallas Mosaic). Run on CPU with `interpret=True` for tests.

The structure of kernels/fused_logprobs/tpu.py (whose tiling helpers it reuses), with two models per tile:

Forward (`partial_stats`): grid (token blocks, vocabulary blocks), vocabulary innermost and sequential ("arbitrary").
Each step computes the student's [bn, bv] tile h_s @ W_s[:, blk] and the teacher's h_t @ W_t[:, blk] in VMEM, folds
both into the five online stats of `common.block_update` (VMEM scratch across vocabulary blocks) and writes them at
the last block. No logit reaches HBM. The JSD's second pass (`jsd_sums`) has the same grid and recomputes both tiles,
given the log-sum-exps of the first, into its two plain sums (`common.jsd_block_sums`): 4 N V D in its forward.

Backward (`grads`): flash-attention style, two kernels that each recompute both tiles once. `dh`: grid (token blocks,
vocabulary blocks) accumulating dz @ W_s[:, blk]^T into a [bn, D_s] float32 scratch; `dw`: grid (vocabulary blocks,
token blocks) accumulating h_s^T @ dz into a [D_s, bv] scratch, so dW_s is written once per block. In units of
N V D matmuls (D_s = D_t = D): forward 2 (both logits), backward 2 x (2 logits + 1 gradient) = 8 in all, against the
chunked path's 6 (which shares its recomputed tiles between dh and dW through HBM); here no tile leaves VMEM.

Ragged shapes: N and V need not be multiples of the blocks. Edge blocks read past the arrays (NaN in interpret mode):
columns past V are masked in the stats and zeroed in dz, W_s columns past V and h_s rows past N are zeroed before the
gradient matmuls, and writes past the arrays are dropped. W is never padded. Per-token vectors travel as [N, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.fused_kl import common
from kernels.fused_logprobs.tpu import (
    _cols,
    _dot,
    _logit_tile,
    _vmem_limit,
    block_sizes,
)

__all__ = ["block_sizes", "grads", "jsd_sums", "partial_stats"]


def _w_spec(D, bv, vocab_major, order):
    """BlockSpec of a W's vocabulary block; `order` "nv": grid (i, j) = (token, vocab), "vn": (vocab, token)."""
    if order == "nv":
        return pl.BlockSpec((bv, D), lambda i, j: (j, 0)) if vocab_major else pl.BlockSpec((D, bv), lambda i, j: (0, j))
    return pl.BlockSpec((bv, D), lambda j, i: (j, 0)) if vocab_major else pl.BlockSpec((D, bv), lambda j, i: (0, j))


def _h_spec(bn, D, order):
    return pl.BlockSpec((bn, D), (lambda i, j: (i, 0)) if order == "nv" else (lambda j, i: (i, 0)))


def _vec_spec(bn, order):
    return pl.BlockSpec((bn, 1), (lambda i, j: (i, 0)) if order == "nv" else (lambda j, i: (i, 0)))


def _fwd_kernel(hs_ref, ws_ref, ht_ref, wt_ref, ms_ref, ls_ref, mt_ref, lt_ref, acc_ref, *scratch,
                inv_temp, svm, tvm, student_weights, V, bv, n_vblocks):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for k, sc in enumerate(scratch):
            sc[...] = jnp.full(sc.shape, common.NEG_INIT if k in (0, 2) else 0.0, jnp.float32)

    zs = _logit_tile(hs_ref[...], ws_ref[...], inv_temp, svm)
    zt = _logit_tile(ht_ref[...], wt_ref[...], inv_temp, tvm)
    valid = (_cols(j, bv, zs.shape) < V) if V % bv else None
    new = common.block_update(*(sc[...] for sc in scratch), zs, zt, student_weights=student_weights, valid=valid)
    for sc, x in zip(scratch, new):
        sc[...] = x

    @pl.when(j == n_vblocks - 1)
    def _write():
        for ref, sc in zip((ms_ref, ls_ref, mt_ref, lt_ref, acc_ref), scratch):
            ref[...] = sc[...]


def _vocab(w, vocab_major):
    return w.shape[0] if vocab_major else w.shape[1]


def partial_stats(hs_ND, ws, ht_ND, wt, *, kind: str, inv_temp: float = 1.0, student_vocab_major: bool = False,
                  teacher_vocab_major: bool = False, block_n: int | None = None, block_v: int | None = None,
                  interpret: bool = False):
    """Online stats (ms, ls, mt, lt, acc), each float32 [N], over all columns of ws / wt (see `common`)."""
    student_weights = common.weights_student(kind)
    (N, Ds), Dt = hs_ND.shape, ht_ND.shape[1]
    V = _vocab(ws, student_vocab_major)
    bn, bv = block_sizes(N, V, block_n, block_v)
    grid = (pl.cdiv(N, bn), pl.cdiv(V, bv))
    kernel = functools.partial(_fwd_kernel, inv_temp=inv_temp, svm=student_vocab_major, tvm=teacher_vocab_major,
                               student_weights=student_weights, V=V, bv=bv, n_vblocks=grid[1])
    isz = lambda x: jnp.dtype(x.dtype).itemsize
    limit = _vmem_limit(2 * bn * (Ds * isz(hs_ND) + Dt * isz(ht_ND)), 2 * bv * (Ds * isz(ws) + Dt * isz(wt)),
                        6 * bn * bv * 4)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[_h_spec(bn, Ds, "nv"), _w_spec(Ds, bv, student_vocab_major, "nv"),
                  _h_spec(bn, Dt, "nv"), _w_spec(Dt, bv, teacher_vocab_major, "nv")],
        out_specs=[_vec_spec(bn, "nv")] * 5,
        out_shape=[jax.ShapeDtypeStruct((N, 1), jnp.float32)] * 5,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 5,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit),
        interpret=interpret,
        name="fused_kl_fwd",
    )(hs_ND, ws, ht_ND, wt)
    return tuple(o[:, 0] for o in outs)


def _jsd_kernel(lse_s_ref, lse_t_ref, hs_ref, ws_ref, ht_ref, wt_ref, kl_pm_ref, kl_qm_ref, pm_sc, qm_sc, *,
                inv_temp, svm, tvm, beta, V, bv, n_vblocks):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        pm_sc[...] = jnp.zeros(pm_sc.shape, jnp.float32)
        qm_sc[...] = jnp.zeros(qm_sc.shape, jnp.float32)

    zs = _logit_tile(hs_ref[...], ws_ref[...], inv_temp, svm)
    zt = _logit_tile(ht_ref[...], wt_ref[...], inv_temp, tvm)
    valid = (_cols(j, bv, zs.shape) < V) if V % bv else None
    pm, qm = common.jsd_block_sums(zs, zt, lse_s_ref[...], lse_t_ref[...], beta=beta, valid=valid)
    pm_sc[...] += pm
    qm_sc[...] += qm

    @pl.when(j == n_vblocks - 1)
    def _write():
        kl_pm_ref[...] = pm_sc[...]
        kl_qm_ref[...] = qm_sc[...]


def jsd_sums(hs_ND, ws, ht_ND, wt, lse_s_N, lse_t_N, *, beta: float, inv_temp: float = 1.0,
             student_vocab_major: bool = False, teacher_vocab_major: bool = False, block_n: int | None = None,
             block_v: int | None = None, interpret: bool = False):
    """The JSD's second pass: (sum_v p (lp - lm), sum_v q (lq - lm)), each float32 [N], over all columns of ws / wt,
    given both models' log-sum-exps over the whole vocabulary (see `common`)."""
    (N, Ds), Dt = hs_ND.shape, ht_ND.shape[1]
    V = _vocab(ws, student_vocab_major)
    bn, bv = block_sizes(N, V, block_n, block_v)
    grid = (pl.cdiv(N, bn), pl.cdiv(V, bv))
    kernel = functools.partial(_jsd_kernel, inv_temp=inv_temp, svm=student_vocab_major, tvm=teacher_vocab_major,
                               beta=beta, V=V, bv=bv, n_vblocks=grid[1])
    isz = lambda x: jnp.dtype(x.dtype).itemsize
    limit = _vmem_limit(2 * bn * (Ds * isz(hs_ND) + Dt * isz(ht_ND)), 2 * bv * (Ds * isz(ws) + Dt * isz(wt)),
                        8 * bn * bv * 4)
    vecs = [x.astype(jnp.float32)[:, None] for x in (lse_s_N, lse_t_N)]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[_vec_spec(bn, "nv")] * 2 + [_h_spec(bn, Ds, "nv"), _w_spec(Ds, bv, student_vocab_major, "nv"),
                                              _h_spec(bn, Dt, "nv"), _w_spec(Dt, bv, teacher_vocab_major, "nv")],
        out_specs=[_vec_spec(bn, "nv")] * 2,
        out_shape=[jax.ShapeDtypeStruct((N, 1), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit),
        interpret=interpret,
        name="fused_kl_jsd",
    )(*vecs, hs_ND, ws, ht_ND, wt)
    return tuple(o[:, 0] for o in outs)


def _tile_dz(j, vecs, hs, ws, ht, wt, *, inv_temp, svm, tvm, kind, beta, V, bv):
    zs = _logit_tile(hs, ws, inv_temp, svm)
    zt = _logit_tile(ht, wt, inv_temp, tvm)
    valid = (_cols(j, bv, zs.shape) < V) if V % bv else None
    return common.dlogits(zs, zt, *(v[...] for v in vecs), kind=kind, inv_temp=inv_temp, beta=beta, valid=valid)


def _dh_kernel(lse_s, lse_t, mom, g, hs_ref, ws_ref, ht_ref, wt_ref, dh_ref, acc, *, n_vblocks, **kw):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    ws = ws_ref[...]
    dz = _tile_dz(j, (lse_s, lse_t, mom, g), hs_ref[...], ws, ht_ref[...], wt_ref[...], **kw)
    svm, V, bv = kw["svm"], kw["V"], kw["bv"]
    if V % bv:  # W_s columns past V hold garbage: 0 * NaN would spread into dh
        wcols = _cols(j, bv, (1, bv))
        ws = jnp.where(wcols.T < V, ws, 0) if svm else jnp.where(wcols < V, ws, 0)
    acc[...] += _dot(dz.astype(ws.dtype), ws, ((1,), (0,)) if svm else ((1,), (1,)))

    @pl.when(j == n_vblocks - 1)
    def _write():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _dw_kernel(lse_s, lse_t, mom, g, hs_ref, ws_ref, ht_ref, wt_ref, dw_ref, acc, *, N, bn, n_nblocks, **kw):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    hs = hs_ref[...]
    dz = _tile_dz(j, (lse_s, lse_t, mom, g), hs, ws_ref[...], ht_ref[...], wt_ref[...], **kw)
    if N % bn:  # rows past N hold garbage in h_s and in the per-token vectors
        rows = i * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
        hs = jnp.where(rows < N, hs, 0)
        dz = jnp.where(rows < N, dz, 0.0)
    dz = dz.astype(hs.dtype)
    # vocab-major dW block is [bv, D] = dz^T @ h; else [D, bv] = h^T @ dz.
    acc[...] += _dot(dz, hs, ((0,), (0,))) if kw["svm"] else _dot(hs, dz, ((0,), (0,)))

    @pl.when(i == n_nblocks - 1)
    def _write():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def grads(hs_ND, ws, ht_ND, wt, lse_s_N, lse_t_N, moment_N, g_N, *, kind: str, inv_temp: float = 1.0,
          beta: float = 0.5, student_vocab_major: bool = False, teacher_vocab_major: bool = False, dh_dtype=None,
          dw_dtype=None, block_n: int | None = None, block_v: int | None = None, interpret: bool = False):
    """(dh_s [N, D_s], dw_s shaped like ws) of sum_n g_n div_n; lse_s, lse_t, moment are the forward's stats (global
    over vocabulary shards); `beta` is used by kind "jsd" only."""
    common.check_kind(kind)
    (N, Ds), Dt = hs_ND.shape, ht_ND.shape[1]
    V = _vocab(ws, student_vocab_major)
    bn, bv = block_sizes(N, V, block_n, block_v)
    n_nb, n_vb = pl.cdiv(N, bn), pl.cdiv(V, bv)
    vecs = [x.astype(jnp.float32)[:, None] for x in (lse_s_N, lse_t_N, moment_N, g_N)]
    isz = lambda x: jnp.dtype(x.dtype).itemsize
    limit = _vmem_limit(2 * bn * (Ds * isz(hs_ND) + Dt * isz(ht_ND)), 2 * bv * (Ds * isz(ws) + Dt * isz(wt)),
                        bn * Ds * 4, Ds * bv * 4, 8 * bn * bv * 4)
    statics = dict(inv_temp=inv_temp, svm=student_vocab_major, tvm=teacher_vocab_major, kind=kind, beta=beta, V=V,
                   bv=bv)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit)

    def in_specs(order):
        return [_vec_spec(bn, order)] * 4 + [_h_spec(bn, Ds, order), _w_spec(Ds, bv, student_vocab_major, order),
                                             _h_spec(bn, Dt, order), _w_spec(Dt, bv, teacher_vocab_major, order)]

    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **statics, n_vblocks=n_vb),
        grid=(n_nb, n_vb),
        in_specs=in_specs("nv"),
        out_specs=_h_spec(bn, Ds, "nv"),
        out_shape=jax.ShapeDtypeStruct((N, Ds), dh_dtype or hs_ND.dtype),
        scratch_shapes=[pltpu.VMEM((bn, Ds), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="fused_kl_dh",
    )(*vecs, hs_ND, ws, ht_ND, wt)

    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **statics, N=N, bn=bn, n_nblocks=n_nb),
        grid=(n_vb, n_nb),
        in_specs=in_specs("vn"),
        out_specs=_w_spec(Ds, bv, student_vocab_major, "vn"),
        out_shape=jax.ShapeDtypeStruct(ws.shape, dw_dtype or ws.dtype),
        scratch_shapes=[pltpu.VMEM((bv, Ds) if student_vocab_major else (Ds, bv), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="fused_kl_dw",
    )(*vecs, hs_ND, ws, ht_ND, wt)
    return dh, dw
