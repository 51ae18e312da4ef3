"""The distillation recipe end to end on tiny models: a teacher SFT workdir and a narrower student SFT workdir with
the teacher's tokenizer (built here); every method runs a few steps and writes its results; logit KD's loss falls on
a fixed batch; a tokenizer mismatch is named; a gkd run stopped at step 2 and resumed ends with the params of an
uninterrupted run; the reasoning lab's config constructs."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxpost.config import (
    DataConfig,
    EvalConfig,
    MeshConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
)
from jaxpost.data import build_sft_iterator, task_from_config
from jaxpost.models import LM
from jaxpost.recipes import distill, sft
from jaxpost.recipes.common import load_params
from jaxpost.sharding import make_mesh
from jaxpost.tokenizers import load_tokenizer, train_tokenizer
from jaxpost.train.distill import Distill
from jaxpost.train.loop import read_metrics
from jaxpost.train.optim import make_optimizer
from jaxpost.train.state import create_train_state
from jaxpost.train.step import make_step
from tests.helpers import tiny_config

MESH = MeshConfig(data=8, fsdp=1, tensor=1)
EVAL = EvalConfig(n_examples=8, batch_size=8, max_prompt_len=16, max_new_tokens=8)
TEACHER = sft.SFTConfig(steps=4, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
                        optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MESH,
                        train=TrainConfig(checkpoint_every=0, log_every=4),
                        eval=dataclasses.replace(EVAL, n_examples=0))
STUDENT_MODEL = tiny_config(name="tiny_student", d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """(teacher SFT workdir, student SFT workdir with the teacher's tokenizer, student with its own tokenizer)."""
    teacher = str(tmp_path_factory.mktemp("teacher"))
    sft.run(TEACHER, teacher)
    student = str(tmp_path_factory.mktemp("student"))
    sft.run(dataclasses.replace(TEACHER, model=STUDENT_MODEL, steps=2,
                                tokenizer_path=os.path.join(teacher, "tokenizer.model")), student)
    return teacher, student


def config(workdirs, **kw) -> distill.DistillConfig:
    teacher, student = workdirs
    base = {"steps": 3, "teacher_from": teacher, "init_from": student, "data": DataConfig(seq_len=32, batch_size=8),
            "max_prompt_len": 16, "max_new_tokens": 8, "n_prompts": 16, "sample_batch": 16,
            "optim": OptimConfig(lr=1e-3, warmup_steps=1), "mesh": MESH, "eval": EVAL,
            "train": TrainConfig(checkpoint_every=0, log_every=1)}
    return distill.DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["logit_kd", "seq_kd", "on_policy"])  # gkd: the resume test below
def test_each_method_runs_and_writes_results(workdirs, tmp_path, method):
    res = distill.run(config(workdirs, method=method, eval_teacher=method == "logit_kd"), str(tmp_path))
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["method"] == method and saved["steps"] == 3
    assert set(saved) >= {"accuracy_before", "accuracy_after", "teacher_accuracy", "wall_time_s"}
    assert 0.0 <= res["accuracy_after"] <= 1.0
    assert (res["teacher_accuracy"] is not None) == (method == "logit_kd")
    records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] >= 0 for r in records)
    if method == "on_policy":
        assert all(r["on_policy"] == 1.0 for r in records)
    if method == "seq_kd":
        assert res["teacher_samples"] == 16 and (tmp_path / "teacher_samples.jsonl").exists()
    else:
        assert all(r["tokens"] > 0 for r in records)
    assert (tmp_path / "distill.png").exists()


