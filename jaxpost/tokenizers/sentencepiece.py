"""SentencePiece tokenizer: in-memory training, loading, and chat formatting with loss masks.

A `Tokenizer` wraps a `sentencepiece.SentencePieceProcessor` and adds the conventions the rest of jaxpost relies
on: explicit pad/bos/eos ids (never -1), the generation stop ids, and `encode_chat`, which lays out a conversation as

    [bos] <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content [eos] ...

with a loss mask that is 1 exactly on the assistant content tokens and on the eos that closes each assistant turn.

`train_tokenizer` trains a BPE model in memory (no temporary files) with fixed ids pad=0, bos=1, eos=2, unk=3 and the
chat role markers as single user-defined pieces; it is deterministic: the same texts and options give the same model
bytes.

`Tokenizer` implements `jaxpost.tokenizers.base.ChatTokenizer`.
"""

from __future__ import annotations

import io
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sentencepiece as spm

from jaxpost.tokenizers.base import ChatTokenizer, validate_messages

#: Ids fixed by `train_tokenizer`.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


#: Role -> marker text that opens a message of that role.
ROLE_MARKERS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

#: Marker that closes a system or user message (assistant messages are closed by eos instead).
END_MARKER = "<|end|>"

#: The user-defined symbols `train_tokenizer` adds by default: each becomes one token.
CHAT_SYMBOLS: tuple[str, ...] = (*ROLE_MARKERS.values(), END_MARKER)

# Special piece texts used by `train_tokenizer`.
_SPECIAL_PIECES = {"pad_piece": "<pad>", "bos_piece": "<s>", "eos_piece": "</s>", "unk_piece": "<unk>"}


