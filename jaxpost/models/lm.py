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
from jaxpost.ops import token_logprobs
from jaxpost.sharding import param_logical_axes, tree_shardings
from jaxpost.models.transformer import KVCache, Transformer


class LM:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        self.abstract_params = state.to_pure_dict()
        self.logical_axes = param_logical_axes(state)

    def param_shardings(self, mesh):
        return tree_shardings(self.abstract_params, self.logical_axes, mesh)

    def init(self, key: jax.Array, mesh=None):
        """Random params, created directly in their sharded layout on `mesh` (never whole on one device)."""
        cfg = self.cfg

        def make(key):
            return nnx.split(Transformer(cfg, rngs=nnx.Rngs(key)))[1].to_pure_dict()

        shardings = self.param_shardings(mesh) if mesh is not None else None
        return jax.jit(make, out_shardings=shardings)(key)

    def module(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params)

    def hidden(self, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
        """Final hidden states [B, T, D] in the compute dtype."""
        return self.module(params)(tokens_BT, positions_BT, segment_ids_BT)

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
