"""Per-token divergence between a student's and a teacher's next-token distributions over the full vocabulary.

`token_kl` is the KL core of logit distillation: p = softmax(h_t W_t / temperature) (teacher, no gradient),
q = softmax(h_s W_s / temperature) (student), one float32 divergence per token, and no [tokens x vocab] array of
either model outlives its chunk. It dispatches to
- "chunked", pure XLA: a `jax.custom_vjp` scans over token chunks in the forward pass and keeps only per-token stats
  (both models' log-sum-exp and the one moment the gradient needs); the backward pass recomputes both models' logit
  tiles and forms the gradient of the student's logits by hand (derivations in `token_kl`). Like the log-prob core
  (jaxpost/ops/logprobs.py, whose chunk planning it reuses), the backward pass scans over vocabulary chunks when a
  column block fits the budget (dW is written once per block, only the [tokens x D] dh is accumulated), else over
  token chunks (the [D x V] dW is accumulated). The forward pass computes 2 logit blocks per chunk, the backward pass
  4 matmuls (both logits again, dh, dW): 6 N V D matmul-flops against the naive path's 4 (D_s = D_t = D);
- "naive": both full [N, V] logits and autodiff, the reference for tests and benchmarks;
- the Pallas kernels ("pallas_tpu", "pallas_gpu"; kernels/fused_kl, wrapped in jaxpost/ops/fused_kl.py): both
  models' logit tiles live only in on-chip memory, with an online log-sum-exp of each and one online moment over
  vocabulary blocks. "jsd" (whose mixture needs both complete log-sum-exps before the first block is summed) takes a
  second pass over the vocabulary given them. Under a multi-device mesh a shard_map splits the tokens over
  (data, fsdp) and the vocabulary over `tensor`, with a cross-device combine of the per-token stats.
"auto" picks the Pallas kernel on TPU and NVIDIA GPU, "chunked" elsewhere (`default_kl_impl`).
`token_kl_topk` is the sparse variant: forward KL against the teacher's renormalised top-k.

Under a mesh (`jax.set_mesh`) the chunked path lets XLA's partitioner split each chunk's matmuls over the token axes
(data, fsdp) like any other (tested: 8 emulated devices give the single-device values and gradients). A vocabulary
split over `tensor` is not handled natively by the chunked path: its backward pass then scans token chunks (slicing a
sharded vocabulary would gather it, as in the log-prob core), and inside each chunk the partitioner keeps V split and
reduces the per-token stats across devices (no all-gather of W in the compiled CPU program at the tested shapes;
values tested equal). The Pallas path is vocab-parallel by construction (jaxpost/ops/fused_kl.py's shard_map).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxpost.ops.logprobs import (DEFAULT_CHUNK_BUDGET_BYTES, _flat, _from_chunks, _logits, _num_chunks,
                                  _num_vocab_chunks, _scan, _to_chunks)

KL_IMPLS = ("auto", "pallas_tpu", "pallas_gpu", "chunked", "naive")
KINDS = ("forward", "reverse", "jsd")
# Two models' [chunk x V] blocks are alive at once: each gets half the budget, planned like the log-prob core's.
_MODELS_PER_CHUNK = 2


# ---------------------------------------------------------------------------------------------------------------------
# The divergences, on [N, V] blocks of log-probabilities: lp = log p (teacher), lq = log q (student), float32.
# value(lp, lq, beta) -> (div_N, moment_N): the full-vocabulary divergence and the per-token moment its gradient needs.
# dlogits(lp, lq, moment_N, beta) -> d div / d b for the student's scaled logits b = h_s W_s / T, on any column block
#   (everything it needs per token is in moment_N, so the backward pass may slice the vocabulary).

def _forward_value(lp_NV, lq_NV, beta):
    div_N = jnp.sum(jnp.exp(lp_NV) * (lp_NV - lq_NV), axis=-1)
    return div_N, div_N  # the gradient needs no moment


def _forward_dlogits(lp_NV, lq_NV, moment_N, beta):
    return jnp.exp(lq_NV) - jnp.exp(lp_NV)


def _reverse_value(lp_NV, lq_NV, beta):
    div_N = jnp.sum(jnp.exp(lq_NV) * (lq_NV - lp_NV), axis=-1)
    return div_N, div_N


def _reverse_dlogits(lp_NV, lq_NV, kl_N, beta):
    return jnp.exp(lq_NV) * ((lq_NV - lp_NV) - kl_N[:, None])


def _log_mixture(lp_NV, lq_NV, beta):
    """log m, m = beta p + (1 - beta) q (TRL 1.16's mixture), 0 < beta < 1."""
    return jnp.logaddexp(lp_NV + math.log(beta), lq_NV + math.log1p(-beta))


def _jsd_value(lp_NV, lq_NV, beta):
    lm_NV = _log_mixture(lp_NV, lq_NV, beta)
    kl_pm_N = jnp.sum(jnp.exp(lp_NV) * (lp_NV - lm_NV), axis=-1)
    kl_qm_N = jnp.sum(jnp.exp(lq_NV) * (lq_NV - lm_NV), axis=-1)
    return beta * kl_pm_N + (1.0 - beta) * kl_qm_N, kl_qm_N


def _jsd_dlogits(lp_NV, lq_NV, kl_qm_N, beta):
    lm_NV = _log_mixture(lp_NV, lq_NV, beta)
    return (1.0 - beta) * jnp.exp(lq_NV) * ((lq_NV - lm_NV) - kl_qm_N[:, None])


class _Kind(NamedTuple):
    value: Callable
    dlogits: Callable


_KINDS = {"forward": _Kind(_forward_value, _forward_dlogits), "reverse": _Kind(_reverse_value, _reverse_dlogits),
          "jsd": _Kind(_jsd_value, _jsd_dlogits)}


def _resolve_kind(kind: str, beta: float) -> str:
    """TRL 1.16 computes JSD(0) as KL(p || q) and JSD(1) as KL(q || p) (explicit branches, not the formula's limit)."""
    if kind == "jsd" and beta == 0.0:
        return "forward"
    if kind == "jsd" and beta == 1.0:
        return "reverse"
    return kind


# ---------------------------------------------------------------------------------------------------------------------
# token_kl: naive and chunked.

def _stats(hs_ND, ws_DV, ht_ND, wt_DV, inv_temp, kind, beta):
    """Float32 (div, moment, lse_s, lse_t) of N tokens from one [N, V] block of each model's logits."""
    zs_NV = _logits(hs_ND, ws_DV, inv_temp)
    zt_NV = _logits(ht_ND, wt_DV, inv_temp)
    lse_s_N = jax.nn.logsumexp(zs_NV, axis=-1)
    lse_t_N = jax.nn.logsumexp(zt_NV, axis=-1)
    div_N, moment_N = _KINDS[kind].value(zt_NV - lse_t_N[:, None], zs_NV - lse_s_N[:, None], beta)
    return div_N, moment_N, lse_s_N, lse_t_N


def _naive(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta):
    B, T = hs_BTD.shape[:2]
    out = _stats(_flat(hs_BTD), ws_DV, _flat(ht_BTD), wt_DV, 1.0 / temperature, kind, beta)
    return out[0].reshape(B, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _chunked(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta, n_chunks, v_chunks):
    """n_chunks: token chunks (forward, and backward when v_chunks == 0); v_chunks: vocabulary chunks of the
    backward pass (0: use token chunks). The teacher (ht, wt) gets no gradient."""
    out, _ = _chunked_fwd(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta, n_chunks, v_chunks)
    return out


def _chunked_fwd(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta, n_chunks, v_chunks):
    inv_temp = 1.0 / temperature

    def body(_, xs):
        hs_BCD, ht_BCD = xs
        B, C = hs_BCD.shape[:2]
        outs = _stats(_flat(hs_BCD), ws_DV, _flat(ht_BCD), wt_DV, inv_temp, kind, beta)
        return None, tuple(o.reshape(B, C) for o in outs)

    _, outs = _scan(body, None, (_to_chunks(hs_BTD, n_chunks), _to_chunks(ht_BTD, n_chunks)), n_chunks)
    div, moment, lse_s, lse_t = (_from_chunks(o) for o in outs)
    return div, (hs_BTD, ws_DV, ht_BTD, wt_DV, moment, lse_s, lse_t)


def _dlogits(zs_NV, zt_NV, lse_s_N, lse_t_N, moment_N, g_N, inv_temp, kind, beta):
    """g * d div / d (h_s W_s): [N, V] float32 (or a column block of it)."""
    dz_NV = _KINDS[kind].dlogits(zt_NV - lse_t_N[:, None], zs_NV - lse_s_N[:, None], moment_N, beta) * g_N[:, None]
    return dz_NV if inv_temp == 1.0 else dz_NV * inv_temp


def _vocab_chunked_grads(h_ND, w_DV, v_chunks, dz_block):
    """(dh [N, D], dW [D, V]) float32 over `v_chunks` column blocks of the student's unembedding: dz_block(v0, w_DC)
    gives the [N, Vc] logit cotangent of block v0; dh accumulates, each dW block is written once."""
    Vc = w_DV.shape[1] // v_chunks

    def vbody(carry, i):
        dh_ND, dw_DV = carry
        v0 = i * Vc
        w_DC = jax.lax.dynamic_slice_in_dim(w_DV, v0, Vc, axis=1)
        dz_NC = dz_block(v0, w_DC)
        dh_ND = dh_ND + jnp.dot(dz_NC.astype(w_DV.dtype), w_DC.T, preferred_element_type=jnp.float32)
        dw_DC = jnp.dot(h_ND.T, dz_NC.astype(h_ND.dtype), preferred_element_type=jnp.float32)
        return (dh_ND, jax.lax.dynamic_update_slice_in_dim(dw_DV, dw_DC, v0, axis=1)), None

    init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros(w_DV.shape, jnp.float32))
    (dh_ND, dw_DV), _ = _scan(vbody, init, jnp.arange(v_chunks), v_chunks)
    return dh_ND, dw_DV


def _chunked_bwd(temperature, kind, beta, n_chunks, v_chunks, res, g_BT):
    hs_BTD, ws_DV, ht_BTD, wt_DV, moment_BT, lse_s_BT, lse_t_BT = res
    inv_temp = 1.0 / temperature
    V = ws_DV.shape[1]

    if v_chunks:
        hs_ND, ht_ND = _flat(hs_BTD), _flat(ht_BTD)
        per_token = [_flat(x) for x in (lse_s_BT, lse_t_BT, moment_BT, g_BT)]
        Vc = V // v_chunks

        def dz_block(v0, ws_DC):
            wt_DC = jax.lax.dynamic_slice_in_dim(wt_DV, v0, Vc, axis=1)
            return _dlogits(_logits(hs_ND, ws_DC, inv_temp), _logits(ht_ND, wt_DC, inv_temp), *per_token,
                            inv_temp, kind, beta)

        dh_ND, dw_DV = _vocab_chunked_grads(hs_ND, ws_DV, v_chunks, dz_block)
        return dh_ND.reshape(hs_BTD.shape).astype(hs_BTD.dtype), dw_DV.astype(ws_DV.dtype), None, None

    def body(dw_DV, xs):
        hs_BCD, ht_BCD, lse_s_BC, lse_t_BC, moment_BC, g_BC = xs
        B, C = hs_BCD.shape[:2]
        hs_ND = _flat(hs_BCD)
        dz_NV = _dlogits(_logits(hs_ND, ws_DV, inv_temp), _logits(_flat(ht_BCD), wt_DV, inv_temp), _flat(lse_s_BC),
                         _flat(lse_t_BC), _flat(moment_BC), _flat(g_BC), inv_temp, kind, beta)
        dh_ND = jnp.dot(dz_NV.astype(ws_DV.dtype), ws_DV.T, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(hs_ND.T, dz_NV.astype(hs_ND.dtype), preferred_element_type=jnp.float32)
        return dw_DV, dh_ND.reshape(B, C, -1).astype(hs_BCD.dtype)

    chunks = [_to_chunks(x, n_chunks) for x in (hs_BTD, ht_BTD, lse_s_BT, lse_t_BT, moment_BT, g_BT)]
    dw_DV, dh = _scan(body, jnp.zeros(ws_DV.shape, jnp.float32), chunks, n_chunks)
    return _from_chunks(dh), dw_DV.astype(ws_DV.dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _plan(B: int, T: int, V: int, budget_bytes: int, models: int) -> tuple[int, int]:
    """(token chunks, vocabulary chunks of the backward pass; 0: token chunks): the log-prob core's planning with the
    budget shared by the `models` [chunk x V] blocks alive at once."""
    share = budget_bytes // models
    return _num_chunks(B, T, V, share), _num_vocab_chunks(B * T, V, share)


def _token_kl_naive(hs_BTD, ws_DV, ht_BTD, wt_DV, *, temperature, kind, beta, budget, vocab_major):
    return _naive(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta)


def _token_kl_chunked(hs_BTD, ws_DV, ht_BTD, wt_DV, *, temperature, kind, beta, budget, vocab_major):
    B, T = hs_BTD.shape[:2]
    n_chunks, v_chunks = _plan(B, T, ws_DV.shape[1], budget, _MODELS_PER_CHUNK)
    return _chunked(hs_BTD, ws_DV, ht_BTD, wt_DV, temperature, kind, beta, n_chunks, v_chunks)


def _token_kl_pallas(kernel, hs_BTD, ws_DV, ht_BTD, wt_DV, *, temperature, kind, beta, budget, vocab_major):
    """The fused kernels on the flattened tokens, every kind; under a mesh of more than one device, inside a shard_map
    (tokens over the batch axes, the vocabulary over the vocab axis: jaxpost/ops/fused_kl.py)."""
    from jaxpost.ops import fused_kl

    svm, tvm = vocab_major
    # Back to the stored layout: transpose(transpose(W)) should fold to W in XLA, so that the kernel reads the [V, D]
    # table in place (not yet checked in a compiled TPU / GPU program).
    ws, wt = (ws_DV.T if svm else ws_DV), (wt_DV.T if tvm else wt_DV)
    B, T = hs_BTD.shape[:2]
    spec = fused_kl.make_spec(kernel, N=B * T, V=ws_DV.shape[1], kind=kind, beta=beta, temperature=temperature,
                              student_vocab_major=svm, teacher_vocab_major=tvm, chunk_budget_bytes=budget)
    return fused_kl.fused_token_kl(_flat(hs_BTD), ws, _flat(ht_BTD), wt, spec).reshape(B, T)


# impl name -> f(hs_BTD, ws_DV, ht_BTD, wt_DV, *, temperature, kind, beta, budget, vocab_major) -> float32 [B, T];
# vocab_major = (student, teacher): whether each W arrived as [V, D] (ws_DV / wt_DV are then its transpose).
_IMPLS = {"chunked": _token_kl_chunked, "naive": _token_kl_naive,
          "pallas_tpu": functools.partial(_token_kl_pallas, "pallas_tpu"),
          "pallas_gpu": functools.partial(_token_kl_pallas, "pallas_gpu")}


def default_kl_impl(backend: str | None = None) -> str:
    """What impl="auto" picks: the Pallas kernel on TPU and NVIDIA GPU, the chunked XLA path elsewhere."""
    backend = backend or jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend, "chunked")


def _check_common(name, impl, temperature):
    if impl not in KL_IMPLS:
        raise ValueError(f"{name}: impl must be one of {KL_IMPLS}, got {impl!r}")
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _unembed_DV(name, who, hidden, unembed, vocab_major):
    d_axis = 1 if vocab_major else 0
    if unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[d_axis]:
        layout = "[V, D] (vocab_major)" if vocab_major else "[D, V]"
        raise ValueError(f"{name}: {who} hidden {hidden.shape} does not match its unembedding {unembed.shape}, "
                         f"expected {layout}")
    return unembed.T if vocab_major else unembed


def _check_mask(name, mask, tokens_shape):
    if mask is not None and mask.shape != tokens_shape:
        raise ValueError(f"{name}: mask {mask.shape} does not match the tokens {tokens_shape}")


def _apply_mask(div, mask):
    return div if mask is None else jnp.where(mask.astype(bool), div, 0.0)


def token_kl(
    h_student: Float[Array, "*N Ds"],
    w_student: Float[Array, "Ds V"],
    h_teacher: Float[Array, "*N Dt"],
    w_teacher: Float[Array, "Dt V"],
    mask: Float[Array, "*N"] | None = None,
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_vocab_major: bool = False,
    teacher_vocab_major: bool = False,
    impl: str = "auto",
    chunk_budget_bytes: int | None = None,
) -> Float[Array, "*N"]:
    """Per-token divergence between the teacher's p = softmax(h_t W_t / T) and the student's q = softmax(h_s W_s / T).

    h_student [N, D_s] or [B, T, D_s]; w_student [D_s, V] (or [V, D_s] with `student_vocab_major=True`: the tied
    embedding table as stored, no transposed copy); the teacher likewise with its own width D_t and the same V. The
    output is float32, shaped like the leading dims, 0 where `mask` (same shape, bool or 0/1) is 0. The teacher is
    behind `jax.lax.stop_gradient`: gradients flow to h_student and w_student only. Reductions run in float32 whatever
    the input dtype. Nothing is summed over tokens: a loss is sum(div * mask) / its denominator (no T^2 factor is
    applied: Hinton et al. 2015 scale the KD loss by T^2, TRL's GKD does not; multiply outside if wanted).

    kind:
      "forward"  KL(p || q) = sum_v p (log p - log q): standard logit distillation (Hinton et al. 2015, KD);
      "reverse"  KL(q || p) = sum_v q (log q - log p): the mode-seeking direction of on-policy distillation (MiniLLM,
                 Gu et al. 2024, arXiv:2306.08543);
      "jsd"      the generalised JSD of GKD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1) in TRL 1.16's convention
                 (`GKDTrainer.generalized_jsd_loss`): m = beta p + (1 - beta) q,
                 JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), 0 <= beta <= 1 (beta=0.5: the symmetric JSD).
                 Like TRL, beta = 0 returns KL(p || q) and beta = 1 returns KL(q || p) exactly (TRL branches on them);
                 the formula itself tends to 0 at both ends (JSD ~ beta KL(p || q) as beta -> 0 and
                 ~ (1 - beta) KL(q || p) as beta -> 1), so the endpoints are discontinuous by design.

    Gradients (by hand in the chunked backward pass). With b = h_s W_s / T, log q = b - lse(b),
    d log q_v / d b_j = delta_vj - q_j, and d div / d(h_s W_s) = (d div / d b) / T:
      forward:  d/db_j [-sum_v p_v log q_v] = -(p_j - q_j sum_v p_v) = q_j - p_j.
      reverse:  d/db_j sum_v q_v (log q_v - log p_v) = sum_v q_v (delta_vj - q_j)(log q_v - log p_v + 1)
                = q_j ((log q_j - log p_j) - KL(q || p)).
      jsd:      as beta p + (1 - beta) q = m, JSD = beta sum p log p + (1 - beta) sum q log q - sum m log m; with
                d m_v / d b_j = (1 - beta) q_v (delta_vj - q_j):
                d/db_j = (1 - beta) sum_v q_v (delta_vj - q_j) [(log q_v + 1) - (log m_v + 1)]
                = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m)).
    The forward pass keeps per token lse(b), the teacher's log-sum-exp and the moment (KL(q || p) for reverse,
    KL(q || m) for jsd); then dh_s = dz W_s^T and dW_s = h_s^T dz, dz = g * d div / d(h_s W_s), accumulated over chunks.

    impl:
      "auto"        `default_kl_impl()`: "pallas_tpu" on TPU, "pallas_gpu" on GPU, "chunked" elsewhere;
      "pallas_tpu"  the Mosaic TPU kernels of kernels/fused_kl/tpu.py (interpret mode on CPU);
      "pallas_gpu"  the Pallas GPU kernels of kernels/fused_kl/gpu.py (interpret mode on CPU); `chunk_budget_bytes`
                    bounds its backward's [N, chunk] dz tile;
                    both Pallas impls run every kind, and under a multi-device mesh shard tokens over (data, fsdp)
                    and the vocabulary over `tensor` (jaxpost/ops/fused_kl.py);
      "chunked"     pure XLA custom VJP over token / vocabulary chunks whose float32 [chunk x V] temporaries (both
                    models together) stay within `chunk_budget_bytes` (default 64 MiB);
      "naive"       both full [N, V] logits: the reference, for tests and benchmarks only.
    """
    name = "token_kl"
    _check_common(name, impl, temperature)
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta}")
    if h_student.shape[:-1] != h_teacher.shape[:-1] or h_student.ndim not in (2, 3):
        raise ValueError(f"{name}: h_student {h_student.shape} and h_teacher {h_teacher.shape} must share their "
                         f"leading [N] or [B, T] dims")
    _check_mask(name, mask, h_student.shape[:-1])
    ws_DV = _unembed_DV(name, "student", h_student, w_student, student_vocab_major)
    wt_DV = _unembed_DV(name, "teacher", h_teacher, w_teacher, teacher_vocab_major)
    if ws_DV.shape[1] != wt_DV.shape[1]:
        raise ValueError(f"{name}: the student's vocabulary (V={ws_DV.shape[1]}) and the teacher's "
                         f"(V={wt_DV.shape[1]}) differ")
    if impl == "auto":
        impl = default_kl_impl()
    kind = _resolve_kind(kind, float(beta))
    ht, wt_DV = jax.lax.stop_gradient(h_teacher), jax.lax.stop_gradient(wt_DV)
    flat = h_student.ndim == 2
    hs_BTD, ht_BTD = (h_student[None], ht[None]) if flat else (h_student, ht)
    budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
    div = _IMPLS[impl](hs_BTD, ws_DV, ht_BTD, wt_DV, temperature=float(temperature), kind=kind, beta=float(beta),
                       budget=budget, vocab_major=(student_vocab_major, teacher_vocab_major))
    return _apply_mask(div[0] if flat else div, mask)


# ---------------------------------------------------------------------------------------------------------------------
# token_kl_loss: a weighted sum of the per-token divergence, its gradient formed in the forward pass.

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused_loss(hs_BTD, ws_DV, ht_BTD, wt_DV, w_BT, temperature, kind, beta, n_chunks):
    return _fused_loss_fwd(hs_BTD, ws_DV, ht_BTD, wt_DV, w_BT, temperature, kind, beta, n_chunks)[0]


def _fused_loss_fwd(hs_BTD, ws_DV, ht_BTD, wt_DV, w_BT, temperature, kind, beta, n_chunks):
    """One pass over token chunks, each with the whole vocabulary: both models' logits, the divergence, and the
    gradient of sum_n w_n div_n with respect to the student (dh of the chunk, dW accumulated): the residuals."""
    inv_temp = 1.0 / temperature

    def body(dw_DV, xs):
        hs_BCD, ht_BCD, w_BC = xs
        hs_ND = _flat(hs_BCD)
        zs_NV = _logits(hs_ND, ws_DV, inv_temp)
        zt_NV = _logits(_flat(ht_BCD), wt_DV, inv_temp)
        lq_NV = zs_NV - jax.nn.logsumexp(zs_NV, axis=-1)[:, None]
        lp_NV = zt_NV - jax.nn.logsumexp(zt_NV, axis=-1)[:, None]
        div_N, moment_N = _KINDS[kind].value(lp_NV, lq_NV, beta)
        w_N = _flat(w_BC).astype(jnp.float32)
        dz_NV = _KINDS[kind].dlogits(lp_NV, lq_NV, moment_N, beta) * (w_N * inv_temp)[:, None]
        dh_ND = jnp.dot(dz_NV.astype(ws_DV.dtype), ws_DV.T, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(hs_ND.T, dz_NV.astype(hs_ND.dtype), preferred_element_type=jnp.float32)
        return dw_DV, (jnp.sum(div_N * w_N), dh_ND.reshape(*hs_BCD.shape[:2], -1))

    chunks = [_to_chunks(x, n_chunks) for x in (hs_BTD, ht_BTD, w_BT)]
    dw_DV, (sums, dh) = _scan(body, jnp.zeros(ws_DV.shape, jnp.float32), chunks, n_chunks)
    return jnp.sum(sums), (_from_chunks(dh), dw_DV)


def _fused_loss_bwd(temperature, kind, beta, n_chunks, res, g):
    dh_BTD, dw_DV = res
    return g * dh_BTD, g * dw_DV, None, None, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def token_kl_loss(
    h_student: Float[Array, "*N Ds"],
    w_student: Float[Array, "Ds V"],
    h_teacher: Float[Array, "*N Dt"],
    w_teacher: Float[Array, "Dt V"],
    weights: Float[Array, "*N"],
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_vocab_major: bool = False,
    teacher_vocab_major: bool = False,
    chunk_budget_bytes: int | None = None,
) -> Float[Array, ""]:
    """sum_n weights_n div_n, the per-token divergence of `token_kl` (same arguments and conventions) summed with
    detached per-token weights (a loss mask over its denominator, say), with the gradient formed in the same pass.

    The gradient of a per-token divergence is a per-token cotangent times a function of the two logit rows; with the
    weights known up front (the cotangent of the sum is one scalar), one pass over token chunks, each with the whole
    vocabulary, computes both models' logits, the divergence and dz, and from it dh_s and dW_s: 2 NV(D_s + D_t) +
    4 NV D_s flops, naive's, where `token_kl`'s chunked path recomputes both logits in its backward pass (1.5x).
    The [chunk x V] float32 temporaries of both models stay within `chunk_budget_bytes` (default 64 MiB); the
    residuals are dh_s and dW_s themselves (the sizes of h_s and W_s). Pure XLA on every backend.
    """
    name = "token_kl_loss"
    _check_common(name, "chunked", temperature)
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta}")
    if h_student.shape[:-1] != h_teacher.shape[:-1] or h_student.ndim not in (2, 3):
        raise ValueError(f"{name}: h_student {h_student.shape} and h_teacher {h_teacher.shape} must share their "
                         f"leading [N] or [B, T] dims")
    if weights.shape != h_student.shape[:-1]:
        raise ValueError(f"{name}: weights {weights.shape} must have the tokens' shape {h_student.shape[:-1]}")
    ws_DV = _unembed_DV(name, "student", h_student, w_student, student_vocab_major)
    wt_DV = _unembed_DV(name, "teacher", h_teacher, w_teacher, teacher_vocab_major)
    if ws_DV.shape[1] != wt_DV.shape[1]:
        raise ValueError(f"{name}: the student's vocabulary (V={ws_DV.shape[1]}) and the teacher's "
                         f"(V={wt_DV.shape[1]}) differ")
    kind = _resolve_kind(kind, float(beta))
    ht, wt_DV = jax.lax.stop_gradient(h_teacher), jax.lax.stop_gradient(wt_DV)
    w = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    flat = h_student.ndim == 2
    hs_BTD, ht_BTD, w_BT = (h_student[None], ht[None], w[None]) if flat else (h_student, ht, w)
    budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
    B, T = hs_BTD.shape[:2]
    n_chunks, _ = _plan(B, T, ws_DV.shape[1], budget, _MODELS_PER_CHUNK)
    return _fused_loss(hs_BTD, ws_DV, ht_BTD, wt_DV, w_BT, float(temperature), kind, float(beta), n_chunks)


# ---------------------------------------------------------------------------------------------------------------------
# token_kl_topk: the student's log-sum-exp and its p~-weighted logits of K ids per token.

def _topk_stats(h_ND, w_DV, ids_NK, pk_NK, inv_temp):
    """Float32 (sum_k pk_k b[id_k], lse(b)) of N tokens from one [N, V] block of scaled logits b."""
    z_NV = _logits(h_ND, w_DV, inv_temp)
    zk_NK = jnp.take_along_axis(z_NV, ids_NK, axis=-1)
    return jnp.sum(pk_NK * zk_NK, axis=-1), jax.nn.logsumexp(z_NV, axis=-1)


def _naive_topk(h_BTD, w_DV, ids_BTK, pk_BTK, temperature):
    B, T = ids_BTK.shape[:2]
    outs = _topk_stats(_flat(h_BTD), w_DV, _flat(ids_BTK), _flat(pk_BTK), 1.0 / temperature)
    return tuple(o.reshape(B, T) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _topk_chunked(h_BTD, w_DV, ids_BTK, pk_BTK, temperature, n_chunks, v_chunks):
    """(cross, lse): cross = sum_k pk_k b[id_k], lse = logsumexp(b), b = h W / T; pk gets no gradient."""
    out, _ = _topk_chunked_fwd(h_BTD, w_DV, ids_BTK, pk_BTK, temperature, n_chunks, v_chunks)
    return out


def _topk_chunked_fwd(h_BTD, w_DV, ids_BTK, pk_BTK, temperature, n_chunks, v_chunks):
    inv_temp = 1.0 / temperature

    def body(_, xs):
        h_BCD, ids_BCK, pk_BCK = xs
        B, C = h_BCD.shape[:2]
        outs = _topk_stats(_flat(h_BCD), w_DV, _flat(ids_BCK), _flat(pk_BCK), inv_temp)
        return None, tuple(o.reshape(B, C) for o in outs)

    xs = tuple(_to_chunks(x, n_chunks) for x in (h_BTD, ids_BTK, pk_BTK))
    _, outs = _scan(body, None, xs, n_chunks)
    cross, lse = (_from_chunks(o) for o in outs)
    return (cross, lse), (h_BTD, w_DV, ids_BTK, pk_BTK, lse)


def _topk_dlogits(z_NC, ids_NK, pk_NK, lse_N, gc_N, gl_N, inv_temp, v0=0):
    """d(sum gc*cross + gl*lse)/dz on the columns [v0, v0 + C): gl q + gc scatter_ids(pk), times inv_temp."""
    N, C = z_NC.shape
    dz_NC = jnp.exp(z_NC - lse_N[:, None]) * gl_N[:, None]
    local_NK = ids_NK - v0
    local_NK = jnp.where((local_NK >= 0) & (local_NK < C), local_NK, C)  # C: out of this block, dropped
    rows_NK = jnp.broadcast_to(jnp.arange(N)[:, None], ids_NK.shape)
    dz_NC = dz_NC.at[rows_NK, local_NK].add(gc_N[:, None] * pk_NK, mode="drop")
    return dz_NC if inv_temp == 1.0 else dz_NC * inv_temp


def _topk_chunked_bwd(temperature, n_chunks, v_chunks, res, cts):
    h_BTD, w_DV, ids_BTK, pk_BTK, lse_BT = res
    g_cross, g_lse = cts
    inv_temp = 1.0 / temperature

    if v_chunks:
        h_ND = _flat(h_BTD)
        per_token = [_flat(x) for x in (ids_BTK, pk_BTK, lse_BT, g_cross, g_lse)]
        dh_ND, dw_DV = _vocab_chunked_grads(
            h_ND, w_DV, v_chunks, lambda v0, w_DC: _topk_dlogits(_logits(h_ND, w_DC, inv_temp), *per_token, inv_temp,
                                                                 v0))
        return dh_ND.reshape(h_BTD.shape).astype(h_BTD.dtype), dw_DV.astype(w_DV.dtype), None, None

    def body(dw_DV, xs):
        h_BCD, ids_BCK, pk_BCK, lse_BC, gc_BC, gl_BC = xs
        B, C = h_BCD.shape[:2]
        h_ND = _flat(h_BCD)
        dz_NV = _topk_dlogits(_logits(h_ND, w_DV, inv_temp), _flat(ids_BCK), _flat(pk_BCK), _flat(lse_BC),
                              _flat(gc_BC), _flat(gl_BC), inv_temp)
        dh_ND = jnp.dot(dz_NV.astype(w_DV.dtype), w_DV.T, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(h_ND.T, dz_NV.astype(h_ND.dtype), preferred_element_type=jnp.float32)
        return dw_DV, dh_ND.reshape(B, C, -1).astype(h_BCD.dtype)

    chunks = [_to_chunks(x, n_chunks) for x in (h_BTD, ids_BTK, pk_BTK, lse_BT, g_cross, g_lse)]
    dw_DV, dh = _scan(body, jnp.zeros(w_DV.shape, jnp.float32), chunks, n_chunks)
    return _from_chunks(dh), dw_DV.astype(w_DV.dtype), None, None


_topk_chunked.defvjp(_topk_chunked_fwd, _topk_chunked_bwd)


def token_kl_topk(
    h_student: Float[Array, "*N D"],
    w_student: Float[Array, "D V"],
    teacher_topk_logp: Float[Array, "*N K"],
    teacher_topk_ids: Int[Array, "*N K"],
    mask: Float[Array, "*N"] | None = None,
    *,
    temperature: float = 1.0,
    student_vocab_major: bool = False,
    impl: str = "auto",
    chunk_budget_bytes: int | None = None,
) -> Float[Array, "*N"]:
    """Forward KL(p~ || q) against the teacher's top-k (sparse KD): per token, float32, 0 where `mask` is 0.

    Convention: teacher_topk_logp [.., K] are the teacher's log-probabilities (or logits: only differences matter) of
    its K tokens teacher_topk_ids [.., K] (distinct ids in [0, V)), at temperature 1. The teacher is renormalised over
    its top-k at the given temperature, p~_k = softmax_k(teacher_topk_logp / T) (for log-probs of the full softmax
    this is exactly softmax(z_t / T) restricted to those ids and renormalised); entries of -inf (fewer than K tokens)
    get p~ = 0. The student is the full-vocabulary q = softmax(h_s W_s / T), its log-sum-exp computed chunked like
    `token_kl`'s, so
        KL(p~ || q) = sum_k p~_k (log p~_k - log q[id_k]),   log q[id_k] = b[id_k] - lse(b),  b = h_s W_s / T,
    an exact KL (p~ is 0 off the top-k) that equals `token_kl(kind="forward")` when K = V. The teacher's inputs get
    no gradient; d/d(h_s W_s) = (q - scatter_ids(p~)) / T, as in the full forward KL with p~ for p.
    impl: as in `token_kl` (the budget is the student's alone); there is no top-k kernel yet, so "pallas_tpu" and
    "pallas_gpu" (and "auto" on TPU / GPU) run the chunked path.
    """
    name = "token_kl_topk"
    _check_common(name, impl, temperature)
    if teacher_topk_logp.shape != teacher_topk_ids.shape or teacher_topk_logp.shape[:-1] != h_student.shape[:-1]:
        raise ValueError(f"{name}: teacher_topk_logp {teacher_topk_logp.shape} and teacher_topk_ids "
                         f"{teacher_topk_ids.shape} must both be [*N, K] with *N = {h_student.shape[:-1]}")
    if h_student.ndim not in (2, 3):
        raise ValueError(f"{name}: h_student must be [N, D] or [B, T, D], got {h_student.shape}")
    _check_mask(name, mask, h_student.shape[:-1])
    w_DV = _unembed_DV(name, "student", h_student, w_student, student_vocab_major)
    if impl == "auto":
        impl = default_kl_impl()
    temperature = float(temperature)
    lpk = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_topk_logp).astype(jnp.float32) / temperature, axis=-1)
    pk = jnp.where(jnp.isfinite(lpk), jnp.exp(lpk), 0.0)  # a row of only -inf (padding) gives p~ = 0, not NaN
    neg_ent = jnp.sum(jnp.where(pk > 0, pk * lpk, 0.0), axis=-1)  # sum p~ log p~
    flat = h_student.ndim == 2
    expand = (lambda x: x[None]) if flat else (lambda x: x)
    h_BTD, ids_BTK, pk_BTK = expand(h_student), expand(teacher_topk_ids.astype(jnp.int32)), expand(pk)
    if impl == "naive":
        cross, lse = _naive_topk(h_BTD, w_DV, ids_BTK, pk_BTK, temperature)
    else:
        budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
        B, T = h_BTD.shape[:2]
        n_chunks, v_chunks = _plan(B, T, w_DV.shape[1], budget, 1)
        cross, lse = _topk_chunked(h_BTD, w_DV, ids_BTK, pk_BTK, temperature, n_chunks, v_chunks)
    div = neg_ent - (cross[0] if flat else cross) + (lse[0] if flat else lse)  # sum_k p~_k = 1
    return _apply_mask(div, mask)
