"""The fused KL kernels against `reference.py` and against `token_kl(impl="naive")`, in Pallas interpret mode on tiny
ragged shapes (N=12 tokens in blocks of 8, V=90 in blocks of 32, student and teacher of different widths), plus a
check that each kernel lowers for its real target (Mosaic TPU, Triton GPU) from this CPU-only host. Kind "jsd" runs
two passes (`partial_stats(kind="forward")` for the log-sum-exps, then `jsd_sums`). The vocab-parallel mesh path is
tested in tests/test_token_kl.py (it needs the 8 emulated devices of tests/conftest.py)."""

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


def _kernel_div(name, hs, ws, ht, wt, *, kind, beta=0.5, temperature=1.0, vocab_major=False, **extra):
    """(div, lse_s, lse_t, moment) from the forward kernels: one pass, or two for "jsd"."""
    mod, blocks = KERNELS[name]
    kw = dict(_layout(kind, temperature, vocab_major), interpret=True, **blocks)
    if kind != "jsd":
        div, lse_s, lse_t = common.finish(*mod.partial_stats(hs, ws, ht, wt, **kw, **extra),
                                          student_weights=kind == "reverse")
        return div, lse_s, lse_t, div
    kw.pop("kind")
    _, lse_s, lse_t = common.finish(*mod.partial_stats(hs, ws, ht, wt, kind="forward", **kw, **extra),
                                    student_weights=False)
    div, moment = common.jsd_finish(*mod.jsd_sums(hs, ws, ht, wt, lse_s, lse_t, beta=beta, **kw, **extra), beta=beta)
    return div, lse_s, lse_t, moment


def _kernel_div_and_grads(name, hs, ws, ht, wt, g, *, kind, beta=0.5, temperature=1.0, vocab_major=False, **extra):
    mod, blocks = KERNELS[name]
    kw = dict(_layout(kind, temperature, vocab_major), interpret=True, **blocks)
    div, lse_s, lse_t, moment = _kernel_div(name, hs, ws, ht, wt, kind=kind, beta=beta, temperature=temperature,
                                            vocab_major=vocab_major, **extra)
    bwd_extra = {"chunk_budget_bytes": N * 32 * 4} if name == "gpu" else {}  # several backward chunks
    dh, dw = mod.grads(hs, ws, ht, wt, lse_s, lse_t, moment, g, beta=beta, **kw, **bwd_extra)
    return div, dh, dw


def _reference_div_and_grads(hs, ws, ht, wt, g, *, kind, beta=0.5, temperature=1.0, vocab_major=False):
    def f(hs, ws):
        return reference.token_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=temperature,
                                  student_vocab_major=vocab_major, teacher_vocab_major=vocab_major)

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


def _float64_kl(hs, ws, ht, wt, kind, beta=0.5):
    def logsoftmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lq = logsoftmax(np.asarray(hs, np.float64) @ np.asarray(ws, np.float64))
    lp = logsoftmax(np.asarray(ht, np.float64) @ np.asarray(wt, np.float64))
    if kind == "jsd":
        lm = np.logaddexp(lp + np.log(beta), lq + np.log1p(-beta))
        return beta * (np.exp(lp) * (lp - lm)).sum(-1) + (1 - beta) * (np.exp(lq) * (lq - lm)).sum(-1)
    a, o = (lp, lq) if kind == "forward" else (lq, lp)
    return (np.exp(a) * (a - o)).sum(-1)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
def test_logits_times_30_stay_finite_and_exact(name):
    hs, ws, ht, wt, g = _inputs(4, scale=30.0)  # logits of std ~120 (~600 at the extremes)
    for kind in ("forward", "reverse", "jsd"):  # jsd of (near) disjoint one-hots: ~ the entropy of beta, ln 2
        div, dh, dw = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind=kind)
        assert np.isfinite(np.asarray(div)).all() and np.isfinite(np.asarray(dh)).all()
        assert np.isfinite(np.asarray(dw)).all()
        _close(div, _float64_kl(hs, ws, ht, wt, kind), atol=2e-3, rtol=1e-5)
        _, want_h, want_w = _reference_div_and_grads(hs, ws, ht, wt, g, kind=kind)
        _close(dh, want_h, atol=2e-3, rtol=1e-3)
        _close(dw, want_w, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name,kind", [("tpu", "forward"), ("gpu", "reverse"), ("tpu", "jsd")])
def test_bfloat16_inputs_within_bfloat16_tolerance(name, kind):
    hs, ws, ht, wt, g = _inputs(5, dtype=jnp.bfloat16)
    div, dh, dw = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind=kind, beta=0.3)
    assert div.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    want = _reference_div_and_grads(*(x.astype(jnp.float32) for x in (hs, ws, ht, wt)), g, kind=kind, beta=0.3)
    _close(div, want[0], atol=1e-3, rtol=1e-3)  # bf16 inputs, float32 math: only the dz cast rounds
    for got, ref in ((dh, want[1]), (dw, want[2])):
        err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))
        assert err.max() <= 0.02 * np.abs(np.asarray(ref)).max() + 0.01


def test_one_pass_stats_refuse_jsd():
    hs, ws, ht, wt, _ = _inputs()
    with pytest.raises(ValueError, match="jsd: two passes"):
        tpu.partial_stats(hs, ws, ht, wt, kind="jsd", interpret=True)


