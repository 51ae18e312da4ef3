r"""Answer verifiers for RL rewards: extract a completion's final answer and compare it with the gold answer exactly.

The conventions are those GRPO users bring from TRL (a reward is a plain function of the prompt, the completion and
the dataset's columns), math-verify (a `\boxed{}` answer first, equality of values rather than of strings) and the
DeepSeek-R1 / open-r1 format rewards (`<think>...</think><answer>...</answer>`). TRL calls its reward functions on a
batch; `RewardSet` (jaxpost.rollout.rewards) calls ours on one sample at a time, so every reward here is

    fn(prompt: str, completion: str, *, answer, **example) -> float      # answer: the example's gold `answer` field

and returns 0.0 instead of raising on any input (garbage, None, empty, huge, unbalanced braces).

Extraction (each returns the answer's text, or None when there is none):

    extract_boxed(text)         the content of the last top-level `\boxed{...}` / `\fbox{...}` (nested braces matched;
                                a box whose only content is another box is unwrapped; an unclosed last box gives None:
                                an earlier box was superseded and the final one never finished)
    extract_answer_tag(text)    the content of the last `<answer>...</answer>` (R1 format)
    extract_answer_line(text)   the rest of the line after the last "Answer:" / "answer is" (case-insensitive), or
                                the next non-empty line when that rest is empty
    extract_last_number(text)   the last number of the text (integers, decimals, "1,234", "3/4", `\frac{3}{4}`, signs)
    extract_answer(text, mode="auto")   one of the above; "auto" takes the first that finds something in the order
                                boxed, answer tag, answer line, last number

Equivalence (`answers_equal(pred, gold)`): when the gold answer is a number, both sides are parsed to an exact
`fractions.Fraction` (never a float) and compared; the prediction may also be a span that *contains* the number
("7 apples", "x = 5": its last `=` side, then its first number). Otherwise both are compared as normalised strings.
Numbers accept a sign (`-`, unicode minus `\u2212` and en dash, a leading `+`), thousands separators in groups of three
("1,234" == 1234, LaTeX "1{,}234" and "1\,234" too), decimals (".5", "0.50"), fractions "3/4", `\frac{3}{4}`,
`\dfrac`, `\tfrac`, `\frac34`, surrounding `$...$`, `\(...\)`, `\[...\]`, a leading currency `$` and a trailing
period. A percent sign is ignored by default ("50%" == 50); with `percent=True` it divides by 100 ("50%" == 1/2, no
longer 50). Examples: "0.5" == "1/2" == `\frac{1}{2}`; "1,000" == "1000"; "-3" == "\u22123"; "3." == "3"; "$42$" == 42.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

__all__ = [
    "ANSWER_LINE_LAST",
    "EXTRACTION_MODES",
    "THINK_ANSWER_LINE",
    "THINK_ANSWER_TAGS",
    "answer_number",
    "answer_reward",
    "answers_equal",
    "exact_match_reward",
    "extract_answer",
    "extract_answer_line",
    "extract_answer_tag",
    "extract_boxed",
    "extract_last_number",
    "format_reward",
    "make_format_reward",
    "math_answer_reward",
    "normalize_text",
    "parse_number",
]

RewardFn = Callable[..., float]

#: Extraction modes of `extract_answer`.
EXTRACTION_MODES: tuple[str, ...] = ("auto", "boxed", "answer_tag", "answer_line", "last_number")

# ----------------------------------------------------------------------------------------------------------------------
# Numbers

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"[-+]?(?:{_UNSIGNED})"
_NUMBER_BODY = (
    r"(?:\\[dt]?frac\s*(?:"
    rf"\{{\s*(?P<fn>{_SIGNED})\s*\}}\s*\{{\s*(?P<fd>{_SIGNED})\s*\}}"  # \frac{3}{4}, \dfrac{-3}{4}
    r"|(?P<fn1>\d)(?P<fd1>\d))"  # \frac34
    rf"|(?P<num>{_UNSIGNED})(?:\s*/\s*(?P<den>{_UNSIGNED}))?)"  # 1,234.5   3/4
    r"(?P<pct>\s*\\?%)?"
)
# A whole string that is one number (after `_clean`).
_NUMBER_FULL_RE = re.compile(rf"(?P<sign>[-+])?{_NUMBER_BODY}")
# A number inside text: not the tail of a longer digit run, and a sign only when it does not follow a word or a
# closing bracket ("5-3" holds the numbers 5 and 3, "x = -3" holds -3).
_NUMBER_SEARCH_RE = re.compile(rf"(?<![\d.])(?:(?<![\w)\]}}])(?P<sign>[-+]))?{_NUMBER_BODY}")

_UNICODE_MINUSES = str.maketrans({"\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
_LATEX_SPACES_RE = re.compile(r"\\[,!;: ]|\\left|\\right")
_WRAPPERS: tuple[tuple[str, str], ...] = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_WHITESPACE_RE = re.compile(r"\s+")


def _clean(text: str) -> str:
    """Strips whitespace, math delimiters `$..$` / `\\(..\\)` / `\\[..\\]`, a leading currency `$` and trailing
    periods; maps unicode minus signs to `-` and removes LaTeX spacing (`\\,` `\\!` `\\left` ...)."""
    s = _LATEX_SPACES_RE.sub("", text.translate(_UNICODE_MINUSES)).replace("{,}", ",")
    for _ in range(8):  # a few nested layers at most: "$\(3\)$."
        before = s
        s = s.strip().rstrip(".").rstrip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):-len(right)]
                break
        else:
            if s.startswith("\\$"):
                s = s[2:]
            elif s.startswith("$"):
                s = s[1:]
        if s == before:
            break
    return s


def _number_value(match: re.Match[str], *, percent: bool) -> Fraction | None:
    """The exact value of a `_NUMBER_*_RE` match; None for a zero denominator or past Python's int-string limit."""
    try:
        return _fraction_of(match, percent=percent)
    except ValueError:  # more than `sys.get_int_max_str_digits()` digits
        return None


