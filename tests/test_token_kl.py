"""token_kl / token_kl_topk (jaxpost/ops/kl.py): each kind against its definition in float64 numpy (values, and
gradients by central differences), by hand, against TRL 1.16's GKD loss, and on an 8-device mesh (the chunked path,
and the Pallas kernels' vocab-parallel shard_map in interpret mode)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxpost.config import MeshConfig
from jaxpost.ops import KINDS, default_kl_impl, token_kl, token_kl_topk
from jaxpost.ops.kl import _plan
from jaxpost.sharding import make_mesh
from tests.helpers import mesh_of

CASES = [("forward", 0.5, 1.0), ("reverse", 0.5, 0.7), ("jsd", 0.5, 1.0), ("jsd", 0.2, 0.7), ("jsd", 0.9, 1.0)]
MASK_25 = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)  # ragged: 3 and 4 tokens of 5


def _inputs(seed=0, B=2, T=5, Ds=8, Dt=12, V=37, scale=1.0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hs = (jax.random.normal(k[0], (B, T, Ds)) * scale).astype(dtype)
    ws = jax.random.normal(k[1], (Ds, V)).astype(dtype)
    ht = (jax.random.normal(k[2], (B, T, Dt)) * scale).astype(dtype)
    wt = jax.random.normal(k[3], (Dt, V)).astype(dtype)
    return hs, ws, ht, wt


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_div(hs, ws, ht, wt, kind, beta=0.5, temperature=1.0):
    """The definitions, in float64: per-token divergence [...]."""
    lq = _log_softmax64(np.asarray(hs, np.float64) @ np.asarray(ws, np.float64) / temperature)
    lp = _log_softmax64(np.asarray(ht, np.float64) @ np.asarray(wt, np.float64) / temperature)
    p, q = np.exp(lp), np.exp(lq)
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return (p * (lp - lq)).sum(-1)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return (q * (lq - lp)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


def _np_grad(f, xs, eps=1e-6):
    """Central differences of a float64 numpy function of several arrays."""
    xs = [np.asarray(x, np.float64).copy() for x in xs]
    grads = []
    for x in xs:
        g = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            x0 = x[i]
            x[i] = x0 + eps
            up = f(*xs)
            x[i] = x0 - eps
            down = f(*xs)
            x[i] = x0
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def _value_and_grads(impl, hs, ws, ht, wt, ct, mask=None, budget=None, **kw):
    """Per-token values and the gradients w.r.t. (h_student, w_student) of sum(ct * div), jitted."""
    def f(hs, ws):
        div = token_kl(hs, ws, ht, wt, mask, impl=impl, chunk_budget_bytes=budget, **kw)
        return jnp.sum(ct * div), div
    (_, div), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
    return [div, *grads]


@pytest.mark.parametrize("kind,beta,temperature", CASES)
def test_values_and_gradients_match_the_float64_definition(kind, beta, temperature):
    """Naive and chunked (one token of each row per chunk: 5 chunks; token-chunked backward), ragged mask, random
    cotangent; gradients against central differences of the numpy definition."""
    hs, ws, ht, wt = _inputs()
    assert _plan(2, 5, 37, 2048, 2) == (5, 0)
    ct = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (2, 5)), np.float64)
    mask = jnp.asarray(MASK_25)
    want = _np_div(hs, ws, ht, wt, kind, beta, temperature) * MASK_25
    want_g = _np_grad(lambda a, b: np.sum(ct * MASK_25 * _np_div(a, b, ht, wt, kind, beta, temperature)), (hs, ws))
    for impl, budget in (("naive", None), ("chunked", 2048)):
        got = _value_and_grads(impl, hs, ws, ht, wt, jnp.asarray(ct, jnp.float32), mask, budget, kind=kind,
                               beta=beta, temperature=temperature)
        assert got[0].dtype == jnp.float32 and got[0].shape == (2, 5)
        np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-5, rtol=2e-5, err_msg=impl)
        assert np.all(np.asarray(got[0])[MASK_25 == 0] == 0)
        for g, w in zip(got[1:], want_g):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize("kind,beta,temperature", [CASES[0], CASES[1], CASES[3]])
def test_vocabulary_chunked_backward_equals_naive(kind, beta, temperature):
    """V = 768 and a budget that gives 5 token chunks forward and 3 column blocks of 256 backward."""
    hs, ws, ht, wt = _inputs(1, V=768)
    assert _plan(2, 5, 768, 100_000, 2) == (5, 3)
    ct = jax.random.normal(jax.random.PRNGKey(10), (2, 5))
    kw = dict(kind=kind, beta=beta, temperature=temperature)
    want = _value_and_grads("naive", hs, ws, ht, wt, ct, **kw)
    got = _value_and_grads("chunked", hs, ws, ht, wt, ct, budget=100_000, **kw)
    np.testing.assert_allclose(np.asarray(want[0]), _np_div(hs, ws, ht, wt, kind, beta, temperature), atol=2e-5,
                               rtol=2e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,kind,beta", [("naive", "forward", 0.5), ("naive", "reverse", 0.5), ("naive", "jsd", 0.3),
                                             ("chunked", "jsd", 0.3)])
def test_check_grads_float32(impl, kind, beta):
    hs, ws, ht, wt = _inputs(2, B=1, T=4, Ds=5, Dt=6, V=11, scale=0.5)
    ws, wt = ws * 0.5, wt * 0.5

    def f(hs, ws):
        return token_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=0.9, impl=impl, chunk_budget_bytes=512)

    check_grads(f, (hs, ws), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-2)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_identical_models_give_zero_divergence_and_zero_gradient(impl, kind):
    hs, ws, _, _ = _inputs(3)
    f = jax.value_and_grad(lambda hs, ws: jnp.sum(token_kl(hs, ws, hs, ws, kind=kind, impl=impl,
                                                            chunk_budget_bytes=2048)), argnums=(0, 1))
    div = token_kl(hs, ws, hs, ws, kind=kind, impl=impl, chunk_budget_bytes=2048)
    np.testing.assert_allclose(np.asarray(div), 0.0, atol=1e-6)
    _, grads = f(hs, ws)
    for g in grads:
        np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_peaked_teacher_flat_student_asymmetry_by_hand(impl):
    """V = 3, p = (0.98, 0.01, 0.01) (teacher logits log p), q = (1/3, 1/3, 1/3) (student logits 0):
    KL(p || q) = 0.98 ln(0.98 * 3) + 2 * 0.01 ln(0.01 * 3) = 0.98 * 1.0784096 - 0.02 * 3.5065579 = 0.9867102;
    KL(q || p) = 1/3 (ln(1 / 2.94) + 2 ln(100 / 3)) = (-1.0784096 + 2 * 3.5065579) / 3 = 1.9782354:
    the reverse (mode-seeking) direction punishes q's mass where p has almost none, twice as much here."""
    ht = jnp.ones((1, 1))
    wt = jnp.log(jnp.array([[0.98, 0.01, 0.01]]))
    hs, ws = jnp.ones((1, 1)), jnp.zeros((1, 3))
    fwd = float(token_kl(hs, ws, ht, wt, kind="forward", impl=impl)[0])
    rev = float(token_kl(hs, ws, ht, wt, kind="reverse", impl=impl)[0])
    np.testing.assert_allclose(fwd, 0.9867102, rtol=1e-6)
    np.testing.assert_allclose(rev, 1.9782354, rtol=1e-6)
    assert rev > 2 * fwd - 0.01
    assert float(token_kl(hs, ws, ht, wt, kind="jsd", beta=0.0, impl=impl)[0]) == fwd
    assert float(token_kl(hs, ws, ht, wt, kind="jsd", beta=1.0, impl=impl)[0]) == rev


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_teacher_gets_exactly_zero_gradient(impl):
    hs, ws, ht, wt = _inputs(4)
    for kind in KINDS:
        g = jax.grad(lambda ht, wt: jnp.sum(token_kl(hs, ws, ht, wt, kind=kind, impl=impl, chunk_budget_bytes=2048)),
                     argnums=(0, 1))(ht, wt)
        assert all(np.all(np.asarray(x) == 0) for x in g), kind
    ids = jnp.tile(jnp.arange(4), (2, 5, 1))
    lp = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
    g = jax.grad(lambda lp: jnp.sum(token_kl_topk(hs, ws, lp, ids, impl=impl)))(lp)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs_reduce_in_float32_close_to_float32(kind):
    inputs = _inputs(5)
    ct = jax.random.normal(jax.random.PRNGKey(11), (2, 5))
    want = _value_and_grads("chunked", *inputs, ct, budget=2048, kind=kind)
    bf = [x.astype(jnp.bfloat16) for x in inputs]
    got = _value_and_grads("chunked", *bf, ct, budget=2048, kind=kind)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.bfloat16
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in got)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=0.1, rtol=0.05)
    for g, w in zip(got[1:], want[1:]):  # bf16 gradients: within a few percent of the gradient's scale
        g, w = np.asarray(g, np.float32), np.asarray(w)
        assert np.abs(g - w).max() <= 0.05 * np.abs(w).max()


