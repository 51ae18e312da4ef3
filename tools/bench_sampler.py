"""Sampler benchmark: prefill and decode tokens/s of the KV-cache sampler against decoding by recomputation.

    python tools/bench_sampler.py                                  # small preset, float32, batch 1 and 32 (CPU)
    python tools/bench_sampler.py --preset llama3_2_1b --dtype bfloat16 --batches 1,32,128 --prompt-len 512 \\
        --new-tokens 256 --recompute-new-tokens 8                  # a ~1B model on a GPU

Prints one JSON object. Per batch size B (prompts of `--prompt-len` random tokens, no stop tokens, so every row runs
to the end):

- `prefill_*`: `Sampler.generate` with max_new_tokens=1 (prefill, then one sampled token): B * prompt_len / time.
- `decode_*`: the same call with `--new-tokens` N minus the prefill call, over the N - 1 decode steps:
  B * (N - 1) / (time(N) - time(1)); `decode_step_ms` is one step (forward of B tokens against the cache + sampling).
- `recompute_tokens_per_s`: `jaxpost.rollout.greedy_generate` (no cache: every new token re-runs the forward over the
  whole [B, prompt + new] buffer) with `--recompute-new-tokens` new tokens: B * M / time. Its cost per token grows
  with the sequence, so a short M flatters it; `decode_speedup` = decode tokens/s / recompute tokens/s.
- Bandwidth: a decode step must read every weight it multiplies (the embedding table only for B rows) and the KV
  cache; this implementation attends over all S = prompt bucket + N cache slots every step (masked), so it reads
  2 * layers * B * kv_heads * S * head_dim elements of cache. `bytes_per_step` / `decode_step_s` = `achieved_gbps`,
  compared with `stream_gbps` (a measured jitted in-place x * 2 over a 512 MiB array on the same device: read +
  write bytes / time) and, where the device is known or `--peak-gbps` is given, with its HBM peak (`fraction_of_peak`).

Times are medians of `--reps` calls after a first (compiling) call; `compile_s` is that first call's excess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from tools.report import write_report

# HBM peaks (GB/s) by `jax.devices()[0].device_kind` substring (SXM parts; PCIe H100 is 2000).
KNOWN_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "B200": 8000.0}


def log(msg: str) -> None:
    print(f"[bench_sampler {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_config(preset: str, dtype: str, param_dtype: str, vocab_size: int | None, max_len: int):
    from jaxpost.config import ModelConfig

    kw = dict(dtype=dtype, param_dtype=param_dtype, max_seq_len=max_len)
    if vocab_size:
        kw["vocab_size"] = vocab_size
    if preset == "llama3_2_1b":  # Llama 3.2 1B shapes (1.24B parameters, tied embeddings)
        return ModelConfig(**{**dict(name="llama3_2_1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                                     n_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500_000.0, rms_eps=1e-5,
                                     tie_embeddings=True), **kw})
    return ModelConfig.preset(preset, **kw)


def stream_gbps(n_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Best-of-reps read+write bandwidth of a jitted in-place x * 2 (donated) over a float32 array of n_bytes. In
    place, because XLA:CPU maps a fresh output buffer's pages on every call: a non-donated copy measures page
    faults (~3 GB/s on the 2-core VM) rather than memory bandwidth."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0, donate_argnums=0)
    x = f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def timed(fn, reps: int) -> tuple[float, float]:
    """(first call seconds, median of `reps` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def decode_bytes_per_step(cfg, batch: int, cache_slots: int) -> dict:
    """Bytes a decode step reads: every weight (the embedding table only for `batch` rows unless it is also the
    unembedding) and the whole K and V cache."""
    pbytes = 2 if cfg.param_dtype == "bfloat16" else 4
    cbytes = 2 if cfg.dtype == "bfloat16" else 4
    n = cfg.n_params
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model - batch * cfg.d_model
    params = n * pbytes
    cache = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cache_slots * cfg.head_dim * cbytes
    return {"param_bytes": params, "kv_cache_bytes": cache, "bytes_per_step": params + cache}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="a ModelConfig preset, or llama3_2_1b")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--param-dtype", default=None, help="default: --dtype (inference weights)")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64, help=">= 2")
    ap.add_argument("--recompute-new-tokens", type=int, default=16, help="0 skips the recompute baseline")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (what the recompute baseline does)")
    ap.add_argument("--prefill-chunk", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recompute-reps", type=int, default=1)
    ap.add_argument("--peak-gbps", type=float, default=None, help="device memory peak; default: known GPUs")
    ap.add_argument("--output", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpost.models import LM
    from jaxpost.rollout import Sampler, SamplingConfig, greedy_generate

    load_start = os.getloadavg()
    N, P0 = args.new_tokens, args.prompt_len
    cfg = model_config(args.preset, args.dtype, args.param_dtype or args.dtype, args.vocab_size,
                       max_len=max(4096, 2 * (P0 + N)))
    lm = LM(cfg)
    log(f"{cfg.name}: {lm.n_params / 1e6:.1f}M params, {args.dtype}; init")
    params = lm.init(jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    device = jax.devices()[0]
    peak = args.peak_gbps or next((v for k, v in KNOWN_PEAK_GBPS.items() if k in device.device_kind), None)
    result = {
        "preset": cfg.name, "n_params": lm.n_params, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
        "prompt_len": P0, "new_tokens": N, "recompute_new_tokens": args.recompute_new_tokens,
        "temperature": args.temperature, "prefill_chunk": args.prefill_chunk,
        "device": f"{device.platform}:{device.device_kind}", "n_devices": jax.device_count(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "jax": jax.__version__,
        "stream_gbps": round(stream_gbps(), 1), "peak_gbps": peak, "cases": [],
    }
    log(f"stream bandwidth {result['stream_gbps']} GB/s")
    rng = np.random.default_rng(0)
    for B in (int(b) for b in args.batches.split(",")):
        prompts = [rng.integers(4, cfg.vocab_size, P0).astype(np.int32) for _ in range(B)]
        sampler = Sampler(lm, pad_id=0, prefill_chunk=args.prefill_chunk)
        _, Pb = sampler.buckets(B, P0)

        def run(n_new):
            sc = SamplingConfig(max_new_tokens=n_new, temperature=args.temperature)
            return lambda: sampler.generate(params, prompts, sc, seed=0)

        log(f"B={B}: prefill")
        first1, t1 = timed(run(1), args.reps)
        log(f"B={B}: decode {N} tokens")
        firstN, tN = timed(run(N), args.reps)
        step = (tN - t1) / (N - 1)
        if step <= 0:
            raise SystemExit(f"B={B}: generating {N} tokens took no longer than prefill alone ({tN:.4f} vs "
                             f"{t1:.4f} s): raise --new-tokens or --reps")
        case = {
            "batch": B, "prompt_bucket": Pb,
            "prefill_s": round(t1, 4), "prefill_tokens_per_s": round(B * P0 / t1, 1),
            "generate_s": round(tN, 4), "decode_step_ms": round(step * 1e3, 3),
            "decode_tokens_per_s": round(B / step, 1),
            "compile_s": round(first1 - t1 + firstN - tN, 1),
        }
        bw = decode_bytes_per_step(cfg, B, Pb + N)
        case.update(bw)
        case["achieved_gbps"] = round(bw["bytes_per_step"] / step / 1e9, 2)
        case["fraction_of_stream"] = round(case["achieved_gbps"] / result["stream_gbps"], 3)
        if peak:
            case["fraction_of_peak"] = round(case["achieved_gbps"] / peak, 3)
        M = args.recompute_new_tokens
        if M:
            buf = np.zeros((B, P0), np.int32)
            buf[:] = np.stack(prompts)
            lengths = np.full((B,), P0, np.int32)

            def recompute():
                out = greedy_generate(lm, params, jnp.asarray(buf), jnp.asarray(lengths), max_new_tokens=M,
                                      stop_ids=(), pad_id=0)
                jax.block_until_ready(out)

            log(f"B={B}: recompute {M} tokens")
            _, tr = timed(recompute, args.recompute_reps)
            case["recompute_s"] = round(tr, 3)
            case["recompute_tokens_per_s"] = round(B * M / tr, 1)
            case["decode_speedup"] = round(case["decode_tokens_per_s"] / case["recompute_tokens_per_s"], 1)
        log(json.dumps(case))
        result["cases"].append(case)
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(result, args.output, indent=1)


if __name__ == "__main__":
    main()
