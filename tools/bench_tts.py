"""Test-time scaling benchmark: best-of-N sampling (N completions per prompt) against one greedy decode of the same
prompts, each one batched `Sampler.generate` call.

    python tools/bench_tts.py                       # the reasoning lab's model, 8 prompts, N = 16, 72 new tokens
    python tools/bench_tts.py --prompts 16 --n 8 --new-tokens 64 --reps 5

The model is the reasoning lab's (`ModelConfig.qwen3_bench(vocab_size=128)`, 3.2M parameters, float32, the config of
experiments/sft_reason.py) with random weights on one device; prompts are `--prompts` random token sequences of the
lab's prompt length (12 tokens, bucket 16). No stop tokens, so every row generates exactly `--new-tokens` tokens and
both calls do a fixed amount of work: greedy decodes P rows, best-of-N P * N rows (temperature 1; the N samples of a
prompt share its prefill). Times are medians of `--reps` calls after a first (compiling) call; the greedy and
best-of-N calls alternate, so that both see the same background load.

Reported: `greedy_s`, `bon_s` (seconds per call), `time_ratio` = bon_s / greedy_s (the target is <= 4 for N = 16:
N times the tokens for at most 4 times the time, because a decode step at a small batch is bound by reading the
weights and the cache, not by arithmetic), tokens/s of each, and the forward FLOPs of each call
(`jaxpost.inference.forward_flops`). Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_tts {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _time_pair(fa, fb, reps: int) -> tuple[float, float, float, float]:
    """(compile excess of a, of b, median of a, median of b), seconds: one compiling call each, then `reps` rounds
    that alternate a and b, so that both see the same background load on a shared machine."""
    first = []
    for fn in (fa, fb):
        t0 = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t0)
    times = ([], [])
    for _ in range(reps):
        for i, fn in enumerate((fa, fb)):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    ma, mb = statistics.median(times[0]), statistics.median(times[1])
    return first[0] - ma, first[1] - mb, ma, mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt (best-of-N)")
    ap.add_argument("--new-tokens", type=int, default=72, help="the lab's eval length (longest trace + stop)")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import jax
    import numpy as np

    from jaxpost.config import ModelConfig
    from jaxpost.inference import decode_flops
    from jaxpost.models import LM
    from jaxpost.rollout import Sampler, SamplingConfig

    cfg = ModelConfig.qwen3_bench(vocab_size=128)
    lm = LM(cfg)
    params = lm.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).astype(np.int32) for _ in range(args.prompts)]
    sampler = Sampler(lm, pad_id=0)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    bon = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, n_samples=args.n)

    def run(sampling):
        ro = sampler.generate(params, prompts, sampling, seed=0)
        assert (ro.lengths == args.new_tokens).all()
        return ro

    log(f"{cfg.name}: {lm.n_params / 1e6:.2f}M params; {args.prompts} prompts, N={args.n}, "
        f"{args.new_tokens} new tokens, {args.reps} reps")
    g_compile, b_compile, g_s, b_s = _time_pair(lambda: run(greedy), lambda: run(bon), args.reps)
    log(f"greedy: {g_s * 1e3:.0f} ms per call (compile {g_compile:.1f} s); best-of-{args.n}: {b_s * 1e3:.0f} ms per "
        f"call (compile {b_compile:.1f} s)")

    def flops(rows_per_prompt):
        prefill = decode_flops(cfg, 0, args.prompt_len - 1, logits=False) * args.prompts
        return prefill + decode_flops(cfg, args.prompt_len - 1, args.new_tokens) * args.prompts * rows_per_prompt

    g_tok, b_tok = args.prompts * args.new_tokens, args.prompts * args.n * args.new_tokens
    print(json.dumps({
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "machine": platform.machine(),
        "model": cfg.name, "n_params": lm.n_params, "prompts": args.prompts, "n": args.n,
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "reps": args.reps,
        "greedy_s": round(g_s, 4), "bon_s": round(b_s, 4), "time_ratio": round(b_s / g_s, 3),
        "greedy_tokens_per_s": round(g_tok / g_s, 1), "bon_tokens_per_s": round(b_tok / b_s, 1),
        "greedy_gflops": round(flops(1) / 1e9, 3), "bon_gflops": round(flops(args.n) / 1e9, 3),
        "greedy_compile_s": round(g_compile, 2), "bon_compile_s": round(b_compile, 2),
    }))


if __name__ == "__main__":
    main()
