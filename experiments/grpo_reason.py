"""GRPO on the reasoning lab: from the mixed-strategy SFT start (`experiments.sft_reason`: greedy answers mostly
direct and mostly wrong, traces mostly right), RL with the 0/1 checker as the only reward learns to write the worked
trace: held-out greedy accuracy, the fraction of traced answers and the response length rise together (the
DeepSeek-R1-Zero curve, selected rather than taught). The trace is never rewarded as such; `reward/trace` and
`eval_trace_fraction` only measure it.

    python -m experiments.grpo_reason --workdir runs/grpo_reason                                 # SFT start first
    python -m experiments.grpo_reason --workdir runs/grpo --config.init_from=runs/sft_reason     # from an SFT workdir
    python -m experiments.grpo_reason --config.advantage.estimator=rloo                          # RLOO
    python -m experiments.grpo_reason --config.advantage.estimator=dr_grpo \\
        --config.loss.aggregation=seq_mean_token_sum_norm                                        # Dr. GRPO
    python -m experiments.grpo_reason --config.loss.policy_loss=gspo --config.loss.eps_low=3e-4 \\
        --config.loss.eps_high=4e-4 --config.loss.aggregation=seq_mean_token_mean             # GSPO
    python -m experiments.grpo_reason --config.loss.policy_loss=cispo                         # CISPO (also sapo,
                                                                                              # vespo, luspo)
    python -m experiments.grpo_reason --config.rollout.sampler_dtype=bfloat16 \\
        --config.loss.rollout_correction=token_truncate --config.loss.correction_clip_max=2   # a bf16 sampler + TIS

(figures: docs/benchmarks.md, "The reasoning lab")
"""

import dataclasses

from experiments import sft_reason
from jaxpost import cli
from jaxpost.config import OptimConfig, RLLossConfig, RolloutConfig, TrainConfig
from jaxpost.recipes import rl

CONFIG = rl.RLConfig(
    steps=20,
    sft=sft_reason.CONFIG,
    rollout=RolloutConfig(prompts_per_step=32, group_size=8, max_new_tokens=72, max_prompt_len=16),
    loss=RLLossConfig(eps_high=0.28),
    optim=OptimConfig(lr=1e-4, warmup_steps=3, min_lr_ratio=1.0),
    train=TrainConfig(log_every=5, checkpoint_every=10, eval_every=10),
    eval=dataclasses.replace(sft_reason.CONFIG.eval, n_examples=500, batch_size=250),
)

if __name__ == "__main__":
    cli.run(rl.run, CONFIG, default_workdir="runs/grpo_reason")