@pytest.mark.parametrize("impl,kind", [("chunked", "forward"), ("chunked", "reverse"), ("chunked", "jsd"),
                                       ("naive", "jsd")])
def test_large_logits_stay_finite(impl, kind):
    """Logits of scale ~50 * sqrt(D) (hundreds): p and q are one-hot on different tokens, exp underflows to 0,
    nothing is NaN. The KLs are large (the logit gap); JSD(0.5) of disjoint distributions is its bound, ln 2."""
    hs, ws, ht, wt = _inputs(6, scale=50.0)
    out = _value_and_grads(impl, hs, ws, ht, wt, jnp.ones((2, 5)), budget=2048, kind=kind)
    assert all(np.isfinite(np.asarray(x)).all() for x in out)
    if kind == "jsd":
        np.testing.assert_allclose(np.asarray(out[0]), math.log(2), atol=1e-5)
    else:
        assert float(out[0].min()) > 10.0


def test_jsd_endpoints_are_trls_and_the_formula_tends_to_them():
    """beta = 0 / 1 are KL(p || q) / KL(q || p) exactly (TRL's branches); the formula itself is ~ beta KL(p || q) for
    small beta and ~ (1 - beta) KL(q || p) near 1."""
    hs, ws, ht, wt = _inputs(7, scale=0.5)
    fwd = np.asarray(token_kl(hs, ws, ht, wt, kind="forward"))
    rev = np.asarray(token_kl(hs, ws, ht, wt, kind="reverse"))
    np.testing.assert_array_equal(np.asarray(token_kl(hs, ws, ht, wt, kind="jsd", beta=0.0)), fwd)
    np.testing.assert_array_equal(np.asarray(token_kl(hs, ws, ht, wt, kind="jsd", beta=1.0)), rev)
    eps = 1e-4
    np.testing.assert_allclose(np.asarray(token_kl(hs, ws, ht, wt, kind="jsd", beta=eps)) / eps, fwd, rtol=0.02)
    np.testing.assert_allclose(np.asarray(token_kl(hs, ws, ht, wt, kind="jsd", beta=1 - eps)) / eps, rev, rtol=0.02)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    with warnings.catch_warnings():  # "You are importing from 'trl.experimental'"
        warnings.simplefilter("ignore")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    hs, ws, ht, wt = _inputs(8)
    zs = np.asarray(hs, np.float64) @ np.asarray(ws, np.float64)
    zt = np.asarray(ht, np.float64) @ np.asarray(wt, np.float64)
    # reduction="none" gives TRL's [B, T, V] pointwise terms; their sum over V is the per-token divergence.
    want = GKDTrainer.generalized_jsd_loss(torch.from_numpy(zs), torch.from_numpy(zt), beta=beta, temperature=0.8,
                                           reduction="none").sum(-1).numpy()
    for impl in ("naive", "chunked"):
        got = token_kl(hs, ws, ht, wt, kind="jsd", beta=beta, temperature=0.8, impl=impl, chunk_budget_bytes=2048)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5, err_msg=impl)


