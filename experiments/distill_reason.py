"""Distillation on the reasoning lab: a GRPO-trained lab model (`experiments.grpo_reason`, 3.2M parameters, mostly
worked traces) teaches a quarter-size student (d_model 128, 0.8M parameters) that starts from its own SFT run on the
same mixed-strategy data with the teacher's tokenizer.

    # 1. the teacher: the lab's SFT start, then GRPO from it
    python -m experiments.sft_reason --workdir runs/sft_reason
    python -m experiments.grpo_reason --workdir runs/grpo_reason --config.init_from=runs/sft_reason
    # 2. the student's SFT start: a quarter-size model, the teacher's tokenizer (distillation needs identical pieces)
    python -m experiments.sft_reason --workdir runs/sft_reason_quarter \\
        --config.model.name=qwen3_bench_quarter_v128 --config.model.d_model=128 --config.model.n_heads=2 \\
        --config.model.n_kv_heads=1 --config.model.mlp_dim=384 \\
        --config.tokenizer_path=runs/sft_reason/tokenizer.model
    # 3. distillation (method: logit_kd | seq_kd | gkd | on_policy)
    python -m experiments.distill_reason --workdir runs/distill_reason_gkd
    python -m experiments.distill_reason --workdir runs/distill_reason_onp --config.method=on_policy
    python -m experiments.distill_reason --workdir runs/distill_reason_seq --config.method=seq_kd \\
        --config.teacher_temperature=0
    python -m experiments.distill_reason --workdir runs/distill_reason_kd --config.method=logit_kd
    # on-policy distillation inside the RL recipe: the teacher's per-token log-ratio as a dense advantage (alone, or
    # added to GRPO's task advantage without --config.correctness_weight=0)
    python -m experiments.grpo_reason --workdir runs/rl_teacher --config.init_from=runs/sft_reason_quarter \\
        --config.teacher_from=runs/grpo_reason --config.advantage.teacher_coef=1 --config.correctness_weight=0

`teacher_from` and `init_from` default to the workdirs above (`--config.teacher_from=...` to change them).
Figures (every method against GRPO from the student's start, at equal wall time): docs/benchmarks.md, "Distillation
into a quarter-size student".
"""

import dataclasses

from experiments import sft_reason
from jaxpost import cli
from jaxpost.config import DataConfig, OptimConfig, TrainConfig
from jaxpost.recipes import distill

CONFIG = distill.DistillConfig(
    steps=200,
    method="gkd",
    teacher_from="runs/grpo_reason",
    init_from="runs/sft_reason_quarter",
    lmbda=0.5,
    beta=0.5,
    n_prompts=2048,
    sample_batch=256,
    max_prompt_len=sft_reason.CONFIG.eval.max_prompt_len,  # prompts take <= 16 tokens
    max_new_tokens=sft_reason.CONFIG.eval.max_new_tokens,  # the longest 3-digit trace and its stop token
    data=DataConfig(seq_len=128, batch_size=32),
    optim=OptimConfig(lr=1e-3, warmup_steps=10),
    train=TrainConfig(log_every=10, checkpoint_every=50, eval_every=50),
    eval=dataclasses.replace(sft_reason.CONFIG.eval, n_examples=500, batch_size=250),
)

if __name__ == "__main__":
    cli.run(distill.run, CONFIG, default_workdir="runs/distill_reason")
