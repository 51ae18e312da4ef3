"""KTO on the reasoning lab, from the mixed-strategy SFT start of `experiments.sft_reason`: the SFT model's own
sampled answers, each labelled desirable or undesirable by the checker (unpaired), so most desirable answers are
worked traces and most undesirable ones direct guesses; classes balanced by KTO's weights.

    python -m experiments.kto_reason --workdir runs/kto_reason
    python -m experiments.kto_reason --workdir runs/kto --config.init_from=runs/sft_reason

(figures: docs/benchmarks.md, "The reasoning lab")
"""

import dataclasses

from experiments import sft_reason
from jaxpost import cli
from jaxpost.config import DataConfig
from jaxpost.recipes import kto

CONFIG = kto.KTOConfig(steps=100, sft=sft_reason.CONFIG, beta=0.1, n_prompts=1024, samples_per_prompt=4,
                       data=DataConfig(seq_len=96, batch_size=64),
                       eval=dataclasses.replace(sft_reason.CONFIG.eval, n_examples=500, batch_size=250))

if __name__ == "__main__":
    cli.run(kto.run, CONFIG, default_workdir="runs/kto_reason")
