"""End to end on the arithmetic task: the loss falls, counters are reported, files are written."""

import json
import os

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.recipes import sft
from jaxpost.config import EvalConfig
from jaxpost.train.loop import read_metrics
from tests.helpers import tiny_config


def test_sft_on_arithmetic_lowers_the_loss(tmp_path):
    cfg = sft.SFTConfig(
        steps=30, model=tiny_config(), data=DataConfig(seq_len=64, batch_size=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=5), mesh=MeshConfig(data=2, fsdp=4, tensor=1),
        train=TrainConfig(checkpoint_every=0, log_every=10, eval_every=15), eval=EvalConfig(n_examples=16,
                                                                                           batch_size=16))
    res = sft.run(cfg, str(tmp_path))
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    assert any("eval_accuracy" in r for r in records)
    assert records[-1]["examples_seen"] > 0 and records[-1]["tokens_per_s"] > 0
    assert set(res) >= {"accuracy_before", "accuracy_after", "wall_time_s", "data"}
    assert json.load(open(os.path.join(tmp_path, "results.json")))["steps"] == 30
