"""Every experiment module imports and holds a valid config; the quickstart (the README's first command) runs end to
end on a tiny model and prints its before/after report."""

import dataclasses
import importlib
import pkgutil

import pytest

import experiments
from jaxpost.config import DataConfig, EvalConfig, MeshConfig, OptimConfig, RolloutConfig, TrainConfig
from tests.helpers import tiny_config

NAMES = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))


@pytest.mark.parametrize("name", NAMES)
def test_experiment_config_is_valid(name):
    module = importlib.import_module(f"experiments.{name}")
    assert dataclasses.is_dataclass(module.CONFIG)
    dataclasses.replace(module.CONFIG)  # re-runs the validation


def test_quickstart_runs_and_reports(tmp_path, capsys):
    from experiments import quickstart

    ev = EvalConfig(n_examples=4, batch_size=4, max_prompt_len=16, max_new_tokens=48)
    sft = dataclasses.replace(quickstart.CONFIG.sft, steps=3, model=tiny_config(), eval=ev,
                              data=DataConfig(seq_len=96, batch_size=8), optim=OptimConfig(warmup_steps=1),
                              mesh=MeshConfig(data=8, fsdp=1, tensor=1), train=TrainConfig(checkpoint_every=0))
    cfg = dataclasses.replace(quickstart.CONFIG, sft=sft, steps=2, eval=ev, mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                              rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=48,
                                                    max_prompt_len=16),
                              train=TrainConfig(checkpoint_every=0, log_every=1))
    quickstart.main(cfg, str(tmp_path))
    out = capsys.readouterr().out
    for line in ("held-out accuracy", "traced answers", "training reward", "Sample answers after GRPO"):
        assert line in out, out
    assert (tmp_path / "rl.png").exists() and (tmp_path / "sft" / "sft.png").exists()
