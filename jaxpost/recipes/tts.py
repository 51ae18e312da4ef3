"""The test-time scaling recipe: held-out accuracy of one policy against samples and generated tokens, for every
method of `jaxpost.inference`, on a built-in task with worked answers (the reasoning lab).

1. Models: the policy (`policy_from`, any recipe's workdir), optionally a larger policy for its greedy accuracy
   (`large_from`: the search-and-learn comparison), a process reward model (`prm_from`, an `experiments.prm_reason`
   workdir trained with step labels) and an outcome reward model (`orm_from`, the same recipe with
   `label="outcome"`). All share the policy's tokenizer (checked).
2. Sampling methods, on the first `n_problems` test problems: `max_n` completions of every prompt are sampled once
   (temperature `temperature`, one batched sampler call per `sample_batch` prompts) and scored once by the verifier
   (the task's checker: an oracle, it knows the answer), the ORM and the PRM (each step's score, aggregated with
   `prm_agg`; with `prm_kind="likelihood"` the "PRM" is a language model's probability of each step's least likely
   token, `jaxpost.inference.likelihood_step_scorer`). The curve at N uses each prompt's first N samples (nested
   subsets, as search-and-learn evaluates): `majority` (self-consistency), `bon_verifier` (pass@N), `bon_orm`,
   `bon_prm`, `weighted_bon_prm` (answers' summed PRM scores). Tokens: the generated tokens of those N samples.
3. Search methods, on the first `n_search_problems` test problems: token-level `beam` search (widths `beam_widths`),
   PRM-guided step search `prm_beam` and `dvts` (N in `search_ns`, `search_m` expansions per kept candidate; steps
   end at the tokenizer's newline pieces), and `budget_forcing` (greedy thinking capped at each of `budgets` tokens,
   then "\\nAnswer:" is forced; the end of thinking is the "Answer:" marker). Tokens: every candidate's generated
   tokens (`SearchResult.tokens`).
4. results.json: `greedy_accuracy` (the policy's, on the same problems), `large_greedy_accuracy`, `curves`
   {method: [{"n", "accuracy", "tokens", "flops"}]} (n: samples, beam width, search N, or the thinking budget),
   `prm_step_auc` (read from the PRM's workdir), the tokens and FLOPs of one greedy decode; metrics.jsonl (one line
   per point, written as it is measured: a rerun skips the points already there) and tts.png (accuracy against
   generated tokens per problem, log x).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from jaxpost.cli import write_config
from jaxpost.config import MeshConfig
from jaxpost.data import task_from_config
from jaxpost.inference import (Decoder, beam_search, budget_forcing, decode_flops, likelihood_step_scorer, orm_scorer,
                               prm_step_scorer, select, step_search)
from jaxpost.recipes.common import setup_logging
from jaxpost.recipes.distill import check_same_tokenizer, load_workdir_params, workdir_sft_config
from jaxpost.recipes.prm import delimiter_ids, load_prm
from jaxpost.rollout import Sampler, SamplingConfig
from jaxpost.rollout.verifiers import extract_answer_line
from jaxpost.sharding import make_mesh
from jaxpost.tokenizers import decode_completion, load_tokenizer
from jaxpost.train.loop import MetricsLog, read_metrics

log = logging.getLogger("jaxpost")

SAMPLING_METHODS = ("majority", "bon_verifier", "bon_orm", "bon_prm", "weighted_bon_prm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTSConfig:
    """Which models, which problems, which compute points (module docstring)."""

    policy_from: str = "runs/distill_reason_kd"
    large_from: str = "runs/grpo_reason"  # "" = no larger policy
    prm_from: str = "runs/prm_reason"
    orm_from: str = "runs/orm_reason"  # "" = no ORM curve
    seed: int = 0
    n_problems: int = 200
    max_n: int = 64
    sample_batch: int = 32  # prompts per sampler call (x max_n rows)
    temperature: float = 1.0
    prm_agg: str = "last"  # how a PRM's step scores make one score: last | min | prod | mean
    # "head": prm_from is a PRM workdir (a scalar head at each step's end); "likelihood": prm_from is any workdir whose
    # language model scores each step by its least likely token (a training-free verifier, e.g. the larger policy)
    prm_kind: str = "head"
    n_search_problems: int = 100
    beam_widths: tuple[int, ...] = (1, 4, 16)
    search_ns: tuple[int, ...] = (4, 16)
    search_m: int = 4
    max_steps: int = 12
    max_step_tokens: int = 24
    budgets: tuple[int, ...] = (8, 16, 32, 48, 64)
    max_prompt_len: int = 16
    max_new_tokens: int = 72
    score_rows: int = 64  # candidates per scorer call

    def __post_init__(self):
        if not self.policy_from:
            raise ValueError("TTSConfig.policy_from: the policy's workdir is required")
        if self.prm_kind not in ("head", "likelihood"):
            raise ValueError(f"TTSConfig.prm_kind must be 'head' or 'likelihood', got {self.prm_kind!r}")
        if self.prm_agg not in select.AGGREGATIONS:
            raise ValueError(f"TTSConfig.prm_agg must be one of {select.AGGREGATIONS}, got {self.prm_agg!r}")
        for name in ("n_problems", "max_n", "sample_batch", "search_m", "max_steps", "max_step_tokens",
                     "max_prompt_len", "max_new_tokens", "score_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TTSConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_search_problems < 0 or self.temperature <= 0:
            raise ValueError("TTSConfig: n_search_problems must be >= 0 and temperature > 0")
        if any(n % self.search_m for n in self.search_ns):
            raise ValueError(f"TTSConfig.search_ns {self.search_ns} must be multiples of search_m={self.search_m}")
        if min(self.beam_widths + self.search_ns + self.budgets, default=1) <= 0:
            raise ValueError("TTSConfig: beam widths, search Ns and budgets must be > 0")


def sample_points(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n (and max_n itself)."""
    ns = [1 << i for i in range(max_n.bit_length()) if 1 << i <= max_n]
    return ns if ns[-1] == max_n else ns + [max_n]


