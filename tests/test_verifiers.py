r"""Tests for jaxpost.rollout.verifiers: answer extraction, exact numeric equivalence and never-raising rewards.

Every expected value is read off the input string by hand (e.g. `\boxed{1} then \boxed{2}`: the last box wins, 2;
"1,000" groups three digits after the comma, so it is one thousand; "0.5" = 1/2 exactly as a Fraction).
"""

import re
import time
from fractions import Fraction

import pytest

from jaxpost.rollout.rewards import RewardSet
from jaxpost.rollout.verifiers import (
    ANSWER_LINE_LAST,
    EXTRACTION_MODES,
    THINK_ANSWER_LINE,
    THINK_ANSWER_TAGS,
    answer_number,
    answer_reward,
    answers_equal,
    exact_match_reward,
    extract_answer,
    extract_answer_line,
    extract_answer_tag,
    extract_boxed,
    extract_last_number,
    format_reward,
    make_format_reward,
    math_answer_reward,
    normalize_text,
    parse_number,
)

# ---------------------------------------------------------------------------------------------------------------------
# parse_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", Fraction(42)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),  # unicode minus
        ("+7", Fraction(7)),
        ("1,000", Fraction(1000)),
        ("1,234,567", Fraction(1234567)),
        ("1{,}234", Fraction(1234)),  # LaTeX thousands separator
        ("1\\,234", Fraction(1234)),  # LaTeX thin space
        ("0.5", Fraction(1, 2)),
        (".5", Fraction(1, 2)),
        ("0.50", Fraction(1, 2)),
        ("1/2", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("6 / 8", Fraction(3, 4)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\tfrac{3}{4}", Fraction(3, 4)),
        ("\\frac34", Fraction(3, 4)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("3.", Fraction(3)),  # trailing period
        ("$42$", Fraction(42)),
        ("$$42$$", Fraction(42)),
        ("\\(42\\)", Fraction(42)),
        ("\\$42", Fraction(42)),  # currency
        ("  $-1,000.25$. ", Fraction(-4001, 4)),
        ("50%", Fraction(50)),  # percent ignored by default
        ("0.1", Fraction(1, 10)),  # exact: no float rounding
        ("1,23", None),  # not a valid thousands grouping
        ("1,2345", None),
        ("3/0", None),  # zero denominator
        ("7 apples", None),
        ("--3", None),
        ("+-3", None),
        ("", None),
        ("   ", None),
        ("abc", None),
        (None, None),
        (42, None),  # not a string
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_parse_number_is_exact_not_float():
    assert parse_number("0.1") + parse_number("0.2") == parse_number("0.3")  # 0.1 + 0.2 != 0.3 in floats
    assert parse_number("0.3333333333333333") != parse_number("1/3")
    assert parse_number("123456789012345678901234567890") == 123456789012345678901234567890


def test_percent_option():
    assert parse_number("50%", percent=True) == Fraction(1, 2)
    assert parse_number("50\\%", percent=True) == Fraction(1, 2)
    assert parse_number("12.5%", percent=True) == Fraction(1, 8)
    assert parse_number("50", percent=True) == 50  # no sign, no division
    assert answers_equal("50%", "50")
    assert not answers_equal("50%", "0.5")
    assert answers_equal("50%", "0.5", percent=True)
    assert not answers_equal("50%", "50", percent=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 apples", Fraction(7)),
        ("x = 5", Fraction(5)),
        ("2 + 3 = 5", Fraction(5)),  # the last "=" side
        ("about -4 degrees", Fraction(-4)),
        ("1,000 people", Fraction(1000)),
        ("\\frac{1}{2} cup", Fraction(1, 2)),
        ("3/4 of it", Fraction(3, 4)),
        ("no number", None),
        (None, None),
    ],
)
def test_answer_number_reads_a_span(text, expected):
    assert answer_number(text) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} at first, finally \\boxed{2}", "2"),  # several boxes: the last wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\boxed{\\boxed{5}}", "5"),  # a box that only holds a box is unwrapped
        ("\\boxed{ 5 }", "5"),
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{3} then \\boxed{4", None),  # the last box never closes
        ("\\boxed{", None),
        ("\\boxed{{}", None),
        ("}{\\boxed}", None),
        ("no box", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer> 12 </answer>", "12"),
        ("<answer>1</answer> <answer>2</answer>", "2"),
        ("<ANSWER>3</Answer>", "3"),
        ("<answer>4", None),
        ("</answer><answer>", None),
        (None, None),
    ],
)
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 7 apples", "7 apples"),
        ("work\nAnswer: 3\nmore work\nAnswer: 4.", "4"),  # last occurrence, trailing period
        ("The answer is 522.", "522"),
        ("the final answer is: -3", "-3"),
        ("**Answer:** 7", "7"),
        ("Final Answer: $\\frac{1}{2}$", "$\\frac{1}{2}$"),
        ("Answer:\n\n  42\n", "42"),  # the next non-empty line
        ("ANSWER: x", "x"),
        ("answers: 5", None),  # not the word "answer"
        ("Answer:", None),
        ("nothing here", None),
        (None, None),
    ],
)
def test_extract_answer_line(text, expected):
    assert extract_answer_line(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1 then 2 then 3", "3"),
        ("we get 5-3", "3"),  # binary minus, not a sign
        ("x = -3", "-3"),
        ("x = \u22123", "-3"),
        ("(-3)", "-3"),
        ("1,000 people", "1,000"),
        ("is 3/4.", "3/4"),
        ("so \\frac{1}{2}", "\\frac{1}{2}"),
        ("about 3.5.", "3.5"),
        ("up 50%", "50%"),
        ("v2", "2"),
        ("no digits", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_modes():
    text = "<think>5</think> Answer: 6 then 7 and \\boxed{8} ... 9"
    assert extract_answer(text, mode="boxed") == "8"
    assert extract_answer(text, mode="answer_line") == "6 then 7 and \\boxed{8} ... 9"
    assert extract_answer(text, mode="last_number") == "9"
    assert extract_answer(text, mode="auto") == "8"  # boxed first
    assert extract_answer("<answer>4</answer> Answer: 5", mode="auto") == "4"  # then the tag
    assert extract_answer("Answer: 6, not 7", mode="auto") == "6, not 7"  # then the line
    assert extract_answer("it is 7 or so", mode="auto") == "7"  # then the last number
    assert extract_answer("\\boxed{3} \\boxed{", mode="auto") == "3"  # unclosed box: falls through to the number
    assert extract_answer("nothing", mode="auto") is None
    assert extract_answer(None) is None
    assert set(EXTRACTION_MODES) == {"auto", "boxed", "answer_tag", "answer_line", "last_number"}
    with pytest.raises(ValueError, match="mode must be one of"):
        extract_answer("1", mode="first_number")


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("1,000", "1000", True),
        ("1000", "1,000", True),
        ("1,000", "100", False),
        ("-3", "\u22123", True),
        ("3", "-3", False),
        ("0.5", "1/2", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "0.5", True),
        ("2/4", "0.5", True),
        ("0.5", "0.51", False),
        ("3.", "3", True),
        ("$42$", "42", True),
        ("+7", "7", True),
        ("7 apples", "7", True),
        ("7.0", "7", True),
        ("7", 7, True),  # gold given as an int
        ("7", Fraction(7), True),
        ("0.75", "\\boxed{\\frac{3}{4}}", True),  # boxed gold is unboxed
        ("seven", "7", False),
        ("", "7", False),
        (None, "7", False),
        ("7", None, False),
        ("7", True, False),  # a bool is not a gold answer
        # Non-numeric gold: normalised string comparison.
        ("  Paris ", "Paris", True),
        ("New   York", "New York", True),
        ("paris", "Paris", False),
        ("$x+1$", "x+1", True),
        ("", "", False),
    ],
)
def test_answers_equal(pred, gold, expected):
    assert answers_equal(pred, gold) is expected


