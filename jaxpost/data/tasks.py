"""Built-in verifiable tasks: deterministic synthetic problems with a checker, for SFT, RL and evaluation.

A task draws problem `index` of a split deterministically from `(seed, split, index)`, formats it as a prompt, knows
the reference answer, and checks a model's completion against it without ever raising. Train and test problems are
disjoint: a problem's split is decided by a stable hash of its text (independent of the seed), and a draw is repeated
until it lands in the requested split.

    task = make_task("arithmetic", max_digits=3, ops=("+", "-"))
    task.example("train", 0)   # {"prompt": "What is 37 + 485?", "answer": "522", "completion": "522",
                               #  "messages": [...]}
    task.check("The answer is 522.", "522")   # True
    source = task.source("train")             # grain random-access source of examples
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import hashlib
import random
import re
from typing import Any, ClassVar

from jaxpost.data.sources import FunctionSource

__all__ = ["ArithmeticTask", "SPLITS", "TASKS", "Task", "make_task", "task_from_config"]

#: Splits every task provides.
SPLITS: tuple[str, ...] = ("train", "test")

#: Default length of `Task.source(split)`: the number of distinct indices (problems may repeat for small spaces).
DEFAULT_SOURCE_LENGTH = 2**31 - 1

_INT_RE = re.compile(r"-?\d+")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _stable_fraction(text: str) -> float:
    """A hash of `text` mapped to [0, 1), stable across processes and Python versions (unlike `hash`)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Task(abc.ABC):
    """A verifiable task. Subclasses define `problem`, `prompt`, `answer`, `check` and `corpus`.

    Problems are any hashable description (e.g. a tuple `(a, op, b)`); `example` wraps one into the record format
    the data pipeline accepts (`messages`), plus `prompt`, `answer` and the gold `completion`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def problem(self, split: str, index: int) -> Any:
        """The problem at `index` of `split`, deterministic in (seed, split, index)."""

    @abc.abstractmethod
    def prompt(self, problem: Any) -> str:
        """The user prompt for `problem`."""

    @abc.abstractmethod
    def answer(self, problem: Any) -> str:
        """The reference answer for `problem`, in the form `check` compares against."""

    @abc.abstractmethod
    def check(self, completion: str, answer: str) -> bool:
        """Whether `completion` answers correctly; never raises (garbage gives False)."""

    @abc.abstractmethod
    def corpus(self, n: int) -> list[str]:
        """At least `n` texts covering every character the task's prompts and completions can contain."""

    def completion(self, problem: Any) -> str:
        """The gold completion text (by default the bare answer)."""
        return self.answer(problem)

    def example(self, split: str, index: int) -> dict[str, Any]:
        """Record for problem `index` of `split`: keys `prompt`, `answer`, `completion`, `messages`."""
        problem = self.problem(split, index)
        prompt = self.prompt(problem)
        completion = self.completion(problem)
        return {
            "prompt": prompt,
            "answer": self.answer(problem),
            "completion": completion,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
        }

    def examples(self, split: str, n: int, *, start: int = 0) -> list[dict[str, Any]]:
        """Examples `start, ..., start + n - 1` of `split`."""
        return [self.example(split, i) for i in range(start, start + n)]

    def source(self, split: str, *, length: int = DEFAULT_SOURCE_LENGTH) -> FunctionSource:
        """A grain `RandomAccessDataSource` over `split`: item `i` is `example(split, i)`."""
        _check_split(split)
        return FunctionSource(functools.partial(self.example, split), length)


class ArithmeticTask(Task):
    """Integer arithmetic `a op b` with operands of `min_digits..max_digits` digits; ops among `+`, `-`, `*`.

    Prompt `"What is 37 + 485?"`, answer `"522"` (negative for `-` when `b > a`). The number of digits of each
    operand is drawn uniformly, then the operand uniformly among numbers with that many digits (0-9 for one digit).
    About `test_fraction` of all problems belong to "test", chosen by a stable hash of `"a op b"`.
    """

    name = "arithmetic"
    OPS: ClassVar[dict[str, Any]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    _SPLIT_CODES: ClassVar[dict[str, int]] = {"train": 0, "test": 1}
    _MAX_DRAWS = 10_000

    def __init__(
        self,
        *,
        min_digits: int = 1,
        max_digits: int = 3,
        ops: tuple[str, ...] = ("+", "-"),
        seed: int = 0,
        test_fraction: float = 0.1,
    ):
        if not (isinstance(min_digits, int) and isinstance(max_digits, int) and 1 <= min_digits <= max_digits):
            raise ValueError(f"need integers 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        ops = tuple(ops)
        if not ops or any(op not in self.OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {tuple(self.OPS)}, got {ops}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.ops = ops
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(min_digits={self.min_digits}, max_digits={self.max_digits}, ops={self.ops}, "
            f"seed={self.seed}, test_fraction={self.test_fraction})"
        )

    def split_of(self, problem: tuple[int, str, int]) -> str:
        """The split a problem belongs to, by a stable hash of its text."""
        a, op, b = problem
        return "test" if _stable_fraction(f"{a} {op} {b}") < self.test_fraction else "train"

    def _draw_operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def problem(self, split: str, index: int) -> tuple[int, str, int]:
        _check_split(split)
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        # A string seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
        rng = random.Random(f"arithmetic/{self.seed}/{self._SPLIT_CODES[split]}/{index}")
        for _ in range(self._MAX_DRAWS):
            a = self._draw_operand(rng)
            op = rng.choice(self.ops)
            b = self._draw_operand(rng)
            if self.split_of((a, op, b)) == split:
                return (a, op, b)
        raise RuntimeError(
            f"no {split!r} problem found in {self._MAX_DRAWS} draws for {self!r}; widen the problem space"
        )

    def prompt(self, problem: tuple[int, str, int]) -> str:
        a, op, b = problem
        return f"What is {a} {op} {b}?"

    def answer(self, problem: tuple[int, str, int]) -> str:
        a, op, b = problem
        return str(self.OPS[op](a, b))

    def check(self, completion: str, answer: str) -> bool:
        """True iff the first integer in `completion` (optionally signed) equals `answer`; never raises."""
        try:
            match = _INT_RE.search(completion)
            return match is not None and int(match.group()) == int(answer)
        except Exception:  # noqa: BLE001 - a checker must never crash a rollout
            return False

    def corpus(self, n: int) -> list[str]:
        """`n` train prompts and completions, plus one line with every character the task can produce."""
        texts = [f"What is 0123456789 {' '.join(self.ops)} -0123456789?"]
        for i in range(n):
            example = self.example("train", i)
            texts.append(example["prompt"])
            texts.append(example["completion"])
        return texts


#: Registry of built-in tasks by name.
TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask}


def task_from_config(cfg) -> Task:
    """The task a `jaxpost.config.TaskConfig` describes, given the parameters its constructor takes. A parameter set
    away from its default that the task does not take is an error (e.g. trace_fraction on the arithmetic task)."""
    cls = TASKS.get(cfg.name)
    if cls is None:
        raise ValueError(f"unknown task {cfg.name!r}; available: {sorted(TASKS)}")
    accepted = inspect.signature(cls).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    kwargs = {}
    for k, v in cfg.kwargs().items():
        if k in accepted:
            kwargs[k] = v
        elif v != defaults[k]:
            raise ValueError(f"task {cfg.name!r} takes no parameter {k!r} (set to {v!r})")
    return cls(**kwargs)


def make_task(name: str, **kwargs: Any) -> Task:
    """Builds a registered task, e.g. `make_task("arithmetic", max_digits=4, ops=("+", "-", "*"))`."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}") from None
    return cls(**kwargs)
