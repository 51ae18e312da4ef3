"""Reward functions named by string: built-in names and import paths, with weights, resolved in one place.

A reward list is written the way TRL's `GRPOTrainer` users write `reward_funcs` / `reward_weights`, as two
comma-separated strings (so that a command line sets them: `--config.rewards=math_answer,my_rewards:brevity
--config.reward_weights=1.0,0.1`):

    rewards         "name,name,..."   each a built-in name (`BUILTIN_REWARDS`) or an import path: "pkg.mod:fn"
                                      (an attribute path after the colon: "pkg.mod:Class.method"), or TRL's dotted
                                      form "pkg.mod.fn"; the module must be importable (on sys.path)
    reward_weights  "w,w,..."         one finite float per reward; "" = every weight 1.0

Built-in names:

    correct       the built-in task's checker (0/1; `task_reward`): needs the task and the record's `answer`
    digit_match   partial credit per correct digit of an integer `answer` (`digit_match_reward`)
    math_answer   the final answer (boxed, answer tag, "Answer:" line, last number) equals `answer` exactly (0/1)
    exact_match   the whole completion equals `answer` after whitespace/`$..$` normalisation (0/1)
    format        the R1 format `<think>...</think><answer>...</answer>` (0/1; `verifiers.format_reward`)

A reward function is called once per sample as `fn(prompt, completion, **example)`, `example` being the prompt
record's other fields (`answer`, ...): TRL calls its functions on whole batches (`fn(prompts, completions, **columns)
-> list[float]`); here the per-sample form is checked when a reward is resolved (it must accept two positional
arguments and end in `**kwargs`, as TRL asks too). Its metric name (`reward/<name>`) is the built-in name or the
function's attribute name (the part after the last `:` or `.`); two rewards with one name are an error.

`parse_rewards` checks a reward list completely (unknown name, unimportable module, missing attribute, not callable,
wrong signature, bad or miscounted weights: a ValueError naming the entry), so that a config can call it when it is
built, before any training; `build_reward_set` turns the checked list into a `RewardSet` for a task.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpost.rollout.rewards import REWARD_AGGREGATIONS, RewardFn, RewardSet, digit_match_reward, task_reward
from jaxpost.rollout.verifiers import exact_match_reward, format_reward, math_answer_reward

__all__ = ["BUILTIN_REWARDS", "BuiltinReward", "RewardSpec", "accuracy_reward_name", "build_reward_set",
           "parse_rewards", "register_reward", "required_fields", "resolve_reward"]


@dataclasses.dataclass(frozen=True)
class BuiltinReward:
    """A built-in reward: `make(task) -> fn` (task may be None for rewards that do not need one); `accuracy`: a 0/1
    answer verifier (a candidate for the `accuracy` metric); `needs`: the record fields it reads."""

    make: Callable[[Any], RewardFn]
    accuracy: bool = False
    needs: tuple[str, ...] = ()
    needs_task: bool = False


def _correct(task) -> RewardFn:
    if task is None:
        raise ValueError("reward 'correct' (the built-in task's checker) needs a task")
    return task_reward(task)


BUILTIN_REWARDS: dict[str, BuiltinReward] = {
    "correct": BuiltinReward(_correct, accuracy=True, needs=("answer",), needs_task=True),
    "digit_match": BuiltinReward(lambda task: digit_match_reward, needs=("answer",)),
    "math_answer": BuiltinReward(lambda task: math_answer_reward, accuracy=True, needs=("answer",)),
    "exact_match": BuiltinReward(lambda task: exact_match_reward, accuracy=True, needs=("answer",)),
    "format": BuiltinReward(lambda task: format_reward),
}


def register_reward(name: str, make: Callable[[Any], RewardFn], *, accuracy: bool = False,
                    needs: Sequence[str] = (), needs_task: bool = False) -> None:
    """Adds a built-in reward name (`make(task) -> fn`); a name holding `:` or `.` would read as an import path."""
    if not name or not name.isidentifier():
        raise ValueError(f"a built-in reward name must be an identifier, got {name!r}")
    if name in BUILTIN_REWARDS:
        raise ValueError(f"reward {name!r} is already registered")
    BUILTIN_REWARDS[name] = BuiltinReward(make, accuracy=accuracy, needs=tuple(needs), needs_task=needs_task)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One checked entry of a reward list: its metric `name`, `source` as written, `weight`, whether it is a 0/1
    answer verifier (`accuracy`), and the record fields it needs (`needs`: a built-in's, or an imported function's
    required keyword parameters)."""

    name: str
    source: str
    weight: float
    accuracy: bool = False
    needs: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.source in BUILTIN_REWARDS


def _import_path(source: str) -> tuple[str, str]:
    """(module, attribute path) of "pkg.mod:attr.path" or TRL's dotted "pkg.mod.fn"."""
    if ":" in source:
        module, _, attr = source.partition(":")
    else:
        module, _, attr = source.rpartition(".")
    if not module or not attr or not all(p.isidentifier() for p in (*module.split("."), *attr.split("."))):
        raise ValueError(f"reward {source!r}: not an import path 'pkg.module:function' (nor a built-in: "
                         f"{', '.join(BUILTIN_REWARDS)})")
    return module, attr


