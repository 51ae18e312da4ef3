"""Greedy decoding by full recomputation: simple and exact, for evaluation of short answers.

Each new token re-runs the forward pass over the whole buffer (no KV cache), inside one compiled `while_loop` that
stops as soon as every row has emitted a stop token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


@functools.partial(jax.jit, static_argnames=("lm", "max_new_tokens", "stop_ids", "pad_id"))
def greedy_generate(lm, params, prompt_BP: Int[Array, "B P"], lengths_B: Int[Array, "B"], *, max_new_tokens: int,
                    stop_ids: tuple[int, ...], pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Greedy continuations of right-padded prompts.

    Returns (tokens [B, max_new_tokens], n_new [B]): row b's new tokens are tokens[b, :n_new[b]], the stop token
    included when one was emitted; later entries are `pad_id`.
    """
    B, P = prompt_BP.shape
    T = P + max_new_tokens
    buf_BT = jnp.full((B, T), pad_id, jnp.int32).at[:, :P].set(prompt_BP.astype(jnp.int32))
    out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    stops = jnp.asarray(stop_ids, jnp.int32)
    w_DV = lm.unembedding(params)
    rows = jnp.arange(B)

    def cond(carry):
        i, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, buf_BT, out_BN, done_B, n_B = carry
        h_BTD = lm.hidden(params, buf_BT)
        last_BD = h_BTD[rows, lengths_B + i - 1]
        tok_B = jnp.argmax(jnp.einsum("bd,dv->bv", last_BD, w_DV, preferred_element_type=jnp.float32), axis=-1)
        tok_B = jnp.where(done_B, pad_id, tok_B).astype(jnp.int32)
        buf_BT = buf_BT.at[rows, lengths_B + i].set(tok_B)
        out_BN = out_BN.at[:, i].set(tok_B)
        n_B = n_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.isin(tok_B, stops)
        return i + 1, buf_BT, out_BN, done_B, n_B

    init = (jnp.int32(0), buf_BT, out_BN, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    _, _, out_BN, _, n_B = jax.lax.while_loop(cond, body, init)
    return out_BN, n_B
