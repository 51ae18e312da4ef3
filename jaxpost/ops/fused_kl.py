"""The Pallas path of `token_kl`: a custom VJP around the kernels of `kernels/fused_kl` (kinds "forward", "reverse").

The forward pass keeps, per token, the student's and the teacher's log-sum-exp and the divergence itself (the
reverse gradient's moment); the backward pass recomputes both models' logit tiles from them (kernels/fused_kl/common.py
has the formulas). Gradients flow to the student (h_s, W_s) only: the teacher's cotangents are zeros, which XLA drops
(`token_kl` puts the teacher behind `stop_gradient` anyway).

No mesh handling yet: a `pallas_call` has no SPMD partitioning rule, so under a multi-device mesh XLA would gather
its inputs onto every device; `token_kl` sends such calls to the chunked path instead. A shard_map like
jaxpost/ops/fused.py's (tokens over data/fsdp, vocabulary over tensor with a cross-device combine of the five stats,
`common.combine`) is the next step. On CPU the kernels run in Pallas interpret mode (tests only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels.fused_kl import common

KERNELS = ("pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class FusedKLSpec:
    """Static description of one fused KL call (hashable: a nondiff argument of the custom VJP)."""
    kernel: str  # "pallas_tpu" | "pallas_gpu"
    kind: str  # "forward" | "reverse"
    inv_temp: float
    student_vocab_major: bool
    teacher_vocab_major: bool
    interpret: bool
    chunk_budget_bytes: int | None = None  # GPU backward: bound on the [N, chunk] dz tile


def _module(spec: FusedKLSpec):
    if spec.kernel == "pallas_tpu":
        from kernels.fused_kl import tpu
        return tpu
    from kernels.fused_kl import gpu
    return gpu


def _layout(spec: FusedKLSpec):
    return dict(kind=spec.kind, inv_temp=spec.inv_temp, student_vocab_major=spec.student_vocab_major,
                teacher_vocab_major=spec.teacher_vocab_major, interpret=spec.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_token_kl(hs_ND, ws, ht_ND, wt, spec: FusedKLSpec):
    """Per-token float32 [N] divergence; ws / wt are [D, V], or [V, D] where the spec says vocab-major."""
    return _fwd(hs_ND, ws, ht_ND, wt, spec)[0]


def _fwd(hs_ND, ws, ht_ND, wt, spec):
    stats = _module(spec).partial_stats(hs_ND, ws, ht_ND, wt, **_layout(spec))
    div, lse_s, lse_t = common.finish(*stats, student_weights=common.weights_student(spec.kind))
    return div, (hs_ND, ws, ht_ND, wt, lse_s, lse_t, div)


def _bwd(spec, res, g_N):
    hs_ND, ws, ht_ND, wt, lse_s, lse_t, div = res
    kw = {} if spec.chunk_budget_bytes is None or spec.kernel != "pallas_gpu" else {
        "chunk_budget_bytes": spec.chunk_budget_bytes}
    dh, dw = _module(spec).grads(hs_ND, ws, ht_ND, wt, lse_s, lse_t, div, g_N, **_layout(spec), **kw)
    return dh, dw, jnp.zeros_like(ht_ND), jnp.zeros_like(wt)


fused_token_kl.defvjp(_fwd, _bwd)


def make_spec(kernel: str, *, kind: str, temperature: float, student_vocab_major: bool, teacher_vocab_major: bool,
              chunk_budget_bytes: int | None) -> FusedKLSpec:
    """The spec for the current backend: interpret mode on CPU."""
    if kernel not in KERNELS:
        raise ValueError(f"fused_token_kl: kernel must be one of {KERNELS}, got {kernel!r}")
    common.weights_student(kind)
    return FusedKLSpec(kernel=kernel, kind=kind, inv_temp=1.0 / temperature, student_vocab_major=student_vocab_major,
                       teacher_vocab_major=teacher_vocab_major, interpret=jax.default_backend() == "cpu",
                       chunk_budget_bytes=chunk_budget_bytes)
