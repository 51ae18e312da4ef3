"""Tokenizers: one interface (`ChatTokenizer`), two implementations, and `load_tokenizer`.

`ChatTokenizer` (base.py) is the interface the rest of jaxpost programs against: ids, stop ids, `encode_chat` with
an assistant-only loss mask. `Tokenizer` (sentencepiece.py) is a SentencePiece model with jaxpost's own chat layout,
trained in memory by `train_tokenizer`; `HFTokenizer` (hf.py) is a Hugging Face `tokenizer.json` with the
checkpoint's Jinja chat template. `load_tokenizer(path)` picks the right one for a `.model` file, a `tokenizer.json`
file, or a checkpoint directory. The modules import downwards only: base <- sentencepiece, hf <- this package.
"""

from __future__ import annotations

import os

from jaxpost.tokenizers.base import ROLES, ChatTokenizer, decode_completion, validate_messages
from jaxpost.tokenizers.hf import HFTokenizer
from jaxpost.tokenizers.sentencepiece import (BOS_ID, CHAT_SYMBOLS, END_MARKER, EOS_ID, PAD_ID, ROLE_MARKERS, UNK_ID,
                                              Tokenizer, train_tokenizer)

__all__ = [
    "BOS_ID", "CHAT_SYMBOLS", "ChatTokenizer", "EOS_ID", "END_MARKER", "HFTokenizer", "PAD_ID", "ROLES",
    "ROLE_MARKERS", "Tokenizer", "UNK_ID", "decode_completion", "load_tokenizer", "train_tokenizer",
    "validate_messages",
]


def load_tokenizer(
    path: str | os.PathLike,
    *,
    pad_id: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    chat_template: str | None = None,
) -> ChatTokenizer:
    """Loads the tokenizer at `path`, never touching the network.

    `path` is a SentencePiece `.model` file (-> `Tokenizer`), a `tokenizer.json` file, or a checkpoint directory
    holding `tokenizer.json` (preferred when present; -> `HFTokenizer`, with the directory's `tokenizer_config.json`,
    `chat_template.jinja` and `generation_config.json`) or else `tokenizer.model` (-> `Tokenizer`). A SentencePiece
    model keeps jaxpost's own chat layout: a `chat_template` in its directory is not used, and `chat_template=` is an
    error. The special-id overrides are passed on (see `Tokenizer` and `HFTokenizer`).

    Raises:
      FileNotFoundError: naming `path` when it does not exist or the directory holds neither file.
      ValueError: naming the file when it cannot be parsed.
    """
    path_str = os.fspath(path)
    ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
    if not os.path.exists(path_str):
        raise FileNotFoundError(f"no tokenizer at {path_str}: the path does not exist")
    sp_path = None
    if os.path.isdir(path_str):
        if os.path.isfile(os.path.join(path_str, "tokenizer.json")):
            return HFTokenizer.load(path_str, chat_template=chat_template, **ids)
        if os.path.isfile(os.path.join(path_str, "tokenizer.model")):
            sp_path = os.path.join(path_str, "tokenizer.model")
        else:
            raise FileNotFoundError(
                f"no tokenizer in directory {path_str}: expected tokenizer.json (Hugging Face) or tokenizer.model "
                "(SentencePiece)"
            )
    elif path_str.endswith(".json"):
        return HFTokenizer.load(path_str, chat_template=chat_template, **ids)
    else:
        sp_path = path_str
    if chat_template is not None:
        raise ValueError(
            f"{sp_path} is a SentencePiece model, which uses jaxpost's own chat layout: chat_template= applies to "
            "tokenizer.json checkpoints only"
        )
    return Tokenizer.load(sp_path, **ids)
