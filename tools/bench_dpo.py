"""DPO step benchmark: the reference model held beside the policy vs reference log-probs precomputed.

    python tools/bench_dpo.py            # small preset (13.1M params), 16 pairs x 128 tokens, 5 timed steps
    python tools/bench_dpo.py --quick    # tiny shapes, a smoke run
    python tools/bench_dpo.py --preset qwen2_5_0_5b --pairs 8 --seq-len 512 --dtype bfloat16   # on a GPU/TPU host

Each case runs in its own subprocess (so its measured peak is its own) on one device: step time (median of --reps
after a compile-and-warm-up step), the compiled step's memory analysis (`argument_mb` holds the train state, the batch
and, when held, the reference params; `temp_mb` the activations and gradients) and the measured peak (device peak
bytes in use on GPU/TPU, growth of the process's peak RSS on CPU). Ratios are precomputed / held.
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_dpo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_case(reference: str, preset: str, vocab: int, pairs: int, seq_len: int, dtype: str, reps: int) -> dict:
    import jax
    import numpy as np
    import optax

    from jaxpost.config import MeshConfig, ModelConfig
    from jaxpost.models import LM
    from jaxpost.sharding import make_mesh
    from jaxpost.batch import split_microbatches
    from jaxpost.train.dpo import Preference
    from jaxpost.train.step import make_step
    from jaxpost.train.state import create_train_state

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kw = ({"vocab_size": vocab} if vocab else {}) | ({"dtype": dtype} if dtype else {})
    cfg = ModelConfig.preset(preset, **kw)
    lm = LM(cfg)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx = optax.adamw(1e-5)
    state, shardings = create_train_state(lm, tx, mesh, seed=0)
    ref_params = jax.tree.map(lambda x: x.copy(), state.params) if reference == "model" else None
    rng = np.random.default_rng(0)
    R, T = 2 * pairs, seq_len
    inputs = rng.integers(3, cfg.vocab_size, (R, T)).astype(np.int32)
    batch = dict(inputs=inputs, targets=np.roll(inputs, -1, axis=1), segment_ids=np.ones((R, T), np.int32),
                 positions=np.tile(np.arange(T, dtype=np.int32), (R, 1)),
                 loss_mask=(np.arange(T)[None, :] >= T // 4).repeat(R, 0).astype(np.float32),
                 pair_mask=np.ones(pairs, np.float32))
    if reference == "precomputed":
        batch["ref_logps"] = rng.normal(-100.0, 5.0, R).astype(np.float32)
    batch = split_microbatches(batch, 1)
    step = make_step(lm, tx, optax.constant_schedule(1e-5), Preference(lm, loss="sigmoid", loss_kwargs={"beta": 0.1},
                     reference=reference), mesh=mesh, state_shardings=shardings, units=pairs, grad_accum=1)
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, ref_params, batch).compile()
    mem = compiled.memory_analysis()
    state, m = step(state, ref_params, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = step(state, ref_params, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak = (stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - rss0)
    out = {"reference": reference, "step_ms": statistics.median(times) * 1e3, "measured_peak_mb": peak,
           "n_params": lm.n_params, "tokens_per_step": R * T}
    if mem is not None:
        out.update(argument_mb=mem.argument_size_in_bytes / 2**20, temp_mb=mem.temp_size_in_bytes / 2**20,
                   output_mb=mem.output_size_in_bytes / 2**20)
    log(f"{reference}: {out['step_ms']:.0f} ms/step, args {out.get('argument_mb', 0):.0f} MiB, "
        f"temp {out.get('temp_mb', 0):.0f} MiB, measured peak {peak:.0f} MiB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (presets that take one)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--dtype", default="")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = args.preset or ("tiny" if args.quick else "small")
    vocab = args.vocab if args.vocab is not None else (0 if args.preset else 512)
    pairs = args.pairs or (2 if args.quick else 16)
    seq_len = args.seq_len or (32 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 5)
    if args.case:
        print(json.dumps(run_case(args.case, preset, vocab, pairs, seq_len, args.dtype, reps)))
        return
    results = {}
    for reference in ("model", "precomputed"):
        cmd = [sys.executable, __file__, "--case", reference, "--preset", preset, "--vocab", str(vocab),
               "--pairs", str(pairs), "--seq-len", str(seq_len), "--reps", str(reps)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines()
                                 if "bench_dpo" in line or proc.returncode))
        results[reference] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                              else {"error": proc.stderr.strip().splitlines()[-1:]})
    held, pre = results["model"], results["precomputed"]
    ratios = {}
    if "error" not in held and "error" not in pre:
        for k in ("step_ms", "argument_mb", "temp_mb", "measured_peak_mb"):
            if k in held and held[k]:
                ratios[f"{k}_precomputed_vs_held"] = pre[k] / held[k]
    import jax
    print(json.dumps({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "preset": preset,
                      "vocab": vocab or None, "pairs": pairs, "seq_len": seq_len, "results": results,
                      "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
