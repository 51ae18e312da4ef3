"""Models: the decoder (`Transformer`), `LM`, the handle that steps use to build, shard and apply it, and Hugging Face
checkpoints in and out (`hf`: `from_pretrained`, `save_pretrained`)."""

from jaxpost.models.hf import Pretrained, from_pretrained, logits, save_pretrained
from jaxpost.models.lm import LM
from jaxpost.models.transformer import CACHE_AXES, KVCache, Transformer, count_params

__all__ = ["CACHE_AXES", "KVCache", "LM", "Pretrained", "Transformer", "count_params", "from_pretrained", "logits",
           "save_pretrained"]
