"""Preference data: paired (DPO family) and unpaired (KTO) records, their grain pipelines, and built-in preference sets.

Paired records (`normalize_preference_record`), TRL's dataset formats:

    {"prompt": str, "chosen": str, "rejected": str}                            standard
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}       conversational: chosen/rejected are
                                                                               the assistant turn(s) that follow
    {"chosen": [messages], "rejected": [messages]}                             implicit prompt: two full conversations
                                                                               split at their last assistant turn;
                                                                               what precedes it must be identical

A string prompt is one user turn, a string completion one assistant turn (the two may be mixed with message lists).
Unpaired (KTO) records (`normalize_kto_record`):
`{"prompt": str | [messages], "completion": str | [messages], "label": bool}`.
Both normalise to message lists (`{"prompt": [...], "chosen": [...], "rejected": [...]}`, resp. `"completion"`,
`"label"`), keeping extra keys; normalisation is idempotent.

Tokenization. The prompt is `encode_chat(prompt, add_generation_prompt=True)` (it ends with the `<|assistant|>`
marker); a completion is the rest of `encode_chat(prompt + completion)`: the assistant content and its closing eos
(plus any further turns). A sequence `x = prompt + completion` of L tokens gives one row `inputs = x[:-1]`,
`targets = x[1:]`, `loss_mask = m[1:]` where `m` is `encode_chat`'s mask on the completion and 0 on the whole prompt
(assistant turns of a multi-turn prompt are context, not trained on): the loss is on exactly the positions whose
target is a completion token, eos included.

Truncation (`overlong="truncate"`, as TRL's DPO: prompt from the left first, then completions from the right). A row
holds L <= seq_len + 1 tokens. When `P + max(C_chosen, C_rejected)` exceeds that, the prompt is cut to
`P' = min(P, max(max_prompt_len, seq_len + 1 - C_max))` tokens, keeping its bos and its last `P' - 1` tokens (so the
generation prompt stays), and each completion keeps its first `seq_len + 1 - P'` tokens. Both sides of a pair share
the same (truncated) prompt. With `max_prompt_len <= seq_len`, every completion keeps at least one trained token; a
pair where a side would keep none is still checked for, dropped and counted in `dropped_overlong`.

Paired batches (`build_preference_iterator`), numpy, B = pairs per process:

    inputs, targets  int32    [2B, T]  row 2i: pair i's chosen sequence, row 2i + 1: its rejected sequence
    loss_mask        float32  [2B, T]  1.0 where the target is a completion token (eos included)
    segment_ids      int32    [2B, T]  1 on real tokens, 0 on padding (one sequence per row, no packing)
    positions        int32    [2B, T]  0, 1, ... on real tokens, 0 on padding
    pair_mask        float32  [B]      1.0 for real pairs, 0.0 for the padding pairs of a final short batch

Interleaving keeps pairs together under any split of the rows into contiguous chunks of even size (micro-batches,
devices); `pair_mask[i]` belongs to rows 2i and 2i + 1. Unpaired batches (`build_kto_iterator`) are `[B, T]` rows
with the same keys plus `label` (int32 [B], 1 desirable / 0 undesirable), `example_mask` (float32 [B]) and the KL rows
`kl_*` for KTO's reference point (see `build_kto_iterator`).

Built-in preference set: `arithmetic_preference_records` pairs the task's gold answer with a deterministic near miss
(`arithmetic_near_miss`); `preference_records_from_samples` / `kto_records_from_samples` label a model's samples
with a checker or rewards; `kto_records_from_pairs` unpairs paired records.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxpost.data.pipeline import (_KEEP, _KEEP_TRUNCATED, SFTIterator, _check_batching, _FilterAndCountIterDataset,
                                   _empty_rows)
from jaxpost.data.sources import (DataError, FunctionSource, _json_type_name, check_role_order, encode_checked,
                                  location, read_jsonl)
from jaxpost.data.tasks import DEFAULT_SOURCE_LENGTH, Task
from jaxpost.tokenizers import ChatTokenizer, Tokenizer, validate_messages

__all__ = [
    "NEAR_MISS_KINDS",
    "PREFERENCE_STATS_KEYS",
    "PreferenceIterator",
    "arithmetic_near_miss",
    "arithmetic_preference_record",
    "arithmetic_preference_records",
    "arithmetic_preference_source",
    "build_kto_iterator",
    "build_preference_iterator",
    "kto_records_from_pairs",
    "kto_records_from_samples",
    "normalize_kto_record",
    "normalize_preference_record",
    "preference_records_from_samples",
    "read_kto_jsonl",
    "read_preference_jsonl",
]

Messages = list[dict[str, Any]]

#: Counters reported by `PreferenceIterator.stats` (and stored in its state); an example is a pair (or a KTO record).
PREFERENCE_STATS_KEYS: tuple[str, ...] = ("examples_seen", "truncated", "dropped_overlong")


# ------------------------------------------------------------------------------------------------ records


def _as_messages(value: Any, field: str, role: str) -> Messages:
    """A string -> one `role` turn; a message list is validated. Errors name `field`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"field {field!r} must be a string or a list of messages, got {_json_type_name(value)}")
    if not value:
        raise DataError(f"field {field!r} must not be an empty list")
    try:
        validate_messages(value)
    except ValueError as e:
        raise DataError(f"field {field!r}: {e}") from None
    return [dict(m) for m in value]


