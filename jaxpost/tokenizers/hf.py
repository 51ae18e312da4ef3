"""Hugging Face `tokenizer.json` tokenizers behind jaxpost's `ChatTokenizer` interface.

Checkpoints such as Llama 3 and Qwen2/2.5/3 ship a `tokenizer.json` (the `tokenizers` library's serialisation), a
`tokenizer_config.json` (special tokens and a Jinja `chat_template`), sometimes the template in `chat_template.jinja`,
and a `generation_config.json` whose `eos_token_id` may be a list. `HFTokenizer.load(directory)` reads these local
files (never the network) and gives the same interface as the SentencePiece `Tokenizer`.

Chat encoding follows `transformers`' `apply_chat_template(..., tokenize=True)`: the checkpoint's template is rendered
in the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`,
loop controls, the special-token variables, `add_generation_prompt`) and the whole text is tokenised once without
added special tokens, so the ids equal transformers'.

Loss mask. It is 1 on the tokens of each assistant turn as the template renders it: the content and the token(s)
that close the turn (`<|im_end|>`, `<|eot_id|>`), not the role header and not the newline that follows the closing
token. The character span of turn i is found by rendering prefixes of the conversation:

    render(messages[:i], add_generation_prompt=True)  = text up to and including the assistant header
    render(messages[:i + 1])                          = the same text plus the rendered turn

The difference is the turn; it is cut after its last stop token when only whitespace follows. Each prefix must be a
prefix of the next and of the full rendering (true of ChatML/Qwen2.5 and Llama 3 templates); a template that
rewrites earlier turns (Qwen3 drops the reasoning of past turns) fails this check with an error. Templates that mark
assistant output with `{% generation %}...{% endgeneration %}` (transformers' `return_assistant_tokens_mask`) are
used as marked instead, which handles those. A token is in the mask when its character span overlaps an assistant
span (as transformers' assistant mask), so a token straddling header and content counts as content.
"""

from __future__ import annotations

import copy
import json
import operator
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from jaxpost.tokenizers.base import ChatTokenizer, validate_messages

