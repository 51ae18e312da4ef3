"""The fused token-KL core: `common.py` (online math), `reference.py` (plain jnp), `tpu.py` (Mosaic TPU), `gpu.py`
(Pallas GPU, Triton lowering).

`jaxpost.ops.token_kl(impl="pallas_tpu" | "pallas_gpu")` is the public entry; jaxpost/ops/fused_kl.py adds the
custom VJP around the kernels and, under a mesh, the vocab-parallel shard_map.
"""
