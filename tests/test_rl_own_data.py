"""RL on your own data: the recipe on JSONL prompts with reward functions named by import path (the record's extra
fields reach them), held-out evaluation on a JSONL file or none, errors that name the file and line or the reward,
and normalize_then_sum's per-group z-scores against hand-derived numbers (TRL's convention)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.config import DataConfig, EvalConfig, MeshConfig, OptimConfig, RolloutConfig, TrainConfig
from jaxpost.data import DataError, make_task
from jaxpost.losses.advantages import grpo
from jaxpost.recipes import rl, sft
from jaxpost.recipes.common import task_accuracy
from jaxpost.rollout.reward_registry import accuracy_reward_name, build_reward_set, parse_rewards
from jaxpost.rollout.rewards import RewardSet, digit_match_reward, group_zscores, task_reward
from jaxpost.tokenizers import train_tokenizer
from jaxpost.train.loop import read_metrics
from tests import own_reward_fns
from tests.helpers import cached_lm, mesh_of, tiny_config

OWN = "tests.own_reward_fns:echo_fields"

# ------------------------------------------------------------------------------------------------ normalize_then_sum


def test_normalize_then_sum_standardises_each_function_within_its_group():
    # two prompts x G=4 samples; function a is 0/1, function b a length on another scale
    a = {"c0": 1.0, "c1": 0.0, "c2": 0.0, "c3": 1.0, "d0": 1.0, "d1": 1.0, "d2": 1.0, "d3": 1.0}
    b = {"c0": 2.0, "c1": 4.0, "c2": 6.0, "c3": 8.0, "d0": 10.0, "d1": 10.0, "d2": 10.0, "d3": 30.0}
    completions = list(a)
    fns = {"a": lambda p, c, **_: a[c], "b": lambda p, c, **_: b[c]}
    rs = RewardSet(fns, weights={"a": 1.0, "b": 0.5}, timeout_s=None, aggregation="normalize_then_sum")
    res = rs(["p"] * 8, completions, [{}] * 8, group_size=4)
    eps = 1e-4
    # a, group 1: mean 0.5, deviations +-0.5, std (ddof=1) = sqrt(4 * 0.25 / 3) = 1/sqrt(3); group 2 constant: 0
    za = np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / np.array([1 / np.sqrt(3) + eps] * 4 + [1.0] * 4)
    # b, group 1: mean 5, deviations -3 -1 1 3, std = sqrt(20 / 3); group 2: mean 15, deviations -5 -5 -5 15,
    # std = sqrt(300 / 3) = 10
    zb = np.array([-3, -1, 1, 3, -5, -5, -5, 15]) / np.array([np.sqrt(20 / 3) + eps] * 4 + [10 + eps] * 4)
    np.testing.assert_allclose(res.total, za + 0.5 * zb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.total[4:], [-0.25, -0.25, -0.25, 0.75], atol=1e-5)  # 0.5 * z_b of group 2
    np.testing.assert_array_equal(res.per_function["b"], list(b.values()))  # the raw values are kept
    np.testing.assert_allclose(res.total.reshape(2, 4).sum(axis=1), 0.0, atol=1e-5)  # each group sums to 0
    # "sum": the plain weighted sum of the same values
    plain = RewardSet(fns, weights={"a": 1.0, "b": 0.5}, timeout_s=None)(["p"] * 8, completions, [{}] * 8)
    np.testing.assert_allclose(plain.total, np.array(list(a.values())) + 0.5 * np.array(list(b.values())))
    # a function's scale does not matter after normalising (up to eps); a group of one sample gets 0
    scaled = RewardSet({"a": fns["a"], "b": lambda p, c, **_: 100 * b[c]}, weights={"b": 0.5}, timeout_s=None,
                       aggregation="normalize_then_sum")(["p"] * 8, completions, [{}] * 8, group_size=4)
    np.testing.assert_allclose(scaled.total, res.total, atol=1e-4)
    np.testing.assert_array_equal(group_zscores(np.array([3.0, 7.0]), group_size=1), [0.0, 0.0])
    with pytest.raises(ValueError, match="needs the group size"):
        rs(["p"] * 8, completions, [{}] * 8)
    with pytest.raises(ValueError, match="needs the group size"):
        rs(["p"] * 8, completions, [{}] * 8, group_size=3)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        RewardSet(fns, aggregation="mean")


def test_normalize_then_sum_with_batch_scaled_grpo_is_trls_advantage():
    # TRL: A = (R - mean_batch(R)) / (std_batch(R) + 1e-4), R = sum_f w_f z_f; every group of R has mean 0, so the
    # GRPO estimator with grpo_scale="batch", eps 1e-4 gives the same numbers
    rng = np.random.default_rng(0)
    raw = {"a": rng.integers(0, 2, 12).astype(float), "b": rng.normal(size=12) * 7}

    def lookup(values):
        return lambda prompt, completion, **_: values[int(completion)]

    fns = {k: lookup(v) for k, v in raw.items()}
    res = RewardSet(fns, weights={"a": 1.0, "b": 0.3}, timeout_s=None, aggregation="normalize_then_sum")(
        ["p"] * 12, [str(i) for i in range(12)], [{}] * 12, group_size=4)
    R = res.total.astype(np.float64)
    trl = (R - R.mean()) / (R.std(ddof=1) + 1e-4)
    ours = np.asarray(grpo(jnp.asarray(res.total), group_size=4, scale="batch", eps=1e-4))
    np.testing.assert_allclose(ours, trl, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the reward list


def test_reward_lists_resolve_built_ins_and_import_paths():
    specs = parse_rewards(f"math_answer, {OWN},format", "1.0,0.5,-0.25")
    assert [(s.name, s.weight) for s in specs] == [("math_answer", 1.0), ("echo_fields", 0.5), ("format", -0.25)]
    assert specs[1].needs == ("answer", "topic") and specs[0].needs == ("answer",) and specs[2].needs == ()
    assert accuracy_reward_name(specs) == "math_answer"
    assert accuracy_reward_name(specs, "none") is None
    assert accuracy_reward_name(specs, OWN) == accuracy_reward_name(specs, "echo_fields") == "echo_fields"
    assert accuracy_reward_name(parse_rewards("format,tests.own_reward_fns:length_reward")) is None
    # TRL's dotted form and an attribute path; weights default to 1
    specs = parse_rewards("tests.own_reward_fns.length_reward,tests.own_reward_fns:Scorers.constant")
    assert [(s.name, s.weight) for s in specs] == [("length_reward", 1.0), ("constant", 1.0)]
    rs = build_reward_set(specs, timeout_s=None)
    np.testing.assert_array_equal(rs(["p"], ["abc"], [{}]).total, [4.0])


def test_the_default_rewards_are_the_tasks_as_before():
    task = make_task("arithmetic", max_digits=2)
    for cfg in (rl.RLConfig(), rl.RLConfig(correctness_weight=2.0, digit_match_weight=0.3)):
        specs = cfg.reward_specs()
        new = build_reward_set(specs, task=task, timeout_s=None)
        functions, weights = {"correct": task_reward(task)}, {"correct": cfg.correctness_weight}
        if cfg.digit_match_weight:
            functions["digit_match"], weights["digit_match"] = digit_match_reward, cfg.digit_match_weight
        old = RewardSet(functions, weights=weights, timeout_s=None)
        exs = [task.example("train", i) for i in range(6)]
        comps = [ex["answer"] if i % 2 else ex["answer"][::-1] + "1" for i, ex in enumerate(exs)]
        args = ([ex["prompt"] for ex in exs], comps, [{"answer": ex["answer"]} for ex in exs])
        a, b = new(*args, group_size=2), old(*args)
        assert list(a.per_function) == list(b.per_function) and new.weights == old.weights
        np.testing.assert_array_equal(a.total, b.total)
        assert accuracy_reward_name(specs, cfg.accuracy_reward) == "correct"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rewards": "tests.no_such_module:fn"},
     "reward 'tests.no_such_module:fn': cannot import module 'tests.no_such_module'"),
    ({"rewards": "tests.own_reward_fns:missing"}, "'tests.own_reward_fns' has no attribute 'missing'"),
    ({"rewards": "tests.own_reward_fns:NOT_CALLABLE"}, "reward 'tests.own_reward_fns:NOT_CALLABLE' is not callable"),
    ({"rewards": "tests.own_reward_fns:batched_trl_style"}, "cannot be called as fn\\(prompt, completion"),
    ({"rewards": "tests.own_reward_fns:no_kwargs"}, "has no \\*\\*kwargs"),
    ({"rewards": "mathanswer"}, "reward 'mathanswer': not an import path .*math_answer"),
    ({"rewards": "math_answer,format", "reward_weights": "1.0"}, "gives 1 weight\\(s\\) for 2 reward\\(s\\)"),
    ({"rewards": "math_answer,format", "reward_weights": "1.0,heavy"},
     "weight 'heavy' of reward 'format' is not a number"),
    ({"rewards": "math_answer", "reward_weights": "nan"}, "weight 'nan' of reward 'math_answer' is not finite"),
    ({"rewards": "math_answer,tests.own_reward_fns:Scorers.constant,tests.own_reward_fns:Scorers.constant"},
     "share the name 'constant'"),
    ({"rewards": "math_answer,"}, "empty entry"),
    ({"reward_weights": "2.0"}, "reward_weights='2.0' without `rewards`"),
    ({"rewards": "math_answer", "digit_match_weight": 0.5}, "name every reward there"),
    ({"prompts_jsonl": "train.jsonl"}, "prompts_jsonl needs `rewards`"),
    ({"rewards": "format", "accuracy_reward": "math_answer"}, "accuracy_reward 'math_answer' is none of"),
    ({"rewards": "format", "reward_aggregation": "mean"}, "reward_aggregation must be one of"),
])
def test_reward_config_errors_name_the_reward_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rl.RLConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ the recipe

EVAL = EvalConfig(n_examples=8, batch_size=8, max_prompt_len=16, max_new_tokens=5)
RO = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=5, max_prompt_len=16)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft"))
    cfg = sft.SFTConfig(steps=6, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
                        optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                        train=TrainConfig(checkpoint_every=0, log_every=3), eval=EvalConfig(n_examples=8, batch_size=8))
    sft.run(cfg, path)
    return path


def _records(task, split, n, start=0):
    """Prompt records in both formats, with extra fields: every third a chat ending in the reference answer."""
    out = []
    for i in range(start, start + n):
        ex = task.example(split, i)
        topic = "sum" if "+" in ex["prompt"] else "other"
        if i % 3 == 2:
            out.append({"messages": [{"role": "user", "content": ex["prompt"]},
                                     {"role": "assistant", "content": ex["answer"]}],
                        "answer": ex["answer"], "topic": topic, "id": f"{split}-{i}"})
        else:
            out.append({"prompt": ex["prompt"], "answer": ex["answer"], "topic": topic, "id": f"{split}-{i}"})
    return out


def _write(path, records, *, blank_after: int | None = None):
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(sft_dir, **kw):
    return rl.RLConfig(steps=2, init_from=sft_dir, rollout=RO, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                       mesh=MeshConfig(data=4, fsdp=2, tensor=1), eval=EVAL,
                       train=TrainConfig(checkpoint_every=0, log_every=1, async_checkpoints=False), **kw)


def test_recipe_on_a_jsonl_file_with_an_imported_reward(sft_dir, tmp_path):
    task = make_task("arithmetic", max_digits=2)
    train, test = _records(task, "train", 12), _records(task, "test", 6)
    cfg = _cfg(sft_dir, prompts_jsonl=_write(tmp_path / "train.jsonl", train, blank_after=3),
               eval_jsonl=_write(tmp_path / "test.jsonl", test), rewards=f"math_answer,{OWN}",
               reward_weights="1.0,0.5")
    own_reward_fns.CALLS.clear()
    res = rl.run(cfg, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved) == {"accuracy_before", "accuracy_after", "eval_reward_before", "eval_reward_after", "samples",
                          "estimator", "policy_loss", "value", "rl_time_s", "sft_dir", "steps", "resumed_from_step",
                          "train_time_s", "wall_time_s", "curves", "reward_mean_first10", "reward_mean_last10",
                          "response_length_first10", "response_length_last10"}
    assert [it for it, _ in saved["curves"]["reward_mean"]] == [1, 2]
    assert saved["steps"] == 2 and res["accuracy_after"] == saved["accuracy_after"]
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= saved[key] <= 1.0
    # the eval reward is math_answer + 0.5 * echo_fields, averaged: between 0 and 1.5
    assert 0.0 <= saved["eval_reward_before"] <= 1.5 and 0.0 <= saved["eval_reward_after"] <= 1.5
    assert len(saved["samples"]) == 5 and {"prompt", "completion", "answer", "reward", "correct"} <= set(
        saved["samples"][0])
    rows = read_metrics(os.path.join(tmp_path / "run", "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert {"reward/math_answer", "reward/echo_fields", "accuracy", "reward_mean"} <= set(r)
        assert r["accuracy"] == r["reward/math_answer"]
        assert r["reward_mean"] == pytest.approx(r["reward/math_answer"] + 0.5 * r["reward/echo_fields"], abs=1e-6)
    evals = [r for r in rows if "eval_reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 2] and all("eval_accuracy" in r for r in evals)
    assert evals[0]["eval_reward_mean"] == saved["eval_reward_before"]

    # the imported reward got every record's extra fields: 2 iterations x 16 samples, then 2 x 6 held-out prompts
    by_id = {r["id"]: r for r in train + test}
    calls = own_reward_fns.CALLS
    assert len(calls) == 2 * RO.rows + 2 * len(test)
    for call in calls:
        record = by_id[call["id"]]
        prompt = record.get("prompt") or record["messages"][0]["content"]
        assert (call["prompt"], call["answer"], call["topic"]) == (prompt, record["answer"], record["topic"])
        if "messages" in record:  # the final assistant turn is left out of the prompt and travels as `reference`
            assert set(call) == {"prompt", "completion", "answer", "topic", "id", "reference"}
            assert call["reference"] == record["answer"]
        else:
            assert set(call) == {"prompt", "completion", "answer", "topic", "id"}
    assert {c["id"] for c in calls} & {r["id"] for r in test} == {r["id"] for r in test}


def test_recipe_with_normalize_then_sum_and_no_eval_file_skips_evaluation(sft_dir, tmp_path):
    task = make_task("arithmetic", max_digits=2)
    cfg = _cfg(sft_dir, prompts_jsonl=_write(tmp_path / "train.jsonl", _records(task, "train", 8)),
               rewards=f"{OWN},tests.own_reward_fns:length_reward", reward_weights="1.0,0.1",
               reward_aggregation="normalize_then_sum", accuracy_reward="echo_fields")
    res = rl.run(cfg, str(tmp_path / "run"))
    assert res["accuracy_before"] is None and res["accuracy_after"] is None and res["samples"] == []
    rows = read_metrics(os.path.join(tmp_path / "run", "metrics.jsonl"))
    assert not any(k.startswith("eval_") for r in rows for k in r)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:  # the trainer handed its group size over: every group's aggregate sums to 0
        assert abs(r["reward_mean"]) < 1e-5 and r["accuracy"] == r["reward/echo_fields"]
        assert r["reward/length_reward"] > 0  # under "sum" the mean would be > 0


def test_jsonl_evaluation_decodes_like_the_task_evaluation():
    # the held-out JSONL evaluation and the built-in task's see the same greedy completions of the same prompts
    # (random params: non-empty completions; 5 of 7 records in batches of 4, the second one with filler rows)
    lm, params = cached_lm(tiny_config())
    task = make_task("arithmetic", max_digits=2)
    tokenizer = train_tokenizer(task.corpus(400), vocab_size=64)
    examples = task.examples("test", 7)
    records = [{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in examples]
    cfg = EvalConfig(n_examples=5, batch_size=4, max_prompt_len=16, max_new_tokens=5)
    mesh = mesh_of(4, 2, 1)
    rewards = RewardSet({"correct": task_reward(task), "length": own_reward_fns.length_reward},
                        weights={"length": 0.1}, timeout_s=None)
    out = rl.reward_evaluator(lm, tokenizer, records, rewards, cfg, mesh, accuracy_key="correct")(params, full=True)
    ref = task_accuracy(lm, params, tokenizer, task, examples[:5], cfg, mesh)
    completions = [s["completion"] for s in out["samples"]]
    assert completions == [s["completion"] for s in ref["samples"]] and any(completions)
    assert out["metrics"]["eval_accuracy"] == ref["accuracy"]
    expected = np.mean([float(s["correct"]) + 0.1 * len(s["completion"]) for s in ref["samples"]])
    assert out["metrics"]["eval_reward_mean"] == pytest.approx(expected, rel=1e-6)
    assert [s["answer"] for s in out["samples"]] == [ex["answer"] for ex in examples[:5]]


# ------------------------------------------------------------------------------------------------ data errors


def test_bad_jsonl_lines_are_named_by_file_and_line(sft_dir, tmp_path):
    task = make_task("arithmetic", max_digits=2)
    good = _records(task, "train", 4)
    rewards = {"rewards": f"math_answer,{OWN}"}

    def fails(match, **files):
        cfg = _cfg(sft_dir, **rewards, **{k: str(v) for k, v in files.items()})
        with pytest.raises(DataError, match=match):
            rl.run(cfg, str(tmp_path / "run"))

    # invalid JSON on line 4 (line 3 is blank: read_jsonl's numbering counts it)
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), json.dumps(good[1]), "", '{"prompt": "What is', ""]))
    fails(f"{path}:4: invalid JSON", prompts_jsonl=path)
    # neither prompt nor messages
    path = _write(tmp_path / "noprompt.jsonl", [good[0], {"question": "What is 1 + 1?", "answer": "2"}])
    fails(f"{path}:2: .*neither 'prompt' nor 'messages'", prompts_jsonl=path)
    # a field the imported reward requires (a keyword parameter without default) is missing
    path = _write(tmp_path / "notopic.jsonl", [good[0], good[1], {"prompt": "What is 1 + 1?", "answer": "2"}])
    fails(f"{path}:3: missing field 'topic' \\(read by reward '{OWN}'\\)", prompts_jsonl=path)
    # a prompt longer than rollout.max_prompt_len tokens, after a blank line
    long = {"prompt": " + ".join(["12"] * 20), "answer": "240", "topic": "sum"}
    path = _write(tmp_path / "long.jsonl", [good[0], good[1], long], blank_after=1)
    fails(f"{path}:4: prompt has \\d+ tokens > rollout.max_prompt_len=16", prompts_jsonl=path)
    # held-out records need an answer
    train = _write(tmp_path / "train.jsonl", good)
    path = _write(tmp_path / "eval.jsonl", [good[0], {"prompt": "What is 1 + 1?", "topic": "sum"}])
    fails(f"{path}:2: missing field 'answer'", prompts_jsonl=train, eval_jsonl=path)
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        rl.run(_cfg(sft_dir, **rewards, prompts_jsonl=str(tmp_path / "absent.jsonl")), str(tmp_path / "run"))
