"""Test-time scaling on the reasoning lab: a quarter-size policy (the logit-KD student of `experiments.distill_reason`,
0.82M parameters) spends more compute at test time (majority vote, best-of-N with a verifier, an ORM or a PRM,
weighted best-of-N, token beam search, PRM-guided step beam search and DVTS, budget forcing) against the greedy
accuracy of the 4x larger lab model it was distilled from (search-and-learn's small-policy-plus-search setting).

    # the models: the lab's SFT and GRPO runs, the student (experiments/distill_reason.py's docstring), and the reward
    # models trained on the GRPO model's samples (experiments/prm_reason.py's docstring)
    python -m experiments.prm_reason --workdir runs/prm_reason
    python -m experiments.prm_reason --workdir runs/orm_reason --config.label=outcome
    python -m experiments.tts_reason --workdir runs/tts_reason
    # the larger model's token probabilities as the step verifier (training-free) instead of the trained PRM
    python -m experiments.tts_reason --workdir runs/tts_likelihood --config.prm_kind=likelihood \
        --config.prm_from=runs/grpo_reason --config.prm_agg=min

Figures (accuracy against samples and generated tokens, per method): docs/benchmarks.md, "Test-time scaling". With
the likelihood verifier, weighted best-of-8 of the student reaches 76.0 % against the larger model's 73.0 % greedy; the
trained PRM (step AUC 0.76 on injected errors, but at chance within a problem) makes best-of-N worse as N grows.
"""

from jaxpost import cli
from jaxpost.recipes import tts

CONFIG = tts.TTSConfig(
    policy_from="runs/distill_reason_kd",
    large_from="runs/grpo_reason",
    prm_from="runs/prm_reason",
    orm_from="runs/orm_reason",
    n_problems=200,
    temperature=0.7,  # the student's samples: 47 % right at 1.0, 59 % at 0.7 (64 problems x 8)
    max_n=32,
    n_search_problems=100,
    beam_widths=(1, 4, 16),
    search_ns=(4, 16),
    budgets=(8, 16, 32, 48, 64),
)

if __name__ == "__main__":
    cli.run(tts.run, CONFIG, default_workdir="runs/tts_reason")
