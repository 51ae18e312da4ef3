"""Benchmark of the distillation KL core: `token_kl` impls against "naive" (both full logits) in the same run.

    python tools/bench_kl.py                       # CPU: N=8192, D=512 (student, teacher), V=32768, f32, forward KL
    python tools/bench_kl.py --quick               # a smoke run: small shapes, 2 reps, all three kinds
    python tools/bench_kl.py --kinds forward,reverse,jsd --impls naive,chunked,chunked@256 --output kl.json
    python tools/bench_kl.py --d-teacher 1024 ...  # a wider teacher (IMPL@MB: chunk budget in MiB)

For each kind and impl, the forward (per-token divergence) and forward+backward (gradients w.r.t. the student's
hidden states and unembedding of sum(divergence); the teacher gets none) are timed (median of --reps after a warm-up)
and their memory taken as in tools/bench_logprobs.py: the compiled executable's memory analysis (`temp_mb`: scratch
XLA allocates besides arguments and outputs) and a measured peak (`measured_peak_mb`: the device's peak bytes in use
on GPU/TPU, the growth of the process's peak RSS on CPU). Each (kind, impl) runs in its own subprocess so the measured
peaks are its own.

Ratios are against naive measured in the same run: `time_vs_naive`, `temp_vs_naive`, `peak_vs_naive`; the issue's
targets for forward+backward are temp <= 0.05x and time <= 1.2x naive (`meets_targets`). Throughput counts the chunked
path's work for every impl: 2NV(D_s + D_t) flops forward, 4NV(D_s + D_t) + 4NVD_s forward+backward (both logits, their
recomputation, dh, dW), as a fraction of a matmul peak measured in the same run. Naive does 2NV(D_s + D_t) + 4NVD_s.
`--quick` adds `chunked@1` (a 1 MiB budget: at its shapes the default 64 MiB holds everything in one chunk).

Prints one JSON object on stdout (and writes it to --output); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tools.bench_logprobs import (_device_peak_mb, _memory, _rss_peak_mb, _time, add_ratios, finish_case,
                                  matmul_peak_tflops)
from tools.report import write_report

TARGETS = {"temp_vs_naive": 0.05, "time_vs_naive": 1.2}  # forward+backward, from the distillation issue


def log(msg: str) -> None:
    print(f"[bench_kl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_case(kind: str, impl: str, n: int, d: int, dt: int, v: int, dtype: str, beta: float, reps: int) -> dict:
    """One (kind, impl), in this process: timings and memory of the forward and of forward+backward."""
    import jax
    import jax.numpy as jnp

    from jaxpost.ops import token_kl, token_kl_loss

    impl, _, budget_mb = impl.partition("@")
    budget = int(float(budget_mb) * 2**20) if budget_mb else None
    device = jax.devices()[0]
    rss0 = _rss_peak_mb()
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    hs = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    ws = (jax.random.normal(k[1], (d, v), jnp.float32) / d**0.5).astype(dtype)
    ht = jax.random.normal(k[2], (n, dt), jnp.float32).astype(dtype)
    wt = (jax.random.normal(k[3], (dt, v), jnp.float32) / dt**0.5).astype(dtype)
    jax.block_until_ready((hs, ws, ht, wt))
    base_dev = _device_peak_mb(device)

    fused = impl == "fused_loss"  # token_kl_loss: the sum's gradient formed in the forward pass

    def fwd(hs, ws, ht, wt):
        if fused:  # (its forward computes the gradient too: the same program as fwd_bwd's)
            return token_kl_loss(hs, ws, ht, wt, jnp.ones(hs.shape[:-1]), kind=kind, beta=beta,
                                 chunk_budget_bytes=budget)
        return token_kl(hs, ws, ht, wt, kind=kind, beta=beta, impl=impl, chunk_budget_bytes=budget)

    def loss(hs, ws, ht, wt):
        return jnp.sum(fwd(hs, ws, ht, wt))

    out = {"impl": impl + (f"@{budget_mb}" if budget_mb else "")}
    args = (hs, ws, ht, wt)
    for name, f in (("fwd", fwd), ("fwd_bwd", jax.grad(loss, argnums=(0, 1)))):
        compiled = jax.jit(f).lower(*args).compile()
        mem = _memory(compiled)
        secs = _time(compiled, args, reps)
        out[name] = {"ms": secs * 1e3, **mem}
        log(f"{kind} {out['impl']} {name}: {secs * 1e3:.1f} ms, temp {mem.get('temp_mb', float('nan')):.1f} MiB")
    flops = {"fwd": 2 * n * v * (d + dt), "fwd_bwd": 4 * n * v * (d + dt) + 4 * n * v * d}
    return finish_case(out, flops, device, base_dev, rss0)


def _ratios(results: dict, peak: float) -> None:
    add_ratios(results, peak)
    for r in results.values():
        if "error" in r or "error" in results.get("naive", {}):
            continue
        fb = r["fwd_bwd"]
        if r["impl"] != "naive" and "temp_vs_naive" in fb:
            r["meets_targets"] = all(fb[key] <= bound for key, bound in TARGETS.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 reps, all kinds: a smoke run")
    ap.add_argument("--n", type=int)
    ap.add_argument("--d", type=int, help="the student's width")
    ap.add_argument("--d-teacher", type=int, help="the teacher's width (default: --d)")
    ap.add_argument("--v", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--kinds", help="comma-separated of forward,reverse,jsd (default: forward; --quick: all)")
    ap.add_argument("--beta", type=float, default=0.5, help="JSD's beta")
    ap.add_argument("--impls", help="comma-separated IMPL or IMPL@MB; default: naive,chunked (--quick: + chunked@1)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--output", help="also write the JSON here")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one "kind:impl" in this process
    args = ap.parse_args()

    if args.quick:
        n, d, v, dtype, reps, kinds = 1024, 128, 4096, "float32", 2, "forward,reverse,jsd"
    else:
        n, d, v, dtype, reps, kinds = 8192, 512, 32768, "float32", 5, "forward"
    n, d, v = args.n or n, args.d or d, args.v or v
    dt = args.d_teacher or d
    dtype, reps = args.dtype or dtype, args.reps or reps
    kinds = (args.kinds or kinds).split(",")

    if args.case:
        kind, impl = args.case.split(":", 1)
        print(json.dumps(run_case(kind, impl, n, d, dt, v, dtype, args.beta, reps)))
        return

    import jax

    backend = jax.default_backend()
    impls = args.impls.split(",") if args.impls else ["naive", "chunked"] + (["chunked@1"] if args.quick else [])
    if "naive" not in impls:
        impls = ["naive"] + impls
    peak_n = 1024 if args.quick else (8192 if backend != "cpu" else 2048)
    peak = matmul_peak_tflops(peak_n, dtype, 3 if args.quick else 5)
    log(f"backend {backend} ({jax.devices()[0].device_kind}); matmul peak {peak * 1e3:.1f} GFLOP/s {dtype}")
    results = {}
    for kind in kinds:
        results[kind] = {}
        for impl in impls:
            cmd = [sys.executable, __file__, "--case", f"{kind}:{impl}", "--n", str(n), "--d", str(d),
                   "--d-teacher", str(dt), "--v", str(v), "--dtype", dtype, "--beta", str(args.beta),
                   "--reps", str(reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "".join(
                line + "\n" for line in proc.stderr.splitlines() if "bench_kl" in line))
            if proc.returncode:
                results[kind][impl] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                                       else "failed"}
                continue
            results[kind][impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        _ratios(results[kind], peak)
    write_report({
        "backend": backend, "device": jax.devices()[0].device_kind, "n": n, "d_student": d, "d_teacher": dt, "v": v,
        "dtype": dtype, "beta": args.beta, "reps": reps, "matmul_peak_tflops": peak, "targets_fwd_bwd": TARGETS,
        "results": results,
    }, args.output)


if __name__ == "__main__":
    main()
