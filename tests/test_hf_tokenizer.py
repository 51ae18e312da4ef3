"""Tests for jaxpost.tokenizers.hf: tokenizer.json checkpoints (Qwen2.5 ChatML and Llama 3 chat templates) against
transformers, loss masks from hand-derived spans, pickling, `load_tokenizer` dispatch, and the SFT/preference
pipelines."""

import json
import pickle
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from jaxpost.data import build_sft_iterator
from jaxpost.data.preference import build_preference_iterator
from jaxpost.tokenizers.hf import HFTokenizer
from jaxpost.tokenizers import ChatTokenizer, Tokenizer, decode_completion, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2's pre-tokenizer split (Llama 3 uses the same shape with \p{N}{1,3}), then byte-level without its own regex.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-Instruct's chat template without its tool-calling branches.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama 3 Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WORDS = (
    "the quick brown fox jumps over a lazy dog hello world what is capital of France Paris answer question you are "
    "helpful assistant please think step by step sum two numbers equals café naïve"
).split()

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "Hello! What is the question?"},
     {"role": "user", "content": "sum 12 and 30, step by step"},
     {"role": "assistant", "content": " 12 + 30 = 42\nThe answer is 42. "}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "naïve café?"},
     {"role": "assistant", "content": ""},
     {"role": "user", "content": "again"},
     {"role": "assistant", "content": "Café <|im_end|> done"}],
]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        texts.append(words + rng.choice([".", "?", "!", "\n", f" {rng.randint(0, 999)}."]))
    return texts


def _train_bpe(specials: list[str]) -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    tk.add_special_tokens(specials)  # after the learned vocabulary, as in the released checkpoints
    return tk