def _completion_messages(value: Any, field: str) -> Messages:
    messages = _as_messages(value, field, "assistant")
    if messages[0]["role"] != "assistant":
        raise DataError(f"field {field!r} must start with an assistant turn, got role {messages[0]['role']!r}")
    return messages


def _split_conversation(value: Any, field: str) -> tuple[Messages, Messages]:
    """A full conversation -> (everything before its last assistant turn, that turn). It must end with that turn."""
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"field {field!r} must be a list of messages when there is no 'prompt' field, got {_json_type_name(value)}"
        )
    messages = _as_messages(value, field, "assistant")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"field {field!r} must end with an assistant turn, got role {messages[-1]['role']!r}")
    if len(messages) == 1:
        raise DataError(f"field {field!r} has no prompt: nothing precedes its last assistant turn")
    return messages[:-1], messages[-1:]


def _check_fields(record: Any, fields: Sequence[str]) -> None:
    if not isinstance(record, Mapping):
        raise DataError(f"record must be a JSON object, got {_json_type_name(record)}")
    for field in fields:
        if field not in record:
            raise DataError(f"missing field {field!r}")


def normalize_preference_record(record: Any) -> dict[str, Any]:
    """Validates a paired record (any form in the module docstring) -> `{"prompt", "chosen", "rejected"}` message lists.

    Extra keys are kept. Raises `DataError` naming the field (`field 'rejected' must be a string or a list of
    messages`, `field 'chosen': messages[1].role must be one of ...`), without location: callers prefix one.
    """
    _check_fields(record, ("chosen", "rejected"))
    out = dict(record)
    if "prompt" in record:
        out["prompt"] = _as_messages(record["prompt"], "prompt", "user")
        out["chosen"] = _completion_messages(record["chosen"], "chosen")
        out["rejected"] = _completion_messages(record["rejected"], "rejected")
        _check_order(out, ("chosen", "rejected"))
        return out
    prompt, out["chosen"] = _split_conversation(record["chosen"], "chosen")
    prompt_r, out["rejected"] = _split_conversation(record["rejected"], "rejected")
    if prompt != prompt_r:
        i = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise DataError(
            f"field 'rejected' differs from 'chosen' before the last assistant turn (first at messages[{i}]); "
            "conversations without a 'prompt' field must share everything but their last assistant turn"
        )
    out["prompt"] = prompt
    _check_order(out, ("chosen", "rejected"))
    return out


def _check_order(record: dict, fields: Sequence[str]) -> None:
    """The prompt followed by each completion is a well-ordered conversation (`check_role_order`)."""
    for field in fields:
        check_role_order(record["prompt"] + record[field], field=f"prompt + {field}")