def test_jsd_dlogits_formula_is_the_gradient_of_the_reference():
    """common.dlogits(kind="jsd") = g (1 - beta) q ((lq - lm) - KL(q || m)) / T on whole rows equals jax.grad of
    reference.token_kl (h_s = the logits, W_s = I), for beta in {0.1, 0.5, 0.9}."""
    ks = jax.random.split(jax.random.PRNGKey(20), 3)
    zs, zt = jax.random.normal(ks[0], (N, V)) * 3, jax.random.normal(ks[1], (N, V)) * 3
    g = jax.random.normal(ks[2], (N,))
    eye, T = jnp.eye(V), 0.7
    lse_s, lse_t = jax.nn.logsumexp(zs / T, -1)[:, None], jax.nn.logsumexp(zt / T, -1)[:, None]
    for beta in (0.1, 0.5, 0.9):
        kl_pm, kl_qm = common.jsd_block_sums(zs / T, zt / T, lse_s, lse_t, beta=beta)
        div, moment = common.jsd_finish(kl_pm, kl_qm, beta=beta)
        want, vjp = jax.vjp(lambda z: reference.token_kl(z, eye, zt, eye, kind="jsd", beta=beta, temperature=T), zs)
        _close(div[:, 0], want, atol=1e-6)
        dz = common.dlogits(zs / T, zt / T, lse_s, lse_t, moment, g[:, None], kind="jsd", inv_temp=1 / T, beta=beta)
        _close(dz, vjp(g)[0], atol=1e-6)


@pytest.mark.parametrize("name,beta,vocab_major", [("tpu", 0.1, False), ("gpu", 0.5, True), ("tpu", 0.9, True)])
def test_jsd_values_and_gradients_match_reference(name, beta, vocab_major):
    """Both passes and the backward; the GPU forward in 3 vocabulary splits (plain sums add up)."""
    hs, ws, ht, wt, g = _inputs(9, vocab_major=vocab_major)
    extra = {"num_splits": 3} if name == "gpu" else {}
    got = _kernel_div_and_grads(name, hs, ws, ht, wt, g, kind="jsd", beta=beta, temperature=0.7,
                                vocab_major=vocab_major, **extra)
    want = _reference_div_and_grads(hs, ws, ht, wt, g, kind="jsd", beta=beta, temperature=0.7, vocab_major=vocab_major)
    for a, b in zip(got, want):
        _close(a, b, atol=5e-6)


def test_jsd_kernel_tends_to_the_kls_at_the_ends_and_token_kl_maps_the_ends_to_them():
    """The formula: JSD(beta) ~ beta KL(p || q) as beta -> 0, ~ (1 - beta) KL(q || p) as beta -> 1 (kernel values);
    `token_kl` returns the KLs exactly at beta 0 and 1 (TRL's branches), on the Pallas path too."""
    hs, ws, ht, wt, _ = _inputs(10, scale=0.5)
    fwd, rev = (_float64_kl(hs, ws, ht, wt, k) for k in ("forward", "reverse"))
    eps = 1e-4
    _close(_kernel_div("gpu", hs, ws, ht, wt, kind="jsd", beta=eps)[0] / eps, fwd, atol=1e-3, rtol=0.02)
    _close(_kernel_div("tpu", hs, ws, ht, wt, kind="jsd", beta=1 - eps)[0] / eps, rev, atol=1e-3, rtol=0.02)
    for beta, want, impl in ((0.0, fwd, "pallas_gpu"), (1.0, rev, "pallas_tpu")):
        _close(token_kl(hs, ws, ht, wt, kind="jsd", beta=beta, impl=impl), want, atol=2e-6, rtol=1e-5)


# token_kl with the Pallas impls (default blocks, interpret mode) against the naive impl: [B, T] tokens with a mask.
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("kind,vocab_major", [("forward", False), ("reverse", True), ("jsd", False)])
def test_token_kl_pallas_matches_naive(impl, kind, vocab_major):
    hs, ws, ht, wt, _ = _inputs(6, vocab_major=vocab_major)
    hs, ht = hs.reshape(3, 4, DS), ht.reshape(3, 4, DT)
    mask = jnp.arange(12).reshape(3, 4) % 5 != 3
    g = jax.random.normal(jax.random.PRNGKey(7), (3, 4))
    kw = dict(kind=kind, beta=0.3, temperature=0.8, student_vocab_major=vocab_major, teacher_vocab_major=vocab_major)

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


# Lowering for the real targets runs the Pallas -> Mosaic and Pallas -> Triton lowerings (block-shape rules,
# supported primitives) on this CPU-only host; only compiling for the hardware is left to a TPU / GPU host.
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("name,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(name, platform, kind):
    n, ds, dt, v, dtype = 1000, 256, 128, 5000, jnp.bfloat16  # ragged against the default blocks
    mod = KERNELS[name][0]
    hs, ht = jax.ShapeDtypeStruct((n, ds), dtype), jax.ShapeDtypeStruct((n, dt), dtype)
    ws, wt = jax.ShapeDtypeStruct((v, ds), dtype), jax.ShapeDtypeStruct((dt, v), dtype)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32)
    layout = dict(student_vocab_major=True, teacher_vocab_major=False)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    if kind == "jsd":  # its first pass is partial_stats(kind="forward"), lowered above
        fwd, fwd_args = jax.jit(functools.partial(mod.jsd_sums, beta=0.3, **layout)), (hs, ws, ht, wt, vec, vec)
    else:
        fwd, fwd_args = jax.jit(functools.partial(mod.partial_stats, kind=kind, **layout)), (hs, ws, ht, wt)
    bwd = jax.jit(functools.partial(mod.grads, kind=kind, beta=0.3, **layout))
    for f, args in ((fwd, fwd_args), (bwd, (hs, ws, ht, wt, vec, vec, vec, vec))):
        text = export.export(f, platforms=[platform], disabled_checks=checks)(*args).mlir_module()
        assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