def test_case_fold_and_normalize_text():
    assert answers_equal("PARIS", "paris", case_fold=True)
    assert not answers_equal("PARIS", "paris")
    assert normalize_text("  a \n\t b.  ") == "a b"
    assert normalize_text("ẞ Straße", case_fold=True) == "ss strasse"
    assert normalize_text(None) == ""


# ---------------------------------------------------------------------------------------------------------------------
# Rewards


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The sum is \\boxed{1,000}.", "1000", 1.0),
        ("\\boxed{\\boxed{12}}", "12", 1.0),  # nested boxes
        ("First \\boxed{3}, no wait, \\boxed{4}.", "4", 1.0),  # several boxes: last wins
        ("First \\boxed{3}, no wait, \\boxed{4}.", "3", 0.0),
        ("So x = \u22123.\nAnswer: -3", "-3", 1.0),
        ("Answer: 7 apples", "7", 1.0),
        ("Answer: 1/2", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is 3.", "3", 1.0),
        ("The answer is $42$", "42", 1.0),
        ("<think>6 * 7</think><answer>42</answer>", "42", 1.0),
        ("I think it is 42", "42", 1.0),  # last-number fallback
        ("I think it is 42, not 41", "42", 0.0),  # ... reads 41
        ("no answer at all", "42", 0.0),
        ("\\boxed{42", "42", 1.0),  # unbalanced box: falls back to the last number, 42
        ("\\boxed{4} \\boxed{42", "4", 0.0),  # the finished box is superseded; the last number is 42
        ("", "42", 0.0),
        ("None", "42", 0.0),
        ("42", None, 0.0),  # no gold answer
        ("42", "", 0.0),
    ],
)
def test_math_answer_reward(completion, answer, expected):
    assert math_answer_reward("What is 6 * 7?", completion, answer=answer) == expected


