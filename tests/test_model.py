import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.config import PRESETS, ModelConfig
from jaxpost.models import LM
from jaxpost.sharding import PARAM_RULES, logical_to_spec
from tests.helpers import cached_lm, max_abs_diff, tiny_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_abstractly_with_logical_axes(name):
    cfg = ModelConfig.preset(name)
    lm = LM(cfg)  # jax.eval_shape only: an 8B model is never materialised
    assert lm.n_params == cfg.n_params
    shapes = jax.tree.leaves(jax.tree.map(lambda a: a.shape, lm.abstract_params), is_leaf=lambda x: isinstance(x, tuple))
    axes = jax.tree.leaves(lm.logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(shapes) == len(axes)
    for shape, names in zip(shapes, axes):
        assert len(shape) == len(names)
        assert all(n in PARAM_RULES for n in names)


def test_real_sizes_match_published_parameter_counts():
    # Published totals (embeddings included): Llama-3.1-8B 8.03B, Qwen2.5-0.5B 494M, Qwen3-0.6B 596M, Qwen3-8B 8.19B.
    assert round(ModelConfig.llama3_1_8b().n_params / 1e9, 2) == 8.03
    assert round(ModelConfig.qwen2_5_0_5b().n_params / 1e6) == 494
    assert round(ModelConfig.qwen3_0_6b().n_params / 1e6) == 596
    assert round(ModelConfig.qwen3_8b().n_params / 1e9, 2) == 8.19
    assert 10e6 <= ModelConfig.small().n_params <= 30e6


def _apply(lm, params, tokens, positions=None, segment_ids=None):
    return jax.jit(lm.logits)(params, jnp.asarray(tokens), None if positions is None else jnp.asarray(positions),
                              None if segment_ids is None else jnp.asarray(segment_ids))


@pytest.mark.parametrize("variant", [dict(), dict(qkv_bias=True), dict(qk_norm=True, tie_embeddings=True)])
def test_packed_documents_equal_documents_run_alone(variant):
    lm, params = cached_lm(tiny_config(**variant))
    if variant.get("qkv_bias"):  # biases start at zero: give them values so the test sees them
        params = jax.tree.map(lambda x: x, params)
        for k in ("q_bias", "k_bias", "v_bias"):
            params["blocks"]["attn"][k] = jax.random.normal(jax.random.PRNGKey(1), params["blocks"]["attn"][k].shape)
    rng = np.random.default_rng(0)
    lens = [5, 9, 3]
    docs = [rng.integers(0, 128, n).astype(np.int32) for n in lens]
    T = 20
    tokens = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    pos = np.zeros((1, T), np.int32)
    at = 0
    for i, d in enumerate(docs):
        tokens[0, at:at + len(d)] = d
        seg[0, at:at + len(d)] = i + 1
        pos[0, at:at + len(d)] = np.arange(len(d))
        at += len(d)
    packed = np.asarray(_apply(lm, params, tokens, pos, seg))
    at = 0
    for d in docs:
        alone = np.asarray(_apply(lm, params, d[None]))
        np.testing.assert_allclose(packed[0, at:at + len(d)], alone[0], atol=2e-5, rtol=1e-5)
        at += len(d)


def test_causal_future_tokens_do_not_change_past_logits():
    lm, params = cached_lm(tiny_config())
    a = np.arange(12, dtype=np.int32)[None] % 100
    b = a.copy()
    b[0, 8:] = 7
    la, lb = np.asarray(_apply(lm, params, a)), np.asarray(_apply(lm, params, b))
    np.testing.assert_allclose(la[0, :8], lb[0, :8], atol=1e-6)
    assert np.abs(la[0, 8:] - lb[0, 8:]).max() > 1e-4


def test_rope_is_relative_shifting_positions_keeps_outputs():
    # RoPE attention depends on position differences only: shifting a whole document's positions changes nothing.
    lm, params = cached_lm(tiny_config())
    tokens = np.arange(10, dtype=np.int32)[None]
    pos = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(_apply(lm, params, tokens, pos)),
                               np.asarray(_apply(lm, params, tokens, pos + 17)), atol=2e-5)


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    lm_gqa, p = cached_lm(tiny_config(n_heads=4, n_kv_heads=2))
    lm_mha = LM(tiny_config(n_heads=4, n_kv_heads=4))
    q = jax.tree.map(lambda x: x, p)
    for name in ("k", "v"):
        q["blocks"]["attn"][name] = jnp.repeat(p["blocks"]["attn"][name], 2, axis=2)  # [L, D, K, hd] -> [L, D, H, hd]
    tokens = np.arange(9, dtype=np.int32)[None]
    assert max_abs_diff(_apply(lm_gqa, p, tokens), _apply(lm_mha, q, tokens)) < 2e-5


def test_tied_embeddings_share_the_table():
    lm, params = cached_lm(tiny_config(qk_norm=True, tie_embeddings=True))
    assert "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(lm.unembedding(params)), np.asarray(params["embed"]).T)


def test_bfloat16_compute_keeps_float32_master_weights_and_is_close():
    cfg32 = tiny_config()
    cfg16 = tiny_config(dtype="bfloat16")
    lm32, params = cached_lm(cfg32)
    lm16 = LM(cfg16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = np.arange(16, dtype=np.int32)[None]
    h16 = jax.jit(lm16.hidden)(params, jnp.asarray(tokens))
    assert h16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(_apply(lm16, params, tokens)), np.asarray(_apply(lm32, params, tokens)),
                               atol=0.05)


def test_logical_to_spec_replicates_dims_the_mesh_does_not_divide():
    from tests.helpers import mesh_of
    mesh = mesh_of(2, 2, 2)
    assert logical_to_spec(("embed", "mlp"), PARAM_RULES, mesh, (64, 128)) == jax.sharding.PartitionSpec("fsdp",
                                                                                                       "tensor")
    assert logical_to_spec(("embed", "mlp"), PARAM_RULES, mesh, (63, 128)) == jax.sharding.PartitionSpec(None,
                                                                                                       "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nope",), PARAM_RULES, mesh, (4,))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.tiny(dtype="float16")
