"""DPO from the SFT start of `experiments.sft_arith` on the arithmetic task: pairs of the SFT model's own sampled
answers (a correct one chosen, an incorrect one rejected, labelled by the task's checker); held-out accuracy before
and after, and a plot of rewards and margins (dpo.png).

    python -m experiments.dpo_arith --workdir runs/dpo_arith                               # SFT first, then DPO
    python -m experiments.dpo_arith --workdir runs/dpo --config.init_from=runs/sft_arith   # from an SFT workdir
    python -m experiments.dpo_arith --config.loss=ipo --config.beta=0.5                    # any DPO-family loss
"""

from experiments import sft_arith
from jaxpost import cli
from jaxpost.recipes import dpo
from jaxpost.config import EvalConfig

# DPO with an NLL term on the chosen answer (RPO, TRL's rpo_alpha / "sft" loss term): plain DPO on these short
# answers lowers the chosen answers' likelihood along with the rejected ones' and greedy accuracy falls
# (docs/benchmarks.md has the comparison).
CONFIG = dpo.DPOConfig(steps=150, sft=sft_arith.CONFIG, beta=0.5, sft_weight=1.0, n_prompts=4096, pairs_per_prompt=2,
                       eval=EvalConfig(n_examples=500))

if __name__ == "__main__":
    cli.run(dpo.run, CONFIG, default_workdir="runs/dpo_arith")
