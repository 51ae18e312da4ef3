"""Multi-process runs on this machine: 2 (and 4) JAX processes, each with emulated CPU devices, joined by
`jax.distributed.initialize` into one global mesh of 8 devices, launched by `tools/launch_local.py` with the README's
multi-GPU command (`JAXPOST_COORDINATOR=localhost:PORT JAXPOST_NUM_PROCESSES=N JAXPOST_PROCESS_ID=i python -m
experiments.X ...`). Each run equals the one-process run on the same (data, fsdp) = (2, 4) mesh:

- SFT on 2 and 4 processes, DPO and GRPO on 2: the train state (params and optimizer moments) to `TOL`, the logged
  losses and rewards to float rounding. Each process reads its own slice of the data, so the global batch holds the
  same examples in another order: the sums inside a step differ in rounding only.
- checkpoints: written by 1 process and resumed by 2, and the reverse, each continuing to the state of the
  uninterrupted run (the data iterator cut again for the new process count: `jaxpost.data.process_state`).

The runs are shared by the tests (each launched once, when a test first needs it); the lr is constant (no warmup,
min_lr_ratio 1) so that a run resumed with a larger `steps` continues the shorter one exactly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxpost.config import ModelConfig
from jaxpost.data import build_sft_iterator
from jaxpost.data.process_state import gather_process_states, state_for_process
from jaxpost.train.loop import read_metrics
from tests.helpers import tiny_config

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Max abs difference of any train-state entry (params, Adam moments) from the one-process run, float32. Measured:
#: docs/reliability.md, "Multi-process runs".
TOL = 2e-5

_TRAIN = ["--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
          "--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0", "--config.eval.n_examples=0"]


def model_flags(prefix: str, cfg: ModelConfig = tiny_config(), default: ModelConfig | None = None) -> list[str]:
    """`--config.<prefix>.FIELD=VALUE` for every field of `cfg` that differs from `default` (all when None)."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if default is None or v != getattr(default, f.name):
            out.append(f"--config.{prefix}.{f.name}={v}")
    return out


def sft_flags(prefix: str = "") -> list[str]:
    p = f"{prefix}." if prefix else ""
    from experiments import sft_arith
    return (model_flags(f"{p}model".lstrip("."), default=sft_arith.CONFIG.model)
            + [f"--config.{p}{k}" for k in ("data.seq_len=48", "data.batch_size=8", "data.packing=False",
                                            "mesh.data=2", "mesh.fsdp=4")]
            + [f.replace("--config.", f"--config.{p}") for f in _TRAIN])


def launch(name: str, module: str, workdir: str, flags: list[str], *, processes: int, devices: int,
           cache: str | None = None, timeout: float = 300) -> tuple[str, float]:
    """Runs `python -m experiments.<module>` as `processes` processes of `devices` CPU devices; returns (output,
    wall seconds). Fails the test on a non-zero exit, with the output. `cache`: JAX's persistent compilation cache,
    for one-process runs only: jax writes its entries without locking, so processes of one run may race on an entry,
    and a one-process run once aborted reading a cache that several-process runs had written to."""
    cmd = [sys.executable, "tools/launch_local.py", "--processes", str(processes), "--devices-per-process",
           str(devices), "--timeout", str(timeout), "--", sys.executable, "-m", f"experiments.{module}",
           "--workdir", workdir, *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"{name} ({processes} processes) exited with {proc.returncode}:\n{proc.stdout[-6000:]}"
                    f"\n{proc.stderr[-3000:]}")
    print(f"{name}: {processes} x {devices} devices, {seconds:.1f} s")
    return proc.stdout, seconds


