"""The tokenizer interface the rest of jaxpost programs against, and the helpers every implementation shares."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Chat roles accepted by `encode_chat`, in the order they usually appear.
ROLES: tuple[str, ...] = ("system", "user", "assistant")


def validate_messages(messages: Any) -> None:
    """Checks that `messages` is a list of `{"role": ROLES, "content": str}` dicts (extra keys allowed).

    Raises:
      ValueError: naming the offending message index and field, e.g.
        ``messages[2].role must be one of 'system', 'user', 'assistant'; got 'bot'``.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"messages[{i}] is missing field 'role'")
        if "content" not in message:
            raise ValueError(f"messages[{i}] is missing field 'content'")
        role = message["role"]
        if role not in ROLES:
            allowed = ", ".join(repr(r) for r in ROLES)
            raise ValueError(f"messages[{i}].role must be one of {allowed}; got {role!r}")
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")


class ChatTokenizer(abc.ABC):
    """What jaxpost needs from a tokenizer: special ids, plain encode/decode, and chat encoding with a loss mask.

    Implemented by `Tokenizer` (SentencePiece, jaxpost's own chat layout) and `HFTokenizer` (a Hugging Face
    `tokenizer.json`, the checkpoint's own chat template). Data pipelines check `isinstance(tok, ChatTokenizer)`.
    Implementations must be picklable (grain worker processes), and set the special ids in `__init__`:
    `_vocab_size`, `_pad_id`, `_bos_id`, `_eos_id`, `_unk_id` and `_stop_ids`.
    """

    _vocab_size: int
    _pad_id: int
    _bos_id: int | None
    _eos_id: int
    _unk_id: int | None
    _stop_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        """Number of token ids (`0 <= id < vocab_size`); a model's embedding may be larger (padded)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Id written on padding positions (never trained on)."""
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id; None where the vocabulary has none (Qwen)."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id; None where the vocabulary has none (byte-level BPE)."""
        return self._unk_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation (eos, and the chat format's end-of-turn token where it differs)."""
        return self._stop_ids

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encodes text to ids, adding no special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping special tokens."""

    @abc.abstractmethod
    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Encodes a conversation; returns `(ids, loss_mask)` of equal length, the mask 1 exactly on the tokens of
        assistant turns that the model must produce (content and the token(s) closing the turn)."""

    def encode_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """`encode_chat` of a single user turn `prompt` answered by the assistant with `completion`."""
        return self.encode_chat(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        )


def decode_completion(tokenizer: ChatTokenizer, ids) -> str:
    """Text of a sampled completion: stop tokens dropped, ids past the tokenizer's pieces (the model's vocabulary
    may be padded) decoded as unknown, or dropped where the tokenizer has no unknown token."""
    stop = set(tokenizer.stop_ids)
    kept = []
    for t in (ids.tolist() if hasattr(ids, "tolist") else list(ids)):
        if t in stop:
            continue
        if t >= tokenizer.vocab_size:
            if tokenizer.unk_id is None:
                continue
            t = tokenizer.unk_id
        kept.append(t)
    return tokenizer.decode(kept)


# --------------------------------------------------------------------------------------------------- loading
