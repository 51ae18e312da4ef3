"""The SFT step: hand-derived loss, gradient-accumulation and data-parallel invariance, sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.config import OptimConfig
from jaxpost.models import LM
from jaxpost.train.optim import make_optimizer
from jaxpost.batch import split_microbatches
from jaxpost.train.sft import SFT, sft_loss_sums
from jaxpost.train.step import make_step, step_fn
from jaxpost.train.state import TrainState, create_train_state
from tests.helpers import cached_lm, max_abs_diff, mesh_of, random_batch, sft_single_and_sharded, tiny_config

V = 128


def _sgd_state(params):
    tx = optax.sgd(1.0)  # updated params = params - grads: comparing params compares gradients exactly
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))


def test_zero_unembedding_gives_log_v_and_hand_derived_head_gradient():
    lm, params = cached_lm(tiny_config())
    params = {**params, "lm_head": jnp.zeros_like(params["lm_head"])}
    batch = random_batch(np.random.default_rng(0), 4, 16, V)
    mb = {k: jnp.asarray(v) for k, v in batch.items()}
    nll, n = sft_loss_sums(lm, params, mb)
    assert float(n) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(nll / n), np.log(V), rtol=1e-6)
    # Uniform softmax: d(mean NLL)/dW = sum_t mask_t * h_t (1/V - onehot(y_t)) / n.
    grad = jax.grad(lambda p: (lambda s, c: s / c)(*sft_loss_sums(lm, p, mb)))(params)["lm_head"]
    h = np.asarray(lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"]), np.float64).reshape(-1, 64)
    m = batch["loss_mask"].reshape(-1)
    coeff = np.full((h.shape[0], V), 1.0 / V) - np.eye(V)[batch["targets"].reshape(-1)]
    expected = (h * m[:, None]).T @ coeff / m.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split():
    lm, params = cached_lm(tiny_config())
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 8, 16, V, n_docs=2)
    batch["loss_mask"][:2] = 0.0  # very uneven token counts per micro-batch: a mean of means would differ
    batch["loss_mask"][2, :] = batch["segment_ids"][2] > 0
    tx, state = _sgd_state(params)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), SFT(lm)))
    results = [step(state, split_microbatches(batch, a)) for a in (1, 8)]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m["loss"]), float(results[0][1]["loss"]), rtol=1e-6)
        assert float(m["tokens"]) == batch["loss_mask"].sum()
        assert max_abs_diff(s.params, results[0][0].params) < 1e-6
    # and it is the plain token mean over the whole batch
    nll, n = sft_loss_sums(lm, params, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(results[0][1]["loss"]), float(nll / n), rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 1)])  # (2, 2, 2) with tensor parallelism: the DPO, RM and LoRA steps
def test_sharded_step_equals_single_device(shape):
    cfg = tiny_config()
    lm = LM(cfg)
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=0, lr=1e-3), 10)
    batch = split_microbatches(random_batch(np.random.default_rng(2), 8, 16, V, n_docs=2), 2)
    (m1, p1, _), (m8, p8, s8) = sft_single_and_sharded(lm, tx, schedule, batch, shape, grad_accum=2, rows=8)
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
    assert max_abs_diff(p1, p8) < 1e-5
    # the state really is distributed: FSDP shards every weight's embed dimension
    gate = s8.params["blocks"]["mlp"]["gate"]
    assert gate.sharding.spec[1] == "fsdp"
    assert len({d for d in gate.sharding.device_set}) == 8
    mu = s8.opt_state[1][0].mu["blocks"]["mlp"]["gate"]
    assert mu.sharding == gate.sharding


def test_step_counter_and_schedule_do_not_recompile():
    lm = LM(tiny_config())
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=2), 10)
    mesh = mesh_of(2, 2, 2)
    state, shardings = create_train_state(lm, tx, mesh, seed=0)
    step = make_step(lm, tx, schedule, SFT(lm), mesh=mesh, state_shardings=shardings, units=8, grad_accum=1)
    batch = split_microbatches(random_batch(np.random.default_rng(3), 8, 16, V), 1)
    lrs = []
    for _ in range(3):
        state, metrics = step(state, batch)
        lrs.append(float(metrics["lr"]))
    assert step.jitted._cache_size() == 1
    assert lrs[0] == 0.0 and lrs[1] > 0.0
    assert int(state.step) == 3


def test_bad_micro_batch_split_is_reported():
    batch = random_batch(np.random.default_rng(0), 6, 8, V)
    with pytest.raises(ValueError, match="grad_accum=4"):
        split_microbatches(batch, 4)


def test_weight_decay_skips_stacked_norm_scales_and_biases():
    from jaxpost.train.optim import decay_mask
    lm = LM(tiny_config(qkv_bias=True, qk_norm=True))
    mask = decay_mask(lm.logical_axes)
    assert mask["blocks"]["mlp"]["gate"] and mask["blocks"]["attn"]["q"] and mask["embed"] and mask["lm_head"]
    assert not mask["blocks"]["attn_norm"]["scale"]  # [layers, D]: 2-D but not a matrix
    assert not mask["blocks"]["attn"]["q_bias"]  # [layers, H, hd]: a bias with two named axes
    assert not mask["final_norm"]["scale"] and not mask["blocks"]["attn"]["q_norm"]["scale"]