def _fraction_of(match: re.Match[str], *, percent: bool) -> Fraction | None:
    if match["fn"] is not None:
        num, den = Fraction(match["fn"].replace(",", "")), Fraction(match["fd"].replace(",", ""))
    elif match["fn1"] is not None:
        num, den = Fraction(int(match["fn1"])), Fraction(int(match["fd1"]))
    else:
        num = Fraction(match["num"].replace(",", ""))
        den = Fraction(match["den"].replace(",", "")) if match["den"] is not None else Fraction(1)
    if den == 0:
        return None
    value = num / den
    if match["sign"] == "-":
        value = -value
    if percent and match["pct"] is not None:
        value /= 100
    return value


def parse_number(text: Any, *, percent: bool = False) -> Fraction | None:
    """The exact value of `text` if the whole of it (after `_clean`) is one number, else None; never raises.

    `parse_number("1,234") == 1234`, `parse_number("\\frac{1}{2}") == parse_number("0.5") == Fraction(1, 2)`,
    `parse_number("7 apples") is None`; None too past Python's 4300-digit int limit (such a gold answer is then
    compared as a string). `percent`: read a trailing `%` as /100 (default: ignore it).
    """
    if not isinstance(text, str):
        return None
    match = _NUMBER_FULL_RE.fullmatch(_clean(text))
    return None if match is None else _number_value(match, percent=percent)


def answer_number(text: Any, *, percent: bool = False) -> Fraction | None:
    """The number an answer span states: the whole span if it is a number, else the first number of the part after
    its last "=" ("7 apples" -> 7, "x = 5" -> 5, "2 + 3 = 5" -> 5); None without a number. Never raises."""
    value = parse_number(text, percent=percent)
    if value is not None or not isinstance(text, str):
        return value
    tail = text.translate(_UNICODE_MINUSES).rsplit("=", 1)[-1]
    match = _NUMBER_SEARCH_RE.search(_LATEX_SPACES_RE.sub("", tail).replace("{,}", ","))
    return None if match is None else _number_value(match, percent=percent)


def normalize_text(text: Any, *, case_fold: bool = False) -> str:
    """`text` cleaned like a number (`$..$`, trailing periods, ...) with whitespace collapsed to single spaces;
    case-folded when `case_fold`. Non-strings give ""."""
    if not isinstance(text, str):
        return ""
    s = _WHITESPACE_RE.sub(" ", _clean(text)).strip()
    return s.casefold() if case_fold else s


