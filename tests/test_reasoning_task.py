"""Tests for jaxpost.data.reasoning: deterministic, split-disjoint multi-operand arithmetic with worked traces.

The traces are checked by a parser written here from the format's description (not from the implementation): every
header must state the next sub-problem with the larger magnitude on top and the sign of its result, every column must
take the right digits and carry/borrow and do its arithmetic right, every partial result must extend the one above,
and the answer must equal Python's own left-to-right evaluation of the prompt.
"""

import dataclasses
import re
import statistics

import pytest

from jaxpost.data.reasoning import REASONING_TASKS, ReasoningArithmeticTask
from jaxpost.data.tasks import ArithmeticTask, Task

_PROMPT_RE = re.compile(r"^What is (\d+(?: [-+] \d+)+)\?$")
_HEADER_RE = re.compile(r"^(-\()?(\d+)([-+])(\d+)(\))?$")
_ADD_COLUMN_RE = re.compile(r"^(\d)\+(\d)\+(\d)=(\d)(\d) (\d+)$")
_SUB_COLUMN_RE = re.compile(r"^(\d)(\d)-(\d)-(\d)=(\d) (\d+)$")


def _terms(prompt: str) -> tuple[list[int], list[str]]:
    tokens = _PROMPT_RE.match(prompt).group(1).split(" ")
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def _evaluate(prompt: str) -> int:
    expression = _PROMPT_RE.match(prompt).group(1)  # digits, spaces, + and - only
    return eval(expression)  # Python's own left-to-right evaluation is the reference


def _digit(number: int, i: int) -> int:
    return int(str(number)[::-1][i]) if i < len(str(number)) else 0


def _check_columns(lines: list[str], top: int, op: str, bottom: int) -> int:
    """Checks the column lines of `top op bottom`; returns their count."""
    carry, partial = 0, ""
    width = max(len(str(top)), len(str(bottom)))
    for i, line in enumerate(lines):
        if op == "+":
            a, b, c, s1, s0, p = _ADD_COLUMN_RE.match(line).groups()
            assert (int(a), int(b), int(c)) == (_digit(top, i), _digit(bottom, i), carry), line
            assert 10 * int(s1) + int(s0) == int(a) + int(b) + int(c), line
            digit, carry = s0, int(s1)
        else:
            borrow_out, a, b, c, d, p = _SUB_COLUMN_RE.match(line).groups()
            assert (int(a), int(b), int(c)) == (_digit(top, i), _digit(bottom, i), carry), line
            assert 10 * int(borrow_out) + int(a) - int(b) - int(c) == int(d), line
            assert int(borrow_out) == int(int(a) - int(b) - int(c) < 0), line
            digit, carry = d, int(borrow_out)
        assert p == digit + partial, line
        partial = p
    expected = top + bottom if op == "+" else top - bottom
    assert carry == 0 and int(partial) == expected
    assert len(lines) == width + (op == "+" and expected >= 10**width)  # one more column only for a final carry
    return len(lines)


def verify_trace(prompt: str, trace: str) -> None:
    """Asserts that `trace` is a correct worked solution of `prompt` in the documented format."""
    operands, ops = _terms(prompt)
    lines = trace.split("\n")
    assert all(line and line == line.strip() for line in lines), trace
    total, pos = operands[0], 0
    for k, (op, n) in enumerate(zip(ops, operands[1:], strict=True)):
        negate, top, column_op, bottom, close = _HEADER_RE.match(lines[pos]).groups()
        top, bottom = int(top), int(bottom)
        assert (negate is None) == (close is None)
        expected = total + n if op == "+" else total - n
        column_value = top + bottom if column_op == "+" else top - bottom
        assert (-column_value if negate else column_value) == expected
        assert bool(negate) == (expected < 0)  # the sign goes outside, columns never go negative
        assert sorted([top, bottom]) == sorted([abs(total), n])
        assert top >= bottom if column_op == "-" else (top, bottom) == (abs(total), n)
        pos += 1
        end = pos
        while end < len(lines) and (_ADD_COLUMN_RE.match(lines[end]) or _SUB_COLUMN_RE.match(lines[end])):
            end += 1
        _check_columns(lines[pos:end], top, column_op, bottom)
        pos, total = end, expected
        if k < len(ops) - 1:
            assert lines[pos] == f"={total}"
            pos += 1
    assert pos == len(lines) - 1 and lines[pos] == f"Answer: {total}"
    assert total == _evaluate(prompt)


