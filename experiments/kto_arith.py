"""KTO from the SFT start of `experiments.sft_arith` on the arithmetic task: the SFT model's own sampled answers,
each labelled desirable or undesirable by the task's checker (unpaired: no correct/incorrect pairing needed, the
classes balanced by KTO's weights); held-out accuracy before and after, and a plot of the implicit rewards, their
margin and the KL reference point z0 (kto.png).

    python -m experiments.kto_arith --workdir runs/kto_arith                               # SFT first, then KTO
    python -m experiments.kto_arith --workdir runs/kto --config.init_from=runs/sft_arith   # from an SFT workdir
    python -m experiments.kto_arith --config.loss=apo_zero_unpaired                        # the other unpaired loss
"""

from experiments import sft_arith
from jaxpost import cli
from jaxpost.config import EvalConfig
from jaxpost.recipes import kto

CONFIG = kto.KTOConfig(steps=150, sft=sft_arith.CONFIG, beta=0.1, n_prompts=2048, samples_per_prompt=4,
                       eval=EvalConfig(n_examples=500))

if __name__ == "__main__":
    cli.run(kto.run, CONFIG, default_workdir="runs/kto_arith")
