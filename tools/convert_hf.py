"""Hugging Face model directories <-> jaxpost Orbax params directories (Llama, Qwen2, Qwen3). Local files only.

    python tools/convert_hf.py to-orbax HF_DIR CKPT_DIR [--dtype float32|bfloat16]
    python tools/convert_hf.py to-hf CKPT_DIR HF_DIR [--dtype float32|bfloat16|float16] [--max-shard-bytes N]

`to-orbax` writes the params (see `jaxpost.models.params_io`), `model_config.json`, the source `config.json` as
`hf_config.json` and the tokenizer files. `to-hf` writes safetensors + `config.json` (the fields of `hf_config.json`
kept; by default in the dtype it records) and copies the tokenizer files back. HF -> jaxpost -> HF reproduces every
tensor bit for bit when `--dtype` holds the source dtype (float32 holds all).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from jaxpost.models.hf import copy_tokenizer_files, from_pretrained, save_pretrained
from jaxpost.models.params_io import HF_CONFIG, load_orbax_params, save_orbax_params


def to_orbax(hf_dir: str, ckpt_dir: str, *, dtype: str = "float32") -> None:
    model, cfg = from_pretrained(hf_dir, dtype=dtype)
    save_orbax_params(model.params, cfg, ckpt_dir)
    shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(ckpt_dir, HF_CONFIG))
    copy_tokenizer_files(hf_dir, ckpt_dir)


def to_hf(ckpt_dir: str, hf_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
    model, cfg = load_orbax_params(ckpt_dir)
    save_pretrained(model, cfg, hf_dir, dtype=dtype, base_config=model.hf_config, max_shard_bytes=max_shard_bytes)
    copy_tokenizer_files(ckpt_dir, hf_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-orbax", help="Hugging Face directory -> jaxpost params directory")
    a.add_argument("hf_dir")
    a.add_argument("ckpt_dir")
    a.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the params are stored in")
    b = sub.add_parser("to-hf", help="jaxpost params directory -> Hugging Face directory")
    b.add_argument("ckpt_dir")
    b.add_argument("hf_dir")
    b.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written tensors (default: the one hf_config.json records, else the params')")
    b.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
    args = parser.parse_args(argv)
    if args.command == "to-orbax":
        to_orbax(args.hf_dir, args.ckpt_dir, dtype=args.dtype)
    else:
        to_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
