"""Data sources: validated JSONL chat/prompt-completion records and random-access sources for grain.

Two record formats are accepted everywhere in jaxpost's data code:

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...], ...extra keys}
    {"prompt": str, "completion": str, ...extra keys}

`normalize_record` turns either into the `{"messages": [...]}` form (extra keys kept); a prompt/completion pair becomes
one user turn answered by one assistant turn. Anything that is indexable and has a length (a list, `ListSource`,
`FunctionSource`, a task's `source(split)`) can be fed to `grain.MapDataset.source` and to the SFT pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpost.tokenizers import validate_messages

__all__ = ["DataError", "FunctionSource", "ListSource", "normalize_record", "read_jsonl"]


class DataError(ValueError):
    """A malformed record or a data-pipeline policy violation; the message says where (file:line or example index)."""


def normalize_record(record: Any) -> dict[str, Any]:
    """Validates a record and returns it in `{"messages": [...]}` form, keeping extra keys.

    A record with a `"messages"` key is treated as a chat (its `prompt`/`completion` keys, if any, are kept as extra
    keys and ignored); otherwise it must have string `"prompt"` and `"completion"` fields, which become
    `[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]`.

    Raises:
      DataError: with a message that says what is wrong (`missing field 'completion'`,
        `messages[2].role must be one of ...`), without location: callers prefix it with one.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"record must be a JSON object, got {_json_type_name(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, (list, tuple)):
            raise DataError(f"field 'messages' must be a list, got {_json_type_name(messages)}")
        if not messages:
            raise DataError("field 'messages' must not be empty")
        try:
            validate_messages(messages)
        except ValueError as e:
            raise DataError(str(e)) from None
        out = dict(record)
        out["messages"] = [dict(m) for m in messages]
        return out
    if "prompt" not in record and "completion" not in record:
        raise DataError(
            "record has neither 'messages' nor 'prompt'/'completion'; expected "
            '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": str, "completion": str}'
        )
    for field in ("prompt", "completion"):
        if field not in record:
            raise DataError(f"missing field {field!r}")
        if not isinstance(record[field], str):
            raise DataError(f"field {field!r} must be a string, got {_json_type_name(record[field])}")
    out = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    out["messages"] = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
    return out


def read_jsonl(path: str | os.PathLike, normalize: Callable[[Any], dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    """Reads a JSONL file of chat or prompt/completion records, normalised to `{"messages": [...]}` form.

    Blank lines are skipped. Every other line must be one JSON object in one of the two formats (see
    `normalize_record`); extra keys are kept. `normalize` replaces `normalize_record` for other record kinds
    (preference pairs, KTO examples: `jaxpost.data.preference`).

    Raises:
      DataError: for the first malformed line, with a message starting `f"{path}:{lineno}: "` (1-based).
    """
    path_str = os.fspath(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path_str}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            try:
                records.append((normalize or normalize_record)(obj))
            except DataError as e:
                raise DataError(f"{path_str}:{lineno}: {e}") from None
    return records


class ListSource:
    """A grain random-access source over an in-memory sequence of records (`len` and `__getitem__`)."""

    def __init__(self, records: Sequence[Any]):
        if not hasattr(records, "__len__") or not hasattr(records, "__getitem__"):
            raise TypeError(f"records must be a sequence, got {type(records).__name__}")
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Any:
        return self._records[index]

    def __repr__(self) -> str:
        return f"ListSource(len={len(self)})"


class FunctionSource:
    """A grain random-access source computing record `i` as `fn(i)` for `0 <= i < length` (synthetic tasks).

    `fn` must be deterministic in `i`; it should be picklable (a module-level function, a bound method, or a
    `functools.partial` of one) if the source is used with multiprocessing.
    """

    def __init__(self, fn: Callable[[int], Any], length: int):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        self._fn = fn
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a source of length {self._length}")
        return self._fn(index)

    def __repr__(self) -> str:
        return f"FunctionSource({self._fn!r}, length={self._length})"


def _json_type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)
