import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpost.config import MeshConfig
from jaxpost.ops import default_impl, token_logprobs
from jaxpost.sharding import make_mesh

FAST_IMPLS = ["chunked", "pallas_tpu", "pallas_gpu"]  # the Pallas kernels run in interpret mode on CPU


def _inputs(seed=0, B=2, T=12, D=16, V=37, scale=1.0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = (jax.random.normal(k1, (B, T, D)) * scale).astype(dtype)
    w = jax.random.normal(k2, (D, V)).astype(dtype)
    t = jax.random.randint(k3, (B, T), 0, V)
    return h, w, t


def _reference(h, w, t, temperature=1.0):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    p = np.exp(z - lse[..., None])
    logp = np.take_along_axis(z, np.asarray(t)[..., None], -1)[..., 0] - lse
    return logp, lse, -(p * np.log(np.maximum(p, 1e-300))).sum(-1)


@pytest.mark.parametrize("impl", ["naive"] + FAST_IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_float64_reference(impl, temperature):
    h, w, t = _inputs()
    out = token_logprobs(h, w, t, temperature=temperature, return_entropy=True, impl=impl, chunk_budget_bytes=2048)
    for got, want in zip(out, _reference(h, w, t, temperature)):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_uniform_logits_give_minus_log_v_and_entropy_log_v():
    h = jnp.zeros((3, 4))
    w = jnp.ones((4, 50))
    out = token_logprobs(h, w, jnp.array([0, 7, 49]), return_entropy=True)
    np.testing.assert_allclose(np.asarray(out.logp), -np.log(50), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.entropy), np.log(50), rtol=1e-6)
    assert out.logp.shape == (3,)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_gradients_equal_naive_with_random_cotangents_on_every_output(impl):
    h, w, t = _inputs(1, T=10, V=29)
    cts = [jax.random.normal(jax.random.PRNGKey(i), t.shape) for i in range(3)]

    def f(impl):
        def g(h, w):
            o = token_logprobs(h, w, t, temperature=0.9, return_entropy=True, impl=impl, chunk_budget_bytes=1024)
            return sum(jnp.sum(c * x) for c, x in zip(cts, o))
        return jax.jit(jax.grad(g, argnums=(0, 1)))(h, w)

    for a, b in zip(f("naive"), f(impl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def _grads_and_values(impl, h, w, t, cts, *, vocab_major=False):
    """Values of all outputs and gradients w.r.t. (h, w) of a random linear function of them, jitted."""
    def g(h, w):
        o = token_logprobs(h, w, t, temperature=0.8, return_entropy=True, impl=impl, vocab_major=vocab_major)
        return sum(jnp.sum(c * x) for c, x in zip(cts, o)), o
    (_, outs), grads = jax.jit(jax.value_and_grad(g, argnums=(0, 1), has_aux=True))(h, w)
    return list(outs) + list(grads)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2)])
def test_vocab_sharded_on_a_mesh_equals_unsharded(impl, mesh_shape):
    """Tokens over (data, fsdp), the vocabulary over tensor (V = 300: 75 or 150 per shard, ragged against the kernels'
    blocks); the targets of most tokens live on another shard."""
    h, w, t = _inputs(5, B=4, T=6, D=24, V=300)
    cts = [jax.random.normal(jax.random.PRNGKey(30 + i), t.shape) for i in range(3)]
    want = _grads_and_values("naive", h, w, t, cts)
    mesh = make_mesh(MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]))
    with jax.set_mesh(mesh):
        h_s = jax.device_put(h, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        w_s = jax.device_put(w, jax.NamedSharding(mesh, jax.P("fsdp", "tensor")))
        got = _grads_and_values(impl, h_s, w_s, t, cts)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", FAST_IMPLS + ["naive"])
def test_vocab_major_unembed_equals_its_transpose(impl):
    """The tied embedding table [V, D] is used as stored (vocab_major) and gives the same values and gradients."""
    h, w, t = _inputs(6, T=8, V=45)
    cts = [jax.random.normal(jax.random.PRNGKey(40 + i), t.shape) for i in range(3)]
    a = _grads_and_values(impl, h, w, t, cts)
    b = _grads_and_values(impl, h, w.T, t, cts, vocab_major=True)
    b[-1] = b[-1].T
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_auto_picks_the_kernel_for_the_backend():
    assert default_impl("tpu") == "pallas_tpu"
    assert default_impl("gpu") == "pallas_gpu"
    assert default_impl("cpu") == "chunked"
    h, w, t = _inputs(7)
    a = token_logprobs(h, w, t, impl="auto").logp
    np.testing.assert_array_equal(np.asarray(a), np.asarray(token_logprobs(h, w, t, impl="chunked").logp))


def test_chunked_check_grads_float32():
    h, w, t = _inputs(2, B=1, T=6, D=5, V=11)

    def f(h, w):
        o = token_logprobs(h, w, t, return_entropy=True, impl="chunked", chunk_budget_bytes=512)
        return o.logp * 0.3 + o.lse * 0.2 + o.entropy * 0.5

    check_grads(f, (h, w), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_large_logits_stay_finite_and_flat_inputs_work(impl):
    h, w, t = _inputs(3, scale=100.0)
    out = token_logprobs(h.reshape(-1, h.shape[-1]), w, t.reshape(-1), return_entropy=True, impl=impl)
    assert out.logp.shape == (t.size,)
    assert all(np.isfinite(np.asarray(x)).all() for x in out)
    g = jax.grad(lambda h: token_logprobs(h, w, t, impl=impl).logp.sum())(h)
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_bfloat16_inputs_reduce_in_float32(impl):
    h, w, t = _inputs(4, dtype=jnp.bfloat16)
    out = token_logprobs(h, w, t, impl=impl, return_entropy=True)
    assert out.logp.dtype == jnp.float32
    ref = _reference(h.astype(jnp.float32), w.astype(jnp.float32), t)
    np.testing.assert_allclose(np.asarray(out.logp), ref[0], atol=0.05, rtol=0.02)


def test_bad_arguments_are_named():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, w, t[:, :3])


@pytest.mark.parametrize("impl", ["chunked", "pallas_gpu"])
def test_tied_model_output_layer_is_read_vocab_major_with_the_same_values_and_gradients(impl):
    """`LM.token_logprobs` hands the tied embedding table [V, D] to the core as stored; values and parameter
    gradients (the table gets both its input and its output gradient) equal the full-logits computation."""
    from tests.helpers import cached_lm, tiny_config
    lm, params = cached_lm(tiny_config(tie_embeddings=True))
    assert lm.output_layer(params)[1] is True
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (2, 8)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 128, (2, 8)), jnp.int32)

    def via_lm(p):
        return jnp.sum(lm.token_logprobs(p, lm.hidden(p, tokens), targets, impl=impl).logp)

    def via_logits(p):
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(lm.logits(p, tokens)), targets[..., None], -1))

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(via_lm))(params), jax.jit(jax.value_and_grad(via_logits))(params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)