def answers_equal(pred: Any, gold: Any, *, case_fold: bool = False, percent: bool = False) -> bool:
    """Whether predicted answer `pred` states gold answer `gold`; never raises.

    A numeric gold answer is compared exactly (`Fraction`) with `answer_number(pred)`; any other gold answer with
    `normalize_text` of both (case-folded when `case_fold`). A gold answer given as a number (int, Fraction) is
    read through `str`; a gold answer in a `\\boxed{}` is unboxed. None or an empty prediction is never equal.
    """
    try:
        if pred is None or gold is None:
            return False
        gold = str(gold) if isinstance(gold, (int, float, Fraction)) and not isinstance(gold, bool) else gold
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        gold = extract_boxed(gold) or gold
        gold_value = parse_number(gold, percent=percent)
        if gold_value is not None:
            pred_value = answer_number(pred, percent=percent)
            return pred_value is not None and pred_value == gold_value
        pred_text = normalize_text(pred, case_fold=case_fold)
        return bool(pred_text) and pred_text == normalize_text(gold, case_fold=case_fold)
    except Exception:  # noqa: BLE001 - a verifier must never crash a rollout
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MAX_BOX_UNWRAP = 4
_ANSWER_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
_ANSWER_MARKER_RE = re.compile(r"\banswer\b[ \t*]*(?::|\bis\b[ \t]*:?)", re.IGNORECASE)