def test_logit_kd_loss_falls_on_a_fixed_batch(workdirs):
    teacher_dir, student_dir = workdirs
    mesh = make_mesh(MESH)
    teacher, teacher_params = distill.load_workdir_params(teacher_dir, mesh)
    lm = LM(STUDENT_MODEL)
    tokenizer = load_tokenizer(student_dir)
    batch = next(build_sft_iterator(task_from_config(TEACHER.task).source("train"), tokenizer, seq_len=32,
                                    batch_size=8, seed=0))
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0), 8)
    state, shardings = create_train_state(lm, tx, mesh, seed=0)
    state = state.replace(params=load_params(lm, mesh, student_dir))
    step = make_step(lm, tx, schedule, Distill(lm, teacher, loss="forward_kl"), mesh=mesh,
                     state_shardings=shardings, units=8)
    placed = {k: jax.device_put(v[None], step.batch_shardings[k]) for k, v in batch.items()
              if k in step.batch_shardings}
    losses = []
    for _ in range(6):
        state, metrics = step(state, teacher_params, placed)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_tokenizer_mismatch_names_both_files(workdirs, tmp_path):
    teacher, _ = workdirs
    own = str(tmp_path / "student_own")  # the student's workdir with a tokenizer of different pieces
    shutil.copytree(workdirs[1], own)
    corpus = task_from_config(TaskConfig(name="reasoning_arith")).corpus(500)
    train_tokenizer(corpus, vocab_size=load_tokenizer(teacher).vocab_size).save(os.path.join(own, "tokenizer.model"))
    with pytest.raises(ValueError, match="one tokenizer") as err:
        distill.run(config(workdirs, init_from=own), str(tmp_path / "run"))
    assert os.path.join(own, "tokenizer.model") in str(err.value)
    assert os.path.join(teacher, "tokenizer.model") in str(err.value)


def test_gkd_stopped_and_resumed_equals_uninterrupted(workdirs, tmp_path):
    cfg = config(workdirs, method="gkd", steps=4, lmbda=0.5, eval_teacher=False,
                 eval=dataclasses.replace(EVAL, n_examples=0),
                 train=TrainConfig(checkpoint_every=2, log_every=1, async_checkpoints=False))
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    distill.run(cfg, whole)
    assert distill.run(cfg, parts, stop_at=2) is None
    res = distill.run(cfg, parts)
    assert res["resumed_from_step"] == 2 and res["method"] == "gkd"
    assert (tmp_path / "parts" / "results.json").exists() and (tmp_path / "parts" / "distill.png").exists()
    a = [r for r in read_metrics(os.path.join(whole, "metrics.jsonl")) if "loss" in r]
    b = [r for r in read_metrics(os.path.join(parts, "metrics.jsonl")) if "loss" in r]
    assert [r["on_policy"] for r in a] == [r["on_policy"] for r in b]
    assert [r["on_policy"] for r in a] == [1.0, 0.0, 1.0, 0.0]  # this seed's coins: both kinds of rows
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-6)
    mesh = make_mesh(MESH)
    pa, pb = (jax.device_get(load_params(LM(STUDENT_MODEL), mesh, d)) for d in (whole, parts))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_config_checks_and_the_lab_experiment():
    from experiments import distill_reason

    dataclasses.replace(distill_reason.CONFIG)
    assert distill_reason.CONFIG.teacher_from and distill_reason.CONFIG.init_from
    with pytest.raises(ValueError, match="method"):
        distill.DistillConfig(method="minillm")
    with pytest.raises(ValueError, match="lmbda"):
        distill.DistillConfig(method="gkd", lmbda=1.5)
    assert distill.DistillConfig(method="gkd", beta=0.3).loss_kwargs() == {"beta": 0.3, "temperature": 1.0}
    assert distill.DistillConfig(method="on_policy").loss == "reverse_kl"
    assert distill.DistillConfig(method="seq_kd").loss is None


def test_rl_recipe_with_a_teacher_distils_through_per_token_advantages(workdirs, tmp_path):
    # On-policy distillation inside the RL recipe: the student samples, a wider teacher grades every token
    # (advantage.teacher_coef), the task reward weighted 0; the teacher's tokenizer must be the student's.
    from jaxpost.config import AdvantageConfig, RolloutConfig
    from jaxpost.recipes import rl

    teacher, student = workdirs
    ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=8, max_prompt_len=16)
    cfg = rl.RLConfig(steps=2, init_from=student, teacher_from=teacher, correctness_weight=0.0, rollout=ro,
                      advantage=AdvantageConfig(teacher_coef=1.0), optim=OptimConfig(lr=1e-3, warmup_steps=1),
                      mesh=MESH, train=TrainConfig(checkpoint_every=0, log_every=1),
                      eval=dataclasses.replace(EVAL, n_examples=0))
    rl.run(cfg, str(tmp_path / "rl"))
    rows = [r for r in read_metrics(str(tmp_path / "rl" / "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["teacher_kl_k1"]) and r["adv_abs_mean"] > 0 for r in rows)
    with pytest.raises(ValueError, match="teacher_coef"):
        rl.RLConfig(init_from=student, teacher_from=teacher)
