"""Models: the decoder (`Transformer`) and `LM`, the handle that steps use to build, shard and apply it."""

from jaxpost.models.lm import LM
from jaxpost.models.transformer import CACHE_AXES, KVCache, Transformer, count_params

__all__ = ["CACHE_AXES", "KVCache", "LM", "Transformer", "count_params"]
