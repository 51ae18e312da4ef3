"""The quickstart, the whole pipeline on a CPU: supervised fine-tuning of a 3.2M-parameter Qwen3-style model on the
built-in arithmetic task (`experiments.sft_arith`), then GRPO from it with the task's checker as the reward
(`experiments.grpo_arith`, shortened); held-out greedy accuracy before SFT, after SFT and after GRPO, and the RL
curves (rl.png). About ten minutes.

    python -m experiments.quickstart --workdir runs/quickstart
"""

import dataclasses
import json
import os

from experiments import grpo_arith
from jaxpost import cli
from jaxpost.recipes import rl

CONFIG = dataclasses.replace(grpo_arith.CONFIG, steps=40)


def main(cfg: rl.RLConfig, workdir: str) -> None:
    results = rl.run(cfg, workdir)  # runs the SFT start into workdir/sft first
    with open(os.path.join(results["sft_dir"], "results.json")) as f:
        sft = json.load(f)
    with open(os.path.join(results["sft_dir"], "config.json")) as f:
        n_sft, n_rl = json.load(f)["eval"]["n_examples"], cfg.eval.n_examples
    print(f"\nheld-out accuracy: {sft['accuracy_before']:.1%} before SFT -> {sft['accuracy_after']:.1%} after "
          f"{sft['steps']} SFT steps ({n_sft} problems, {sft['wall_time_s']:.0f} s); GRPO from it: "
          f"{results['accuracy_before']:.1%} -> {results['accuracy_after']:.1%} after {results['steps']} iterations "
          f"({n_rl} problems, {results['rl_time_s']:.0f} s). Curves: {workdir}/rl.png, {results['sft_dir']}/sft.png")
    for ex in results["samples"]:
        print(f"  {ex['prompt']!r:28} -> {ex['completion']!r:8} (answer {ex['answer']})")


if __name__ == "__main__":
    cli.run(main, CONFIG, default_workdir="runs/quickstart")