CONFIGS = [
    dict(min_digits=1, max_digits=1, n_operands=2, ops=("+",)),
    dict(min_digits=1, max_digits=3, n_operands=2, ops=("+", "-")),
    dict(min_digits=3, max_digits=3, n_operands=2, ops=("-",)),
    dict(min_digits=1, max_digits=4, n_operands=3, ops=("+", "-")),
    dict(min_digits=2, max_digits=2, n_operands=4, ops=("+", "-")),
    dict(min_digits=1, max_digits=2, n_operands=5, ops=("-",)),
    dict(min_digits=5, max_digits=6, n_operands=2, ops=("+", "-")),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['min_digits']}-{c['max_digits']}d{c['n_operands']}")
def test_every_trace_step_is_correct(config):
    task = ReasoningArithmeticTask(**config, trace_fraction=1.0, seed=5)
    for split, n in (("train", 300), ("test", 50)):
        for i in range(n):
            ex = task.example(split, i)
            verify_trace(ex["prompt"], ex["completion"])
            assert ex["answer"] == str(_evaluate(ex["prompt"]))


def test_traces_of_hand_picked_problems():
    task = ReasoningArithmeticTask(trace_fraction=1.0)
    assert task.trace_completion((384, "+", 599)) == "384+599\n4+9+0=13 3\n8+9+1=18 83\n3+5+1=09 983\nAnswer: 983"
    # 27 - 384 = -(384 - 27) = -357; -357 + 599 = 599 - 357 = 242 (the module docstring's example).
    assert task.trace_completion((27, "-", 384, "+", 599)) == (
        "-(384-27)\n14-7-0=7 7\n08-2-1=5 57\n03-0-0=3 357\n=-357\n"
        "599-357\n09-7-0=2 2\n09-5-0=4 42\n05-3-0=2 242\nAnswer: 242"
    )
    assert task.trace_completion((999, "+", 999)) == (  # a final carry adds a column
        "999+999\n9+9+0=18 8\n9+9+1=19 98\n9+9+1=19 998\n0+0+1=01 1998\nAnswer: 1998"
    )
    assert task.trace_completion((1000, "-", 999)) == (  # leading zeros of the partial vanish in the answer
        "1000-999\n10-9-0=1 1\n10-9-1=0 01\n10-9-1=0 001\n01-0-1=0 0001\nAnswer: 1"
    )
    assert task.trace_completion((3, "-", 7)) == "-(7-3)\n07-3-0=4 4\nAnswer: -4"
    assert task.trace_completion((0, "+", 0)) == "0+0\n0+0+0=00 0\nAnswer: 0"
    assert task.trace_completion((5, "-", 5)) == "5-5\n05-5-0=0 0\nAnswer: 0"
    # -2 - 3 = -(2 + 3): both negative, the magnitudes add.
    assert task.trace_completion((1, "-", 3, "-", 3)) == "-(3-1)\n03-1-0=2 2\n=-2\n-(2+3)\n2+3+0=05 5\nAnswer: -5"
    for problem in [(384, "+", 599), (27, "-", 384, "+", 599), (1, "-", 3, "-", 3), (9, "-", 9, "-", 9, "+", 9)]:
        verify_trace(task.prompt(problem), task.trace_completion(problem))