def _import(source: str) -> Callable:
    module_name, attr = _import_path(source)
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it is imported
        raise ValueError(f"reward {source!r}: cannot import module {module_name!r}: {e!r}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {source!r}: {getattr(obj, '__name__', module_name)!r} has no attribute "
                             f"{part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {source!r} is not callable (a {type(obj).__name__})")  # noqa: TRY004 - a config error
    return obj


def required_fields(fn: Callable) -> tuple[str, ...]:
    """The record fields `fn(prompt, completion, **example)` cannot do without: its parameters after the first two
    that have no default (keyword-only or positional-or-keyword); () when the signature cannot be read."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return ()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = positional[2:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return tuple(p.name for p in rest if p.default is p.empty)


def _check_signature(source: str, fn: Callable, needs: tuple[str, ...]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind("prompt", "completion", **{k: None for k in needs})
    except TypeError as e:
        raise ValueError(f"reward {source!r}: its signature {sig} cannot be called as fn(prompt, completion, "
                         f"**example) (one sample per call, unlike TRL's batched reward functions): {e}") from None
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        raise ValueError(f"reward {source!r}: its signature {sig} has no **kwargs: every field of a prompt record "
                         f"reaches it as a keyword argument (end the signature with **example, as in TRL)")


def resolve_reward(source: str, *, task=None) -> RewardFn:
    """The reward function a reward-list entry names (a built-in, made for `task`, or an imported callable)."""
    if source in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[source].make(task)
    return _import(source)


def _parse_weights(weights: str, names: Sequence[str]) -> list[float]:
    if not weights.strip():
        return [1.0] * len(names)
    items = [w.strip() for w in weights.split(",")]
    if len(items) != len(names):
        raise ValueError(f"reward_weights {weights!r} gives {len(items)} weight(s) for {len(names)} reward(s) "
                         f"{list(names)}")
    out = []
    for name, item in zip(names, items):
        try:
            w = float(item)
        except ValueError:
            raise ValueError(f"reward_weights: weight {item!r} of reward {name!r} is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"reward_weights: weight {item!r} of reward {name!r} is not finite")
        out.append(w)
    return out


def parse_rewards(rewards: str, weights: str = "") -> tuple[RewardSpec, ...]:
    """The checked entries of a reward list (module docstring). Imports every import path now; raises ValueError
    naming the entry for an unknown name, an import that fails, a missing attribute, a non-callable, a signature
    that cannot take (prompt, completion, **example), a duplicate name, or bad / miscounted weights."""
    sources = [s.strip() for s in rewards.split(",")] if rewards.strip() else []
    if not sources:
        raise ValueError("no reward functions named (rewards='')")
    if any(not s for s in sources):
        raise ValueError(f"rewards {rewards!r} has an empty entry")
    specs, seen = [], {}
    for source, weight in zip(sources, _parse_weights(weights, sources)):
        if source in BUILTIN_REWARDS:
            entry = BUILTIN_REWARDS[source]
            name, accuracy, needs = source, entry.accuracy, entry.needs
        else:
            fn = _import(source)
            needs = required_fields(fn)
            _check_signature(source, fn, needs)
            name, accuracy = _import_path(source)[1].rsplit(".", 1)[-1], False
        if name in seen:
            raise ValueError(f"rewards {seen[name]!r} and {source!r} share the name {name!r} (reward/{name}); "
                             f"wrap one under another name")
        seen[name] = source
        specs.append(RewardSpec(name=name, source=source, weight=weight, accuracy=accuracy, needs=needs))
    return tuple(specs)


def accuracy_reward_name(specs: Sequence[RewardSpec], accuracy_reward: str = "") -> str | None:
    """The reward reported as `accuracy`: "" = the first built-in 0/1 answer verifier of `specs` (correct,
    math_answer, exact_match; None without one), "none" = no accuracy metric, else the name (or source) of one of
    `specs`. Raises ValueError for a name that is not in `specs`."""
    if accuracy_reward == "none":
        return None
    if not accuracy_reward:
        return next((s.name for s in specs if s.accuracy), None)
    for s in specs:
        if accuracy_reward in (s.name, s.source):
            return s.name
    raise ValueError(f"accuracy_reward {accuracy_reward!r} is none of the configured rewards "
                     f"{[s.name for s in specs]} (or 'none', or '' for the first 0/1 answer verifier)")


def build_reward_set(specs: Sequence[RewardSpec], *, task=None, timeout_s: float | None = 10.0,
                     aggregation: str = "sum", observe: Mapping[str, Callable] | None = None) -> RewardSet:
    """The `RewardSet` of checked entries (functions resolved for `task`, keyed by name, weighted). `observe`: more
    functions with weight 0, measured and logged (`reward/<name>`) but not rewarded (e.g. whether a completion used
    a worked trace)."""
    if aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {REWARD_AGGREGATIONS}, got {aggregation!r}")
    functions = {s.name: resolve_reward(s.source, task=task) for s in specs}
    weights = {s.name: s.weight for s in specs}
    for name, fn in (observe or {}).items():
        if name in functions:
            raise ValueError(f"observed function {name!r} has the name of a reward")
        functions[name], weights[name] = fn, 0.0
    return RewardSet(functions, weights=weights, timeout_s=timeout_s, aggregation=aggregation)
