"""Grain pipelines: packed (or padded) SFT batches with loss masks, and prompt batches for evaluation.

SFT pipeline (`build_sft_iterator`), per process:

    MapDataset.range(len(source))          source indices, so errors can name the example
      .shuffle(seed)                       a fresh order every epoch (grain folds the epoch into the seed)
      .repeat(num_epochs)                  None = forever
      [process_index::process_count]       each process reads a disjoint slice
      .map(_TokenizeExample)               encode_chat -> next-token arrays; tags (does not filter) drops
      .to_iter_dataset()                   threaded prefetch
      _FilterAndCountIterDataset           drops tagged examples; counts them in its checkpointable state
      FirstFitPackIterDataset | pad        several documents per row with segment ids / one document per row
      .batch(rows)                         rows = batch_size // process_count; a short last batch is padded

A document with chat ids `x` and loss mask `m` (length L) becomes `inputs = x[:-1]`, `targets = x[1:]`,
`loss_mask = m[1:]` (length L - 1): packed documents never predict across a boundary, because the last target of a
document is its own final token.

Batch format (numpy, all `[rows, seq_len]`):

    inputs       int32    token ids fed to the model (pad_id on padding)
    targets      int32    next-token ids (pad_id on padding)
    loss_mask    float32  1.0 where the target is trained on (assistant content and the eos closing its turn)
    segment_ids  int32    1, 2, ... per document within a row; 0 on padding
    positions    int32    0, 1, ... within each document; 0 on padding
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxpost.batch import ROW_KEYS
from jaxpost.data.sources import DataError, encode_checked, location, normalize_record
from jaxpost.tokenizers import ChatTokenizer, Tokenizer

__all__ = ["STATS_KEYS", "SFTIterator", "build_prompt_batches", "build_sft_iterator"]

#: Counters reported by `SFTIterator.stats` (and stored in its state).
STATS_KEYS: tuple[str, ...] = (
    "examples_seen",
    "truncated",
    "dropped_overlong",
    "dropped_empty",
    "dropped_no_assistant",
)
_OVERLONG_POLICIES = ("truncate", "drop", "error")
_EMPTY_POLICIES = ("drop", "keep", "error")
_STATE_VERSION = 1

# Tags set by `_TokenizeExample` and consumed by `_FilterAndCountIterator`.
_KEEP = "ok"
_KEEP_TRUNCATED = "truncated"


# ------------------------------------------------------------------------------------------------ tokenize stage


class _TokenizeExample:
    """Source index -> next-token arrays of one document, tagged with what the policies decided.

    Returns `{"status", "index"}` plus, for kept documents, `inputs`/`targets` (int32) and `loss_mask` (float32)
    of length <= seq_len. Status is "ok", "truncated", or the `STATS_KEYS` counter of a drop. Raises `DataError`
    for malformed records and for the "error" policies.
    """

    def __init__(self, source: Any, tokenizer: Tokenizer, *, seq_len: int, overlong: str, on_empty: str):
        self._source = source
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._overlong = overlong
        self._on_empty = on_empty

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            record = normalize_record(self._source[index])
        except DataError as e:
            raise DataError(f"{location(self._source, index)}: {e}") from None
        messages = record["messages"]
        num_assistant = sum(m["role"] == "assistant" for m in messages)
        if num_assistant == 0:
            return {"status": "dropped_no_assistant", "index": index}

        ids, mask = encode_checked(self._tokenizer, messages, where=lambda: location(self._source, index))
        # Every assistant turn contributes its content tokens plus one closing eos to the mask.
        if sum(mask) == num_assistant:
            if self._on_empty == "error":
                raise DataError(
                    f"{location(self._source, index)}: the assistant turns are empty (no completion tokens); "
                    "on_empty='error'"
                )
            if self._on_empty == "drop":
                return {"status": "dropped_empty", "index": index}

        ids_L = np.asarray(ids, dtype=np.int32)
        mask_L = np.asarray(mask, dtype=np.float32)
        inputs_N, targets_N, loss_mask_N = ids_L[:-1], ids_L[1:], mask_L[1:]
        status = _KEEP
        num_positions = inputs_N.shape[0]
        if num_positions > self._seq_len:
            if self._overlong == "error":
                raise DataError(
                    f"{location(self._source, index)}: {len(ids)} tokens give {num_positions} training positions > "
                    f"seq_len={self._seq_len}; overlong='error' (use 'truncate' or 'drop', or raise seq_len)"
                )
            if self._overlong == "drop":
                return {"status": "dropped_overlong", "index": index}
            inputs_N, targets_N, loss_mask_N = (a[: self._seq_len] for a in (inputs_N, targets_N, loss_mask_N))
            if not loss_mask_N.any():
                return {"status": "dropped_overlong", "index": index}
            status = _KEEP_TRUNCATED
        return {"status": status, "index": index, "inputs": inputs_N, "targets": targets_N, "loss_mask": loss_mask_N}


# ------------------------------------------------------------------------------------------------ filter + count stage


class _FilterAndCountIterator(grain.DatasetIterator):
    """Drops tagged examples and counts them; the counters are part of the (checkpointable) iterator state.

    Elements carry a "status": "ok" / "truncated" pass (the latter counted), any other status names the counter of
    a drop. Passing elements lose their status; with `keep_keys` only those fields are passed on."""

    def __init__(self, parent: grain.DatasetIterator, stats_keys: tuple[str, ...],
                 keep_keys: tuple[str, ...] | None):
        super().__init__(parent)
        self._stats_keys, self._keep_keys = stats_keys, keep_keys
        self.counts = dict.fromkeys(stats_keys, 0)

    def __next__(self) -> dict[str, Any]:
        while True:
            element = dict(next(self._parent))
            self.counts["examples_seen"] += 1
            status = element.pop("status")
            if status in (_KEEP, _KEEP_TRUNCATED):
                self.counts["truncated"] += int(status == _KEEP_TRUNCATED)
                return element if self._keep_keys is None else {k: element[k] for k in self._keep_keys}
            self.counts[status] += 1

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts = {k: int(state["counts"][k]) for k in self._stats_keys}

    def __str__(self) -> str:
        return "FilterAndCountIterator"


class _FilterAndCountIterDataset(grain.IterDataset):
    """See `_FilterAndCountIterator`. Remembers its latest iterator so the iterator wrapper (`SFTIterator`, the
    preference iterators) can read the counters."""

    def __init__(self, parent: grain.IterDataset, *, stats_keys: tuple[str, ...] = STATS_KEYS,
                 keep_keys: tuple[str, ...] | None = ("inputs", "targets", "loss_mask")):
        super().__init__(parent)
        self.stats_keys, self._keep_keys = stats_keys, keep_keys
        self.latest_iterator: _FilterAndCountIterator | None = None

    def __iter__(self) -> _FilterAndCountIterator:
        iterator = _FilterAndCountIterator(self._parent.__iter__(), self.stats_keys, self._keep_keys)
        self.latest_iterator = iterator
        return iterator

    def __str__(self) -> str:
        return "FilterAndCountIterDataset"


# ------------------------------------------------------------------------------------------------ row/batch maps


class _RenamePackedRow:
    """FirstFitPackIterDataset row -> the batch keys (segment ids/positions are those of `inputs`)."""

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "inputs": row["inputs"],
            "targets": row["targets"],
            "loss_mask": row["loss_mask"],
            "segment_ids": row["inputs_segment_ids"],
            "positions": row["inputs_positions"],
        }


class _PadRow:
    """One document -> one right-padded row (segment id 1)."""

    def __init__(self, seq_len: int, pad_id: int):
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __call__(self, doc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = doc["inputs"].shape[0]
        row = _empty_rows(1, self._seq_len, self._pad_id)
        row = {k: v[0] for k, v in row.items()}
        row["inputs"][:n] = doc["inputs"]
        row["targets"][:n] = doc["targets"]
        row["loss_mask"][:n] = doc["loss_mask"]
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n, dtype=np.int32)
        return row


class _PadBatch:
    """Pads a short (final) batch with empty rows to `rows`, so every batch has a static shape."""

    def __init__(self, rows: int, seq_len: int, pad_id: int):
        self._rows = rows
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self._rows - batch["inputs"].shape[0]
        if missing == 0:
            return batch
        filler = _empty_rows(missing, self._seq_len, self._pad_id)
        return {k: np.concatenate([batch[k], filler[k]], axis=0) for k in ROW_KEYS}


def _empty_rows(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "inputs": np.full((rows, seq_len), pad_id, dtype=np.int32),
        "targets": np.full((rows, seq_len), pad_id, dtype=np.int32),
        "loss_mask": np.zeros((rows, seq_len), dtype=np.float32),
        "segment_ids": np.zeros((rows, seq_len), dtype=np.int32),
        "positions": np.zeros((rows, seq_len), dtype=np.int32),
    }


# ------------------------------------------------------------------------------------------------ iterator


class SFTIterator:
    """Iterator over SFT batches (see the module docstring for the format) with exact checkpoint/resume.

    `get_state()` returns a JSON-serialisable dict (grain's iterator state, the counters, and the pipeline
    settings); `set_state(state)` on an iterator built with the same settings resumes exactly: the following
    batches and counters equal those of an uninterrupted iterator.

    `stats` counts the examples the pipeline has consumed to produce the batches returned so far (packing reads a
    little ahead: up to `num_packing_bins` rows' worth of documents).
    """

    def __init__(self, dataset: grain.IterDataset, counter: _FilterAndCountIterDataset, config: dict[str, Any]):
        self._iterator = iter(dataset)
        self._counter = counter.latest_iterator
        if self._counter is None:
            raise AssertionError("the counting stage did not create an iterator")
        self._config = config
        self._stats_keys = counter.stats_keys
        self._stats = dict.fromkeys(self._stats_keys, 0)

    def __iter__(self) -> SFTIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._stats = dict(self._counter.counts)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def config(self) -> dict[str, Any]:
        """The pipeline settings this iterator was built with (also stored in its state)."""
        return dict(self._config)

    def get_state(self) -> dict[str, Any]:
        state = {
            "version": _STATE_VERSION,
            "config": self._config,
            "stats": self._stats,
            "grain": self._iterator.get_state(),
        }
        # A JSON round trip both checks serialisability and detaches the state from live objects.
        return json.loads(json.dumps(state))

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a {type(self).__name__} state of version {_STATE_VERSION}: {str(state)[:200]}")
        saved = state["config"]
        differing = sorted(k for k in set(saved) | set(self._config) if saved.get(k) != self._config.get(k))
        if differing:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {self._config.get(k)!r}" for k in differing)
            raise ValueError(f"cannot resume: the pipeline settings differ from the saved state ({details})")
        self._iterator.set_state(state["grain"])
        self._stats = {k: int(state["stats"][k]) for k in self._stats_keys}

    def close(self) -> None:
        """Releases grain's prefetch threads."""
        self._iterator.close()


def _check_batching(*, seq_len, batch_size, overlong, num_epochs, process_index, process_count
                    ) -> tuple[int, int, int]:
    """Validates the settings every pipeline builder shares; returns (process_index, process_count, rows per
    process), the process defaults taken from JAX."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if overlong not in _OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {_OVERLONG_POLICIES}, got {overlong!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(process_count, int) or process_count <= 0:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    return process_index, process_count, batch_size // process_count


def build_sft_iterator(
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = True,
    overlong: str = "truncate",
    on_empty: str = "drop",
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_packing_bins: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> SFTIterator:
    """Builds this process's iterator of SFT batches `[batch_size // process_count, seq_len]`.

    Args:
      source: indexable with `len`, yielding `{"messages": [...]}` or `{"prompt", "completion"}` records (a list
        from `read_jsonl`, a task's `source(split)`, ...).
      tokenizer: formats records with `encode_chat`.
      seq_len: tokens per row.
      batch_size: global rows per step; each process gets `batch_size // process_count` rows.
      packing: first-fit pack several documents per row (segment ids 1, 2, ...); else one document per row.
      overlong: documents with more than `seq_len` training positions: "truncate" keeps the first `seq_len`
        (counted in `truncated`; one with no loss token left is dropped and counted in `dropped_overlong`),
        "drop" drops and counts them, "error" raises `DataError` naming the example index.
      on_empty: records whose assistant turns are all empty: "drop" (counted in `dropped_empty`), "keep" (trained
        on the closing eos only), "error". Records without an assistant turn are always dropped and counted in
        `dropped_no_assistant`.
      shuffle: global shuffle, a fresh order every epoch. seed: shuffle (and bin shuffle) seed.
      num_epochs: passes over the source; None repeats forever. With a finite number the last batch is padded
        with empty rows (loss_mask 0, segment id 0) to the full shape.
      process_index, process_count: this process's slice `[process_index::process_count]` of the example stream;
        default `jax.process_index()` / `jax.process_count()`.
      num_packing_bins: rows packed together before they are emitted (default: the per-process rows). More bins
        pack tighter but mix documents over a longer stretch of the stream.
      read_options: grain threading for tokenization (default 4 threads, 128 prefetched examples).

    Raises:
      ValueError: on invalid settings. DataError (while iterating): malformed records, and the "error" policies.
    """
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise ValueError(f"source must support len() and indexing, got {type(source).__name__}")
    if len(source) == 0:
        raise ValueError("source is empty")
    if not isinstance(tokenizer, ChatTokenizer):
        raise ValueError(f"tokenizer must be a jaxpost ChatTokenizer (Tokenizer or HFTokenizer), got "
                         f"{type(tokenizer).__name__}")
    if on_empty not in _EMPTY_POLICIES:
        raise ValueError(f"on_empty must be one of {_EMPTY_POLICIES}, got {on_empty!r}")
    process_index, process_count, rows = _check_batching(seq_len=seq_len, batch_size=batch_size, overlong=overlong,
                                                         num_epochs=num_epochs, process_index=process_index,
                                                         process_count=process_count)
    num_packing_bins = rows if num_packing_bins is None else num_packing_bins
    if not isinstance(num_packing_bins, int) or num_packing_bins <= 0:
        raise ValueError(f"num_packing_bins must be a positive int, got {num_packing_bins!r}")
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)

    pad_id = tokenizer.pad_id
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(_TokenizeExample(source, tokenizer, seq_len=seq_len, overlong=overlong, on_empty=on_empty))
    counter = _FilterAndCountIterDataset(ds.to_iter_dataset(read_options))
    if packing:
        length_struct = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
        packed = grain.experimental.FirstFitPackIterDataset(
            counter,
            length_struct=length_struct,
            num_packing_bins=num_packing_bins,
            seed=seed,
            shuffle_bins=shuffle,
            # Segment ids and positions are computed once, for `inputs`.
            meta_features=("targets", "loss_mask"),
            padding_struct={"inputs": pad_id, "targets": pad_id, "loss_mask": 0.0},
        )
        rows_ds = packed.map(_RenamePackedRow())
    else:
        rows_ds = counter.map(_PadRow(seq_len, pad_id))
    batches = rows_ds.batch(rows, drop_remainder=False).map(_PadBatch(rows, seq_len, pad_id))

    config = {
        "source_len": len(source),
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "packing": packing,
        "overlong": overlong,
        "on_empty": on_empty,
        "shuffle": shuffle,
        "seed": seed,
        "num_epochs": num_epochs,
        "process_index": process_index,
        "process_count": process_count,
        "num_packing_bins": num_packing_bins,
    }
    return SFTIterator(batches, counter, config)


# ------------------------------------------------------------------------------------------------ prompt batches


def _prompt_messages_and_answer(example: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """Prompt messages (a chat without its final assistant turn) and the reference answer of an example."""
    record = normalize_record(example)
    messages = record["messages"]
    reference = None
    if messages[-1]["role"] == "assistant":
        reference = messages[-1]["content"]
        messages = messages[:-1]
    if not messages:
        raise DataError("no prompt: the only message is an assistant turn")
    answer = example.get("answer", example.get("completion", reference))
    return messages, answer


def build_prompt_batches(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_prompt_len: int,
) -> list[dict[str, Any]]:
    """Encodes evaluation prompts (`encode_chat(..., add_generation_prompt=True)`) into fixed-shape batches.

    An example is a `{"messages": [...]}` or `{"prompt", ...}` record; a final assistant message is the reference
    and is left out of the prompt. The answer is `example["answer"]`, else `example["completion"]`, else the left-out
    assistant content (None if none).

    Returns a list of batches, each a dict with
      tokens   int32 [B, max_prompt_len]  prompt ids, right-padded with pad_id
      lengths  int32 [B]                  prompt lengths
      valid    bool  [B]                  False on filler rows of the last batch (copies of its first row)
      indices  int32 [B]                  index of each row's example in `examples` (-1 on filler rows)
      answers  list[B]                    reference answers (None on filler rows)
    B = batch_size, so every batch has the same shape.

    Raises:
      DataError: naming the example index, for malformed examples and prompts longer than `max_prompt_len`.
    """
    for name, value in (("batch_size", batch_size), ("max_prompt_len", max_prompt_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    encoded = []
    for index, example in enumerate(examples):
        try:
            messages, answer = _prompt_messages_and_answer(example)
        except DataError as e:
            raise DataError(f"{location(examples, index)}: {e}") from None
        ids, _ = encode_checked(tokenizer, messages, add_generation_prompt=True,
                                where=lambda: location(examples, index))
        if len(ids) > max_prompt_len:
            raise DataError(
                f"{location(examples, index)}: prompt has {len(ids)} tokens > max_prompt_len={max_prompt_len}; "
                "raise max_prompt_len or shorten the prompt"
            )
        encoded.append((index, ids, answer))

    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        tokens_BP = np.full((batch_size, max_prompt_len), tokenizer.pad_id, dtype=np.int32)
        lengths_B = np.zeros((batch_size,), dtype=np.int32)
        valid_B = np.zeros((batch_size,), dtype=bool)
        indices_B = np.full((batch_size,), -1, dtype=np.int32)
        answers: list[Any] = [None] * batch_size
        for row, (index, ids, answer) in enumerate(chunk):
            tokens_BP[row, : len(ids)] = ids
            lengths_B[row] = len(ids)
            valid_B[row] = True
            indices_B[row] = index
            answers[row] = answer
        tokens_BP[len(chunk) :] = tokens_BP[0]
        lengths_B[len(chunk) :] = lengths_B[0]
        batches.append(
            {"tokens": tokens_BP, "lengths": lengths_B, "valid": valid_B, "indices": indices_B, "answers": answers}
        )
    return batches

