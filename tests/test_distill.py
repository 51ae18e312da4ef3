"""Distillation: the pure functions by hand; the objective against a naive computation from both models' full logits,
student-only gradients, zero loss and gradient at teacher == student, micro-batch and 8-device invariance; the
on-policy distillation reward fed to REINFORCE."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.batch import split_microbatches
from jaxpost.losses import (
    DISTILL_LOSSES,
    POLICY_LOSSES,
    Divergence,
    distill_token_loss,
    get_distill_loss,
    kd_mix,
    on_policy_distill_advantages,
    token_mean,
)
from jaxpost.models import LM
from jaxpost.train.distill import Distill, teacher_topk
from jaxpost.train.state import TrainState, create_train_state
from jaxpost.train.step import Context, make_step, step_fn
from tests.helpers import (
    cached_lm,
    max_abs_diff,
    mesh_of,
    random_batch,
    single_device_mesh,
    tiny_config,
)

V = 128
# A wider, deeper teacher with a tied output layer ([V, D] vocab-major) beside the untied tiny student ([D, V]).
TEACHER_CFG = tiny_config(name="tiny_teacher", d_model=96, n_layers=3, mlp_dim=192, tie_embeddings=True)


def _models():
    """(student LM, params, teacher LM, params), output layers scaled up so that both distributions are far from
    uniform (at init_std 0.02 the divergences are ~1e-3 per token, too small to test in float32)."""
    (lm, params), (teacher, teacher_params) = cached_lm(tiny_config()), cached_lm(TEACHER_CFG)
    params = {**params, "lm_head": params["lm_head"] * 10.0}
    teacher_params = {**teacher_params, "embed": teacher_params["embed"] * 30.0}
    return lm, params, teacher, teacher_params


def _batch(seed: int, B: int = 8, T: int = 16) -> dict:
    return random_batch(np.random.default_rng(seed), B, T, V, n_docs=2)


def _device(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _naive_divergence(lt, ls, kind: str, beta: float):
    """Per-token divergence [B, T] in float64 from the teacher's (lt) and student's (ls) log-probs [B, T, V]."""
    p, q = np.exp(lt), np.exp(ls)
    if kind == "forward":
        return (p * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (q * (ls - lt)).sum(-1)
    lm_ = np.log(beta * p + (1 - beta) * q)
    return beta * (p * (lt - lm_)).sum(-1) + (1 - beta) * (q * (ls - lm_)).sum(-1)


def _loss(objective, params, teacher_params, mb):
    return objective.loss(params, mb, Context(jnp.sum(mb["loss_mask"]), teacher_params, None, None))


# ---------------------------------------------------------------------------------------------------------------------
# pure functions


def test_distill_token_loss_sums_over_the_mask_and_drops_garbage():
    kl = jnp.array([[1.0, 2.0, jnp.inf], [3.0, jnp.nan, 4.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 1]])
    s, n = distill_token_loss(kl, mask)
    assert float(s) == 10.0 and float(n) == 4.0
    g = jax.grad(lambda x: distill_token_loss(x, mask)[0])(kl)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(mask, np.float32))


def test_kd_mix_by_hand():
    # (1 - alpha) nll + alpha s kd: 0.75 * 2 + 0.25 * 4 * 3 = 4.5 with s = T^2 = 4; 1.5 + 0.75 = 2.25 with s = 1
    assert float(kd_mix(2.0, 3.0, alpha=0.25, temperature=2.0, scale_by_t2=True)) == 4.5
    assert float(kd_mix(2.0, 3.0, alpha=0.25, temperature=2.0, scale_by_t2=False)) == 2.25
    for scale in (True, False):  # at T = 1 both conventions agree
        assert float(kd_mix(2.0, 3.0, alpha=0.25, temperature=1.0, scale_by_t2=scale)) == 2.25
    with pytest.raises(ValueError, match="alpha"):
        kd_mix(2.0, 3.0, alpha=1.5, temperature=1.0, scale_by_t2=False)


def test_registry_gives_token_kl_arguments():
    assert DISTILL_LOSSES.kwargs("jsd", {"beta": 0.2, "temperature": 2.0, "lr": 1.0}) == {"beta": 0.2,
                                                                                          "temperature": 2.0}
    assert DISTILL_LOSSES.kwargs("forward_kl", {"beta": 0.2, "temperature": 2.0}) == {"temperature": 2.0}
    assert get_distill_loss("jsd", beta=0.2) == Divergence("jsd", 0.2, 1.0)
    assert get_distill_loss("reverse_kl", temperature=0.5) == Divergence("reverse", 1.0, 0.5)
    assert get_distill_loss("topk_forward_kl").kind == "topk"
    with pytest.raises(ValueError, match="unknown distillation loss"):
        get_distill_loss("kl")
    with pytest.raises(ValueError, match="beta"):
        get_distill_loss("jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        get_distill_loss("forward_kl", temperature=0.0)


def test_on_policy_distill_advantages_by_hand():
    student = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -9.0, -1.0]])
    teacher = jnp.array([[-1.5, -1.0, -4.0], [-0.25, jnp.nan, -3.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 1]])
    # r = teacher - student on valid tokens: [-0.5, 1, 0], [0.25, 0, -2]
    np.testing.assert_allclose(np.asarray(on_policy_distill_advantages(student, teacher, mask)),
                               [[-0.5, 1.0, 0.0], [0.25, 0.0, -2.0]])
    # reward-to-go over valid tokens (the masked middle token is skipped): gamma 1 and 0.5
    np.testing.assert_allclose(np.asarray(on_policy_distill_advantages(student, teacher, mask, gamma=1.0)),
                               [[0.5, 1.0, 0.0], [-1.75, 0.0, -2.0]])
    np.testing.assert_allclose(np.asarray(on_policy_distill_advantages(student, teacher, mask, gamma=0.5)),
                               [[0.0, 1.0, 0.0], [-0.75, 0.0, -2.0]])
    g = jax.grad(lambda s: jnp.sum(on_policy_distill_advantages(s, teacher, mask, gamma=1.0)))(student)
    assert not np.any(np.asarray(g))  # detached


def test_reinforce_on_distill_advantages_is_minus_r_grad_logp():
    """token_mean(reinforce(A = r)) has gradient -(1/n) sum_t r_t grad log q(y_t), q = softmax(theta): by hand."""
    rng = np.random.default_rng(0)
    B, T, W = 2, 3, 5
    theta = jnp.asarray(rng.normal(size=(B, T, W)), jnp.float32)
    y = rng.integers(0, W, (B, T))
    teacher_logp = jnp.asarray(np.log(rng.dirichlet(np.ones(W), (B, T)))[np.arange(B)[:, None], np.arange(T), y],
                               jnp.float32)
    mask = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32)

    def loss(theta):
        logp = jnp.take_along_axis(jax.nn.log_softmax(theta), jnp.asarray(y)[..., None], -1)[..., 0]
        adv = on_policy_distill_advantages(logp, teacher_logp, mask)
        loss_BT, _ = POLICY_LOSSES["reinforce"](logp, logp, adv, mask)
        num, den = token_mean(loss_BT, mask)
        return num / den

    g = np.asarray(jax.grad(loss)(theta), np.float64)
    q = np.exp(_log_softmax(np.asarray(theta, np.float64)))
    r = np.asarray(teacher_logp, np.float64) - np.log(q[np.arange(B)[:, None], np.arange(T), y])
    expected = -(np.asarray(mask)[..., None] * r[..., None] * (np.eye(W)[y] - q)) / float(mask.sum())
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_expected_distill_policy_gradient_is_the_reverse_kl_gradient():
    """Over a categorical q = softmax(theta), E_{y~q}[-r(y) grad log q(y)] with r = log p - log q is exactly
    grad KL(q || p): each token of the support is a row, weighted by q(y) through REINFORCE's detached per-token
    weight (x W for token_mean's 1/W)."""
    rng = np.random.default_rng(1)
    W = 6
    theta = jnp.asarray(rng.normal(size=W), jnp.float32)
    log_p = jnp.asarray(np.log(rng.dirichlet(np.ones(W))), jnp.float32)
    mask = jnp.ones((W, 1), jnp.float32)

    def surrogate(theta):
        log_q = jax.nn.log_softmax(theta)
        logp = log_q[:, None]  # row y: the sampled token y
        adv = on_policy_distill_advantages(logp, log_p[:, None], mask)
        weight = jax.lax.stop_gradient(W * jnp.exp(logp))
        loss_BT, _ = POLICY_LOSSES["reinforce"](logp, logp, adv, mask, is_weight_BT=weight)
        num, den = token_mean(loss_BT, mask)
        return num / den

    def reverse_kl(theta):
        log_q = jax.nn.log_softmax(theta)
        return jnp.sum(jnp.exp(log_q) * (log_q - log_p))

    np.testing.assert_allclose(np.asarray(jax.grad(surrogate)(theta)), np.asarray(jax.grad(reverse_kl)(theta)),
                               atol=1e-6)
    # (the surrogate's value, E_q[(log q - log p) log q], is not the KL: only its gradient is meaningful)


# ---------------------------------------------------------------------------------------------------------------------
# the objective


# (loss, loss_kwargs, kd_weight, nll_weight, scale_by_t2): jsd's case is Hinton's kd_mix with alpha = 0.7; the top-k
# forward KL over every token (k = V, from `teacher_topk`) is the full forward KL
NAIVE_CASES = [("forward_kl", {}, 1.0, 0.0, False),
               ("reverse_kl", {"temperature": 2.0}, 1.0, 0.0, False),
               ("jsd", {"beta": 0.3, "temperature": 1.5}, 0.7, 0.3, True),
               ("topk_forward_kl", {"temperature": 1.5}, 1.0, 0.2, False)]


def test_loss_equals_naive_full_logits():
    lm, params, teacher, teacher_params = _models()
    batch = _batch(0)
    logp, ids = teacher_topk(teacher, teacher_params, _device(batch), k=V)
    mb = _device(dict(batch, teacher_topk_logp=np.asarray(logp), teacher_topk_ids=np.asarray(ids)))
    objectives = [Distill(lm, None if loss.startswith("topk") else teacher, loss=loss, loss_kwargs=kw, kd_weight=kd,
                          nll_weight=nll, scale_by_t2=t2) for loss, kw, kd, nll, t2 in NAIVE_CASES]
    # one program for every case (a compile costs seconds on CPU, most of it fixed)
    results = jax.jit(lambda p, tp: [_loss(o, p, None if o.topk else tp, mb) for o in objectives])(params,
                                                                                                  teacher_params)

    args = (mb["inputs"], mb["positions"], mb["segment_ids"])
    zs = np.asarray(lm.logits(params, *args), np.float64)
    zt = np.asarray(teacher.logits(teacher_params, *args), np.float64)
    nll = -np.take_along_axis(_log_softmax(zs), batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    nll_sum, n = (nll * m).sum(), m.sum()
    for (value, sums), objective, (loss, _, kd_weight, nll_weight, scale_by_t2) in zip(results, objectives,
                                                                                        NAIVE_CASES):
        d = objective.divergence
        kind = "forward" if d.kind == "topk" else d.kind
        kl = _naive_divergence(_log_softmax(zt / d.temperature), _log_softmax(zs / d.temperature), kind, d.beta)
        kl_sum = (kl * m).sum()
        assert kl_sum / n > 0.1, loss  # far from uniform: a real test of the divergence
        expected = kd_weight * (d.temperature ** 2 if scale_by_t2 else 1.0) * kl_sum + nll_weight * nll_sum
        if scale_by_t2:
            expected = float(kd_mix(nll_sum, kl_sum, alpha=kd_weight, temperature=d.temperature, scale_by_t2=True))
        np.testing.assert_allclose(float(value), expected / n, rtol=1e-5, err_msg=loss)
        np.testing.assert_allclose(float(sums["kl"]), kl_sum, rtol=1e-5, err_msg=loss)
        np.testing.assert_allclose(float(sums["nll"]), nll_sum, rtol=1e-5, err_msg=loss)


def test_student_only_gradients_equal_the_naive_gradient():
    lm, params, teacher, teacher_params = _models()
    batch = _batch(1)
    batch["loss_mask"][:3] = 0.0  # the two micro-batches of the step below hold very different token counts
    mb = _device(batch)
    objective = Distill(lm, teacher, loss="jsd", loss_kwargs={"beta": 0.5, "temperature": 2.0}, nll_weight=0.5)

    def naive(params, teacher_params):  # plain jnp autodiff through both models' full logits
        args = (mb["inputs"], mb["positions"], mb["segment_ids"])
        ls = jax.nn.log_softmax(lm.logits(params, *args) / 2.0)
        lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher.logits(teacher_params, *args)) / 2.0)
        lmix = jnp.logaddexp(lt + jnp.log(0.5), ls + jnp.log(0.5))
        jsd = 0.5 * jnp.sum(jnp.exp(lt) * (lt - lmix), -1) + 0.5 * jnp.sum(jnp.exp(ls) * (ls - lmix), -1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(lm.logits(params, *args)), mb["targets"][..., None], -1)[..., 0]
        return jnp.sum((jsd + 0.5 * nll) * mb["loss_mask"]) / jnp.sum(mb["loss_mask"])

    grads = jax.jit(lambda p, tp: (jax.grad(lambda p, tp: _loss(objective, p, tp, mb)[0], argnums=(0, 1))(p, tp),
                                   jax.grad(naive)(p, tp)))
    (g_student, g_teacher), g_naive = grads(params, teacher_params)
    assert max_abs_diff(g_student, g_naive) < 1e-6
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_teacher))

    # one step over 2 micro-batches is the full-batch gradient step, and leaves the teacher's params as they were
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    before = jax.device_get(teacher_params)
    new_state, m = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), objective))(
        state, teacher_params, split_microbatches(batch, 2))
    assert max_abs_diff(before, teacher_params) == 0.0
    np.testing.assert_allclose(float(m["loss"]), float(_loss(objective, params, teacher_params, mb)[0]), rtol=1e-6)
    assert max_abs_diff(jax.tree.map(lambda p, g: p - g, params, g_student), new_state.params) < 1e-6
    assert float(m["tokens"]) == float(jnp.sum(mb["loss_mask"]))


