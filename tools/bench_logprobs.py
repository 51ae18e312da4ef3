"""Benchmark of the fused log-prob/entropy core: every impl against "naive" (full logits) in the same run.

    python tools/bench_logprobs.py                 # CPU: N=8192, D=512, V=32768, float32
    python tools/bench_logprobs.py --quick         # a smoke run (small shapes, 2 reps)
    python tools/bench_logprobs.py --gpu           # GPU: N=16384, D=4096, V=151936, bfloat16 (Qwen's vocabulary)
    python tools/bench_logprobs.py --impls naive,chunked,chunked@256 --n 4096 ...   # IMPL@MB: chunk budget in MiB

For each impl, forward (logp, lse, entropy) and forward+backward (gradients w.r.t. hidden and unembedding of
sum(logp) + sum(entropy), so every output's backward runs) are timed (median of --reps after a warm-up) and their
memory taken from the compiled executable's memory analysis (`temp_mb`: scratch XLA allocates besides arguments and
outputs) and measured (`measured_peak_mb`: the device's peak bytes in use on GPU/TPU, the growth of the process's
peak RSS on CPU). Each impl runs in its own subprocess so the measured peaks are its own.

Ratios are against naive measured in the same run: `time_vs_naive`, `temp_vs_naive`, `peak_vs_naive`. Throughput
counts 8*N*D*V flops for forward+backward (logits, their recomputation, dh and dW) and 2*N*D*V for the forward, as a
fraction of a matmul peak measured in the same run on the same device and dtype.

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_logprobs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _device_peak_mb(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _time(fn, args, reps: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"temp_mb": m.temp_size_in_bytes / 2**20, "argument_mb": m.argument_size_in_bytes / 2**20,
            "output_mb": m.output_size_in_bytes / 2**20}


def matmul_peak_tflops(n: int, dtype: str, reps: int) -> float:
    """Best-of-`reps` [n, n] @ [n, n] throughput of one jitted matmul (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def run_case(impl: str, n: int, d: int, v: int, dtype: str, reps: int) -> dict:
    """One impl, in this process: timings and memory of the forward and of forward+backward."""
    import jax
    import jax.numpy as jnp

    from jaxpost.ops import token_logprobs

    impl, _, budget_mb = impl.partition("@")
    budget = int(float(budget_mb) * 2**20) if budget_mb else None
    device = jax.devices()[0]
    rss0 = _rss_peak_mb()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = (jax.random.normal(k1, (n, d), jnp.float32)).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / d**0.5).astype(dtype)
    t = jax.random.randint(k3, (n,), 0, v)
    jax.block_until_ready((h, w, t))
    base_dev = _device_peak_mb(device)

    def fwd(h, w, t):
        return token_logprobs(h, w, t, return_entropy=True, impl=impl, chunk_budget_bytes=budget)

    def loss(h, w, t):
        o = token_logprobs(h, w, t, return_entropy=True, impl=impl, chunk_budget_bytes=budget)
        return jnp.sum(o.logp) + jnp.sum(o.entropy)

    out = {"impl": impl + (f"@{budget_mb}" if budget_mb else "")}
    for name, f in (("fwd", fwd), ("fwd_bwd", jax.grad(loss, argnums=(0, 1)))):
        compiled = jax.jit(f).lower(h, w, t).compile()
        mem = _memory(compiled)
        secs = _time(compiled, (h, w, t), reps)
        out[name] = {"ms": secs * 1e3, **mem}
        log(f"{out['impl']} {name}: {secs * 1e3:.1f} ms, temp {mem.get('temp_mb', float('nan')):.0f} MiB")
    return finish_case(out, {"fwd": 2 * n * d * v, "fwd_bwd": 8 * n * d * v}, device, base_dev, rss0)


def finish_case(out: dict, flops: dict, device, base_dev, rss0) -> dict:
    """A case's throughput ({"fwd": flops, "fwd_bwd": flops}) and its measured peak memory (the device's peak bytes
    in use above `base_dev`, else the growth of the process's peak RSS above `rss0`), added to `out`."""
    for name in ("fwd", "fwd_bwd"):
        out[name]["tflops"] = flops[name] / (out[name]["ms"] / 1e3) / 1e12
    dev_peak = _device_peak_mb(device)
    out["measured_peak_mb"] = (dev_peak - (base_dev or 0.0)) if dev_peak is not None else _rss_peak_mb() - rss0
    out["measured_peak_source"] = "device peak_bytes_in_use" if dev_peak is not None else "process max RSS growth"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and 2 reps: a smoke run")
    ap.add_argument("--gpu", action="store_true", help="the GPU case: N=16384, D=4096, V=151936 in bfloat16")
    ap.add_argument("--n", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--v", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--impls", help="comma-separated; default: naive, chunked and the backend's Pallas kernel")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one impl in this process
    args = ap.parse_args()

    if args.gpu:
        n, d, v, dtype, reps = 16384, 4096, 151936, "bfloat16", 10
    elif args.quick:
        n, d, v, dtype, reps = 1024, 128, 4096, "float32", 2
    else:
        n, d, v, dtype, reps = 8192, 512, 32768, "float32", 5
    n, d, v = args.n or n, args.d or d, args.v or v
    dtype, reps = args.dtype or dtype, args.reps or reps

    if args.case:
        print(json.dumps(run_case(args.case, n, d, v, dtype, reps)))
        return

    import jax

    from jaxpost.ops import default_impl

    backend = jax.default_backend()
    impls = args.impls.split(",") if args.impls else ["naive", "chunked"] + (
        [default_impl()] if default_impl() != "chunked" else [])
    if "naive" not in impls:
        impls = ["naive"] + impls
    peak = matmul_peak_tflops(1024 if args.quick else (8192 if backend != "cpu" else 2048), dtype, 3 if args.quick else 5)
    log(f"backend {backend} ({jax.devices()[0].device_kind}); matmul peak {peak * 1e3:.1f} GFLOP/s {dtype}")
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--case", impl, "--n", str(n), "--d", str(d), "--v", str(v),
               "--dtype", dtype, "--reps", str(reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "".join(
            line + "\n" for line in proc.stderr.splitlines() if "bench_logprobs" in line))
        if proc.returncode:
            results[impl] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])

    add_ratios(results, peak)
    print(json.dumps({
        "backend": backend, "device": jax.devices()[0].device_kind, "n": n, "d": d, "v": v, "dtype": dtype,
        "reps": reps, "matmul_peak_tflops": peak, "results": results,
    }, indent=2))


def add_ratios(results: dict, peak: float) -> None:
    """Each impl's fraction of the matmul peak and its time, temporaries and peak memory over naive's (same run)."""
    naive = results.get("naive", {})
    for r in results.values():
        if "error" in r or "error" in naive:
            continue
        for name in ("fwd", "fwd_bwd"):
            r[name]["fraction_of_matmul_peak"] = r[name]["tflops"] / peak
            r[name]["time_vs_naive"] = r[name]["ms"] / naive[name]["ms"]
            if "temp_mb" in r[name] and naive[name].get("temp_mb"):
                r[name]["temp_vs_naive"] = r[name]["temp_mb"] / naive[name]["temp_mb"]
        if naive.get("measured_peak_mb", 0) > 0:
            r["peak_vs_naive"] = r["measured_peak_mb"] / naive["measured_peak_mb"]


if __name__ == "__main__":
    main()
