"""Hugging Face checkpoints in and out: Llama, Qwen2 and Qwen3 (`config.json` + safetensors) <-> jaxpost params.

`from_pretrained` reads a model directory (one `model.safetensors`, or shards listed by `model.safetensors.index.json`)
and builds every parameter directly in its sharded layout: each device's block of a stacked [layers, ...] leaf is read
from the memory-mapped safetensors files, slice by slice, by `jax.make_array_from_callback`, so no host ever holds the
whole model (a leaf is whole on the host only when one device holds it whole). `save_pretrained` streams the other
way: one Hugging Face tensor at a time is gathered (`jax.device_get`) and appended to a safetensors file whose header
is written first, so the host holds one tensor, never a shard.

Layouts (Hugging Face stores `nn.Linear` weights [out, in]; jaxpost stores [in, out], heads split, layers stacked):

    model.embed_tokens.weight                 [V, D]       -> embed                  [V, D]
    model.layers.i.self_attn.q_proj.weight    [H*hd, D]    -> blocks.attn.q          [L, D, H, hd]   (k, v: K heads)
    model.layers.i.self_attn.q_proj.bias      [H*hd]       -> blocks.attn.q_bias     [L, H, hd]      (Qwen2)
    model.layers.i.self_attn.o_proj.weight    [D, H*hd]    -> blocks.attn.o          [L, H, hd, D]
    model.layers.i.self_attn.q_norm.weight    [hd]         -> blocks.attn.q_norm     [L, hd]         (Qwen3)
    model.layers.i.input_layernorm.weight     [D]          -> blocks.attn_norm       [L, D]
    model.layers.i.post_attention_layernorm   [D]          -> blocks.mlp_norm        [L, D]
    model.layers.i.mlp.gate_proj.weight       [F, D]       -> blocks.mlp.gate        [L, D, F]       (up likewise)
    model.layers.i.mlp.down_proj.weight       [D, F]       -> blocks.mlp.down        [L, F, D]
    model.norm.weight                         [D]          -> final_norm             [D]
    lm_head.weight                            [V, D]       -> lm_head                [D, V]          (absent if tied)

Values are only transposed and cast, so HF -> jaxpost -> HF is bit-exact whenever the jaxpost dtype holds the source
dtype (float32 holds bfloat16 and float16). Multi-host: every process must call `save_pretrained` (each tensor is
gathered with `process_allgather`); process 0 alone writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jaxtyping import Array, Float, Int

from jaxpost.config import ModelConfig
from jaxpost.models.lm import LM

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

#: Files of a model directory that describe its tokenizer and generation defaults (copied as they are by converters).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# transformers' defaults for keys a config.json may leave out (they differ between architectures).
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=32),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=32, head_dim=128),
}
_DEFAULT_THETA = 10_000.0
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_ST_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer older transformers versions saved; recomputed here
_LORA_SUFFIXES = ("_lora_a", "_lora_b")


class HFFormatError(ValueError):
    """A Hugging Face model directory jaxpost cannot read (or params it cannot write): the message names the file and
    the field or tensor."""


class Pretrained(NamedTuple):
    """A loaded model: the `LM` handle, its params (pure dict, sharded as requested) and the source `config.json` dict
    (None when the params did not come from one); `save_pretrained` keeps that config's extra fields."""

    lm: LM
    params: dict
    hf_config: dict | None = None

    @property
    def cfg(self) -> ModelConfig:
        return self.lm.cfg


# ---- config.json <-> ModelConfig -------------------------------------------------------------------------------------

