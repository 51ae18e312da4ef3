"""A Llama 3 / Qwen2 / Qwen3-style decoder in Flax NNX.

RMSNorm, RoPE (rotate-half convention), grouped-query attention with optional qkv bias (Qwen2) and per-head q/k
RMSNorm (Qwen3), SwiGLU, tied or untied embeddings. Attention is causal within a document: `segment_ids` keep packed
documents apart and `positions` restart per document. Layers are stacked and scanned (one compiled block whatever the
depth). Every parameter carries logical axis names in its `axes` metadata; `jaxpost.sharding` maps them to the mesh.

The model returns final hidden states; applying the unembedding is the loss's job (`jaxpost.ops.token_logprobs`), so
no training path materialises [tokens x vocab] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxpost.config import ModelConfig
from jaxpost.sharding import shard

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _param(rngs: nnx.Rngs, shape, axes, *, std: float, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)) * std, axes=axes)


def rms_norm(x, scale, eps: float):
    """RMSNorm in float32, cast back to x's dtype (Llama/Qwen: weight applied after normalisation)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


def rope_frequencies(head_dim: int, theta: float) -> Float[Array, "hd2"]:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNh, positions_BT, inv_freq):
    """Rotate-half RoPE (the Hugging Face Llama layout: pairs (i, i + head_dim/2)), computed in float32."""
    angles_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles_BTf)[:, :, None, :], jnp.sin(angles_BTf)[:, :, None, :]
    x = x_BTNh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNh.dtype)


def attention_mask(segment_ids_BT: Int[Array, "B T"]) -> jax.Array:
    """[B, 1, 1, T, T] boolean: causal and within the same segment (padding, segment 0, only sees padding)."""
    T = segment_ids_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal_TT[None] & same_BTT)[:, None, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, hd, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        std = cfg.init_std
        self.cfg = cfg
        self.q = _param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        self.k = _param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.v = _param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.o = _param(rngs, (H, hd, D), ("heads", "head_dim", "embed"), std=std / (2 * cfg.n_layers) ** 0.5,
                        dtype=pd)
        if cfg.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((H, hd), jnp.dtype(pd)), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((K, hd), jnp.dtype(pd)), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((K, hd), jnp.dtype(pd)), axes=("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_eps, axis_name="head_dim", param_dtype=pd)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_eps, axis_name="head_dim", param_dtype=pd)

    def __call__(self, x_BTD, positions_BT, mask, inv_freq):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        q_BTHh = jnp.einsum("btd,dhk->bthk", x_BTD, self.q[...].astype(dt))
        k_BTKh = jnp.einsum("btd,dhk->bthk", x_BTD, self.k[...].astype(dt))
        v_BTKh = jnp.einsum("btd,dhk->bthk", x_BTD, self.v[...].astype(dt))
        if cfg.qkv_bias:
            q_BTHh += self.q_bias[...].astype(dt)
            k_BTKh += self.k_bias[...].astype(dt)
            v_BTKh += self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTHh, k_BTKh = self.q_norm(q_BTHh), self.k_norm(k_BTKh)
        q_BTHh = shard(apply_rope(q_BTHh, positions_BT, inv_freq), ("batch", "seq", "heads", "head_dim"))
        k_BTKh = shard(apply_rope(k_BTKh, positions_BT, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKh = shard(v_BTKh, ("batch", "seq", "kv_heads", "head_dim"))

        B, T, H, hd = q_BTHh.shape
        K = cfg.n_kv_heads
        q_BTKGh = q_BTHh.reshape(B, T, K, H // K, hd)
        scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGh, k_BTKh,
                                  preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores_BKGTS = jnp.where(mask, scores_BKGTS, _MASK_VALUE)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dt)
        out_BTKGh = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BTKh)
        out_BTHh = out_BTKGh.reshape(B, T, H, hd)
        return jnp.einsum("bthk,hkd->btd", out_BTHh, self.o[...].astype(dt))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pd, std = cfg.d_model, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
        self.cfg = cfg
        self.gate = _param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd)
        self.up = _param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd)
        self.down = _param(rngs, (F, D), ("mlp", "embed"), std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)

    def __call__(self, x_BTD):
        dt = jnp.dtype(self.cfg.dtype)
        g_BTF = x_BTD @ self.gate[...].astype(dt)
        u_BTF = x_BTD @ self.up[...].astype(dt)
        h_BTF = shard(jax.nn.silu(g_BTF) * u_BTF, ("batch", "seq", "mlp"))
        return h_BTF @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, mask, inv_freq):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, mask, inv_freq)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return shard(x_BTD, ("batch", "seq", "embed"))


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns final hidden states [B, T, D]; `unembedding()` the [D, V] output matrix."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                                  dtype=pd)

    def __call__(self, tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"] | None = None,
                 segment_ids_BT: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        mask = attention_mask(segment_ids_BT)
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta)

        table_VD = shard(self.embed[...], ("vocab", "embed"))  # gathered over fsdp; vocab stays over tensor
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(cfg.dtype)
        x_BTD = shard(x_BTD, ("batch", "seq", "embed"))

        def layer(x_BTD, block):
            return block(x_BTD, positions_BT, mask, inv_freq)

        if cfg.remat:
            layer = nnx.remat(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x_BTD = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x_BTD, self.blocks)
        return self.final_norm(x_BTD)

    def unembedding(self) -> Float[Array, "D V"]:
        """The output projection [D, V] in compute dtype (the transposed embedding when tied)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
