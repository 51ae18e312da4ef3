"""Hugging Face checkpoints in and out (jaxpost.models.hf, tools/convert_hf.py) against transformers itself.

Tiny randomly initialised Llama (plain; Llama 3.1 RoPE scaling with tied embeddings and a legacy-format config.json),
Qwen2 (qkv bias; sharded files) and Qwen3 (q/k norm, head_dim != d_model / heads; also saved in bfloat16), with every
weight random, norms and biases included.
"""

import json
import os
import shutil

import jax
import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors)
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxpost.config import ModelConfig  # noqa: E402
from jaxpost.models import Pretrained, from_pretrained, logits, save_pretrained  # noqa: E402
from jaxpost.models import hf as hf_lib  # noqa: E402
from jaxpost.models.hf import HFFormatError, config_from_hf, hf_config_from  # noqa: E402
from jaxpost.models.params_io import load_orbax_params  # noqa: E402
from tests.helpers import mesh_of  # noqa: E402
from tools import convert_hf  # noqa: E402

V, T = 96, 10
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=512)  # head_dim 8: one kept, one smoothed, two divided frequencies


def _hf_config(kind):
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON, rope_parameters=dict(rope_type="default", rope_theta=5000.0))
    if kind == "llama3_tied":
        return transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 1024}, rope_parameters=LLAMA3_ROPE,
                                        tie_word_embeddings=True)
    if kind == "qwen2":
        return transformers.Qwen2Config(**COMMON, rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if kind in ("qwen3", "qwen3_bf16"):
        return transformers.Qwen3Config(**COMMON, head_dim=16, rope_parameters=dict(rope_type="default",
                                                                                      rope_theta=1e6))
    raise ValueError(kind)


def _random_model(kind):
    torch.manual_seed(sum(map(ord, kind)))
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.25 * torch.randn_like(p))
    return model.eval()


