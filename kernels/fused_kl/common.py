"""Math shared by the fused KL kernels and their wrapper (plain jnp, usable inside and outside kernels).

Both models' logits are streamed over vocabulary blocks (b_s = h_s W_s / T for the student, b_t = h_t W_t / T for the
teacher). Per token the pass keeps five float32 numbers: each model's online softmax (m = running max, l = sum
exp(b - m), as in flash attention) and one moment weighted by the distribution `a` the divergence is an expectation
over (a = the teacher p for kind "forward", the student q for "reverse"; `o` is the other model):

    acc = sum_v exp(b_a - m_a) * ((b_a - m_a) - (b_o - m_o))

Keeping the moment relative to both running maxima (re-based when a maximum moves, like the entropy moment of the
log-prob core) avoids the cancellation of E_a[b_a - b_o] against lse_a - lse_o when logits are large. At the end

    KL(a || o) = E_a[log a - log o] = acc / l_a - log l_a + log l_o,

which is KL(p || q) for "forward" and KL(q || p) for "reverse"; the reverse gradient's moment is that same KL.
Partial stats over disjoint vocabulary slices combine exactly: `rebase` brings one slice's stats to the global
maxima, whose sum over the slices (`combine` on stacked slices, a psum over devices under a mesh) is the whole.

The generalised JSD (GKD, TRL's convention: m = beta p + (1 - beta) q, JSD(beta) = beta KL(p || m)
+ (1 - beta) KL(q || m), 0 < beta < 1) needs log m = logaddexp(log beta + lp, log(1 - beta) + lq) per logit, i.e.
both complete log-sum-exps before the first block is summed: not a one-pass online reduction. It runs in two passes:
pass 1 is the stats kernel above (kind "forward"; only the log-sum-exps are used), pass 2 sums, per token over
vocabulary blocks given the log-sum-exps, the two plain (not online) sums of `jsd_block_sums`

    kl_pm = sum_v p (lp - lm),   kl_qm = sum_v q (lq - lm),   JSD = beta kl_pm + (1 - beta) kl_qm,

which add up over vocabulary slices and devices as they are. KL(q || m) is the moment of the JSD gradient.

Backward, per logit, with lq = b_s - lse_s, lp = b_t - lse_t, g the per-token cotangent (b = h W / T):
    forward:  dz = g (q - p) / T
    reverse:  dz = g q ((lq - lp) - KL(q || p)) / T
    jsd:      dz = g (1 - beta) q ((lq - lm) - KL(q || m)) / T
Derivation of the jsd line: beta p + (1 - beta) q = m, so JSD = beta sum p lp + (1 - beta) sum q lq - sum m lm; only
q depends on b_s, d q_v / d b_j = q_v (delta_vj - q_j), d m_v / d b_j = (1 - beta) q_v (delta_vj - q_j), hence
    d JSD / d b_j = (1 - beta) sum_v q_v (delta_vj - q_j) [(lq_v + 1) - (lm_v + 1)]
                  = (1 - beta) q_j ((lq_j - lm_j) - sum_v q_v (lq_v - lm_v)) = (1 - beta) q_j ((lq_j - lm_j) - kl_qm).
Each is a function of the tile and three per-token scalars (lse_s, lse_t, the moment), so the backward recomputes
tiles anywhere, on any vocabulary slice (checked against autodiff of reference.py in test_fused_kl.py).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

KERNEL_KINDS = ("forward", "reverse", "jsd")
ONLINE_KINDS = ("forward", "reverse")  # one-pass kinds of `block_update`; "jsd" adds a second pass
# A finite start for the running maxima: (m - m_new) * l stays 0, not NaN, before the first block.
NEG_INIT = -1e30


def check_kind(kind: str) -> str:
    if kind not in KERNEL_KINDS:
        raise ValueError(f"fused_kl: kind must be one of {KERNEL_KINDS}, got {kind!r}")
    return kind


def weights_student(kind: str) -> bool:
    """Whether the one-pass divergence is an expectation over the student q (reverse) rather than the teacher p
    (forward)."""
    if kind not in ONLINE_KINDS:
        raise ValueError(f"fused_kl: the one-pass stats take kind {ONLINE_KINDS}, got {kind!r} (jsd: two passes, "
                         f"partial_stats(kind='forward') for the log-sum-exps, then jsd_sums)")
    return kind == "reverse"


def block_update(ms, ls, mt, lt, acc, zs, zt, *, student_weights: bool, valid=None):
    """Fold one [n, v] block of both models' float32 scaled logits into the running stats ([n, 1] each). `valid`
    ([1, v] or [n, v]) masks columns past the vocabulary (None: all valid)."""
    if valid is not None:
        zs = jnp.where(valid, zs, -jnp.inf)
        zt = jnp.where(valid, zt, -jnp.inf)
    ms_new = jnp.maximum(ms, jnp.max(zs, axis=1, keepdims=True))
    mt_new = jnp.maximum(mt, jnp.max(zt, axis=1, keepdims=True))
    cs, ct = jnp.exp(ms - ms_new), jnp.exp(mt - mt_new)
    es, et = jnp.exp(zs - ms_new), jnp.exp(zt - mt_new)
    if student_weights:
        ca, la, ea, shift = cs, ls, es, (ms - ms_new) - (mt - mt_new)
        diff = (zs - ms_new) - (zt - mt_new)
    else:
        ca, la, ea, shift = ct, lt, et, (mt - mt_new) - (ms - ms_new)
        diff = (zt - mt_new) - (zs - ms_new)
    if valid is not None:
        diff = jnp.where(valid, diff, 0.0)
    acc = ca * (acc + shift * la) + jnp.sum(ea * diff, axis=1, keepdims=True)
    ls = cs * ls + jnp.sum(es, axis=1, keepdims=True)
    lt = ct * lt + jnp.sum(et, axis=1, keepdims=True)
    return ms_new, ls, mt_new, lt, acc


def rebase(ms, ls, mt, lt, acc, ms_all, mt_all, *, student_weights: bool):
    """(ls, lt, acc) of one vocabulary slice re-based to the maxima over all slices (ms_all >= ms, mt_all >= mt); the
    sums of these over the slices are the whole vocabulary's."""
    ds, dt = ms - ms_all, mt - mt_all
    cs, ct = jnp.exp(ds), jnp.exp(dt)
    if student_weights:
        acc = cs * (acc + (ds - dt) * ls)
    else:
        acc = ct * (acc + (dt - ds) * lt)
    return cs * ls, ct * lt, acc