class Tokenizer(ChatTokenizer):
    """A SentencePiece model plus the special ids and chat layout jaxpost uses.

    Build one with `Tokenizer.load(path)`, `Tokenizer.from_serialized(model_bytes)` or `train_tokenizer(...)`.

    Special ids are explicit integers. A model without a pad piece (many released Llama-style models) needs a
    `pad_id=` override, typically `eos_id` or `unk_id`: pad positions are masked out of every loss, so the choice only
    matters for readability. `bos_id`/`eos_id` can be overridden the same way.

    Chat role markers (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`) are used as single tokens when the model
    has them as pieces (models from `train_tokenizer` do). With any other SentencePiece model they are encoded as
    plain text, which is still a consistent (if longer) chat format.

    Instances are picklable (through the serialized model), so they can be used inside grain worker processes.
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        *,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        self._sp = processor
        self._vocab_size = int(processor.vocab_size())
        self._pad_id = self._resolve_special("pad", processor.pad_id(), pad_id)
        self._bos_id = self._resolve_special("bos", processor.bos_id(), bos_id)
        self._eos_id = self._resolve_special("eos", processor.eos_id(), eos_id)
        self._unk_id = int(processor.unk_id())
        self._stop_ids = (self._eos_id,)  # the eos that closes an assistant turn
        self._special_ids = frozenset({self._pad_id, self._bos_id, self._eos_id})
        # Role markers: a single id where the model has the marker as a piece, else its text encoding.
        self._marker_ids: dict[str, tuple[int, ...]] = {
            text: self._marker_to_ids(text) for text in (*ROLE_MARKERS.values(), END_MARKER)
        }

    # ----------------------------------------------------------------------------------------------- construction

    def _resolve_special(self, name: str, model_id: int, override: int | None) -> int:
        if override is not None:
            try:
                override_id = operator.index(override)
            except TypeError:
                raise ValueError(f"{name}_id must be an int, got {override!r}") from None
            if not 0 <= override_id < self._vocab_size:
                raise ValueError(f"{name}_id={override_id} is out of range for a vocabulary of {self._vocab_size}")
            return override_id
        if model_id < 0:
            raise ValueError(
                f"this SentencePiece model has no {name} piece ({name}_id() is -1); pass an explicit "
                f"`{name}_id=` (for pad, eos_id or unk_id is a good choice: pad positions are never trained on)"
            )
        return int(model_id)

    def _marker_to_ids(self, text: str) -> tuple[int, ...]:
        piece_id = int(self._sp.PieceToId(text))
        if piece_id != self._unk_id and self._sp.IdToPiece(piece_id) == text:
            return (piece_id,)
        return tuple(self.encode(text))

    @classmethod
    def from_serialized(
        cls, model_bytes: bytes, *, pad_id: int | None = None, bos_id: int | None = None, eos_id: int | None = None
    ) -> Tokenizer:
        """Builds a tokenizer from the bytes of a SentencePiece `.model` file."""
        if not isinstance(model_bytes, (bytes, bytearray)):
            raise TypeError(f"model_bytes must be bytes, got {type(model_bytes).__name__}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(model_bytes))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"could not parse a SentencePiece model from {len(model_bytes)} bytes: {e}") from e
        return cls(processor, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> Tokenizer:
        """Loads a SentencePiece `.model` file. See the class docstring for the special-id overrides."""
        with open(path, "rb") as f:
            model_bytes = f.read()
        try:
            return cls.from_serialized(model_bytes, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Writes the SentencePiece `.model` bytes to `path` (the special-id overrides are not stored)."""
        with open(path, "wb") as f:
            f.write(self.serialized)

    @property
    def serialized(self) -> bytes:
        """The SentencePiece model proto, i.e. the bytes of a `.model` file."""
        return self._sp.serialized_model_proto()

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.serialized, "pad_id": self._pad_id, "bos_id": self._bos_id, "eos_id": self._eos_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(state["model"])
        self.__init__(processor, pad_id=state["pad_id"], bos_id=state["bos_id"], eos_id=state["eos_id"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, unk_id={self.unk_id})"
        )

    # ----------------------------------------------------------------------------------------------- properties

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying `SentencePieceProcessor`."""
        return self._sp

    def marker_ids(self, marker: str) -> tuple[int, ...]:
        """Token ids of a chat marker (`ROLE_MARKERS[role]` or `END_MARKER`): one id when the model has the piece."""
        try:
            return self._marker_ids[marker]
        except KeyError:
            raise ValueError(f"unknown chat marker {marker!r}; known: {sorted(self._marker_ids)}") from None

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    # ----------------------------------------------------------------------------------------------- encode/decode

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids, without bos/eos."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping pad/bos/eos ids. It does not stop at the first eos: cut before calling."""
        ids_list = [int(i) for i in ids]
        for i in ids_list:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self._vocab_size}")
        return self._sp.DecodeIds([i for i in ids_list if i not in self._special_ids])

    # ----------------------------------------------------------------------------------------------- chat

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Encodes a conversation; returns `(ids, loss_mask)` of equal length.

        Layout: `[bos]`, then per message its role marker, its encoded content, and `<|end|>` for system/user
        messages or `eos` for assistant messages. `loss_mask` is 1 exactly on assistant content tokens and on the
        eos closing an assistant turn, 0 elsewhere. With `add_generation_prompt=True` the `<|assistant|>` marker is
        appended (mask 0) so that a model continues with the answer.

        Each piece is encoded separately and the ids concatenated, so the mask is exact at token boundaries.

        Raises:
          ValueError: when `messages` is not a list of `{"role", "content"}` dicts with a known role and string
            content; the message names the index and field.
        """
        validate_messages(messages)
        ids = [self._bos_id]
        mask = [0]
        end_ids = self._marker_ids[END_MARKER]
        for message in messages:
            role = message["role"]
            marker = self._marker_ids[ROLE_MARKERS[role]]
            content_ids = self.encode(message["content"])
            ids.extend(marker)
            mask.extend([0] * len(marker))
            ids.extend(content_ids)
            if role == "assistant":
                mask.extend([1] * len(content_ids))
                ids.append(self._eos_id)
                mask.append(1)
            else:
                mask.extend([0] * len(content_ids))
                ids.extend(end_ids)
                mask.extend([0] * len(end_ids))
        if add_generation_prompt:
            marker = self._marker_ids[ROLE_MARKERS["assistant"]]
            ids.extend(marker)
            mask.extend([0] * len(marker))
        return ids, mask


# --------------------------------------------------------------------------------------------------- training


_TOO_SMALL_RE = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_LARGE_RE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    user_defined_symbols: Sequence[str] = CHAT_SYMBOLS,
    split_digits: bool = True,
    byte_fallback: bool = False,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = False,
    add_dummy_prefix: bool = False,
    seed: int = 0,
) -> Tokenizer:
    """Trains a SentencePiece model in memory and returns it as a `Tokenizer`.

    Ids are fixed: pad=0, bos=1, eos=2, unk=3, then `user_defined_symbols` (by default the chat markers, each a
    single token), then the learned pieces. The text is not normalised (`identity` rule, whitespace kept), so
    `decode(encode(text)) == text` for text made of characters seen in training.

    BPE is the default: it trains in milliseconds on thousands of short lines and learns useful merges on small
    corpora where unigram often keeps only single characters. Training runs on one thread and with a fixed random
    seed, so the same inputs give byte-identical models.

    Args:
      texts: training sentences (empty strings are skipped; newlines inside a text are kept as characters).
      vocab_size: target vocabulary size, specials included. With `hard_vocab_limit=False` (default) the model may
        come out smaller when the text does not support that many pieces: read `tokenizer.vocab_size`.
      user_defined_symbols: strings that always become one token.
      split_digits: split numbers into single digits (good for arithmetic).
      byte_fallback: encode unseen characters as UTF-8 byte pieces instead of unk; needs 256 more ids.
      model_type: "bpe" (default) or "unigram" (or "char"/"word").
      character_coverage: fraction of characters covered by the vocabulary (1.0 = all seen characters).
      hard_vocab_limit: require exactly `vocab_size` pieces (sentencepiece errors if the text cannot support them).
      add_dummy_prefix: prepend a space before encoding (the Llama-2 convention). Off by default, so that pieces
        encoded separately concatenate without extra spaces.
      seed: seed of sentencepiece's random generator (process-global in sentencepiece).

    Raises:
      ValueError: on empty or non-string input, or when `vocab_size` is too small for the characters of the text
        plus the special pieces (the message says the minimum).
    """
    texts_list = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
        if text:
            texts_list.append(text)
    if not texts_list:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    symbols = list(user_defined_symbols)
    reserved = set(_SPECIAL_PIECES.values())
    for s in symbols:
        if not isinstance(s, str) or not s:
            raise ValueError(f"user_defined_symbols must be non-empty strings, got {s!r}")
        if s in reserved:
            raise ValueError(f"user-defined symbol {s!r} clashes with a special piece {sorted(reserved)}")

    max_bytes = max(len(t.encode("utf-8")) for t in texts_list)
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts_list),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            **_SPECIAL_PIECES,
            user_defined_symbols=symbols,
            split_digits=split_digits,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            hard_vocab_limit=hard_vocab_limit,
            add_dummy_prefix=add_dummy_prefix,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=max(4192, max_bytes + 1),
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if m := _TOO_SMALL_RE.search(message):
            required = int(m.group(2))
            n_specials = 4 + len(symbols) + (256 if byte_fallback else 0)
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the text has {required - n_specials} distinct characters "
                f"and there are {n_specials} special pieces (pad/bos/eos/unk, {len(symbols)} user-defined symbols"
                f"{', 256 byte pieces for byte_fallback' if byte_fallback else ''}), so vocab_size must be at "
                f"least {required}. Increase vocab_size, or lower character_coverage to map rare characters to unk."
            ) from e
        if m := _TOO_LARGE_RE.search(message):
            raise ValueError(
                f"vocab_size={vocab_size} is too large for this text with hard_vocab_limit=True: at most "
                f"{m.group(2)} pieces can be learned. Lower vocab_size, add text, or pass hard_vocab_limit=False."
            ) from e
        raise ValueError(f"sentencepiece training failed: {message}") from e
    return Tokenizer.from_serialized(writer.getvalue())