def _write_checkpoint(directory, tk, config, generation_config=None):
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    tk = _train_bpe(QWEN_SPECIALS)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
        "bos_token": None,
        "unk_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": QWEN_TEMPLATE,
        "model_max_length": 4096,
    }
    return _write_checkpoint(tmp_path_factory.mktemp("qwen"), tk, config,
                             {"eos_token_id": [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")]})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tk = _train_bpe(LLAMA3_SPECIALS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<|begin_of_text|>", "special": True, "__type": "AddedToken"},
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    return _write_checkpoint(tmp_path_factory.mktemp("llama3"), tk, config,
                             {"eos_token_id": [tk.token_to_id("<|end_of_text|>"), tk.token_to_id("<|eot_id|>")]})


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return HFTokenizer.load(qwen_dir)


@pytest.fixture(scope="module")
def qwen_hf(qwen_dir):
    return transformers.AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return HFTokenizer.load(llama_dir)


def _masked_runs(tok, ids, mask) -> list[str]:
    """Decoded text of each maximal run of mask-1 tokens, special tokens kept."""
    runs, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# ------------------------------------------------------------------------------------------------ plain text


def test_special_ids_and_interface(qwen):
    tk = qwen.tokenizer
    assert isinstance(qwen, ChatTokenizer) and not isinstance(qwen, Tokenizer)
    assert qwen.vocab_size == tk.get_vocab_size() > 300
    # The specials follow the learned vocabulary, as in the released checkpoints.
    assert [tk.token_to_id(t) for t in QWEN_SPECIALS] == [qwen.vocab_size - 3, qwen.vocab_size - 2, qwen.vocab_size - 1]
    assert qwen.eos_id == tk.token_to_id("<|im_end|>")
    assert qwen.pad_id == tk.token_to_id("<|endoftext|>")
    assert qwen.bos_id is None and qwen.unk_id is None
    # eos, then the generation config's extra eos; the template's end of turn (<|im_end|>) is eos already.
    assert qwen.stop_ids == (tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>"))


def test_encode_decode_matches_transformers(qwen, qwen_hf):
    texts = ["hello world", "What is the capital of France?\nParis.", "  two  spaces\tand tabs\n\n",
             "café naïve 12345", "", "unseen: ü 你好 🙂", "text with <|im_end|> inside"]
    for text in texts:
        ids = qwen.encode(text)
        assert ids == qwen_hf.encode(text, add_special_tokens=False), text
        assert qwen.decode(ids) == qwen_hf.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert qwen.decode(ids) == text
    im_end = qwen.eos_id
    assert qwen.encode("<|im_end|>") == [im_end]
    assert qwen.decode([*qwen.encode("hi"), im_end, qwen.pad_id]) == "hi"
    with pytest.raises(ValueError, match="out of range"):
        qwen.decode([qwen.vocab_size])
    with pytest.raises(TypeError):
        qwen.encode(["not", "text"])


def test_decode_completion_drops_stops_and_padded_vocab(qwen):
    ids = qwen.encode("Paris.") + [qwen.vocab_size + 5, qwen.eos_id, qwen.pad_id]
    assert decode_completion(qwen, np.asarray(ids)) == "Paris."


# ------------------------------------------------------------------------------------------------ chat (Qwen2.5)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_encode_chat_matches_transformers(qwen, qwen_hf, conversation):
    messages = CONVERSATIONS[conversation]
    ids, mask = qwen.encode_chat(messages)
    assert len(ids) == len(mask)
    assert ids == list(qwen_hf.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert qwen.render_chat(messages) == qwen_hf.apply_chat_template(messages, tokenize=False)
    prompt = messages[:-1]
    prompt_ids, prompt_mask = qwen.encode_chat(prompt, add_generation_prompt=True)
    assert prompt_ids == list(qwen_hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                          return_dict=False))
    # The generation prompt is the assistant header; the full conversation extends it.
    assert qwen.tokenizer.decode(prompt_ids[-3:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert ids[: len(prompt_ids)] == prompt_ids and mask[: len(prompt_ids)] == prompt_mask


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_loss_mask_is_assistant_content_and_im_end(qwen, conversation):
    messages = CONVERSATIONS[conversation]
    ids, mask = qwen.encode_chat(messages)
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _masked_runs(qwen, ids, mask) == expected
    # The im_end closing each assistant turn is trained on (and one written inside content, which, as in
    # transformers, is the special token); no header, newline or system/user token is.
    im_end = qwen.eos_id
    assert sum(m for t, m in zip(ids, mask) if t == im_end) == "".join(expected).count("<|im_end|>")
    turns = len(messages) + (messages[0]["role"] != "system")  # the template adds a default system turn
    assert ids.count(im_end) == turns + sum(m["content"].count("<|im_end|>") for m in messages)
    assert all(m == 0 for t, m in zip(ids, mask) if t == qwen.tokenizer.token_to_id("<|im_start|>"))
    assert mask[-1] == 0 and qwen.tokenizer.id_to_token(ids[-1]) == "Ċ"  # the newline after the last <|im_end|>


def test_generation_prompt_and_prompt_completion(qwen):
    ids, mask = qwen.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert sum(mask) == 0
    assert qwen.tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    ids, mask = qwen.encode_prompt_completion("2 + 2?", "4")
    assert _masked_runs(qwen, ids, mask) == ["4<|im_end|>"]


def test_generation_tags_match_transformers_assistant_mask(qwen_dir, qwen_hf):
    template = QWEN_TEMPLATE.replace(
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n",
        "        {%- if message.role == 'assistant' %}\n"
        "            {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
        "{% endgeneration %}{{- '\\n' }}\n"
        "        {%- else %}\n"
        "            {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "        {%- endif %}\n",
    )
    assert "generation" in template
    tok = HFTokenizer.load(qwen_dir, chat_template=template)
    for messages in CONVERSATIONS:
        ids, mask = tok.encode_chat(messages)
        out = qwen_hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert mask == list(out["assistant_masks"])
        assert (ids, mask) == HFTokenizer.load(qwen_dir).encode_chat(messages)


def test_template_that_rewrites_earlier_turns_is_an_error(qwen_dir):
    # Drops every assistant turn but the last (as Qwen3 drops past reasoning): prefixes are not prefixes.
    template = (
        "{%- for message in messages %}{%- if message.role != 'assistant' or loop.last %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = HFTokenizer.load(qwen_dir, chat_template=template)
    assert sum(tok.encode_chat(CONVERSATIONS[0])[1]) > 0
    with pytest.raises(ValueError, match=r"messages\[2\].*generation"):
        tok.encode_chat(CONVERSATIONS[1])


def test_chat_errors(qwen, qwen_dir, tmp_path):
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        qwen.encode_chat([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content must be a string"):
        qwen.encode_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="chat template error: no system"):
        HFTokenizer.load(qwen_dir, chat_template="{{ raise_exception('no system') }}").encode_chat(CONVERSATIONS[0])
    # No chat template anywhere: plain text works, encode_chat names the directory; an override fixes it.
    bare = tmp_path / "bare"
    bare.mkdir()
    qwen.tokenizer.save(str(bare / "tokenizer.json"))
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = HFTokenizer.load(bare)
    assert tok.encode("hello") == qwen.encode("hello") and tok.stop_ids == (qwen.eos_id,)
    with pytest.raises(ValueError, match=rf"{bare}: no chat template.*chat_template="):
        tok.encode_chat(CONVERSATIONS[0])
    assert HFTokenizer.load(bare, chat_template=QWEN_TEMPLATE).encode_chat(CONVERSATIONS[0]) == qwen.encode_chat(
        CONVERSATIONS[0])
    # A chat_template.jinja takes precedence over the config's template, as in transformers.
    (bare / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    assert HFTokenizer.load(bare).encode_chat(CONVERSATIONS[1]) == qwen.encode_chat(CONVERSATIONS[1])
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>'.*not a token"):
        HFTokenizer.load(bare)


# ------------------------------------------------------------------------------------------------ Llama 3


def test_llama3_pad_falls_back_to_eos_and_stops_at_eot(llama, llama_dir):
    tk = llama.tokenizer
    eot, end_of_text = tk.token_to_id("<|eot_id|>"), tk.token_to_id("<|end_of_text|>")
    assert llama.bos_id == tk.token_to_id("<|begin_of_text|>")
    assert llama.eos_id == end_of_text and llama.pad_id == llama.eos_id
    assert llama.stop_ids == (end_of_text, eot)
    # Without the generation config the template still yields <|eot_id|> as a stop id.
    (llama_dir / "generation_config.json").rename(llama_dir / "generation_config.json.off")
    try:
        assert HFTokenizer.load(llama_dir).stop_ids == (end_of_text, eot)
        assert HFTokenizer.load(llama_dir, pad_id=eot - 1, eos_id=eot).stop_ids == (eot,)
        assert HFTokenizer.load(llama_dir, pad_id=eot - 1).pad_id == eot - 1
    finally:
        (llama_dir / "generation_config.json.off").rename(llama_dir / "generation_config.json")
    with pytest.raises(ValueError, match="out of range"):
        HFTokenizer.load(llama_dir, pad_id=llama.vocab_size)


def test_llama3_chat_matches_transformers(llama, llama_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(llama_dir), local_files_only=True)
    for messages in CONVERSATIONS:
        ids, mask = llama.encode_chat(messages)
        assert ids == list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))
        assert ids[0] == llama.bos_id and ids.count(llama.bos_id) == 1
        # The template trims content; the mask covers the trimmed content and <|eot_id|>.
        expected = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
        assert _masked_runs(llama, ids, mask) == expected
        prompt_ids, _ = llama.encode_chat(messages[:-1], add_generation_prompt=True)
        assert prompt_ids == list(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                         return_dict=False))
        assert ids[: len(prompt_ids)] == prompt_ids


# ------------------------------------------------------------------------------------------------ save, pickle, load


def test_pickle_round_trip(qwen, llama):
    for tok in (qwen, llama):
        clone = pickle.loads(pickle.dumps(tok))
        assert isinstance(clone, HFTokenizer)
        assert (clone.vocab_size, clone.pad_id, clone.bos_id, clone.eos_id, clone.stop_ids) == (
            tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.stop_ids)
        for messages in CONVERSATIONS:
            assert clone.encode_chat(messages) == tok.encode_chat(messages)


def test_save_round_trip_keeps_overrides(llama, llama_dir, tmp_path):
    eot = llama.tokenizer.token_to_id("<|eot_id|>")
    tok = HFTokenizer.load(llama_dir, pad_id=eot - 1)
    tok.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    again = HFTokenizer.load(tmp_path / "saved")
    assert (again.pad_id, again.bos_id, again.eos_id, again.stop_ids) == (eot - 1, tok.bos_id, tok.eos_id,
                                                                         tok.stop_ids)
    assert again.encode_chat(CONVERSATIONS[1]) == tok.encode_chat(CONVERSATIONS[1])
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    assert hf.pad_token_id == eot - 1
    assert list(hf.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=False)) == tok.encode_chat(
        CONVERSATIONS[1])[0]


def test_load_tokenizer_dispatch(qwen_dir, tmp_path):
    sp = train_tokenizer(_corpus(200), vocab_size=200)
    sp.save(tmp_path / "sp.model")
    assert isinstance(load_tokenizer(tmp_path / "sp.model"), Tokenizer)
    sp_dir = tmp_path / "sp_dir"
    sp_dir.mkdir()
    sp.save(sp_dir / "tokenizer.model")
    loaded = load_tokenizer(sp_dir)
    assert isinstance(loaded, Tokenizer) and loaded.encode("hello world") == sp.encode("hello world")
    with pytest.raises(ValueError, match="SentencePiece.*chat_template="):
        load_tokenizer(sp_dir, chat_template=QWEN_TEMPLATE)
    # tokenizer.json is preferred when both are present.
    both = tmp_path / "both"
    HFTokenizer.load(qwen_dir).save(both)
    sp.save(both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), HFTokenizer)
    assert isinstance(load_tokenizer(qwen_dir / "tokenizer.json"), HFTokenizer)
    assert load_tokenizer(qwen_dir, pad_id=0).pad_id == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty}.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot parse"):
        load_tokenizer(empty)


# ------------------------------------------------------------------------------------------------ data pipelines


def test_sft_pipeline_carries_the_loss_mask(qwen):
    records = [{"messages": m} for m in CONVERSATIONS] + [{"prompt": "hello", "completion": "world"}]
    iterator = build_sft_iterator(records, qwen, seq_len=256, batch_size=2, packing=False, shuffle=False,
                                  num_epochs=1, process_index=0, process_count=1)
    batches = list(iterator)
    rows = [(b["inputs"][r], b["targets"][r], b["loss_mask"][r]) for b in batches for r in range(2)
            if b["segment_ids"][r].any()]
    # Conversation 2 has an empty assistant turn but a non-empty one too, so nothing is dropped.
    assert len(rows) == 4 and iterator.stats["dropped_empty"] == 0
    # A record whose only assistant turn is empty trains on <|im_end|> alone, which the pipeline sees as empty.
    empty = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 2
    dropped = build_sft_iterator(empty + records[-1:], qwen, seq_len=64, batch_size=2, num_epochs=1,
                                 process_index=0, process_count=1)
    assert sum(int(b["segment_ids"].max()) for b in dropped) == 1 and dropped.stats["dropped_empty"] == 2
    for (inputs, targets, loss_mask), record in zip(rows, records):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["completion"]}]
        ids, mask = qwen.encode_chat(messages)
        n = len(ids) - 1
        assert inputs[:n].tolist() == ids[:-1] and targets[:n].tolist() == ids[1:]
        assert loss_mask[:n].tolist() == mask[1:] and not loss_mask[n:].any()
        assert (inputs[n:] == qwen.pad_id).all()
        trained = targets[loss_mask > 0].tolist()
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert qwen.tokenizer.decode(trained, skip_special_tokens=False) == "".join(expected)


def test_preference_pipeline_accepts_hf_tokenizer(llama):
    records = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
               {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sum 2 and 3"}],
                "chosen": "5", "rejected": "six"}]
    iterator = build_preference_iterator(records, llama, seq_len=128, batch_size=2, shuffle=False, num_epochs=1,
                                         process_index=0, process_count=1)
    batch = next(iter(iterator))
    texts = [llama.tokenizer.decode(batch["targets"][r][batch["loss_mask"][r] > 0].tolist(),
                                    skip_special_tokens=False) for r in range(4)]
    assert texts == ["Paris.<|eot_id|>", "Lyon, I think.<|eot_id|>", "5<|eot_id|>", "six<|eot_id|>"]