def normalize_kto_record(record: Any) -> dict[str, Any]:
    """Validates an unpaired record -> `{"prompt": [...], "completion": [...], "label": bool}`, extra keys kept.

    `label` must be a JSON boolean (`true` = desirable). Raises `DataError` naming the field.
    """
    _check_fields(record, ("prompt", "completion", "label"))
    label = record["label"]
    if not isinstance(label, (bool, np.bool_)):
        raise DataError(f"field 'label' must be a boolean (true = desirable), got {_json_type_name(label)}")
    out = dict(record)
    out["prompt"] = _as_messages(record["prompt"], "prompt", "user")
    out["completion"] = _completion_messages(record["completion"], "completion")
    out["label"] = bool(label)
    _check_order(out, ("completion",))
    return out


def read_preference_jsonl(path: str | os.PathLike, *, on_bad: str = "error") -> list[dict[str, Any]]:
    """Reads paired records (see `normalize_preference_record`); blank lines are skipped.

    Raises:
      DataError: for the first malformed line, with a message starting `f"{path}:{lineno}: "` (1-based); with
        `on_bad="skip"` malformed lines are skipped and counted instead (`jaxpost.data.read_jsonl`).
    """
    return read_jsonl(path, normalize_preference_record, on_bad=on_bad)


def read_kto_jsonl(path: str | os.PathLike, *, on_bad: str = "error") -> list[dict[str, Any]]:
    """Reads unpaired KTO records (see `normalize_kto_record`); errors as `read_preference_jsonl`."""
    return read_jsonl(path, normalize_kto_record, on_bad=on_bad)


# ------------------------------------------------------------------------------------------------ tokenize stage


