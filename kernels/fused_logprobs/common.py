"""Math shared by the fused log-prob kernels and their wrappers (plain jnp, usable inside and outside kernels).

A pass over vocabulary blocks keeps four float32 numbers per token (an online softmax, as in flash attention):

    m  = running max of the logits z
    l  = sum exp(z - m)
    s  = sum exp(z - m) * (z - m)          (only when the entropy is asked for)
    zt = the target's logit (0 from every block that does not hold the target)

so that lse = m + log l, logp = zt - lse and entropy = log l - s / l. Keeping `s` relative to the running max avoids
the cancellation of `lse - E_p[z]` when logits are large. Partial stats over disjoint vocabulary slices (blocks,
splits of a GPU grid, or shards of a vocab-parallel mesh) combine exactly with `combine`.

The backward pass needs, per logit, d(glp * logp + gl * lse + ge * entropy) / dz:

    dz = p * (gl - glp) - ge * p * (z - E_p[z]) + glp * onehot(target),    E_p[z] = lse - entropy,

scaled by 1 / temperature for the gradient with respect to h @ W.
"""

from __future__ import annotations

import jax.numpy as jnp

# The running max starts at a large finite negative number rather than -inf so that (m - m_new) * l stays 0, not
# NaN, before the first block.
NEG_INIT = -1e30


def block_update(m, l, s, zt, z, cols, t, *, valid=None, entropy: bool):
    """Fold one [n, v] block of float32 logits into the running stats ([n, 1] each). `cols` [1, v] or [n, v] holds
    the block's vocabulary ids (as seen by `t`, [n, 1]); `valid` masks columns past the vocabulary (None: all)."""
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
    c = jnp.exp(m - m_new)
    e = jnp.exp(z - m_new)
    l_new = c * l + jnp.sum(e, axis=1, keepdims=True)
    if entropy:
        zm = z - m_new if valid is None else jnp.where(valid, z - m_new, 0.0)
        s = c * (s + (m - m_new) * l) + jnp.sum(e * zm, axis=1, keepdims=True)
    hit = cols == t if valid is None else (cols == t) & valid  # a shard's out-of-range target may land past V
    zt = zt + jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
    return m_new, l_new, s, zt


def combine(m_SN, l_SN, s_SN, zt_SN, axis: int = 0):
    """Combine partial stats over disjoint vocabulary slices stacked along `axis`."""
    m_N = jnp.max(m_SN, axis=axis)
    c_SN = jnp.exp(m_SN - jnp.expand_dims(m_N, axis))
    l_N = jnp.sum(c_SN * l_SN, axis=axis)
    s_N = jnp.sum(c_SN * (s_SN + (m_SN - jnp.expand_dims(m_N, axis)) * l_SN), axis=axis)
    return m_N, l_N, s_N, jnp.sum(zt_SN, axis=axis)


def finish(m, l, s, zt):
    """(logp, lse, entropy) from complete stats."""
    lse = m + jnp.log(l)
    return zt - lse, lse, jnp.log(l) - s / l


def dlogits(z, cols, t, lse, ez, glp, gl, ge, *, inv_temp: float, valid=None):
    """d loss / d(h @ W) for one [n, v] block of float32 logits z (already divided by the temperature). Per-token
    inputs are [n, 1]; `ge` None means no entropy cotangent. Columns outside `valid` get exactly 0."""
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    p = jnp.exp(z - lse)
    dz = p * (gl - glp)
    if ge is not None:
        zc = z - ez if valid is None else jnp.where(valid, z - ez, 0.0)
        dz = dz - ge * p * zc
    hit = cols == t if valid is None else (cols == t) & valid
    dz = dz + jnp.where(hit, glp, 0.0)
    return dz if inv_temp == 1.0 else dz * inv_temp
