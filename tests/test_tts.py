"""The test-time scaling recipe: the sampling methods' curves against hand-worked candidates (nested subsets, ties,
missing answers), and a tiny end-to-end run (an SFT policy and a reward model of a few steps) that writes every curve
the lab's figures read and, rerun, measures nothing twice."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.recipes import prm, sft, tts
from jaxpost.train.loop import read_metrics
from tests.test_prm import SFT  # a tiny reasoning-lab SFT run


def test_sampling_curves_by_hand():
    # 2 problems (gold 5 and 7), 4 candidates each; answers None where unparseable
    answers = [[3, 5, 5, None], [None, 7, 2, 2]]
    correct = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], bool)
    lengths = np.array([[10, 20, 30, 40], [1, 2, 3, 4]])
    prm_s = np.array([[0.9, 0.2, 0.3, 0.8], [0.5, 0.4, 0.3, 0.3]])
    orm_s = np.array([[0.1, 0.9, 0.0, 0.0], [0.2, 0.2, 0.9, 0.1]])  # problem 1: ties at n=2 pick candidate 0
    curves = tts.sampling_curves(answers, correct, lengths, {"verifier": correct * 1.0, "prm": prm_s, "orm": orm_s},
                                 [5, 7], [1, 2, 4])
    acc = {m: [p["accuracy"] for p in pts] for m, pts in curves.items()}
    assert acc["bon_verifier"] == [0.0, 1.0, 1.0]  # pass@n
    assert acc["bon_prm"] == [0.0, 0.0, 0.0]  # the PRM prefers the wrong first / last candidates
    assert acc["bon_orm"] == [0.0, 0.5, 0.5]
    # votes: n=1: 3 and None (None never wins unless alone: no answer); n=2: 3 vs 5 tie -> 3 (first), None vs 7 -> 7;
    # n=4: 5 wins twice; 2 beats 7
    assert acc["majority"] == [0.0, 0.5, 0.5]
    # weighted by the PRM: n=2: 3 (0.9) vs 5 (0.2) -> 3; 7 (0.4) -> right; n=4: 5 (0.5) vs 3 (0.9) -> 3; 2 (0.6) > 7
    assert acc["weighted_bon_prm"] == [0.0, 0.5, 0.0]
    assert [p["tokens"] for p in curves["majority"]] == [5.5, 16.5, 55.0]
    assert tts.sample_points(64) == [1, 2, 4, 8, 16, 32, 64] and tts.sample_points(12) == [1, 2, 4, 8, 12]
    assert tts.parse_answer("12+5\nAnswer: -17") == -17 and tts.parse_answer("Answer: x") is None


MESH = MeshConfig(data=8, fsdp=1, tensor=1)


def test_recipe_end_to_end_writes_every_curve_and_reruns_nothing(tmp_path):
    sft_dir = str(tmp_path / "sft")
    sft.run(dataclasses.replace(SFT, steps=2), sft_dir)
    rm_cfg = prm.PRMConfig(steps=1, init_from=sft_dir, n_problems=2, samples_per_problem=1, mc_rollouts=1,
                           sample_batch=8, n_eval_problems=0, n_auc_problems=2, max_prompt_len=16, max_new_tokens=16,
                           data=DataConfig(seq_len=48, batch_size=8), optim=OptimConfig(lr=1e-3, warmup_steps=0),
                           mesh=MESH, train=TrainConfig(checkpoint_every=0, log_every=1))
    prm.run(rm_cfg, str(tmp_path / "prm"))  # serves as the ORM too (its value at the last token)
    cfg = tts.TTSConfig(policy_from=sft_dir, large_from="", prm_from=str(tmp_path / "prm"),
                        orm_from=str(tmp_path / "prm"), n_problems=3, max_n=4, sample_batch=2, n_search_problems=2,
                        beam_widths=(2,), search_ns=(2,), search_m=2, max_steps=3, max_step_tokens=6, budgets=(4,),
                        max_new_tokens=16, score_rows=8)
    work = str(tmp_path / "tts")
    res = tts.run(cfg, work)
    saved = json.load(open(os.path.join(work, "results.json")))
    assert saved["greedy_accuracy"] == res["greedy_accuracy"] and "large_greedy_accuracy" not in saved
    assert 0.0 <= saved["prm_step_auc"] <= 1.0
    curves = saved["curves"]
    assert set(curves) == set(tts.SAMPLING_METHODS) | {"beam", "prm_beam", "dvts", "budget_forcing"}
    for method in tts.SAMPLING_METHODS:
        assert [p["n"] for p in curves[method]] == [1, 2, 4]
        tokens = [p["tokens"] for p in curves[method]]
        assert tokens == sorted(tokens) and all(0 <= p["accuracy"] <= 1 and p["flops"] > 0 for p in curves[method])
    assert [p["n"] for p in curves["beam"]] == [2] and [p["n"] for p in curves["budget_forcing"]] == [4]
    bon = {p["n"]: p["accuracy"] for p in curves["bon_verifier"]}
    assert bon[1] <= bon[2] <= bon[4]  # pass@n never falls
    assert os.path.exists(os.path.join(work, "tts.png"))
    n_points = len(read_metrics(os.path.join(work, "metrics.jsonl")))
    again = tts.run(cfg, work)  # every point is found in metrics.jsonl: none is measured twice
    assert len(read_metrics(os.path.join(work, "metrics.jsonl"))) == n_points and again["curves"] == curves
    with pytest.raises(ValueError, match="search_ns"):
        tts.TTSConfig(search_ns=(6,), search_m=4)