def test_answer_reward_modes():
    completion = "Answer: 5 \\boxed{6} and finally 7"
    assert answer_reward("answer_line")("", completion, answer="5") == 1.0  # "5 \boxed{6} and finally 7" starts at 5
    assert answer_reward("boxed")("", completion, answer="6") == 1.0
    assert answer_reward("last_number")("", completion, answer="7") == 1.0
    assert answer_reward("auto")("", completion, answer="6") == 1.0
    assert answer_reward("boxed")("", "Answer: 6", answer="6") == 0.0  # no box: nothing extracted
    assert answer_reward("answer_line", case_fold=True)("", "Answer: PARIS", answer="Paris") == 1.0
    assert answer_reward("answer_line")("", "Answer: PARIS", answer="Paris") == 0.0
    assert answer_reward(percent=True)("", "\\boxed{25%}", answer="0.25") == 1.0
    assert answer_reward("boxed").__name__ == "answer_reward_boxed"
    with pytest.raises(ValueError, match="mode must be one of"):
        answer_reward("boxes")


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42", "42", 1.0),
        ("  42 \n", "42", 1.0),
        ("42.", "42", 1.0),
        ("$42$", "42", 1.0),
        ("042", "42", 0.0),  # strings, not numbers
        ("The answer is 42", "42", 0.0),
        ("Paris", "paris", 0.0),
        ("New  York", "New York", 1.0),
        ("", "", 0.0),
        ("42", None, 0.0),
        ("42", 42, 1.0),
    ],
)
def test_exact_match_reward(completion, answer, expected):
    assert exact_match_reward("", completion, answer=answer) == expected


@pytest.mark.parametrize(
    "pattern, completion, expected",
    [
        (THINK_ANSWER_TAGS, "<think>6*7=42</think><answer>42</answer>", 1.0),
        (THINK_ANSWER_TAGS, "<think>\nlong\nthought\n</think>\n<answer>\n42\n</answer>\n", 1.0),
        (THINK_ANSWER_TAGS, "<think></think><answer>42</answer>", 1.0),  # empty thought allowed
        (THINK_ANSWER_TAGS, "<think>a</think><answer> </answer>", 0.0),  # empty answer
        (THINK_ANSWER_TAGS, "<answer>42</answer>", 0.0),  # no think block
        (THINK_ANSWER_TAGS, "<think>a</think><answer>42</answer> trailing", 0.0),
        (THINK_ANSWER_TAGS, "<think>a<think>b</think><answer>42</answer>", 0.0),  # nested think
        (THINK_ANSWER_TAGS, "<think>a</think><answer>4</answer><answer>2</answer>", 0.0),  # two answers
        (THINK_ANSWER_LINE, "<think>7 + 5 = 12</think>\nAnswer: 12", 1.0),
        (THINK_ANSWER_LINE, "<think>x</think>\nso\nAnswer: 12\n", 1.0),
        (THINK_ANSWER_LINE, "<think>x</think>\nAnswer: 12\nmore", 0.0),  # answer line not last
        (THINK_ANSWER_LINE, "<think>x</think>\nAnswer:", 0.0),  # empty answer
        (THINK_ANSWER_LINE, "Answer: 12", 0.0),
        (ANSWER_LINE_LAST, "4+9+0=13 3\nAnswer: 13", 1.0),
        (ANSWER_LINE_LAST, "Answer: 13", 1.0),
        (ANSWER_LINE_LAST, "Answer: 13\nbye", 0.0),
        (ANSWER_LINE_LAST, "answer 13", 0.0),
        (ANSWER_LINE_LAST, "", 0.0),
    ],
)
def test_format_rewards(pattern, completion, expected):
    assert make_format_reward(pattern)("prompt", completion) == expected