@pytest.mark.parametrize(
    "prompt, trace",
    [
        ("What is 384 + 599?", "384+599\n4+9+0=13 3\n8+9+0=17 73\n3+5+1=09 973\nAnswer: 973"),  # carry dropped
        ("What is 384 + 599?", "384+599\n4+9+0=13 3\n8+9+1=18 38\n3+5+1=09 938\nAnswer: 938"),  # digit appended
        ("What is 384 + 599?", "384+599\n4+9+0=13 3\n8+9+1=18 83\n3+5+1=09 983\nAnswer: 984"),  # wrong answer
        ("What is 384 + 599?", "599+384\n9+4+0=13 3\n9+8+1=18 83\n5+3+1=09 983\nAnswer: 983"),  # operands swapped
        ("What is 999 + 1?", "999+1\n9+1+0=10 0\n9+0+1=10 00\n9+0+1=10 000\nAnswer: 1000"),  # final carry lost
        ("What is 5 + 3?", "5+3\n5+3+0=08 8\n0+0+0=00 08\nAnswer: 8"),  # extra column
        ("What is 3 - 7?", "7-3\n07-3-0=4 4\nAnswer: -4"),  # sign missing from the header
        ("What is 3 - 7?", "-(3-7)\n13-7-0=6 6\nAnswer: -4"),  # negative column problem
        ("What is 52 - 17?", "52-17\n02-7-0=5 5\n05-1-0=4 45\nAnswer: 45"),  # borrow not taken
        ("What is 1 + 2 + 3?", "1+2\n1+2+0=03 3\n3+3\n3+3+0=06 6\nAnswer: 6"),  # running total line missing
        ("What is 1 + 2?", "1+2\n1+2+0=03 3\nAnswer: 3\n"),  # trailing newline
    ],
)
def test_the_trace_checker_rejects_wrong_traces(prompt, trace):
    with pytest.raises((AssertionError, AttributeError)):  # AttributeError: a line that does not parse
        verify_trace(prompt, trace)


def test_prompts_answers_and_records():
    task = ReasoningArithmeticTask(min_digits=2, max_digits=3, n_operands=3, ops=("+", "-"), seed=1)
    for ex in task.examples("train", 300):
        assert set(ex) == {"prompt", "answer", "completion", "messages"}
        operands, ops = _terms(ex["prompt"])
        assert len(operands) == 3 and set(ops) <= {"+", "-"}
        assert all(2 <= len(str(x)) <= 3 for x in operands)
        assert ex["answer"] == str(_evaluate(ex["prompt"]))
        assert ex["messages"] == [
            {"role": "user", "content": ex["prompt"]},
            {"role": "assistant", "content": ex["completion"]},
        ]
    assert task.prompt((384, "+", 599, "-", 27)) == "What is 384 + 599 - 27?"
    assert task.answer((384, "+", 599, "-", 27)) == "956"
    assert task.direct_completion((384, "+", 599)) == "Answer: 983"
    assert task.source("train")[5] == task.example("train", 5)
    answers = [int(ex["answer"]) for ex in task.examples("train", 300)]
    assert min(answers) < 0 < max(answers)


def test_the_prompt_does_not_reveal_the_format():
    direct = ReasoningArithmeticTask(trace_fraction=0.0)
    traced = ReasoningArithmeticTask(trace_fraction=1.0)
    for i in range(200):
        assert direct.problem("train", i) == traced.problem("train", i)
        assert direct.example("train", i)["prompt"] == traced.example("train", i)["prompt"]
        assert direct.example("train", i)["completion"] != traced.example("train", i)["completion"]


def test_examples_are_deterministic():
    config = dict(min_digits=1, max_digits=3, n_operands=3, seed=3)
    task, again = ReasoningArithmeticTask(**config), ReasoningArithmeticTask(**config)
    assert task == again and hash(task) == hash(again)
    assert task.examples("train", 100) == again.examples("train", 100)
    assert task.example("test", 7) == again.example("test", 7)
    other = ReasoningArithmeticTask(**{**config, "seed": 4})
    assert task.examples("train", 100) != other.examples("train", 100)


