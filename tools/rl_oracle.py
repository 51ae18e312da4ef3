"""The oracle ceiling of an RL budget: what the same number of updates reach when every sample is the right answer.

An RL iteration of `experiments.grpo_arith` makes one optimizer update from `prompts_per_step` prompts. The most
any policy-gradient method can extract from such an update is the gold answer of every prompt, which turns the
update into an SFT step on those answers (GRPO's token-mean loss with every sample correct and advantage 1 has the
gradient of the completion-only cross-entropy). This tool runs exactly that from an SFT start: `--updates` steps
of SFT on `--prompts` gold train problems each (one problem per row, completion-only token-mean loss), with a
fresh AdamW configured like the RL experiment's optimizer at each learning rate of `--lrs`, and reports held-out
greedy accuracy (the RL recipe's evaluation) every `--eval-every` updates.

    python tools/rl_oracle.py --init-from runs/sft_arith                       # 160 updates (15 min of grpo_arith)
    python tools/rl_oracle.py --init-from runs/sft_arith --rl-workdir runs/grpo_arith --budget-s 900
        # as many updates as grpo_arith's measured iterations fit into 15 minutes

If the oracle cannot raise accuracy by X points in N updates, no RL run of N iterations of that size can either
(short of a higher stable learning rate). Prints one JSON object (also written to --output).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from tools.report import write_report


def log(msg: str) -> None:
    print(f"[rl_oracle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measured_iteration_time(rl_workdir: str) -> float:
    """Mean wall time of an RL run's iterations (`step_time_s` in its metrics.jsonl; the first, compiling one
    left out)."""
    import os

    from jaxpost.train.loop import read_metrics

    times = [m["step_time_s"] for m in read_metrics(os.path.join(rl_workdir, "metrics.jsonl"))
             if "step_time_s" in m][1:]
    if not times:
        raise ValueError(f"{rl_workdir}/metrics.jsonl has no step_time_s records")
    return sum(times) / len(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the SFT workdir the RL experiment starts from")
    p.add_argument("--updates", type=int, default=160)
    p.add_argument("--rl-workdir", default="", help="take the number of updates from this RL run's iteration time")
    p.add_argument("--budget-s", type=float, default=900.0, help="the RL time budget (with --rl-workdir)")
    p.add_argument("--prompts", type=int, default=0, help="problems per update (default: grpo_arith's)")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    p.add_argument("--eval", type=int, default=500, help="held-out problems (the RL recipe's evaluation)")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    import jax

    from experiments import grpo_arith
    from jaxpost.config import MeshConfig
    from jaxpost.data import build_sft_iterator, task_from_config
    from jaxpost.models import LM
    from jaxpost.recipes.common import device_put_batch, task_accuracy
    from jaxpost.recipes.common import load_start_params, sft_start
    from jaxpost.sharding import make_mesh
    from jaxpost.tokenizers import load_tokenizer
    from jaxpost.train.optim import make_optimizer
    from jaxpost.batch import split_microbatches
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import abstract_train_state, new_train_state, state_shardings

    rl_cfg = grpo_arith.CONFIG
    prompts = args.prompts or rl_cfg.rollout.prompts_per_step
    updates = args.updates
    iteration_s = None
    if args.rl_workdir:
        iteration_s = measured_iteration_time(args.rl_workdir)
        updates = int(args.budget_s // iteration_s)
        log(f"{args.rl_workdir}: {iteration_s:.2f} s per iteration -> {updates} updates in {args.budget_s:.0f} s")
    sft_cfg, sft_dir = sft_start("", args.init_from, rl_cfg.sft, None)
    task = task_from_config(sft_cfg.task)
    tokenizer = load_tokenizer(sft_dir)
    mesh = make_mesh(MeshConfig())
    lm = LM(sft_cfg.model)
    eval_cfg = dataclasses.replace(rl_cfg.eval, n_examples=args.eval)
    examples = task.examples("test", args.eval)

    def accuracy(params) -> float:
        return task_accuracy(lm, params, tokenizer, task, examples, eval_cfg, mesh)["accuracy"]

    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    start = accuracy(start_params)
    log(f"SFT start {sft_dir}: held-out accuracy {start:.3f} ({args.eval} problems)")
    runs = {}
    for lr in [float(x) for x in args.lrs.split(",")]:
        optim = dataclasses.replace(rl_cfg.optim, lr=lr)
        tx, schedule = make_optimizer(optim, updates, logical_axes=lm.logical_axes)
        abstract = abstract_train_state(lm, tx)
        shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh, model=lm)
        state = jax.jit(lambda p, k: new_train_state(lm, tx, p, k), out_shardings=shardings)(
            load_start_params(sft_cfg, mesh, sft_dir), jax.random.PRNGKey(args.seed))
        # one gold problem per row, rows as long as the RL rows: the GRPO update with every sample correct
        batches = build_sft_iterator(task.source("train"), tokenizer, seq_len=rl_cfg.rollout.seq_len,
                                     batch_size=prompts, packing=False, overlong="error", on_empty="error",
                                     shuffle=True, seed=args.seed)
        step = make_step(lm, tx, schedule, SFT(lm), mesh=mesh, state_shardings=shardings, units=prompts, grad_accum=1)
        curve, t0 = [(0, start)], time.perf_counter()
        for i in range(1, updates + 1):
            state, metrics = step(state, device_put_batch(split_microbatches(next(batches), 1), step.batch_shardings))
            if i % args.eval_every == 0 or i == updates:
                curve.append((i, accuracy(state.params)))
                log(f"lr {lr:g}: update {i}: loss {float(metrics['loss']):.4f}, held-out accuracy {curve[-1][1]:.3f}")
        runs[f"{lr:g}"] = {"curve": curve, "best": max(a for _, a in curve[1:]), "final": curve[-1][1],
                           "time_s": round(time.perf_counter() - t0, 1)}
    out = {"init_from": sft_dir, "accuracy_start": start, "updates": updates, "prompts_per_update": prompts,
           "rl_iteration_s": iteration_s, "budget_s": args.budget_s if iteration_s else None,
           "optimizer": dataclasses.asdict(rl_cfg.optim), "eval_problems": args.eval, "lrs": runs,
           "best_gain": max(r["best"] for r in runs.values()) - start}
    write_report(out, args.output)


if __name__ == "__main__":
    main()