def parse_answer(text: str) -> int | None:
    """The integer after the last "Answer:" of a completion (None when there is none)."""
    rest = extract_answer_line(text)
    try:
        return int(rest) if rest is not None else None
    except ValueError:
        return None


def sampling_curves(answers, correct, lengths, scores: dict[str, np.ndarray], gold, ns) -> dict[str, list[dict]]:
    """Accuracy and generated tokens per prompt at each N of `ns` for the sampling methods, on each prompt's first N
    candidates. answers [P][G] (None: unparseable), correct bool [P, G], lengths [P, G], scores {name: [P, G]}
    ("verifier", "orm", "prm"), gold [P]: the true answers."""
    P = len(gold)
    curves: dict[str, list[dict]] = {}
    for n in ns:
        sub = [a[:n] for a in answers]
        tok = float(lengths[:, :n].sum() / P)
        picks: dict[str, list] = {}
        voted, _ = select.majority_vote(sub)
        picks["majority"] = [v is not None and v == g for v, g in zip(voted, gold)]
        for name, key in (("bon_verifier", "verifier"), ("bon_orm", "orm"), ("bon_prm", "prm")):
            if key in scores:
                idx = select.best_of_n(scores[key][:, :n])
                picks[name] = [bool(correct[p, idx[p]]) for p in range(P)]
        if "prm" in scores:
            weighted, _ = select.weighted_best_of_n(sub, scores["prm"][:, :n])
            picks["weighted_bon_prm"] = [w is not None and w == g for w, g in zip(weighted, gold)]
        for name, ok in picks.items():
            curves.setdefault(name, []).append({"n": n, "accuracy": float(np.mean(ok)), "tokens": tok})
    return curves


