"""SFT train-step benchmark: step time, tokens/s, model FLOP/s against a measured matmul peak, and memory.

    python tools/bench_train.py            # the full run recorded in docs/benchmarks.md
    python tools/bench_train.py --quick    # a smoke run (fewer reps, smaller peak matmul)

Prints one JSON object to stdout (progress goes to stderr). `matmul_peak_gflops` is the float32 throughput of one
large jitted matmul on the same backend: every case's `mfu_vs_matmul` is its model FLOP/s
(`ModelConfig.flops_per_token(seq_len) * tokens / step time`) divided by that peak.

Each case runs in its own subprocess, so that (i) the emulated 8-device mesh can be configured before JAX starts
(`jax_num_cpu_devices`) while single-device cases run on a plain one-device backend, and (ii) `max_rss_delta_mb`
measures that case alone. Memory figures from `compiled.memory_analysis()` are per device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

from tools.report import write_report


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    preset: str
    vocab_size: int
    batch: int
    seq_len: int
    fsdp: int = 1
    logprobs_impl: str = "auto"


CASES = (
    Case("small_1dev", "small", 512, 16, 128),
    Case("small_fsdp8", "small", 512, 16, 128, fsdp=8),
    Case("qwen3_bench_v512", "qwen3_bench", 512, 8, 256),
    Case("qwen3_bench_v32768", "qwen3_bench", 32768, 8, 256),
    Case("qwen3_bench_v32768_naive", "qwen3_bench", 32768, 8, 256, logprobs_impl="naive"),
)


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def matmul_peak_gflops(n: int, reps: int) -> dict:
    """Best-of-`reps` float32 [n, n] @ [n, n] throughput of one jitted matmul."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"matmul_peak_gflops": 2.0 * n**3 / min(times) / 1e9, "matmul_n": n, "matmul_reps": reps,
            "matmul_ms": [round(t * 1e3, 2) for t in times]}


