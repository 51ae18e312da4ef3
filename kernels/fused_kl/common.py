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
Partial stats over disjoint vocabulary slices combine exactly with `combine`.

The generalised JSD needs log m = log(beta p + (1 - beta) q) per logit, i.e. both complete log-sum-exps before the
first block is summed: not a one-pass online reduction. Its kernel is not written; `token_kl` sends "jsd" to the
chunked XLA path.

Backward, per logit, with lq = b_s - lse_s, lp = b_t - lse_t, g the per-token cotangent:
    forward:  dz = g (q - p) / T
    reverse:  dz = g q ((lq - lp) - KL(q || p)) / T
(derivations in jaxpost/ops/kl.py, `token_kl`).
"""

from __future__ import annotations

import jax.numpy as jnp

KERNEL_KINDS = ("forward", "reverse")
# A finite start for the running maxima: (m - m_new) * l stays 0, not NaN, before the first block.
NEG_INIT = -1e30


def weights_student(kind: str) -> bool:
    """Whether the divergence is an expectation over the student q (reverse) rather than the teacher p (forward)."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"fused_kl: kind must be one of {KERNEL_KINDS} (jsd runs on the chunked path), got {kind!r}")
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


def combine(ms_SN, ls_SN, mt_SN, lt_SN, acc_SN, *, student_weights: bool, axis: int = 0):
    """Combine partial stats over disjoint vocabulary slices stacked along `axis`."""
    ms_N, mt_N = jnp.max(ms_SN, axis=axis), jnp.max(mt_SN, axis=axis)
    ds_SN, dt_SN = ms_SN - jnp.expand_dims(ms_N, axis), mt_SN - jnp.expand_dims(mt_N, axis)
    cs_SN, ct_SN = jnp.exp(ds_SN), jnp.exp(dt_SN)
    if student_weights:
        acc_N = jnp.sum(cs_SN * (acc_SN + (ds_SN - dt_SN) * ls_SN), axis=axis)
    else:
        acc_N = jnp.sum(ct_SN * (acc_SN + (dt_SN - ds_SN) * lt_SN), axis=axis)
    return ms_N, jnp.sum(cs_SN * ls_SN, axis=axis), mt_N, jnp.sum(ct_SN * lt_SN, axis=axis), acc_N


def finish(ms, ls, mt, lt, acc, *, student_weights: bool):
    """(div, lse_s, lse_t) from complete stats; div is also the moment the backward pass needs."""
    la, lo = (ls, lt) if student_weights else (lt, ls)
    div = acc / la - jnp.log(la) + jnp.log(lo)
    return div, ms + jnp.log(ls), mt + jnp.log(lt)


def dlogits(zs, zt, lse_s, lse_t, moment, g, *, kind: str, inv_temp: float, valid=None):
    """g * d div / d(h_s W_s) for one [n, v] block of float32 scaled logits; per-token inputs are [n, 1]. Columns
    outside `valid` get exactly 0 (whatever was read there)."""
    lq, lp = zs - lse_s, zt - lse_t
    q = jnp.exp(lq)
    dz = q - jnp.exp(lp) if kind == "forward" else q * ((lq - lp) - moment)
    dz = dz * (g if inv_temp == 1.0 else g * inv_temp)
    return dz if valid is None else jnp.where(valid, dz, 0.0)
