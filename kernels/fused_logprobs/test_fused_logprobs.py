"""The fused log-prob kernels against `reference.py`, in Pallas interpret mode on tiny ragged shapes, plus a check that
each kernel lowers for its real target (Mosaic TPU, Triton GPU) from this CPU-only host."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels.fused_logprobs import common, gpu, reference, tpu

N, D, V = 37, 24, 300  # ragged against every block size below
TPU_BLOCKS = dict(block_n=16, block_v=128)
GPU_BLOCKS = dict(block_n=16, block_v=64, block_d=16)
KERNELS = {"tpu": (tpu, TPU_BLOCKS), "gpu": (gpu, GPU_BLOCKS)}


def _inputs(seed=0, scale=1.0, dtype=jnp.float32, vocab_major=False):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = (jax.random.normal(k1, (N, D)) * scale).astype(dtype)
    w = jax.random.normal(k2, (V, D) if vocab_major else (D, V)).astype(dtype)
    t = jax.random.randint(k3, (N,), 0, V)
    # targets at 0, at both sides of the block edges (64, 128, 256) and at V - 1
    t = t.at[:8].set(jnp.array([0, 63, 64, 127, 128, 255, 256, V - 1]))
    return h, w, t


def _stats(name, h, w, t, *, temperature, vocab_major, entropy=True, **extra):
    mod, blocks = KERNELS[name]
    st = mod.partial_stats(h, w, t, inv_temp=1.0 / temperature, vocab_major=vocab_major, entropy=entropy,
                           interpret=True, **blocks, **extra)
    return common.finish(*st)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
@pytest.mark.parametrize("vocab_major", [False, True])
def test_forward_matches_reference(name, vocab_major):
    h, w, t = _inputs(vocab_major=vocab_major)
    got = _stats(name, h, w, t, temperature=0.7, vocab_major=vocab_major)
    want = reference.token_logprobs(h, w, t, temperature=0.7, vocab_major=vocab_major)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=1e-5)


def test_gpu_vocabulary_splits_combine_exactly():
    h, w, t = _inputs(1)
    one = _stats("gpu", h, w, t, temperature=1.0, vocab_major=False, num_splits=1)
    for splits in (2, 3, 5):
        got = _stats("gpu", h, w, t, temperature=1.0, vocab_major=False, num_splits=splits)
        for a, b in zip(got, one):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("entropy_ct", [True, False])
def test_gradients_match_reference_with_random_cotangents(name, vocab_major, entropy_ct):
    h, w, t = _inputs(2, vocab_major=vocab_major)
    temperature = 1.3
    cts = [jax.random.normal(jax.random.PRNGKey(10 + i), (N,)) for i in range(3)]
    if not entropy_ct:
        cts[2] = jnp.zeros((N,))

    def f(h, w):
        outs = reference.token_logprobs(h, w, t, temperature=temperature, vocab_major=vocab_major)
        return sum(jnp.sum(c * o) for c, o in zip(cts, outs))

    want_h, want_w = jax.grad(f, argnums=(0, 1))(h, w)
    _, lse, ent = reference.token_logprobs(h, w, t, temperature=temperature, vocab_major=vocab_major)
    mod, blocks = KERNELS[name]
    dh, dw = mod.grads(h, w, t, lse, lse - ent, cts[0], cts[1], cts[2] if entropy_ct else None,
                       inv_temp=1.0 / temperature, vocab_major=vocab_major, interpret=True, **blocks,
                       **({"chunk_budget_bytes": N * 128 * 4} if name == "gpu" else {}))
    assert dh.shape == h.shape and dw.shape == w.shape
    np.testing.assert_allclose(np.asarray(dh), np.asarray(want_h), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want_w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
def test_logits_times_100_stay_finite_and_exact(name):
    h, w, t = _inputs(3, scale=100.0)
    got = _stats(name, h, w, t, temperature=1.0, vocab_major=False)
    # float64 numpy: the float32 reference's lse - sum(p * z) cancels to a negative entropy at this scale
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    lse64 = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    p = np.exp(z - lse64[:, None])
    ent64 = -(p * np.where(p > 0, z - lse64[:, None], 0.0)).sum(-1)
    want = (z[np.arange(N), np.asarray(t)] - lse64, lse64, ent64)
    for g, r in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), r, atol=2e-3, rtol=1e-5)
    mod, blocks = KERNELS[name]
    _, lse, ent = got
    ones = jnp.ones((N,))
    dh, dw = mod.grads(h, w, t, lse, lse - ent, ones, ones, ones, interpret=True, **blocks)
    assert np.isfinite(np.asarray(dh)).all() and np.isfinite(np.asarray(dw)).all()


@pytest.mark.parametrize("name", ["tpu", "gpu"])
def test_bfloat16_inputs_within_bfloat16_tolerance(name):
    h, w, t = _inputs(4, dtype=jnp.bfloat16)
    got = _stats(name, h, w, t, temperature=1.0, vocab_major=False)
    want = reference.token_logprobs(h.astype(jnp.float32), w.astype(jnp.float32), t)
    for g, r in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=0.1, rtol=0.02)
    _, lse, ent = want
    cts = [jax.random.normal(jax.random.PRNGKey(20 + i), (N,)) for i in range(3)]
    mod, blocks = KERNELS[name]
    dh, dw = mod.grads(h, w, t, lse, lse - ent, *cts, interpret=True, **blocks)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16

    def f(h, w):
        return sum(jnp.sum(c * o) for c, o in zip(cts, reference.token_logprobs(h, w, t)))

    want_h, want_w = jax.grad(f, argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
    for g, r in ((dh, want_h), (dw, want_w)):
        err = np.abs(np.asarray(g, np.float32) - np.asarray(r))
        assert err.max() <= 0.02 * np.abs(np.asarray(r)).max() + 0.02


# Lowering for the real targets runs the Pallas -> Mosaic and Pallas -> Triton lowerings (block-shape rules,
# supported primitives) on this CPU-only host; only compiling for the hardware is left to a TPU / GPU host.
_SHAPES = {"bf16 ragged": (1000, 256, 5000, jnp.bfloat16), "f32 aligned": (512, 128, 1024, jnp.float32)}


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("name,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(name, platform, vocab_major, shape):
    n, d, v, dtype = _SHAPES[shape]
    mod = KERNELS[name][0]
    h = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((v, d) if vocab_major else (d, v), dtype)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    fwd = jax.jit(functools.partial(mod.partial_stats, vocab_major=vocab_major, entropy=True))
    bwd = jax.jit(functools.partial(mod.grads, vocab_major=vocab_major))
    for f, args in ((fwd, (h, w, t)), (bwd, (h, w, t, vec, vec, vec, vec, vec))):
        text = export.export(f, platforms=[platform], disabled_checks=checks)(*args).mlir_module()
        assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