def combine(ms_SN, ls_SN, mt_SN, lt_SN, acc_SN, *, student_weights: bool, axis: int = 0):
    """Combine partial stats over disjoint vocabulary slices stacked along `axis`."""
    ms_N, mt_N = jnp.max(ms_SN, axis=axis), jnp.max(mt_SN, axis=axis)
    parts = rebase(ms_SN, ls_SN, mt_SN, lt_SN, acc_SN, jnp.expand_dims(ms_N, axis), jnp.expand_dims(mt_N, axis),
                   student_weights=student_weights)
    ls_N, lt_N, acc_N = (jnp.sum(x, axis=axis) for x in parts)
    return ms_N, ls_N, mt_N, lt_N, acc_N


def finish(ms, ls, mt, lt, acc, *, student_weights: bool):
    """(div, lse_s, lse_t) from complete stats; div is also the moment the backward pass needs."""
    la, lo = (ls, lt) if student_weights else (lt, ls)
    div = acc / la - jnp.log(la) + jnp.log(lo)
    return div, lse(ms, ls), lse(mt, lt)


def lse(m, l):
    return m + jnp.log(l)


def log_mixture(lp, lq, beta: float):
    """log m, m = beta p + (1 - beta) q, from the two log-probs (0 < beta < 1)."""
    return jnp.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def jsd_block_sums(zs, zt, lse_s, lse_t, *, beta: float, valid=None):
    """(sum_v p (lp - lm), sum_v q (lq - lm)) of one [n, v] block of float32 scaled logits, each [n, 1]; per-token
    inputs are [n, 1]. Columns outside `valid` add exactly 0 (whatever was read there)."""
    lq, lp = zs - lse_s, zt - lse_t
    lm = log_mixture(lp, lq, beta)
    tp, tq = jnp.exp(lp) * (lp - lm), jnp.exp(lq) * (lq - lm)
    if valid is not None:
        tp, tq = jnp.where(valid, tp, 0.0), jnp.where(valid, tq, 0.0)
    return jnp.sum(tp, axis=1, keepdims=True), jnp.sum(tq, axis=1, keepdims=True)


def jsd_finish(kl_pm, kl_qm, *, beta: float):
    """(JSD, its gradient's moment KL(q || m)) from the complete sums."""
    return beta * kl_pm + (1.0 - beta) * kl_qm, kl_qm


def dlogits(zs, zt, lse_s, lse_t, moment, g, *, kind: str, inv_temp: float, beta: float = 0.5, valid=None):
    """g * d div / d(h_s W_s) for one [n, v] block of float32 scaled logits; per-token inputs are [n, 1]. Columns
    outside `valid` get exactly 0 (whatever was read there)."""
    lq, lp = zs - lse_s, zt - lse_t
    q = jnp.exp(lq)
    if kind == "forward":
        dz = q - jnp.exp(lp)
    elif kind == "reverse":
        dz = q * ((lq - lp) - moment)
    else:
        dz = (1.0 - beta) * q * ((lq - log_mixture(lp, lq, beta)) - moment)
    dz = dz * (g if inv_temp == 1.0 else g * inv_temp)
    return dz if valid is None else jnp.where(valid, dz, 0.0)
