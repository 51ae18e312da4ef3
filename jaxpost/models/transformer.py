"""A Llama 3 / Qwen2 / Qwen3-style decoder in Flax NNX.

RMSNorm, RoPE (rotate-half convention), grouped-query attention with optional qkv bias (Qwen2) and per-head q/k
RMSNorm (Qwen3), SwiGLU, tied or untied embeddings. Attention is causal within a document: `segment_ids` keep packed
documents apart and `positions` restart per document. Layers are stacked and scanned (one compiled block whatever the
depth). Every parameter carries logical axis names in its `axes` metadata; `jaxpost.sharding` maps them to the mesh.

The model returns final hidden states; applying the unembedding is the loss's job (`jaxpost.ops.token_logprobs`), so
no training path materialises [tokens x vocab] logits.

With a `LoRAConfig` (`jaxpost.models.lora`), each targeted projection also carries low-rank adapters (`{t}_lora_a`,
`{t}_lora_b`) added by `adapted` in the training forward and in `extend` alike.

Generation uses `Transformer.extend`: the same layers (the same projection and attention code as `__call__`) run on
C new tokens per row against a `KVCache` ([layers, B, kv_heads, S, head_dim], batch over data/fsdp, kv heads over
tensor), writing their keys/values at a cache slot shared by all rows (prompts are left-padded; see
`jaxpost.rollout.sampler`). The training forward is unchanged by it.

Performance notes (XLA:CPU, measured with tools/bench_train.py; see docs/benchmarks.md): every projection runs as a
2-D [tokens, in] @ [in, out] matmul (a 3-D einsum makes XLA transpose the [tokens, out] cotangent for the weight
gradient), attention runs head-major ([B, kv_heads, group * T, head_dim]) so both attention matmuls are plain batched
matmuls, the RoPE tables are computed once per forward pass rather than once per layer, and SwiGLU has a custom VJP
that stores only its two inputs (XLA:CPU page-faults in its whole temporary buffer on every step, so stored
activations cost time as well as memory).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxpost.config import ModelConfig
from jaxpost.models.lora import LORA_TARGETS, LoRAConfig, lora_shapes
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


def rope_frequencies(cfg: ModelConfig) -> Float[Array, "hd2"]:
    """Inverse frequencies f_i = theta^(-2i/head_dim), i < head_dim/2, float32.

    With `cfg.rope_scaling == "llama3"` (Llama 3.1; transformers' `_compute_llama3_parameters`), with wavelength
    w_i = 2 pi / f_i, L = rope_original_max_len, lo/hi the low/high frequency factors and s the factor: f_i stays if
    w_i < L / hi, becomes f_i / s if w_i > L / lo, and in between is (1 - a) f_i / s + a f_i with
    a = (L / w_i - lo) / (hi - lo).
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling == "none":
        return inv_freq
    factor, lo, hi, L = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                         cfg.rope_original_max_len)
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > L / lo, inv_freq / factor, inv_freq)
    smooth = (L / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < L / hi) & ~(wavelen > L / lo)
    return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def rope_tables(positions_BT, inv_freq):
    """(cos, sin) of the RoPE angles, each float32 [B, T, 1, head_dim/2] (broadcast over heads)."""
    angles_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BTf)[:, :, None, :], jnp.sin(angles_BTf)[:, :, None, :]


def rotate(x_BTNh, cos, sin):
    """Rotate-half RoPE (the Hugging Face Llama layout: pairs (i, i + head_dim/2)) with precomputed tables, in
    float32."""
    x = x_BTNh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNh.dtype)


