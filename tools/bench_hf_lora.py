"""Pretrained-model benchmark: LoRA vs full fine-tuning SFT steps, and Hugging Face checkpoint load / save speed.

    python tools/bench_hf_lora.py            # the run recorded in docs/benchmarks.md
    python tools/bench_hf_lora.py --quick    # a smoke run

Prints one JSON object to stdout (progress on stderr).

- `sft_step`: one jitted SFT step (AdamW, float32 master weights) of the same model with every weight trained and
  with rank-16 LoRA adapters on every projection, measured in the same process: median step time, trained
  parameters, optimizer-state bytes and the compiled step's temporary memory (`memory_analysis()`), and the ratios
  LoRA / full.
- `hf_io`: `from_pretrained` of a safetensors checkpoint written by `save_pretrained` (float32 and bfloat16), in
  MB/s of checkpoint read, and `save_pretrained` in MB/s written, for a 65M-parameter Qwen3-style model (best of
  3, files in the page cache); the baseline is transformers' `AutoModelForCausalLM.from_pretrained` of the same
  float32 directory in the same process (when transformers is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def log(msg: str) -> None:
    print(f"[bench_hf_lora {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tree_bytes(tree) -> int:
    import jax
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def bench_steps(cfg, batch: int, seq_len: int, warmup: int, reps: int, rank: int) -> dict:
    import jax
    import numpy as np

    from jaxpost.config import MeshConfig, OptimConfig
    from jaxpost.models import LM
    from jaxpost.models.lora import LoRAConfig
    from jaxpost.sharding import make_mesh
    from jaxpost.train.optim import make_optimizer
    from jaxpost.batch import split_microbatches
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import create_train_state, trainable_of

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()}
    out, runs = {}, {}
    for name, lora in (("full", None), ("lora", LoRAConfig(rank=rank, alpha=2.0 * rank))):
        lm = LM(cfg, lora)
        tx, schedule = make_optimizer(OptimConfig(warmup_steps=0), 1000,
                                      logical_axes=trainable_of(lm, lm.logical_axes))
        state, shardings = create_train_state(lm, tx, mesh, seed=0)
        step = make_step(lm, tx, schedule, SFT(lm), mesh=mesh, state_shardings=shardings, units=batch, grad_accum=1)
        batch_dev = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in split_microbatches(host, 1).items()}
        with jax.set_mesh(mesh):
            mem = step.jitted.lower(state, batch_dev).compile().memory_analysis()
        for _ in range(warmup):
            state, m = step(state, batch_dev)
        jax.block_until_ready(m)
        runs[name] = [step, state, batch_dev, []]
        out[name] = {"trained_params": sum(int(x.size) for x in jax.tree.leaves(trainable_of(lm, state.params))),
                     "opt_state_mb": round(tree_bytes(state.opt_state) / 2**20, 2),
                     "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None}
    for _ in range(reps):  # interleaved, so that both see the same machine load
        for name, run in runs.items():
            step, state, batch_dev, times = run
            t0 = time.perf_counter()
            state, m = step(state, batch_dev)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            run[1] = state
    for name, run in runs.items():
        out[name]["step_ms"] = round(1e3 * statistics.median(run[3]), 1)
        log(f"{name}: {out[name]}")
    out["lora_over_full"] = {k: round(out["lora"][k] / out["full"][k], 4)
                             for k in ("step_ms", "trained_params", "opt_state_mb", "temp_mb")
                             if out["full"][k]}
    return out


def bench_io(cfg, reps: int) -> dict:
    import jax

    from jaxpost.models import LM, from_pretrained, save_pretrained

    lm = LM(cfg)
    params = lm.init(jax.random.PRNGKey(0))
    out = {"params_m": round(lm.n_params / 1e6, 1)}
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("float32", "bfloat16"):
            path = os.path.join(d, dtype)
            saves, loads = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                save_pretrained(params, cfg, path, dtype=dtype)
                saves.append(time.perf_counter() - t0)
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                           if f.endswith(".safetensors"))
                t0 = time.perf_counter()
                model, _ = from_pretrained(path, dtype="float32")
                jax.block_until_ready(model.params)
                loads.append(time.perf_counter() - t0)
                del model
            mb = size / 2**20
            out[dtype] = {"checkpoint_mb": round(mb, 1), "save_s": round(min(saves), 2),
                          "save_mb_per_s": round(mb / min(saves), 1), "load_s": round(min(loads), 2),
                          "load_mb_per_s": round(mb / min(loads), 1)}
            if dtype == "float32":
                try:
                    import torch
                    import transformers
                except ImportError:
                    transformers = None
                if transformers is not None:
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                          dtype=torch.float32)
                        times.append(time.perf_counter() - t0)
                    out[dtype]["transformers_load_s"] = round(min(times), 2)
                    out[dtype]["load_s_over_transformers"] = round(min(loads) / min(times), 3)
            log(f"io {dtype}: {out[dtype]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import jax

    from jaxpost.config import ModelConfig

    step_cfg = ModelConfig.qwen3_bench(vocab_size=512)
    io_cfg = ModelConfig.qwen3_bench(vocab_size=32768, d_model=512, n_layers=8 if not args.quick else 2,
                                     n_heads=8, n_kv_heads=4, mlp_dim=2048)
    result = {"backend": jax.default_backend(), "devices": str(jax.devices()[0]),
              "sft_step": {"model": step_cfg.name, "batch": 8, "seq_len": 256, "lora_rank": 16,
                           **bench_steps(step_cfg, 8, 256, warmup=2, reps=3 if args.quick else 15, rank=16)},
              "hf_io": {"model": "qwen3-style d512 L8 V32768", **bench_io(io_cfg, reps=1 if args.quick else 3)}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