class Runs:
    """The launched runs, each started when first asked for (a test selected alone launches only what it needs)."""

    def __init__(self, root: str):
        self.root = root
        self.times: dict[str, float] = {}
        self._done: set[str] = set()

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def get(self, name: str) -> str:
        if name not in self._done:
            getattr(self, "_" + name)()
            self._done.add(name)
        return self.dir(name)

    def _launch(self, name, module, flags, processes, devices=None, workdir=None):
        _, self.times[name] = launch(name, module, workdir or self.dir(name), flags, processes=processes,
                                     devices=devices or 8 // processes,
                                     cache=self.dir("compilation_cache") if processes == 1 else None)

    # SFT: 6 steps on 1 process, the reference (checkpoints at 2, 4, 6); its step-2 checkpoint resumed by 2
    # processes to step 4, and that checkpoint (written by 2 processes) resumed by 1 process to step 6; 2 fresh steps
    # on 4 processes
    def _sft_1p(self):
        self._launch("sft_1p", "sft_arith", sft_flags() + ["--config.steps=6"], 1)

    def _sft_1p_to_2p(self):
        shutil.copytree(self.get("sft_1p"), self.dir("sft_1p_to_2p"))
        for step in ("4", "6"):
            shutil.rmtree(os.path.join(self.dir("sft_1p_to_2p"), "checkpoints", step))
        self._launch("sft_1p_to_2p", "sft_arith", sft_flags() + ["--config.steps=4"], 2)

    def _sft_2p_to_1p(self):
        shutil.copytree(self.get("sft_1p_to_2p"), self.dir("sft_2p_to_1p"))
        self._launch("sft_2p_to_1p", "sft_arith", sft_flags() + ["--config.steps=6"], 1)

    def _sft_4p(self):
        self._launch("sft_4p", "sft_arith", sft_flags() + ["--config.steps=2"], 4)

    # DPO (near-miss pairs, precomputed reference) and GRPO (4 prompts x 4 samples, a prompt-dependent partial-credit
    # reward, KL to the reference) from sft_1p's final params
    def _dpo(self, name, processes):
        flags = [f"--config.init_from={self.get('sft_1p')}", "--config.steps=2", "--config.pairs=near_miss",
                 "--config.n_prompts=64", "--config.data.seq_len=32", "--config.data.batch_size=8",
                 "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.optim.lr=1e-3", *_TRAIN]
        self._launch(name, "dpo_arith", flags, processes)

    def _dpo_1p(self):
        self._dpo("dpo_1p", 1)

    def _dpo_2p(self):
        self._dpo("dpo_2p", 2)

    def _grpo(self, name, processes):
        flags = [f"--config.init_from={self.get('sft_1p')}", "--config.steps=2", "--config.rollout.prompts_per_step=4",
                 "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=8",
                 "--config.rollout.max_prompt_len=16", "--config.digit_match_weight=1.0",
                 "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.optim.lr=1e-3", *_TRAIN]
        self._launch(name, "grpo_arith", flags, processes)

    def _grpo_1p(self):
        self._grpo("grpo_1p", 1)

    def _grpo_2p(self):
        self._grpo("grpo_2p", 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(str(tmp_path_factory.mktemp("multiprocess")))
    yield r
    print("launch wall times (s):", {k: round(v, 1) for k, v in r.times.items()})


def load_state(workdir: str, step: int) -> dict:
    """The train state of a checkpoint as host numpy arrays (whatever mesh or process count wrote it)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def state_diff(a: str, step_a: int, b: str, step_b: int | None = None) -> float:
    """Max abs difference over every entry of the train states of workdirs `a` and `b`."""
    sa, sb = load_state(a, step_a), load_state(b, step_a if step_b is None else step_b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
               for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)))


def metrics(workdir: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def assert_same_metrics(a: str, b: str, keys: tuple[str, ...], *, rtol: float = 1e-5, exact: tuple[str, ...] = ()):
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb), (sorted(ma), sorted(mb))
    for step in ma:
        for k in keys:
            np.testing.assert_allclose(mb[step][k], ma[step][k], rtol=rtol, atol=1e-6, err_msg=f"step {step} {k}")
        for k in exact:
            assert mb[step][k] == ma[step][k], (step, k, ma[step][k], mb[step][k])


# ---- one process: the data slices ----------------------------------------------------------------------------


def test_each_process_reads_its_own_slice_and_the_state_is_cut_again_for_another_process_count():
    from jaxpost.tokenizers import train_tokenizer

    from jaxpost.data import task_from_config
    from jaxpost.config import TaskConfig

    task = task_from_config(TaskConfig())
    tokenizer = train_tokenizer(task.corpus(500), vocab_size=48)
    source = task.source("train")

    def iterator(i, n):
        return build_sft_iterator(source, tokenizer, seq_len=48, batch_size=8, packing=False, seed=0,
                                  process_index=i, process_count=n)

    def rows(batch):
        return [tuple(r) for r in batch["targets"][batch["loss_mask"].any(-1)]]

    one = iterator(0, 1)
    procs = [iterator(i, 2) for i in range(2)]
    for _ in range(3):  # every global batch: the same examples, process i taking elements i, i+2, ... of it
        global_rows = rows(next(one))
        parts = [rows(next(p)) for p in procs]
        assert len(parts[0]) == len(parts[1]) == 4
        assert global_rows[0::2] == parts[0] and global_rows[1::2] == parts[1]

    # 2 processes' states -> 1 process (and back): the continuation equals the uninterrupted stream
    saved = {"process_states": [p.get_state() for p in procs]}
    assert gather_process_states(procs[0].get_state()) == procs[0].get_state()  # one process: the plain state
    resumed = iterator(0, 1)
    resumed.set_state(state_for_process(saved, resumed.get_state(), 0, 1))
    expected = next(one)
    np.testing.assert_array_equal(next(resumed)["targets"], expected["targets"])
    again = [iterator(i, 2) for i in range(2)]
    for i, it in enumerate(again):
        it.set_state(state_for_process({"process_states": [resumed.get_state()]}, it.get_state(), i, 2))
    expected = rows(next(one))
    assert [rows(next(it)) for it in again] == [expected[0::2], expected[1::2]]

    packed = build_sft_iterator(source, tokenizer, seq_len=48, batch_size=8, packing=True, process_index=0,
                                process_count=2)
    next(packed)
    target = build_sft_iterator(source, tokenizer, seq_len=48, batch_size=8, packing=True, process_count=1,
                                process_index=0)
    with pytest.raises(ValueError, match="packed pipeline"):
        state_for_process({"process_states": [packed.get_state()] * 2}, target.get_state(), 0, 1)


# ---- launched runs ---------------------------------------------------------------------------------------------


def test_sft_on_2_and_4_processes_equals_one_process(runs):
    one = runs.get("sft_1p")
    m1 = metrics(one)
    for name, n, steps in (("sft_1p_to_2p", 2, (3, 4)), ("sft_4p", 4, (1, 2))):
        many = runs.get(name)
        diff = state_diff(one, steps[-1], many)
        print(f"{name}: max |state - 1 process| after step {steps[-1]} = {diff:.2e}")
        assert diff <= TOL, (name, diff)
        mn = metrics(many)
        assert sorted(mn) == list(range(1, steps[-1] + 1))  # process 0 alone writes the run's files
        for step in steps:
            np.testing.assert_allclose(mn[step]["loss"], m1[step]["loss"], rtol=1e-5)
            np.testing.assert_allclose(mn[step]["grad_norm"], m1[step]["grad_norm"], rtol=1e-4)
            assert mn[step]["tokens"] == m1[step]["tokens"]  # the same examples in the global batch
        # every process wrote its own shards of the checkpoint (the params are FSDP-sharded across processes)
        shards = sorted(d for d in os.listdir(os.path.join(many, "checkpoints", str(steps[-1]), "state"))
                        if d.startswith("ocdbt.process_"))
        assert shards == [f"ocdbt.process_{i}" for i in range(n)], shards


def test_checkpoints_move_between_2_processes_and_1(runs):
    one = runs.get("sft_1p")
    m1 = metrics(one)
    for name, step in (("sft_1p_to_2p", 4), ("sft_2p_to_1p", 6)):  # 1 -> 2 processes, then 2 -> 1
        resumed = runs.get(name)
        diff = state_diff(one, step, resumed)
        print(f"{name}: max |state - uninterrupted 1 process| at step {step} = {diff:.2e}")
        assert diff <= TOL, (name, diff)
        mr = metrics(resumed)
        assert sorted(mr) == list(range(1, step + 1))
        for s in (step - 1, step):
            np.testing.assert_allclose(mr[s]["loss"], m1[s]["loss"], rtol=1e-5)
            assert mr[s]["tokens"] == m1[s]["tokens"]


def test_dpo_on_2_processes_equals_one_process(runs):
    one, two = runs.get("dpo_1p"), runs.get("dpo_2p")
    diff = state_diff(one, 2, two)
    print(f"dpo_2p: max |state - 1 process| = {diff:.2e}")
    assert diff <= TOL, diff
    assert_same_metrics(one, two, ("loss", "margins", "accuracies", "chosen_rewards", "rejected_rewards"))
    assert os.path.exists(os.path.join(two, "ref_logps.1_of_2.npy"))  # each process's own reference rows


def test_grpo_on_2_processes_equals_one_process(runs):
    one, two = runs.get("grpo_1p"), runs.get("grpo_2p")
    diff = state_diff(one, 2, two)
    print(f"grpo_2p: max |state - 1 process| = {diff:.2e}")
    assert diff <= TOL, diff
    # the same completions and rewards: every group scored whole, on every process
    assert_same_metrics(one, two, ("loss", "kl_ref_k3"),
                        exact=("reward_mean", "reward_std", "response_length", "zero_adv_group_frac",
                               "reward/digit_match", "truncated_frac", "prompts_seen"))
    assert any(m["reward_std"] > 0 for m in metrics(one).values())  # the rewards differ within groups
