"""The mixed-strategy SFT start of the reasoning lab: a 3.2M-parameter Qwen3-style model learns both formats of
`reasoning_arith` (direct "Answer: N" and the column-by-column trace, `trace_fraction` of the gold completions
traced), so that its greedy answers are mostly direct and mostly wrong while the traces it can already write are
mostly right: the start from which RL can select the trace (DeepSeek-R1-Zero, SMART).

    python -m experiments.sft_reason --workdir runs/sft_reason
    python tools/lab_start.py --init-from runs/sft_reason --eval 500 --samples 8     # measures the start

(figures: docs/lab_notes.md)
"""

from jaxpost import cli
from jaxpost.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, TaskConfig
from jaxpost.recipes import sft

CONFIG = sft.SFTConfig(
    steps=300,
    model=ModelConfig.qwen3_bench(vocab_size=128),
    task=TaskConfig(name="reasoning_arith", min_digits=1, max_digits=3, n_operands=2, trace_fraction=0.2),
    tokenizer_vocab=64,
    data=DataConfig(seq_len=128, batch_size=32),
    optim=OptimConfig(lr=3e-3, warmup_steps=20),
    # prompts <= 16 tokens; the longest 3-digit trace is 65 tokens + the stop token
    eval=EvalConfig(n_examples=200, batch_size=200, max_prompt_len=16, max_new_tokens=72),
)

if __name__ == "__main__":
    cli.run(sft.run, CONFIG, default_workdir="runs/sft_reason")
