"""A reasoning task: multi-digit addition and subtraction answered directly or through a worked, column-by-column trace.

The task is built so that a tiny (~3M parameter) character-level transformer trained for minutes on a CPU finds the
DIRECT answer hard (writing the most significant digit first needs the whole carry chain in one step) but the TRACE
easy (each line is a local computation: copy two digits, add the carry of the line above, prepend one digit to the
partial result): the scratchpad effect of Lee et al. 2023, "Teaching Arithmetic to Small Transformers". A
`trace_fraction` of the gold completions is worked, the rest direct, so SFT teaches both formats and RL can select
the one that earns rewards; `has_trace` tells which format a sampled completion used.

Prompt (the same for both formats; it does not say which to use):  "What is 384 + 599?"
Direct completion:  "Answer: 983"
Trace completion (lines joined by "\\n", no trailing newline):

    384+599            header: the column problem this sub-problem solves
    4+9+0=13 3         units column: x + y + carry = two-digit sum; then the partial result (the sum's last digit
    8+9+1=18 83          prepended to the partial of the line above); the sum's first digit is the next carry
    3+5+1=09 983       ... up to the longest operand, plus one more column while a carry is left
    Answer: 983

Subtraction columns show the borrow as the tens digit of the top digit: `BX-Y-b=D P` means (10*B + X) - Y - b = D,
with B the borrow passed to the next column (B is 1 exactly when X - Y - b < 0). The header always puts the larger
magnitude on top and wraps the problem in `-(...)` when the result is negative, so columns never go below zero:
"What is 27 - 384?" has the header `-(384-27)`. A sub-problem's value is its last partial without leading zeros and
with the header's sign (1000-999 ends in the partial 0001: value 1). With `n_operands > 2` the problems are evaluated
left to right, one sub-problem (header + columns) per operand, the running total on a line `=T` between
sub-problems, e.g. for "What is 27 - 384 + 599?":

    -(384-27)
    14-7-0=7 7
    08-2-1=5 57
    03-0-0=3 357
    =-357
    599-357            -357 + 599 = 599 - 357: larger magnitude on top, positive
    09-7-0=2 2
    09-5-0=4 42
    05-3-0=2 242
    Answer: 242

Headers, given the running total T (t = |T|) and the next operand n:
    T >= 0, "+ n": `t+n`;   T >= 0, "- n": `t-n` if t >= n else `-(n-t)`;
    T < 0,  "+ n": `n-t` if n >= t else `-(t-n)`;   T < 0, "- n": `-(t+n)`.

Lengths, in characters (= tokens of a character-level vocabulary), for two operands of at most d digits: the direct
form is "Answer: " plus at most d + 1 characters; the trace has a header of at most 2d + 3 characters, at most d + 1
column lines of 9 + i characters (i = 1, 2, ...), the answer line and the newlines between lines. The worst case is
the addition with a final carry (999+999): 70 characters at d = 3, 53 at d = 2. Over random problems with exactly d
digits per operand the trace averages about 60 characters at d = 3 and 44 at d = 2 (direct: 11.4 and 10.4); with three
operands about 118 (max 135) and 85 (max 101). Short lines keep every step local.

`check` reads only the last "Answer: N" line, so both formats are graded the same way.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, ClassVar

from jaxpost.data.tasks import Task, _check_split, _stable_fraction

__all__ = ["REASONING_TASKS", "ReasoningArithmeticTask"]

#: A problem: operands and operators alternating, left to right, e.g. `(384, "+", 599, "-", 27)`.
Problem = tuple[Any, ...]

_ANSWER_PREFIX = "Answer:"
_ANSWER_VALUE_RE = re.compile(r"[ \t]*(-?\d+)[ \t\r]*")
# A column line of either kind: "8+9+1=18 83" or "14-7-0=7 7".
_COLUMN_RE = re.compile(r"^[ \t]*\d{1,2}[+-]\d[+-]\d=\d{1,2} \d+[ \t\r]*$", re.MULTILINE)


def _digit(number: int, i: int) -> int:
    """Digit `i` of `number` counted from the units (0 beyond its length)."""
    return number // 10**i % 10


def _add_columns(x: int, y: int) -> tuple[list[str], str]:
    """Column lines of `x + y`, units first, and the final partial result (the sum's digits)."""
    lines, partial, carry, i = [], "", 0, 0
    while i < max(len(str(x)), len(str(y))) or carry:
        a, b = _digit(x, i), _digit(y, i)
        total = a + b + carry
        partial = f"{total % 10}{partial}"
        lines.append(f"{a}+{b}+{carry}={total:02d} {partial}")
        carry, i = total // 10, i + 1
    return lines, partial


def _sub_columns(x: int, y: int) -> tuple[list[str], str]:
    """Column lines of `x - y` for `x >= y`, units first, and the final partial result (may have leading zeros)."""
    lines, partial, borrow = [], "", 0
    for i in range(len(str(x))):
        a, b = _digit(x, i), _digit(y, i)
        borrow_out = int(a - b - borrow < 0)
        digit = 10 * borrow_out + a - b - borrow
        partial = f"{digit}{partial}"
        lines.append(f"{borrow_out}{a}-{b}-{borrow}={digit} {partial}")
        borrow = borrow_out
    return lines, partial


def _column_problem(total: int, op: str, n: int) -> tuple[str, int, int, bool]:
    """`total op n` as (column op, top, bottom, negate) with non-negative columns: the table in the module docs."""
    t = abs(total)
    if total >= 0:
        if op == "+":
            return "+", t, n, False
        return ("-", t, n, False) if t >= n else ("-", n, t, True)
    if op == "+":
        return ("-", n, t, False) if n >= t else ("-", t, n, True)
    return "+", t, n, True


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReasoningArithmeticTask(Task):
    """Left-to-right `+`/`-` over `n_operands` operands of `min_digits..max_digits` digits, direct or traced.

    Operands are drawn like `ArithmeticTask`'s (digit count uniform, then the operand uniform among numbers with that
    many digits, 0-9 for one digit), operators uniformly from `ops`. About `test_fraction` of all problems belong to
    "test", chosen by a stable hash of the problem text "384 + 599 - 27" (independent of the seed; for two operands
    the same split as `ArithmeticTask`). Problem i of a split carries a trace when a stable hash of (seed, problem)
    falls below `trace_fraction`; the module docstring shows both formats.
    """

    name: ClassVar[str] = "reasoning_arith"
    OPS: ClassVar[tuple[str, ...]] = ("+", "-")
    _SPLIT_CODES: ClassVar[dict[str, int]] = {"train": 0, "test": 1}
    _MAX_DRAWS: ClassVar[int] = 10_000

    min_digits: int = 1
    max_digits: int = 3
    n_operands: int = 2
    ops: tuple[str, ...] = ("+", "-")
    trace_fraction: float = 0.5
    seed: int = 0
    test_fraction: float = 0.1

    def __post_init__(self):
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not (is_int(self.min_digits) and is_int(self.max_digits) and 1 <= self.min_digits <= self.max_digits):
            raise ValueError(
                f"need integers 1 <= min_digits <= max_digits, got min_digits={self.min_digits!r}, "
                f"max_digits={self.max_digits!r}"
            )
        if not (is_int(self.n_operands) and self.n_operands >= 2):
            raise ValueError(f"n_operands must be an integer >= 2, got {self.n_operands!r}")
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        if not ops or any(op not in self.OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be a non-empty subset of {self.OPS} without repeats, got {self.ops!r}")
        object.__setattr__(self, "ops", ops)
        if not (isinstance(self.trace_fraction, (int, float)) and 0.0 <= self.trace_fraction <= 1.0):
            raise ValueError(f"trace_fraction must be in [0, 1], got {self.trace_fraction!r}")
        if not (isinstance(self.test_fraction, (int, float)) and 0.0 < self.test_fraction < 1.0):
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "trace_fraction", float(self.trace_fraction))
        object.__setattr__(self, "test_fraction", float(self.test_fraction))

    # -- problems --------------------------------------------------------------------------------------------------

    @staticmethod
    def text(problem: Problem) -> str:
        """The problem as written in the prompt: "384 + 599 - 27"."""
        return " ".join(str(x) for x in problem)

    def split_of(self, problem: Problem) -> str:
        """The split a problem belongs to, by a stable hash of its text."""
        return "test" if _stable_fraction(self.text(problem)) < self.test_fraction else "train"

    def _draw_operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def problem(self, split: str, index: int) -> Problem:
        _check_split(split)
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        # A string seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
        rng = random.Random(f"{self.name}/{self.seed}/{self._SPLIT_CODES[split]}/{index}")
        for _ in range(self._MAX_DRAWS):
            problem: list[Any] = [self._draw_operand(rng)]
            for _ in range(self.n_operands - 1):
                problem += [rng.choice(self.ops), self._draw_operand(rng)]
            if self.split_of(tuple(problem)) == split:
                return tuple(problem)
        raise RuntimeError(f"no {split!r} problem found in {self._MAX_DRAWS} draws for {self!r}; widen the space")

    def prompt(self, problem: Problem) -> str:
        return f"What is {self.text(problem)}?"

    def value(self, problem: Problem) -> int:
        """The problem's value, evaluated left to right."""
        total = problem[0]
        for op, n in zip(problem[1::2], problem[2::2], strict=True):
            total = total + n if op == "+" else total - n
        return total

    def answer(self, problem: Problem) -> str:
        return str(self.value(problem))

    # -- completions -----------------------------------------------------------------------------------------------

    def is_traced(self, problem: Problem) -> bool:
        """Whether `problem`'s gold completion is the trace: a stable hash of (seed, problem) < `trace_fraction`."""
        return _stable_fraction(f"trace/{self.seed}/{self.text(problem)}") < self.trace_fraction

    def completion(self, problem: Problem) -> str:
        """The gold completion: `trace_completion` if `is_traced(problem)`, else `direct_completion`."""
        return self.trace_completion(problem) if self.is_traced(problem) else self.direct_completion(problem)

    def direct_completion(self, problem: Problem) -> str:
        """"Answer: N"."""
        return f"{_ANSWER_PREFIX} {self.value(problem)}"

    def trace_completion(self, problem: Problem) -> str:
        """The worked trace: per sub-problem a header and its column lines, `=T` between sub-problems, then
        "Answer: N" (format in the module docstring)."""
        lines: list[str] = []
        total = problem[0]
        pairs = list(zip(problem[1::2], problem[2::2], strict=True))
        for k, (op, n) in enumerate(pairs):
            column_op, top, bottom, negate = _column_problem(total, op, n)
            body = f"{top}{column_op}{bottom}"
            lines.append(f"-({body})" if negate else body)
            columns, partial = (_add_columns if column_op == "+" else _sub_columns)(top, bottom)
            lines += columns
            total = -int(partial) if negate else int(partial)
            if k < len(pairs) - 1:
                lines.append(f"={total}")
        lines.append(f"{_ANSWER_PREFIX} {total}")
        return "\n".join(lines)

    @staticmethod
    def has_trace(completion: Any) -> bool:
        """Whether a (model's) completion used the trace format: at least one column line ("8+9+1=18 83" or
        "14-7-0=7 7") on a line of its own. Never raises; False for non-strings."""
        return isinstance(completion, str) and _COLUMN_RE.search(completion) is not None

    @staticmethod
    def steps(completion: Any) -> list[str]:
        """The non-empty lines of `completion`, stripped, the final "Answer: N" line included; [] for non-strings."""
        if not isinstance(completion, str):
            return []
        return [line.strip() for line in completion.split("\n") if line.strip()]

    # -- grading ---------------------------------------------------------------------------------------------------

    def check(self, completion: str, answer: str) -> bool:
        """True iff the text after the LAST "Answer:" in `completion`, up to the end of its line, is an integer equal to
        `answer` (surrounding spaces allowed, nothing else); never raises. Earlier lines are not read."""
        try:
            start = completion.rfind(_ANSWER_PREFIX)
            if start < 0:
                return False
            line = completion[start + len(_ANSWER_PREFIX):].split("\n", 1)[0]
            match = _ANSWER_VALUE_RE.fullmatch(line)
            return match is not None and int(match.group(1)) == int(answer)
        except Exception:  # noqa: BLE001 - a checker must never crash a rollout
            return False

    def corpus(self, n: int) -> list[str]:
        """One text with every character prompts and completions can contain, then the prompt, the trace and the
        direct completion of train problems 0..n-1."""
        texts = ["What is 0123456789 + - ?\n-(0+1)=2\nAnswer: -0123456789"]
        for i in range(n):
            problem = self.problem("train", i)
            texts += [self.prompt(problem), self.trace_completion(problem), self.direct_completion(problem)]
        return texts


#: Reasoning tasks by name, for `jaxpost.data.tasks.make_task` to register.
REASONING_TASKS: dict[str, type[Task]] = {"reasoning_arith": ReasoningArithmeticTask}
