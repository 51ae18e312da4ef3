"""Measures a reasoning-lab SFT start: what RL could select from it.

For an SFT workdir trained on a task with two answer formats (`reasoning_arith`: a direct "Answer: N" or a worked
trace; `task.has_trace`), on the first `--eval` held-out problems:

  greedy     task_accuracy's greedy answers: accuracy, the fraction that used the trace, accuracy per format
  sampled    `--samples` completions per problem at `--temperature`: accuracy (= pass@1), trace fraction, accuracy
             per format, the fraction of problems with at least one traced / correct sample, the fraction of
             groups with unequal rewards (the problems a GRPO group of this size learns from), and pass@k for each
             k of `--pass-k` (<= --samples): the unbiased estimator of Chen et al. 2021, "Evaluating Large Language
             Models Trained on Code", 1 - C(n - c, k) / C(n, k) per problem (n samples, c correct), averaged
  first_token  the greedy format choice is made at the first completion token ("Answer" or the trace header's
             first character): the mean probability of the direct answer's first token, its quantiles, and the
             fraction of problems where it is below 1/2 (where greedy decoding starts a trace)
  forced_trace greedy decoding with the direct answer's first token excluded at the first position (the most likely
             other token is forced, then greedy): the greedy accuracy of a policy that only learnt to avoid the
             direct answer, i.e. what RL reaches by shifting the first token alone; `first_token_is_gold` says how
             often the forced token is the gold trace's own first token

    python tools/lab_start.py --init-from runs/sft_reason --eval 500 --samples 8 --output lab_start.json

Prints one JSON object (also written to --output). The gap forced_trace.accuracy - greedy.accuracy bounds what RL
can add by format selection alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np

from tools.report import write_report


def log(msg: str) -> None:
    print(f"[lab_start {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)
    (Chen et al. 2021), in the product form 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _quantiles(x: np.ndarray) -> dict:
    return {f"p{q}": float(np.percentile(x, q)) for q in (10, 25, 50, 75, 90)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the SFT workdir to measure")
    p.add_argument("--eval", type=int, default=500, help="held-out problems (the first of the test split)")
    p.add_argument("--samples", type=int, default=8, help="sampled completions per problem (n of pass@k)")
    p.add_argument("--pass-k", default="1,4,8", help="the k of pass@k (those > --samples are left out)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=100, help="prompts per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.eval <= 0 or args.samples <= 0 or args.batch <= 0 or args.temperature <= 0:
        p.error("--eval, --samples, --batch and --temperature must be > 0")
    ks = sorted({int(k) for k in args.pass_k.split(",") if int(k) <= args.samples})

    import jax
    import jax.numpy as jnp

    from jaxpost.config import MeshConfig
    from jaxpost.data import build_prompt_batches, task_from_config
    from jaxpost.models import LM
    from jaxpost.recipes import sft
    from jaxpost.recipes.common import eval_sampler, load_start_params, sft_start, task_accuracy
    from jaxpost.rollout import SamplingConfig
    from jaxpost.sharding import make_mesh
    from jaxpost.tokenizers import decode_completion, load_tokenizer

    t_start = time.perf_counter()
    sft_cfg, sft_dir = sft_start("", args.init_from, sft.SFTConfig(), None)
    task = task_from_config(sft_cfg.task)
    if not hasattr(task, "has_trace"):
        raise ValueError(f"task {sft_cfg.task.name!r} has no has_trace(): lab_start measures two-format tasks")
    tokenizer = load_tokenizer(sft_dir)
    mesh = make_mesh(MeshConfig())
    lm = LM(sft_cfg.model)
    params = load_start_params(sft_cfg, mesh, sft_dir)
    eval_cfg = dataclasses.replace(sft_cfg.eval, n_examples=args.eval, batch_size=args.batch)
    examples = task.examples("test", args.eval)
    batches = build_prompt_batches(examples, tokenizer, batch_size=args.batch, max_prompt_len=eval_cfg.max_prompt_len)
    stop_ids = tuple(tokenizer.stop_ids)
    timings = {}

    # ---- greedy
    t0 = time.perf_counter()
    g = task_accuracy(lm, params, tokenizer, task, examples, eval_cfg, mesh, n_samples=3)
    greedy = {k: g[k] for k in ("accuracy", "trace_fraction", "trace_accuracy", "direct_accuracy", "samples")}
    timings["greedy_s"] = time.perf_counter() - t0
    log(f"greedy: accuracy {g['accuracy']:.3f}, trace fraction {g['trace_fraction']:.3f} ({timings['greedy_s']:.0f} s)")

    # ---- sampled
    t0 = time.perf_counter()
    G = args.samples
    sampler = eval_sampler(lm, mesh, tokenizer.pad_id, eval_cfg.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens, temperature=args.temperature, n_samples=G,
                              stop_ids=stop_ids)
    correct_P, traced_P, traced_correct_P = [], [], []
    truncated, examples_shown = 0, []
    for b, batch in enumerate(batches):
        prompts = [tokens[:n] for tokens, n in zip(batch["tokens"], batch["lengths"])]
        rollout = sampler.generate(params, prompts, sampling, seed=args.seed * 100003 + b)
        for row in np.nonzero(batch["valid"])[0]:
            c = t = tc = 0
            for r in range(row * G, (row + 1) * G):  # rows p * n_samples + g
                text = decode_completion(tokenizer, rollout.tokens[r, :rollout.lengths[r]])
                ok, traced = task.check(text, batch["answers"][row]), task.has_trace(text)
                c, t, tc = c + ok, t + traced, tc + (ok and traced)
                truncated += int(rollout.lengths[r] == eval_cfg.max_new_tokens
                                 and rollout.tokens[r, rollout.lengths[r] - 1] not in stop_ids)
                if traced and len(examples_shown) < 2:
                    examples_shown.append({"prompt": examples[batch["indices"][row]]["prompt"], "completion": text,
                                           "answer": batch["answers"][row], "correct": bool(ok)})
            correct_P.append(c)
            traced_P.append(t)
            traced_correct_P.append(tc)
    correct_P, traced_P, traced_correct_P = map(np.asarray, (correct_P, traced_P, traced_correct_P))
    n_rows = G * len(correct_P)
    sampled = {
        "samples_per_problem": G,
        "temperature": args.temperature,
        "accuracy": float(correct_P.sum() / n_rows),
        "trace_fraction": float(traced_P.sum() / n_rows),
        "trace_accuracy": _ratio(int(traced_correct_P.sum()), int(traced_P.sum())),
        "direct_accuracy": _ratio(int((correct_P - traced_correct_P).sum()), int((G - traced_P).sum())),
        "problems_with_a_trace": float(np.mean(traced_P > 0)),
        "problems_with_a_correct_sample": float(np.mean(correct_P > 0)),
        "mixed_reward_groups": float(np.mean((correct_P > 0) & (correct_P < G))),
        "pass_at_k": {str(k): float(np.mean([pass_at_k(G, int(c), k) for c in correct_P])) for k in ks},
        "truncated_fraction": truncated / n_rows,
        "traced_samples": examples_shown,
    }
    timings["sampled_s"] = time.perf_counter() - t0
    log(f"sampled x{G}: accuracy {sampled['accuracy']:.3f}, trace fraction {sampled['trace_fraction']:.3f}, "
        f"trace accuracy {sampled['trace_accuracy']}, pass@k {sampled['pass_at_k']} ({timings['sampled_s']:.0f} s)")

    # ---- first token: P(direct) and the forced trace
    t0 = time.perf_counter()
    direct_ids = {tokenizer.encode(task.direct_completion(task.problem("test", i)))[0] for i in range(8)}
    if len(direct_ids) != 1:
        raise ValueError(f"the direct completions start with different tokens {sorted(direct_ids)}")
    direct_id = direct_ids.pop()
    excluded = np.asarray([direct_id, *stop_ids], np.int64)
    last_logits = jax.jit(lambda prm, tok_BP, len_B: lm.logits(prm, tok_BP)[jnp.arange(tok_BP.shape[0]), len_B - 1])
    p_direct, forced_prompts, gold_first = [], [], []
    for batch in batches:
        with jax.set_mesh(mesh):
            z_BV = np.array(last_logits(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["lengths"])))
        z_BV = z_BV[:, :tokenizer.vocab_size]  # the model's vocabulary may be padded past the tokenizer's pieces
        prob_BV = np.exp(z_BV - z_BV.max(-1, keepdims=True))
        prob_BV /= prob_BV.sum(-1, keepdims=True)
        z_BV[:, excluded] = -np.inf
        forced_B = z_BV.argmax(-1)
        for row in np.nonzero(batch["valid"])[0]:
            problem = task.problem("test", int(batch["indices"][row]))
            p_direct.append(float(prob_BV[row, direct_id]))
            forced_prompts.append([*batch["tokens"][row, :batch["lengths"][row]], int(forced_B[row])])
            gold_first.append(tokenizer.encode(task.trace_completion(problem))[0])
    p_direct = np.asarray(p_direct)
    first_token = {"p_direct_mean": float(p_direct.mean()), "p_direct_quantiles": _quantiles(p_direct),
                   "fraction_p_direct_below_half": float(np.mean(p_direct < 0.5))}

    forced_sampler = eval_sampler(lm, mesh, tokenizer.pad_id, eval_cfg.max_prompt_len + 1)
    greedy_rest = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens - 1, temperature=0.0, stop_ids=stop_ids)
    forced_ok = forced_traced = 0
    forced_shown = []
    for i in range(0, len(examples), args.batch):
        chunk = forced_prompts[i:i + args.batch]
        # filler rows keep every call at one shape (one compile)
        rollout = forced_sampler.generate(params, chunk + [chunk[0]] * (args.batch - len(chunk)), greedy_rest)
        for j, prompt in enumerate(chunk):
            text = decode_completion(tokenizer, [prompt[-1], *rollout.tokens[j, :rollout.lengths[j]].tolist()])
            ok = task.check(text, examples[i + j]["answer"])
            forced_ok += int(ok)
            forced_traced += int(task.has_trace(text))
            if len(forced_shown) < 2:
                forced_shown.append({"prompt": examples[i + j]["prompt"], "completion": text,
                                     "answer": examples[i + j]["answer"], "correct": bool(ok)})
    n = len(examples)
    forced = {"accuracy": forced_ok / n, "trace_fraction": forced_traced / n,
              "first_token_is_gold": float(np.mean([p[-1] == t for p, t in zip(forced_prompts, gold_first)])),
              "samples": forced_shown}
    timings["first_token_and_forced_s"] = time.perf_counter() - t0
    log(f"first token: mean P(direct) {first_token['p_direct_mean']:.3f}; forced trace: accuracy "
        f"{forced['accuracy']:.3f}, trace fraction {forced['trace_fraction']:.3f} "
        f"({timings['first_token_and_forced_s']:.0f} s)")

    out = {
        "init_from": sft_dir,
        "task": dataclasses.asdict(sft_cfg.task),
        "eval_problems": n,
        "greedy": greedy,
        "sampled": sampled,
        "first_token": first_token,
        "forced_trace": forced,
        "gap_forced_minus_greedy": forced["accuracy"] - greedy["accuracy"],
        "timings_s": {**{k: round(v, 1) for k, v in timings.items()},
                      "total_s": round(time.perf_counter() - t_start, 1)},
    }
    if not all(math.isfinite(v) for v in (out["gap_forced_minus_greedy"], first_token["p_direct_mean"])):
        raise FloatingPointError("non-finite measurement")  # a NaN model: say so rather than report it
    write_report(out, args.output)
    return out


if __name__ == "__main__":
    main()
