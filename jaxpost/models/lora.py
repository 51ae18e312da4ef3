"""LoRA: low-rank adapters on the decoder's projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A targeted projection y = x W becomes y = x W + s * (dropout(x) A) B with A [in, r], B [r, out], s = alpha / r
(alpha / sqrt(r) with `rslora`, Kalajdzievski 2023). A starts like PyTorch's kaiming-uniform (U(-1/sqrt(in),
1/sqrt(in)), what PEFT uses) and B at zero, so a fresh adapter leaves the model's outputs unchanged.

The adapters live in the decoder's params tree beside the weight they adapt (`blocks.attn.q_lora_a`,
`blocks.attn.q_lora_b`, ...; stacked over layers like every block param). `LM.trainable` picks them out: gradients
and the optimizer state cover the adapters only, the base weights stay frozen in the train state. The reference
policy of DPO and RL is the base model with the adapters disabled (`LM.hidden(..., adapters=False)`), which reads
the same base arrays: no second copy of the weights.

`merge_adapters` folds them into the base weights (W + s A B) for export; `adapter_params` / `save_adapters` /
`load_adapters` keep or restore the adapters alone.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.config import LORA_TARGETS, LoRAConfig  # noqa: F401  (LORA_TARGETS: the projections that can carry one)

_ATTN_TARGETS = ("q", "k", "v", "o")

#: Suffixes of adapter leaves in a params tree.
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def is_adapter_key(key: str) -> bool:
    return key.endswith(LORA_SUFFIXES)


def _walk(tree, path=()):
    """(path, leaf) pairs of a nested dict, in sorted key order."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _walk(tree[k], path + (k,))
    else:
        yield path, tree


def adapter_params(params: dict) -> dict:
    """The adapter leaves of a decoder params tree, in the same nesting (empty dict when there are none)."""
    out: dict = {}
    for path, leaf in _walk(params):
        if is_adapter_key(path[-1]):
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
    return out


def base_params(params: dict) -> dict:
    """The params tree without its adapter leaves (the same arrays: nothing is copied)."""
    if not isinstance(params, dict):
        return params
    return {k: base_params(v) for k, v in params.items() if not is_adapter_key(k)}


def has_adapters(params: dict) -> bool:
    return any(is_adapter_key(path[-1]) for path, _ in _walk(params))


def with_adapters(params: dict, adapters: dict) -> dict:
    """`params` with its adapter leaves replaced by (or extended with) those of `adapters`."""
    out = dict(params)
    for k, v in adapters.items():
        out[k] = with_adapters(params.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _delta(name: str, a, b, scale: float, weight_shape) -> jax.Array:
    """s * A B in the layout of the weight it adapts (float32), for stacked [L, ...] adapters."""
    L = a.shape[0]
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(L, -1, r)
    b2 = b.astype(jnp.float32).reshape(L, r, -1)
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(weight_shape)


def merge_adapters(params: dict, cfg: LoRAConfig) -> dict:
    """Base params with every adapter folded in: W + s A B (computed in float32, cast to W's dtype). The result has
    no adapter leaves: it is a plain decoder params tree (what `save_pretrained` exports)."""
    merged = base_params(params)
    for group, targets in (("attn", _ATTN_TARGETS), ("mlp", ("gate", "up", "down"))):
        node = params["blocks"].get(group, {})
        for t in targets:
            if f"{t}_lora_a" not in node:
                continue
            w = node[t]
            delta = _delta(t, node[f"{t}_lora_a"], node[f"{t}_lora_b"], cfg.scale, w.shape)
            merged["blocks"][group] = dict(merged["blocks"][group])
            merged["blocks"][group][t] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return merged


def save_adapters(params: dict, cfg: LoRAConfig, directory: str) -> None:
    """Writes the adapters alone: `adapters.safetensors` (flat dotted names, float32) and `lora_config.json`."""
    from safetensors.numpy import save_file

    adapters = adapter_params(params)
    if not adapters:
        raise ValueError("save_adapters: these params carry no LoRA adapters")
    os.makedirs(directory, exist_ok=True)
    flat = {".".join(path): np.asarray(jax.device_get(leaf)) for path, leaf in _walk(adapters)}
    save_file(flat, os.path.join(directory, "adapters.safetensors"), metadata={"format": "jaxpost-lora"})
    with open(os.path.join(directory, "lora_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_adapters(directory: str, params: dict | None = None, shardings: dict | None = None
                  ) -> tuple[dict, LoRAConfig]:
    """(params, LoRA config) from `save_adapters`' files. With `params` (a decoder params tree, with or without
    adapters), returns it with the loaded adapters in place; their shapes must match the adapters `params`
    expects when it has some. `shardings`, a tree like the adapters, places them."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, "adapters.safetensors")
    cfg_path = os.path.join(directory, "lora_config.json")
    for p in (path, cfg_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"load_adapters: {p} does not exist (written by save_adapters)")
    with open(cfg_path) as f:
        raw = json.load(f)
    try:
        cfg = LoRAConfig(**{**raw, "targets": tuple(raw.get("targets", LORA_TARGETS))})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    adapters: dict = {}
    for name, value in load_file(path).items():
        node = adapters
        *parents, leaf = name.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    if params is not None and has_adapters(params):
        expected = {".".join(p): leaf.shape for p, leaf in _walk(adapter_params(params))}
        got = {".".join(p): leaf.shape for p, leaf in _walk(adapters)}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))
            raise ValueError(f"{path}: adapters do not match the model's: {diff[:4]}")
    if shardings is not None:
        adapters = jax.tree.map(lambda x, s: jax.device_put(x, s), adapters, shardings)
    else:
        adapters = jax.tree.map(jnp.asarray, adapters)
    return (with_adapters(params, adapters) if params is not None else adapters), cfg


def lora_shapes(target: str, *, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, mlp_dim: int,
                rank: int) -> tuple[tuple, tuple, tuple, tuple]:
    """(A shape, A logical axes, B shape, B logical axes) of one layer's adapter on `target`."""
    D, H, K, hd, F, r = d_model, n_heads, n_kv_heads, head_dim, mlp_dim, rank
    return {
        "q": ((D, r), ("embed", "lora"), (r, H, hd), ("lora", "heads", "head_dim")),
        "k": ((D, r), ("embed", "lora"), (r, K, hd), ("lora", "kv_heads", "head_dim")),
        "v": ((D, r), ("embed", "lora"), (r, K, hd), ("lora", "kv_heads", "head_dim")),
        "o": ((H, hd, r), ("heads", "head_dim", "lora"), (r, D), ("lora", "embed")),
        "gate": ((D, r), ("embed", "lora"), (r, F), ("lora", "mlp")),
        "up": ((D, r), ("embed", "lora"), (r, F), ("lora", "mlp")),
        "down": ((F, r), ("mlp", "lora"), (r, D), ("lora", "embed")),
    }[target]
