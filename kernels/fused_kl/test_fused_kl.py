"""The fused KL kernels against `reference.py` and against `token_kl(impl="naive")`, in Pallas interpret mode on tiny
ragged shapes (N=12 tokens in blocks of 8, V=90 in blocks of 32, student and teacher of different widths), plus a
check that each kernel lowers for its real target (Mosaic TPU, Triton GPU) from this CPU-only host."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxpost.ops import token_kl
from kernels.fused_kl import common, gpu, reference, tpu

N, DS, DT, V = 12, 16, 8, 90  # N and V ragged against the blocks below
TPU_BLOCKS = dict(block_n=8, block_v=32)
GPU_BLOCKS = dict(block_n=16, block_v=32, block_d=16)
KERNELS = {"tpu": (tpu, TPU_BLOCKS), "gpu": (gpu, GPU_BLOCKS)}


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(seed=0, scale=1.0, dtype=jnp.float32, vocab_major=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    hs = (jax.random.normal(ks[0], (N, DS)) * scale).astype(dtype)
    ws = jax.random.normal(ks[1], (V, DS) if vocab_major else (DS, V)).astype(dtype)
    ht = (jax.random.normal(ks[2], (N, DT)) * scale).astype(dtype)
    wt = jax.random.normal(ks[3], (V, DT) if vocab_major else (DT, V)).astype(dtype)
    g = jax.random.normal(ks[4], (N,))
    return hs, ws, ht, wt, g


def _layout(kind, temperature, vocab_major):
    return dict(kind=kind, inv_temp=1.0 / temperature, student_vocab_major=vocab_major,
                teacher_vocab_major=vocab_major)


def _kernel_div_and_grads(name, hs, ws, ht, wt, g, *, kind, temperature=1.0, vocab_major=False, **extra):
    mod, blocks = KERNELS[name]
    kw = dict(_layout(kind, temperature, vocab_major), interpret=True, **blocks)
    stats = mod.partial_stats(hs, ws, ht, wt, **kw, **extra)
    div, lse_s, lse_t = common.finish(*stats, student_weights=kind == "reverse")
    bwd_extra = {"chunk_budget_bytes": N * 32 * 4} if name == "gpu" else {}  # several backward chunks
    dh, dw = mod.grads(hs, ws, ht, wt, lse_s, lse_t, div, g, **kw, **bwd_extra)
    return div, dh, dw


def _reference_div_and_grads(hs, ws, ht, wt, g, *, kind, temperature=1.0, vocab_major=False):
    def f(hs, ws):
        return reference.token_kl(hs, ws, ht, wt, kind=kind, temperature=temperature, student_vocab_major=vocab_major,
                                  teacher_vocab_major=vocab_major)

    div, vjp = jax.vjp(f, hs.astype(jnp.float32), ws.astype(jnp.float32))
    return (div,) + vjp(g)


def _close(got, want, atol, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
@pytest.mark.parametrize("kind,vocab_major", [("forward", False), ("reverse", True)])  # layout is kind-blind
def test_values_and_gradients_match_reference(name, kind, vocab_major):
    hs, ws, ht, wt, g = _inputs(1, vocab_major=vocab_major)
    got = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind=kind, temperature=0.7, vocab_major=vocab_major)
    want = _reference_div_and_grads(hs, ws, ht, wt, g, kind=kind, temperature=0.7, vocab_major=vocab_major)
    assert got[1].shape == hs.shape and got[2].shape == ws.shape
    for a, b in zip(got, want):
        _close(a, b, atol=5e-5)


def test_same_model_gives_zero_divergence_and_gradient():
    hs, ws, _, _, g = _inputs(2)
    div, dh, dw = _kernel_div_and_grads("tpu", hs, ws, hs, ws, g, kind="reverse")  # KL = 0 and q - p = 0 too
    for x in (div, dh, dw):
        _close(x, jnp.zeros_like(x), atol=2e-5)


def test_gpu_vocabulary_splits_combine_exactly():
    hs, ws, ht, wt, _ = _inputs(3)
    for kind in ("forward", "reverse"):
        outs = [common.finish(*gpu.partial_stats(hs, ws, ht, wt, kind=kind, num_splits=s, interpret=True,
                                                 **GPU_BLOCKS), student_weights=kind == "reverse")
                for s in (1, 3)]
        for a, b in zip(*outs):
            _close(a, b, atol=2e-5, rtol=1e-6)


def _float64_kl(hs, ws, ht, wt, kind):
    def logsoftmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lq = logsoftmax(np.asarray(hs, np.float64) @ np.asarray(ws, np.float64))
    lp = logsoftmax(np.asarray(ht, np.float64) @ np.asarray(wt, np.float64))
    a, o = (lp, lq) if kind == "forward" else (lq, lp)
    return (np.exp(a) * (a - o)).sum(-1)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
def test_logits_times_30_stay_finite_and_exact(name):
    hs, ws, ht, wt, g = _inputs(4, scale=30.0)  # logits of std ~120 (~600 at the extremes)
    for kind in ("forward", "reverse"):
        div, dh, dw = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind=kind)
        assert np.isfinite(np.asarray(div)).all() and np.isfinite(np.asarray(dh)).all()
        assert np.isfinite(np.asarray(dw)).all()
        _close(div, _float64_kl(hs, ws, ht, wt, kind), atol=2e-3, rtol=1e-5)
        _, want_h, want_w = _reference_div_and_grads(hs, ws, ht, wt, g, kind=kind)
        _close(dh, want_h, atol=2e-3, rtol=1e-3)
        _close(dw, want_w, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name,kind", [("tpu", "forward"), ("gpu", "reverse")])
def test_bfloat16_inputs_within_bfloat16_tolerance(name, kind):
    hs, ws, ht, wt, g = _inputs(5, dtype=jnp.bfloat16)
    div, dh, dw = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind=kind)
    assert div.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    want = _reference_div_and_grads(*(x.astype(jnp.float32) for x in (hs, ws, ht, wt)), g, kind=kind)
    _close(div, want[0], atol=1e-3, rtol=1e-3)  # bf16 inputs, float32 math: only the dz cast rounds
    for got, ref in ((dh, want[1]), (dw, want[2])):
        err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))
        assert err.max() <= 0.02 * np.abs(np.asarray(ref)).max() + 0.01


def test_jsd_has_no_kernel():
    hs, ws, ht, wt, _ = _inputs()
    with pytest.raises(ValueError, match="jsd runs on the chunked path"):
        tpu.partial_stats(hs, ws, ht, wt, kind="jsd", interpret=True)


# token_kl with the Pallas impls (default blocks, interpret mode) against the naive impl: [B, T] tokens with a mask.
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("kind,vocab_major", [("forward", False), ("reverse", True)])
def test_token_kl_pallas_matches_naive(impl, kind, vocab_major):
    hs, ws, ht, wt, _ = _inputs(6, vocab_major=vocab_major)
    hs, ht = hs.reshape(3, 4, DS), ht.reshape(3, 4, DT)
    mask = jnp.arange(12).reshape(3, 4) % 5 != 3
    g = jax.random.normal(jax.random.PRNGKey(7), (3, 4))
    kw = dict(kind=kind, temperature=0.8, student_vocab_major=vocab_major, teacher_vocab_major=vocab_major)

    def f(impl, hs, ws, ht, wt):
        return jnp.sum(g * token_kl(hs, ws, ht, wt, mask, impl=impl, **kw))

    want = jax.value_and_grad(functools.partial(f, "naive"), argnums=(0, 1))(hs, ws, ht, wt)
    got = jax.jit(jax.value_and_grad(functools.partial(f, impl), argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    _close(got[0], want[0], atol=1e-4)
    for a, b in zip(got[1][:2], want[1]):
        _close(a, b, atol=5e-5)
    for teacher_grad in got[1][2:]:
        assert not np.asarray(teacher_grad).any()
    np.testing.assert_array_equal(np.asarray(token_kl(hs, ws, ht, wt, mask, impl=impl, **kw))[~np.asarray(mask)], 0)


def test_token_kl_pallas_sends_jsd_to_the_chunked_path():
    hs, ws, ht, wt, _ = _inputs(8)
    kw = dict(kind="jsd", beta=0.3, temperature=0.9)
    np.testing.assert_array_equal(np.asarray(token_kl(hs, ws, ht, wt, impl="pallas_tpu", **kw)),
                                  np.asarray(token_kl(hs, ws, ht, wt, impl="chunked", **kw)))


# Lowering for the real targets runs the Pallas -> Mosaic and Pallas -> Triton lowerings (block-shape rules,
# supported primitives) on this CPU-only host; only compiling for the hardware is left to a TPU / GPU host.
@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("name,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(name, platform, kind):
    n, ds, dt, v, dtype = 1000, 256, 128, 5000, jnp.bfloat16  # ragged against the default blocks
    mod = KERNELS[name][0]
    hs, ht = jax.ShapeDtypeStruct((n, ds), dtype), jax.ShapeDtypeStruct((n, dt), dtype)
    ws, wt = jax.ShapeDtypeStruct((v, ds), dtype), jax.ShapeDtypeStruct((dt, v), dtype)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32)
    layout = dict(kind=kind, student_vocab_major=True, teacher_vocab_major=False)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    fwd = jax.jit(functools.partial(mod.partial_stats, **layout))
    bwd = jax.jit(functools.partial(mod.grads, **layout))
    for f, args in ((fwd, (hs, ws, ht, wt)), (bwd, (hs, ws, ht, wt, vec, vec, vec, vec))):
        text = export.export(f, platforms=[platform], disabled_checks=checks)(*args).mlir_module()
        assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
