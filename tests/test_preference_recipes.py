"""The DPO, KTO and reward-model recipes end to end on a tiny model: from an SFT workdir (init_from), files written,
a preempted DPO run resumes where it stopped, the precomputed reference covers every step."""

import json
import os

import numpy as np
import pytest

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.config import EvalConfig, LoRAConfig
from jaxpost.recipes import dpo, kto, rm, sft
from jaxpost.train.loop import read_metrics
from tests.helpers import tiny_config

EVAL = EvalConfig(n_examples=8, batch_size=8)
SFT = sft.SFTConfig(steps=8, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
                    optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                    train=TrainConfig(checkpoint_every=0, log_every=4), eval=EVAL)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft"))
    sft.run(SFT, path)
    return path


def test_dpo_recipe_from_an_sft_workdir_resumes_after_preemption(sft_dir, tmp_path):
    cfg = dpo.DPOConfig(steps=4, init_from=sft_dir, pairs="near_miss", n_prompts=64, reference="precomputed",
                        data=DataConfig(seq_len=24, batch_size=8), mesh=MeshConfig(data=4, fsdp=2, tensor=1),
                        train=TrainConfig(checkpoint_every=2, log_every=1, async_checkpoints=False), eval=EVAL)
    work = str(tmp_path)
    assert dpo.run(cfg, work, stop_at=2) is None
    assert len(read_metrics(os.path.join(work, "metrics.jsonl"))) == 2
    res = dpo.run(cfg, work)
    assert res["resumed_from_step"] == 2 and res["pairs"] == 64
    records = [r for r in read_metrics(os.path.join(work, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert abs(records[0]["loss"] - np.log(2)) < 1e-5  # the policy starts at the reference
    assert all(r["pairs"] == 8 for r in records)
    assert np.load(os.path.join(work, "ref_logps.0.npy")).shape == (4, 16)
    for name in ("config.json", "pairs.jsonl", "dpo.png", "results.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(work, name)), name
    saved = json.load(open(os.path.join(work, "results.json")))
    assert set(saved) >= {"accuracy_before", "accuracy_after", "wall_time_s"}


def test_reward_model_recipe_reports_held_out_pairwise_accuracy(sft_dir, tmp_path):
    cfg = rm.RMConfig(steps=3, init_from=sft_dir, n_prompts=32, n_eval_pairs=16,
                      data=DataConfig(seq_len=24, batch_size=4), mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                      train=TrainConfig(checkpoint_every=0, log_every=1), eval=EVAL)
    res = rm.run(cfg, str(tmp_path))
    assert res["pairwise_accuracy_before"] == 0.0  # the zero head ties every pair
    assert 0.0 <= res["pairwise_accuracy_after"] <= 1.0 and res["eval_pairs"] == 16
    assert os.path.exists(os.path.join(tmp_path, "rm.png"))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="reference-free"):
        dpo.DPOConfig(loss="simpo", reference="model")
    with pytest.raises(ValueError, match="pairs"):
        dpo.DPOConfig(pairs="random")
    assert dpo.DPOConfig(loss="simpo", reference="none", gamma=0.7).loss_kwargs()["gamma"] == 0.7
    assert "gamma" not in dpo.DPOConfig().loss_kwargs()


def test_kto_recipe_resumes_after_preemption_and_starts_at_its_hand_derived_loss(sft_dir, tmp_path):
    # near-miss examples: one desirable and one undesirable per prompt, so balance leaves both weights at 1; at the
    # start the policy is the reference: every implicit reward and z0 are 0 and each example's loss is 1 - sigma(0)
    cfg = kto.KTOConfig(steps=4, init_from=sft_dir, examples="near_miss", n_prompts=32, reference="precomputed",
                        data=DataConfig(seq_len=24, batch_size=8), mesh=MeshConfig(data=4, fsdp=2, tensor=1),
                        train=TrainConfig(checkpoint_every=2, log_every=1, async_checkpoints=False), eval=EVAL)
    work = str(tmp_path)
    assert kto.run(cfg, work, stop_at=2) is None
    res = kto.run(cfg, work)
    assert res["resumed_from_step"] == 2 and res["examples"] == 64 and res["desirable"] == 32
    assert res["desirable_weight"] == res["undesirable_weight"] == 1.0
    records = [r for r in read_metrics(os.path.join(work, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert abs(records[0]["loss"] - 0.5) < 1e-5 and abs(records[0]["kl"]) < 1e-6
    assert all(r["examples"] == 8 for r in records)
    assert np.load(os.path.join(work, "ref_logps.0.npy")).shape == (4, 2, 8)
    for name in ("config.json", "examples.jsonl", "kto.png", "results.json"):
        assert os.path.exists(os.path.join(work, name)), name


def test_kto_recipe_with_lora_uses_the_base_model_as_reference(sft_dir, tmp_path):
    cfg = kto.KTOConfig(steps=2, init_from=sft_dir, examples="near_miss", n_prompts=16, reference="model",
                        lora=LoRAConfig(rank=4), data=DataConfig(seq_len=24, batch_size=8),
                        mesh=MeshConfig(data=8, fsdp=1, tensor=1), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                        train=TrainConfig(checkpoint_every=0, log_every=1), eval=EVAL)
    kto.run(cfg, str(tmp_path))
    records = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert abs(records[0]["loss"] - 0.5) < 1e-5  # zero-initialised adapters: the policy is its base
    assert records[1]["loss"] != records[0]["loss"]


def test_kto_class_balance():
    cfg = kto.KTOConfig()
    assert kto.balanced_weights(cfg, 1, 3) == {"desirable_weight": 3.0, "undesirable_weight": 1.0, "ratio": 1.0}
    assert kto.balanced_weights(cfg, 5, 4)["desirable_weight"] == 1.0  # ratio 1.25 is inside [1, 4/3]
    off = kto.balanced_weights(kto.KTOConfig(balance=False), 1, 3)
    assert off["desirable_weight"] == 1.0 and abs(off["ratio"] - 1 / 3) < 1e-12
    assert kto.KTOConfig(beta=0.3).loss_kwargs() == {"beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    with pytest.raises(ValueError, match="unpaired loss"):
        kto.KTOConfig(loss="sigmoid")
