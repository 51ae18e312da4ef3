"""Reward functions that tests/test_rl_own_data.py names by import path (`RLConfig.rewards="tests.own_reward_fns:..."`),
as a user's own module would hold them."""

from __future__ import annotations

import threading

#: Every call of `echo_fields`: its prompt, completion and keyword arguments (RewardSet calls from several threads).
CALLS: list[dict] = []
_LOCK = threading.Lock()

NOT_CALLABLE = 3.0


def echo_fields(prompt, completion, *, answer, topic, **example) -> float:
    """Records what it was given; 1.0 for an odd-length completion (a reward that differs within a group)."""
    with _LOCK:
        CALLS.append({"prompt": prompt, "completion": completion, "answer": answer, "topic": topic, **example})
    return float(len(completion) % 2)


def length_reward(prompt, completion, **_) -> float:
    return float(len(completion))


def batched_trl_style(completions, **kwargs) -> list[float]:
    """TRL's batched signature: it cannot be called once per sample as fn(prompt, completion, **example)."""
    return [0.0 for _ in completions]


def no_kwargs(prompt, completion) -> float:
    """Cannot take the record's other fields."""
    return 0.0


class Scorers:
    @staticmethod
    def constant(prompt, completion, **_) -> float:
        return 1.0
