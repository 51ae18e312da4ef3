"""The Pallas path of `token_kl`: a custom VJP around the kernels of `kernels/fused_kl`, vocab-parallel.

Kinds "forward" and "reverse" take one pass: per token, the student's and the teacher's online softmax and one online
moment (five stats), from which the divergence and both log-sum-exps follow. Kind "jsd" takes two: the same stats
kernel for the two log-sum-exps, then `jsd_sums` for KL(p || m) and KL(q || m) given them (kernels/fused_kl/common.py
has the formulas). The forward pass keeps, per token, both log-sum-exps and the moment of the gradient (the
divergence itself for reverse, KL(q || m) for jsd); the backward pass recomputes both models' logit tiles from them.
Gradients flow to the student (h_s, W_s) only: the teacher's cotangents are zeros, which XLA drops (`token_kl` puts
the teacher behind `stop_gradient` anyway).

Under a mesh (`jax.set_mesh`), as in jaxpost/ops/fused.py: tokens are split over the batch axes (data, fsdp) and the
vocabulary of both unembeddings over `tensor` with `jax.shard_map`. Each device runs the kernels on its own
[N_local, D] x [D, V_local] blocks; the five partial stats are combined across the vocabulary shards (one pmax of the
two maxima, one psum of the re-based sums, `common.rebase`), the JSD's two sums with one more psum. In the backward
pass each device forms dz for its vocabulary slice from the global per-token stats; dh_s is summed over the
vocabulary shards and dW_s over the token shards. Nothing of size [N, V] crosses devices. On CPU the kernels run in
Pallas interpret mode (tests only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpost.ops.fused import mesh_axes
from kernels.fused_kl import common

KERNELS = ("pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class FusedKLSpec:
    """Static description of one fused KL call (hashable: a nondiff argument of the custom VJP)."""
    kernel: str  # "pallas_tpu" | "pallas_gpu"
    kind: str  # "forward" | "reverse" | "jsd"
    inv_temp: float
    student_vocab_major: bool
    teacher_vocab_major: bool
    interpret: bool
    beta: float = 0.5  # kind "jsd" only
    chunk_budget_bytes: int | None = None  # GPU backward: bound on the [N, chunk] dz tile
    mesh: Any = None  # the abstract mesh to shard_map over, or None
    token_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()


def _module(spec: FusedKLSpec):
    if spec.kernel == "pallas_tpu":
        from kernels.fused_kl import tpu
        return tpu
    from kernels.fused_kl import gpu
    return gpu


def _layout(spec: FusedKLSpec):
    return dict(inv_temp=spec.inv_temp, student_vocab_major=spec.student_vocab_major,
                teacher_vocab_major=spec.teacher_vocab_major, interpret=spec.interpret)


def _axis(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _combine_shards(stats, axes, *, student_weights: bool):
    """The five stats of this device's vocabulary slice -> those of the whole vocabulary (a cross-device combine)."""
    ms, ls, mt, lt, acc = stats
    ms_all, mt_all = jax.lax.pmax(jnp.stack([ms, mt]), axes)
    parts = common.rebase(ms, ls, mt, lt, acc, ms_all, mt_all, student_weights=student_weights)
    ls, lt, acc = jax.lax.psum(jnp.stack(parts), axes)
    return ms_all, ls, mt_all, lt, acc


def _local_fwd(spec: FusedKLSpec, hs_ND, ws, ht_ND, wt):
    """(div, lse_s, lse_t, moment), float32 [N_local], global over the vocabulary shards."""
    mod = _module(spec)
    online = "forward" if spec.kind == "jsd" else spec.kind  # jsd's first pass needs only the log-sum-exps
    student_weights = common.weights_student(online)
    stats = mod.partial_stats(hs_ND, ws, ht_ND, wt, kind=online, **_layout(spec))
    if spec.vocab_axes:
        stats = _combine_shards(stats, spec.vocab_axes, student_weights=student_weights)
    div, lse_s, lse_t = common.finish(*stats, student_weights=student_weights)
    if spec.kind != "jsd":
        return div, lse_s, lse_t, div
    kl_pm, kl_qm = mod.jsd_sums(hs_ND, ws, ht_ND, wt, lse_s, lse_t, beta=spec.beta, **_layout(spec))
    if spec.vocab_axes:
        kl_pm, kl_qm = jax.lax.psum(jnp.stack([kl_pm, kl_qm]), spec.vocab_axes)
    div, moment = common.jsd_finish(kl_pm, kl_qm, beta=spec.beta)
    return div, lse_s, lse_t, moment


