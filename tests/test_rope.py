"""RoPE frequencies: plain and Llama 3.1-scaled, against hand-derived values and transformers."""

import math

import numpy as np
import pytest

from jaxpost.config import ModelConfig
from jaxpost.models.transformer import rope_frequencies


def _cfg(**kw):
    return ModelConfig.tiny(**{**dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8), **kw})


def test_plain_frequencies_are_theta_to_minus_2i_over_head_dim():
    # theta = 1e4, head_dim 8: f_i = 1e4^(-i/4) = 1, 0.1, 0.01, 0.001.
    np.testing.assert_allclose(np.asarray(rope_frequencies(_cfg(rope_theta=1e4))), [1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_llama3_scaling_by_hand():
    # L = 1000, lo = 1, hi = 4, factor 8: wavelengths 2 pi / f = 6.28, 62.8 (< L / hi = 250: kept), 628.3 (between:
    # smoothed with a = (1000 / 628.3 - 1) / 3), 6283 (> L / lo = 1000: divided by 8).
    cfg = _cfg(rope_theta=1e4, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_len=1000)
    a = (1000 / (2 * math.pi / 0.01) - 1) / 3
    expected = [1.0, 0.1, (1 - a) * 0.01 / 8 + a * 0.01, 0.001 / 8]
    got = np.asarray(rope_frequencies(cfg))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_llama3_scaling_matches_transformers_for_llama3_1_8b():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.llama3_1_8b()
    hf = transformers.LlamaConfig(
        hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters=dict(rope_type="llama3", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
                             low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                             original_max_position_embeddings=cfg.rope_original_max_len))
    with torch.no_grad():
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    got = np.asarray(rope_frequencies(cfg))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    plain = np.asarray(rope_frequencies(ModelConfig.llama3_1_8b(rope_scaling="none")))
    assert (got < plain).any() and (got == plain).any()  # low frequencies rescaled, high ones kept


def test_rope_scaling_is_validated():
    with pytest.raises(ValueError, match="rope_scaling"):
        _cfg(rope_scaling="yarn")
    with pytest.raises(ValueError, match="rope_high_freq_factor"):
        _cfg(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)
