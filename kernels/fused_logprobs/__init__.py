"""The fused log-prob/entropy core: `reference.py` (plain jnp), `tpu.py` (Mosaic TPU), `gpu.py` (Pallas GPU).

`jaxpost.ops.token_logprobs` is the public entry; it picks a kernel, adds the custom VJP and the vocab-parallel
shard_map around it.
"""
