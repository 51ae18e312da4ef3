"""Tests for jaxpost.data sources (JSONL validation) and the grain SFT pipeline (packing, policies, resume)."""

import json

import numpy as np
import pytest

from jaxpost.data import (
    STATS_KEYS,
    ArithmeticTask,
    DataError,
    FunctionSource,
    ListSource,
    build_prompt_batches,
    build_sft_iterator,
    read_jsonl,
)
from jaxpost.tokenizers import train_tokenizer

SEQ_LEN = 64


def _records(n: int) -> list[dict]:
    """Distinct prompt/completion records of varied lengths (8-40 tokens each)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [
        {
            "prompt": f"Item {i}: say {' '.join(words[: 1 + i % 6])}.",
            "completion": f"{i} {' '.join(words[: 1 + (7 * i) % 6])}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    texts = [r["prompt"] for r in _records(200)] + [r["completion"] for r in _records(200)]
    texts += ["You are helpful. Hello there, how are you? I am fine. " * 3]
    return train_tokenizer(texts, vocab_size=200)


def _iterator(source, tok, **kwargs):
    defaults = dict(seq_len=SEQ_LEN, batch_size=4, process_index=0, process_count=1)
    return build_sft_iterator(source, tok, **{**defaults, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _segments(batch):
    """Yields (row, segment slice) for every document in a batch."""
    for r, seg_T in enumerate(batch["segment_ids"]):
        for s in np.unique(seg_T[seg_T > 0]):
            idx = np.nonzero(seg_T == s)[0]
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments must be contiguous"
            yield r, slice(idx[0], idx[-1] + 1)


def _doc_ids(batch, r, sl):
    """Full document ids of a segment: its inputs plus the last target."""
    return (*batch["inputs"][r, sl].tolist(), int(batch["targets"][r, sl][-1]))


def _all_docs(batches):
    return [_doc_ids(b, r, sl) for b in batches for r, sl in _segments(b)]


# ------------------------------------------------------------------------------------------------ sources


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_normalises_both_formats(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "id": 7}
    pc = {"prompt": "2+2?", "completion": "4", "source": "math"}
    path = _write(tmp_path, [json.dumps(chat), "", "   ", json.dumps(pc)])
    records = read_jsonl(path)
    assert records == [
        chat,
        {
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "source": "math",
        },
    ]


@pytest.mark.parametrize(
    "bad_line, lineno, match",
    [
        ('{"prompt": "a", "completion": ', 3, "invalid JSON"),
        ('{"prompt": "a"}', 2, "missing field 'completion'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            2,
            r"messages\[1\]\.role must be one of",
        ),
        ('{"messages": [{"role": "user", "content": 5}]}', 3, r"messages\[0\]\.content must be a string"),
        ('{"messages": []}', 2, "must not be empty"),
        ('["not", "an", "object"]', 2, "must be a JSON object"),
        ('{"prompt": "a", "completion": 4}', 2, "field 'completion' must be a string"),
        ('{"text": "a"}', 2, "neither 'messages' nor 'prompt'"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, lineno, match):
    good = json.dumps({"prompt": "a", "completion": "b"})
    lines = [good] * (lineno - 1) + [bad_line, good]
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=match) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:{lineno}: ")
    assert isinstance(info.value, ValueError)


def test_list_and_function_sources():
    records = _records(5)
    assert len(ListSource(records)) == 5 and ListSource(records)[2] == records[2]
    source = FunctionSource(lambda i: {"i": i}, 10)
    assert len(source) == 10 and source[3] == {"i": 3} and source[-1] == {"i": 9}
    with pytest.raises(IndexError):
        source[10]


# ------------------------------------------------------------------------------------------------ pipeline


def test_batch_shapes_and_dtypes(tok):
    batch = next(_iterator(_records(50), tok))
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    dtypes = {
        "inputs": np.int32,
        "targets": np.int32,
        "loss_mask": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    for key, dtype in dtypes.items():
        assert batch[key].shape == (4, SEQ_LEN), key
        assert batch[key].dtype == dtype, key


def test_packing_layout_and_no_cross_document_targets(tok):
    records = _records(60)
    encoded = {}
    for r in records:
        ids, mask = tok.encode_prompt_completion(r["prompt"], r["completion"])
        encoded[tuple(ids)] = mask
    batches = _take(_iterator(records, tok, num_epochs=1), 6)
    max_docs_per_row = 0
    for b in batches:
        for r in range(4):
            seg_T = b["segment_ids"][r]
            # Segment ids are 1..k followed by padding zeros.
            k = int(seg_T.max())
            max_docs_per_row = max(max_docs_per_row, k)
            n = int((seg_T > 0).sum())
            assert list(np.unique(seg_T[:n])) == list(range(1, k + 1)) and not seg_T[n:].any()
            pad = seg_T == 0
            assert (b["inputs"][r][pad] == tok.pad_id).all() and (b["targets"][r][pad] == tok.pad_id).all()
            assert not b["loss_mask"][r][pad].any() and not b["positions"][r][pad].any()
        for r, sl in _segments(b):
            inputs, targets, loss = b["inputs"][r, sl], b["targets"][r, sl], b["loss_mask"][r, sl]
            assert np.array_equal(b["positions"][r, sl], np.arange(sl.stop - sl.start))
            # Each segment is exactly one document, shifted by one, with its own loss mask.
            doc = _doc_ids(b, r, sl)
            assert doc in encoded
            assert np.array_equal(loss, np.asarray(encoded[doc][1:], np.float32))
            assert np.array_equal(targets[:-1], inputs[1:])
            assert targets[-1] == tok.eos_id and inputs[0] == tok.bos_id
        # Every trained target is the next token of the same document.
        rows, cols = np.nonzero(b["loss_mask"])
        for r, t in zip(rows, cols):
            if t + 1 < SEQ_LEN and b["segment_ids"][r, t + 1] == b["segment_ids"][r, t]:
                assert b["targets"][r, t] == b["inputs"][r, t + 1]
    assert max_docs_per_row >= 2


def test_padding_mode_has_one_document_per_row(tok):
    records = _records(20)
    batches = _take(_iterator(records, tok, packing=False, num_epochs=1), 5)
    docs = _all_docs(batches)
    assert len(docs) == 20
    expected = {tuple(tok.encode_prompt_completion(r["prompt"], r["completion"])[0]) for r in records}
    assert set(docs) == expected
    for b in batches:
        assert set(np.unique(b["segment_ids"])) <= {0, 1}
        for r in range(4):
            n = int(b["segment_ids"][r].sum())
            assert (b["segment_ids"][r, :n] == 1).all() and not b["segment_ids"][r, n:].any()
            assert np.array_equal(b["positions"][r, :n], np.arange(n))
            assert (b["inputs"][r, n:] == tok.pad_id).all()


def test_finite_epochs_see_every_example_and_pad_the_last_batch(tok):
    it = _iterator(_records(10), tok, packing=False, num_epochs=1, batch_size=4)
    batches = list(it)
    assert len(batches) == 3 and all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
    assert not batches[-1]["segment_ids"][2:].any()  # 10 = 4 + 4 + 2 rows
    assert it.stats["examples_seen"] == 10
    # Two epochs: each example twice, in a different order the second time.
    docs = _all_docs(list(_iterator(_records(10), tok, packing=False, num_epochs=2, batch_size=2)))
    assert len(docs) == 20 and sorted(docs[:10]) == sorted(docs[10:]) and docs[:10] != docs[10:]


def _long_records(tok):
    """Records 0-4 normal, 5-6 with a long completion, 7 with a long prompt (truncation leaves no loss token)."""
    records = _records(5)
    digits = " ".join(str(i) for i in range(40))  # split_digits: at least one token per digit
    records.append({"prompt": "Hi", "completion": digits})
    records.append({"prompt": "Hi", "completion": "alpha " + digits})
    records.append({"prompt": digits, "completion": "ok"})
    for r in records[5:]:
        assert len(tok.encode_prompt_completion(r["prompt"], r["completion"])[0]) - 1 > SEQ_LEN
    return records


def test_overlong_truncate(tok):
    records = _long_records(tok)
    it = _iterator(records, tok, overlong="truncate", num_epochs=1, shuffle=False)
    batches = list(it)
    assert it.stats == {
        "examples_seen": 8, "truncated": 2, "dropped_overlong": 1, "dropped_empty": 0, "dropped_no_assistant": 0
    }
    lengths = sorted(sl.stop - sl.start for b in batches for _, sl in _segments(b))
    assert len(lengths) == 7 and lengths[-2:] == [SEQ_LEN, SEQ_LEN]


def test_overlong_drop_and_error(tok):
    records = _long_records(tok)
    it = _iterator(records, tok, overlong="drop", num_epochs=1)
    docs = _all_docs(list(it))
    assert len(docs) == 5
    assert it.stats["dropped_overlong"] == 3 and it.stats["truncated"] == 0 and it.stats["examples_seen"] == 8
    with pytest.raises(DataError, match=r"example [567]: .* > seq_len=64"):
        list(_iterator(records, tok, overlong="error", num_epochs=1))


def test_empty_completion_and_no_assistant(tok):
    records = _records(6)
    records[1] = {"prompt": "Say nothing.", "completion": ""}
    records[4] = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": ""}]}
    records.append({"messages": [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hello"}]})

    it = _iterator(records, tok, on_empty="drop", num_epochs=1)
    docs = _all_docs(list(it))
    assert len(docs) == 4
    assert it.stats == {
        "examples_seen": 7, "truncated": 0, "dropped_overlong": 0, "dropped_empty": 2, "dropped_no_assistant": 1
    }

    it = _iterator(records, tok, on_empty="keep", num_epochs=1)
    batches = list(it)
    assert len(_all_docs(batches)) == 6
    assert it.stats["dropped_empty"] == 0 and it.stats["dropped_no_assistant"] == 1
    # A kept empty completion trains on its closing eos only.
    losses = sorted(int(b["loss_mask"][r, sl].sum()) for b in batches for r, sl in _segments(b))
    assert losses[:2] == [1, 1]

    with pytest.raises(DataError, match=r"example [14]: .*empty"):
        list(_iterator(records, tok, on_empty="error", num_epochs=1))


def test_malformed_record_names_example(tok):
    records = _records(4) + [{"prompt": "only a prompt"}]
    with pytest.raises(DataError, match="example 4: missing field 'completion'"):
        list(_iterator(records, tok, num_epochs=1))


@pytest.mark.parametrize("packing", [True, False])
def test_state_round_trip_resumes_identical_batches(tok, packing):
    records = _long_records(tok) + _records(40)[5:]
    records[12] = {"prompt": "Say nothing.", "completion": ""}
    # More packing bins than rows, so the state is taken in the middle of a packed group.
    kwargs = dict(packing=packing, batch_size=2, num_packing_bins=5, overlong="truncate", seed=1)
    it = _iterator(records, tok, **kwargs)
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)
    stats_at_save = it.stats
    expected = _take(it, 3)
    expected_stats = it.stats

    resumed = _iterator(records, tok, **kwargs)
    resumed.set_state(json.loads(json.dumps(state)))
    assert resumed.stats == stats_at_save
    got = _take(resumed, 3)
    for b_exp, b_got in zip(expected, got):
        for key in b_exp:
            np.testing.assert_array_equal(b_exp[key], b_got[key], err_msg=key)
    assert resumed.stats == expected_stats
    assert set(expected_stats) == set(STATS_KEYS) and expected_stats["examples_seen"] > 0


def test_state_from_a_different_pipeline_is_refused(tok):
    it = _iterator(_records(20), tok)
    next(it)
    other = _iterator(_records(20), tok, seq_len=32)
    with pytest.raises(ValueError, match="seq_len: saved 64 vs now 32"):
        other.set_state(it.get_state())


def test_process_sharding_is_disjoint_and_complete(tok):
    records = _records(24)
    kwargs = dict(packing=False, num_epochs=1, seed=3)
    single = _all_docs(list(_iterator(records, tok, batch_size=4, process_index=0, process_count=1, **kwargs)))
    shard0 = _all_docs(list(_iterator(records, tok, batch_size=4, process_index=0, process_count=2, **kwargs)))
    shard1 = _all_docs(list(_iterator(records, tok, batch_size=4, process_index=1, process_count=2, **kwargs)))
    assert len(single) == 24 and len(shard0) == len(shard1) == 12
    assert not set(shard0) & set(shard1)
    assert set(shard0) | set(shard1) == set(single)
    it = _iterator(records, tok, batch_size=4, process_index=1, process_count=2, **kwargs)
    assert next(it)["inputs"].shape == (2, SEQ_LEN)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _iterator(records, tok, batch_size=4, process_index=0, process_count=3)


def test_task_source_feeds_the_pipeline(tok):
    task = ArithmeticTask()
    arith_tok = train_tokenizer(task.corpus(200), vocab_size=64)
    it = _iterator(task.source("train"), arith_tok, batch_size=2)
    batch = next(it)
    assert batch["loss_mask"].sum() > 0 and (batch["segment_ids"].max(axis=1) >= 2).all()


def test_invalid_settings(tok):
    with pytest.raises(ValueError, match="overlong must be one of"):
        _iterator(_records(4), tok, overlong="cut")
    with pytest.raises(ValueError, match="on_empty must be one of"):
        _iterator(_records(4), tok, on_empty="skip")
    with pytest.raises(ValueError, match="source is empty"):
        _iterator([], tok)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
        _iterator(_records(4), tok, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------------------ prompt batches


def test_prompt_batches(tok):
    task = ArithmeticTask()
    arith_tok = train_tokenizer(task.corpus(200), vocab_size=64)
    examples = task.examples("test", 5)
    batches = build_prompt_batches(examples, arith_tok, batch_size=2, max_prompt_len=24)
    assert len(batches) == 3
    assistant_id = arith_tok.marker_ids("<|assistant|>")[0]
    for i, b in enumerate(batches):
        assert b["tokens"].shape == (2, 24) and b["tokens"].dtype == np.int32
        assert b["lengths"].dtype == np.int32
        for r in range(2):
            if not b["valid"][r]:
                continue
            n = b["lengths"][r]
            ex = examples[b["indices"][r]]
            assert b["tokens"][r, n - 1] == assistant_id and (b["tokens"][r, n:] == arith_tok.pad_id).all()
            prompt_ids = arith_tok.encode_chat([ex["messages"][0]], add_generation_prompt=True)[0]
            assert b["tokens"][r, :n].tolist() == prompt_ids
            assert b["answers"][r] == ex["answer"]
    assert batches[-1]["valid"].tolist() == [True, False]
    assert batches[-1]["indices"].tolist() == [4, -1] and batches[-1]["answers"][1] is None
    with pytest.raises(DataError, match="example 0: prompt has .* > max_prompt_len=5"):
        build_prompt_batches(examples, arith_tok, batch_size=2, max_prompt_len=5)
