"""PPO with a value head from the SFT start of `experiments.sft_arith` on the arithmetic task: GAE advantages
(gamma 1, lambda 0.95, whitened) from a scalar value head on the policy's decoder, clipped value loss, PPO-clip,
a k1 KL penalty to the SFT model in the reward, 2 epochs of 4 mini-batches per rollout batch.

    python -m experiments.ppo_arith --workdir runs/ppo_arith
    python -m experiments.ppo_arith --workdir runs/ppo --config.init_from=runs/sft_arith
    python -m experiments.ppo_arith --config.value=critic        # a separate critic decoder instead of a head
"""

import dataclasses

from experiments import grpo_arith
from jaxpost import cli
from jaxpost.recipes import rl
from jaxpost.config import AdvantageConfig, RLLossConfig

CONFIG = dataclasses.replace(
    grpo_arith.CONFIG,
    steps=50,
    value="head",
    advantage=AdvantageConfig(estimator="gae", gamma=1.0, lam=0.95, whiten=True),
    loss=RLLossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.01, kl_estimator="k1", kl_in="reward", vf_coef=0.1,
                      vf_clip=0.2),
    rollout=dataclasses.replace(grpo_arith.CONFIG.rollout, ppo_epochs=2, minibatches=4),
)

if __name__ == "__main__":
    cli.run(rl.run, CONFIG, default_workdir="runs/ppo_arith")