@jax.custom_vjp
def swiglu(g, u):
    """silu(g) * u. Its VJP keeps only g and u for the backward pass: autodiff through silu would also store
    sigmoid(g), silu(g) and the product, three more [tokens x mlp] arrays per layer."""
    return jax.nn.silu(g) * u


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dh):
    g, u = res
    s = jax.nn.sigmoid(g)
    return dh * u * (s * (1 + g * (1 - s))), dh * (g * s)  # silu'(g) = s (1 + g (1 - s)), silu(g) = g s


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def dense(x, w, dt):
    """x [..., d_in] @ w [d_in, ...] as one 2-D matmul over flattened tokens, in compute dtype `dt`."""
    w2 = w.astype(dt).reshape(x.shape[-1], -1)
    y = x.reshape(-1, x.shape[-1]) @ w2
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def create_adapters(module: nnx.Module, cfg: ModelConfig, lora: LoRAConfig | None, targets, rngs: nnx.Rngs):
    """Sets `module.lora` and, for each of `targets` that `lora` adapts, the params `{t}_lora_a` (kaiming-uniform)
    and `{t}_lora_b` (zeros) on `module` (see `jaxpost.models.lora`)."""
    module.lora = lora if lora is not None and lora.enabled else None
    if module.lora is None:
        return
    for t in targets:
        if t not in module.lora.targets:
            continue
        a_shape, a_axes, b_shape, b_axes = lora_shapes(
            t, d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            mlp_dim=cfg.mlp_dim, rank=module.lora.rank)
        fan_in = int(np.prod(a_shape[:-1]))
        bound = fan_in ** -0.5  # PyTorch's kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] weight, as PEFT does
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        setattr(module, f"{t}_lora_a", nnx.Param(a.astype(jnp.dtype(cfg.param_dtype)), axes=a_axes))
        setattr(module, f"{t}_lora_b", nnx.Param(jnp.zeros(b_shape, jnp.dtype(cfg.param_dtype)), axes=b_axes))


def adapted(module: nnx.Module, target: str, x, y, dt, dropout_key):
    """y (the projection of x) plus s * (dropout(x) A) B of `module`'s adapter on `target`, in compute dtype `dt`;
    y itself when there is no such adapter. x: [..., in], flattened like the weight's input dims."""
    lora = module.lora
    if lora is None or target not in lora.targets:
        return y
    a = getattr(module, f"{target}_lora_a")[...]
    b = getattr(module, f"{target}_lora_b")[...]
    if dropout_key is not None and lora.dropout > 0:
        key = jax.random.fold_in(dropout_key, LORA_TARGETS.index(target))
        keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    h = dense(x, a.reshape(x.shape[-1], -1), dt)
    return y + dense(h, b, dt) * jnp.asarray(lora.scale, dt)


def attention_mask(segment_ids_BT: Int[Array, "B T"]) -> jax.Array:
    """[B, 1, 1, T, T] boolean: causal and within the same segment (padding, segment 0, only sees padding)."""
    T = segment_ids_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal_TT[None] & same_BTT)[:, None, None]


class KVCache(NamedTuple):
    """Keys and values of every layer, head-major: [layers, B, kv_heads, S, head_dim] each, in the compute dtype.

    Logical axes `CACHE_AXES`: the batch is split over (data, fsdp) and the kv heads over tensor, like the
    activations of the forward pass that fills it."""

    k: Float[Array, "L B K S hd"]
    v: Float[Array, "L B K S hd"]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
        return cls(k=jnp.zeros(shape, jnp.dtype(cfg.dtype)), v=jnp.zeros(shape, jnp.dtype(cfg.dtype))).sharded()

    def sharded(self) -> KVCache:
        return KVCache(k=shard(self.k, CACHE_AXES), v=shard(self.v, CACHE_AXES))

    @property
    def length(self) -> int:
        return self.k.shape[3]


CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
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
        create_adapters(self, cfg, lora, ("q", "k", "v", "o"), rngs)

    def _project(self, x_BTD, rope, dropout_key=None):
        """Queries [B, T, H, hd] and keys, values [B, T, K, hd], RoPE applied, in the compute dtype."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        q_BTHh = dense(x_BTD, self.q[...], dt)
        k_BTKh = dense(x_BTD, self.k[...], dt)
        v_BTKh = dense(x_BTD, self.v[...], dt)
        q_BTHh = adapted(self, "q", x_BTD, q_BTHh, dt, dropout_key)
        k_BTKh = adapted(self, "k", x_BTD, k_BTKh, dt, dropout_key)
        v_BTKh = adapted(self, "v", x_BTD, v_BTKh, dt, dropout_key)
        if cfg.qkv_bias:
            q_BTHh += self.q_bias[...].astype(dt)
            k_BTKh += self.k_bias[...].astype(dt)
            v_BTKh += self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTHh, k_BTKh = self.q_norm(q_BTHh), self.k_norm(k_BTKh)
        q_BTHh = shard(rotate(q_BTHh, *rope), ("batch", "seq", "heads", "head_dim"))
        k_BTKh = shard(rotate(k_BTKh, *rope), ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKh = shard(v_BTKh, ("batch", "seq", "kv_heads", "head_dim"))
        return q_BTHh, k_BTKh, v_BTKh

    def _attend(self, q_BTHh, k_BKSh, v_BKSh, mask, dropout_key=None):
        """Attention of T queries over S head-major keys/values; mask [B, 1, 1, T, S] boolean. Output [B, T, D]."""
        dt = jnp.dtype(self.cfg.dtype)
        # Head-major layout: the G = H / K query heads that share a kv head are stacked along the query axis
        # (M = G * T rows), so scores and outputs are plain batched matmuls over (B, K).
        B, T, H, hd = q_BTHh.shape
        K, S = k_BKSh.shape[1], k_BKSh.shape[2]
        G = H // K
        q_BKMh = q_BTHh.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
        scores_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMh, k_BKSh,
                                 preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores_BKGTS = jnp.where(mask, scores_BKMS.reshape(B, K, G, T, S), _MASK_VALUE)
        probs_BKMS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dt).reshape(B, K, G * T, S)
        out_BKMh = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSh)
        out_BTHh = out_BKMh.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)
        x_BTF = out_BTHh.reshape(B, T, H * hd)
        return adapted(self, "o", x_BTF, dense(x_BTF, self.o[...].reshape(H * hd, -1), dt), dt, dropout_key)

    def __call__(self, x_BTD, rope, mask, dropout_key=None):
        """rope: (cos, sin) from `rope_tables`; mask: [B, 1, 1, T, T] boolean from `attention_mask`; dropout_key:
        the LoRA dropout key of a training step (None: no dropout)."""
        q_BTHh, k_BTKh, v_BTKh = self._project(x_BTD, rope, dropout_key)
        return self._attend(q_BTHh, k_BTKh.transpose(0, 2, 1, 3), v_BTKh.transpose(0, 2, 1, 3), mask, dropout_key)

    def extend(self, x_BCD, rope, k_BKSh, v_BKSh, slot, mask):
        """C new tokens against one layer's cache: their keys/values are written at cache slots [slot, slot + C)
        and the queries attend over all S slots under `mask` [B, 1, 1, C, S]. Returns (out [B, C, D], the new keys
        and values [B, K, C, hd] for the caller to store)."""
        q_BCHh, k_BCKh, v_BCKh = self._project(x_BCD, rope)
        k_BKCh = k_BCKh.transpose(0, 2, 1, 3).astype(k_BKSh.dtype)
        v_BKCh = v_BCKh.transpose(0, 2, 1, 3).astype(v_BKSh.dtype)
        k_BKSh = jax.lax.dynamic_update_slice_in_dim(k_BKSh, k_BKCh, slot, axis=2)
        v_BKSh = jax.lax.dynamic_update_slice_in_dim(v_BKSh, v_BKCh, slot, axis=2)
        return self._attend(q_BCHh, k_BKSh, v_BKSh, mask), k_BKCh, v_BKCh


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        D, F, pd, std = cfg.d_model, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
        self.cfg = cfg
        self.gate = _param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd)
        self.up = _param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd)
        self.down = _param(rngs, (F, D), ("mlp", "embed"), std=std / (2 * cfg.n_layers) ** 0.5, dtype=pd)
        create_adapters(self, cfg, lora, ("gate", "up", "down"), rngs)

    def __call__(self, x_BTD, dropout_key=None):
        dt = jnp.dtype(self.cfg.dtype)
        g_BTF = adapted(self, "gate", x_BTD, dense(x_BTD, self.gate[...], dt), dt, dropout_key)
        u_BTF = adapted(self, "up", x_BTD, dense(x_BTD, self.up[...], dt), dt, dropout_key)
        h_BTF = shard(swiglu(g_BTF, u_BTF), ("batch", "seq", "mlp"))
        return adapted(self, "down", h_BTF, dense(h_BTF, self.down[...], dt), dt, dropout_key)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        pd = cfg.param_dtype
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        self.attn = Attention(cfg, rngs, lora)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        self.mlp = MLP(cfg, rngs, lora)

    def __call__(self, x_BTD, rope, mask, dropout_key=None):
        k_attn = k_mlp = None
        if dropout_key is not None:
            k_attn, k_mlp = jax.random.split(dropout_key)
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, mask, k_attn)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD), k_mlp)
        return shard(x_BTD, ("batch", "seq", "embed"))

    def extend(self, x_BCD, rope, k_BKSh, v_BKSh, slot, mask):
        a_BCD, k_BKCh, v_BKCh = self.attn.extend(self.attn_norm(x_BCD), rope, k_BKSh, v_BKSh, slot, mask)
        x_BCD = x_BCD + a_BCD
        x_BCD = x_BCD + self.mlp(self.mlp_norm(x_BCD))
        return shard(x_BCD, ("batch", "seq", "embed")), k_BKCh, v_BKCh


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns final hidden states [B, T, D]; `unembedding()` the [D, V] output matrix."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        """lora: adapters on the projections `lora.targets` of every layer (None or rank 0: none)."""
        self.cfg = cfg
        self.lora = lora if lora is not None and lora.enabled else None
        pd = cfg.param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs, lora)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, axis_name="norm", param_dtype=pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                                  dtype=pd)

    def __call__(self, tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"] | None = None,
                 segment_ids_BT: Int[Array, "B T"] | None = None, *, dropout_key: jax.Array | None = None
                 ) -> Float[Array, "B T D"]:
        """Final hidden states. dropout_key: a training step's key for LoRA dropout (None: none)."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        mask = attention_mask(segment_ids_BT)
        rope = rope_tables(positions_BT, rope_frequencies(cfg))

        table_VD = shard(self.embed[...], ("vocab", "embed"))  # gathered over fsdp; vocab stays over tensor
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(cfg.dtype)
        x_BTD = shard(x_BTD, ("batch", "seq", "embed"))

        use_dropout = dropout_key is not None and self.lora is not None and self.lora.dropout > 0
        if use_dropout:
            def layer(x_BTD, block, key):
                return block(x_BTD, rope, mask, key)
            xs = (self.blocks, jax.random.split(dropout_key, cfg.n_layers))
        else:
            def layer(x_BTD, block):
                return block(x_BTD, rope, mask)
            xs = (self.blocks,)

        if cfg.remat:
            layer = nnx.remat(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x_BTD = nnx.scan(layer, in_axes=(nnx.Carry,) + (0,) * len(xs), out_axes=nnx.Carry)(x_BTD, *xs)
        return self.final_norm(x_BTD)

    def extend(self, tokens_BC: Int[Array, "B C"], positions_BC: Int[Array, "B C"], cache: KVCache, *, slot,
               kv_start_B: Int[Array, "B"], attend_len: int | None = None) -> tuple[Float[Array, "B C D"], KVCache]:
        """The forward pass of C new tokens per row against a KV cache (prefill chunks and decode steps).

        The tokens occupy cache slots [slot, slot + C) (`slot` may be traced; all rows share it: prompts are
        left-padded); their keys/values are written there. A query at slot q attends to the slots s with
        kv_start_B[b] <= s <= q (row b's real tokens begin at slot kv_start_B[b]), among the first `attend_len`
        slots (static; default all; a prefill chunk need not look past itself). `positions_BC` are the RoPE
        positions, which must equal those of the training forward (0 at a row's first real token). Returns the final
        hidden states [B, C, D] and the updated cache.
        """
        cfg = self.cfg
        C = tokens_BC.shape[1]
        S = cache.k.shape[3] if attend_len is None else attend_len
        q_slot_C = slot + jnp.arange(C, dtype=jnp.int32)
        s_S = jnp.arange(S, dtype=jnp.int32)
        mask_BCS = (s_S[None, None, :] >= kv_start_B[:, None, None]) & (s_S[None, None, :] <= q_slot_C[None, :, None])
        mask = mask_BCS[:, None, None]
        rope = rope_tables(positions_BC, rope_frequencies(cfg))

        table_VD = shard(self.embed[...], ("vocab", "embed"))
        x_BCD = shard(jnp.take(table_VD, tokens_BC, axis=0).astype(cfg.dtype), ("batch", "seq", "embed"))

        def layer(x_BCD, block, k_BKSh, v_BKSh):
            x_BCD, k_BKCh, v_BKCh = block.extend(x_BCD, rope, k_BKSh[:, :, :S], v_BKSh[:, :, :S], slot, mask)
            return x_BCD, (k_BKCh, v_BKCh)

        x_BCD, (k_LBKCh, v_LBKCh) = nnx.scan(layer, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
            x_BCD, self.blocks, cache.k, cache.v)
        cache = KVCache(k=jax.lax.dynamic_update_slice_in_dim(cache.k, k_LBKCh, slot, axis=3),
                        v=jax.lax.dynamic_update_slice_in_dim(cache.v, v_LBKCh, slot, axis=3))
        return self.final_norm(x_BCD), cache.sharded()

    def unembedding(self) -> Float[Array, "D V"]:
        """The output projection [D, V] in compute dtype (the transposed embedding when tied)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
