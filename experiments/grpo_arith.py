"""GRPO from the SFT start of `experiments.sft_arith` on the arithmetic task: 64 prompts x 8 samples per iteration,
the task's checker as a 0/1 reward, group-normalised advantages, PPO-clip with DAPO's clip-higher, token-mean loss;
held-out greedy accuracy before and after, reward and accuracy curves (rl.png).

    python -m experiments.grpo_arith --workdir runs/grpo_arith                                # SFT first, then GRPO
    python -m experiments.grpo_arith --workdir runs/grpo --config.init_from=runs/sft_arith    # from an SFT workdir
    python -m experiments.grpo_arith --config.advantage.estimator=rloo                        # RLOO
    python -m experiments.grpo_arith --config.advantage.estimator=dr_grpo \\
        --config.loss.aggregation=seq_mean_token_sum_norm                                     # Dr.GRPO
    python -m experiments.grpo_arith --config.rollout.dynamic_sampling=True                   # DAPO's filter
"""

from experiments import sft_arith
from jaxpost import cli
from jaxpost.config import OptimConfig, TrainConfig
from jaxpost.recipes import rl
from jaxpost.config import EvalConfig
from jaxpost.config import RLLossConfig, RolloutConfig

# Adam restarted on an SFT model: a 20-update warm-up lets its second moments settle before the learning rate is
# reached (without it the first, sign-like Adam steps perturb every weight by ~lr; 1e-3 and 3e-4 without warm-up
# collapse), and a k3 KL term keeps the noise-dominated updates near the SFT start (docs/benchmarks.md has the
# sweep: on this 3.2M model no setting tried raises held-out accuracy by more than ~4 points).
CONFIG = rl.RLConfig(
    steps=100,
    sft=sft_arith.CONFIG,
    rollout=RolloutConfig(prompts_per_step=64, group_size=8, max_new_tokens=7, max_prompt_len=16),
    loss=RLLossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.1, kl_estimator="k3"),
    optim=OptimConfig(lr=2e-4, warmup_steps=20, b2=0.999, min_lr_ratio=1.0),
    train=TrainConfig(log_every=10, checkpoint_every=25, eval_every=25),
    eval=EvalConfig(n_examples=500),
)

if __name__ == "__main__":
    cli.run(rl.run, CONFIG, default_workdir="runs/grpo_arith")
