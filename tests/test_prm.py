"""Process reward models: the per-step BCE against hand values, the step objective's invariance under micro-batch and
device splits, Math-Shepherd labels of a deterministic toy policy, error injection, the AUC, packed rows and their
resumable iterator, and the recipe end to end (resumed after a stop)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.batch import split_microbatches
from jaxpost.config import DataConfig, EvalConfig, MeshConfig, OptimConfig, TaskConfig, TrainConfig
from jaxpost.data.prm import (STEP_KEYS, Solution, StepRowIterator, inject_error, math_shepherd_labels,
                              pack_step_rows, step_ends)
from jaxpost.data.reasoning import ReasoningArithmeticTask
from jaxpost.losses import PROCESS_REWARD_LOSSES, step_bce
from jaxpost.models.heads import ScalarHeadLM
from jaxpost.recipes import prm, sft
from jaxpost.train.loop import read_metrics
from jaxpost.train.prm import ProcessReward
from jaxpost.train.state import TrainState, create_train_state
from jaxpost.train.step import make_step, step_fn
from tests.helpers import cached_lm, max_abs_diff, mesh_of, single_device_mesh, tiny_config

# ---- the loss ------------------------------------------------------------------------------------------------------


def test_zero_logits_cost_log_2_for_any_label_and_the_denominator_counts_labelled_steps():
    z = jnp.zeros((2, 5))
    y = jnp.array([[1.0, 0.0, 0.3, 0.0, 1.0], [0.5, 1.0, 0.0, 0.0, 0.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
    total, n = step_bce(z, y, m)
    assert float(n) == 5.0
    np.testing.assert_allclose(float(total), 5 * math.log(2.0), rtol=1e-6)
    assert PROCESS_REWARD_LOSSES.get("step_bce") is step_bce and PROCESS_REWARD_LOSSES.hparams("step_bce") == {}


def test_soft_and_hard_labels_against_hand_values_and_masked_positions_ignored():
    # sigma(log 3) = 3/4: a soft label 1/4 costs -(1/4 log 3/4 + 3/4 log 1/4); hard 1 costs -log 3/4, hard 0 -log 1/4
    z = jnp.array([[math.log(3.0), math.log(3.0), math.log(3.0), jnp.inf, -jnp.inf]])
    y = jnp.array([[0.25, 1.0, 0.0, 0.0, 1.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 0.0, 0.0]])  # infinite logits at unmasked positions contribute nothing
    total, n = jax.jit(step_bce)(z, y, m)
    want = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) - math.log(0.75) - math.log(0.25)
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert float(n) == 3.0
    grads = jax.grad(lambda z: step_bce(z, y, m)[0])(z)
    # d/dz of the BCE is sigma(z) - y at labelled positions, 0 elsewhere
    np.testing.assert_allclose(np.asarray(grads), [[0.5, -0.25, 0.75, 0.0, 0.0]], atol=1e-6)
    # masked equals sliced
    np.testing.assert_allclose(float(step_bce(z[:, :3], y[:, :3], jnp.ones((1, 3)))[0]), want, rtol=1e-6)


# ---- the step objective ---------------------------------------------------------------------------------------------


def step_batch(rng: np.random.Generator, B: int, T: int, V: int) -> dict:
    """Packed step rows of random solutions with random step ends and soft labels."""
    items = []
    for _ in range(4 * B):  # at least B rows: every row holds at most 3 of them
        n = int(rng.integers(T // 4 + 1, T // 2))
        ends = sorted(rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False).tolist())
        items.append({"tokens": rng.integers(0, V, n).tolist(), "ends": ends,
                      "labels": rng.choice([0.0, 0.25, 1.0], size=len(ends)).tolist()})
    rows, _ = pack_step_rows(items, T)
    return {k: v[:B] for k, v in rows.items()}


def _model(head_std=0.0):
    cfg = tiny_config()
    _, lm_params = cached_lm(cfg)
    model = ScalarHeadLM(cfg, head_init_std=head_std)
    return model, model.with_lm_params(lm_params, jax.random.PRNGKey(1))


def test_zero_head_gives_log_2_and_the_split_does_not_change_loss_or_gradient():
    model, params = _model(head_std=0.5)
    batch = step_batch(np.random.default_rng(0), 8, 24, 128)
    tx = optax.sgd(1.0)
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), ProcessReward(model)))

    def state_of(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))

    zero = {"lm": params["lm"], "head": jax.tree.map(jnp.zeros_like, params["head"])}
    _, m = step(state_of(zero), split_microbatches(batch, 1))
    np.testing.assert_allclose(float(m["loss"]), math.log(2.0), rtol=1e-6)
    assert float(m["steps"]) == batch["step_mask"].sum() and float(m["mean_score"]) == pytest.approx(0.5)

    results = [step(state_of(params), split_microbatches(batch, a)) for a in (1, 4)]
    np.testing.assert_allclose(float(results[1][1]["loss"]), float(results[0][1]["loss"]), rtol=1e-5)
    assert max_abs_diff(results[1][0].params, results[0][0].params) < 1e-5
    # the loss is the mean BCE over every labelled step of the batch, the accuracy agrees with the logits
    z = np.asarray(model.values(params, batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    mask, y = batch["step_mask"] > 0, batch["labels"]
    bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 / (1 + np.exp(z))))
    np.testing.assert_allclose(float(results[0][1]["loss"]), bce[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(results[0][1]["step_accuracy"]), ((z > 0) == (y > 0.5))[mask].mean(),
                               rtol=1e-6)


def test_sharded_step_equals_single_device():
    model = ScalarHeadLM(tiny_config(), head_init_std=0.3)
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    batch = split_microbatches(step_batch(np.random.default_rng(2), 16, 24, 128), 1)
    out = {}
    for name, mesh in (("single", single_device_mesh()), ("sharded", mesh_of(2, 2, 2))):
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        step = make_step(model, tx, schedule, ProcessReward(model), mesh=mesh, state_shardings=shardings, units=16,
                         grad_accum=1)
        for _ in range(2):
            state, metrics = step(state, batch)
        out[name] = (jax.device_get(metrics), jax.device_get(state.params))
    (m1, p1), (m8, p8) = out["single"], out["sharded"]
    for k in ("loss", "grad_norm", "step_accuracy", "steps"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7)
    assert max_abs_diff(p1, p8) < 1e-4  # float32 reductions over 8 devices in another order


# ---- labels --------------------------------------------------------------------------------------------------------


def test_step_ends_split_at_delimiters_and_skip_empty_steps():
    nl = lambda c: c == "\n"  # noqa: E731
    assert step_ends("ab\ncd\nAnswer: 3", nl) == [2, 5, 14]
    assert step_ends("\nab\n\ncd", nl) == [3, 6]
    assert step_ends("ab\n", nl) == [2] and step_ends("", nl) == []


def test_math_shepherd_labels_of_a_deterministic_toy_policy_equal_their_hand_values():
    # Problem "p" (answer 7). Solution "a\nb\nc=5": steps end at 1, 3, 6. The toy policy continues each prefix with
    # fixed texts: after "a\n" 2 of 4 continuations reach "=7"; after "a\nb\n" none do.
    table = {"a\n": ["x\n=7", "=7", "=6", "y\n=8"], "a\nb\n": ["=6", "=5", "=1", "=2"],
             "q\n": ["=7", "=7", "=7", "=7"]}
    calls = []

    def rollouts(queries, n):
        calls.append(len(queries))
        return [table[prefix][:n] for _, prefix in queries]

    def correct(problem, completion):
        return completion.endswith("=7")

    sols = [Solution("p", "a\nb\nc=5", tuple(step_ends("a\nb\nc=5", lambda c: c == "\n"))),
            Solution("p", "q\n=7", (1, 3)), Solution("p", "=7", (1,))]
    labels = math_shepherd_labels(sols, rollouts=rollouts, correct=correct, n_rollouts=4)
    assert calls == [3]  # every prefix of every solution in one call
    assert labels[0].soft == (0.5, 0.0, 0.0) and labels[0].hard == (1.0, 0.0, 0.0) and not labels[0].outcome
    assert labels[1].soft == (1.0, 1.0) and labels[1].hard == (1.0, 1.0) and labels[1].outcome
    assert labels[2].soft == (1.0,) and labels[2].hard == (1.0,) and labels[2].outcome
    # the solution's own continuation as one of the 4 (3 fresh: the table's first 3), a correct solution its own
    # witness: no rollout for it, its soft labels unestimated
    calls.clear()
    reused = math_shepherd_labels(sols, rollouts=rollouts, correct=correct, n_rollouts=4, reuse_solution=True,
                                  hard_only=True)
    assert calls == [2]  # only the wrong solution's two prefixes
    assert reused[0].soft == (0.5, 0.0, 0.0) and reused[0].hard == (1.0, 0.0, 0.0)
    assert reused[1].hard == (1.0, 1.0) and reused[1].soft is None and reused[2].hard == (1.0,)
    soft = math_shepherd_labels(sols[1:2], rollouts=rollouts, correct=correct, n_rollouts=4, reuse_solution=True)
    assert soft[0].soft == (1.0, 1.0)  # (3 fresh right + itself) / 4
    # token ids work the same way
    ids = math_shepherd_labels([Solution(0, [5, 9, 4], (1, 2))], rollouts=lambda q, n: [[[3]] * n for _ in q],
                               correct=lambda p, c: c[-1] == 3, n_rollouts=2)
    assert ids[0].soft == (1.0, 0.0) and ids[0].hard == (1.0, 0.0)


def test_injected_errors_give_the_right_step_labels_and_a_wrong_answer():
    task = ReasoningArithmeticTask()
    gold = task.trace_completion((384, "+", 599))
    wrong, labels = inject_error(gold, 2, 7)
    assert wrong == "384+599\n4+9+0=13 3\n8+9+1=17 73\n3+5+1=09 973\nAnswer: 973"
    assert labels == [1.0, 1.0, 0.0, 0.0, 0.0]
    wrong, labels = inject_error(task.trace_completion((27, "-", 384)), 1, 1)
    assert wrong == "-(384-27)\n14-7-0=1 1\n08-2-1=5 51\n03-0-0=3 351\nAnswer: -351" and labels == [1.0] + [0.0] * 4
    for i in range(50):
        problem = task.problem("test", i)
        gold = task.trace_completion(problem)
        n = len(gold.split("\n"))
        for line in range(1, n - 1):
            right = int(gold.split("\n")[line].split(" ")[0][-1])
            wrong, labels = inject_error(gold, line, (right + 3) % 10)
            assert not task.check(wrong, task.answer(problem)) and task.check(gold, task.answer(problem))
            assert labels == [1.0] * line + [0.0] * (n - line)
    with pytest.raises(ValueError, match="column line"):
        inject_error(gold, 0, 1)


def test_auc_against_hand_examples():
    assert prm.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert prm.roc_auc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5  # ties count 1/2
    assert prm.roc_auc([0.2, 0.6, 0.6, 0.9], [0, 1, 0, 1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert prm.roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert math.isnan(prm.roc_auc([1, 2], [1, 1]))


def test_packed_rows_and_the_iterator_resume_exactly():
    items = [{"tokens": [1, 2, 3, 4], "ends": [1, 3], "labels": [1.0, 0.5]},
             {"tokens": [5, 6, 7], "ends": [2], "labels": [0.0]},
             {"tokens": [8, 9], "ends": [1], "labels": [1.0]}]
    rows, placed = pack_step_rows(items, 8)
    assert placed == [(0, 0), (0, 4), (1, 0)]
    np.testing.assert_array_equal(rows["inputs"][0], [1, 2, 3, 4, 5, 6, 7, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(rows["step_mask"][0], [0, 1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(rows["labels"][0], [0, 1, 0, 0.5, 0, 0, 0, 0])
    assert set(rows) == set(STEP_KEYS)
    big = {k: np.arange(10)[:, None] * np.ones((1, 3), v.dtype) for k, v in rows.items()}
    it = StepRowIterator(big, batch_size=4, seed=3)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["inputs"][:, 0].tolist() for _ in range(3)]
    again = StepRowIterator(big, batch_size=4, seed=3)
    again.set_state(state)
    assert [next(again)["inputs"][:, 0].tolist() for _ in range(3)] == want
    first_epoch = StepRowIterator(big, batch_size=5, seed=3)
    assert sorted(next(first_epoch)["inputs"][:, 0].tolist() + next(first_epoch)["inputs"][:, 0].tolist()) == list(
        range(10))


# ---- the recipe ----------------------------------------------------------------------------------------------------

TASK = TaskConfig(name="reasoning_arith", min_digits=1, max_digits=2, n_operands=2, trace_fraction=0.5)
SFT = sft.SFTConfig(steps=1, model=tiny_config(), task=TASK, tokenizer_vocab=64,
                    data=DataConfig(seq_len=64, batch_size=8), optim=OptimConfig(lr=3e-3, warmup_steps=0),
                    mesh=MeshConfig(data=8, fsdp=1, tensor=1), train=TrainConfig(checkpoint_every=0, log_every=1),
                    eval=EvalConfig(n_examples=0, batch_size=8, max_prompt_len=16, max_new_tokens=16))


def test_recipe_end_to_end_writes_the_step_auc_and_resumes(tmp_path):
    sft_dir = str(tmp_path / "sft")
    sft.run(SFT, sft_dir)
    cfg = prm.PRMConfig(steps=4, init_from=sft_dir, n_problems=4, samples_per_problem=2, mc_rollouts=2,
                        sample_batch=64, n_eval_problems=2, n_auc_problems=6, max_prompt_len=16, max_new_tokens=16,
                        data=DataConfig(seq_len=80, batch_size=8), optim=OptimConfig(lr=1e-3, warmup_steps=0),
                        mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                        train=TrainConfig(checkpoint_every=2, log_every=1, async_checkpoints=False))
    work = str(tmp_path / "prm")
    assert prm.run(cfg, work, stop_at=2) is None
    records = [json.loads(x) for x in open(os.path.join(work, "prm_labels.jsonl"))]
    assert len(records) == (4 + 2) * 2
    for r in records:
        assert len(r["ends"]) == len(r["hard"]) == len(r["soft"]) and r["hard"][-1] == float(r["outcome"])
    res = prm.run(cfg, work)
    assert res["resumed_from_step"] == 2 and res["prm_step_auc_before"] == 0.5  # the zero head ties every step
    assert 0.0 <= res["prm_step_auc"] <= 1.0 and res["auc_traces"] == 12
    losses = [r for r in read_metrics(os.path.join(work, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and abs(losses[0]["loss"] - math.log(2)) < 1e-5
    saved = json.load(open(os.path.join(work, "results.json")))
    assert {"prm_step_auc", "prm_first_error_auc", "prm_paired_accuracy", "mc_step_accuracy"} <= set(saved)
    assert os.path.exists(os.path.join(work, "prm.png"))
    # the trained PRM loads from its workdir and scores the steps of texts
    model, params, tokenizer = prm.load_prm(work)
    scorer = prm.StepScorer(model, params, tokenizer, seq_len=80, rows=8)
    scores = scorer.score_texts(["What is 12 + 5?"] * 2, ["12+5\n2+5+0=07 7\nAnswer: 17", "12+5\n2+5"],
                                finished=True)
    assert [len(s) for s in scores] == [3, 2] and all(((s > 0) & (s < 1)).all() for s in scores)
    with pytest.raises(ValueError, match="label"):
        prm.PRMConfig(label="best")


def test_gold_step_labels_follow_the_task_solution():
    # a step is right while the solution so far is a prefix of the task's own trace (or direct answer)
    from jaxpost.data import make_task
    from jaxpost.tokenizers import train_tokenizer

    task = make_task("reasoning_arith", min_digits=1, max_digits=2)
    tokenizer = train_tokenizer(task.corpus(200), vocab_size=64)
    prompt = "What is 99 + 45?"
    n = len(tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0])

    def record(completion):
        ids, _ = tokenizer.encode_prompt_completion(prompt, completion)
        delims = prm.delimiter_ids(tokenizer)
        ends = [n + e for e in step_ends(ids[n:], lambda t: t in delims)]
        return {"prompt": prompt, "tokens": ids, "ends": ends}

    gold = task.trace_completion((99, "+", 45))
    assert gold == "99+45\n9+5+0=14 4\n9+4+1=14 44\n0+0+1=01 144\nAnswer: 144"
    assert prm.gold_step_labels(record(gold), task=task, tokenizer=tokenizer) == [1.0] * 5
    wrong = "99+45\n9+5+0=13 3\n9+4+1=14 43\n0+0+1=01 143\nAnswer: 143"
    assert prm.gold_step_labels(record(wrong), task=task, tokenizer=tokenizer) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert prm.gold_step_labels(record("Answer: 144"), task=task, tokenizer=tokenizer) == [1.0]
    assert prm.gold_step_labels(record("Answer: 145"), task=task, tokenizer=tokenizer) == [0.0]
