"""Data sources: validated JSONL chat/prompt-completion records and random-access sources for grain.

Two record formats are accepted everywhere in jaxpost's data code:

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...], ...extra keys}
    {"prompt": str, "completion": str, ...extra keys}

`normalize_record` turns either into the `{"messages": [...]}` form (extra keys kept); a prompt/completion pair becomes
one user turn answered by one assistant turn. A conversation is an optional first system message, then user and
assistant turns alternating from a user turn (`check_role_order`).

Hostile files (docs/reliability.md): `read_jsonl` reads bytes and decodes each line itself, so bad UTF-8, bad JSON,
a line over `max_line_bytes`, numbers too long or nesting too deep for Python's JSON reader and malformed records
all raise `DataError` starting `path:line: ` and naming the field, or, with `on_bad="skip"`
(`DataConfig.on_bad_record`), are skipped, counted (`Records.skipped`) and logged. The returned `Records` remember
each record's line, so the pipelines' later errors (an overlong example, a tokenizer failing) name `path:line` too.

Anything that is indexable and has a length (a list, `ListSource`, `FunctionSource`, a task's `source(split)`) can be
fed to `grain.MapDataset.source` and to the SFT pipeline.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpost.tokenizers import validate_messages

__all__ = ["DataError", "FunctionSource", "ListSource", "Records", "check_role_order", "location",
           "normalize_record", "read_jsonl"]

log = logging.getLogger("jaxpost")

#: The longest JSONL line `read_jsonl` reads by default (bytes, newline excluded).
MAX_LINE_BYTES = 16 << 20
_BAD_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A malformed record or a data-pipeline policy violation; the message says where (file:line or example index)."""


class Records(list):
    """The records `read_jsonl` returns (a list) and where they came from: `location(i)` is `"path:line"` of record
    `i`; `skipped` lists `(path:line, reason)` of the lines skipped as malformed (`on_bad="skip"`)."""

    def __init__(self, records=(), *, path: str = "", lines: Sequence[int] = (),
                 skipped: Sequence[tuple[str, str]] = ()):
        super().__init__(records)
        self.path, self.lines, self.skipped = path, list(lines), list(skipped)

    def location(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"


def location(source: Any, index: int, what: str = "example") -> str:
    """Where record `index` of `source` came from: `"path:line (example i)"` for `Records`, else `"example i"`."""
    if isinstance(source, Records) and 0 <= index < len(source.lines):
        return f"{source.location(index)} ({what} {index})"
    return f"{what} {index}"


def encode_checked(tokenizer, messages, *, where: Callable[[], str], add_generation_prompt: bool = False):
    """`tokenizer.encode_chat(messages, ...)`, any failure of the tokenizer (a chat template raising, a piece it cannot
    encode) re-raised as DataError naming the record (`where()`), with the original as its cause."""
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer raises, the record is named
        raise DataError(f"{where()}: the tokenizer failed on this record: {type(e).__name__}: {e}") from e


def check_role_order(messages: Sequence[Mapping[str, Any]], field: str = "messages") -> None:
    """An optional system message first, then user and assistant turns alternating, starting with a user turn.
    Raises DataError naming the message (`messages[2].role: two 'user' turns in a row ...`)."""
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i:
            raise DataError(f"{field}[{i}].role: a 'system' message may only come first")
        if role != "system" and previous in (None, "system") and role != "user":
            raise DataError(f"{field}[{i}].role: the first turn (after an optional system message) must be 'user', "
                            f"got {role!r}")
        if role == previous:
            raise DataError(f"{field}[{i}].role: two {role!r} turns in a row; user and assistant turns must alternate")
        previous = role


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
        check_role_order(messages)
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


def read_jsonl(path: str | os.PathLike, normalize: Callable[[Any], dict[str, Any]] | None = None, *,
               on_bad: str = "error", max_line_bytes: int = MAX_LINE_BYTES) -> Records:
    """Reads a JSONL file of chat or prompt/completion records, normalised to `{"messages": [...]}` form.

    Blank lines are skipped. Every other line must be one UTF-8 JSON object in one of the two formats (see
    `normalize_record`); extra keys are kept. `normalize` replaces `normalize_record` for other record kinds
    (preference pairs, KTO examples: `jaxpost.data.preference`). Returns `Records` (a list that knows each record's
    line).

    Raises:
      DataError: for the first malformed line (not UTF-8, not JSON, longer than `max_line_bytes`, or a record
        `normalize` refuses), with a message starting `f"{path}:{lineno}: "` (1-based) and naming the field. With
        `on_bad="skip"` such lines are skipped instead, counted in `Records.skipped` and logged.
    """
    if on_bad not in _BAD_POLICIES:
        raise ValueError(f"on_bad must be one of {_BAD_POLICIES}, got {on_bad!r}")
    path_str = os.fspath(path)
    normalize = normalize or normalize_record
    records, lines, skipped = [], [], []

    def bad(lineno: int, reason: str) -> None:
        if on_bad == "error":
            raise DataError(f"{path_str}:{lineno}: {reason}")
        skipped.append((f"{path_str}:{lineno}", reason))

    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_line_bytes + 1):
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # the rest of the line, read in bounded pieces
                    raw = f.readline(1 << 20)
                bad(lineno, f"line longer than max_line_bytes={max_line_bytes}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid UTF-8: byte {e.start} is {raw[e.start:e.start + 1]!r}")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                bad(lineno, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            except (ValueError, RecursionError) as e:  # a number too long for int(), nesting too deep
                bad(lineno, f"invalid JSON: {type(e).__name__}: {str(e)[:200]}")
                continue
            try:
                record = normalize(obj)
            except DataError as e:
                bad(lineno, str(e))
                continue
            records.append(record)
            lines.append(lineno)
    if skipped:
        log.warning("%s: skipped %d malformed line(s) (on_bad_record='skip'), e.g. %s", path_str, len(skipped),
                    "; ".join(f"{where}: {why}" for where, why in skipped[:3]))
    return Records(records, path=path_str, lines=lines, skipped=skipped)


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