__all__ = ["HFTokenizer", "render_chat_template"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# Content of the probe conversation that finds a template's end-of-turn token.
_PROBE = "jaxpost-probe-7f3a"
_GENERATION_TAG_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ------------------------------------------------------------------------------------------------ jinja environment


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of the block's output (as transformers'
    AssistantTracker). State is per thread, so one compiled template can serve grain's reader threads."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self._local = threading.local()
        environment.extend(track_generation=self._track)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        blocks = getattr(self._local, "blocks", None)
        if blocks is not None:
            start = sum(len(b) for b in blocks)
            self._local.spans.append((start, start + len(text)))
        return text

    @contextmanager
    def _track(self, blocks: list[str], spans: list[tuple[int, int]]):
        self._local.blocks, self._local.spans = blocks, spans
        try:
            yield
        finally:
            self._local.blocks = self._local.spans = None


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (as transformers' sandbox)."""

    def __init__(*args, **kwargs):  # noqa: N805 -- same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in the environment transformers uses for chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False, **variables: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a chat template as transformers does; returns the text and the character spans of its
    `{% generation %}` blocks (empty when it has none). `variables` (bos_token, eos_token, ...) are template globals.

    Keys whose value is None are dropped from the messages first, as in transformers.
    """
    compiled = _compile(template)
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    with compiled.environment.track_generation(blocks, spans):
        for block in compiled.generate(messages=chat, add_generation_prompt=add_generation_prompt, tools=None,
                                       documents=None, **variables):
            blocks.append(block)
    return "".join(blocks), spans


# ------------------------------------------------------------------------------------------------ config helpers


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"expected a token string or {{'content': ...}}, got {value!r}")


def _config_template(config: Mapping[str, Any]) -> str | None:
    """The default chat template of a tokenizer_config: a string, or a list/dict of named templates."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, (list, tuple)):
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, Mapping):
        if "default" not in template:
            raise ValueError(f"chat_template has named templates {sorted(template)} but no 'default'")
        return template["default"]
    raise ValueError(f"chat_template must be a string or named templates, got {type(template).__name__}")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_id(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


# ------------------------------------------------------------------------------------------------ the tokenizer


class HFTokenizer(ChatTokenizer):
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens and chat template.

    Build one with `HFTokenizer.load(directory_or_tokenizer_json)`, `HFTokenizer.from_str(json_text, config=...)`
    or the constructor.

    Special ids (each overridable with `pad_id=`/`bos_id=`/`eos_id=`):
      eos  `eos_token` of the config, else the first `eos_token_id` of generation_config.json.
      pad  `pad_token` of the config; without one (Llama 3) the eos id. Pad positions are masked out of every loss
           and rows are cut at the first stop token, so sharing the id with eos is harmless; pass `pad_id=` to
           choose another (e.g. one of Llama 3's reserved special tokens).
      bos  `bos_token` of the config, or None (Qwen has none; its template writes no bos).
      unk  `unk_token` of the config or of the BPE model, or None (byte-level BPE never needs one).
    `stop_ids` are eos, the generation config's eos ids, and the template's end-of-turn token (the special token
    that follows assistant content in a rendered probe conversation: `<|im_end|>`, `<|eot_id|>`), without repeats.

    Instances are picklable (through the tokenizer's JSON text) for grain worker processes, and safe to share across
    threads.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        generation_eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        name: str = TOKENIZER_FILE,
    ):
        """Args:
          tokenizer: the `tokenizers.Tokenizer`.
          config: the parsed tokenizer_config.json (special tokens, `chat_template`); {} when absent.
          chat_template: a Jinja chat template; overrides the config's.
          generation_eos_ids: generation_config.json's `eos_token_id` (int or list), added to `stop_ids`.
          pad_id, bos_id, eos_id: special-id overrides (see the class docstring).
          name: where the tokenizer came from, used in error messages (its directory or file).
        """
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tk = tokenizer
        self._config = copy.deepcopy(dict(config or {}))
        self._name = name
        if isinstance(generation_eos_ids, int):
            generation_eos_ids = (generation_eos_ids,)
        self._generation_eos_ids = tuple(_as_id("generation eos_token_id", i) for i in generation_eos_ids)

        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        for i in self._generation_eos_ids:
            self._check_range("generation eos_token_id", i)

        self._template_vars: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = self._config_token(key)
            if content is not None:
                self._template_vars[key] = content

        if eos_id is not None:
            self._eos_id = self._override("eos", eos_id)
        elif "eos_token" in self._template_vars:
            self._eos_id = self._token_id("eos_token")
        elif self._generation_eos_ids:
            self._eos_id = self._generation_eos_ids[0]
        else:
            raise ValueError(
                f"{self._name}: no eos token: {CONFIG_FILE} has no eos_token and {GENERATION_CONFIG_FILE} no "
                "eos_token_id; pass eos_id="
            )
        if pad_id is not None:
            self._pad_id = self._override("pad", pad_id)
        elif "pad_token" in self._template_vars:
            self._pad_id = self._token_id("pad_token")
        else:
            self._pad_id = self._eos_id  # Llama 3: no pad token (class docstring)
        if bos_id is not None:
            self._bos_id: int | None = self._override("bos", bos_id)
        elif "bos_token" in self._template_vars:
            self._bos_id = self._token_id("bos_token")
        else:
            self._bos_id = None
        unk_token = self._template_vars.get("unk_token") or getattr(tokenizer.model, "unk_token", None)
        self._unk_id: int | None = tokenizer.token_to_id(unk_token) if unk_token else None
        # Templates see the token texts of the ids in use, so that an override is rendered consistently.
        for key, token_id in (("bos_token", self._bos_id), ("eos_token", self._eos_id)):
            if token_id is not None:
                self._template_vars[key] = tokenizer.id_to_token(token_id)
        if pad_id is not None:
            self._template_vars["pad_token"] = tokenizer.id_to_token(self._pad_id)

        self._chat_template = chat_template if chat_template is not None else _config_template(self._config)
        if self._chat_template is not None and not isinstance(self._chat_template, str):
            raise ValueError(f"chat_template must be a string, got {type(self._chat_template).__name__}")
        self._uses_generation_tags = bool(self._chat_template and _GENERATION_TAG_RE.search(self._chat_template))
        self._turn_end_ids = self._probe_turn_end() if self._chat_template else ()
        stops = [self._eos_id, *self._generation_eos_ids, *self._turn_end_ids]
        self._stop_ids = tuple(dict.fromkeys(stops))
        self._stop_texts = tuple(t for t in (tokenizer.id_to_token(i) for i in self._stop_ids) if t)
        self._skip_ids = frozenset({self._pad_id, self._eos_id} | ({self._bos_id} - {None}))

    # ----------------------------------------------------------------------------------------------- construction

    def _config_token(self, key: str) -> str | None:
        try:
            return _token_content(self._config.get(key))
        except ValueError as e:
            raise ValueError(f"{self._name}: {CONFIG_FILE} {key}: {e}") from None

    def _token_id(self, key: str) -> int:
        content = self._template_vars[key]
        token_id = self._tk.token_to_id(content)
        if token_id is None:
            raise ValueError(
                f"{self._name}: {CONFIG_FILE} names {key}={content!r}, which is not a token of {TOKENIZER_FILE}"
            )
        return token_id

    def _check_range(self, name: str, token_id: int) -> int:
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"{name}={token_id} is out of range for a vocabulary of {self._vocab_size}")
        return token_id

    def _override(self, name: str, value: Any) -> int:
        return self._check_range(f"{name}_id", _as_id(f"{name}_id", value))

    def _probe_turn_end(self) -> tuple[int, ...]:
        """Special tokens the template writes right after assistant content (the end-of-turn token)."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text, _ = self._render(messages)
        except Exception:  # noqa: BLE001 -- a template may reject the probe; then it has no detectable turn end
            return ()
        at = text.rfind(_PROBE)
        if at < 0:
            return ()
        tail = self._tk.encode(text[at + len(_PROBE):], add_special_tokens=False).ids
        ends = []
        for token_id in tail:
            if token_id in self._special_ids:
                ends.append(token_id)
            elif ends and self._tk.decode([token_id]).strip():
                break
        return tuple(ends)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        chat_template: str | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> HFTokenizer:
        """Loads a checkpoint directory (or the `tokenizer.json` file in it) from local files only.

        Reads tokenizer.json (required), tokenizer_config.json, chat_template.jinja (which, as in transformers, takes
        precedence over the config's `chat_template`) and generation_config.json, each when present. `chat_template=`
        overrides both.

        Raises:
          FileNotFoundError: naming the path when there is no tokenizer.json.
          ValueError: naming the file that cannot be parsed or names an unknown token.
        """
        path_str = os.fspath(path)
        if os.path.isdir(path_str):
            directory, tokenizer_file = path_str, os.path.join(path_str, TOKENIZER_FILE)
        else:
            directory, tokenizer_file = os.path.dirname(path_str) or ".", path_str
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {tokenizer_file}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tokenizer_file}: cannot parse a tokenizers.Tokenizer: {e}") from e
        config_file = os.path.join(directory, CONFIG_FILE)
        config = _read_json(config_file) if os.path.isfile(config_file) else {}
        template_file = os.path.join(directory, TEMPLATE_FILE)
        if chat_template is None and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                chat_template = f.read()
        generation_file = os.path.join(directory, GENERATION_CONFIG_FILE)
        generation_eos: Any = ()
        if os.path.isfile(generation_file):
            generation_eos = _read_json(generation_file).get("eos_token_id") or ()
        try:
            return cls(tokenizer, config=config, chat_template=chat_template, generation_eos_ids=generation_eos,
                       pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, name=directory)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith(directory) else f"{directory}: {message}") from e

    @classmethod
    def from_str(cls, tokenizer_json: str, **kwargs: Any) -> HFTokenizer:
        """Builds one from the text of a tokenizer.json; `kwargs` as the constructor."""
        return cls(tokenizers.Tokenizer.from_str(tokenizer_json), **kwargs)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (with the chat template and the special tokens in use, so
        that overrides survive a reload and transformers reads the same tokenizer) into `directory`.

        The generation config's eos ids are written to generation_config.json only when the directory has none (a
        checkpoint's own generation config is never replaced). A chat_template.jinja already there is rewritten too,
        since it would take precedence over the config's template.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._tk.save(os.path.join(directory, TOKENIZER_FILE))
        config = copy.deepcopy(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, token_id in (("bos_token", self._bos_id), ("eos_token", self._eos_id), ("pad_token", self._pad_id)):
            if token_id is not None:
                config[key] = self._tk.id_to_token(token_id)
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
            template_file = os.path.join(directory, TEMPLATE_FILE)
            if os.path.exists(template_file):
                with open(template_file, "w", encoding="utf-8") as f:
                    f.write(self._chat_template)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        generation_file = os.path.join(directory, GENERATION_CONFIG_FILE)
        if self._generation_eos_ids and not os.path.exists(generation_file):
            with open(generation_file, "w", encoding="utf-8") as f:
                json.dump({"eos_token_id": list(self._generation_eos_ids)}, f, indent=2)
                f.write("\n")

    def __getstate__(self) -> dict[str, Any]:
        return {
            "tokenizer_json": self._tk.to_str(),
            "config": self._config,
            "chat_template": self._chat_template,
            "generation_eos_ids": self._generation_eos_ids,
            "pad_id": self._pad_id,
            "bos_id": self._bos_id,
            "eos_id": self._eos_id,
            "name": self._name,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokenizer = tokenizers.Tokenizer.from_str(state.pop("tokenizer_json"))
        self.__init__(tokenizer, **state)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self._name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, unk_id={self.unk_id}, stop_ids={self.stop_ids})"
        )

    # ----------------------------------------------------------------------------------------------- properties

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_token(int(token_id))

    # ----------------------------------------------------------------------------------------------- encode/decode

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids with no special tokens added (special-token text in `text` still maps to its id,
        as in transformers)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping special tokens (and the pad/bos/eos ids). It does not stop at the first
        stop token: cut before calling."""
        ids_list = [int(i) for i in ids]
        for i in ids_list:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self._vocab_size}")
        return self._tk.decode([i for i in ids_list if i not in self._skip_ids], skip_special_tokens=True)

    # ----------------------------------------------------------------------------------------------- chat

    def _template(self) -> str:
        if self._chat_template is None:
            raise ValueError(
                f"{self._name}: no chat template: neither {CONFIG_FILE} (chat_template) nor {TEMPLATE_FILE} has one; "
                "pass chat_template= to HFTokenizer.load / load_tokenizer"
            )
        return self._chat_template

    def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False):
        try:
            return render_chat_template(self._template(), messages, add_generation_prompt=add_generation_prompt,
                                        **self._template_vars)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self._name}: chat template error: {e}") from e

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template renders it (transformers' `apply_chat_template(tokenize=False)`)."""
        validate_messages(messages)
        return self._render(messages, add_generation_prompt)[0]

    def _trim_turn(self, turn: str) -> int:
        """Length of a rendered assistant turn up to its last stop token, when only whitespace follows it."""
        end = max((turn.rfind(t) + len(t) for t in self._stop_texts if t in turn), default=-1)
        if end >= 0 and not turn[end:].strip():
            return end
        return len(turn)

    def assistant_spans(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans `[start, end)` of its assistant turns (module
        docstring), in order.

        Raises:
          ValueError: when the template does not render prefixes of the conversation as prefixes of the whole (and
            has no `{% generation %}` marks), naming the message.
        """
        validate_messages(messages)
        messages = list(messages)
        text, marked = self._render(messages, add_generation_prompt)
        if self._uses_generation_tags:
            return text, [(a, b) for a, b in marked if b > a]
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = self._render(messages[:i], True)
            through, _ = self._render(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"{self._name}: the chat template does not render messages[{i}] (assistant) as an extension of the "
                    "conversation before it, so its tokens cannot be located for the loss mask (a template that "
                    "rewrites earlier turns does this); pass a chat_template= that marks assistant output with "
                    "{% generation %}...{% endgeneration %}"
                )
            start = len(before)
            end = start + self._trim_turn(through[start:])
            if end > start:
                spans.append((start, end))
        return text, spans

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Encodes a conversation with the checkpoint's chat template; returns `(ids, loss_mask)` of equal length.

        `ids` equal transformers' `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.
        `loss_mask` is 1 on the tokens overlapping an assistant turn's span (`assistant_spans`): its content and
        the end-of-turn token(s) closing it, 0 elsewhere (role headers, the generation prompt).

        Raises:
          ValueError: for malformed messages (as `validate_messages`), a missing chat template (naming the file),
            template errors, and templates whose assistant turns cannot be located (see `assistant_spans`).
        """
        text, spans = self.assistant_spans(messages, add_generation_prompt=add_generation_prompt)
        encoding = self._tk.encode(text, add_special_tokens=False)
        ids = encoding.ids
        mask = [0] * len(ids)
        k = 0
        for j, (start, end) in enumerate(encoding.offsets):
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            if k == len(spans):
                break
            span_start, span_end = spans[k]
            if start < span_end and (end > span_start or start == end >= span_start):
                mask[j] = 1
        return ids, mask
