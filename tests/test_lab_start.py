"""tools/lab_start.py: the unbiased pass@k estimator by hand, and the whole report on a tiny two-format SFT start."""

import json
import math

import pytest

from jaxpost.config import DataConfig, EvalConfig, OptimConfig, TaskConfig, TrainConfig
from jaxpost.recipes import sft
from tests.helpers import tiny_config
from tools import lab_start


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 5, 4), (8, 8, 8), (10, 1, 10), (5, 2, 3)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert lab_start.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert lab_start.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct
    with pytest.raises(ValueError):
        lab_start.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        lab_start.pass_at_k(4, 1, 5)


@pytest.fixture(scope="module")
def reason_sft_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft_reason"))
    cfg = sft.SFTConfig(steps=4, model=tiny_config(),
                        task=TaskConfig(name="reasoning_arith", min_digits=1, max_digits=2, trace_fraction=0.5),
                        data=DataConfig(seq_len=64, batch_size=8), optim=OptimConfig(lr=3e-3, warmup_steps=1),
                        train=TrainConfig(checkpoint_every=0, log_every=2),
                        eval=EvalConfig(n_examples=0, batch_size=8, max_prompt_len=16, max_new_tokens=12))
    sft.run(cfg, path)
    return path


def test_lab_start_reports_every_measure_in_range(reason_sft_dir, tmp_path):
    out = tmp_path / "lab.json"
    res = lab_start.main(["--init-from", reason_sft_dir, "--eval", "10", "--samples", "4", "--batch", "8",
                          "--pass-k", "1,2,4,16", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["eval_problems"] == 10 and res["task"]["name"] == "reasoning_arith"

    def frac(x, none_ok=False):
        return (none_ok and x is None) or (isinstance(x, float) and 0.0 <= x <= 1.0)

    g = res["greedy"]
    assert all(frac(g[k]) for k in ("accuracy", "trace_fraction"))
    assert frac(g["trace_accuracy"], True) and frac(g["direct_accuracy"], True)
    s = res["sampled"]
    assert s["samples_per_problem"] == 4 and s["temperature"] == 1.0
    assert set(s["pass_at_k"]) == {"1", "2", "4"}  # 16 > --samples is left out
    assert s["pass_at_k"]["1"] == pytest.approx(s["accuracy"])
    assert s["pass_at_k"]["1"] <= s["pass_at_k"]["2"] <= s["pass_at_k"]["4"] == pytest.approx(
        s["problems_with_a_correct_sample"])
    for k in ("accuracy", "trace_fraction", "problems_with_a_trace", "problems_with_a_correct_sample",
              "mixed_reward_groups", "truncated_fraction"):
        assert frac(s[k]), k
    assert frac(s["trace_accuracy"], True) and frac(s["direct_accuracy"], True)
    assert s["problems_with_a_trace"] >= s["trace_fraction"] - 1e-9
    f = res["first_token"]
    assert frac(f["p_direct_mean"]) and frac(f["fraction_p_direct_below_half"])
    q = [f["p_direct_quantiles"][k] for k in ("p10", "p25", "p50", "p75", "p90")]
    assert q == sorted(q) and all(0.0 <= x <= 1.0 for x in q)
    forced = res["forced_trace"]
    assert all(frac(forced[k]) for k in ("accuracy", "trace_fraction", "first_token_is_gold"))
    # the forced first token is never the direct answer's: no forced completion starts with "Answer"
    assert not any(x["completion"].startswith("Answer") for x in forced["samples"])
    assert res["gap_forced_minus_greedy"] == pytest.approx(forced["accuracy"] - g["accuracy"])
