"""The process reward-model recipe: policy samples -> Math-Shepherd step labels -> a decoder + scalar head trained
with per-step BCE -> per-step ROC AUC on held-out traces with injected errors.

1. Labels (once, cached in `prm_labels.jsonl`). The policy (`policy_from`, any lab workdir: an SFT or RL run) samples
   `samples_per_problem` solutions of `n_problems` train problems (and of `n_eval_problems` test problems, held out).
   Each solution is split into steps at its newline tokens (the last step ends at its stop token); the prefix of
   every non-final step is completed `mc_rollouts` times by the same policy, all prefixes batched into a few sampler
   calls (longest prefixes first), and the step labelled hard (any completion right) and soft (the fraction right),
   Wang et al. 2024 (`jaxpost.data.prm`). The last step's label is the solution's correctness, the ORM's single
   label. With `reuse_solution` the solution's own continuation counts as one of the completions (it is a sample of
   the policy given each of its prefixes): mc_rollouts - 1 fresh ones per prefix, and for hard or outcome labels a
   correct solution needs none (every step of it can reach the answer: it does), so only wrong solutions are rolled
   out.
2. Training. A `ScalarHeadLM` from the SFT start (`init_from`; its head at zero, so every step starts at sigma(0) =
   0.5 and loss log 2) learns `ProcessReward` (`jaxpost.train.prm`) on packed rows of the train problems' solutions,
   with `label` = "hard" | "soft" | "outcome" (the ORM: only the final step, labelled by correctness).
3. Evaluation. Held-out test problems' gold worked traces, each also with one injected arithmetic error in a column
   line (`jaxpost.data.prm.inject_error`: the steps before it labelled 1, from it on 0); every step is scored with
   sigma(head) at its end and `prm_step_auc` is the ROC AUC of those scores against the labels
   (`prm_first_error_auc`: the first wrong steps against the right steps). `mc_step_accuracy`: agreement of the
   PRM's step predictions (> 0.5) with the Monte-Carlo labels of the held-out sampled solutions.

A trained PRM is used through `load_prm(workdir)` and `StepScorer` (steps of prompt/completion texts or token ids).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data.prm import Solution, StepRowIterator, inject_error, math_shepherd_labels, pack_step_rows, step_ends
from jaxpost.models.heads import ScalarHeadLM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import (Run, batch_feeder, cached_records, eval_sampler, load_params, load_start_params,
                                    open_sft_start)
from jaxpost.recipes.distill import load_workdir_params, tokenizer_pieces, workdir_model
from jaxpost.rollout import Sampler, SamplingConfig
from jaxpost.sharding import make_mesh
from jaxpost.tokenizers import ChatTokenizer, decode_completion, load_tokenizer
from jaxpost.train.optim import make_optimizer
from jaxpost.train.prm import ProcessReward, make_value_scorer
from jaxpost.train.state import TrainState, abstract_train_state, state_shardings
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")

#: What a step is labelled with: Math-Shepherd's hard or soft label, only the final step by correctness (ORM), or
#: the step's true correctness ("gold": its text is a prefix of the task's own worked or direct answer; a diagnostic
#: that needs the task's solver, where Math-Shepherd needs only a checker).
LABELS = ("hard", "soft", "outcome", "gold")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRMConfig:
    """A process reward model on a reasoning task's worked traces, labelled by Monte-Carlo completions."""

    seed: int = 0
    steps: int = 150
    init_from: str = ""  # the SFT workdir of the PRM's decoder; "" runs `sft` first into workdir/sft
    policy_from: str = ""  # the workdir whose model samples solutions and completions; "" = the PRM's SFT start
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    label: str = "hard"
    n_problems: int = 192  # train problems sampled for training data
    samples_per_problem: int = 4
    mc_rollouts: int = 4  # Monte-Carlo completions per step prefix (Math-Shepherd's N)
    # the solution's own continuation is one of the mc_rollouts completions of each of its prefixes; with hard or
    # outcome labels a correct solution then needs no rollout (`jaxpost.data.prm.math_shepherd_labels`). It is a
    # sample at sample_temperature: exact for hard labels (a witness), a mixture for soft ones when the two differ
    reuse_solution: bool = True
    sample_temperature: float = 1.0  # of the solutions (above 1: more, and more varied, wrong steps to learn from)
    mc_temperature: float = 1.0  # of the Monte-Carlo completions (the policy's own chance from a prefix)
    sample_batch: int = 128  # prompts (step prefixes) per sampler call
    n_eval_problems: int = 48  # test problems sampled and labelled like the train ones: held-out step accuracy
    n_auc_problems: int = 200  # test problems whose gold traces, and one injected error each, give the step AUC
    # train problems whose gold trace and a copy with one injected error (labelled by construction) join the training
    # solutions: negatives one digit away from a right step, which the policy's own samples rarely give
    train_injected: int = 0
    max_prompt_len: int = 16
    max_new_tokens: int = 72
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=128, batch_size=16))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=20))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"PRMConfig.steps must be > 0, got {self.steps}")
        if self.label not in LABELS:
            raise ValueError(f"PRMConfig.label must be one of {LABELS}, got {self.label!r}")
        for name in ("n_problems", "samples_per_problem", "mc_rollouts", "sample_batch", "max_prompt_len",
                     "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PRMConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.n_eval_problems < 0 or self.n_auc_problems < 0 or self.train_injected < 0:
            raise ValueError("PRMConfig.n_eval_problems, n_auc_problems and train_injected must be >= 0")
        if self.sample_temperature <= 0 or self.mc_temperature <= 0:
            raise ValueError(f"PRMConfig.sample_temperature and mc_temperature must be > 0 (Monte-Carlo labels need "
                             f"sampling), got {self.sample_temperature}, {self.mc_temperature}")
        if self.data.seq_len < self.max_prompt_len + self.max_new_tokens:
            raise ValueError(f"PRMConfig.data.seq_len={self.data.seq_len} must hold a prompt and a completion "
                             f"({self.max_prompt_len} + {self.max_new_tokens} tokens)")


# ---- metrics -------------------------------------------------------------------------------------------------------


def roc_auc(scores, labels) -> float:
    """ROC AUC of `scores` against binary `labels` (> 0.5 is positive): the probability that a random positive scores
    above a random negative, ties counting 1/2 (Mann-Whitney U / (n_pos n_neg), with average ranks for ties).
    NaN when either class is empty."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks (1-based) over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---- scoring steps with a trained PRM ------------------------------------------------------------------------------


def delimiter_ids(tokenizer: ChatTokenizer) -> frozenset[int]:
    """The token ids whose text holds a newline: the step delimiters."""
    return frozenset(i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i]))


class StepScorer:
    """Scores the steps of solutions with a PRM: sigma(head) at each step end (`jaxpost.data.prm.step_ends`).

        model, params, tokenizer = load_prm("runs/prm_reason")
        scorer = StepScorer(model, params, tokenizer)
        scorer.score_texts(["What is 384 + 599?"], ["384+599\\n4+9+0=13 3"], finished=False)  # [[p1, p2]]
        scorer.score_tokens([(prompt_ids, completion_ids)])  # ids from the sampler (stop token included)

    Solutions are packed `seq_len` tokens per row and scored `rows` rows per jitted call (one compiled program)."""

    def __init__(self, model: ScalarHeadLM, params, tokenizer: ChatTokenizer, mesh=None, *, seq_len: int = 128,
                 rows: int = 32):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        self.seq_len, self.rows = seq_len, rows
        self.delimiters = delimiter_ids(tokenizer)
        self._score = make_value_scorer(model, self.mesh, model.param_shardings(self.mesh), rows=rows)

    def encode(self, prompt: str, completion: str, *, finished: bool = True) -> tuple[list[int], list[int]]:
        """(prompt ids with the generation prompt, completion ids): with the closing stop token when finished."""
        prompt_ids, _ = self.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        completion_ids = self.tokenizer.encode(completion) + ([self.tokenizer.eos_id] if finished else [])
        return prompt_ids, completion_ids

    def items(self, pairs) -> list[dict]:
        """Items of `pack_step_rows` for (prompt ids, completion ids) pairs, every step end labelled 0."""
        out = []
        for prompt_ids, completion_ids in pairs:
            prompt_ids, completion_ids = list(map(int, prompt_ids)), list(map(int, completion_ids))
            ends = [len(prompt_ids) + e for e in step_ends(completion_ids, lambda t: t in self.delimiters)]
            out.append({"tokens": prompt_ids + completion_ids, "ends": ends, "labels": [0.0] * len(ends)})
        return out

    def score_items(self, items: list[dict], params=None) -> list[np.ndarray]:
        """sigma(head) [n_steps] at the `ends` of each item ({"tokens", "ends", ...}), with `params` (default: the
        scorer's)."""
        params = self.params if params is None else params
        items = [{"tokens": it["tokens"], "ends": it["ends"], "labels": [0.0] * len(it["ends"])} for it in items]
        rows, placed = pack_step_rows(items, self.seq_len)
        N = len(rows["inputs"])
        pad = -N % self.rows
        rows = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        logits = np.concatenate([np.asarray(self._score(params, {k: v[i:i + self.rows] for k, v in rows.items()}))
                                 for i in range(0, N + pad, self.rows)])
        out = []
        for it, (r, off) in zip(items, placed):
            ends = np.asarray([e for e in it["ends"] if e < self.seq_len], np.int64)
            out.append(1.0 / (1.0 + np.exp(-logits[r, off + ends].astype(np.float64))))
        return out

    def score_tokens(self, pairs, params=None) -> list[np.ndarray]:
        """Step scores of (prompt ids, completion ids) pairs."""
        return self.score_items(self.items(pairs), params)

    def score_texts(self, prompts, completions, *, finished: bool = True, params=None) -> list[np.ndarray]:
        """Step scores of (prompt, completion) texts; `finished=False` scores a partial solution (no stop token:
        its last step ends at its last token)."""
        return self.score_tokens([self.encode(p, c, finished=finished) for p, c in zip(prompts, completions)],
                                 params)


def load_prm(workdir: str, mesh=None) -> tuple[ScalarHeadLM, dict, ChatTokenizer]:
    """(model, its trained params, the tokenizer) of a `prm` run's workdir (the final checkpoint)."""
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = ScalarHeadLM(workdir_model(workdir))
    return model, load_params(model, mesh, workdir), load_tokenizer(workdir)


# ---- labelled data -------------------------------------------------------------------------------------------------


def _chunked_generate(sampler: Sampler, params, prompts: list[list[int]], cfg: SamplingConfig, *, batch: int,
                      seed: int) -> list[list[list[int]]]:
    """`cfg.n_samples` completions (token ids, stop token included) of every prompt, `batch` prompts per call."""
    out = []
    for c, i in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[i:i + batch]
        rollout = sampler.generate(params, chunk, cfg, seed=seed + c)
        comps = [list(map(int, x)) for x in rollout.completions()]
        G = cfg.n_samples
        out += [comps[j * G:(j + 1) * G] for j in range(len(chunk))]
    return out


def label_records(cfg: PRMConfig, policy, policy_params, tokenizer: ChatTokenizer, task, mesh) -> tuple[list, dict]:
    """(records, stats): `samples_per_problem` policy solutions of the first `n_problems` train and
    `n_eval_problems` test problems, each with its step ends and Math-Shepherd labels (hard, soft, outcome)."""
    t0 = time.perf_counter()
    examples = ([("train", ex) for ex in task.examples("train", cfg.n_problems)]
                + [("test", ex) for ex in task.examples("test", cfg.n_eval_problems)])
    prompts = [tokenizer.encode_chat([{"role": "user", "content": ex["prompt"]}], add_generation_prompt=True)[0]
               for _, ex in examples]
    if max(map(len, prompts)) > cfg.max_prompt_len:
        raise ValueError(f"a prompt takes {max(map(len, prompts))} tokens > max_prompt_len={cfg.max_prompt_len}")
    stop = tuple(tokenizer.stop_ids)
    sampler = eval_sampler(policy, mesh, tokenizer.pad_id, cfg.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                              n_samples=cfg.samples_per_problem, stop_ids=stop)
    groups = _chunked_generate(sampler, policy_params, prompts, sampling, batch=cfg.sample_batch,
                               seed=cfg.seed * 1_000_003)
    delimiters = delimiter_ids(tokenizer)
    solutions = [Solution(problem=i, completion=c, ends=tuple(step_ends(c, lambda t: t in delimiters)))
                 for i, group in enumerate(groups) for c in group]
    t_sample = time.perf_counter() - t0

    # prompt buckets follow each call's longest prefix (a few compiled programs, shorter KV caches)
    mc_sampler = Sampler(policy, mesh, pad_id=tokenizer.pad_id, min_prompt_bucket=cfg.max_prompt_len)
    n_prefixes = [0]

    def rollouts(queries, n):
        # Longest prefixes first: a sampler call decodes until its longest continuation stops, so calls of long
        # prefixes (short continuations) stop early.
        order = sorted(range(len(queries)), key=lambda q: -len(queries[q][1]))
        n_prefixes[0] += len(queries)
        mc = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.mc_temperature, n_samples=n,
                            stop_ids=stop)
        groups = _chunked_generate(mc_sampler, policy_params, [prompts[queries[q][0]] + list(queries[q][1])
                                                               for q in order], mc,
                                   batch=cfg.sample_batch, seed=cfg.seed * 1_000_003 + 500_000)
        out = [None] * len(queries)
        for q, g in zip(order, groups):
            out[q] = g
        return out

    def correct(i, completion):
        return task.check(decode_completion(tokenizer, completion), examples[i][1]["answer"])

    labels = math_shepherd_labels(solutions, rollouts=rollouts, correct=correct, n_rollouts=cfg.mc_rollouts,
                                  reuse_solution=cfg.reuse_solution,
                                  hard_only=cfg.reuse_solution and cfg.label != "soft")
    records = []
    for s, lab in zip(solutions, labels):
        split, ex = examples[s.problem]
        text = decode_completion(tokenizer, s.completion)
        n = len(prompts[s.problem])
        records.append({"split": split, "prompt": ex["prompt"], "answer": ex["answer"], "completion": text,
                        "traced": bool(getattr(task, "has_trace", lambda _: False)(text)),
                        "tokens": list(prompts[s.problem]) + list(s.completion), "ends": [n + e for e in s.ends],
                        "hard": list(lab.hard), "soft": None if lab.soft is None else list(lab.soft),
                        "outcome": lab.outcome})
    stats = {**label_stats(records), "mc_prefixes": n_prefixes[0], "sample_time_s": t_sample,
             "label_time_s": time.perf_counter() - t0}
    return records, stats


def training_items(records: list[dict], label: str) -> list[dict]:
    """`pack_step_rows` items of labelled records: every step end with its hard or soft label, or ("outcome") only
    the final one, labelled by the solution's correctness."""
    out = []
    for r in records:
        if not r["ends"]:
            continue
        if label == "soft" and r["soft"] is None:
            raise ValueError("soft labels were not estimated for these records (labelled with hard_only)")
        if label == "outcome":
            out.append({"tokens": r["tokens"], "ends": r["ends"][-1:], "labels": [float(r["outcome"])]})
        else:
            out.append({"tokens": r["tokens"], "ends": r["ends"], "labels": r[label]})
    return out


def injected_error_items(task, tokenizer: ChatTokenizer, n: int, *, seed: int, max_len: int,
                         split: str = "test") -> list[dict]:
    """For the first `n` problems of `split`: the gold worked trace (every step labelled 1) and the same trace with one
    injected error (`inject_error`: a uniformly drawn column line and wrong digit), as scoring items with the step
    labels and the index of the first wrong step (None for gold). A trace longer than `max_len` tokens (prompt
    included), or whose steps do not tokenise one per line, is skipped."""
    if not hasattr(task, "trace_completion"):
        raise ValueError(f"the injected-error evaluation needs a task with worked traces, got {type(task).__name__}")
    delimiters = delimiter_ids(tokenizer)
    items = []
    for i in range(n):
        problem = task.problem(split, i)
        gold = task.trace_completion(problem)
        lines = gold.split("\n")
        rng = random.Random(f"prm/{seed}/{i}")
        line = rng.randint(1, len(lines) - 2)
        right = int(lines[line].split(" ")[0].split("=")[1][-1])
        wrong, labels = inject_error(gold, line, rng.choice([d for d in range(10) if d != right]))
        for text, ys, first in ((gold, [1.0] * len(lines), None), (wrong, labels, line)):
            ids, _ = tokenizer.encode_prompt_completion(task.prompt(problem), text)
            prompt_len = len(tokenizer.encode_chat([{"role": "user", "content": task.prompt(problem)}],
                                                   add_generation_prompt=True)[0])
            ends = [prompt_len + e for e in step_ends(ids[prompt_len:], lambda t: t in delimiters)]
            if len(ends) != len(ys) or len(ids) > max_len:
                continue
            items.append({"tokens": ids, "ends": ends, "labels": ys, "first_error": first, "completion": text,
                          "problem": i})
    return items


def evaluate_steps(scorer: StepScorer, params, auc_items: list[dict], eval_records: list[dict], label: str) -> dict:
    """The injected-error AUCs and mean scores, and the held-out agreement with Monte-Carlo labels."""
    out = {}
    if auc_items:
        scores = scorer.score_items(auc_items, params)
        s = np.concatenate(scores)
        y = np.concatenate([it["labels"] for it in auc_items])
        first = np.concatenate([[it["first_error"] == k for k in range(len(it["labels"]))] for it in auc_items])
        keep = (y > 0.5) | first
        out.update(prm_step_auc=roc_auc(s, y), prm_first_error_auc=roc_auc(s[keep], y[keep]),
                   mean_score_right_steps=float(s[y > 0.5].mean()), mean_score_wrong_steps=float(s[y < 0.5].mean()),
                   mean_score_first_error=float(s[first].mean()),
                   gold_final_score=float(np.mean([sc[-1] for sc, it in zip(scores, auc_items)
                                                   if it["first_error"] is None])),
                   injected_final_score=float(np.mean([sc[-1] for sc, it in zip(scores, auc_items)
                                                       if it["first_error"] is not None])))
        # the same problem's gold and injected traces, step for step from the error on (ties 1/2): free of the
        # position and problem confounds of the pooled AUC (later steps and harder problems score lower)
        gold = {it["problem"]: sc for sc, it in zip(scores, auc_items) if it["first_error"] is None}
        wins = [0.5 if gold[it["problem"]][k] == sc[k] else float(gold[it["problem"]][k] > sc[k])
                for sc, it in zip(scores, auc_items) if it["first_error"] is not None and it["problem"] in gold
                for k in range(it["first_error"], len(sc))]
        out["prm_paired_accuracy"] = float(np.mean(wins)) if wins else None
    items = training_items(eval_records, label)
    if items:
        scores = scorer.score_items(items, params)
        s = np.concatenate(scores)
        y = np.concatenate([it["labels"] for it in items])
        hard = np.concatenate([r["hard"] for r in eval_records if r["ends"]])
        out["mc_step_accuracy"] = float(np.mean((s > 0.5) == (y > 0.5)))
        out["mc_label_positive_fraction"] = float(np.mean(y > 0.5))
        if label != "outcome":
            out["mc_step_auc"] = roc_auc(s, hard)
    return out


# ---- the recipe ----------------------------------------------------------------------------------------------------


def run(cfg: PRMConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) + policy (policy_from) -> labelled solutions -> PRM; writes config.json,
    prm_labels.jsonl, metrics.jsonl, checkpoints/, prm.png and results.json into workdir, resuming whatever exists
    there. `stop_at` stops after that step; returns the results, or None when stopped early."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)
    policy_dir = cfg.policy_from or sft_dir

    def make():
        if tokenizer_pieces(load_tokenizer(policy_dir)) != tokenizer_pieces(tokenizer):
            raise ValueError(f"policy_from={policy_dir!r} and the PRM's start {sft_dir!r} need one tokenizer: the "
                             f"PRM reads the policy's token ids")
        policy, policy_params = load_workdir_params(policy_dir, mesh)
        return label_records(cfg, policy, policy_params, tokenizer, task, mesh)

    records = cached_records(run.path("prm_labels.jsonl"), make, what="Math-Shepherd labels")
    if cfg.label == "gold":
        gold_of = functools.partial(gold_step_labels, task=task, tokenizer=tokenizer)
        records = [{**r, "gold": gold_of(r)} for r in records]
    train_records = [r for r in records if r["split"] == "train"]
    eval_records = [r for r in records if r["split"] == "test"]
    items = training_items(train_records, cfg.label)
    if cfg.train_injected:  # contrastive negatives: a right trace and a copy one digit wrong, labelled by construction
        last = slice(-1, None) if cfg.label == "outcome" else slice(None)  # an ORM reads only the final label
        items += [{"tokens": it["tokens"], "ends": it["ends"][last], "labels": it["labels"][last]}
                  for it in injected_error_items(task, tokenizer, cfg.train_injected, seed=cfg.seed + 1,
                                                 max_len=cfg.data.seq_len, split="train")]
    random.Random(cfg.seed).shuffle(items)
    rows, _ = pack_step_rows(items, cfg.data.seq_len)
    batches = StepRowIterator(rows, batch_size=cfg.data.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    auc_items = injected_error_items(task, tokenizer, cfg.n_auc_problems, seed=cfg.seed, max_len=cfg.data.seq_len)

    model = ScalarHeadLM(sft_cfg.model)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps, logical_axes=model.logical_axes)
    abstract = abstract_train_state(model, tx)
    shardings = state_shardings(abstract, model.param_shardings(mesh), tx, mesh)

    def init():
        lm_params = load_start_params(sft_cfg, mesh, sft_dir)

        def make_state(lm_params, key):
            params = model.with_lm_params(lm_params, key)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=key)

        return jax.jit(make_state, out_shardings=shardings)(lm_params, jax.random.PRNGKey(cfg.seed))

    state = run.restore_or_init(abstract, shardings, batches, init)
    scorer = StepScorer(model, None, tokenizer, mesh, seq_len=cfg.data.seq_len, rows=cfg.data.batch_size)
    before = run.once("eval_before", lambda: evaluate_steps(scorer, state.params, auc_items, eval_records,
                                                            cfg.label))

    step_fn = make_step(model, tx, schedule, ProcessReward(model), mesh=mesh, state_shardings=shardings,
                        units=cfg.data.batch_size, grad_accum=cfg.train.grad_accum)
    to_device = batch_feeder(step_fn, cfg.train.grad_accum, unit_key="inputs",
                             per_process=cfg.data.batch_size // jax.process_count(), start_step=run.start_step)

    def evaluate(st):
        m = evaluate_steps(scorer, st.params, auc_items, eval_records, cfg.label)
        return {f"eval_{k}": m[k] for k in ("prm_step_auc", "prm_first_error_auc", "prm_paired_accuracy",
                                            "mc_step_accuracy") if k in m}

    state = run.train(step_fn, state, batches, to_device=to_device, evaluate=evaluate,
                      host_metrics=lambda: batches.stats, desc="prm")
    if state is None:
        return None
    after = evaluate_steps(scorer, state.params, auc_items, eval_records, cfg.label)
    example = next((it for it in auc_items if it["first_error"] is not None), None)
    results = {**after,
               "prm_step_auc_before": before.get("prm_step_auc"), "mc_step_accuracy_before":
               before.get("mc_step_accuracy"), "label": cfg.label,
               "labels": label_stats(records), "train_rows": int(len(rows["inputs"])),
               "train_solutions": len(items), "auc_traces": len(auc_items), "policy_from": policy_dir,
               "sft_dir": sft_dir}
    if example is not None:
        results["example"] = {"completion": example["completion"], "labels": example["labels"],
                              "scores": [round(float(x), 4) for x in scorer.score_items([example], state.params)[0]]}
    return run.finish(results, plots=("loss", "step_accuracy", "mean_score", "eval_prm_step_auc",
                                      "eval_prm_first_error_auc", "eval_prm_paired_accuracy", "eval_mc_step_accuracy"),
                      filename="prm.png", title=f"Process reward model ({cfg.label} Math-Shepherd labels)")


def _problem_of(prompt: str) -> tuple:
    """The problem of a reasoning-lab prompt ("What is 27 - 384 + 599?" -> (27, "-", 384, "+", 599))."""
    parts = re.findall(r"\d+|[+-]", prompt.split("What is", 1)[-1])
    return tuple(int(x) if x.isdigit() else x for x in parts)


def gold_step_labels(record: dict, *, task, tokenizer: ChatTokenizer) -> list[float]:
    """The true correctness of each step of a labelled record: 1 while the completion up to the step's end is a
    prefix of the task's worked trace or direct answer for the record's problem (every later step of a solution that
    went wrong is 0), for a task that writes its own solutions (`trace_completion`, `direct_completion`)."""
    problem = _problem_of(record["prompt"])
    golds = (task.trace_completion(problem), task.direct_completion(problem))
    n = len(tokenizer.encode_chat([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)[0])
    stops = set(tokenizer.stop_ids)
    out = []
    for end in record["ends"]:
        text = tokenizer.decode([t for t in record["tokens"][n:end + 1] if t not in stops])
        out.append(float(any(g.startswith(text) for g in golds)))
    return out


def label_stats(records: list[dict]) -> dict:
    """Sizes and label rates of the labelled solutions, per split."""
    out = {}
    for split in ("train", "test"):
        rs = [r for r in records if r["split"] == split]
        if not rs:
            continue
        hard = [y for r in rs for y in r["hard"]]
        soft = [y for r in rs if r["soft"] is not None for y in r["soft"]]
        traced = [r for r in rs if r["traced"]]
        out[split] = {"solutions": len(rs), "sample_accuracy": float(np.mean([r["outcome"] for r in rs])),
                      "trace_fraction": len(traced) / len(rs),
                      "trace_accuracy": float(np.mean([r["outcome"] for r in traced])) if traced else None,
                      "labelled_steps": len(hard), "hard_positive_fraction": float(np.mean(hard)) if hard else None,
                      "mean_soft_label_rolled_out": float(np.mean(soft)) if soft else None}
    return out
