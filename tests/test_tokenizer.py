"""Tests for jaxpost.tokenizers: in-memory training, save/load, specials, and chat formatting with loss masks."""

import io
import pickle
import random
import time

import pytest
import sentencepiece as spm

from jaxpost.tokenizers import (
    BOS_ID,
    CHAT_SYMBOLS,
    END_MARKER,
    EOS_ID,
    PAD_ID,
    ROLE_MARKERS,
    UNK_ID,
    Tokenizer,
    train_tokenizer,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "You are a helpful assistant. Answer briefly.",
    "What is the capital of France? Paris is the capital of France.",
    "Tabs\tand  double spaces\nand newlines are kept.",
    "Numbers: 0123456789, 42, -17, 3.14 (pi) [x] {y} <z> | _ ' \" ; : / \\ = + * % & # @ ~ ` ^ $",
]


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(SENTENCES)
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        texts.append(f"What is {a} + {b}? The answer is {a + b}.")
        texts.append(rng.choice(SENTENCES))
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(), vocab_size=256)


def test_special_ids_and_markers(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok.stop_ids == (tok.eos_id,)
    # The chat markers are single user-defined pieces right after the specials.
    for offset, symbol in enumerate(CHAT_SYMBOLS):
        assert tok.marker_ids(symbol) == (4 + offset,)
        assert tok.encode(symbol) == [4 + offset]
    assert 8 < tok.vocab_size <= 256


def test_train_is_fast_and_deterministic():
    texts = _corpus()
    start = time.perf_counter()
    first = train_tokenizer(texts, vocab_size=256)
    elapsed = time.perf_counter() - start
    second = train_tokenizer(texts, vocab_size=256)
    assert first.serialized == second.serialized
    assert elapsed < 2.0, f"training took {elapsed:.2f}s"
    other = train_tokenizer(texts[: len(texts) // 2] + ["A different corpus entirely."], vocab_size=256)
    assert other.serialized != first.serialized


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.model"
    tok.save(path)
    assert path.read_bytes() == tok.serialized
    loaded = Tokenizer.load(path)
    assert loaded.serialized == tok.serialized
    assert loaded.vocab_size == tok.vocab_size
    for text in SENTENCES:
        assert loaded.encode(text) == tok.encode(text)
    again = Tokenizer.from_serialized(tok.serialized)
    assert again.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])


def test_encode_decode_round_trip(tok):
    for text in [*SENTENCES, "  leading and trailing  ", "What is 37 + 485?", "522", "-17", ""]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert UNK_ID not in ids
        assert tok.decode(ids) == text


def test_decode_skips_special_ids(tok):
    ids = tok.encode("Hello, world!")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "Hello, world!"
    # decode does not stop at eos: text after it is decoded too.
    assert tok.decode([*ids, tok.eos_id, *ids]) == "Hello, world!Hello, world!"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_chat_layout_and_mask_by_hand(tok):
    system, user, assistant = "You are a helpful assistant.", "What is 2 + 2?", "The answer is 4."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    ids, mask = tok.encode_chat(messages)
    (sys_id,), (user_id,), (asst_id,), (end_id,) = (tok.marker_ids(s) for s in CHAT_SYMBOLS)
    expected_ids = (
        [tok.bos_id, sys_id, *tok.encode(system), end_id]
        + [user_id, *tok.encode(user), end_id]
        + [asst_id, *tok.encode(assistant), tok.eos_id]
    )
    n_prefix = len(expected_ids) - len(tok.encode(assistant)) - 1
    assert ids == expected_ids
    assert mask == [0] * n_prefix + [1] * (len(tok.encode(assistant)) + 1)
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked[-1] == tok.eos_id
    assert tok.decode(masked) == assistant
    assert tok.decode(ids) == f"<|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{assistant}"


def test_chat_multi_turn_masks_every_assistant_turn(tok):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]
    ids, mask = tok.encode_chat(messages)
    assert len(ids) == len(mask)
    assert sum(mask) == len(tok.encode("Hi")) + 1 + len(tok.encode("2")) + 1
    assert ids.count(tok.eos_id) == 2
    assert [i for i, m in zip(ids, mask) if m] == [*tok.encode("Hi"), tok.eos_id, *tok.encode("2"), tok.eos_id]
    # prompt/completion is the one-turn chat.
    assert tok.encode_prompt_completion("Hello", "Hi") == tok.encode_chat(messages[:2])


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    plain_ids, _ = tok.encode_chat(messages)
    assert ids == [*plain_ids, *tok.marker_ids(ROLE_MARKERS["assistant"])]
    assert mask == [0] * len(ids)
    # The training sequence of the same conversation starts with the generation prompt.
    full_ids, _ = tok.encode_chat([*messages, {"role": "assistant", "content": "4"}])
    assert full_ids[: len(ids)] == ids


@pytest.mark.parametrize(
    "messages, match",
    [
        ({"role": "user", "content": "x"}, "messages must be a list"),
        ([{"role": "user", "content": "x"}, "hello"], r"messages\[1\] must be a dict"),
        ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], r"messages\[1\]\.role must be one of"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user"}], r"messages\[0\] is missing field 'content'"),
        ([{"content": "x"}], r"messages\[0\] is missing field 'role'"),
    ],
)
def test_bad_messages_name_index_and_field(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_too_small_vocab_error_is_clear():
    with pytest.raises(ValueError, match=r"vocab_size=20 is too small.*at least \d+"):
        train_tokenizer(SENTENCES, vocab_size=20)


def test_bad_training_inputs():
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_tokenizer(["", ""], vocab_size=64)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        train_tokenizer(["ok", 3], vocab_size=64)


def _train_raw_sentencepiece(**kwargs) -> bytes:
    """A model as released models are: no pad piece, no chat symbols."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(200) + ["<|system|> <|user|> <|assistant|> <|end|>"]),
        model_writer=writer,
        vocab_size=100,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **kwargs,
    )
    return writer.getvalue()


def test_model_without_pad_needs_override_and_markers_fall_back_to_text():
    model_bytes = _train_raw_sentencepiece()  # sentencepiece defaults: unk=0, bos=1, eos=2, pad=-1
    with pytest.raises(ValueError, match="no pad piece.*pad_id="):
        Tokenizer.from_serialized(model_bytes)
    tok = Tokenizer.from_serialized(model_bytes, pad_id=2)
    assert tok.pad_id == 2
    user_ids = tok.marker_ids(ROLE_MARKERS["user"])
    assert len(user_ids) > 1  # not a piece of this model: encoded as text
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
    assert len(ids) == len(mask)
    assert [i for i, m in zip(ids, mask) if m] == [*tok.encode("Hi"), tok.eos_id]
    assert "<|user|>" in tok.decode(ids) and END_MARKER in tok.decode(ids)
    with pytest.raises(ValueError, match="out of range"):
        Tokenizer.from_serialized(model_bytes, pad_id=10_000)
