"""Process reward-model data: steps of a solution, Math-Shepherd labels, error-injected traces, packed step rows.

A solution's steps are its lines: step k ends at the k-th step delimiter (a newline token) and the last step ends at
the solution's last token (the stop token of a finished sample), which is where a reward head reads each step's score.

Math-Shepherd labels (Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human
Annotations", arXiv:2312.08935): the prefix prompt + steps 1..k is completed M times by the policy; the step's hard
label is 1 if any completion reaches the right answer, its soft label the fraction that do. The last step's label
is the solution's own correctness (its prefix is the whole solution), which is also the outcome label of an ORM.

The functions here work on any sequences that concatenate with `+` (token-id lists, or strings in tests): the policy
and the checker are passed in, so the labelling is pure given them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Solution", "StepLabels", "step_ends", "math_shepherd_labels", "inject_error", "pack_step_rows",
           "StepRowIterator", "STEP_KEYS"]

#: The arrays of a packed step row [N, T]: tokens, positions and segment ids of the packed solutions, 1 at each
#: labelled step end, the label there (0 elsewhere).
STEP_KEYS: tuple[str, ...] = ("inputs", "positions", "segment_ids", "step_mask", "labels")

_COLUMN_LINE = re.compile(r"^(\d{1,2})([+-])(\d)([+-])(\d)=(\d{1,2}) (\d+)$")


def step_ends(completion: Sequence, is_delimiter: Callable[[Any], bool]) -> list[int]:
    """Indices into `completion` of the elements that end its steps: every delimiter that closes a non-empty step,
    and the last element (the end of the final step; a completion that ends on a delimiter ends its final step
    there). Empty steps (a delimiter right after another step's end) are skipped. [] for an empty completion."""
    ends: list[int] = []
    start = 0  # the first element of the current step
    for i, x in enumerate(completion):
        if is_delimiter(x):
            if i > start:
                ends.append(i)
            start = i + 1
    if len(completion) and (not ends or ends[-1] != len(completion) - 1):
        ends.append(len(completion) - 1)
    return ends


@dataclasses.dataclass(frozen=True)
class Solution:
    """A sampled solution to label: which problem it solves (a key the policy and the checker understand), its
    completion (without the prompt) and its step ends (`step_ends`)."""

    problem: Any
    completion: Sequence
    ends: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StepLabels:
    """Labels of a solution's steps (one per step end): hard (any completion right), soft (the fraction right; None
    where not estimated, see `math_shepherd_labels`' `hard_only`), and the solution's own correctness (the outcome)."""

    hard: tuple[float, ...]
    soft: tuple[float, ...] | None
    outcome: bool


def math_shepherd_labels(solutions: Sequence[Solution], *,
                         rollouts: Callable[[list[tuple[Any, Sequence]], int], list[list[Sequence]]],
                         correct: Callable[[Any, Sequence], bool], n_rollouts: int, reuse_solution: bool = False,
                         hard_only: bool = False) -> list[StepLabels]:
    """Math-Shepherd labels (module docstring) of every step of every solution: step k's soft label is the fraction
    of `n_rollouts` completions of the prefix (steps 1..k) that `correct` accepts, its hard label 1 if any is.

    rollouts(queries, n): for each query (problem, completion prefix) n continuations of the prefix by the policy;
    it is called once, with every prefix that needs completions (batch them as you like), and not at all when none
    does. correct(problem, completion): whether a full completion reaches the problem's answer.
    The final step of a solution is not rolled out: its label (hard and soft) is the solution's correctness.

    reuse_solution: the solution's own continuation after each prefix is one of the `n_rollouts` completions (it is
    a sample of the same policy given that prefix), so only n_rollouts - 1 fresh ones are drawn.
    hard_only: with `reuse_solution`, a correct solution is its own witness: every step's hard label is 1 without any
    rollout, and its soft labels are left unestimated (None); only wrong solutions are rolled out.
    """
    if n_rollouts <= 0:
        raise ValueError(f"n_rollouts must be > 0, got {n_rollouts}")
    if hard_only and not reuse_solution:
        raise ValueError("hard_only needs reuse_solution (a correct solution is its own witness)")
    fresh = n_rollouts - int(reuse_solution)
    outcomes = [bool(correct(s.problem, s.completion)) for s in solutions]
    queries, where = [], []
    for i, s in enumerate(solutions):
        if fresh == 0 or (hard_only and outcomes[i]):
            continue
        for k, end in enumerate(s.ends[:-1]):
            queries.append((s.problem, s.completion[:end + 1]))
            where.append((i, k))
    continuations = rollouts(queries, fresh) if queries else []
    if len(continuations) != len(queries):
        raise ValueError(f"rollouts gave {len(continuations)} groups for {len(queries)} prefixes")
    rights: dict[tuple[int, int], int] = {}
    for (problem, prefix), group, key in zip(queries, continuations, where):
        if len(group) != fresh:
            raise ValueError(f"rollouts gave {len(group)} continuations of a prefix, expected {fresh}")
        rights[key] = sum(bool(correct(problem, prefix + c)) for c in group)
    out = []
    for i, s in enumerate(solutions):
        ok = outcomes[i]
        if hard_only and ok:
            out.append(StepLabels(hard=(1.0,) * len(s.ends), soft=None, outcome=ok))
            continue
        own = int(ok) if reuse_solution else 0
        soft = [(rights.get((i, k), 0) + own) / n_rollouts for k in range(len(s.ends) - 1)]
        soft += [float(ok)] if s.ends else []
        out.append(StepLabels(hard=tuple(float(f > 0) for f in soft), soft=tuple(soft), outcome=ok))
    return out


def inject_error(trace: str, line: int, digit: int) -> tuple[str, list[float]]:
    """(`trace` with an arithmetic error at column line `line`, the labels of its steps).

    `trace` is a two-operand worked trace of `ReasoningArithmeticTask` (header, column lines, "Answer: N"). Column
    line `line` (an index into the trace's lines, 1 .. lines - 2) gets the wrong result digit `digit` (the units
    digit of an addition column's sum, or a subtraction column's digit): every partial result from that line on
    carries it, and so does the answer, while carries and borrows stay as they were. Each later line is then a
    correct computation from a wrong step, so the steps before the error are labelled 1 and every step from the
    error on 0 (no completion of such a prefix that copies its partial reaches the right answer).
    """
    lines = trace.split("\n")
    if len(lines) < 3 or not lines[-1].startswith("Answer:") or any(
            _COLUMN_LINE.match(x) is None for x in lines[1:-1]):
        raise ValueError(f"not a two-operand worked trace: {trace!r}")
    if not 1 <= line <= len(lines) - 2:
        raise ValueError(f"line must be a column line in 1..{len(lines) - 2}, got {line}")
    column = line - 1  # digits counted from the units
    m = _COLUMN_LINE.match(lines[line])
    total, old = m.group(6), int(m.group(6)[-1])
    if not 0 <= digit <= 9 or digit == old:
        raise ValueError(f"digit must be 0-9 and differ from the right digit {old}, got {digit}")
    out = list(lines)
    for j in range(line, len(lines) - 1):
        g = _COLUMN_LINE.match(lines[j]).groups()
        partial = list(g[6])
        partial[len(partial) - 1 - column] = str(digit)
        new_total = total[:-1] + str(digit) if j == line else g[5]
        out[j] = f"{g[0]}{g[1]}{g[2]}{g[3]}{g[4]}={new_total} {''.join(partial)}"
    value = int(_COLUMN_LINE.match(out[-2]).group(7))
    out[-1] = f"Answer: {-value if lines[0].startswith('-(') else value}"
    labels = [1.0] * line + [0.0] * (len(lines) - line)
    return "\n".join(out), labels


# ---- packed step rows ----------------------------------------------------------------------------------------------


def pack_step_rows(items: Sequence[Mapping[str, Any]], seq_len: int) -> tuple[dict[str, np.ndarray], list]:
    """Rows [N, seq_len] (`STEP_KEYS`) packing `items` in order (next fit: a row takes items while they fit), and
    where each item went: (row, offset) per item. An item is {"tokens": ids, "ends": positions in ids of its
    labelled steps, "labels": one per end}; an item longer than seq_len is cut, losing the ends past the cut."""
    placed, rows, used = [], [], seq_len + 1
    for it in items:
        n = min(len(it["tokens"]), seq_len)
        if used + n > seq_len:
            rows.append([])
            used = 0
        placed.append((len(rows) - 1, used))
        rows[-1].append(it)
        used += n
    N = max(len(rows), 1)
    out = {"inputs": np.zeros((N, seq_len), np.int32), "positions": np.zeros((N, seq_len), np.int32),
           "segment_ids": np.zeros((N, seq_len), np.int32), "step_mask": np.zeros((N, seq_len), np.float32),
           "labels": np.zeros((N, seq_len), np.float32)}
    for it, (r, off) in zip(items, placed):
        n = min(len(it["tokens"]), seq_len)
        seg = int(out["segment_ids"][r].max()) + 1
        out["inputs"][r, off:off + n] = np.asarray(it["tokens"][:n], np.int32)
        out["positions"][r, off:off + n] = np.arange(n)
        out["segment_ids"][r, off:off + n] = seg
        if len(it["ends"]) != len(it["labels"]):
            raise ValueError(f"{len(it['ends'])} step ends but {len(it['labels'])} labels")
        for e, y in zip(it["ends"], it["labels"]):
            if e < n:
                out["step_mask"][r, off + e] = 1.0
                out["labels"][r, off + e] = float(y)
    return out, placed


class StepRowIterator:
    """Batches of `batch_size` rows of `rows` (`pack_step_rows`) in a fresh seeded order each epoch, forever; this
    process takes its slice of each global batch. `get_state()` / `set_state()` resume exactly (JSON)."""

    _VERSION = 1

    def __init__(self, rows: Mapping[str, np.ndarray], *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        self.rows = dict(rows)
        self.n = len(next(iter(self.rows.values())))
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} does not split over {process_count} processes")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.process_index, self.process_count = process_index, process_count
        self.batches_drawn = 0
        self._config = {"n_rows": self.n, "batch_size": batch_size, "shuffle": shuffle, "seed": seed}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> StepRowIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.batches_drawn * self.batch_size
        idx = [int(self._order(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]
        per = self.batch_size // self.process_count
        idx = idx[self.process_index * per:(self.process_index + 1) * per]
        self.batches_drawn += 1
        return {k: v[idx] for k, v in self.rows.items()}

    @property
    def stats(self) -> dict[str, int]:
        return {"rows_seen": self.batches_drawn * self.batch_size,
                "epochs": self.batches_drawn * self.batch_size // max(self.n, 1)}

    def get_state(self) -> dict[str, Any]:
        return {"version": self._VERSION, "config": dict(self._config), "batches_drawn": self.batches_drawn}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != self._VERSION:
            raise ValueError(f"not a StepRowIterator state of version {self._VERSION}: {str(state)[:200]}")
        if dict(state["config"]) != self._config:
            raise ValueError(f"cannot resume: the step rows differ from the saved state (saved {state['config']}, "
                             f"now {self._config})")
        self.batches_drawn = int(state["batches_drawn"])

    def close(self) -> None:
        pass
