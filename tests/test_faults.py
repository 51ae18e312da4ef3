"""Faults: non-finite steps are skipped, corrupted checkpoints fall back to the newest good one, SIGTERM checkpoints
and exits 143 then resumes exactly, and a data file or reward function failing mid-run leaves a good checkpoint.
docs/reliability.md tabulates what each test shows."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.checkpoint import Checkpointer, CheckpointError
from jaxpost.config import DataConfig, EvalConfig, MeshConfig, OptimConfig, RLLossConfig, TrainConfig
from jaxpost.models import LM
from jaxpost.recipes import sft
from jaxpost.sharding import make_mesh
from jaxpost.train.loop import MetricsLog, NonFiniteError, Preempted, read_metrics, train_loop
from jaxpost.train.optim import make_optimizer
from jaxpost.train.rl import PolicyGradient, PolicyModel
from jaxpost.train.state import abstract_train_state, state_shardings, with_shardings
from jaxpost.train.step import step_fn
from tests.helpers import cached_lm, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128


def host(tree):
    return jax.tree.leaves(jax.device_get(tree))


@pytest.fixture
def jaxpost_log(caplog):
    """caplog of the "jaxpost" logger (which `setup_logging` stops from propagating to the root logger)."""
    logger = logging.getLogger("jaxpost")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def assert_trees_equal(a, b):
    for x, y in zip(host(a), host(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ---- non-finite steps ------------------------------------------------------------------------------------------


def test_rl_update_with_non_finite_advantages_is_skipped():
    from tests.test_rl_step import make_state, rollout_rows

    lm, params = cached_lm(tiny_config())
    model = PolicyModel(lm, value="none")
    tx = optax.adam(1e-2)
    state, _ = make_state(model, params, tx)
    rows = rollout_rows(np.random.default_rng(0), 8, 16)
    adv = np.ones_like(rows["loss_mask"])
    adv[2, 5] = np.inf
    batch = {**rows, "old_logp": np.full_like(rows["loss_mask"], -1.0), "advantages": adv}
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1e-2), PolicyGradient(model, RLLossConfig())))
    new, m = step(state, {k: jnp.asarray(v)[None] for k, v in batch.items()})
    assert float(m["skipped"]) == 1.0
    assert_trees_equal(new.params, state.params)
    assert_trees_equal(new.opt_state, state.opt_state)


def test_host_loop_logs_skipped_steps_and_stops_after_max_bad_steps(tmp_path, jaxpost_log):
    def fake_step(state, batch):  # loss NaN from step 4 on
        return state + 1, {"loss": jnp.float32(batch), "skipped": jnp.float32(not np.isfinite(batch))}

    saved = []
    batches = iter([1.0, 1.0, 1.0, np.nan, 1.0, np.nan, np.nan, np.nan, np.nan, 1.0])
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(NonFiniteError, match=r"steps 6\.\.8: 3 "):
        train_loop(step_fn=fake_step, state=0, batches=batches, to_device=lambda b: b, start_step=0, steps=10,
                   metrics_log=log, checkpoint=lambda s, st: saved.append(s), checkpoint_every=1, log_every=100,
                   max_bad_steps=3)
    assert "step 4: non-finite loss" in jaxpost_log.text and "step 8: non-finite" in jaxpost_log.text
    recs = read_metrics(log.path)
    assert [r["skipped"] for r in recs] == [0, 0, 0, 1, 0, 1, 1, 1]
    assert [r["skipped_total"] for r in recs] == [0, 0, 0, 1, 1, 2, 3, 4]
    assert saved == list(range(1, 9))  # step 9 was dispatched, then step 8's metrics stopped it before its save
    # a resumed log carries the running count on
    assert MetricsLog(log.path, resume_step=5).skipped_total == 1


TINY = sft.SFTConfig(
    steps=8, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
    optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    train=TrainConfig(checkpoint_every=1, log_every=100, keep_checkpoints=10, max_bad_steps=2),
    eval=EvalConfig(n_examples=0))


def _restore_all(workdir, cfg=TINY):
    lm = LM(cfg.model)
    mesh = make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg.optim, cfg.steps, logical_axes=lm.logical_axes)
    abstract = abstract_train_state(lm, tx)
    target = with_shardings(abstract, state_shardings(abstract, lm.param_shardings(mesh), tx, mesh))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return {s: ckpt.restore(s, target) for s in ckpt.all_steps()}
    finally:
        ckpt.close()


def test_bad_steps_in_a_recipe_are_skipped_bit_exactly_then_stop_it(tmp_path, monkeypatch):
    real = sft.make_step

    def poisoned(*args, **kw):  # the loss weights of steps 4, 6 and 7 are NaN
        step = real(*args, **kw)

        def run(state, batch):
            if int(state.step) + 1 in (4, 6, 7):
                batch = {**batch, "loss_mask": batch["loss_mask"] * jnp.nan}
            return step(state, batch)

        run.batch_shardings = step.batch_shardings
        return run

    monkeypatch.setattr(sft, "make_step", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"steps 6\.\.7: 2 consecutive"):
        sft.run(TINY, workdir)
    states = {s: st for s, (st, _, _) in _restore_all(workdir).items()}
    assert sorted(states) == [1, 2, 3, 4, 5, 6, 7]  # step 8 was dispatched, not saved: the streak was known then
    for skipped, last_good in ((4, 3), (6, 5), (7, 5)):  # params and optimizer state bit-identical
        assert_trees_equal(states[skipped].params, states[last_good].params)
        assert_trees_equal(states[skipped].opt_state, states[last_good].opt_state)
        assert int(states[skipped].step) == skipped  # the counter counts batches consumed
    assert any(np.any(x != y) for x, y in zip(host(states[5].params), host(states[4].params)))  # trains on
    assert all(np.isfinite(x).all() for x in host(states[7].params))
    recs = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["skipped"] for r in recs] == [0, 0, 0, 1, 0, 1, 1]
    assert [r["skipped_total"] for r in recs] == [0, 0, 0, 1, 1, 2, 3]


# ---- corrupted checkpoints -------------------------------------------------------------------------------------


def _tree(scale):
    return {"params": {"w": jnp.arange(600.0) * scale, "b": jnp.ones((4, 4)) * scale}, "count": jnp.int32(scale)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _tree(1))


def _saved(directory, steps=(1, 2, 3), keep=3):
    ckpt = Checkpointer(directory, keep=keep, async_save=False)
    for s in steps:
        ckpt.save(s, _tree(s), data_state={"position": s}, meta={"step": s})
    ckpt.close()
    return directory


def _truncate_largest_array_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "truncated array file": (_truncate_largest_array_file, "OUT_OF_RANGE"),
    "missing data metadata": (lambda d: os.remove(os.path.join(d, "data", "metadata")), "data/metadata is missing"),
    "garbled state metadata JSON": (lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write('{"tree'),
                                    "JSONDecodeError"),
    "garbled data JSON": (lambda d: open(os.path.join(d, "data", "metadata"), "w").write("{position: 3"),
                          "JSONDecodeError"),
    "missing state directory": (lambda d: __import__("shutil").rmtree(os.path.join(d, "state")), "state"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, jaxpost_log, kind):
    corrupt, reason = CORRUPTIONS[kind]
    directory = _saved(str(tmp_path / "ck"))
    corrupt(os.path.join(directory, "3"))
    ckpt = Checkpointer(directory, async_save=False)
    state, data, meta = ckpt.restore(None, _abstract())
    assert data == {"position": 2} and meta == {"step": 2} and int(state["count"]) == 2
    assert_trees_equal(state, _tree(2))
    assert f"{os.path.join(directory, '3')} is unreadable" in jaxpost_log.text and reason in jaxpost_log.text
    if kind != "missing data metadata":  # restore_params reads only the state item
        params = ckpt.restore_params(None, _abstract()["params"])
        assert_trees_equal(params, _tree(2 if kind != "garbled data JSON" else 3)["params"])
    ckpt.close()
    assert os.path.isdir(os.path.join(directory, "3"))  # nothing deleted by a restore


def test_every_checkpoint_unreadable_is_an_error_listing_each_step(tmp_path):
    directory = _saved(str(tmp_path / "ck"), steps=(1, 2))
    _truncate_largest_array_file(os.path.join(directory, "2"))
    os.remove(os.path.join(directory, "1", "data", "metadata"))
    ckpt = Checkpointer(directory, async_save=False)
    with pytest.raises(CheckpointError, match=r"step 2: ValueError: OUT_OF_RANGE.*; step 1: FileNotFoundError: "
                                              r"data/metadata is missing"):
        ckpt.restore(None, _abstract())
    with pytest.raises(CheckpointError, match=r"step 2: ValueError: OUT_OF_RANGE"):  # an explicit step: no fallback
        ckpt.restore(2, _abstract())
    ckpt.close()


def test_unreadable_steps_are_set_aside_not_deleted_and_never_cost_a_good_one(tmp_path):
    # keep=2 holds steps 2 and 3; 3 is unreadable. Without setting it aside, saving step 4 would make Orbax keep the
    # two newest (3 and 4) and delete 2, the only good one before 4 is complete.
    directory = _saved(str(tmp_path / "ck"), steps=(1, 2, 3), keep=2)
    _truncate_largest_array_file(os.path.join(directory, "3"))
    ckpt = Checkpointer(directory, keep=2, async_save=False)
    assert ckpt.all_steps() == [2, 3]
    ckpt.restore(None, _abstract())
    ckpt.save(4, _tree(4), data_state={"position": 4})
    assert ckpt.all_steps() == [2, 4]
    ckpt.save(3, _tree(3), data_state={"position": 3})  # the resumed run may write the same step again
    ckpt.save(5, _tree(5), data_state={"position": 5})
    assert ckpt.all_steps() == [4, 5]
    ckpt.close()
    (aside,) = [d for d in os.listdir(os.path.join(directory, "unreadable")) if not d.endswith(".txt")]
    assert aside.startswith("3-") and os.path.isdir(os.path.join(directory, "unreadable", aside, "state"))
    assert "OUT_OF_RANGE" in open(os.path.join(directory, "unreadable", aside + ".why.txt")).read()


# ---- preemption ------------------------------------------------------------------------------------------------


def _lines(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_loop_after_the_running_step_with_its_checkpoint(tmp_path, sig, status):
    def step_fn(state, batch):
        if state == 3:  # the signal arrives while step 4 runs
            os.kill(os.getpid(), sig)
        return state + 1, {"loss": jnp.float32(batch)}

    saved, before = [], signal.getsignal(sig)
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(Preempted) as e:
        train_loop(step_fn=step_fn, state=0, batches=iter(range(100)), to_device=lambda b: b, start_step=0,
                   steps=100, metrics_log=log, checkpoint=lambda s, st: saved.append((s, st)), checkpoint_every=3)
    assert e.value.code == status and e.value.step == 4 and "run the same command again" in str(e.value)
    assert saved == [(3, 3), (4, 4)]  # the regular checkpoint at 3, then the running step's
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3, 4]
    assert signal.getsignal(sig) is before  # the handlers are restored


def test_sigterm_checkpoints_the_running_step_exits_143_and_the_rerun_continues_exactly(tmp_path):
    from tests import preemptible_sft

    workdir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    cmd = [sys.executable, "-m", "tests.preemptible_sft", workdir]
    log_path = str(tmp_path / "preempted.log")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([*cmd, "0.25"], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while len(_lines(os.path.join(workdir, "metrics.jsonl"))) < 2:  # mid-run, past step 2 of 12
                assert proc.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
                time.sleep(0.05)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=300)
            exit_s = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    out = open(log_path).read()
    assert status == 143, out[-3000:]
    assert "SIGTERM received" in out and "preempted by SIGTERM after step" in out
    logged = [r["step"] for r in _lines(os.path.join(workdir, "metrics.jsonl"))]
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = ckpt.latest_step()
    ckpt.close()
    assert 2 <= saved < 12 and logged == list(range(1, saved + 1))  # the running step was finished and saved

    t0 = time.perf_counter()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    rerun_s = time.perf_counter() - t0
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["resumed_from_step"] == saved  # no step redone

    preemptible_sft.run(straight)  # the same run, uninterrupted, in this process
    a, b = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (straight, workdir))
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["examples_seen"] == b[-1]["examples_seen"]
    sa, sb = (_restore_all(d, preemptible_sft.CONFIG)[12] for d in (straight, workdir))
    assert_trees_equal(sa[0], sb[0])
    assert sa[1] == sb[1]
    print(f"\npreemption at step {saved}: SIGTERM -> exit {exit_s:.1f} s; rerun {rerun_s:.1f} s wall, of which "
          f"{results['wall_time_s'] - results['train_time_s']:.1f} s outside the training loop; 0 steps redone")


# ---- failures mid-run ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RunConfig:
    steps: int = 30
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=1, fsdp=-1, tensor=1))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(checkpoint_every=1, log_every=100))


def _counting_run(workdir, batches, step_fn):
    """A Run whose state counts the steps and sums a statistic of each batch (a stand-in for a model's update, so
    that the checkpointing around a failure is what is under test)."""
    from jaxpost.recipes.common import Run
    from jaxpost.train.state import TrainState

    run = Run(_RunConfig(), workdir)
    rep = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    init = TrainState(step=jnp.int32(0), params={"w": jnp.zeros((), jnp.float32)}, opt_state=(),
                      rng=jax.random.PRNGKey(0))
    shardings = jax.tree.map(lambda _: rep, init)
    state = run.restore_or_init(jax.eval_shape(lambda: init), shardings, batches,
                                lambda: jax.device_put(init, shardings))
    return run.train(step_fn, state, batches)


def _restore_latest(workdir):
    """(step, state, data state) of the latest checkpoint: it must be whole (readable) to be returned."""
    from jaxpost.train.state import TrainState

    rep = jax.sharding.NamedSharding(make_mesh(_RunConfig().mesh), jax.sharding.PartitionSpec())
    shardings = TrainState(step=rep, params={"w": rep}, opt_state=(), rng=rep)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                              params={"w": jax.ShapeDtypeStruct((), jnp.float32, sharding=shardings.params["w"])},
                              opt_state=(), rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng))
        state, data, _ = ckpt.restore(None, abstract)
        assert not ckpt.unreadable
        return ckpt.latest_step(), state, data
    finally:
        ckpt.close()


@jax.jit
def _count(state, batch):
    tokens = jnp.sum(batch["loss_mask"])
    return state.replace(step=state.step + 1, params={"w": state.params["w"] + tokens}), {"loss": tokens}


def test_a_failing_data_file_or_reward_leaves_the_latest_checkpoint_good(tmp_path):
    from jaxpost.data import DataError, build_sft_iterator, read_jsonl
    from jaxpost.tokenizers import train_tokenizer

    tok = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], vocab_size=64)
    path = str(tmp_path / "data.jsonl")
    with open(path, "w") as f:  # line 45 is longer than seq_len: with overlong="error" the pipeline fails there
        for i in range(60):
            prompt = "1 + 2 = 3 " * 20 if i == 44 else f"{i} + 1"
            f.write(json.dumps({"prompt": prompt, "completion": str(i + 1)}) + "\n")

    def batches():
        return build_sft_iterator(read_jsonl(path), tok, seq_len=32, batch_size=4, packing=False, overlong="error",
                                  shuffle=False)

    workdir = str(tmp_path / "data_run")
    with pytest.raises(DataError, match=rf"{path}:45 \(example 44\): \d+ tokens give"):
        _counting_run(workdir, batches(), _count)
    step, state, data = _restore_latest(workdir)
    assert step == 11 and int(state.step) == 11  # batches 1..11 hold examples 0..43; batch 12 holds the bad one
    reference = batches()  # the saved data position is that after batch 11
    for _ in range(11):
        next(reference)
    assert data == reference.get_state()

    def failing_reward(state, batch):  # the RL iteration's reward phase failing at step 5 (not a function in it)
        if int(state.step) == 4:
            raise RuntimeError("reward server unreachable")
        return _count(state, batch)

    workdir = str(tmp_path / "reward_run")
    with pytest.raises(RuntimeError, match="reward server unreachable"):
        _counting_run(workdir, batches(), failing_reward)
    step, state, _ = _restore_latest(workdir)
    assert step == 4 and int(state.step) == 4
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]

    # A reward function that raises is scored 0 and counted (`reward_failed`): the run goes on.
    from jaxpost.rollout.rewards import RewardSet
    res = RewardSet({"ok": lambda prompt, completion, **_: 1.0, "broken": lambda prompt, completion, **_: 1 / 0})(
        ["p", "p"], ["c", "c"], [{}, {}])
    assert res.failed == {"ok": 0, "broken": 2} and res.total.tolist() == [1.0, 1.0]