def _to_legacy_config(path):
    """Rewrites a transformers-5 config.json in the legacy form (top-level rope_theta, rope_scaling, torch_dtype)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    hf["torch_dtype"] = hf.pop("dtype")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> a saved transformers model directory."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for kind in ("llama", "llama3_tied", "qwen2", "qwen3", "qwen3_bf16"):
        model = _random_model(kind)
        path = str(root / kind)
        if kind == "qwen3_bf16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="20KB" if kind == "qwen2" else "50GB")
        if kind == "llama3_tied":
            _to_legacy_config(path)
        dirs[kind] = path
    assert os.path.exists(os.path.join(dirs["qwen2"], "model.safetensors.index.json"))
    assert len([f for f in os.listdir(dirs["qwen2"]) if f.endswith(".safetensors")]) > 2
    return dirs


def _batch():
    """Row 0 unpadded, row 1 its first 7 tokens left-padded, row 2 its first 6 tokens right-padded."""
    tokens = np.random.default_rng(0).integers(0, V, (3, T))
    mask = np.ones((3, T), np.int64)
    tokens[1, 3:] = tokens[0, :7]
    tokens[1, :3] = 0
    mask[1, :3] = 0
    tokens[2, :6] = tokens[0, :6]
    tokens[2, 6:] = 0
    mask[2, 6:] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _tensors(path) -> dict:
    """name -> (dtype, shape, bytes) over every safetensors file of a directory."""
    out = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="numpy") as f:
                assert f.metadata() == {"format": "pt"}
                for k in f.keys():
                    x = f.get_tensor(k)
                    out[k] = (f.get_slice(k).get_dtype(), x.shape, x.tobytes())
    return out


def _read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _assert_configs_equal(src, out):
    a, b = _read_config(src), _read_config(out)
    assert {k: b.get(k) for k in a} == a  # every source field reproduced
    extra = set(b) - set(a)
    # A transformers-5 config gains the legacy RoPE keys (what older readers understand), which agree with it.
    assert extra <= ({"rope_theta", "rope_scaling"} if "rope_parameters" in a else set()), extra
    ca, cb = (transformers.AutoConfig.from_pretrained(p, local_files_only=True).to_dict() for p in (src, out))
    ca.pop("_name_or_path"), cb.pop("_name_or_path")
    assert ca == cb
    assert config_from_hf(a) == config_from_hf(b)


# ---- parity with transformers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "llama3_tied", "qwen2", "qwen3"])
def test_logits_match_transformers_on_padded_batches(hf_dirs, kind):
    model, cfg = from_pretrained(hf_dirs[kind])
    assert isinstance(model, Pretrained) and model.cfg == cfg
    assert cfg.tie_embeddings == (kind == "llama3_tied") and cfg.qkv_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind == "qwen3") and (cfg.head_dim == 16) == (kind == "qwen3")
    assert cfg.rope_scaling == ("llama3" if kind == "llama3_tied" else "none")
    tokens, mask = _batch()
    ours = np.asarray(logits(model, tokens, mask))
    assert ours.dtype == np.float32 and ours.shape == (3, T, V)
    ref = _hf_logits(_load_hf(hf_dirs[kind]), tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # Padding changes nothing at the real positions.
    np.testing.assert_allclose(ours[1, 3:], ours[0, :7], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[2, :6], ours[0, :6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits(model, tokens[:1])), ours[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama3_tied", "qwen2", "qwen3"])
def test_saved_checkpoints_load_in_transformers(hf_dirs, kind, tmp_path):
    model, cfg = from_pretrained(hf_dirs[kind])
    tokens, mask = _batch()
    ours = np.asarray(logits(model, tokens, mask))
    real = mask.astype(bool)
    # Without the source config (only the ModelConfig) and with it (through the Pretrained).
    save_pretrained(model.params, cfg, tmp_path / "plain")
    save_pretrained(model, cfg, tmp_path / "based")
    for sub in ("plain", "based"):
        ref = _hf_logits(_load_hf(tmp_path / sub), tokens, mask)
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    plain = _read_config(tmp_path / "plain")
    assert plain["torch_dtype"] == plain["dtype"] == "float32"
    assert config_from_hf(plain) == cfg


# ---- round trips -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("llama3_tied", "float32"), ("qwen2", "float32"),
                                        ("qwen3_bf16", "bfloat16"), ("qwen3_bf16", "float32")])
def test_hf_to_jaxpost_to_hf_is_bit_exact(hf_dirs, kind, dtype, tmp_path):
    src = hf_dirs[kind]
    model, cfg = from_pretrained(src, dtype=dtype)
    assert model.params["embed"].dtype == np.dtype(dtype)
    sharded = kind == "qwen2"
    save_pretrained(model, cfg, tmp_path, max_shard_bytes=20_000 if sharded else 5 * 10**9)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert (len(files) > 2) if sharded else (files == ["model.safetensors"])
    if sharded:
        with open(tmp_path / "model.safetensors.index.json") as f:
            index = json.load(f)
        for name, fname in index["weight_map"].items():
            with safe_open(tmp_path / fname, framework="numpy") as f:
                assert name in f.keys()
        assert index["metadata"]["total_size"] == sum(os.path.getsize(tmp_path / f) for f in files) - sum(
            8 + int.from_bytes(open(tmp_path / f, "rb").read(8), "little") for f in files)
    a, b = _tensors(src), _tensors(tmp_path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert a[name][2] == b[name][2], f"{name}: bytes differ"
    _assert_configs_equal(src, tmp_path)


def test_config_round_trips_in_both_rope_forms():
    # Llama 3.1 8B's published config.json (legacy form), and the same in transformers 5's form.
    legacy = dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=128000,
                  eos_token_id=128001, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
                  intermediate_size=14336, max_position_embeddings=131072, mlp_bias=False, model_type="llama",
                  num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, pretraining_tp=1,
                  rms_norm_eps=1e-05, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192, rope_type="llama3"),
                  rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                  transformers_version="4.43.0.dev0", use_cache=True, vocab_size=128256)
    cfg = config_from_hf(legacy, dtype="bfloat16")
    assert cfg == ModelConfig.llama3_1_8b(name="llama")
    assert hf_config_from(cfg, base=legacy, torch_dtype="bfloat16") == legacy
    new = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new.update(dtype="bfloat16", rope_parameters={**legacy["rope_scaling"], "rope_theta": 500000.0})
    assert config_from_hf(new, dtype="bfloat16") == cfg
    out = hf_config_from(cfg, base=new)
    assert {k: out[k] for k in new} == new and out["rope_scaling"] == legacy["rope_scaling"]
    assert out["rope_theta"] == 500000.0 and "torch_dtype" not in out


# ---- sharded loading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_loading_onto_a_mesh_gives_the_single_device_logits(hf_dirs, kind, monkeypatch):
    mesh = mesh_of(1, 4, 2)
    one, _ = from_pretrained(hf_dirs[kind])
    blocks = []

    def spy(tensor, spec, vs):
        out = read_view(tensor, spec, vs)
        blocks.append((spec.path, out.shape))
        return out

    read_view = hf_lib._read_view
    monkeypatch.setattr(hf_lib, "_read_view", spy)
    model, cfg = from_pretrained(hf_dirs[kind], mesh=mesh)
    # Each device reads its own block of each layer, in the file's [H, hd, D] view: never a whole q projection.
    q_blocks = {shape for path, shape in blocks if path == ("blocks", "attn", "q")}
    assert q_blocks == {(4 // 2, cfg.head_dim, 32 // 4)}
    expected = model.lm.param_shardings(mesh)
    for (path, x), s, ref in zip(jax.tree_util.tree_leaves_with_path(model.params), jax.tree.leaves(expected),
                                 jax.tree.leaves(one.params)):
        assert x.sharding == s, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    q = model.params["blocks"]["attn"]["q"]  # [L, D, H, hd]: D over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, cfg.head_dim)
    assert model.params["embed"].addressable_shards[0].data.shape == (V // 2, 32 // 4)
    tokens, mask = _batch()
    np.testing.assert_allclose(np.asarray(logits(model, tokens, mask)), np.asarray(logits(one, tokens, mask)),
                               atol=1e-5, rtol=0)


# ---- clear errors ----------------------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path, **changes):
    hf = _read_config(path)
    hf.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="mistral"), "model_type='mistral'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type='yarn'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    (dict(hidden_size=None), "'hidden_size' is missing"),
])
def test_unsupported_configs_name_the_field_and_file(hf_dirs, tmp_path, changes, match):
    path = _copy(hf_dirs["llama"], tmp_path / "m")
    _edit_config(path, **changes)
    with pytest.raises(HFFormatError, match=match) as e:
        from_pretrained(path)
    assert "config.json" in str(e.value)


def test_qwen_sliding_window_is_refused():
    hf = dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
              vocab_size=V, use_sliding_window=True)
    with pytest.raises(HFFormatError, match="use_sliding_window"):
        config_from_hf(hf, source="x/config.json")


def _rewrite_single(path, edit):
    fname = os.path.join(path, "model.safetensors")
    with safe_open(fname, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, fname, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_name_the_tensor_and_file(hf_dirs, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _copy(hf_dirs["llama"], tmp_path / "missing")
    _rewrite_single(path, lambda t: t.pop(name))
    with pytest.raises(HFFormatError, match=rf"model\.safetensors: missing tensor '{name}'"):
        from_pretrained(path)
    path = _copy(hf_dirs["llama"], tmp_path / "unexpected")
    _rewrite_single(path, lambda t: t.update({"model.layers.0.mlp.gate_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(HFFormatError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp"):
        from_pretrained(path)
    path = _copy(hf_dirs["llama"], tmp_path / "shape")
    _rewrite_single(path, lambda t: t.update({name: t[name][:8]}))
    with pytest.raises(HFFormatError, match=rf"model\.safetensors: tensor '{name}' has shape \(8, 32\), expected"):
        from_pretrained(path)


def test_malformed_index_names_the_file_and_field(hf_dirs, tmp_path):
    def broken(tag, edit):
        path = _copy(hf_dirs["qwen2"], tmp_path / tag)
        fname = os.path.join(path, "model.safetensors.index.json")
        with open(fname) as f:
            index = json.load(f)
        edit(index)
        with open(fname, "w") as f:
            json.dump(index, f)
        return path

    with pytest.raises(HFFormatError, match=r"model\.safetensors\.index\.json: the field 'weight_map'"):
        from_pretrained(broken("no_map", lambda ix: ix.pop("weight_map")))
    with pytest.raises(HFFormatError, match=r"index\.json: weight_map names model-00099-of-00099\.safetensors"):
        from_pretrained(broken("no_file", lambda ix: ix["weight_map"].update(
            {"model.norm.weight": "model-00099-of-00099.safetensors"})))

    def move(ix):
        wm = ix["weight_map"]
        other = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
        wm["model.norm.weight"] = other
    with pytest.raises(HFFormatError, match=r"weight_map puts 'model\.norm\.weight' in model-\d+"):
        from_pretrained(broken("moved", move))
    path = _copy(hf_dirs["qwen2"], tmp_path / "bad_json")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(HFFormatError, match=r"index\.json: not valid JSON"):
        from_pretrained(path)


def test_save_refuses_unmerged_lora_adapters(hf_dirs, tmp_path):
    model, cfg = from_pretrained(hf_dirs["llama"])
    params = jax.tree.map(lambda x: x, model.params)
    params["blocks"]["attn"]["q_lora_a"] = np.zeros((2, 32, 4), np.float32)
    with pytest.raises(HFFormatError, match="LoRA adapters.*merge"):
        save_pretrained(params, cfg, tmp_path)
    params = jax.tree.map(lambda x: x, model.params)
    params["blocks"]["attn"]["q"] = params["blocks"]["attn"]["q"][:, :16]
    with pytest.raises(HFFormatError, match=r"blocks\.attn\.q has shape"):
        save_pretrained(params, cfg, tmp_path)
    assert not os.path.exists(tmp_path / "config.json")


# ---- the converter ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dtype", [("llama3_tied", "float32"), ("qwen3_bf16", "bfloat16")])
def test_convert_hf_to_orbax_and_back(hf_dirs, tmp_path, kind, dtype):
    src = _copy(hf_dirs[kind], tmp_path / "src")
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert convert_hf.main(["to-orbax", src, ckpt, "--dtype", dtype]) == 0
    for f in ("model_config.json", "hf_config.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(ckpt, f)), f
    restored, cfg = load_orbax_params(ckpt)
    assert cfg == config_from_hf(_read_config(src), dtype=dtype, param_dtype=dtype)
    assert restored.params["embed"].dtype == np.dtype(dtype)
    assert convert_hf.main(["to-hf", ckpt, out]) == 0
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    _assert_configs_equal(src, out)
    for f in ("tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(src, f)) as x, open(os.path.join(out, f)) as y:
            assert x.read() == y.read()