def _rope_from_hf(hf: dict, source: str) -> dict:
    """ModelConfig RoPE fields from either the legacy keys (`rope_theta`, `rope_scaling`) or transformers 5's
    `rope_parameters`."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise HFFormatError(f"{source}: rope_parameters must be an object, got {params!r}")
    if legacy is not None and not isinstance(legacy, dict):
        raise HFFormatError(f"{source}: rope_scaling must be an object or null, got {legacy!r}")
    theta = hf.get("rope_theta")
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise HFFormatError(f"{source}: rope_parameters per layer type are not supported")
    if params is not None and params.get("rope_theta") is not None:
        if theta is not None and float(theta) != float(params["rope_theta"]):
            raise HFFormatError(f"{source}: rope_theta={theta} disagrees with rope_parameters.rope_theta="
                                f"{params['rope_theta']}")
        theta = params["rope_theta"]
    theta = _DEFAULT_THETA if theta is None else float(theta)

    def kind(d, field):
        t = d.get("rope_type", d.get("type", "default"))
        if t not in ("default", "llama3"):
            raise HFFormatError(f"{source}: {field}.rope_type={t!r} is not supported (only 'default' and 'llama3')")
        prf = d.get("partial_rotary_factor", 1.0)
        if prf is not None and float(prf) != 1.0:
            raise HFFormatError(f"{source}: {field}.partial_rotary_factor={prf} is not supported (only 1.0)")
        return t

    scalings = [(field, d, kind(d, field)) for field, d in (("rope_parameters", params), ("rope_scaling", legacy))
                if d is not None]
    scaled = [(field, d) for field, d, t in scalings if t == "llama3"]
    if not scaled:
        return dict(rope_theta=theta, rope_scaling="none")
    field, d = scaled[0]
    missing = [k for k in _LLAMA3_KEYS if d.get(k) is None]
    if missing:
        raise HFFormatError(f"{source}: {field} of rope_type 'llama3' lacks {missing}")
    for other_field, other in scaled[1:]:
        if any(float(other[k]) != float(d[k]) for k in _LLAMA3_KEYS):
            raise HFFormatError(f"{source}: rope_scaling and rope_parameters disagree")
    if len(scaled) < len(scalings):
        raise HFFormatError(f"{source}: rope_scaling and rope_parameters disagree on the rope_type")
    return dict(rope_theta=theta, rope_scaling="llama3", rope_factor=float(d["factor"]),
                rope_low_freq_factor=float(d["low_freq_factor"]), rope_high_freq_factor=float(d["high_freq_factor"]),
                rope_original_max_len=int(d["original_max_position_embeddings"]))


@functools.lru_cache(maxsize=32)
def lm_for(cfg: ModelConfig) -> LM:
    """One `LM` per config, so that every model loaded with the same config shares compiled functions."""
    return LM(cfg)


def config_from_hf(hf_config: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                   name: str | None = None, source: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face Llama / Qwen2 / Qwen3 `config.json` dict.

    `dtype` is the compute dtype and `param_dtype` the dtype the params are held in (whatever the checkpoint's).
    Accepts both the legacy RoPE keys (`rope_theta`, `rope_scaling`) and transformers 5's `rope_parameters`. Anything
    the decoder does not implement (another architecture, activation, biases on o_proj or the MLP, sliding windows,
    another RoPE type) raises `HFFormatError` naming the field and `source`.
    """
    hf = hf_config
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise HFFormatError(f"{source}: model_type={mt!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    archs = hf.get("architectures")
    if archs is not None and list(archs) != [ARCHITECTURES[mt]]:
        raise HFFormatError(f"{source}: architectures={archs!r} is not supported for model_type={mt!r}; "
                            f"expected [{ARCHITECTURES[mt]!r}]")
    defaults = _DEFAULTS[mt]

    def get(key, default=None):
        value = hf.get(key)
        if value is None:
            value = defaults.get(key, default)
        if value is None:
            raise HFFormatError(f"{source}: the field {key!r} is missing")
        return value

    def require(key, expected, default):
        value = hf.get(key, default)
        value = default if value is None else value
        if value != expected:
            raise HFFormatError(f"{source}: {key}={value!r} is not supported for {mt} (only {expected!r})")

    require("hidden_act", "silu", "silu")
    if mt == "llama":
        require("mlp_bias", False, False)
        if hf.get("attention_bias"):
            raise HFFormatError(f"{source}: attention_bias=true is not supported for llama (it also puts a bias on "
                                f"o_proj, which the jaxpost decoder does not have)")
    if mt == "qwen3" and hf.get("attention_bias"):
        raise HFFormatError(f"{source}: attention_bias=true is not supported for qwen3 (it also puts a bias on "
                            f"o_proj, which the jaxpost decoder does not have)")
    if mt in ("qwen2", "qwen3"):
        require("use_sliding_window", False, False)
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise HFFormatError(f"{source}: layer_types={layer_types!r}: only full_attention layers are supported")

    d_model, n_heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = hf.get("head_dim") or defaults.get("head_dim") or d_model // n_heads
    kw = dict(
        name=name or mt, vocab_size=int(get("vocab_size")), d_model=d_model, n_layers=int(get("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or defaults.get("num_key_value_heads", n_heads)),
        head_dim=int(head_dim), mlp_dim=int(get("intermediate_size")), rms_eps=float(get("rms_norm_eps")),
        qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(get("max_position_embeddings")), dtype=dtype, param_dtype=param_dtype,
        **_rope_from_hf(hf, source))
    if hf.get("initializer_range") is not None:
        kw["init_std"] = float(hf["initializer_range"])
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from e


def _model_type(cfg: ModelConfig, base: dict | None) -> str:
    mt = (base or {}).get("model_type")
    if mt is None:
        if cfg.qkv_bias and cfg.qk_norm:
            raise HFFormatError("no Hugging Face architecture has both qkv_bias and qk_norm without an o_proj bias")
        mt = "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"
    if mt not in ARCHITECTURES:
        raise HFFormatError(f"base config: model_type={mt!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    if cfg.qkv_bias != (mt == "qwen2") or cfg.qk_norm != (mt == "qwen3"):
        raise HFFormatError(f"ModelConfig(qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}) cannot be written as "
                            f"model_type={mt!r} (qwen2 has the qkv bias, qwen3 the q/k norm, llama neither)")
    return mt


def _recorded_dtype(hf: dict | None) -> str | None:
    """The tensor dtype a config.json records (`torch_dtype`, or transformers 5's `dtype`), if it is one we write."""
    recorded = (hf or {}).get("torch_dtype") or (hf or {}).get("dtype")
    recorded = recorded.removeprefix("torch.") if isinstance(recorded, str) else None
    return recorded if recorded in _DTYPE_NAMES else None


def hf_config_from(cfg: ModelConfig, *, base: dict | None = None, torch_dtype: str | None = None) -> dict:
    """The Hugging Face `config.json` dict of `cfg`: the inverse of `config_from_hf`.

    RoPE is written with the legacy keys `rope_theta` and `rope_scaling`, which every transformers version and vLLM
    read; a `rope_parameters` entry of `base` (transformers 5) is kept and updated too. `base`, the original config
    dict, keeps the fields jaxpost does not model (token ids, ...), so that a round trip reproduces it.
    `torch_dtype` (default: the one `base` records, else `cfg.param_dtype`) is recorded as `dtype` and/or
    `torch_dtype`, whichever `base` uses (both without a base).
    """
    out = copy.deepcopy(base) if base is not None else {}
    mt = _model_type(cfg, base)
    torch_dtype = torch_dtype or _recorded_dtype(base) or cfg.param_dtype
    out.update(architectures=[ARCHITECTURES[mt]], model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
               intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.rms_eps, hidden_act="silu",
               tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
               initializer_range=cfg.init_std, rope_theta=cfg.rope_theta)
    if "head_dim" in out or base is None or mt == "qwen3" or cfg.head_dim != cfg.d_model // cfg.n_heads:
        out["head_dim"] = cfg.head_dim
    if mt in ("llama", "qwen3"):
        out["attention_bias"] = False
    if mt == "llama":
        out["mlp_bias"] = False
    if mt in ("qwen2", "qwen3") and "use_sliding_window" in out:
        out["use_sliding_window"] = False
    if cfg.rope_scaling == "llama3":
        scaling = dict(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                       high_freq_factor=cfg.rope_high_freq_factor,
                       original_max_position_embeddings=cfg.rope_original_max_len, rope_type="llama3")
        legacy = out.get("rope_scaling") if isinstance(out.get("rope_scaling"), dict) else {}
        type_key = "type" if "type" in legacy and "rope_type" not in legacy else "rope_type"  # older configs: "type"
        out["rope_scaling"] = {**legacy, **{k: v for k, v in scaling.items() if k != "rope_type"},
                               type_key: "llama3"}
    else:
        scaling = dict(rope_type="default")
        legacy = out.get("rope_scaling")
        if base is None or (isinstance(legacy, dict) and legacy.get("rope_type", legacy.get("type")) == "llama3"):
            out["rope_scaling"] = None
    if isinstance(out.get("rope_parameters"), dict):
        params = {k: v for k, v in out["rope_parameters"].items()
                  if cfg.rope_scaling == "llama3" or k not in _LLAMA3_KEYS}
        out["rope_parameters"] = {**params, **scaling, "rope_theta": cfg.rope_theta}
    keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype", "dtype"]
    for k in keys:
        out[k] = torch_dtype
    return out


# ---- the tensor map --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Spec:
    """One jaxpost leaf and its Hugging Face tensor(s): the HF tensor [hf_shape] reshaped to `view` and transposed by
    `perm` is the leaf (per layer, when `layered`: the leaf stacks `hf_name.format(i=layer)` over layers)."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    layered: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.view[p] for p in self.perm)

    @property
    def groups(self) -> list[list[int]]:
        """The view dims each HF dim splits into."""
        groups, d = [], 0
        for size in self.hf_shape:
            group, prod = [d], self.view[d]
            d += 1
            while prod < size:
                group.append(d)
                prod *= self.view[d]
                d += 1
            if prod != size:
                raise AssertionError(f"{self.hf_name}: view {self.view} does not refine {self.hf_shape}")
            groups.append(group)
        if d != len(self.view):
            raise AssertionError(f"{self.hf_name}: view {self.view} does not refine {self.hf_shape}")
        return groups

    def names(self, n_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(n_layers)] if self.layered else [self.hf_name]


def _specs(cfg: ModelConfig) -> list[_Spec]:
    """Every jaxpost leaf of `cfg`, in Hugging Face state-dict order (embedding, layers, final norm, head)."""
    D, H, K, hd, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    p = "model.layers.{i}."
    specs = [_Spec("model.embed_tokens.weight", ("embed",), (V, D), (V, D), (0, 1), False),
             _Spec(p + "input_layernorm.weight", ("blocks", "attn_norm", "scale"), (D,), (D,), (0,), True)]
    for n, heads in (("q", H), ("k", K), ("v", K)):
        specs.append(_Spec(p + f"self_attn.{n}_proj.weight", ("blocks", "attn", n), (heads * hd, D), (heads, hd, D),
                           (2, 0, 1), True))
        if cfg.qkv_bias:
            specs.append(_Spec(p + f"self_attn.{n}_proj.bias", ("blocks", "attn", f"{n}_bias"), (heads * hd,),
                               (heads, hd), (0, 1), True))
    specs.append(_Spec(p + "self_attn.o_proj.weight", ("blocks", "attn", "o"), (D, H * hd), (D, H, hd), (1, 2, 0),
                       True))
    if cfg.qk_norm:
        for n in ("q", "k"):
            specs.append(_Spec(p + f"self_attn.{n}_norm.weight", ("blocks", "attn", f"{n}_norm", "scale"), (hd,),
                               (hd,), (0,), True))
    specs += [_Spec(p + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale"), (D,), (D,), (0,), True),
              _Spec(p + "mlp.gate_proj.weight", ("blocks", "mlp", "gate"), (F, D), (F, D), (1, 0), True),
              _Spec(p + "mlp.up_proj.weight", ("blocks", "mlp", "up"), (F, D), (F, D), (1, 0), True),
              _Spec(p + "mlp.down_proj.weight", ("blocks", "mlp", "down"), (D, F), (D, F), (1, 0), True),
              _Spec("model.norm.weight", ("final_norm", "scale"), (D,), (D,), (0,), False)]
    if not cfg.tie_embeddings:
        specs.append(_Spec("lm_head.weight", ("lm_head",), (V, D), (V, D), (1, 0), False))
    return specs


def _paths(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        for k in tree:
            yield from _paths(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _checked_specs(lm: LM) -> list[_Spec]:
    specs = _specs(lm.cfg)
    abstract = dict(_paths(lm.abstract_params))
    mapped = {s.path for s in specs}
    extra = sorted(".".join(p) for p in abstract if p not in mapped)
    if extra:
        raise HFFormatError(f"the decoder has params with no Hugging Face tensor: {extra}")
    for s in specs:
        want = ((lm.cfg.n_layers,) if s.layered else ()) + s.shape
        if tuple(abstract[s.path].shape) != want:
            raise AssertionError(f"{'.'.join(s.path)}: decoder shape {abstract[s.path].shape}, map gives {want}")
    return specs


# ---- reading ---------------------------------------------------------------------------------------------------------

def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e})") from e


@contextlib.contextmanager
def _open_safetensors(fpath: str):
    """`safe_open(fpath)` (numpy; no pickle anywhere), a truncated or garbled file an HFFormatError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(fpath, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise HFFormatError(f"{fpath}: not a readable safetensors file ({e})") from e
    with handle as f:
        yield f


def _weight_map(path: str) -> dict[str, str]:
    """Tensor name -> file name (relative to `path`) of a model directory, validated against the files."""
    index_path, single = os.path.join(path, INDEX), os.path.join(path, SAFETENSORS)
    if os.path.exists(index_path):
        index = _read_json(index_path)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise HFFormatError(f"{index_path}: the field 'weight_map' is missing or not a non-empty object")
        bad = [k for k, v in wm.items() if not isinstance(v, str) or os.path.basename(v) != v]
        if bad:
            raise HFFormatError(f"{index_path}: weight_map[{bad[0]!r}]={wm[bad[0]]!r} is not a file name")
        for fname in sorted(set(wm.values())):
            if not os.path.exists(os.path.join(path, fname)):
                raise HFFormatError(f"{index_path}: weight_map names {fname}, which does not exist in {path}")
        for fname in sorted(set(wm.values())):
            fpath = os.path.join(path, fname)
            with _open_safetensors(fpath) as f:
                keys = set(f.keys())
            listed = {k for k, v in wm.items() if v == fname}
            if listed - keys:
                raise HFFormatError(f"{index_path}: weight_map puts {sorted(listed - keys)[0]!r} in {fname}, which "
                                    f"does not contain it")
            if keys - listed:
                raise HFFormatError(f"{fpath}: holds {sorted(keys - listed)[0]!r}, which {INDEX} does not list "
                                    f"there")
        return dict(wm)
    if os.path.exists(single):
        with _open_safetensors(single) as f:
            return {k: SAFETENSORS for k in f.keys()}
    other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, f))]
    hint = f" ({other[0]} is not supported: convert it to safetensors)" if other else ""
    raise HFFormatError(f"{path}: neither {SAFETENSORS} nor {INDEX}{hint}")


def _norm_slices(index, shape) -> list[slice]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s}")
        out.append(slice(start, stop))
    return out


def _read_view(tensor, spec: _Spec, vs: list[slice]) -> np.ndarray:
    """The block `vs` (slices of the per-layer view: the HF tensor reshaped to `spec.view`, not yet transposed) of
    one HF tensor (a safetensors slice handle), in the file's dtype: reads only the rows/columns it needs (a split
    dim is read whole on its inner part)."""
    hf_index, read_shape, post = [], [], []
    for group in spec.groups:
        outer, inner = group[0], group[1:]
        n_inner = math.prod(spec.view[d] for d in inner)
        hf_index.append(slice(vs[outer].start * n_inner, vs[outer].stop * n_inner))
        read_shape += [vs[outer].stop - vs[outer].start] + [spec.view[d] for d in inner]
        post += [slice(None)] + [vs[d] for d in inner]
    return np.asarray(tensor[tuple(hf_index)]).reshape(read_shape)[tuple(post)]


@functools.lru_cache(maxsize=None)
def _to_layout(perm: tuple[int, ...], dtype: str, sharding):
    """A jitted transpose + cast from the view layout to the jaxpost layout: the view array is sharded like its
    result (the same mesh axes on the same dims), so every device transposes its own block, with no communication."""
    return jax.jit(lambda x: jnp.transpose(x, perm).astype(dtype), out_shardings=sharding, donate_argnums=0)


def from_pretrained(path: str | os.PathLike, *, mesh=None, dtype: str = "float32",
                    compute_dtype: str | None = None) -> tuple[Pretrained, ModelConfig]:
    """(model, config) of a Hugging Face Llama / Qwen2 / Qwen3 directory, read from local files only.

    The params are held in `dtype` and computed in `compute_dtype` (default: `dtype`). With `mesh`, each param is
    created directly in its sharded layout (`LM.param_shardings`): every device's block is read from the
    memory-mapped safetensors files; without, on the first device. Missing, unexpected or misshapen tensors raise
    `HFFormatError` naming the tensor and its file.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise HFFormatError(f"{path}: no config.json")
    hf_config = _read_json(cfg_path)
    cfg = config_from_hf(hf_config, dtype=compute_dtype or dtype, param_dtype=dtype, source=cfg_path)
    lm = lm_for(cfg)
    specs = _checked_specs(lm)
    wm = _weight_map(path)

    expected = {name: (s, name) for s in specs for name in s.names(cfg.n_layers)}
    missing = [n for n in expected if n not in wm]
    if missing:
        files = INDEX if os.path.exists(os.path.join(path, INDEX)) else SAFETENSORS
        raise HFFormatError(f"{os.path.join(path, files)}: missing tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(n for n in wm if n not in expected and not _IGNORED.search(n))
    if unexpected:
        hint = " (config.json says tie_word_embeddings=true)" if unexpected[0] == "lm_head.weight" else ""
        raise HFFormatError(f"{os.path.join(path, wm[unexpected[0]])}: unexpected tensor {unexpected[0]!r}{hint}"
                            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

    if mesh is not None:
        shardings = lm.param_shardings(mesh)
    else:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, lm.abstract_params)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open_safetensors(os.path.join(path, f)))
                   for f in sorted(set(wm[n] for n in expected))}

        def tensor(name):
            f = wm[name]
            t = handles[f].get_slice(name)
            if t.get_dtype() not in _ST_DTYPES:
                raise HFFormatError(f"{os.path.join(path, f)}: tensor {name!r} has dtype {t.get_dtype()}; "
                                    f"supported: {sorted(_ST_DTYPES)}")
            if tuple(t.get_shape()) != expected[name][0].hf_shape:
                raise HFFormatError(f"{os.path.join(path, f)}: tensor {name!r} has shape {tuple(t.get_shape())}, "
                                    f"expected {expected[name][0].hf_shape} from config.json")
            return t

        for s in specs:
            names = s.names(cfg.n_layers)
            dtypes = {tensor(n).get_dtype() for n in names}  # validates every tensor before any is read
            if len(dtypes) > 1:
                raise HFFormatError(f"{path}: the tensors {s.hf_name.format(i='*')} mix dtypes {sorted(dtypes)}")
            file_dtype = np.dtype(_ST_DTYPES[dtypes.pop()])

            # Each device's block is read in the HF view layout (contiguous rows of the file) and transposed to the
            # jaxpost layout on the device: host-side strided transposes are several times slower.
            lead = (cfg.n_layers,) if s.layered else ()
            perm = ((0,) + tuple(q + 1 for q in s.perm)) if s.layered else s.perm
            target = _get(shardings, s.path)
            view_sharding = target
            if isinstance(target, NamedSharding):  # the same mesh axes on the same (permuted) dims
                spec_t = tuple(target.spec) + (None,) * (len(perm) - len(target.spec))
                view_sharding = NamedSharding(target.mesh, jax.sharding.PartitionSpec(
                    *(spec_t[perm.index(d)] for d in range(len(perm)))))

            def cb(index, s=s, names=names):
                if not s.layered:
                    return _read_view(tensor(names[0]), s, _norm_slices(index, s.view))
                ls, *vs = _norm_slices(index, (cfg.n_layers,) + s.view)
                return np.stack([_read_view(tensor(names[i]), s, vs) for i in range(ls.start, ls.stop)])

            view = jax.make_array_from_callback(lead + s.view, view_sharding, cb, dtype=file_dtype)
            _set(params, s.path, _to_layout(perm, dtype, target)(view))
    return Pretrained(lm, params, hf_config), cfg


# ---- writing ---------------------------------------------------------------------------------------------------------

def _dtype_name(d) -> str:
    name = jnp.dtype(d).name if not isinstance(d, str) else d
    name = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(name, name)
    if name not in _DTYPE_NAMES:
        raise HFFormatError(f"export dtype {d!r} is not supported; supported: {sorted(_DTYPE_NAMES)}")
    return name


def _check_params(params: dict, lm: LM) -> None:
    lora = sorted(".".join(p) for p, _ in _paths(params) if p[-1].endswith(_LORA_SUFFIXES))
    if lora:
        raise HFFormatError(f"the params hold LoRA adapters ({lora[0]}, ...): merge them into the base weights "
                            f"first (jaxpost.models.lora.merge_adapters) and save the merged params")
    want, got = dict(_paths(lm.abstract_params)), dict(_paths(params))
    for p in sorted(set(want) | set(got)):
        if p not in got:
            raise HFFormatError(f"params lack {'.'.join(p)} (the ModelConfig says it exists)")
        if p not in want:
            raise HFFormatError(f"params hold {'.'.join(p)}, which the ModelConfig does not have")
        if tuple(got[p].shape) != tuple(want[p].shape):
            raise HFFormatError(f"params {'.'.join(p)} has shape {tuple(got[p].shape)}, the ModelConfig says "
                                f"{tuple(want[p].shape)}")


def _gather(x) -> np.ndarray:
    """The whole (global) array on the host. Multi-host: every process must call it (a collective)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_safetensors(filename: str, entries: list, metadata: dict) -> None:
    """A safetensors file from (name, hf_shape, np dtype, produce) entries, header first, then each tensor's bytes
    as `produce()` returns them: one tensor in memory at a time. Written to a temporary name, then renamed."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dt, _ in entries:
        n = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dt).name], "shape": list(shape), "data_offsets": [offset,
                                                                                                        offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # like safetensors: the data starts 8-byte aligned
    tmp = filename + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt, produce in entries:
            x = produce()
            if x.shape != tuple(shape) or x.dtype != np.dtype(dt):
                raise AssertionError(f"{name}: produced {x.shape} {x.dtype}, header says {shape} {dt}")
            f.write(np.ascontiguousarray(x).view(np.uint8).data)
    os.replace(tmp, filename)


def save_pretrained(model_or_params: Pretrained | dict, config: ModelConfig, path: str | os.PathLike, *,
                    dtype: str | None = None, base_config: dict | None = None,
                    max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes a Hugging Face model directory: `config.json` and the weights as one `model.safetensors` or, past
    `max_shard_bytes`, `model-XXXXX-of-YYYYY.safetensors` shards with `model.safetensors.index.json`.

    `base_config` (default: the `hf_config` a `Pretrained` carries) is the source `config.json` dict whose other fields
    are kept. The tensors are written in `dtype`, by default the dtype that config records (`torch_dtype`/`dtype`),
    else the params' dtype. Params holding LoRA adapters are refused: merge them first. Streams one tensor at a time
    (gathered with `jax.device_get`); multi-host, every process must call this and process 0 alone writes. Stale
    weight files of an earlier save in `path` are removed.
    """
    if isinstance(model_or_params, Pretrained):
        params = model_or_params.params
        base_config = model_or_params.hf_config if base_config is None else base_config
    else:
        params = model_or_params
    lm = lm_for(config)
    _check_params(params, lm)
    specs = _checked_specs(lm)
    dtype = _dtype_name(dtype or _recorded_dtype(base_config) or params["embed"].dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))
    hf_cfg = hf_config_from(config, base=base_config, torch_dtype=dtype)

    entries = []  # (name, hf_shape, dtype, produce, nbytes)
    for s in specs:
        leaf = _get(params, s.path)
        inv = tuple(np.argsort(s.perm))
        for i, name in enumerate(s.names(config.n_layers)):
            def produce(leaf=leaf, s=s, i=i, inv=inv):
                x = _gather(leaf[i] if s.layered else leaf)
                return x.transpose(inv).reshape(s.hf_shape).astype(np_dtype)
            entries.append((name, s.hf_shape, np_dtype, produce, math.prod(s.hf_shape) * np_dtype.itemsize))

    shards: list[list] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[4]

    path = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):
            if f in (SAFETENSORS, INDEX) or _SHARD_RE.match(f):
                os.remove(os.path.join(path, f))
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = SAFETENSORS if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        if writer:
            _write_safetensors(os.path.join(path, fname), [e[:4] for e in shard], {"format": "pt"})
        else:  # the other processes join every gather
            for e in shard:
                e[3]()
        weight_map.update({e[0]: fname for e in shard})
    if writer:
        if n > 1:
            index = {"metadata": {"total_parameters": int(sum(math.prod(e[1]) for e in entries)),
                                  "total_size": int(sum(e[4] for e in entries))},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(path, INDEX), "w") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the `TOKENIZER_FILES` present in `src` into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            os.makedirs(dst, exist_ok=True)
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


# ---- inference -------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _logits(lm: LM, params, tokens_BT, positions_BT, segment_ids_BT):
    return lm.logits(params, tokens_BT, positions_BT, segment_ids_BT)


def _mesh_of(params):
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def logits(model: Pretrained, tokens: Int[Array, "B T"],
           attention_mask: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
    """Float32 [B, T, V] logits (for evaluation and parity checks; training paths never build them).

    With `attention_mask` (1 = real token, Hugging Face's convention), padding forms its own segment (segment 0,
    invisible to real tokens) and positions count real tokens only (cumsum(mask) - 1, clipped at 0), so left- and
    right-padded rows give, at their real positions, the logits of the unpadded row.
    """
    tokens_BT = jnp.asarray(tokens, jnp.int32)
    if attention_mask is None:
        mask_BT = jnp.ones_like(tokens_BT)
    else:
        mask_BT = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    mesh = _mesh_of(model.params)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _logits(model.lm, model.params, tokens_BT, positions_BT, mask_BT)
