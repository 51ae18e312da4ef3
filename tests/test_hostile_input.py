"""Hostile input: generated bad data records (each an error naming file:line and field, or counted and skipped),
overlong prompts and failing tokenizers naming the record's line, broken Hugging Face and params directories naming
the file and tensor, and no loading path that unpickles. docs/reliability.md tabulates what each test shows."""

import copy
import json
import os
import pickle
import random

import jax
import numpy as np
import pytest

from jaxpost.checkpoint import Checkpointer, CheckpointError
from jaxpost.data import (DataError, build_sft_iterator, normalize_kto_record, normalize_preference_record,
                          normalize_record, read_jsonl, read_preference_jsonl)
from jaxpost.data.prompts import build_prompt_iterator, prompt_messages
from jaxpost.models.hf import HFFormatError, from_pretrained, save_pretrained
from jaxpost.models.params_io import load_orbax_params, save_orbax_params
from jaxpost.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from tests.helpers import cached_lm, tiny_config

# ---- generated bad records -------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]


def _normalize_prompt(record):
    """The RL prompt file reader's checks (`jaxpost.data.prompts.prompt_messages`)."""
    prompt_messages(record)
    return dict(record)


def _prompt_reader(path, on_bad="error"):
    return read_jsonl(path, _normalize_prompt, on_bad=on_bad)


# kind -> (normalize, good records, the top-level fields an error may name, the message lists a mutation may reorder)
KINDS = {
    "sft": (normalize_record, [{"messages": CHAT}, {"messages": CHAT[1:3]}, {"prompt": "2+2?", "completion": "4"}],
            ("messages", "prompt", "completion", "record"), ("messages",)),
    "preference": (normalize_preference_record,
                   [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                    {"prompt": CHAT[:2], "chosen": [CHAT[2]], "rejected": [{"role": "assistant", "content": "5"}]},
                    {"chosen": CHAT[1:3], "rejected": [CHAT[1], {"role": "assistant", "content": "5"}]}],
                   ("prompt", "chosen", "rejected", "record"), ("prompt", "chosen")),
    "kto": (normalize_kto_record, [{"prompt": "2+2?", "completion": "4", "label": True},
                             {"prompt": CHAT[:2], "completion": [CHAT[2]], "label": False}],
            ("prompt", "completion", "label", "record"), ("prompt",)),
    "prompt": (_normalize_prompt, [{"prompt": "2+2?", "answer": "4"}, {"messages": CHAT[:2], "answer": "4"},
                                {"messages": CHAT[:3]}],
               ("prompt", "messages", "record"), ("messages",)),
}
MAX_LINE = 4096
WRONG = [7, 3.5, None, True, ["x"], {"a": 1}, [1, 2], ""]


def _leaf_paths(record, fields):
    """Paths to the string / bool leaves of a record's required fields: (field,), (field, i, key)."""
    out = []
    for f in fields:
        v = record.get(f)
        if isinstance(v, (str, bool)):
            out.append((f,))
        elif isinstance(v, list):
            out += [(f, i, k) for i, m in enumerate(v) for k in ("role", "content")]
    return out


def _set(record, path, value):
    target = record
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value