class _Points:
    """The curves' points, written to metrics.jsonl as they are measured; a rerun finds and skips them."""

    def __init__(self, workdir: str):
        path = os.path.join(workdir, "metrics.jsonl")
        self.done = {(r["method"], r["n"]): r for r in read_metrics(path)} if os.path.exists(path) else {}
        self.log = MetricsLog(path, resume_step=len(self.done))

    def has(self, method: str, n: int) -> bool:
        return (method, n) in self.done

    def add(self, method: str, point: dict) -> None:
        rec = {"step": len(self.done) + 1, "method": method, **point}
        self.done[(method, point["n"])] = rec
        self.log.write(rec)
        log.info("%-16s n=%-3d accuracy %.3f  tokens/problem %.1f", method, point["n"], point["accuracy"],
                 point["tokens"])

    def curves(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for (method, _), r in sorted(self.done.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            out.setdefault(method, []).append({k: r[k] for k in ("n", "accuracy", "tokens", "flops") if k in r})
        return out


def run(cfg: TTSConfig, workdir: str) -> dict:
    """Every method's accuracy against compute (module docstring); writes into workdir and returns results.json."""
    t_start = time.perf_counter()
    setup_logging()
    os.makedirs(workdir, exist_ok=True)
    write_config(cfg, workdir)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tokenizer = load_tokenizer(cfg.policy_from)
    task = task_from_config(workdir_sft_config(cfg.policy_from).task)
    lm, params = load_workdir_params(cfg.policy_from, mesh)
    for other in (cfg.large_from, cfg.prm_from, cfg.orm_from):
        if other:
            check_same_tokenizer(tokenizer, load_tokenizer(other), student_from=cfg.policy_from, teacher_from=other)
    examples = task.examples("test", max(cfg.n_problems, cfg.n_search_problems))
    prompts = [np.asarray(tokenizer.encode_chat([{"role": "user", "content": ex["prompt"]}],
                                                add_generation_prompt=True)[0], np.int32) for ex in examples]
    if max(len(p) for p in prompts) > cfg.max_prompt_len:
        raise ValueError(f"TTSConfig.max_prompt_len={cfg.max_prompt_len} is shorter than a test prompt")
    gold = [int(ex["answer"]) for ex in examples]
    text = lambda tokens: decode_completion(tokenizer, tokens)  # noqa: E731
    is_right = lambda tokens, i: bool(task.check(text(tokens), examples[i]["answer"]))  # noqa: E731
    stops = tuple(tokenizer.stop_ids)
    delims = tuple(sorted(delimiter_ids(tokenizer)))
    points = _Points(workdir)
    sampler = Sampler(lm, None, pad_id=tokenizer.pad_id, min_prompt_bucket=cfg.max_prompt_len)

    # Greedy: the policy's and the larger policy's, one decode of every problem.
    greedy_cfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_ids=stops)
    greedy = sampler.generate(params, prompts[:cfg.n_problems], greedy_cfg)
    greedy_ok = [is_right(c, i) for i, c in enumerate(greedy.completions())]
    greedy_tokens = float(greedy.lengths.mean())
    greedy_flops = float(np.mean([decode_flops(lm.cfg, 0, len(p) - 1 + n)
                                  for p, n in zip(prompts, greedy.lengths)]))
    results = {"greedy_accuracy": float(np.mean(greedy_ok)), "greedy_tokens": greedy_tokens,
               "greedy_flops": greedy_flops, "policy_params": lm.n_params, "n_problems": cfg.n_problems,
               "n_search_problems": cfg.n_search_problems}
    log.info("greedy accuracy %.3f (%.1f tokens/problem)", results["greedy_accuracy"], greedy_tokens)
    if cfg.large_from:
        large_lm, large_params = load_workdir_params(cfg.large_from, mesh)
        large = Sampler(large_lm, None, pad_id=tokenizer.pad_id, min_prompt_bucket=cfg.max_prompt_len).generate(
            large_params, prompts[:cfg.n_problems], greedy_cfg)
        results["large_greedy_accuracy"] = float(np.mean([is_right(c, i) for i, c in
                                                          enumerate(large.completions())]))
        results["large_params"] = large_lm.n_params
        results["large_greedy_flops"] = float(np.mean([decode_flops(large_lm.cfg, 0, len(p) - 1 + n)
                                                       for p, n in zip(prompts, large.lengths)]))
        log.info("larger policy (%d parameters) greedy accuracy %.3f", large_lm.n_params,
                 results["large_greedy_accuracy"])
        del large_params
    prm = orm = None
    if cfg.prm_from and cfg.prm_kind == "likelihood":
        verifier_lm, verifier_params = load_workdir_params(cfg.prm_from, mesh)
        prm = likelihood_step_scorer(verifier_lm, verifier_params, pad_id=tokenizer.pad_id)
    elif cfg.prm_from:
        prm_model, prm_params, _ = load_prm(cfg.prm_from, mesh)
        prm = prm_step_scorer(prm_model, prm_params, delims, pad_id=tokenizer.pad_id)
        with open(os.path.join(cfg.prm_from, "results.json")) as f:
            prm_res = json.load(f)
        results["prm_step_auc"] = prm_res.get("prm_step_auc")
        results["prm_first_error_auc"] = prm_res.get("prm_first_error_auc")
    if cfg.orm_from:
        orm_model, orm_params, _ = load_prm(cfg.orm_from, mesh)
        orm = orm_scorer(orm_model, orm_params, pad_id=tokenizer.pad_id)

    # Sampling methods: max_n samples of each problem, scored once; nested subsets give every N.
    ns = sample_points(cfg.max_n)
    wanted = [m for m in SAMPLING_METHODS if (m != "bon_orm" or orm) and (m not in ("bon_prm", "weighted_bon_prm")
                                                                            or prm)]
    if not all(points.has(m, n) for m in wanted for n in ns):
        P, G = cfg.n_problems, cfg.max_n
        sample_cfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n_samples=G,
                                    stop_ids=stops)
        comps, flops = [], 0.0
        t0 = time.perf_counter()
        for s in range(0, P, cfg.sample_batch):
            ro = sampler.generate(params, prompts[s:min(s + cfg.sample_batch, P)], sample_cfg, seed=cfg.seed + s)
            comps += ro.completions()
            log.info("sampled %d / %d problems x %d (%.0f s)", min(s + cfg.sample_batch, P), P, G,
                     time.perf_counter() - t0)
        lengths = np.array([len(c) for c in comps]).reshape(P, G)
        flops_R = np.array([decode_flops(lm.cfg, len(prompts[r // G]) - 1, len(c)) for r, c in enumerate(comps)])
        texts = [text(c) for c in comps]
        answers = [[parse_answer(texts[p * G + g]) for g in range(G)] for p in range(P)]
        correct = np.array([task.check(t, examples[r // G]["answer"]) for r, t in enumerate(texts)]).reshape(P, G)
        scores = {"verifier": correct.astype(np.float64)}
        row_prompts = [prompts[r // G] for r in range(P * G)]
        steps = [select.split_steps(c, delims) for c in comps]
        extra_R = {}
        for name, scorer, agg in (("prm", prm, cfg.prm_agg), ("orm", orm, "last")):
            if scorer is None:
                continue
            t0 = time.perf_counter()
            out, extra = [], np.zeros(P * G)
            for s in range(0, P * G, cfg.score_rows):
                part = scorer(row_prompts[s:s + cfg.score_rows], steps[s:s + cfg.score_rows])
                out += list(select.aggregate_ragged([np.asarray(x, np.float64) for x in part], agg))
                for i in range(s, min(s + cfg.score_rows, P * G)):
                    extra[i] = scorer.flops([row_prompts[i]], [steps[i]])
            scores[name] = np.asarray(out).reshape(P, G)
            extra_R[name] = extra
            log.info("%s scored %d candidates (%.0f s)", name, P * G, time.perf_counter() - t0)
        curves = sampling_curves(answers, correct, lengths, scores, gold[:P], ns)
        for method, pts in curves.items():
            scorer_key = {"bon_orm": "orm", "bon_prm": "prm", "weighted_bon_prm": "prm"}.get(method)
            for pt in pts:
                n = pt["n"]
                f = flops_R.reshape(P, G)[:, :n].sum() / P
                if scorer_key:
                    f += extra_R[scorer_key].reshape(P, G)[:, :n].sum() / P
                if not points.has(method, n):
                    points.add(method, {**pt, "flops": float(f)})
        results["sample_accuracy"] = float(correct.mean())
        del flops

    # Search methods on the first n_search_problems problems.
    S = cfg.n_search_problems
    decoder = Decoder(lm, None, pad_id=tokenizer.pad_id, min_prompt_bucket=cfg.max_prompt_len)

    def record(method, n, res):
        ok = [is_right(c, i) for i, c in enumerate(res.completions)]
        points.add(method, {"n": n, "accuracy": float(np.mean(ok)), "tokens": res.tokens / S,
                            "flops": res.flops / S})

    if S:
        results["search_greedy_accuracy"] = float(np.mean(greedy_ok[:S]))
        for w in cfg.beam_widths:
            if not points.has("beam", w):
                record("beam", w, beam_search(decoder, params, prompts[:S], width=w,
                                              max_new_tokens=cfg.max_new_tokens, stop_ids=stops))
        for method in ("prm_beam", "dvts") if prm is not None else ():
            for n in cfg.search_ns:
                if not points.has(method, n):
                    record(method, n, step_search(
                        decoder, params, prompts[:S], prm, method="beam" if method == "prm_beam" else "dvts",
                        n=n, m=cfg.search_m, delimiter_id=delims, end_ids=stops, max_steps=cfg.max_steps,
                        max_step_tokens=cfg.max_step_tokens, temperature=cfg.temperature, agg=cfg.prm_agg,
                        seed=cfg.seed))
        marker = tokenizer.encode("Answer:")
        cue = tokenizer.encode("\nAnswer:")
        for b in cfg.budgets:
            if not points.has("budget_forcing", b):
                record("budget_forcing", b, budget_forcing(
                    decoder, params, prompts[:S], budget=b, answer_cue=cue, end_think_sequences=(marker,),
                    max_answer_tokens=8, answer_stop_ids=stops, temperature=0.0, seed=cfg.seed))

    results["curves"] = points.curves()
    results["wall_time_s"] = time.perf_counter() - t_start
    plot_curves(results, os.path.join(workdir, "tts.png"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def plot_curves(results: dict, path: str) -> None:
    """Accuracy against generated tokens per problem (log x), one line per method; the greedy decodes as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, pts in sorted(results["curves"].items()):
        pts = sorted(pts, key=lambda p: p["tokens"])
        ax.plot([p["tokens"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=method)
    ax.scatter([results["greedy_tokens"]], [results["greedy_accuracy"]], color="k", zorder=5, label="greedy")
    if "large_greedy_accuracy" in results:
        ax.axhline(results["large_greedy_accuracy"], color="k", ls="--", lw=1,
                   label=f"larger policy greedy ({results['large_params'] / 1e6:.1f}M)")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("held-out accuracy (fraction)")
    ax.set_title(f"test-time scaling, policy of {results['policy_params'] / 1e6:.2f}M parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