def test_teacher_equal_to_student_gives_zero_loss_and_gradient_for_every_kind():
    lm, params, _, _ = _models()
    batch = _batch(2)
    logp, ids = teacher_topk(lm, params, _device(batch), k=V)  # every token of the student's own distribution
    mb = _device(dict(batch, teacher_topk_logp=np.asarray(logp), teacher_topk_ids=np.asarray(ids)))
    cases = [("forward_kl", {}), ("reverse_kl", {"temperature": 2.0}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}),
             ("topk_forward_kl", {})]
    objectives = [Distill(lm, None if loss == "topk_forward_kl" else lm, loss=loss, loss_kwargs=kw)
                  for loss, kw in cases]

    def all_cases(params):
        return [jax.value_and_grad(lambda p, o=o: _loss(o, p, None if o.topk else p, mb), has_aux=True)(params)
                for o in objectives]

    for ((value, sums), g), case in zip(jax.jit(all_cases)(params), cases):
        assert abs(float(value)) < 1e-6 and abs(float(sums["kl"])) < 1e-4, case
        assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) < 1e-6, case


def test_an_8_device_mesh_with_micro_batches_gives_the_single_device_step():
    """One step on a (data, fsdp, tensor) = (2, 2, 2) mesh with 2 micro-batches against one device with one: loss,
    metrics and params. (One micro-batch against two on one device: test_student_only_gradients_...)"""
    lm, _, teacher, teacher_host = _models()
    teacher_host = jax.device_get(teacher_host)
    batch = _batch(4)
    batch["loss_mask"][:2] = 0.0  # very uneven token counts per micro-batch: a mean of means would differ
    # plain SGD: comparing params after one step compares the gradients
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    objective = Distill(lm, teacher, loss="jsd", loss_kwargs={"beta": 0.3, "temperature": 1.5}, nll_weight=0.5)
    out = {}
    for name, mesh, accum in (("single", single_device_mesh(), 1), ("sharded", mesh_of(2, 2, 2), 2)):
        state, shardings = create_train_state(lm, tx, mesh, seed=0)
        teacher_params = jax.device_put(teacher_host, teacher.param_shardings(mesh))
        step = make_step(lm, tx, schedule, objective, mesh=mesh, state_shardings=shardings, units=8,
                         grad_accum=accum)
        state, metrics = step(state, teacher_params, split_microbatches(batch, accum))
        out[name] = (jax.device_get(metrics), jax.device_get(state.params))
        # the step takes the teacher in its own layout (its embed is [V, 96], the student's [V, 64]), not donated
        assert objective.reference_shardings(shardings.params) == teacher.param_shardings(mesh)
        assert max_abs_diff(teacher_params, teacher_host) == 0.0
        if name == "sharded":
            assert len(teacher_params["blocks"]["mlp"]["gate"].sharding.device_set) == 8
    (m1, p1), (m8, p8) = out["single"], out["sharded"]
    assert float(m1["tokens"]) == batch["loss_mask"].sum() and float(m1["kl"]) > 0.1
    for k in ("loss", "kl", "nll", "grad_norm", "tokens"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    assert max_abs_diff(p1, p8) < 1e-5


def test_objective_errors():
    lm = LM(tiny_config())
    with pytest.raises(ValueError, match=r"student's has 128 tokens, the teacher's 256"):
        Distill(lm, LM(tiny_config(vocab_size=256)))
    with pytest.raises(ValueError, match="needs a teacher"):
        Distill(lm, None, loss="reverse_kl")
    with pytest.raises(ValueError, match="teacher=None"):
        Distill(lm, lm, loss="topk_forward_kl")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        Distill(lm, lm, loss="kd")


def test_token_kl_and_token_kl_loss_paths_agree():
    """kl_impl="auto" on the CPU sums the divergence with `token_kl_loss` (the gradient formed in the forward pass);
    kl_impl="chunked" goes through `token_kl`: the same loss and the same gradient for every full-vocabulary kind."""
    lm, params, teacher, teacher_params = _models()
    mb = _device(_batch(3))
    for loss, kw in (("forward_kl", {}), ("reverse_kl", {"temperature": 2.0}), ("jsd", {"beta": 0.3})):
        fused = Distill(lm, teacher, loss=loss, loss_kwargs=kw)
        chunked = Distill(lm, teacher, loss=loss, loss_kwargs=kw, kl_impl="chunked")
        assert fused.fused_loss and not chunked.fused_loss
        (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(lambda p, o=o: _loss(o, p, teacher_params, mb)[0]))(params)
                              for o in (fused, chunked))
        np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6, err_msg=loss)
        assert max_abs_diff(g1, g2) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(g2["lm_head"])))), loss