def test_format_reward_default_search_and_compiled_patterns():
    assert format_reward("", "<think>a</think><answer>1</answer>") == 1.0
    assert format_reward("", "Answer: 1") == 0.0
    anywhere = make_format_reward(r"Answer: \d+", fullmatch=False)
    assert anywhere("", "blah Answer: 12 blah") == 1.0
    assert make_format_reward(r"Answer: \d+")("", "blah Answer: 12 blah") == 0.0
    compiled = make_format_reward(re.compile(r"(?i)answer: \d+"))
    assert compiled("", "ANSWER: 3") == 1.0
    with pytest.raises(re.error):
        make_format_reward("(unclosed")


GARBAGE = [
    None,
    "",
    "   ",
    "None",
    b"42",
    42,
    ["42"],
    "\x00\xff\ud800 garbage",
    "\\boxed{",
    "\\boxed{" * 1000,
    "}" * 1000 + "{" * 1000,
    "\\frac{",
    "$",
    "$$$",
    "Answer:",
    "<answer>",
    "</answer><answer>",
    "<think>",
    "1/0",
    "\\frac{1}{0}",
    "9" * 5000,
]

ALL_REWARDS = [
    math_answer_reward,
    exact_match_reward,
    format_reward,
    make_format_reward(THINK_ANSWER_LINE),
    make_format_reward(ANSWER_LINE_LAST),
    *(answer_reward(mode) for mode in EXTRACTION_MODES),
]


@pytest.mark.parametrize("completion", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("answer", ["42", None, "", 42, "\\boxed{", "x"])
def test_rewards_never_raise(completion, answer):
    for fn in ALL_REWARDS:
        value = fn("prompt", completion, answer=answer, other_field=[1, 2])
        assert value in (0.0, 1.0)
    for fn in ALL_REWARDS:  # no answer field at all
        assert fn("prompt", completion) in (0.0, 1.0)


def test_garbage_scores_zero_where_hand_checked():
    assert math_answer_reward("", "1/0", answer="1") == 0.0  # 1/0 has no value; last number would be 1/0
    assert math_answer_reward("", "\\frac{1}{0}", answer="0") == 0.0
    assert math_answer_reward("", "9" * 5000, answer="9") == 0.0
    # Past Python's 4300-digit int limit a number has no value: the gold answer is then compared as a string.
    assert parse_number("9" * 5000) is None
    assert math_answer_reward("", "9" * 5000, answer="9" * 5000) == 1.0


def test_very_long_inputs_are_fast_and_read_correctly():
    filler = "lorem ipsum 12 + 7 = 19, " * 40_000  # ~1 MB
    cases = {
        filler + "Answer: 31": ("31", 1.0),
        filler + "\\boxed{" + "{" * 100_000: ("19", 1.0),  # unclosed box: the last number, 19
        "\\boxed{" * 50_000 + "5" + "}" * 50_000: ("5", 1.0),  # deep nesting
        "<answer>" * 100_000: ("1", 0.0),
        "Answer: " * 100_000: ("1", 0.0),
        "1,234" * 100_000: ("1", 0.0),
    }
    for completion, (answer, expected) in cases.items():
        start = time.perf_counter()
        for fn in ALL_REWARDS:
            fn("", completion, answer=answer)
        assert math_answer_reward("", completion, answer=answer) == expected
        assert time.perf_counter() - start < 10.0  # linear-time scans (a quadratic regex would take minutes)


def test_reward_set_calls_the_verifiers():
    rewards = RewardSet(
        {"correct": math_answer_reward, "format": make_format_reward(ANSWER_LINE_LAST), "exact": exact_match_reward},
        weights={"format": 0.5},
        timeout_s=None,
    )
    result = rewards(
        ["What is 2 + 2?", "What is 1/2?", "q"],
        ["2 + 2 = 4\nAnswer: 4", "Answer: 0.5", None],
        [{"answer": "4"}, {"answer": "\\frac{1}{2}", "reference": "x"}, {}],
    )
    assert result.per_function["correct"].tolist() == [1.0, 1.0, 0.0]
    assert result.per_function["format"].tolist() == [1.0, 1.0, 0.0]
    assert result.per_function["exact"].tolist() == [0.0, 0.0, 0.0]
    assert result.total.tolist() == [1.5, 1.5, 0.0]
    assert sum(result.failed.values()) == 0
