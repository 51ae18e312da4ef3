"""The quickstart, the reasoning lab on a CPU in about ten minutes: supervised fine-tuning of a 3.2M-parameter
Qwen3-style model on `reasoning_arith` with a minority of worked answers (`experiments.sft_reason`: it learns to
answer directly, mostly wrongly, and can also write a column-by-column trace, mostly rightly), then GRPO from it
with the checker as the only reward (`experiments.grpo_reason`, shortened). RL learns to use the trace: held-out
greedy accuracy, the fraction of traced answers and the response length rise together. Prints them before and
after with sample answers, and writes the curves (rl.png, sft/sft.png).

    python -m experiments.quickstart --workdir runs/quickstart
"""

import dataclasses
import json
import os

from experiments import grpo_reason
from jaxpost import cli
from jaxpost.recipes import rl

CONFIG = dataclasses.replace(grpo_reason.CONFIG, steps=15,
                             eval=dataclasses.replace(grpo_reason.CONFIG.eval, n_examples=200, batch_size=200))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main(cfg: rl.RLConfig, workdir: str) -> None:
    results = rl.run(cfg, workdir)  # runs the SFT start into workdir/sft first
    with open(os.path.join(results["sft_dir"], "results.json")) as f:
        sft = json.load(f)
    print(f"\nSFT ({sft['steps']} steps, {sft['wall_time_s']:.0f} s): held-out accuracy {_pct(sft['accuracy_before'])} "
          f"-> {_pct(sft['accuracy_after'])}")
    print(f"GRPO ({results['steps']} iterations, {results['rl_time_s']:.0f} s), {cfg.eval.n_examples} held-out "
          f"problems, greedy:")
    print(f"  accuracy          {_pct(results['accuracy_before'])} -> {_pct(results['accuracy_after'])}")
    print(f"  traced answers    {_pct(results.get('trace_fraction_before'))} -> "
          f"{_pct(results.get('trace_fraction_after'))}")
    print(f"  training reward   {results.get('reward_mean_first10', 0):.2f} (first iterations) -> "
          f"{results.get('reward_mean_last10', 0):.2f} (last); response length "
          f"{results.get('response_length_first10', 0):.0f} -> {results.get('response_length_last10', 0):.0f} tokens")
    print(f"Curves: {workdir}/rl.png, {results['sft_dir']}/sft.png. Sample answers after GRPO:")
    for ex in results["samples"][:3]:
        mark = "right" if ex["correct"] else f"wrong, answer {ex['answer']}"
        print(f"  {ex['prompt']}  ({mark})\n    " + ex["completion"].replace("\n", "\n    "))


if __name__ == "__main__":
    cli.run(main, CONFIG, default_workdir="runs/quickstart")