@pytest.mark.parametrize("mesh_shape,V,budget", [((2, 4, 1), 37, 2048), ((2, 4, 1), 37, None), ((1, 2, 4), 40, 2048)])
def test_sharded_8_device_mesh_equals_single_device(mesh_shape, V, budget):
    """Tokens over (data, fsdp), D of both unembeddings over fsdp and V over tensor; jitted values and gradients of
    the jsd and the top-k variant equal the unsharded computation. (The chunked path does not handle a tensor-split
    vocabulary natively: its backward pass then uses token chunks; XLA keeps V split, this checks only that the values
    are right. The Pallas path's vocab-parallel shard_map is tested below.)"""
    hs, ws, ht, wt = _inputs(9, B=8, T=6, V=V)
    ct = jax.random.normal(jax.random.PRNGKey(12), (8, 6))
    ids = jnp.argsort(-(ht @ wt), axis=-1)[..., :5]
    lp = jnp.take_along_axis(jax.nn.log_softmax(ht @ wt), ids, axis=-1)

    def run(hs, ws, ht, wt, ids, lp):
        def f(hs, ws):
            div = token_kl(hs, ws, ht, wt, kind="jsd", beta=0.3, temperature=0.9, chunk_budget_bytes=budget)
            sparse = token_kl_topk(hs, ws, lp, ids, temperature=0.9, chunk_budget_bytes=budget)
            return jnp.sum(ct * (div + 0.5 * sparse)), (div, sparse)
        (_, outs), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
        return [*outs, *grads]

    want = run(hs, ws, ht, wt, ids, lp)
    mesh = make_mesh(MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]))
    tokens = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
    embed = jax.NamedSharding(mesh, jax.P("fsdp", "tensor"))
    with jax.set_mesh(mesh):
        got = run(*(jax.device_put(x, s) for x, s in ((hs, tokens), (ws, embed), (ht, tokens), (wt, embed),
                                                       (ids, tokens), (lp, tokens))))
    assert got[0].sharding.is_equivalent_to(tokens, 2)  # the per-token output stays split over the tokens
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mesh_shape,impl,kind,vocab_major", [((8, 1, 1), "pallas_tpu", "reverse", False),
                                                               ((2, 2, 2), "pallas_gpu", "jsd", False),
                                                               ((1, 1, 8), "pallas_tpu", "jsd", True)])