def _local_bwd(spec: FusedKLSpec, hs_ND, ws, ht_ND, wt, lse_s, lse_t, moment, g_N):
    kw = {} if spec.chunk_budget_bytes is None or spec.kernel != "pallas_gpu" else {
        "chunk_budget_bytes": spec.chunk_budget_bytes}
    dh, dw = _module(spec).grads(
        hs_ND, ws, ht_ND, wt, lse_s, lse_t, moment, g_N, kind=spec.kind, beta=spec.beta, **_layout(spec),
        dh_dtype=jnp.float32 if spec.vocab_axes else None, dw_dtype=jnp.float32 if spec.token_axes else None, **kw)
    if spec.vocab_axes:
        dh = jax.lax.psum(dh, spec.vocab_axes)
    if spec.token_axes:
        dw = jax.lax.psum(dw, spec.token_axes)
    return dh.astype(hs_ND.dtype), dw.astype(ws.dtype)


def _specs(spec: FusedKLSpec):
    """PartitionSpecs of (h_s, W_s, h_t, W_t, per-token vectors)."""
    tok, voc = _axis(spec.token_axes), _axis(spec.vocab_axes)

    def w_spec(vocab_major):
        return P(voc, None) if vocab_major else P(None, voc)

    h = P(tok, None)
    return h, w_spec(spec.student_vocab_major), h, w_spec(spec.teacher_vocab_major), P(tok)


def _run_fwd(spec, hs_ND, ws, ht_ND, wt):
    if spec.mesh is None:
        return _local_fwd(spec, hs_ND, ws, ht_ND, wt)
    *in_specs, v_spec = _specs(spec)
    return jax.shard_map(functools.partial(_local_fwd, spec), mesh=spec.mesh, in_specs=tuple(in_specs),
                         out_specs=(v_spec,) * 4, check_vma=False)(hs_ND, ws, ht_ND, wt)


def _run_bwd(spec, hs_ND, ws, ht_ND, wt, *vecs):
    if spec.mesh is None:
        return _local_bwd(spec, hs_ND, ws, ht_ND, wt, *vecs)
    hs_spec, ws_spec, ht_spec, wt_spec, v_spec = _specs(spec)
    return jax.shard_map(functools.partial(_local_bwd, spec), mesh=spec.mesh,
                         in_specs=(hs_spec, ws_spec, ht_spec, wt_spec) + (v_spec,) * len(vecs),
                         out_specs=(hs_spec, ws_spec), check_vma=False)(hs_ND, ws, ht_ND, wt, *vecs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_token_kl(hs_ND, ws, ht_ND, wt, spec: FusedKLSpec):
    """Per-token float32 [N] divergence; ws / wt are [D, V], or [V, D] where the spec says vocab-major."""
    return _fwd(hs_ND, ws, ht_ND, wt, spec)[0]


def _fwd(hs_ND, ws, ht_ND, wt, spec):
    div, lse_s, lse_t, moment = _run_fwd(spec, hs_ND, ws, ht_ND, wt)
    return div, (hs_ND, ws, ht_ND, wt, lse_s, lse_t, moment)


def _bwd(spec, res, g_N):
    hs_ND, ws, ht_ND, wt, lse_s, lse_t, moment = res
    dh, dw = _run_bwd(spec, hs_ND, ws, ht_ND, wt, lse_s, lse_t, moment, g_N.astype(jnp.float32))
    return dh, dw, jnp.zeros_like(ht_ND), jnp.zeros_like(wt)


fused_token_kl.defvjp(_fwd, _bwd)


def make_spec(kernel: str, *, N: int, V: int, kind: str, beta: float = 0.5, temperature: float,
              student_vocab_major: bool, teacher_vocab_major: bool, chunk_budget_bytes: int | None) -> FusedKLSpec:
    """The spec for the current backend and mesh: interpret mode on CPU; a shard_map when a mesh of more than one
    device is set (tokens over the batch axes, the vocabulary over the vocab axis, where they divide N and V)."""
    if kernel not in KERNELS:
        raise ValueError(f"fused_token_kl: kernel must be one of {KERNELS}, got {kernel!r}")
    common.check_kind(kind)
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"fused_token_kl: jsd needs 0 < beta < 1 (token_kl maps 0 and 1 to the KLs), got {beta}")
    mesh, token_axes, vocab_axes = mesh_axes(N, V)
    return FusedKLSpec(kernel=kernel, kind=kind, inv_temp=1.0 / temperature, student_vocab_major=student_vocab_major,
                       teacher_vocab_major=teacher_vocab_major, interpret=jax.default_backend() == "cpu",
                       beta=float(beta) if kind == "jsd" else 0.5, chunk_budget_bytes=chunk_budget_bytes, mesh=mesh,
                       token_axes=token_axes, vocab_axes=vocab_axes)