def _mutations(kind, rng: random.Random):
    """(name, bad line bytes) pairs, each a record no reader may accept."""
    _, goods, fields, ordered = KINDS[kind]
    required = [f for f in fields if f != "record"]
    good = copy.deepcopy(rng.choice(goods))
    line = json.dumps(good).encode()
    leaves = _leaf_paths(good, required)
    path = rng.choice(leaves)
    lists = [f for f in ordered if isinstance(good.get(f), list)]
    choice = rng.randrange(12)
    if choice == 0:
        i = rng.randrange(len(line) + 1)
        return "non-UTF-8 byte", line[:i] + rng.choice([b"\xff", b"\xfe", b"\x80", b"\xc0", b"\xe2\x82"]) + line[i:]
    if choice == 1:
        return "truncated JSON", line[:rng.randrange(1, len(line) - 1)]
    if choice == 2:
        return "not an object", json.dumps(rng.choice([[good], "text", 42, None, True])).encode()
    if choice == 3:
        value = rng.choice(WRONG)
        if path[-1] == "content" and value == "":  # empty content is allowed: use a wrong type
            value = 7
        if path[-1] == "label" and value is True:
            value = "yes"
        if value == "" and path[-1] not in ("role",):
            value = None
        _set(good, path, value)
        return "wrong type", json.dumps(good).encode()
    if choice == 4:
        target = good
        for p in path[:-1]:
            target = target[p]
        del target[path[-1]]
        if not good or set(good) <= {"answer"}:
            good["answer"] = "4"
        if kind == "prompt" and path == ("prompt",):
            pass  # neither 'prompt' nor 'messages' left
        return "missing field", json.dumps(good).encode()
    if choice == 5:
        f = rng.choice(lists) if lists else required[0]
        good[f] = []
        return "empty messages", json.dumps(good).encode()
    if choice == 6 and lists:
        f = rng.choice(lists)
        msgs = good[f]
        how = rng.randrange(3)
        if how == 0:  # a system message after the first
            msgs.insert(rng.randrange(1, len(msgs) + 1), dict(SYSTEM))
        elif how == 1:  # the same role twice in a row
            i = rng.randrange(len(msgs))
            msgs.insert(i, dict(msgs[i]) if msgs[i]["role"] != "system" else {"role": "user", "content": "x"})
            if msgs[i]["role"] == "user" and i + 1 < len(msgs) and msgs[i + 1]["role"] != "user":
                msgs.insert(i, {"role": "user", "content": "again"})
        else:  # starting with the assistant
            msgs.insert(0, {"role": "assistant", "content": "hi"})
        return "roles out of order", json.dumps(good).encode()
    if choice == 7:
        _set(good, rng.choice([p for p in leaves if p[-1] != "role"] or leaves), "x" * (MAX_LINE + 10))
        return "huge line", json.dumps(good).encode()
    if choice == 8:
        return "deep nesting", b"[" * 1500 + b"]" * 1500  # deeper than Python's JSON reader recurses
    if choice == 9:
        return "number too long", b'{"prompt": ' + b"9" * 5000 + b"}"
    if choice == 10:
        return "trailing garbage", line + b' {"x": 1}'
    role_path = [p for p in leaves if p[-1] == "role"]
    if role_path:
        _set(good, rng.choice(role_path), rng.choice(["bot", "tool", "User", "", 1]))
        return "unknown role", json.dumps(good).encode()
    return "not an object", b"[]"


def _files(kind, tmp_path, n, seed):
    """n files, each with good lines, blank lines and one bad line: (path, bad line number, mutation)."""
    rng = random.Random(seed)
    goods = KINDS[kind][1]
    out = []
    for i in range(n):
        name, bad = _mutations(kind, rng)
        lines = [json.dumps(rng.choice(goods)).encode() for _ in range(rng.randrange(4))]
        lines += [b""] * rng.randrange(2)
        rng.shuffle(lines)
        lineno = len(lines) + 1
        lines += [bad] + [json.dumps(rng.choice(goods)).encode() for _ in range(rng.randrange(3))]
        path = str(tmp_path / f"{kind}_{i}.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b""))
        out.append((path, lineno, name))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzzed_bad_records_are_errors_naming_file_line_and_field(tmp_path, kind):
    normalize, _, fields, _ = KINDS[kind]
    seen = set()
    for path, lineno, name in _files(kind, tmp_path, 100, seed=len(kind)):
        with pytest.raises(Exception) as e:
            read_jsonl(path, normalize, max_line_bytes=MAX_LINE)
        msg = str(e.value)
        assert type(e.value) is DataError, (name, type(e.value), msg)
        assert msg.startswith(f"{path}:{lineno}: "), (name, msg)
        if name in ("wrong type", "missing field", "empty messages", "roles out of order", "unknown role"):
            assert any(f in msg for f in fields), (name, msg)  # the field is named
        seen.add(name)
    assert len(seen) >= 10, seen


def test_bad_records_are_counted_and_skipped_when_the_config_says_so(tmp_path):
    rng = random.Random(0)
    goods = KINDS["sft"][1]
    lines, bad_lines, n_good = [], [], 0
    for _ in range(200):
        if rng.random() < 0.5:
            lines.append(json.dumps(rng.choice(goods)).encode())
            n_good += 1
        else:
            lines.append(_mutations("sft", rng)[1])
            bad_lines.append(len(lines))
    path = str(tmp_path / "mixed.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    records = read_jsonl(path, on_bad="skip", max_line_bytes=MAX_LINE)
    assert len(records) == n_good and [w for w, _ in records.skipped] == [f"{path}:{n}" for n in bad_lines]
    assert all(records.location(i) == f"{path}:{n}" for i, n in enumerate(records.lines))
    assert records.lines == [n for n in range(1, 201) if n not in bad_lines]
    with pytest.raises(DataError, match=rf"{path}:{bad_lines[0]}: "):
        read_jsonl(path, max_line_bytes=MAX_LINE)


def test_a_line_over_the_default_limit_is_an_error_without_reading_it_whole(tmp_path):
    path = str(tmp_path / "huge.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"prompt": "a", "completion": "b"}\n')
        f.write(b'{"prompt": "' + b"x" * (17 << 20) + b'", "completion": "b"}\n')
        f.write(b'{"prompt": "c", "completion": "d"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: line longer than max_line_bytes=16777216"):
        read_jsonl(path)
    assert read_jsonl(path, on_bad="skip").lines == [1, 3]


# ---- bad records found by the pipelines: overlong prompts, a failing tokenizer --------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], vocab_size=64)


def _jsonl(path, records):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_overlong_examples_and_prompts_name_file_and_line(tmp_path, tok):
    long = "1 + 2 = 3 " * 40
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "1 + 1", "completion": "2"}] * 3
                  + [{"prompt": long, "completion": "3"}])
    records = read_jsonl(path)
    it = build_sft_iterator(records, tok, seq_len=32, batch_size=4, packing=False, overlong="error", shuffle=False,
                            num_epochs=1)
    with pytest.raises(DataError, match=rf"{path}:4 \(example 3\): \d+ tokens give \d+ training positions > seq_len"):
        next(it)
    prompts = _prompt_reader(_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1 + 1"}, {"prompt": long}]))
    it = build_prompt_iterator(prompts, tok, batch_size=2, max_prompt_len=16, shuffle=False)
    with pytest.raises(DataError, match=rf"prompts\.jsonl:2 \(prompt 1\): \d+ tokens > max_prompt_len=16"):
        next(it)


class _FailingTokenizer(Tokenizer):
    """A tokenizer that raises on one piece of text (as a chat template may on input it does not expect)."""

    def encode_chat(self, messages, *, add_generation_prompt=False):
        if any(m["content"] == "boom" for m in messages):
            raise RuntimeError("cannot encode 'boom'")
        return super().encode_chat(messages, add_generation_prompt=add_generation_prompt)


def test_a_tokenizer_failing_mid_pipeline_names_the_record(tmp_path, tok):
    failing = copy.copy(tok)
    failing.__class__ = _FailingTokenizer
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "1 + 1", "completion": "2"}] * 5
                  + [{"prompt": "boom", "completion": "3"}])
    it = build_sft_iterator(read_jsonl(path), failing, seq_len=32, batch_size=2, shuffle=False, num_epochs=1)
    with pytest.raises(DataError, match=rf"{path}:6 \(example 5\): the tokenizer failed on this record: "
                                        r"RuntimeError: cannot encode 'boom'") as e:
        for _ in range(4):
            next(it)
    assert isinstance(e.value.__cause__, RuntimeError)


