"""A Bradley-Terry reward model from the SFT start of `experiments.sft_arith`: trained on correct-vs-near-miss
answers of the arithmetic task's train split, measured by pairwise accuracy on held-out test-split pairs.

    python -m experiments.rm_arith --workdir runs/rm_arith                               # SFT first, then the RM
    python -m experiments.rm_arith --workdir runs/rm --config.init_from=runs/sft_arith   # from an SFT workdir
"""

from experiments import sft_arith
from jaxpost import cli
from jaxpost.recipes import rm

CONFIG = rm.RMConfig(steps=150, sft=sft_arith.CONFIG)

if __name__ == "__main__":
    cli.run(rm.run, CONFIG, default_workdir="runs/rm_arith")