def run_case(case: Case, warmup: int, steps: int, matmul_n: int) -> dict:
    """Compile and time one SFT step in this process (JAX must not have started yet)."""
    import jax

    jax.config.update("jax_num_cpu_devices", case.fsdp)
    import numpy as np

    from jaxpost.config import MeshConfig, ModelConfig, OptimConfig
    from jaxpost.models import LM
    from jaxpost.sharding import make_mesh
    from jaxpost.train.optim import make_optimizer
    from jaxpost.batch import split_microbatches
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import create_train_state

    cfg = ModelConfig.preset(case.preset, vocab_size=case.vocab_size)
    B, T = case.batch, case.seq_len
    devices = jax.devices()[:case.fsdp]
    mesh = make_mesh(MeshConfig(fsdp=case.fsdp), devices)
    lm = LM(cfg)
    tx, schedule = make_optimizer(OptimConfig(), total_steps=1000)
    state, shardings = create_train_state(lm, tx, mesh, seed=0)
    step = make_step(lm, tx, schedule, SFT(lm, logprobs_impl=case.logprobs_impl),
                     mesh=mesh, state_shardings=shardings, units=B, grad_accum=1)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
             "targets": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
             "loss_mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    batch = jax.device_put(split_microbatches(batch, 1), step.batch_shardings)
    jax.block_until_ready((state, batch))
    rss_before = max_rss_mb()

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    for _ in range(warmup):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{case.name}: loss {loss}")

    # The same peak matmul again, in this process right after the steps: a check on load drift between cases.
    local_peak = matmul_peak_gflops(matmul_n, reps=3)["matmul_peak_gflops"]

    step_s = float(np.median(times))
    tokens = B * T
    flops = cfg.flops_per_token(T) * tokens
    return {
        "case": case.name, "model": cfg.name, "vocab_size": cfg.vocab_size, "n_params": lm.n_params,
        "batch": B, "seq_len": T, "devices": case.fsdp, "mesh": {"fsdp": case.fsdp},
        "logprobs_impl": case.logprobs_impl, "backend": jax.default_backend(),
        "compile_s": round(compile_s, 3), "warmup_steps": warmup, "timed_steps": steps,
        "step_ms": round(step_s * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_all": [round(t * 1e3, 2) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_gflop_per_step": round(flops / 1e9, 3),
        "model_gflops": round(flops / step_s / 1e9, 2),
        "loss": round(loss, 5),
        "matmul_peak_gflops_in_case": round(local_peak, 1),
        # Process CPU time per step (all threads) and minor page faults: XLA:CPU maps its temporary buffer afresh
        # on every execution, so the kernel's page-fault work grows with temp_bytes.
        "cpu_user_ms_per_step": round((ru1.ru_utime - ru0.ru_utime) / steps * 1e3, 1),
        "cpu_sys_ms_per_step": round((ru1.ru_stime - ru0.ru_stime) / steps * 1e3, 1),
        "minor_faults_per_step": round((ru1.ru_minflt - ru0.ru_minflt) / steps),
        "memory": {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "generated_code_bytes": int(mem.generated_code_size_in_bytes),
            "rss_before_compile_mb": round(rss_before, 1),
            "max_rss_mb": round(max_rss_mb(), 1),
            "max_rss_delta_mb": round(max_rss_mb() - rss_before, 1),
        },
    }


def spawn_case(case: Case, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_case", case.name, "--_warmup", str(args.warmup),
           "--_steps", str(args.steps), "--matmul-n", str(args.matmul_n)]
    log(f"case {case.name}: {case.preset} V={case.vocab_size} {case.batch}x{case.seq_len} fsdp={case.fsdp} "
        f"impl={case.logprobs_impl}")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  {result['step_ms']:.1f} ms/step, {result['model_gflops']:.1f} GFLOP/s, compile {result['compile_s']:.1f} s")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer reps and a smaller peak matmul")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated subset of cases")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 2; --quick 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 7; --quick 1)")
    p.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 4096; --quick 2048)")
    p.add_argument("--platform", default="cpu", help="JAX platform for every case (JAX_PLATFORMS); default cpu")
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--_steps", type=int, default=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._case is not None:  # child process: one case, one JSON line
        case = {c.name: c for c in CASES}[args._case]
        print(json.dumps(run_case(case, args._warmup, args._steps, args.matmul_n)), flush=True)
        return

    args.matmul_n = args.matmul_n or (2048 if args.quick else 4096)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 7)
    by_name = {c.name: c for c in CASES}
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(by_name)}")

    os.environ["JAX_PLATFORMS"] = args.platform  # inherited by the case subprocesses
    import platform

    import jax

    n = args.matmul_n
    log(f"matmul peak ({n}^3 float32) ...")
    load_before = os.getloadavg()
    peak = matmul_peak_gflops(n, reps=3 if args.quick else 5)
    log(f"  {peak['matmul_peak_gflops']:.1f} GFLOP/s")
    result = {
        "benchmark": "sft_step", "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        **peak, "cases": {},
    }
    for name in names:
        r = spawn_case(by_name[name], args)
        r["mfu_vs_matmul"] = round(r["model_gflops"] / peak["matmul_peak_gflops"], 3)
        result["cases"][name] = r

    cases = result["cases"]
    if "qwen3_bench_v512" in cases and "qwen3_bench_v32768" in cases:
        small, big = cases["qwen3_bench_v512"], cases["qwen3_bench_v32768"]
        from jaxpost.config import ModelConfig

        D = ModelConfig.qwen3_bench().d_model
        tokens = big["batch"] * big["seq_len"]
        # forward + backward (3x) of the extra [D, V] unembedding matmul: 2 FLOPs per multiply-add.
        extra_flops = 3 * 2 * D * (big["vocab_size"] - small["vocab_size"]) * tokens
        extra_ms = big["step_ms"] - small["step_ms"]
        ideal_ms = extra_flops / (peak["matmul_peak_gflops"] * 1e9) * 1e3
        result["vocab_scaling"] = {
            "extra_step_ms": round(extra_ms, 2),
            "extra_unembedding_gflop": round(extra_flops / 1e9, 3),
            "extra_ms_at_matmul_peak": round(ideal_ms, 2),
            "extra_ms_over_ideal": round(extra_ms / ideal_ms, 3),
        }
        if "qwen3_bench_v32768_naive" in cases:
            naive = cases["qwen3_bench_v32768_naive"]
            result["vocab_scaling"]["chunked_vs_naive"] = {
                "step_ms": [big["step_ms"], naive["step_ms"]],
                "temp_bytes": [big["memory"]["temp_bytes"], naive["memory"]["temp_bytes"]],
                "max_rss_delta_mb": [big["memory"]["max_rss_delta_mb"], naive["memory"]["max_rss_delta_mb"]],
            }
    result["loadavg_before_after"] = [round(x, 2) for x in load_before + os.getloadavg()]
    write_report(result, args.output, indent=1)


if __name__ == "__main__":
    main()