# ---- Hugging Face and params directories ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = tiny_config()
    _, params = cached_lm(cfg)
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    save_pretrained(params, cfg, path)
    return path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file
    fname = os.path.join(path, "model.safetensors")
    tensors = load_file(fname)
    edit(tensors)
    save_file(tensors, fname, metadata={"format": "pt"})


def _edit_config(path, **changes):
    fname = os.path.join(path, "config.json")
    with open(fname) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(fname, "w") as f:
        json.dump(hf, f)


def test_broken_hf_directories_name_the_file_and_tensor(hf_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    st = "model.safetensors"
    path = _copy(hf_dir, tmp_path / "dtype")
    _edit_tensors(path, lambda t: t.update({name: t[name].astype(np.int32)}))
    with pytest.raises(HFFormatError, match=rf"{st}: tensor '{name}' has dtype I32; supported"):
        from_pretrained(path)
    path = _copy(hf_dir, tmp_path / "config")  # config.json disagrees with the weights
    _edit_config(path, hidden_size=32, head_dim=16)
    with pytest.raises(HFFormatError, match=rf"{st}: tensor 'model\.embed_tokens\.weight' has shape \(128, 64\), "
                                            rf"expected \(128, 32\) from config\.json"):
        from_pretrained(path)
    path = _copy(hf_dir, tmp_path / "vocab")
    _edit_config(path, vocab_size=256)
    with pytest.raises(HFFormatError, match=r"tensor 'model\.embed_tokens\.weight' has shape \(128, 64\), expected "
                                            r"\(256, 64\)"):
        from_pretrained(path)
    path = _copy(hf_dir, tmp_path / "truncated")
    fname = os.path.join(path, st)
    with open(fname, "r+b") as f:
        f.truncate(os.path.getsize(fname) - 100)
    with pytest.raises(HFFormatError, match=rf"{st}: not a readable safetensors file"):
        from_pretrained(path)
    path = _copy(hf_dir, tmp_path / "garbled")
    with open(os.path.join(path, st), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(HFFormatError, match=rf"{st}: not a readable safetensors file"):
        from_pretrained(path)
    path = _copy(hf_dir, tmp_path / "config_json")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "llama", ')
    with pytest.raises(HFFormatError, match=r"config\.json: not valid JSON"):
        from_pretrained(path)


def test_params_directory_disagreeing_with_its_config_names_the_file_and_tensor(tmp_path):
    cfg = tiny_config()
    _, params = cached_lm(cfg)
    path = str(tmp_path / "params")
    save_orbax_params(params, cfg, path)
    fname = os.path.join(path, "model_config.json")
    with open(fname) as f:
        saved = json.load(f)
    with open(fname, "w") as f:
        json.dump({**saved, "mlp_dim": 96}, f)
    match = r"step 0: ValueError: .*0/state: tensor 'params/blocks/mlp/down' is stored with shape \(2, 128, 64\), " \
            r"but the target .* \(2, 96, 64\)"
    with pytest.raises(CheckpointError, match=match) as e:
        load_orbax_params(path)
    assert os.path.join(path, "checkpoints") in str(e.value)


def test_a_tokenizer_larger_than_the_models_vocabulary_names_both(hf_dir, tmp_path, tok):
    from jaxpost.config import DataConfig, EvalConfig, MeshConfig
    from jaxpost.recipes import sft

    path = _copy(hf_dir, tmp_path / "model")
    _edit_config(path, vocab_size=16)  # fewer ids than the tokenizer's pieces
    _edit_tensors(path, lambda t: t.update({k: v[:16] for k, v in t.items() if k in ("model.embed_tokens.weight",
                                                                                      "lm_head.weight")}))
    tok.save(os.path.join(path, "tokenizer.model"))
    cfg = sft.SFTConfig(steps=1, init_from=path, data=DataConfig(seq_len=16, batch_size=8),
                        mesh=MeshConfig(data=1, fsdp=-1, tensor=1), eval=EvalConfig(n_examples=0))
    with pytest.raises(ValueError, match=rf"{path}: the tokenizer has {tok.vocab_size} pieces but the model's "
                                         rf"vocabulary \(vocab_size=16, {path}/config\.json\) is smaller"):
        sft.run(cfg, str(tmp_path / "run"))


# ---- nothing unpickles -----------------------------------------------------------------------------------------


def test_no_loading_path_unpickles(tmp_path, monkeypatch, hf_dir, tok):
    from tests.test_hf_tokenizer import QWEN_SPECIALS, QWEN_TEMPLATE, _train_bpe, _write_checkpoint

    # Files first (writing may pickle nothing either, but only loading is under test).
    ckdir = str(tmp_path / "ck")
    ckpt = Checkpointer(ckdir, async_save=False)
    tree = {"params": {"w": jax.numpy.arange(8.0)}, "step": jax.numpy.int32(3)}
    ckpt.save(3, tree, data_state={"position": 3}, meta={"m": 1})
    ckpt.close()
    params_dir = str(tmp_path / "params")
    save_orbax_params(cached_lm(tiny_config())[1], tiny_config(), params_dir)
    tok.save(str(tmp_path / "sp.model"))
    hf_tok = _write_checkpoint(tmp_path / "hf_tok", _train_bpe(QWEN_SPECIALS),
                               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                                "chat_template": QWEN_TEMPLATE})
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1", "completion": "2"}])
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1 + 1", "chosen": "2", "rejected": "3"}])
    np.save(tmp_path / "ref.npy", np.zeros((2, 3), np.float32))

    def refuse(*args, **kw):
        raise AssertionError("a loading path unpickled")

    import _pickle
    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    np_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, allow_pickle=False, **kw: refuse() if allow_pickle
                        else np_load(*a, allow_pickle=False, **kw))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    ckpt = Checkpointer(ckdir, async_save=False)
    state, data_state, _ = ckpt.restore(None, abstract)  # Orbax
    assert data_state == {"position": 3} and int(state["step"]) == 3
    ckpt.restore_params(None, abstract["params"])
    ckpt.close()
    load_orbax_params(params_dir)  # a params directory
    from_pretrained(hf_dir)  # safetensors + config.json
    assert load_tokenizer(str(tmp_path / "sp.model")).vocab_size == tok.vocab_size  # sentencepiece
    assert load_tokenizer(str(hf_tok)).vocab_size > 256  # tokenizer.json
    assert len(read_jsonl(data)) == 1 and len(read_preference_jsonl(pref)) == 1  # JSON data
    from jaxpost.recipes.common import precomputed
    assert precomputed(str(tmp_path / "ref.npy"), 2, iter(()), None).shape == (2, 3)  # cached arrays
