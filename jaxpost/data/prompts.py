"""The RL prompt pipeline: a grain stream of tokenized prompts, drawn in batches, with exact checkpoint/resume.

    MapDataset.range(len(source))    source indices (errors name the example)
      .shuffle(seed)                 a fresh order every epoch
      .repeat(num_epochs)            None = forever
      [process_index::process_count] default (0, 1): every process draws the same prompts (the RL loop gathers
                                     every rollout row on every process, so each host sees the whole batch)
      .map(_EncodePrompt)            record -> prompt ids (`encode_chat(..., add_generation_prompt=True)`)
      .to_iter_dataset()             threaded prefetch

A prompt record is `{"prompt": str, ...}` or `{"messages": [...], ...}` (a final assistant message is the reference
and is left out of the prompt); every other field (`answer`, test cases, ...) travels with the prompt and reaches the
reward functions as keyword arguments. Batches are lists of `Prompt`s, so prompts keep their own lengths (the
sampler buckets them).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxpost.data.sources import DataError, check_role_order, encode_checked, location
from jaxpost.tokenizers import Tokenizer, validate_messages

__all__ = ["Prompt", "PromptIterator", "build_prompt_iterator", "prompt_messages"]

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its source index, token ids, text (the last user message) and the record's other fields."""

    index: int
    ids: np.ndarray
    text: str
    example: dict[str, Any]


def prompt_messages(record: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(prompt messages, the record's other fields) of a prompt record; raises DataError saying what is wrong."""
    if not isinstance(record, Mapping):
        raise DataError(f"prompt record must be a JSON object, got {type(record).__name__}")
    # `prompt` and `completion` would collide with the reward functions' positional arguments: a reference
    # completion travels as `reference`.
    extra = {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion")}
    if "completion" in record:
        extra.setdefault("reference", record["completion"])
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise DataError("field 'messages' must be a non-empty list")
        try:
            validate_messages(messages)
        except ValueError as e:
            raise DataError(str(e)) from None
        check_role_order(messages)
        messages = [dict(m) for m in messages]
        if messages[-1]["role"] == "assistant":
            extra.setdefault("reference", messages[-1]["content"])
            messages = messages[:-1]
        if not messages:
            raise DataError("no prompt: the only message is an assistant turn")
        return messages, extra
    if "prompt" not in record:
        raise DataError("prompt record has neither 'prompt' nor 'messages'")
    if not isinstance(record["prompt"], str):
        raise DataError(f"field 'prompt' must be a string, got {type(record['prompt']).__name__}")
    return [{"role": "user", "content": record["prompt"]}], extra


class _EncodePrompt:
    def __init__(self, source: Any, tokenizer: Tokenizer, max_prompt_len: int):
        self._source, self._tokenizer, self._max = source, tokenizer, max_prompt_len

    def __call__(self, index: int) -> Prompt:
        index = int(index)
        try:
            messages, extra = prompt_messages(self._source[index])
        except DataError as e:
            raise DataError(f"{location(self._source, index, 'prompt')}: {e}") from None
        ids, _ = encode_checked(self._tokenizer, messages, add_generation_prompt=True,
                                where=lambda: location(self._source, index, "prompt"))
        if len(ids) > self._max:
            raise DataError(f"{location(self._source, index, 'prompt')}: {len(ids)} tokens > "
                            f"max_prompt_len={self._max}; raise max_prompt_len")
        text = next(m["content"] for m in reversed(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else messages[-1]["content"]
        return Prompt(index=index, ids=np.asarray(ids, np.int32), text=text, example=extra)


class PromptIterator:
    """Batches of `batch_size` `Prompt`s; `get_state()` / `set_state()` resume exactly (JSON-serialisable)."""

    def __init__(self, dataset: grain.IterDataset, batch_size: int, config: dict[str, Any]):
        self._iterator = iter(dataset)
        self.batch_size = batch_size
        self._config = config
        self.prompts_seen = 0

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[Prompt]:
        batch = [next(self._iterator) for _ in range(self.batch_size)]
        self.prompts_seen += len(batch)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return {"prompts_seen": self.prompts_seen}

    def get_state(self) -> dict[str, Any]:
        state = {"version": _STATE_VERSION, "config": self._config, "prompts_seen": self.prompts_seen,
                 "grain": self._iterator.get_state()}
        return json.loads(json.dumps(state))

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a PromptIterator state of version {_STATE_VERSION}: {str(state)[:200]}")
        if state["config"] != self._config:
            raise ValueError(f"cannot resume: the prompt pipeline settings differ from the saved state "
                             f"(saved {state['config']}, now {self._config})")
        self._iterator.set_state(state["grain"])
        self.prompts_seen = int(state["prompts_seen"])

    def close(self) -> None:
        self._iterator.close()


def build_prompt_iterator(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, batch_size: int,
                          max_prompt_len: int, shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                          process_index: int = 0, process_count: int = 1) -> PromptIterator:
    """This process's iterator of prompt batches (see the module docstring). Raises ValueError on bad settings and
    DataError (while iterating) on a malformed record or an overlong prompt, naming the source index."""
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__") or len(source) == 0:
        raise ValueError("source must be a non-empty indexable sequence of prompt records")
    for name, value in (("batch_size", batch_size), ("max_prompt_len", max_prompt_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)[process_index::process_count]
    ds = ds.map(_EncodePrompt(source, tokenizer, max_prompt_len))
    config = {"source_len": len(source), "batch_size": batch_size, "max_prompt_len": max_prompt_len,
              "shuffle": shuffle, "seed": seed, "num_epochs": num_epochs, "process_index": process_index,
              "process_count": process_count, "vocab_size": tokenizer.vocab_size}
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size)
    return PromptIterator(ds.to_iter_dataset(read_options), batch_size, config)
