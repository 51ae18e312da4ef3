"""Tests for jaxpost.data.tasks: deterministic, split-disjoint arithmetic problems and a robust checker."""

import re

import grain
import pytest

from jaxpost.data import TASKS, ArithmeticTask, Task, make_task
from jaxpost.tokenizers import train_tokenizer

_PROMPT_RE = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


def _evaluate(prompt: str) -> int:
    a, op, b = _PROMPT_RE.match(prompt).groups()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_examples_are_deterministic_and_well_formed():
    task = ArithmeticTask(ops=("+", "-", "*"), seed=3)
    again = ArithmeticTask(ops=("+", "-", "*"), seed=3)
    assert task.examples("train", 50) == again.examples("train", 50)
    assert task.example("test", 7) == again.example("test", 7)
    assert task.examples("train", 50) != ArithmeticTask(ops=("+", "-", "*"), seed=4).examples("train", 50)
    for ex in task.examples("train", 200) + task.examples("test", 50):
        assert set(ex) == {"prompt", "answer", "completion", "messages"}
        assert ex["answer"] == ex["completion"] == str(_evaluate(ex["prompt"]))
        assert ex["messages"] == [
            {"role": "user", "content": ex["prompt"]},
            {"role": "assistant", "content": ex["completion"]},
        ]
        a, _, b = _PROMPT_RE.match(ex["prompt"]).groups()
        assert all(1 <= len(x) <= 3 for x in (a, b))
        assert all(x == "0" or not x.startswith("0") for x in (a, b))


def test_example_matches_the_docstring_format():
    problem = (37, "+", 485)
    task = ArithmeticTask()
    assert task.prompt(problem) == "What is 37 + 485?"
    assert task.answer(problem) == "522"
    assert task.answer((3, "-", 10)) == "-7"


def test_negative_results_occur_for_subtraction():
    answers = [int(ex["answer"]) for ex in ArithmeticTask(ops=("-",)).examples("train", 200)]
    assert min(answers) < 0 < max(answers)


def test_train_and_test_are_disjoint():
    task = ArithmeticTask(max_digits=2)
    train = {ex["prompt"] for ex in task.examples("train", 3000)}
    test = {ex["prompt"] for ex in task.examples("test", 3000)}
    assert train and test and not train & test
    # ~10% of all problems are test problems; the split does not depend on the seed.
    problems = [(a, op, b) for a in range(100) for b in range(100) for op in ("+", "-")]
    fraction = sum(task.split_of(p) == "test" for p in problems) / len(problems)
    assert 0.08 < fraction < 0.12
    other_seed = ArithmeticTask(max_digits=2, seed=1)
    assert all(other_seed.split_of(p) == task.split_of(p) for p in problems[:500])


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("522", "522", True),
        ("  522\n", "522", True),
        ("522 is the answer", "522", True),
        ("The answer is 522.", "522", True),
        ("523", "522", False),
        ("5220", "522", False),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("-7", "7", False),
        ("x = -7, maybe 3", "-7", True),
        ("", "522", False),
        ("no number here", "522", False),
        ("\x00\xff garbage ???", "1", False),
        (None, "1", False),
        ("12", "not a number", False),
    ],
)
def test_checker(completion, answer, expected):
    assert ArithmeticTask().check(completion, answer) is expected


def test_corpus_covers_every_character_of_examples():
    task = ArithmeticTask(ops=("+", "-", "*"), max_digits=4)
    tok = train_tokenizer(task.corpus(300), vocab_size=128)
    for ex in task.examples("train", 300, start=10_000) + task.examples("test", 300):
        ids, _ = tok.encode_chat(ex["messages"])
        assert tok.unk_id not in ids, ex
        assert tok.decode(tok.encode(ex["prompt"])) == ex["prompt"]


def test_source_is_a_grain_random_access_source():
    task = ArithmeticTask()
    source = task.source("test", length=100)
    assert len(source) == 100
    assert source[5] == task.example("test", 5)
    assert len(task.source("train")) == 2**31 - 1
    assert list(grain.MapDataset.source(source)[:3]) == task.examples("test", 3)
    with pytest.raises(IndexError):
        source[100]


def test_registry_and_validation():
    assert TASKS["arithmetic"] is ArithmeticTask
    task = make_task("arithmetic", max_digits=2, ops=("*",))
    assert isinstance(task, Task) and task.ops == ("*",)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="ops must be"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticTask(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="split must be one of"):
        ArithmeticTask().example("validation", 0)


def test_task_from_config_passes_each_task_its_parameters():
    from jaxpost.config import TaskConfig
    from jaxpost.data import ReasoningArithmeticTask, task_from_config

    assert isinstance(task_from_config(TaskConfig()), ArithmeticTask)
    task = task_from_config(TaskConfig(name="reasoning_arith", max_digits=3, n_operands=3, trace_fraction=0.25))
    assert isinstance(task, ReasoningArithmeticTask)
    assert (task.max_digits, task.n_operands, task.trace_fraction) == (3, 3, 0.25)
    with pytest.raises(ValueError, match="takes no parameter 'trace_fraction'"):
        task_from_config(TaskConfig(trace_fraction=0.5))
    with pytest.raises(ValueError, match="unknown task"):
        task_from_config(TaskConfig(name="chess"))
    with pytest.raises(ValueError, match="trace_fraction"):
        TaskConfig(trace_fraction=1.5)
