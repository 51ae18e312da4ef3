"""SFT of a 3.2M-parameter Qwen3-style model on the built-in arithmetic task; held-out accuracy before and after.
The SFT start of the preference and RL experiments (`experiments.dpo_arith`, `experiments.rm_arith`).

    python -m experiments.sft_arith --workdir runs/sft_arith --config.steps=300
"""

from jaxpost import cli
from jaxpost.config import DataConfig, ModelConfig, OptimConfig
from jaxpost.recipes import sft

CONFIG = sft.SFTConfig(
    steps=300,
    model=ModelConfig.qwen3_bench(vocab_size=128),
    data=DataConfig(seq_len=64, batch_size=32),
    optim=OptimConfig(lr=3e-3, warmup_steps=20),
)

if __name__ == "__main__":
    cli.run(sft.run, CONFIG, default_workdir="runs/sft_arith")
