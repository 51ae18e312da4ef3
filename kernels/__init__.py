"""Pallas kernels, one folder per op: `reference.py` (plain jnp), `tpu.py` (Mosaic TPU), `gpu.py` (Pallas GPU)."""
