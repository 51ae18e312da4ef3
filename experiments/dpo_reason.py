"""DPO on the reasoning lab, from the mixed-strategy SFT start of `experiments.sft_reason`: on-policy pairs of the
SFT model's own sampled answers (a correct one chosen, an incorrect one rejected, labelled by the checker), so the
chosen answers are mostly worked traces and the rejected ones mostly direct guesses; DPO with an NLL term on the
chosen answer (RPO), as in `experiments.dpo_arith`.

    python -m experiments.dpo_reason --workdir runs/dpo_reason
    python -m experiments.dpo_reason --workdir runs/dpo --config.init_from=runs/sft_reason
    python -m experiments.dpo_reason --config.sft_weight=0            # plain DPO

(figures: docs/benchmarks.md, "The reasoning lab")
"""

import dataclasses

from experiments import sft_reason
from jaxpost import cli
from jaxpost.config import DataConfig
from jaxpost.recipes import dpo

CONFIG = dpo.DPOConfig(steps=100, sft=sft_reason.CONFIG, beta=0.5, sft_weight=1.0, n_prompts=1024,
                       samples_per_prompt=8, pairs_per_prompt=2, data=DataConfig(seq_len=96, batch_size=32),
                       eval=dataclasses.replace(sft_reason.CONFIG.eval, n_examples=500, batch_size=250))

if __name__ == "__main__":
    cli.run(dpo.run, CONFIG, default_workdir="runs/dpo_reason")
