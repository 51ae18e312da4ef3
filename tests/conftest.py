"""Test set-up: 8 emulated CPU devices, configured before any JAX backend starts."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (the tiny model's steps, init, sampler) through different jit objects: a
# persistent compilation cache shared by the xdist workers compiles each once per run.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxpost-tests-jit-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
