"""PPO with a value head on the reasoning lab, from the mixed-strategy SFT start of `experiments.sft_reason`: GAE
advantages (gamma 1, lambda 0.95, whitened) from a scalar head on the policy's decoder, clipped value loss, PPO-clip,
a k1 KL penalty to the SFT model in the reward, 2 epochs of 2 mini-batches per rollout batch. Like
`experiments.grpo_reason`, the 0/1 checker is the only reward; the trace is learned, not rewarded.

    python -m experiments.ppo_reason --workdir runs/ppo_reason
    python -m experiments.ppo_reason --workdir runs/ppo --config.init_from=runs/sft_reason

(figures: docs/benchmarks.md, "The reasoning lab")
"""

import dataclasses

from experiments import grpo_reason
from jaxpost import cli
from jaxpost.config import AdvantageConfig, RLLossConfig
from jaxpost.recipes import rl

CONFIG = dataclasses.replace(
    grpo_reason.CONFIG,
    value="head",
    advantage=AdvantageConfig(estimator="gae", gamma=1.0, lam=0.95, whiten=True),
    loss=RLLossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.01, kl_estimator="k1", kl_in="reward", vf_coef=0.1,
                      vf_clip=0.2),
    rollout=dataclasses.replace(grpo_reason.CONFIG.rollout, ppo_epochs=2, minibatches=2),
)

if __name__ == "__main__":
    cli.run(rl.run, CONFIG, default_workdir="runs/ppo_reason")