def test_pallas_vocab_parallel_mesh_equals_single_device(mesh_shape, impl, kind, vocab_major):
    """The Pallas path under a mesh (interpret mode): a shard_map with 16 tokens over (data, fsdp) and V = 96 over
    tensor (12 per shard at tensor = 8: ragged against every kernel block), the five stats (and jsd's two sums)
    combined across the vocabulary shards. Values and gradients of a random cotangent equal the same kernels on one
    device; the student's W (D over fsdp, V over tensor, or [V, D] as stored) keeps its sharding in its gradient."""
    hs, ws, ht, wt = _inputs(14, B=8, T=2, V=96)
    if vocab_major:
        ws, wt = ws.T, wt.T
    ct = jax.random.normal(jax.random.PRNGKey(16), (8, 2))
    kw = dict(kind=kind, beta=0.3, temperature=0.8, impl=impl, student_vocab_major=vocab_major,
              teacher_vocab_major=vocab_major)

    def run(hs, ws, ht, wt):
        def f(hs, ws):
            div = token_kl(hs, ws, ht, wt, **kw)
            return jnp.sum(ct * div), div
        (_, div), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
        return [div, *grads]

    want = run(hs, ws, ht, wt)
    mesh = mesh_of(*mesh_shape)
    tokens = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
    embed = jax.NamedSharding(mesh, jax.P("tensor", "fsdp") if vocab_major else jax.P("fsdp", "tensor"))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, s) for x, s in ((hs, tokens), (ws, embed), (ht, tokens), (wt, embed))]
        jaxpr = str(jax.make_jaxpr(lambda *a: token_kl(*a, **kw))(*args))
        got = run(*args)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr  # the kernels, not the chunked fallback
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def _np_topk(hs, ws, lpk, ids, temperature):
    lq = _log_softmax64(np.asarray(hs, np.float64) @ np.asarray(ws, np.float64) / temperature)
    lpt = _log_softmax64(np.asarray(lpk, np.float64) / temperature)  # renormalised over the top-k
    pt = np.exp(lpt)
    lq_k = np.take_along_axis(lq, np.asarray(ids), axis=-1)
    return (pt * (np.where(pt > 0, lpt, 0.0) - lq_k)).sum(-1)  # 0 log 0 = 0 for the -inf padding