def _last_match(regex: re.Pattern[str], text: str, end: int | None = None) -> re.Match[str] | None:
    """The last non-overlapping match of `regex` in `text[:end]` (linear: no lazy quantifier spanning the text)."""
    last = None
    for match in regex.finditer(text, 0, len(text) if end is None else end):
        last = match
    return last


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index` (escaped `\\{` `\\}` skipped), or None if unbalanced."""
    depth, i, n = 0, open_index, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: Any) -> str | None:
    """Content of the last top-level `\\boxed{...}` (or `\\fbox{...}`), stripped; None if there is none or the last
    one is unclosed. `\\boxed{\\boxed{5}}` gives "5"; `\\boxed{1} ... \\boxed{2}` gives "2"."""
    if not isinstance(text, str):
        return None
    content, pos = None, 0
    while (match := _BOX_RE.search(text, pos)) is not None:
        close = _matching_brace(text, match.end() - 1)
        if close is None:
            return None
        content, pos = text[match.end():close], close + 1
    if content is None:
        return None
    content = content.strip()
    for _ in range(_MAX_BOX_UNWRAP):  # bounded: each unwrap rescans the content
        inner = _BOX_RE.match(content)
        if inner is None or _matching_brace(content, inner.end() - 1) != len(content) - 1:
            break
        content = content[inner.end():-1].strip()
    return content


def extract_answer_tag(text: Any) -> str | None:
    """Content of the last `<answer>...</answer>`, stripped (R1 format); None if there is none."""
    if not isinstance(text, str):
        return None
    close = _last_match(_ANSWER_CLOSE_RE, text)
    start = None if close is None else _last_match(_ANSWER_OPEN_RE, text, close.start())
    return None if start is None else text[start.end():close.start()].strip()


def extract_answer_line(text: Any) -> str | None:
    """The rest of the line after the last "Answer:" / "answer is" marker (case-insensitive; "**Answer:**" and
    "The final answer is" too), stripped of markdown `*` and trailing periods; the next non-empty line when that rest
    is empty; None without a marker. "Answer: 7 apples" gives "7 apples"."""
    if not isinstance(text, str):
        return None
    last = _last_match(_ANSWER_MARKER_RE, text)
    if last is None:
        return None
    for line in text[last.end():].split("\n"):
        rest = line.strip().strip("*").strip().rstrip(".").rstrip()
        if rest:
            return rest
    return None


def extract_last_number(text: Any) -> str | None:
    """The text of the last number in `text` ("-3", "1,000", "3/4", "\\frac{1}{2}", "50%"); None if there is none.
    A `-` counts as a sign only where it cannot be a binary minus ("5-3" ends in 3, "x = -3" in -3)."""
    if not isinstance(text, str):
        return None
    last = _last_match(_NUMBER_SEARCH_RE, text.translate(_UNICODE_MINUSES))
    return None if last is None else last.group().strip()


_EXTRACTORS: dict[str, Callable[[Any], str | None]] = {
    "boxed": extract_boxed,
    "answer_tag": extract_answer_tag,
    "answer_line": extract_answer_line,
    "last_number": extract_last_number,
}


def _check_mode(mode: str) -> None:
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"mode must be one of {EXTRACTION_MODES}, got {mode!r}")


def extract_answer(text: Any, *, mode: str = "auto") -> str | None:
    """The final answer of `text` by `mode` (see `EXTRACTION_MODES`); "auto" tries boxed, answer tag, answer line,
    last number, in that order. Raises ValueError only for an unknown mode; None when nothing is found."""
    _check_mode(mode)
    if mode != "auto":
        return _EXTRACTORS[mode](text)
    for extract in _EXTRACTORS.values():
        found = extract(text)
        if found:
            return found
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Rewards


def _never_raises(fn: RewardFn) -> RewardFn:
    """Wraps a reward so that any exception (or a non-string completion) scores 0.0."""

    @functools.wraps(fn)
    def safe(prompt: Any = None, completion: Any = None, *args: Any, **kwargs: Any) -> float:
        if not isinstance(completion, str):
            return 0.0
        try:
            return float(fn(prompt, completion, *args, **kwargs))
        except Exception:  # noqa: BLE001 - a reward must never crash a rollout
            return 0.0

    return safe


def answer_reward(mode: str = "auto", *, case_fold: bool = False, percent: bool = False) -> RewardFn:
    """A 0/1 reward: 1.0 iff the answer extracted by `mode` (`extract_answer`) equals the example's gold `answer`
    (`answers_equal`). Raises ValueError here for an unknown mode; the reward itself never raises.

        rewards = RewardSet({"correct": answer_reward("boxed"), "format": format_reward})
    """
    _check_mode(mode)

    @_never_raises
    def reward(prompt: str, completion: str, *, answer: Any = None, **_: Any) -> float:
        pred = extract_answer(completion, mode=mode)
        return float(answers_equal(pred, answer, case_fold=case_fold, percent=percent))

    reward.__name__ = reward.__qualname__ = f"answer_reward_{mode}"
    return reward


_auto_answer_reward = answer_reward("auto")


def math_answer_reward(prompt: Any, completion: Any, *, answer: Any = None, **_: Any) -> float:
    """1.0 iff the completion's final answer (`extract_answer(mode="auto")`: boxed, answer tag, answer line, last
    number) equals the gold `answer` exactly (numbers as `Fraction`s, else normalised strings); 0.0 otherwise and on
    any input that cannot be read. Never raises."""
    return _auto_answer_reward(prompt, completion, answer=answer)


@_never_raises
def exact_match_reward(prompt: Any, completion: Any, *, answer: Any = None, **_: Any) -> float:
    """1.0 iff the whole completion equals the gold `answer` after `normalize_text` (whitespace collapsed, `$..$` and
    trailing periods stripped; case kept), else 0.0. For tasks whose completion is the bare answer. Never raises."""
    if answer is None:
        return 0.0
    want = normalize_text(str(answer))
    return float(bool(want) and normalize_text(completion) == want)


#: R1 format: a think block, then an answer in tags, nothing else (whitespace between and around allowed).
THINK_ANSWER_TAGS = (r"\s*<think>(?:(?!</?think>).)*</think>"
                     r"\s*<answer>(?:(?!</?answer>).)*\S(?:(?!</?answer>).)*</answer>\s*")
#: A think block, then anything without another think tag, ending with a non-empty "Answer: ..." last line.
THINK_ANSWER_LINE = r"\s*<think>(?:(?!</?think>).)*</think>(?:(?!</?think>).)*?^[ \t]*Answer:[ \t]*\S[^\n]*\s*"
#: Any text whose last non-empty line is a non-empty "Answer: ..." line.
ANSWER_LINE_LAST = r".*?^[ \t]*Answer:[ \t]*\S[^\n]*\s*"


def make_format_reward(pattern: str | re.Pattern[str], *, flags: int = re.DOTALL | re.MULTILINE,
                       fullmatch: bool = True) -> RewardFn:
    """A 0/1 format reward: 1.0 iff the completion matches `pattern` (whole completion when `fullmatch`, else
    anywhere). `flags` apply to a string pattern (default: `.` crosses newlines, `^`/`$` match at lines). Presets:
    `THINK_ANSWER_TAGS` (R1), `THINK_ANSWER_LINE`, `ANSWER_LINE_LAST`. An invalid pattern raises `re.error` here;
    the reward itself never raises.

        reward = make_format_reward(THINK_ANSWER_LINE)
        reward("", "<think>7 + 5 = 12</think>\\nAnswer: 12")   # 1.0
    """
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
    match = regex.fullmatch if fullmatch else regex.search

    @_never_raises
    def reward(prompt: str, completion: str, **_: Any) -> float:
        return float(match(completion) is not None)

    reward.__name__ = reward.__qualname__ = "format_reward"
    reward.pattern = regex  # type: ignore[attr-defined]
    return reward


#: The R1 format reward: `<think>...</think>` then `<answer>...</answer>` (`THINK_ANSWER_TAGS`).
format_reward: RewardFn = make_format_reward(THINK_ANSWER_TAGS)
