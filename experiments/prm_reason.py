"""A process reward model on the reasoning lab: the lab's policy samples solutions, Monte-Carlo completions of every
step prefix label the steps (Math-Shepherd), and a decoder + scalar head from the SFT start learns to score each
line of a worked trace; measured by the per-step ROC AUC on held-out gold traces with one injected arithmetic error.

    python -m experiments.sft_reason --workdir runs/sft_reason
    python -m experiments.grpo_reason --workdir runs/grpo_reason --config.init_from=runs/sft_reason
    python -m experiments.prm_reason --workdir runs/prm_reason                          # hard labels
    python -m experiments.prm_reason --workdir runs/prm_soft --config.label=soft        # soft labels
    python -m experiments.prm_reason --workdir runs/orm_reason --config.label=outcome \
        --config.train_injected=0 --config.steps=200                                    # the ORM baseline
    python -m experiments.prm_reason --workdir runs/prm_mc --config.train_injected=0 \
        --config.steps=150                                                              # Monte-Carlo labels only
    python -m experiments.prm_reason --workdir runs/prm_gold --config.label=gold \
        --config.train_injected=0 --config.steps=200                                    # true step labels

`policy_from` (the GRPO model: it writes worked traces) samples the solutions and their Monte-Carlo completions at
temperature 1.0; `init_from` is the PRM's decoder. The GRPO model's errors are few and systematic (the same wrong line
for a problem in most samples), so from Monte-Carlo labels alone the PRM learns mostly which problems the policy fails
(injected-error step AUC 0.58; 0.64 with solutions sampled at 1.5). Load a trained PRM with
`jaxpost.recipes.prm.load_prm(workdir)` and score steps with `jaxpost.recipes.prm.StepScorer`.

Beside the policy's labelled samples, the PRM trains on 1000 train problems' gold traces and a copy of each with one
wrong digit (`train_injected`, labelled by construction): from Monte-Carlo labels alone it learns which problems the
policy fails rather than which line is wrong (figures: docs/benchmarks.md, "Process reward models").
"""

from experiments import sft_reason
from jaxpost import cli
from jaxpost.config import DataConfig, OptimConfig, TrainConfig
from jaxpost.recipes import prm

CONFIG = prm.PRMConfig(
    steps=300,
    init_from="runs/sft_reason",
    policy_from="runs/grpo_reason",
    sft=sft_reason.CONFIG,
    label="hard",
    n_problems=192,
    samples_per_problem=4,
    mc_rollouts=4,
    sample_temperature=1.0,  # 1.5 gives more, and more varied, wrong steps (MC labels alone: step AUC 0.64, not 0.58)
    mc_temperature=1.0,
    sample_batch=128,
    n_eval_problems=48,
    n_auc_problems=200,
    train_injected=1000,
    max_prompt_len=sft_reason.CONFIG.eval.max_prompt_len,  # prompts take <= 16 tokens
    max_new_tokens=sft_reason.CONFIG.eval.max_new_tokens,  # the longest 3-digit trace and its stop token
    data=DataConfig(seq_len=128, batch_size=16),
    optim=OptimConfig(lr=5e-4, warmup_steps=20),
    train=TrainConfig(log_every=10, checkpoint_every=50, eval_every=50),
)

if __name__ == "__main__":
    cli.run(prm.run, CONFIG, default_workdir="runs/prm_reason")