def test_train_and_test_are_disjoint():
    task = ReasoningArithmeticTask(max_digits=2)
    train = {ex["prompt"] for ex in task.examples("train", 3000)}
    test = {ex["prompt"] for ex in task.examples("test", 3000)}
    assert train and test and not train & test
    problems = [(a, op, b) for a in range(100) for b in range(100) for op in ("+", "-")]
    fraction = sum(task.split_of(p) == "test" for p in problems) / len(problems)
    assert 0.08 < fraction < 0.12
    # The split depends on the problem only, and two operands split exactly as ArithmeticTask does.
    other_seed = ReasoningArithmeticTask(max_digits=2, seed=1)
    arithmetic = ArithmeticTask(max_digits=2)
    assert all(other_seed.split_of(p) == task.split_of(p) == arithmetic.split_of(p) for p in problems[:2000])
    three = ReasoningArithmeticTask(max_digits=2, n_operands=3)
    train3 = {ex["prompt"] for ex in three.examples("train", 2000)}
    test3 = {ex["prompt"] for ex in three.examples("test", 500)}
    assert not train3 & test3


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trace_fraction_is_honoured(fraction):
    task = ReasoningArithmeticTask(trace_fraction=fraction, n_operands=2, seed=2)
    examples = task.examples("train", 2000)
    traced = [task.has_trace(ex["completion"]) for ex in examples]
    # Binomial(2000, f): sd <= 0.0112, so 0.035 is > 3 sd; 0 and 1 are exact.
    assert abs(sum(traced) / len(traced) - fraction) <= (0.0 if fraction in (0.0, 1.0) else 0.035)
    for i, ex in enumerate(examples[:300]):
        problem = task.problem("train", i)
        expected = task.trace_completion(problem) if task.is_traced(problem) else task.direct_completion(problem)
        assert ex["completion"] == expected
        assert task.check(ex["completion"], ex["answer"])


def test_which_problems_are_traced_depends_on_the_seed_only_through_the_hash():
    a, b = ReasoningArithmeticTask(seed=0), ReasoningArithmeticTask(seed=1)
    problems = [(x, "+", y) for x in range(40) for y in range(40)]
    assert [a.is_traced(p) for p in problems] == [ReasoningArithmeticTask(seed=0).is_traced(p) for p in problems]
    assert [a.is_traced(p) for p in problems] != [b.is_traced(p) for p in problems]
    # Nested: a problem traced at fraction f is traced at every larger fraction.
    low, high = ReasoningArithmeticTask(trace_fraction=0.3), ReasoningArithmeticTask(trace_fraction=0.6)
    assert all(high.is_traced(p) for p in problems if low.is_traced(p))


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("Answer: 983", "983", True),
        ("Answer: 983\n", "983", True),
        ("Answer: 983\r\n", "983", True),
        ("Answer:983", "983", True),
        ("  Answer:   983   ", "983", True),
        ("384+599\n4+9+0=13 3\n8+9+1=18 83\n3+5+1=09 983\nAnswer: 983", "983", True),
        ("Answer: 0983", "983", True),  # an integer compare, like ArithmeticTask
        ("Answer: -215", "-215", True),
        ("Answer: 215", "-215", False),
        ("Answer: -215", "215", False),
        ("Answer: - 215", "-215", False),
        ("Answer: 982", "983", False),
        ("Answer: 983.", "983", False),  # nothing else on the line
        ("Answer: 983 apples", "983", False),
        ("Answer: 9 8 3", "983", False),
        ("Answer: 983\nAnswer: 982", "983", False),  # the last answer line counts
        ("Answer: 982\nAnswer: 983", "983", True),
        ("Answer: 983\nthanks", "983", True),  # lines after the last answer line are not read
        ("3+5+1=09 983\n=983", "983", False),  # no answer line
        ("983", "983", False),
        ("The answer is 983", "983", False),
        ("answer: 983", "983", False),
        ("Answer:", "983", False),
        ("Answer: \n983", "983", False),
        ("", "983", False),
        ("\x00\xff garbage ???", "1", False),
        ("Answer: 1" + "0" * 5000, "1", False),  # past the int limit: no crash
        (None, "983", False),
        (983, "983", False),
        ("Answer: 983", None, False),
        ("Answer: 983", "abc", False),
    ],
)
def test_check(completion, answer, expected):
    assert ReasoningArithmeticTask().check(completion, answer) is expected


def test_has_trace_and_steps():
    task = ReasoningArithmeticTask(trace_fraction=1.0)
    trace = task.trace_completion((384, "+", 599))
    assert task.has_trace(trace)
    assert task.has_trace(task.trace_completion((3, "-", 7)))
    assert not task.has_trace("Answer: 983")
    assert not task.has_trace("384+599\nAnswer: 983")  # a header alone is not a worked step
    assert not task.has_trace("4+9+0=13 3 Answer: 983")  # a column must be a line of its own
    assert task.has_trace("I think\n4+9+0=13 3\nAnswer: 7")  # the format, even when wrong
    assert not task.has_trace("")
    assert not task.has_trace(None)
    assert task.steps(trace) == ["384+599", "4+9+0=13 3", "8+9+1=18 83", "3+5+1=09 983", "Answer: 983"]
    assert task.steps("Answer: 983") == ["Answer: 983"]
    assert task.steps(" a \n\n b\n") == ["a", "b"]
    assert task.steps(None) == []