def _encode(tokenizer: Tokenizer, prompt: Messages, completion: Messages, where=lambda: "a record"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Completion ids and mask: `encode_chat(prompt + completion)` past the prompt and its generation prompt."""
    prompt_ids, _ = encode_checked(tokenizer, prompt, add_generation_prompt=True, where=where)
    ids, mask = encode_checked(tokenizer, prompt + completion, where=where)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise AssertionError("encode_chat(prompt + completion) does not start with the encoded prompt")
    return np.asarray(ids[n:], np.int32), np.asarray(mask[n:], np.float32)


def _fit(
    prompt_P: np.ndarray, completions: list[tuple[np.ndarray, np.ndarray]], *, max_tokens: int, max_prompt_len: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], bool]:
    """Truncates (prompt, completions) so that prompt + every completion has <= max_tokens tokens (module docstring).

    Returns the prompt, the completions (ids, mask) and whether anything was cut.
    """
    longest = max(ids.shape[0] for ids, _ in completions)
    P = prompt_P.shape[0]
    if P + longest <= max_tokens:
        return prompt_P, completions, False
    keep = min(P, max(max_prompt_len, max_tokens - longest))
    if keep < P:
        prompt_P = np.concatenate([prompt_P[:1], prompt_P[P - (keep - 1) :]])
    budget = max_tokens - keep
    return prompt_P, [(ids[:budget], mask[:budget]) for ids, mask in completions], True


class _TokenizeExample:
    """Source index -> prompt and completion arrays (truncated by the policy), tagged with the policy's decision.

    Paired (`fields=("chosen", "rejected")`) or unpaired (`("completion",)`, with `label`). Returns `{"status",
    "index"}` plus, when kept, `prompt` (int32) and per field `FIELD` (int32) and `FIELD_mask` (float32). Raises
    `DataError` naming the example index for malformed records and the "error" policy.
    """

    def __init__(self, source: Any, tokenizer: Tokenizer, *, paired: bool, seq_len: int, max_prompt_len: int,
                 overlong: str):
        self._source = source
        self._tokenizer = tokenizer
        self._paired = paired
        self._fields = ("chosen", "rejected") if paired else ("completion",)
        self._normalize = normalize_preference_record if paired else normalize_kto_record
        self._max_tokens = seq_len + 1
        self._max_prompt_len = max_prompt_len
        self._overlong = overlong

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            record = self._normalize(self._source[index])
        except DataError as e:
            raise DataError(f"{location(self._source, index)}: {e}") from None
        where = lambda: location(self._source, index)  # noqa: E731
        prompt_P = np.asarray(encode_checked(self._tokenizer, record["prompt"], add_generation_prompt=True,
                                             where=where)[0], np.int32)
        completions = [_encode(self._tokenizer, record["prompt"], record[f], where=where) for f in self._fields]
        status = _KEEP
        total = prompt_P.shape[0] + max(ids.shape[0] for ids, _ in completions)
        if total > self._max_tokens:
            if self._overlong == "error":
                raise DataError(
                    f"{location(self._source, index)}: prompt + longest completion is {total} tokens, {total - 1} "
                    "training positions "
                    f"> seq_len={self._max_tokens - 1}; overlong='error' (use 'truncate' or 'drop', or raise seq_len)"
                )
            if self._overlong == "drop":
                return {"status": "dropped_overlong", "index": index}
            prompt_P, completions, _ = _fit(
                prompt_P, completions, max_tokens=self._max_tokens, max_prompt_len=self._max_prompt_len
            )
            if any(not mask.any() for _, mask in completions):
                return {"status": "dropped_overlong", "index": index}
            status = _KEEP_TRUNCATED
        out: dict[str, Any] = {"status": status, "index": index, "prompt": prompt_P}
        for field, (ids, mask) in zip(self._fields, completions):
            out[field], out[f"{field}_mask"] = ids, mask
        if not self._paired:
            out["label"] = record["label"]
        return out


# ------------------------------------------------------------------------------------------------ batch assembly


def _write_row(rows: dict[str, np.ndarray], r: int, prompt_P: np.ndarray, ids_C: np.ndarray, mask_C: np.ndarray
               ) -> None:
    """Writes the sequence prompt + completion as row r: inputs/targets shifted by one, loss on completion targets."""
    seq_L = np.concatenate([prompt_P, ids_C])
    mask_L = np.concatenate([np.zeros(prompt_P.shape[0], np.float32), mask_C])
    n = seq_L.shape[0] - 1
    if n > rows["inputs"].shape[1]:
        raise AssertionError(f"a sequence of {n} positions does not fit seq_len={rows['inputs'].shape[1]}")
    rows["inputs"][r, :n] = seq_L[:-1]
    rows["targets"][r, :n] = seq_L[1:]
    rows["loss_mask"][r, :n] = mask_L[1:]
    rows["segment_ids"][r, :n] = 1
    rows["positions"][r, :n] = np.arange(n, dtype=np.int32)


class _PairBatch:
    """Up to B kept pairs -> the `[2B, T]` interleaved rows and `pair_mask [B]` (padding pairs: empty rows, 0)."""

    def __init__(self, pairs: int, seq_len: int, pad_id: int):
        self._pairs = pairs
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = _empty_rows(2 * self._pairs, self._seq_len, self._pad_id)
        pair_mask_B = np.zeros((self._pairs,), np.float32)
        for i, e in enumerate(elements):
            _write_row(batch, 2 * i, e["prompt"], e["chosen"], e["chosen_mask"])
            _write_row(batch, 2 * i + 1, e["prompt"], e["rejected"], e["rejected_mask"])
            pair_mask_B[i] = 1.0
        batch["pair_mask"] = pair_mask_B
        return batch


class _KTOBatch:
    """Up to B kept examples -> `[B, T]` rows, `label`, `example_mask`, and KL rows (prompt i, completion i + 1)."""

    def __init__(self, rows: int, seq_len: int, pad_id: int, max_prompt_len: int):
        self._rows = rows
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._max_prompt_len = max_prompt_len

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = _empty_rows(self._rows, self._seq_len, self._pad_id)
        kl = _empty_rows(self._rows, self._seq_len, self._pad_id)
        label_B = np.zeros((self._rows,), np.int32)
        example_mask_B = np.zeros((self._rows,), np.float32)
        n = len(elements)
        for i, e in enumerate(elements):
            _write_row(batch, i, e["prompt"], e["completion"], e["completion_mask"])
            label_B[i] = int(e["label"])
            example_mask_B[i] = 1.0
            other = elements[(i + 1) % n]
            prompt_P, [(ids_C, mask_C)], _ = _fit(
                e["prompt"], [(other["completion"], other["completion_mask"])],
                max_tokens=self._seq_len + 1, max_prompt_len=self._max_prompt_len,
            )
            _write_row(kl, i, prompt_P, ids_C, mask_C)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["label"] = label_B
        batch["example_mask"] = example_mask_B
        return batch


# ------------------------------------------------------------------------------------------------ iterator


class PreferenceIterator(SFTIterator):
    """Iterator over preference (or KTO) batches with exact checkpoint/resume: `SFTIterator`'s machinery.

    `get_state()` returns a JSON-serialisable dict (grain's iterator state, the counters, the pipeline settings);
    `set_state(state)` on an iterator built with the same settings resumes exactly. `stats` counts the examples
    (pairs, or KTO records) consumed to produce the batches returned so far: `PREFERENCE_STATS_KEYS`.
    """


def _build(
    kind: str,
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_prompt_len: int | None,
    overlong: str,
    shuffle: bool,
    seed: int,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    read_options: grain.ReadOptions | None,
) -> PreferenceIterator:
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise ValueError(f"source must support len() and indexing, got {type(source).__name__}")
    if len(source) == 0:
        raise ValueError("source is empty")
    if not isinstance(tokenizer, ChatTokenizer):
        raise ValueError(f"tokenizer must be a jaxpost ChatTokenizer (Tokenizer or HFTokenizer), got "
                         f"{type(tokenizer).__name__}")
    process_index, process_count, local = _check_batching(seq_len=seq_len, batch_size=batch_size, overlong=overlong,
                                                          num_epochs=num_epochs, process_index=process_index,
                                                          process_count=process_count)
    max_prompt_len = seq_len // 2 if max_prompt_len is None else max_prompt_len
    if not isinstance(max_prompt_len, int) or not 1 <= max_prompt_len <= seq_len:
        raise ValueError(f"max_prompt_len must be an int in [1, seq_len={seq_len}], got {max_prompt_len!r}")
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)

    paired = kind == "preference"
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(_TokenizeExample(source, tokenizer, paired=paired, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                 overlong=overlong))
    counter = _FilterAndCountIterDataset(ds.to_iter_dataset(read_options), stats_keys=PREFERENCE_STATS_KEYS,
                                         keep_keys=None)
    if paired:
        batch_fn: Callable = _PairBatch(local, seq_len, tokenizer.pad_id)
    else:
        batch_fn = _KTOBatch(local, seq_len, tokenizer.pad_id, max_prompt_len)
    batches = counter.batch(local, drop_remainder=False, batch_fn=batch_fn)
    config = {
        "kind": kind,
        "source_len": len(source),
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_prompt_len": max_prompt_len,
        "overlong": overlong,
        "shuffle": shuffle,
        "seed": seed,
        "num_epochs": num_epochs,
        "process_index": process_index,
        "process_count": process_count,
    }
    return PreferenceIterator(batches, counter, config)


_PIPELINE_ARGS_DOC = """
    Args:
      source: indexable with `len` yielding records (a list from `read_*_jsonl`, raw dicts, a `FunctionSource`);
        records are validated as they are read.
      tokenizer: formats prompts and completions with `encode_chat`.
      seq_len: T, positions per row (a sequence holds up to seq_len + 1 tokens).
      batch_size: global examples per step (pairs for DPO); each process gets `batch_size // process_count`.
      max_prompt_len: the least a truncated prompt keeps (tokens, bos included); default seq_len // 2 (TRL's
        512 of 1024). In [1, seq_len].
      overlong: examples with more than seq_len + 1 tokens: "truncate" (module docstring; counted in `truncated`),
        "drop" (counted in `dropped_overlong`), or "error" (raises `DataError` naming the example index).
      shuffle: global shuffle, a fresh order every epoch. seed: its seed.
      num_epochs: passes over the source; None repeats forever. With a finite number the last batch is padded to
        the full shape with empty examples (mask 0); nothing is dropped.
      process_index, process_count: this process's slice `[process_index::process_count]` of the example stream;
        default `jax.process_index()` / `jax.process_count()`.
      read_options: grain threading for tokenization (default 4 threads, 128 prefetched examples).

    Raises:
      ValueError: on invalid settings. DataError (while iterating): malformed records (naming the example index and
        the field), and overlong="error".
"""


def build_preference_iterator(
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_prompt_len: int | None = None,
    overlong: str = "truncate",
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> PreferenceIterator:
    """This process's iterator of paired batches: `[2B, T]` rows, chosen at 2i and rejected at 2i + 1, `pair_mask [B]`.

    B = batch_size // process_count pairs; keys in the module docstring. Rows are padded, one sequence per row.
    """
    return _build("preference", source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                  max_prompt_len=max_prompt_len, overlong=overlong, shuffle=shuffle, seed=seed,
                  num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                  read_options=read_options)


def build_kto_iterator(
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_prompt_len: int | None = None,
    overlong: str = "truncate",
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> PreferenceIterator:
    """This process's iterator of unpaired (KTO) batches, B = batch_size // process_count rows:

        inputs, targets, loss_mask, segment_ids, positions   [B, T]  example i: its prompt + its completion
        label          int32    [B]  1 desirable, 0 undesirable (0 on padding)
        example_mask   float32  [B]  1.0 real example, 0.0 padding of a final short batch
        kl_inputs, kl_targets, kl_loss_mask, kl_segment_ids, kl_positions   [B, T]

    KL rows estimate KTO's reference point z0 = KL(pi || ref) on mismatched pairs, as TRL's KTOTrainer does:
    KL row i is prompt i followed by the completion of example (i + 1) mod n, n the number of real examples in this
    process's batch (TRL shifts by one the other way; any derangement serves). The mismatched sequence is truncated
    by the same rule as the rows (not counted in `stats`); with n = 1 the KL row is the example itself. Padding rows
    are empty; use `example_mask` as the KL mask (`kto_kl_sums(..., mask_B=example_mask)`).
    """
    return _build("kto", source, tokenizer, seq_len=seq_len, batch_size=batch_size, max_prompt_len=max_prompt_len,
                  overlong=overlong, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                  process_index=process_index, process_count=process_count, read_options=read_options)


build_preference_iterator.__doc__ += _PIPELINE_ARGS_DOC
build_kto_iterator.__doc__ += _PIPELINE_ARGS_DOC


# ------------------------------------------------------------------------------------------------ built-in sets

#: The kinds of wrong answer `arithmetic_near_miss` makes.
NEAR_MISS_KINDS: tuple[str, ...] = ("off_by_one", "off_by_ten", "dropped_digit", "swapped_digits", "sign_error")


def arithmetic_near_miss(answer: int | str, rng: random.Random) -> tuple[int, str]:
    """A plausible wrong integer for `answer` and its kind (one of `NEAR_MISS_KINDS`), deterministic in `rng`.

    The kind is drawn uniformly among those that apply: off by one (+-1), off by ten (+-10), a dropped digit (needs
    two digits or more), two adjacent different digits swapped (when that gives no leading zero), a sign error
    (non-zero answers). The result never equals `answer`.
    """
    a = int(answer)
    sign, digits = (-1 if a < 0 else 1), str(abs(a))
    swaps = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and not (i == 0 and digits[1] == "0")]
    kinds = ["off_by_one", "off_by_ten"]
    kinds += ["dropped_digit"] if len(digits) >= 2 else []
    kinds += ["swapped_digits"] if swaps else []
    kinds += ["sign_error"] if a != 0 else []
    kind = rng.choice(kinds)
    if kind == "off_by_one":
        wrong = a + rng.choice((-1, 1))
    elif kind == "off_by_ten":
        wrong = a + rng.choice((-10, 10))
    elif kind == "dropped_digit":
        i = rng.randrange(len(digits))
        wrong = sign * int(digits[:i] + digits[i + 1 :])
    elif kind == "swapped_digits":
        i = rng.choice(swaps)
        wrong = sign * int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :])
    else:
        wrong = -a
    if wrong == a:
        raise AssertionError(f"near miss {wrong} of kind {kind} equals the answer")
    return wrong, kind


def arithmetic_preference_record(task: Task, split: str, index: int, *, seed: int = 0) -> dict[str, Any]:
    """Pair for problem `index` of `split`: the gold completion vs a near miss in the same format.

    Keys `prompt`, `chosen`, `rejected` (strings), `answer`, and `near_miss` (its kind). Deterministic in (task,
    split, index, seed); `seed` only picks the near miss. Works for any task with integer answers.
    """
    example = task.example(split, index)
    answer, chosen = example["answer"], example["completion"]
    rng = random.Random(f"near-miss/{seed}/{split}/{int(index)}")
    wrong, kind = arithmetic_near_miss(answer, rng)
    rejected = chosen.replace(answer, str(wrong), 1) if answer in chosen else str(wrong)
    if not task.check(chosen, answer) or task.check(rejected, answer):
        raise AssertionError(f"{task!r} {split}[{index}]: the checker does not separate {chosen!r} from {rejected!r}")
    return {"prompt": example["prompt"], "chosen": chosen, "rejected": rejected, "answer": answer, "near_miss": kind}


def arithmetic_preference_records(task: Task, split: str, n: int, *, seed: int = 0, start: int = 0
                                  ) -> list[dict[str, Any]]:
    """Pairs for problems `start .. start + n - 1` of `split` (see `arithmetic_preference_record`)."""
    return [arithmetic_preference_record(task, split, i, seed=seed) for i in range(start, start + n)]


def arithmetic_preference_source(task: Task, split: str, *, seed: int = 0, length: int = DEFAULT_SOURCE_LENGTH
                                 ) -> FunctionSource:
    """A grain random-access source whose item i is `arithmetic_preference_record(task, split, i, seed=seed)`."""
    return FunctionSource(functools.partial(arithmetic_preference_record, task, split, seed=seed), length)


def _sample_rewards(prompts: Sequence[Any], samples: Sequence[Sequence[str]], rewards_or_check: Any,
                    answers: Sequence[Any] | None) -> list[list[float]]:
    if len(samples) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but samples for {len(samples)}")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    for i, group in enumerate(samples):
        if isinstance(group, str) or any(not isinstance(s, str) for s in group):
            raise ValueError(f"samples[{i}] must be a list of completion strings")
    if callable(rewards_or_check):
        if answers is None:
            raise ValueError("a checker is called as check(completion, answer): pass answers=")
        return [[float(bool(rewards_or_check(s, answers[i]))) for s in group] for i, group in enumerate(samples)]
    rewards = rewards_or_check
    if len(rewards) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but rewards for {len(rewards)}")
    out = []
    for i, (group, r) in enumerate(zip(samples, rewards)):
        r = [float(x) for x in r]
        if len(r) != len(group) or not all(math.isfinite(x) for x in r):
            raise ValueError(f"rewards[{i}] must be {len(group)} finite numbers, got {r}")
        out.append(r)
    return out


def preference_records_from_samples(
    prompts: Sequence[str | Messages],
    samples: Sequence[Sequence[str]],
    rewards_or_check: Callable[[str, Any], bool] | Sequence[Sequence[float]],
    *,
    answers: Sequence[Any] | None = None,
    max_pairs_per_prompt: int = 1,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Turns sampled completions into preference pairs: a correct (higher-reward) sample over an incorrect one.

    Args:
      prompts: N prompts (strings or message lists). samples: N lists of completion strings (G per prompt; G may vary).
      rewards_or_check: a checker called as `check(completion, answers[i])` (e.g. `task.check`; correct = 1, wrong
        = 0), or N lists of numeric rewards shaped like `samples`.
      answers: N reference answers, required with a checker; copied into the records as `answer`.
      max_pairs_per_prompt: pairs taken per prompt. Samples are ranked by reward (ties broken by a shuffle seeded
        by `seed` and the prompt index), and the k-th best is paired with the k-th worst while its reward is strictly
        higher, so with a checker a prompt with c correct and w wrong samples gives min(c, w, max) pairs.
      seed: tie-breaking seed.

    Returns:
      (records, stats): records `{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"[, "answer"]}`
      in prompt order; stats `{"prompts", "samples", "pairs", "skipped"}`, skipped = prompts without a pair (all
      samples equally rewarded, e.g. all correct or all wrong, or fewer than two samples).
    """
    if not isinstance(max_pairs_per_prompt, int) or max_pairs_per_prompt <= 0:
        raise ValueError(f"max_pairs_per_prompt must be a positive int, got {max_pairs_per_prompt!r}")
    rewards = _sample_rewards(prompts, samples, rewards_or_check, answers)
    records: list[dict[str, Any]] = []
    skipped = 0
    for i, (prompt, group, r) in enumerate(zip(prompts, samples, rewards)):
        order = list(range(len(group)))
        random.Random(f"sample-pairs/{seed}/{i}").shuffle(order)
        order.sort(key=lambda j: -r[j])
        made = 0
        for k in range(min(max_pairs_per_prompt, len(order) // 2)):
            best, worst = order[k], order[len(order) - 1 - k]
            if r[best] <= r[worst]:
                break
            record = {"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                      "chosen_reward": r[best], "rejected_reward": r[worst]}
            if answers is not None:
                record["answer"] = answers[i]
            records.append(record)
            made += 1
        skipped += made == 0
    stats = {"prompts": len(prompts), "samples": sum(len(g) for g in samples), "pairs": len(records),
             "skipped": skipped}
    return records, stats


def kto_records_from_samples(
    prompts: Sequence[str | Messages],
    samples: Sequence[Sequence[str]],
    rewards_or_check: Callable[[str, Any], bool] | Sequence[Sequence[float]],
    *,
    answers: Sequence[Any] | None = None,
    threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Labels every sampled completion for KTO: desirable iff its reward >= `threshold` (a checker gives 1 / 0).

    Arguments as `preference_records_from_samples`. Returns (records `{"prompt", "completion", "label", "reward"
    [, "answer"]}` in prompt then sample order, stats `{"prompts", "samples", "desirable", "undesirable"}`). Unlike
    pairs, nothing is skipped: prompts the model always (or never) solves still give examples. Balance the two
    classes with KTO's desirable/undesirable weights (TRL suggests weight x count ratios in [1, 4/3]).
    """
    rewards = _sample_rewards(prompts, samples, rewards_or_check, answers)
    records = []
    for i, (prompt, group, r) in enumerate(zip(prompts, samples, rewards)):
        for completion, reward in zip(group, r):
            record = {"prompt": prompt, "completion": completion, "label": reward >= threshold, "reward": reward}
            if answers is not None:
                record["answer"] = answers[i]
            records.append(record)
    desirable = sum(r["label"] for r in records)
    stats = {"prompts": len(prompts), "samples": len(records), "desirable": desirable,
             "undesirable": len(records) - desirable}
    return records, stats


def kto_records_from_pairs(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Unpairs paired records: each gives `{"prompt", "completion": chosen, "label": True}` then the rejected one with
    `label` False (other keys are copied to both). E.g. `kto_records_from_pairs(arithmetic_preference_records(...))`.
    The two records of a pair are adjacent: keep the KTO pipeline's shuffle on, or the KL row of a chosen example
    pairs its prompt with its own rejected completion rather than another prompt's.
    """
    out = []
    for record in records:
        if "prompt" not in record:  # the implicit-prompt form: split the conversations first
            record = normalize_preference_record(record)
        extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
        for field, label in (("chosen", True), ("rejected", False)):
            out.append({**extra, "prompt": record["prompt"], "completion": record[field], "label": label})
    return out
