"""`LM`: a model config plus its NNX graph definition, with params held as a plain pytree (pure dict).

Train states hold params as pure dicts (what Orbax stores and restores); `LM.hidden` merges them with the static
graph definition inside the traced step, which costs nothing at run time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpost.config import ModelConfig
from jaxpost.models import lora as lora_lib
from jaxpost.models.lora import LoRAConfig
from jaxpost.ops import token_log_sum_sq_probs, token_logprobs
from jaxpost.sharding import param_logical_axes, tree_shardings
from jaxpost.models.transformer import KVCache, Transformer


class LM:
    """With `lora` (rank > 0), the params tree also holds LoRA adapters (`jaxpost.models.lora`): `trainable` picks
    them out (the steps differentiate and update only them) and `hidden(..., adapters=False)` runs the base model
    alone on the same arrays (the reference policy of DPO and RL)."""

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None = None):
        self.cfg = cfg
        self.lora = lora if lora is not None and lora.enabled else None
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), lora=self.lora))
        self.graphdef, state = nnx.split(abstract)
        self.abstract_params = state.to_pure_dict()
        self.logical_axes = param_logical_axes(state)
        self.base = LM(cfg) if self.lora is not None else self

    # ---- LoRA: which params train ----------------------------------------------------------------------------
    def trainable(self, params):
        """The params a step differentiates and the optimizer updates: all of them, or the adapters alone."""
        return params if self.lora is None else lora_lib.adapter_params(params)

    def with_trainable(self, params, trainable):
        """`params` with its trainable part replaced by `trainable` (the inverse of `trainable`)."""
        return trainable if self.lora is None else lora_lib.with_adapters(params, trainable)

    def add_adapters(self, base_params, key: jax.Array, mesh=None):
        """Params of this (LoRA) model from base decoder params (e.g. a pretrained checkpoint) and fresh adapters,
        created sharded on `mesh`. The base arrays are used as they are."""
        if self.lora is None:
            raise ValueError("add_adapters: this LM has no LoRA config (LM(cfg, lora=LoRAConfig(rank=...)))")
        fresh = self.init(key, mesh, adapters_only=True)
        return lora_lib.with_adapters(lora_lib.base_params(base_params), fresh)

    def merged(self, params):
        """Plain decoder params with the adapters folded into the base weights (for export); params unchanged
        without LoRA."""
        return params if self.lora is None else lora_lib.merge_adapters(params, self.lora)

    def param_shardings(self, mesh):
        return tree_shardings(self.abstract_params, self.logical_axes, mesh)

    def init(self, key: jax.Array, mesh=None, *, adapters_only: bool = False):
        """Random params, created directly in their sharded layout on `mesh` (never whole on one device). With
        `adapters_only`, just the LoRA adapters (A random, B zero)."""
        cfg = self.cfg

        def make(key):
            params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(key), lora=self.lora))[1].to_pure_dict()
            return lora_lib.adapter_params(params) if adapters_only else params

        shardings = self.param_shardings(mesh) if mesh is not None else None
        if shardings is not None and adapters_only:
            shardings = lora_lib.adapter_params(shardings)
        return jax.jit(make, out_shardings=shardings)(key)

    def module(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params)

    def hidden(self, params, tokens_BT, positions_BT=None, segment_ids_BT=None, *, adapters: bool = True,
               dropout_key=None):
        """Final hidden states [B, T, D] in the compute dtype. adapters=False runs the base model of a LoRA model
        (its adapters ignored); dropout_key: a training step's key for LoRA dropout."""
        if self.lora is not None and not adapters:
            return self.base.hidden(lora_lib.base_params(params), tokens_BT, positions_BT, segment_ids_BT)
        return self.module(params)(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key)

    def unembedding(self, params):
        """The output matrix [D, V] in the compute dtype."""
        return self.module(params).unembedding()

    def output_layer(self, params):
        """(w, vocab_major): the output matrix as stored, in the compute dtype: the tied embedding table [V, D]
        (vocab_major=True, so the fused log-prob kernels read it without a transposed copy) or lm_head [D, V]."""
        if self.cfg.tie_embeddings:
            return params["embed"].astype(self.cfg.dtype), True
        return params["lm_head"].astype(self.cfg.dtype), False

    def token_logprobs(self, params, hidden, targets, *, temperature: float = 1.0, return_entropy: bool = False,
                       impl: str = "auto"):
        """`jaxpost.ops.token_logprobs` of this model's output layer: what every loss calls on final hidden states."""
        w, vocab_major = self.output_layer(params)
        return token_logprobs(hidden, w, targets, temperature=temperature, return_entropy=return_entropy,
                              impl=impl, vocab_major=vocab_major)

    def log_sum_sq_probs(self, params, hidden, *, temperature: float = 1.0):
        """`jaxpost.ops.token_log_sum_sq_probs` of this model's output layer (WPO's weights; detached)."""
        w, vocab_major = self.output_layer(params)
        return token_log_sum_sq_probs(hidden, w, temperature=temperature, vocab_major=vocab_major)

    def logits(self, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
        """Float32 [B, T, V] logits: for inspection, tests and small-vocabulary decoding only."""
        h = self.hidden(params, tokens_BT, positions_BT, segment_ids_BT)
        return jnp.einsum("btd,dv->btv", h, self.unembedding(params), preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty (zero) KV cache of `length` slots for `batch` rows, laid out by `CACHE_AXES` under the mesh."""
        return KVCache.zeros(self.cfg, batch, length)

    def extend(self, params, tokens_BC, positions_BC, cache: KVCache, *, slot, kv_start_B, attend_len=None):
        """(hidden [B, C, D], updated cache): C new tokens per row against the cache; see `Transformer.extend`."""
        return self.module(params).extend(tokens_BC, positions_BC, cache, slot=slot, kv_start_B=kv_start_B,
                                          attend_len=attend_len)

    @functools.cached_property
    def n_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))
