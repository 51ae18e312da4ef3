"""Tests for jaxpost.data.preference: record forms, the paired and KTO grain pipelines, built-in preference sets."""

import json
import random

import numpy as np
import pytest

from jaxpost.data import (
    NEAR_MISS_KINDS,
    PREFERENCE_STATS_KEYS,
    ArithmeticTask,
    DataError,
    arithmetic_near_miss,
    arithmetic_preference_records,
    arithmetic_preference_source,
    build_kto_iterator,
    build_preference_iterator,
    kto_records_from_pairs,
    kto_records_from_samples,
    normalize_kto_record,
    normalize_preference_record,
    preference_records_from_samples,
    read_kto_jsonl,
    read_preference_jsonl,
)
from jaxpost.tokenizers import train_tokenizer

SEQ_LEN = 48
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _pairs(n):
    """Distinct string-form pairs of varied lengths."""
    return [
        {
            "prompt": f"Item {i}: say {' '.join(WORDS[: 1 + i % 6])}.",
            "chosen": f"{i} {' '.join(WORDS[: 1 + (5 * i) % 6])}",
            "rejected": f"no {' '.join(WORDS[: 1 + (7 * i) % 4])}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    texts = [v for r in _pairs(60) for v in r.values()] + ["You are helpful. Hello there, how are you? I am fine, ok."]
    return train_tokenizer(texts, vocab_size=200)


@pytest.fixture(scope="module")
def arith():
    task = ArithmeticTask(max_digits=3, ops=("+", "-", "*"))
    return task, train_tokenizer(task.corpus(200), vocab_size=64)


def _pref(source, tok, **kwargs):
    defaults = dict(seq_len=SEQ_LEN, batch_size=4, process_index=0, process_count=1)
    return build_preference_iterator(source, tok, **{**defaults, **kwargs})


def _kto(source, tok, **kwargs):
    defaults = dict(seq_len=SEQ_LEN, batch_size=4, process_index=0, process_count=1)
    return build_kto_iterator(source, tok, **{**defaults, **kwargs})


def _sequence(batch, r, prefix=""):
    """The full token sequence of row r (inputs plus the last target) and its loss mask per target."""
    n = int(batch[f"{prefix}segment_ids"][r].sum())
    inputs, targets = batch[f"{prefix}inputs"][r, :n], batch[f"{prefix}targets"][r, :n]
    return [*inputs.tolist(), int(targets[-1])], batch[f"{prefix}loss_mask"][r, :n]


def _expected(tok, prompt, completion):
    """(prompt ids with the generation prompt, full ids) of a string prompt answered by a string completion."""
    prompt_ids = tok.encode_chat([_user(prompt)], add_generation_prompt=True)[0]
    return prompt_ids, tok.encode_prompt_completion(prompt, completion)[0]


def _real_pairs(batches, tok):
    """(prompt, chosen, rejected) decoded texts of every real pair in paired batches."""
    out = []
    for b in batches:
        for i in np.nonzero(b["pair_mask"])[0]:
            (c, mc), (r, mr) = _sequence(b, 2 * i), _sequence(b, 2 * i + 1)
            start = 1 + int(np.argmax(mc))  # first completion token (target of the first loss position)
            out.append((tok.decode(c[:start]), tok.decode(c[start:]), tok.decode(r[start:])))
    return out


# ------------------------------------------------------------------------------------------------ records


def test_every_paired_form_normalises_to_the_same_record():
    prompt, chosen, rejected = "What is up?", "Fine.", "Bad."
    history = [{"role": "system", "content": "Be brief."}, _user(prompt)]
    canonical = {"prompt": [_user(prompt)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}
    standard = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": 3}
    conversational = {"prompt": [_user(prompt)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}
    implicit = {"chosen": [*history, _assistant(chosen)], "rejected": [*history, _assistant(rejected)]}
    assert normalize_preference_record(standard) == {**canonical, "id": 3}
    assert normalize_preference_record(conversational) == canonical
    assert normalize_preference_record(implicit) == {**canonical, "prompt": history}
    # Idempotent, and a multi-turn completion keeps its turns.
    assert normalize_preference_record(normalize_preference_record(standard)) == {**canonical, "id": 3}
    turns = [_assistant("a"), _user("more?"), _assistant("b")]
    assert normalize_preference_record({"prompt": prompt, "chosen": turns, "rejected": "c"})["chosen"] == turns

    kto = {"prompt": prompt, "completion": [_assistant(chosen)], "label": False, "w": 1}
    assert normalize_kto_record(kto) == {"prompt": [_user(prompt)], "completion": [_assistant(chosen)],
                                         "label": False, "w": 1}


BAD_PAIRS = [
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": 4}', "field 'rejected' must be a string or a list of messages"),
    ('{"prompt": "a", "chosen": [{"role": "bot", "content": "b"}], "rejected": "c"}',
     r"field 'chosen': messages\[0\]\.role must be one of"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', r"field 'prompt': messages\[0\] is missing"),
    ('{"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "c"}]}',
     "field 'rejected' must start with an assistant turn"),
    ('{"prompt": "a", "chosen": [], "rejected": "c"}', "field 'chosen' must not be an empty list"),
    ('{"chosen": "b", "rejected": "c"}', "field 'chosen' must be a list of messages when there is no 'prompt'"),
    ('{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "c"}]}',
     "field 'chosen' must end with an assistant turn"),
    ('{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     '"rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]}',
     r"field 'rejected' differs from 'chosen' .*messages\[0\]"),
    ('{"prompt": "a", "chosen": "b", ', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
]


@pytest.mark.parametrize("bad_line, match", BAD_PAIRS)
def test_bad_paired_records_name_file_line_and_field(tmp_path, bad_line, match):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(_pairs(1)[0])
    path.write_text("\n".join([good, "", bad_line, good]) + "\n")
    with pytest.raises(DataError, match=match) as info:
        read_preference_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("bad_line, match", [
    ('{"prompt": "a", "completion": "b"}', "missing field 'label'"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "field 'label' must be a boolean"),
    ('{"prompt": "a", "completion": 3, "label": true}', "field 'completion' must be a string or a list"),
])
def test_bad_kto_records_name_file_line_and_field(tmp_path, bad_line, match):
    path = tmp_path / "kto.jsonl"
    good = json.dumps({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True})
    path.write_text("\n".join([good, bad_line]) + "\n")
    with pytest.raises(DataError, match=match) as info:
        read_kto_jsonl(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_malformed_record_in_the_pipeline_names_example_and_field(tok):
    records = _pairs(3) + [{"prompt": "a", "chosen": "b", "rejected": None}]
    with pytest.raises(DataError, match="example 3: field 'rejected' must be a string"):
        list(_pref(records, tok, num_epochs=1))


# ------------------------------------------------------------------------------------------------ paired pipeline


def test_paired_batch_layout_and_completion_only_masks(tok):
    records = _pairs(10)
    it = _pref(records, tok, num_epochs=1, shuffle=False)
    batches = list(it)
    assert len(batches) == 3 and it.stats == {"examples_seen": 10, "truncated": 0, "dropped_overlong": 0}
    b = batches[0]
    dtypes = dict(inputs=np.int32, targets=np.int32, loss_mask=np.float32, segment_ids=np.int32, positions=np.int32)
    assert set(b) == {*dtypes, "pair_mask"}
    for key, dtype in dtypes.items():
        assert b[key].shape == (8, SEQ_LEN) and b[key].dtype == dtype, key
    assert b["pair_mask"].shape == (4,) and b["pair_mask"].dtype == np.float32
    assert batches[-1]["pair_mask"].tolist() == [1, 1, 0, 0]
    assert not batches[-1]["segment_ids"][4:].any() and not batches[-1]["loss_mask"][4:].any()

    for bi, batch in enumerate(batches):
        for i in np.nonzero(batch["pair_mask"])[0]:
            record = records[4 * bi + i]
            prompt_ids, _ = _expected(tok, record["prompt"], "")
            P = len(prompt_ids)
            for r, side in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
                ids, mask = _sequence(batch, r)
                n = len(ids) - 1
                assert ids == _expected(tok, record["prompt"], record[side])[1]
                assert ids[:P] == prompt_ids  # both rows share the prompt tokens
                # Loss exactly on the positions whose target is a completion token (content and eos).
                assert mask.tolist() == [0.0] * (P - 1) + [1.0] * (n - P + 1)
                assert batch["targets"][r, n - 1] == tok.eos_id
                assert np.array_equal(batch["positions"][r, :n], np.arange(n))
                assert (batch["segment_ids"][r, :n] == 1).all() and not batch["segment_ids"][r, n:].any()
                assert (batch["inputs"][r, n:] == tok.pad_id).all() and not batch["loss_mask"][r, n:].any()


def test_multi_turn_prompt_is_context_only(tok):
    history = [_user("Hello there"), _assistant("I am fine"), _user("how are you?")]
    record = {"chosen": [*history, _assistant("fine")], "rejected": [*history, _assistant("ok")]}
    b = next(_pref([record], tok, num_epochs=1))
    ids, mask = _sequence(b, 0)
    full, full_mask = tok.encode_chat(record["chosen"])
    assert ids == full and sum(full_mask[1:]) > mask.sum() > 0  # the history's assistant turn is not trained on
    assert tok.decode([t for t, m in zip(ids[1:], mask) if m]) == "fine"


def _long_pairs():
    """Pairs 0-3 short; 4 a long chosen completion; 5 a long prompt; 6 both long."""
    digits = " ".join(str(i) for i in range(30))  # split digits: > 1 token per number
    records = _pairs(4)
    records.append({"prompt": "Hi", "chosen": digits, "rejected": "no"})
    records.append({"prompt": digits, "chosen": "alpha", "rejected": "beta gamma"})
    records.append({"prompt": digits, "chosen": "ok " + digits, "rejected": "no"})
    return records


def test_truncation_keeps_prompt_end_and_completion_start(tok):
    records = _long_pairs()
    max_prompt_len = 16
    it = _pref(records, tok, num_epochs=1, shuffle=False, batch_size=8, max_prompt_len=max_prompt_len)
    b = next(it)
    assert it.stats == {"examples_seen": 7, "truncated": 3, "dropped_overlong": 0}
    assistant = tok.marker_ids("<|assistant|>")
    for i, record in enumerate(records):
        prompt_ids, _ = _expected(tok, record["prompt"], "")
        (c, mc), (r, mr) = _sequence(b, 2 * i), _sequence(b, 2 * i + 1)
        start_c, start_r = 1 + int(np.argmax(mc)), 1 + int(np.argmax(mr))
        assert start_c == start_r and c[:start_c] == r[:start_r]  # one shared (truncated) prompt
        kept_prompt = c[:start_c]
        assert kept_prompt[0] == tok.bos_id and tuple(kept_prompt[-len(assistant):]) == assistant
        assert max(len(c), len(r)) <= SEQ_LEN + 1
        if i < 4:
            assert kept_prompt == prompt_ids and len(c) < SEQ_LEN + 1
            continue
        assert max(len(c), len(r)) == SEQ_LEN + 1
        # The prompt keeps its bos and its end; it is cut to no less than max_prompt_len tokens.
        assert kept_prompt[1:] == prompt_ids[len(prompt_ids) - len(kept_prompt) + 1 :]
        completions = [_expected(tok, record["prompt"], record[side])[1][len(prompt_ids) :]
                       for side in ("chosen", "rejected")]
        longest = max(map(len, completions))
        assert len(kept_prompt) == min(len(prompt_ids), max(max_prompt_len, SEQ_LEN + 1 - longest))
        for completion, seq in zip(completions, (c, r)):
            assert seq[start_c:] == completion[: len(seq) - start_c]  # the completion's start
    # Pair 5: only the prompt was too long; its completions are whole.
    assert tok.decode(_sequence(b, 11)[0][1 + int(np.argmax(_sequence(b, 11)[1])):]) == "beta gamma"


def test_overlong_drop_and_error(tok):
    records = _long_pairs()
    it = _pref(records, tok, num_epochs=1, overlong="drop")
    pairs = _real_pairs(list(it), tok)
    assert len(pairs) == 4
    assert it.stats == {"examples_seen": 7, "truncated": 0, "dropped_overlong": 3}
    with pytest.raises(DataError, match=r"example [456]: prompt \+ longest completion is \d+ tokens.*seq_len=48"):
        list(_pref(records, tok, num_epochs=1, overlong="error"))


def test_state_round_trip_resumes_exactly(tok):
    records = _long_pairs() + _pairs(30)[4:]
    kwargs = dict(batch_size=2, seed=5, max_prompt_len=16)
    it = _pref(records, tok, **kwargs)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    stats_at_save = it.stats
    expected = [next(it) for _ in range(14)]  # runs into the second epoch
    expected_stats = it.stats
    resumed = _pref(records, tok, **kwargs)
    resumed.set_state(state)
    assert resumed.stats == stats_at_save
    for b_exp in expected:
        b_got = next(resumed)
        for key in b_exp:
            np.testing.assert_array_equal(b_exp[key], b_got[key], err_msg=key)
    assert resumed.stats == expected_stats and expected_stats["examples_seen"] == 36
    assert set(expected_stats) == set(PREFERENCE_STATS_KEYS) and expected_stats["truncated"] == 3
    with pytest.raises(ValueError, match="seq_len: saved 48 vs now 32"):
        _pref(records, tok, **{**kwargs, "seq_len": 32}).set_state(state)


def test_process_sharding_splits_pairs_disjointly(tok):
    records = _pairs(12)
    kwargs = dict(num_epochs=1, seed=3, batch_size=4)
    single = _real_pairs(list(_pref(records, tok, **kwargs)), tok)
    shards = [list(_pref(records, tok, process_index=p, process_count=2, **kwargs)) for p in range(2)]
    assert shards[0][0]["inputs"].shape == (4, SEQ_LEN) and shards[0][0]["pair_mask"].shape == (2,)
    pairs0, pairs1 = (_real_pairs(s, tok) for s in shards)
    assert len(single) == 12 and len(pairs0) == len(pairs1) == 6
    assert not set(pairs0) & set(pairs1) and set(pairs0) | set(pairs1) == set(single)
    expected = {(f"<|user|>{r['prompt']}<|end|><|assistant|>", r["chosen"], r["rejected"]) for r in records}
    assert set(single) == expected


def test_invalid_settings(tok):
    with pytest.raises(ValueError, match="overlong must be one of"):
        _pref(_pairs(2), tok, overlong="cut")
    with pytest.raises(ValueError, match=r"max_prompt_len must be an int in \[1, seq_len=48\]"):
        _pref(_pairs(2), tok, max_prompt_len=49)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        _kto(_pairs(2), tok, process_count=3)
    with pytest.raises(ValueError, match="source is empty"):
        _pref([], tok)


# ------------------------------------------------------------------------------------------------ KTO pipeline


def test_kto_rows_labels_and_shifted_kl_rows(tok):
    pairs = _pairs(5)
    records = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(pairs)]
    it = _kto(records, tok, num_epochs=1, shuffle=False, batch_size=3)
    batches = list(it)
    assert len(batches) == 2 and it.stats["examples_seen"] == 5
    b = batches[0]
    assert b["kl_inputs"].shape == b["inputs"].shape == (3, SEQ_LEN) and b["label"].dtype == np.int32
    assert b["label"].tolist() == [1, 0, 1] and b["example_mask"].tolist() == [1, 1, 1]
    assert batches[1]["label"].tolist() == [0, 1, 0] and batches[1]["example_mask"].tolist() == [1, 1, 0]
    for bi, batch in enumerate(batches):
        n = int(batch["example_mask"].sum())
        for i in range(n):
            mine, other = records[3 * bi + i], records[3 * bi + (i + 1) % n]
            ids, mask = _sequence(batch, i)
            prompt_ids, full = _expected(tok, mine["prompt"], mine["completion"])
            assert ids == full and mask.sum() == len(full) - len(prompt_ids)
            kl_ids, kl_mask = _sequence(batch, i, prefix="kl_")
            assert kl_ids == _expected(tok, mine["prompt"], other["completion"])[1]
            assert kl_mask.tolist() == [0.0] * (len(prompt_ids) - 1) + [1.0] * (len(kl_ids) - len(prompt_ids))
            assert np.array_equal(batch["kl_positions"][i, : len(kl_ids) - 1], np.arange(len(kl_ids) - 1))
        assert not batch["kl_segment_ids"][n:].any() and not batch["kl_loss_mask"][n:].any()


def test_kto_state_round_trip(tok):
    records = kto_records_from_pairs(_long_pairs())
    it = _kto(records, tok, batch_size=3, seed=2, max_prompt_len=16)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = _kto(records, tok, batch_size=3, seed=2, max_prompt_len=16)
    resumed.set_state(state)
    for b_exp in expected:
        b_got = next(resumed)
        for key in b_exp:
            np.testing.assert_array_equal(b_exp[key], b_got[key], err_msg=key)
    assert resumed.stats == it.stats and it.stats["truncated"] > 0
    with pytest.raises(ValueError, match="kind: saved 'kto' vs now 'preference'"):
        _pref(records, tok, batch_size=3, seed=2, max_prompt_len=16).set_state(state)


# ------------------------------------------------------------------------------------------------ built-in sets


def test_near_misses_are_wrong_deterministic_and_varied(arith):
    task, _ = arith
    records = arithmetic_preference_records(task, "train", 400, seed=1)
    assert records == arithmetic_preference_records(task, "train", 400, seed=1)
    assert records[100:110] == arithmetic_preference_records(task, "train", 10, seed=1, start=100)
    assert records != arithmetic_preference_records(task, "train", 400, seed=2)
    assert {r["near_miss"] for r in records} == set(NEAR_MISS_KINDS)
    for r in records:
        assert task.check(r["chosen"], r["answer"]) and not task.check(r["rejected"], r["answer"])
        assert r["chosen"] == r["answer"] and r["rejected"] != r["chosen"]
        assert r["rejected"].lstrip("-") == "0" or not r["rejected"].lstrip("-").startswith("0")
    source = arithmetic_preference_source(task, "test", seed=1)
    assert source[7] == arithmetic_preference_records(task, "test", 1, seed=1, start=7)[0]
    # Every kind applies to the answers it can; small answers included.
    rng = random.Random(0)
    for answer in [0, 1, -1, 9, 10, -10, 11, 100, 101, -907, 123456]:
        for _ in range(30):
            wrong, kind = arithmetic_near_miss(answer, rng)
            assert wrong != answer and kind in NEAR_MISS_KINDS
            assert not task.check(str(wrong), str(answer))


def test_arithmetic_pairs_feed_both_pipelines(arith):
    task, atok = arith
    records = arithmetic_preference_records(task, "train", 6)
    pairs = _real_pairs(list(_pref(records, atok, seq_len=24, num_epochs=1, shuffle=False)), atok)
    assert [(c, r) for _, c, r in pairs] == [(r["chosen"], r["rejected"]) for r in records]
    kto = kto_records_from_pairs(records)
    assert [r["label"] for r in kto] == [True, False] * 6 and kto[1]["completion"] == records[0]["rejected"]
    b = next(_kto(kto, atok, seq_len=24, shuffle=False))
    assert b["label"].tolist() == [1, 0, 1, 0] and b["loss_mask"].sum() > 0


def test_pairs_and_kto_records_from_samples(arith):
    task, _ = arith
    examples = task.examples("train", 4)
    prompts, answers = [e["prompt"] for e in examples], [e["answer"] for e in examples]
    wrong = [str(int(a) + 1) for a in answers]
    samples = [
        [wrong[0], answers[0], f"It is {answers[0]}.", wrong[0] + "!"],  # 2 correct, 2 wrong
        [answers[1]] * 3,  # all correct: skipped
        [wrong[2], "no idea"],  # all wrong: skipped
        ["x", answers[3], "y"],  # 1 correct
    ]
    records, stats = preference_records_from_samples(prompts, samples, task.check, answers=answers)
    assert stats == {"prompts": 4, "samples": 12, "pairs": 2, "skipped": 2}
    assert [r["prompt"] for r in records] == [prompts[0], prompts[3]]
    for r in records:
        assert task.check(r["chosen"], r["answer"]) and not task.check(r["rejected"], r["answer"])
        assert (r["chosen_reward"], r["rejected_reward"]) == (1.0, 0.0)
    assert records == preference_records_from_samples(prompts, samples, task.check, answers=answers)[0]
    more, stats = preference_records_from_samples(prompts, samples, task.check, answers=answers,
                                                  max_pairs_per_prompt=3)
    assert stats["pairs"] == 3 and {r["chosen"] for r in more[:2]} == {answers[0], f"It is {answers[0]}."}
    # Numeric rewards: best over worst, ties never paired.
    rewards = [[0.2, 0.9, 0.5], [1.0, 1.0], [0.0, -1.0]]
    records, stats = preference_records_from_samples(["p", "q", "r"], [["a", "b", "c"], ["d", "e"], ["f", "g"]],
                                                     rewards)
    assert [(r["chosen"], r["rejected"]) for r in records] == [("b", "a"), ("f", "g")] and stats["skipped"] == 1
    assert all(normalize_preference_record(r) for r in records)
    with pytest.raises(ValueError, match="pass answers="):
        preference_records_from_samples(prompts, samples, task.check)

    kto, stats = kto_records_from_samples(prompts, samples, task.check, answers=answers)
    assert stats == {"prompts": 4, "samples": 12, "desirable": 6, "undesirable": 6}
    assert [r["label"] for r in kto[:4]] == [False, True, True, False]
    assert all(normalize_kto_record(r)["label"] == task.check(r["completion"], r["answer"]) for r in kto)