def test_topk_matches_numpy_reference_values_and_gradients():
    """K = 6 of V = 37, temperature 0.8; one token holds only 4 real entries (-inf padding), one is masked out."""
    hs, ws, ht, wt = _inputs(10)
    zt = np.asarray(ht, np.float64) @ np.asarray(wt, np.float64)
    ids = np.argsort(-zt, axis=-1)[..., :6].astype(np.int32)
    lpk = np.take_along_axis(_log_softmax64(zt), ids, axis=-1)
    lpk[0, 1, 4:] = -np.inf
    ct = np.asarray(jax.random.normal(jax.random.PRNGKey(13), (2, 5)), np.float64)
    want = _np_topk(hs, ws, lpk, ids, 0.8) * MASK_25
    want_g = _np_grad(lambda a, b: np.sum(ct * MASK_25 * _np_topk(a, b, lpk, ids, 0.8)), (hs, ws))
    assert _plan(2, 5, 37, 1024, 1) == (5, 0)
    for impl, budget in (("naive", None), ("chunked", 1024), ("chunked", None)):
        def f(hs, ws):
            div = token_kl_topk(hs, ws, jnp.asarray(lpk, jnp.float32), jnp.asarray(ids), jnp.asarray(MASK_25),
                                temperature=0.8, impl=impl, chunk_budget_bytes=budget)
            return jnp.sum(jnp.asarray(ct, jnp.float32) * div), div
        (_, div), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
        np.testing.assert_allclose(np.asarray(div), want, atol=2e-5, rtol=2e-5, err_msg=f"{impl}@{budget}")
        for g, w in zip(grads, want_g):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-4, err_msg=f"{impl}@{budget}")


def test_topk_vocabulary_chunked_backward_and_all_ids_equal_the_full_forward_kl():
    """K = V (every id, in the teacher's order): the top-k KL is the full forward KL, values and gradients; V = 768
    with 3 column blocks in the backward pass."""
    hs, ws, ht, wt = _inputs(11, V=768)
    assert _plan(2, 5, 768, 50_000, 1) == (5, 3)
    zt = ht @ wt
    ids = jnp.argsort(-zt, axis=-1)
    lpk = jnp.take_along_axis(jax.nn.log_softmax(zt), ids, axis=-1)
    ct = jax.random.normal(jax.random.PRNGKey(14), (2, 5))
    want = _value_and_grads("naive", hs, ws, ht, wt, ct, kind="forward")

    def f(hs, ws):
        div = token_kl_topk(hs, ws, lpk, ids, chunk_budget_bytes=50_000)
        return jnp.sum(ct * div), div
    (_, div), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
    for a, b in zip([div, *grads], want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_vocab_major_layouts_and_flat_tokens_give_the_same_result(impl):
    hs, ws, ht, wt = _inputs(12)
    ct = jax.random.normal(jax.random.PRNGKey(15), (2, 5))
    a = _value_and_grads(impl, hs, ws, ht, wt, ct, budget=2048, kind="reverse")
    b = _value_and_grads(impl, hs, ws.T, ht, wt.T, ct, budget=2048, kind="reverse", student_vocab_major=True,
                         teacher_vocab_major=True)
    b[2] = b[2].T
    flat = token_kl(hs.reshape(10, 8), ws, ht.reshape(10, 12), wt, kind="reverse", impl=impl, chunk_budget_bytes=2048)
    assert flat.shape == (10,)
    np.testing.assert_allclose(np.asarray(flat), np.asarray(a[0]).reshape(10), atol=1e-6, rtol=1e-6)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)


