"""The Pallas path of `token_logprobs`: a custom VJP around the kernels of `kernels/fused_logprobs`, vocab-parallel.

Under a mesh (`jax.set_mesh`), tokens are split over the batch axes (data, fsdp) and the vocabulary over `tensor`
with `jax.shard_map`. Each device runs the kernel on its own [N_local, D] x [D, V_local] block and the partial
online-softmax stats are combined across the vocabulary shards with one pmax and three psums of [N_local] vectors
(a cross-device log-sum-exp). In the backward pass each device forms dz for its vocabulary slice, dh is summed over
the vocabulary shards and dW over the token shards. Nothing of size [N, V] crosses devices.

Without a mesh, the kernel runs on the whole arrays. On CPU the kernels run in Pallas interpret mode (tests only:
each grid step costs ~0.3 ms).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.fused_logprobs import common

KERNELS = ("pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class FusedSpec:
    """Static description of one fused call (hashable: a nondiff argument of the custom VJP)."""
    kernel: str  # "pallas_tpu" | "pallas_gpu"
    inv_temp: float
    entropy: bool
    vocab_major: bool
    interpret: bool
    mesh: Any = None  # the abstract mesh to shard_map over, or None
    token_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()
    chunk_budget_bytes: int | None = None  # GPU backward: bound on the [N, chunk] dz tile


def _module(spec: FusedSpec):
    if spec.kernel == "pallas_tpu":
        from kernels.fused_logprobs import tpu
        return tpu
    from kernels.fused_logprobs import gpu
    return gpu


def _axis(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _shift_targets(spec: FusedSpec, w, t_N):
    """Targets relative to this device's vocabulary slice (out of range: held by another shard)."""
    if not spec.vocab_axes:
        return t_N
    v_local = w.shape[0] if spec.vocab_major else w.shape[1]
    return t_N - jax.lax.axis_index(spec.vocab_axes) * v_local


def _local_fwd(spec: FusedSpec, h_ND, w, t_N):
    m, l, s, zt = _module(spec).partial_stats(
        h_ND, w, _shift_targets(spec, w, t_N), inv_temp=spec.inv_temp, vocab_major=spec.vocab_major,
        entropy=spec.entropy, interpret=spec.interpret)
    if spec.vocab_axes:  # cross-device log-sum-exp over the vocabulary shards
        ax = spec.vocab_axes
        m_all = jax.lax.pmax(m, ax)
        c = jnp.exp(m - m_all)
        l, s, zt = (jax.lax.psum(c * l, ax), jax.lax.psum(c * (s + (m - m_all) * l), ax), jax.lax.psum(zt, ax))
        m = m_all
    return common.finish(m, l, s, zt)


def _local_bwd(spec: FusedSpec, h_ND, w, t_N, lse_N, ez_N, glp_N, gl_N, ge_N):
    kw = {} if spec.chunk_budget_bytes is None or spec.kernel != "pallas_gpu" else {
        "chunk_budget_bytes": spec.chunk_budget_bytes}
    dh, dw = _module(spec).grads(
        h_ND, w, _shift_targets(spec, w, t_N), lse_N, ez_N, glp_N, gl_N, ge_N, inv_temp=spec.inv_temp,
        vocab_major=spec.vocab_major, dh_dtype=jnp.float32 if spec.vocab_axes else None,
        dw_dtype=jnp.float32 if spec.token_axes else None, interpret=spec.interpret, **kw)
    if spec.vocab_axes:
        dh = jax.lax.psum(dh, spec.vocab_axes)
    if spec.token_axes:
        dw = jax.lax.psum(dw, spec.token_axes)
    return dh.astype(h_ND.dtype), dw.astype(w.dtype)


def _specs(spec: FusedSpec):
    tok, voc = _axis(spec.token_axes), _axis(spec.vocab_axes)
    return P(tok, None), (P(voc, None) if spec.vocab_major else P(None, voc)), P(tok)


def _run_fwd(spec, h_ND, w, t_N):
    if spec.mesh is None:
        return _local_fwd(spec, h_ND, w, t_N)
    h_spec, w_spec, v_spec = _specs(spec)
    return jax.shard_map(functools.partial(_local_fwd, spec), mesh=spec.mesh, in_specs=(h_spec, w_spec, v_spec),
                         out_specs=(v_spec,) * 3, check_vma=False)(h_ND, w, t_N)


def _run_bwd(spec, h_ND, w, t_N, lse_N, ez_N, glp_N, gl_N, ge_N):
    if spec.mesh is None:
        return _local_bwd(spec, h_ND, w, t_N, lse_N, ez_N, glp_N, gl_N, ge_N)
    h_spec, w_spec, v_spec = _specs(spec)
    vecs = (lse_N, ez_N, glp_N, gl_N) + ((ge_N,) if ge_N is not None else ())

    def local(h, w, t, *vecs):
        ge = vecs[4] if len(vecs) == 5 else None
        return _local_bwd(spec, h, w, t, *vecs[:4], ge)

    return jax.shard_map(local, mesh=spec.mesh, in_specs=(h_spec, w_spec, v_spec) + (v_spec,) * len(vecs),
                         out_specs=(h_spec, w_spec), check_vma=False)(h_ND, w, t_N, *vecs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_logprobs(h_ND, w, t_N, spec: FusedSpec):
    """(logp, lse, entropy | None), float32 [N]; w is [D, V] or, with spec.vocab_major, [V, D]."""
    return _fused_fwd(h_ND, w, t_N, spec)[0]


def _fused_fwd(h_ND, w, t_N, spec):
    logp, lse, ent = _run_fwd(spec, h_ND, w, t_N)
    ez = lse - ent if spec.entropy else lse  # E_p[z]; unused without an entropy cotangent
    return (logp, lse, ent if spec.entropy else None), (h_ND, w, t_N, lse, ez)


def _fused_bwd(spec, res, cts):
    h_ND, w, t_N, lse_N, ez_N = res
    glp, gl, ge = cts
    dh, dw = _run_bwd(spec, h_ND, w, t_N, lse_N, ez_N, glp, gl, ge if spec.entropy else None)
    return dh, dw, None


fused_logprobs.defvjp(_fused_fwd, _fused_bwd)


def mesh_axes(N: int, V: int):
    """(mesh, token axes, vocabulary axes) of a vocab-parallel shard_map under the current mesh: tokens over the batch
    axes and the vocabulary over the vocab axis where they divide; (None, (), ()) without a mesh of several devices."""
    from jaxpost.sharding import ACTIVATION_RULES, PARAM_RULES, logical_to_spec

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None, (), ()

    def axes(entry):
        return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))

    return (mesh, axes(logical_to_spec(("batch",), ACTIVATION_RULES, mesh, (N,))[0]),
            axes(logical_to_spec(("vocab",), PARAM_RULES, mesh, (V,))[0]))


def make_spec(kernel: str, *, N: int, V: int, temperature: float, entropy: bool, vocab_major: bool,
              chunk_budget_bytes: int | None) -> FusedSpec:
    """The spec for the current backend and mesh: interpret mode on CPU; shard_map when a mesh with more than one
    device is set, tokens over the batch axes and the vocabulary over the vocab axis where they divide."""
    mesh, token_axes, vocab_axes = mesh_axes(N, V)
    return FusedSpec(kernel=kernel, inv_temp=1.0 / temperature, entropy=entropy, vocab_major=vocab_major,
                     interpret=jax.default_backend() == "cpu", mesh=mesh, token_axes=token_axes,
                     vocab_axes=vocab_axes, chunk_budget_bytes=chunk_budget_bytes)
