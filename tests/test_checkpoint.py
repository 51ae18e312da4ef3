"""Exact resume, kill-safety and resharding on restore."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.models import LM
from jaxpost.recipes import sft
from jaxpost.config import EvalConfig
from jaxpost.checkpoint import Checkpointer
from jaxpost.train.loop import read_metrics
from jaxpost.train.optim import make_optimizer
from jaxpost.train.state import abstract_train_state, state_shardings, with_shardings
from tests.helpers import mesh_of, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = sft.SFTConfig(
    steps=6, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
    optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
    train=TrainConfig(checkpoint_every=3, log_every=1, grad_accum=2, async_checkpoints=True),
    eval=EvalConfig(n_examples=0))

TINY_FLAGS = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
              "--config.model.n_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=128",
              "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.eval.n_examples=8",
              "--config.eval.batch_size=8"]


def _restore(workdir, cfg, mesh):
    lm = LM(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.steps, logical_axes=lm.logical_axes)
    abstract = abstract_train_state(lm, tx)
    shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, data_state, meta = ckpt.restore(None, with_shardings(abstract, shardings))
    ckpt.close()
    return state, data_state


def test_resume_continues_exactly_and_restores_onto_another_mesh(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    sft.run(CFG, straight)
    assert sft.run(CFG, resumed, stop_at=4) is None  # "preempted" after step 4 (checkpointed at 3 and 4)
    res = sft.run(CFG, resumed)
    assert res["resumed_from_step"] == 4

    a, b = read_metrics(os.path.join(straight, "metrics.jsonl")), read_metrics(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([r["loss"] for r in a], [r["loss"] for r in b])
    assert a[-1]["examples_seen"] == b[-1]["examples_seen"]

    sa, da = _restore(straight, CFG, mesh_of(2, 2, 2))
    sb, db = _restore(resumed, CFG, mesh_of(2, 2, 2))
    assert int(sa.step) == int(sb.step) == 6
    for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))):
        np.testing.assert_array_equal(x, y)
    assert da == db

    # the same checkpoint restored onto an 8-way FSDP mesh: same values, new layout
    s8, _ = _restore(straight, CFG, mesh_of(1, 8, 1))
    gate = s8.params["blocks"]["mlp"]["gate"]
    assert gate.sharding.spec[1] == "fsdp" and gate.sharding.mesh.shape["fsdp"] == 8
    for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(s8))):
        np.testing.assert_array_equal(x, y)


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.sft_arith", f"--workdir={workdir}", "--config.steps=500",
           "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
            if len(steps) >= 2 and max(map(int, steps)) >= 3:
                break
            assert proc.poll() is None, "training exited early"
            time.sleep(0.2)
        time.sleep(0.35)  # land somewhere between (or in the middle of) checkpoints
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    last = ckpt.latest_step()
    ckpt.close()
    assert last is not None and last >= 3
    # a half-written checkpoint of a later step (as a kill during a save leaves it) must be ignored
    junk = os.path.join(ckdir, f"{last + 1}.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(junk, "state"), exist_ok=True)
    with open(os.path.join(junk, "state", "garbage"), "w") as f:
        f.write("partial")

    out = subprocess.run([*cmd[:4], f"--config.steps={last + 2}", *cmd[5:]], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["resumed_from_step"] == last
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, last + 3))  # each step logged once, lines after the checkpoint dropped
    assert not os.path.exists(junk)
    for name in ("config.json", "metrics.jsonl", "results.json", "sft.png", "tokenizer.model"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert json.load(open(os.path.join(workdir, "config.json")))["steps"] == last + 2
    assert 0.0 <= results["accuracy_before"] <= 1.0 and 0.0 <= results["accuracy_after"] <= 1.0
    assert results["wall_time_s"] > 0