def test_auto_is_pallas_on_tpu_and_gpu_and_chunked_elsewhere():
    assert default_kl_impl("tpu") == "pallas_tpu"
    assert default_kl_impl("gpu") == default_kl_impl("cuda") == "pallas_gpu"
    assert default_kl_impl("cpu") == "chunked"
    hs, ws, ht, wt = _inputs(13)
    np.testing.assert_array_equal(np.asarray(token_kl(hs, ws, ht, wt, impl="auto")),
                                  np.asarray(token_kl(hs, ws, ht, wt, impl="chunked")))


def test_bad_arguments_are_named():
    hs, ws, ht, wt = _inputs()
    with pytest.raises(ValueError, match=r"student's vocabulary \(V=37\) and the teacher's \(V=36\)"):
        token_kl(hs, ws, ht, wt[:, :36])
    with pytest.raises(ValueError, match="kind"):
        token_kl(hs, ws, ht, wt, kind="tvd")
    with pytest.raises(ValueError, match="impl"):
        token_kl(hs, ws, ht, wt, impl="pallas")
    with pytest.raises(ValueError, match="beta"):
        token_kl(hs, ws, ht, wt, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        token_kl(hs, ws, ht, wt, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="teacher hidden"):
        token_kl(hs, ws, ht, wt.T)
    with pytest.raises(ValueError, match="leading"):
        token_kl(hs, ws, ht[:, :4], wt)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        token_kl_topk(hs, ws, jnp.zeros((2, 5, 3)), jnp.zeros((2, 5, 4), jnp.int32))
    assert math.isclose(float(token_kl(hs, ws, ht, wt, temperature=2.0).sum()),
                        float(np.sum(_np_div(hs, ws, ht, wt, "forward", temperature=2.0))), rel_tol=1e-5)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_token_kl_loss_equals_the_weighted_sum_in_value_and_gradient(kind, beta):
    """token_kl_loss (the gradient formed in the forward pass) = sum(w * token_kl(naive)) in value and in the
    gradients of h_s and W_s, over several token chunks; the teacher and the weights get none."""
    from jaxpost.ops import token_kl_loss

    k = jax.random.split(jax.random.key(7), 5)
    hs, ws = jax.random.normal(k[0], (2, 6, 8)), jax.random.normal(k[1], (8, 40))
    ht, wt = jax.random.normal(k[2], (2, 6, 12)), jax.random.normal(k[3], (12, 40))
    w = jax.random.uniform(k[4], (2, 6)) * (jnp.arange(6)[None, :] < jnp.array([[6], [4]]))

    def fused(hs, ws, ht, wt):
        return token_kl_loss(hs, ws, ht, wt, w, kind=kind, beta=beta, temperature=0.8, chunk_budget_bytes=4000)

    def naive(hs, ws, ht, wt):
        return jnp.sum(w * token_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=0.8, impl="naive"))

    def chunked(hs, ws, ht, wt):
        return jnp.sum(w * token_kl(hs, ws, ht, wt, kind=kind, beta=beta, temperature=0.8, impl="chunked",
                                    chunk_budget_bytes=4000))

    (v1, g1), (v2, g2), (v3, g3) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
                                    for f in (fused, naive, chunked))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(v1, v3, rtol=1e-6)
    for a, b, c in zip(g1[:2], g2[:2], g3[:2]):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)  # the same hand-derived gradient as token_kl's
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)  # autodiff through float32 log-softmaxes
    assert not np.any(np.asarray(g1[2])) and not np.any(np.asarray(g1[3]))
    with pytest.raises(ValueError, match="weights"):
        token_kl_loss(hs, ws, ht, wt, w[:, :3])
