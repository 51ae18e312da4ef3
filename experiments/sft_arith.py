"""SFT of the small preset on the built-in arithmetic task; held-out accuracy before and after.

    python -m experiments.sft_arith --workdir runs/sft_arith --config.steps=300
"""

from jaxpost import cli
from jaxpost.recipes import sft

CONFIG = sft.SFTConfig(steps=300)

if __name__ == "__main__":
    cli.run(sft.run, CONFIG, default_workdir="runs/sft_arith")
