"""One RL iteration split into its stages: rollout (KV-cache sampling), rewards, scoring (old + reference log-probs)
and the update, with an SFT step on the same rows as the baseline measured in the same run.

    python tools/bench_rl.py                 # small preset (13.1M params), 16 prompts x 4 samples x 64 new tokens
    python tools/bench_rl.py --quick         # tiny model, a smoke run
    python tools/bench_rl.py --preset qwen2_5_0_5b --dtype bfloat16 --max-new-tokens 256   # on a GPU/TPU host

A randomly initialised model on the arithmetic task's prompts (it rarely stops early, so nearly every sample runs to
max_new_tokens: the worst case of a rollout). One warm-up iteration compiles every program; the figures are medians
over --reps timed iterations. `update_vs_sft_step` is the update stage over one SFT step on the same rows (a
forward + backward each; the update adds the PPO/GRPO loss, its metrics and the optimizer). A second trainer with
`RolloutConfig(old_logp="sampler")` (the sampler's log-probs as the old policy's: the scoring pass runs the
reference only) is timed on the same prompts: `score_time_s_sampler_logp` and its ratio to the default scoring
pass. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from tools.report import write_report


def log(msg: str) -> None:
    print(f"[bench_rl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import optax

    from jaxpost.config import MeshConfig, ModelConfig
    from jaxpost.data import make_task
    from jaxpost.data.prompts import build_prompt_iterator
    from jaxpost.models import LM
    from jaxpost.rollout.rewards import RewardSet, task_reward
    from jaxpost.sharding import make_mesh
    from jaxpost.tokenizers import train_tokenizer
    from jaxpost.batch import split_microbatches
    from jaxpost.config import AdvantageConfig, RLLossConfig, RolloutConfig
    from jaxpost.train.rl import PolicyModel
    from jaxpost.train.rl_loop import RLTrainer
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import TrainState, abstract_train_state, state_shardings

    if args.quick:
        args.preset, args.prompts, args.group_size, args.max_new_tokens, args.reps = "tiny", 4, 2, 8, 1
    kw = {"dtype": args.dtype} if args.dtype else {}
    cfg = ModelConfig.preset(args.preset, **kw) if args.preset != "tiny" else ModelConfig.tiny(**kw)
    task = make_task("arithmetic", max_digits=2)
    tokenizer = train_tokenizer(task.corpus(2000), vocab_size=64)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    lm = LM(cfg)
    model = PolicyModel(lm)
    tx = optax.adamw(1e-5)
    abstract = abstract_train_state(model, tx)
    sh = state_shardings(abstract, model.param_shardings(mesh), tx, mesh)

    def make(key):
        params = model.from_policy(lm.init(key), key)
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                          rng=key)

    state = jax.jit(make, out_shardings=sh)(jax.random.PRNGKey(0))
    ref = jax.tree.map(lambda x: x.copy(), state.params["policy"])
    ro = RolloutConfig(prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                       max_prompt_len=24)

    def make_trainer(rollout):
        return RLTrainer(model=model, tx=tx, schedule=optax.constant_schedule(1e-5), mesh=mesh, state_shardings=sh,
                         tokenizer=tokenizer, rewards=RewardSet({"correct": task_reward(task)}), rollout=rollout,
                         loss=RLLossConfig(eps_high=0.28, kl_coef=0.01), advantage=AdvantageConfig(), ref_params=ref,
                         accuracy_key="correct")

    trainer = make_trainer(ro)
    prompts = build_prompt_iterator(task.source("train"), tokenizer, batch_size=args.prompts, max_prompt_len=24)
    log(f"{cfg.name}: {lm.n_params / 1e6:.1f}M params; {args.prompts} prompts x {args.group_size} samples x "
        f"{args.max_new_tokens} new tokens; warm-up iteration (compiles)")
    state, _ = trainer.iteration(state, prompts)
    stages = ("rollout_time_s", "reward_time_s", "score_time_s", "update_time_s")
    runs = []
    for i in range(args.reps):
        t0 = time.perf_counter()
        state, m = trainer.iteration(state, prompts)
        m["iteration_time_s"] = time.perf_counter() - t0
        runs.append(m)
        log(f"iteration {i + 1}: " + " ".join(f"{k}={m[k]:.3f}" for k in stages + ("iteration_time_s",)))

    # the sampler's log-probs as the old policy's: the scoring pass runs the reference only
    sampler_trainer = make_trainer(dataclasses.replace(ro, old_logp="sampler"))
    state, _ = sampler_trainer.iteration(state, prompts)
    score_sampler = []
    for _ in range(args.reps):
        state, m = sampler_trainer.iteration(state, prompts)
        score_sampler.append(m["score_time_s"])
    log("old_logp=sampler: score_time_s=" + " ".join(f"{t:.3f}" for t in score_sampler))

    # baseline: an SFT step (forward + backward + AdamW) on rows of one rollout
    batch = trainer.score(state.params, trainer.sample(state, prompts))
    sft_state_sh = state_shardings(abstract_train_state(lm, tx), lm.param_shardings(mesh), tx, mesh)
    sft_state = jax.jit(lambda p: TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                                             opt_state=tx.init(p), rng=jax.random.PRNGKey(0)),
                        out_shardings=sft_state_sh)(ref)
    sft_step = make_step(lm, tx, optax.constant_schedule(1e-5), SFT(lm),
                         mesh=mesh, state_shardings=sft_state_sh, units=ro.rows, grad_accum=1)
    sb = {k: jax.device_put(v, sft_step.batch_shardings[k])
          for k, v in split_microbatches(batch, 1, keys=sft_step.batch_shardings).items()}
    sft_state, m = sft_step(sft_state, sb)
    jax.block_until_ready(m)
    times = []
    for _ in range(max(args.reps, 3)):
        t0 = time.perf_counter()
        sft_state, m = sft_step(sft_state, sb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)

    med = {k: statistics.median(r[k] for r in runs) for k in stages + ("iteration_time_s",)}
    sft_time = statistics.median(times)
    tokens = float(np.sum(batch["loss_mask"]))
    out = {
        "model": cfg.name, "n_params": lm.n_params, "device": str(jax.devices()[0].device_kind),
        "prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
        "rows": ro.rows, "seq_len": ro.seq_len, "completion_tokens": tokens,
        **{k: round(v, 4) for k, v in med.items()},
        "fractions": {k.replace("_time_s", ""): round(med[k] / med["iteration_time_s"], 3) for k in stages},
        "rollout_tokens_per_s": round(tokens / med["rollout_time_s"], 1),
        "score_time_s_sampler_logp": round(statistics.median(score_sampler), 4),
        "score_sampler_logp_vs_trainer": round(statistics.median(score_sampler) / med["score_time_s"], 3),
        "sft_step_time_s": round(sft_time, 4),
        "update_vs_sft_step": round(med["update_time_s"] / sft_time, 3),
    }
    write_report(out, args.output)


if __name__ == "__main__":
    main()
