"""Reward functions: verifiers on decoded text, a learned reward model, and their weighted sum.

A reward function is a plain Python callable `fn(prompt: str, completion: str, **example) -> float`; `example` holds
the prompt record's other fields (`answer`, test cases, ...). `RewardSet` calls every function on every sample, each
call on its own daemon thread with a wall-clock `timeout_s`: a call that raises, returns something that is not a
finite number, or is still running at the deadline scores 0 for that function, is counted (`failed` / `timed_out`
per function name), and the run goes on. A hung call's thread is abandoned (Python cannot kill a thread; it is a
daemon, so it never blocks the process from exiting); use `timeout_s=None` to call functions inline, in order.

Several functions are combined by `aggregation` (TRL's `GRPOConfig.multi_objective_aggregation`):

    "sum"                 total = sum_f w_f r_f                                   (TRL's default, "sum_then_normalize":
                          the advantage estimator normalises the total afterwards)
    "normalize_then_sum"  total = sum_f w_f (r_f - mean_g(r_f)) / (std_g(r_f) + eps)   (GDPO, arXiv:2601.05242)

where mean_g and std_g run over the G samples of the same prompt (rows [g*G, (g+1)*G), the layout of a rollout, G
passed in by the caller: `RLTrainer` gives its group size), std with Bessel's correction (ddof=1) and eps=1e-4 added
to it, as TRL does (huggingface/trl, trl/trainer/grpo_trainer.py, `_generate_and_score_completions`, the
"normalize_then_sum" branch; `nanstd` in trl/trainer/utils.py); a group of one sample (G=1) gets std 0, so z = 0.
Each function then weighs by w_f whatever its scale, and a function that is constant within a group adds nothing
to it. TRL then standardises the aggregate over the whole batch, (R - mean_batch) / (std_batch + 1e-4), ignoring
`scale_rewards`; since every group's aggregate already has mean 0, jaxpost's GRPO estimator with
`AdvantageConfig(grpo_scale="batch", grpo_eps=1e-4)` computes exactly that (the default "group" scaling divides by
each group's std of the aggregate instead). Differences from TRL: a function that fails scores 0 and takes part in
the statistics (TRL's None, "not applicable", is left out as NaN), and the `reward_mean` metric of the RL loop is
the mean aggregate (0 under normalize_then_sum); the raw means are the per-function `reward/<name>` metrics.

Learned rewards (`LearnedReward`) score a whole batch of rollout rows at once on the device: a `ScalarHeadLM` (the
reward model of `jaxpost.train.rm`) read at each sample's last completion token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jaxpost")

RewardFn = Callable[..., float]

#: How `RewardSet` combines its functions' rewards (module docstring).
REWARD_AGGREGATIONS = ("sum", "normalize_then_sum")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    total: np.ndarray                     # float32 [R]: sum_f weight_f * reward_f (or of the z-scores: aggregation)
    per_function: dict[str, np.ndarray]   # name -> float32 [R] (unweighted; 0 where the call failed)
    failed: dict[str, int]                # name -> calls that raised or returned a non-finite / non-number
    timed_out: dict[str, int]             # name -> calls past the timeout
    time_s: float


class RewardSet:
    """Weighted verifier rewards. `functions`: name -> callable; `weights`: name -> weight (default 1);
    `aggregation`: "sum" or "normalize_then_sum" (each function standardised within its prompt group, eps added to
    the std; module docstring). Call as `rewards(prompts, completions, examples, group_size=G)`: G is needed by
    normalize_then_sum only, rows in groups of G consecutive samples."""

    def __init__(self, functions: Mapping[str, RewardFn], *, weights: Mapping[str, float] | None = None,
                 timeout_s: float | None = 10.0, max_threads: int = 64, aggregation: str = "sum",
                 eps: float = 1e-4):
        if not functions:
            raise ValueError("RewardSet needs at least one reward function")
        for name, fn in functions.items():
            if not callable(fn):
                raise ValueError(f"reward function {name!r} is not callable")
        weights = dict(weights or {})
        unknown = set(weights) - set(functions)
        if unknown:
            raise ValueError(f"weights for unknown reward functions {sorted(unknown)}; known: {sorted(functions)}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        if aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {REWARD_AGGREGATIONS}, got {aggregation!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.aggregation, self.eps = aggregation, float(eps)
        self.functions = dict(functions)
        self.weights = {name: float(weights.get(name, 1.0)) for name in functions}
        self.timeout_s = timeout_s
        self.max_threads = max_threads

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 examples: Sequence[Mapping[str, Any]], *, group_size: int | None = None) -> RewardResult:
        t0 = time.perf_counter()
        R = len(completions)
        if not len(prompts) == len(examples) == R:
            raise ValueError(f"RewardSet: {len(prompts)} prompts, {R} completions, {len(examples)} examples")
        if self.aggregation == "normalize_then_sum" and (group_size is None or group_size <= 0 or R % group_size):
            raise ValueError(f"RewardSet(aggregation='normalize_then_sum') needs the group size of the {R} rows, "
                             f"got group_size={group_size}")
        calls = [(name, r) for name in self.functions for r in range(R)]
        values = np.zeros((len(calls),), np.float32)
        status = np.zeros((len(calls),), np.int8)  # 0 ok, 1 failed, 2 timed out
        errors: list[str] = []

        def call(i):
            name, r = calls[i]
            try:
                v = self.functions[name](prompts[r], completions[r], **examples[r])
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError(f"non-finite reward {v}")
                values[i] = v
            except Exception as e:  # noqa: BLE001 - a broken reward function must not end the run
                status[i] = 1
                if len(errors) < 3:
                    errors.append(f"{name}(sample {r}): {e!r}")

        if self.timeout_s is None:
            for i in range(len(calls)):
                call(i)
        else:
            done = np.zeros((len(calls),), bool)

            def run(i):
                call(i)
                done[i] = True

            for start in range(0, len(calls), self.max_threads):
                wave = range(start, min(start + self.max_threads, len(calls)))
                threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in wave]
                for t in threads:
                    t.start()
                deadline = time.perf_counter() + self.timeout_s
                for t in threads:
                    t.join(max(0.0, deadline - time.perf_counter()))
                for i in wave:
                    if not done[i]:  # still running: abandoned, scored 0
                        status[i], values[i] = 2, 0.0
        per_function, failed, timed_out = {}, {}, {}
        total = np.zeros((R,), np.float32)
        for k, name in enumerate(self.functions):
            sl = slice(k * R, (k + 1) * R)
            v = np.where(status[sl] == 0, values[sl], 0.0).astype(np.float32)
            per_function[name] = v
            failed[name] = int(np.sum(status[sl] == 1))
            timed_out[name] = int(np.sum(status[sl] == 2))
            if self.aggregation == "normalize_then_sum":
                v = group_zscores(v, group_size=group_size, eps=self.eps)
            total += self.weights[name] * v
        n_bad = sum(failed.values()) + sum(timed_out.values())
        if n_bad:
            log.warning("reward functions: %d calls failed, %d timed out (scored 0)%s", sum(failed.values()),
                        sum(timed_out.values()), "; e.g. " + "; ".join(errors) if errors else "")
        return RewardResult(total=total, per_function=per_function, failed=failed, timed_out=timed_out,
                            time_s=time.perf_counter() - t0)


def group_zscores(rewards_R: np.ndarray, *, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """(r - mean_g(r)) / (std_g(r) + eps) within each group of `group_size` consecutive rows, std with ddof=1 (0 for
    a group of one), in float64, returned as float32 [R] (TRL's per-function normalisation of normalize_then_sum)."""
    r_GN = np.asarray(rewards_R, np.float64).reshape(-1, group_size)
    mean_G1 = r_GN.mean(axis=1, keepdims=True)
    std_G1 = r_GN.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(mean_G1)
    return ((r_GN - mean_G1) / (std_G1 + eps)).reshape(-1).astype(np.float32)


def task_reward(task) -> RewardFn:
    """The built-in task's checker as a 0/1 reward: `fn(prompt, completion, *, answer, **_)`."""
    def correct(prompt: str, completion: str, *, answer, **_) -> float:
        return float(task.check(completion, answer))
    return correct


def digit_match_reward(prompt: str, completion: str, *, answer, **_) -> float:
    """Partial credit for an integer answer: the fraction of the answer's digit positions (aligned from the units)
    and sign that the first integer of the completion gets right, 0 without an integer; 1 exactly when the integer
    equals the answer. A denser signal than exact match for a model that gets some digits right (the units digit of
    a sum before its tens digit), meant to be weighted below the exact-match reward."""
    match = re.search(r"-?\d+", completion)
    if match is None:
        return 0.0
    got, want = match.group(), str(answer).strip()
    if not re.fullmatch(r"-?\d+", want):
        return 0.0
    sg, sw = got.startswith("-"), want.startswith("-")
    dg, dw = got.lstrip("-")[::-1], want.lstrip("-")[::-1]
    width = max(len(dg), len(dw))
    hits = sum(i < len(dg) and i < len(dw) and dg[i] == dw[i] for i in range(width)) + (sg == sw)
    return hits / (width + 1)


class LearnedReward:
    """A reward model (`ScalarHeadLM` params, e.g. from `jaxpost.recipes.rm`) scoring rollout rows on the device:
    the score at each row's last completion token (`jaxpost.models.heads.sequence_rewards`)."""

    def __init__(self, model, params, mesh, *, rows: int):
        from jaxpost.models.heads import make_sequence_scorer  # the same jitted scorer as the RM's evaluation
        self._score = make_sequence_scorer(model, mesh, model.param_shardings(mesh), rows=rows)
        self.params = params
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Scores [R] of a batch in the `rollout_batch` layout ([R, T] arrays, one sample per row)."""
        R = batch["inputs"].shape[0]
        out = np.zeros((R,), np.float32)
        for start in range(0, R, self.rows):
            chunk = {k: v[start:start + self.rows] for k, v in batch.items()}
            n = chunk["inputs"].shape[0]
            if n < self.rows:  # pad to the compiled shape
                chunk = {k: np.concatenate([v, np.zeros((self.rows - n, *v.shape[1:]), v.dtype)])
                         for k, v in chunk.items()}
            out[start:start + n] = np.asarray(jax.device_get(self._score(self.params, chunk)))[:n]
        return out
