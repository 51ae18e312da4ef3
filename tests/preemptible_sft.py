"""A tiny SFT run for the preemption test (tests/test_faults.py), as a command:

    python -m tests.preemptible_sft WORKDIR [DELAY_S]

`DELAY_S` seconds are slept before each batch is drawn (numbers unchanged), so that a signal lands mid-run. The
devices are set up as tests/conftest.py does, so the run in a subprocess and `run(workdir)` in the test process use
the same mesh and compute the same numbers.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

from jaxpost.config import DataConfig, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from jaxpost.recipes import sft  # noqa: E402

CONFIG = sft.SFTConfig(
    steps=12, model=ModelConfig.tiny(), data=DataConfig(seq_len=32, batch_size=8),
    optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    train=TrainConfig(checkpoint_every=5, log_every=1), eval=EvalConfig(n_examples=0))


class _Slow:
    """The SFT iterator, `delay_s` slower per batch."""

    def __init__(self, batches, delay_s: float):
        self._batches, self._delay_s = batches, delay_s

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self._delay_s)
        return next(self._batches)


def run(workdir: str, delay_s: float = 0.0):
    if delay_s:
        build = sft.build_sft_iterator
        sft.build_sft_iterator = lambda *a, **kw: _Slow(build(*a, **kw), delay_s)
    return sft.run(CONFIG, workdir)


if __name__ == "__main__":
    run(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