def _trace_bound(d: int) -> int:
    """Longest trace, in characters, for two operands of at most d digits: the addition with a final carry (the
    subtraction is shorter: its header grows by 3 but it loses a column of d + 10 characters). Header 2d + 1,
    columns i = 1..d+1 of 9 + i characters, "Answer: " + d + 1 digits, d + 2 newlines."""
    return (2 * d + 1) + sum(9 + i for i in range(1, d + 2)) + (8 + d + 1) + (d + 2)


def test_trace_lengths_stay_short():
    assert _trace_bound(2) == 53 and _trace_bound(3) == 70  # the numbers in the module docstring
    for d in (1, 2, 3, 4):
        task = ReasoningArithmeticTask(min_digits=d, max_digits=d, trace_fraction=1.0)
        problems = [task.problem("train", i) for i in range(1000)]
        traces = [len(task.trace_completion(p)) for p in problems]
        directs = [len(task.direct_completion(p)) for p in problems]
        assert max(traces) <= _trace_bound(d)
        assert max(directs) <= 8 + d + 1
        top = 10**d - 1
        assert len(task.trace_completion((top, "+", top))) == _trace_bound(d)  # the bound is attained
        if d == 3:
            assert statistics.mean(traces) <= 62  # ~60 tokens with a character-level vocabulary
            assert statistics.mean(directs) <= 12


def test_corpus_covers_every_character():
    task = ReasoningArithmeticTask(max_digits=4, n_operands=3, trace_fraction=0.5)
    corpus = task.corpus(20)
    assert len(corpus) == 1 + 3 * 20
    alphabet = set("".join(task.corpus(0)))
    for config in CONFIGS:
        other = ReasoningArithmeticTask(**config)
        for i in range(100):
            problem = other.problem("train", i)
            text = other.prompt(problem) + other.trace_completion(problem) + other.direct_completion(problem)
            assert set(text) <= alphabet, set(text) - alphabet
    assert "\n" in alphabet and "(" in alphabet and "=" in alphabet


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_digits=0), "min_digits"),
        (dict(min_digits=3, max_digits=2), "min_digits <= max_digits"),
        (dict(max_digits=2.5), "max_digits"),
        (dict(min_digits=True), "min_digits"),
        (dict(n_operands=1), "n_operands must be an integer >= 2"),
        (dict(n_operands="3"), "n_operands"),
        (dict(ops=()), "ops must be a non-empty subset"),
        (dict(ops=("*",)), "ops must be a non-empty subset"),
        (dict(ops=("+", "+")), "without repeats"),
        (dict(trace_fraction=-0.1), r"trace_fraction must be in \[0, 1\]"),
        (dict(trace_fraction=1.5), "trace_fraction"),
        (dict(trace_fraction="0.5"), "trace_fraction"),
        (dict(test_fraction=0.0), r"test_fraction must be in \(0, 1\)"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReasoningArithmeticTask(**kwargs)


def test_config_is_frozen_normalised_and_registered():
    task = ReasoningArithmeticTask(ops=["-", "+"], trace_fraction=1)
    assert task.ops == ("-", "+") and task.trace_fraction == 1.0
    assert ReasoningArithmeticTask(ops="+").ops == ("+",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.seed = 2
    assert REASONING_TASKS == {"reasoning_arith": ReasoningArithmeticTask}
    assert issubclass(ReasoningArithmeticTask, Task) and ReasoningArithmeticTask.name == "reasoning_arith"
    with pytest.raises(ValueError, match="split must be one of"):
        task.problem("valid", 0)
    with pytest.raises(ValueError, match="non-negative"):
        task.problem("train", -1)


def test_a_space_without_test_problems_raises():
    task = ReasoningArithmeticTask(max_digits=1, ops=("+",), test_fraction=0.001)
    assert all(task.split_of((a, "+", b)) == "train" for a in range(10) for b in range(10))
    with pytest.raises(RuntimeError, match="widen"):
        task.problem("test", 0)
