"""The reward-model step: hand-derived loss and head gradient at a zero head, micro-batch invariance, sharded ==
single device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.models.heads import ScalarHeadLM, last_token_index, sequence_rewards
from jaxpost.batch import split_microbatches
from jaxpost.train.rm import PairwiseReward
from jaxpost.train.step import make_step, step_fn
from jaxpost.train.state import TrainState, create_train_state
from tests.helpers import cached_lm, max_abs_diff, mesh_of, single_device_mesh, tiny_config
from tests.test_dpo_step import pair_batch


def _model_and_params(head_std=0.0):
    cfg = tiny_config()
    _, lm_params = cached_lm(cfg)
    model = ScalarHeadLM(cfg, head_init_std=head_std)
    return model, model.with_lm_params(lm_params, jax.random.PRNGKey(1))


def _sgd_state(params):
    tx = optax.sgd(1.0)
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))


def test_last_token_index():
    mask = jnp.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(last_token_index(mask)), [2, 4, 0])


def test_zero_head_gives_log_2_and_the_hand_derived_head_gradient():
    model, params = _model_and_params()
    batch = pair_batch(np.random.default_rng(0), 4, 12)
    tx, state = _sgd_state(params)
    new, m = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), PairwiseReward(model)))(
        state, split_microbatches(batch, 1))
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    # d/dw mean_i -log sigma(w.(h_ci - h_ri)) at w = 0 is -0.5 * mean_i (h_ci - h_ri), h at the last completion token
    h = np.asarray(model.lm.hidden(params["lm"], batch["inputs"], batch["positions"], batch["segment_ids"]),
                   np.float64)
    last = np.asarray(last_token_index(jnp.asarray(batch["loss_mask"])))
    h_last = h[np.arange(h.shape[0]), last]
    grad_w = -0.5 * (h_last[0::2] - h_last[1::2]).mean(0)
    np.testing.assert_allclose(np.asarray(params["head"]["w"] - new.params["head"]["w"]), grad_w, atol=1e-6)


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split():
    model, params = _model_and_params(head_std=0.5)
    batch = pair_batch(np.random.default_rng(1), 8, 12)
    batch["pair_mask"][3] = 0.0
    tx, state = _sgd_state(params)
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), PairwiseReward(model,
                           loss_kwargs={"center_rewards_coefficient": 0.01})))
    results = [step(state, split_microbatches(batch, a)) for a in (1, 4)]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m["loss"]), float(results[0][1]["loss"]), rtol=1e-5)
        assert max_abs_diff(s.params, results[0][0].params) < 1e-5  # float32 sums in another order
    rewards = sequence_rewards(model, params, {k: jnp.asarray(v) for k, v in batch.items()})
    margins = np.asarray(rewards[0::2] - rewards[1::2])
    keep = batch["pair_mask"] > 0
    np.testing.assert_allclose(float(results[0][1]["accuracies"]), (margins[keep] > 0).mean(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_sharded_step_equals_single_device(shape):
    cfg = tiny_config()
    model = ScalarHeadLM(cfg, head_init_std=0.3)
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    batch = split_microbatches(pair_batch(np.random.default_rng(2), 16, 12), 2)
    out = {}
    for name, mesh in (("single", single_device_mesh()), ("sharded", mesh_of(*shape))):
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        step = make_step(model, tx, schedule, PairwiseReward(model), mesh=mesh, state_shardings=shardings, units=16,
                         grad_accum=2)
        for _ in range(2):
            state, metrics = step(state, batch)
        out[name] = (jax.device_get(metrics), jax.device_get(state.params))
    (m1, p1), (m8, p8) = out["single"], out["sharded"]
    for k in ("loss", "grad_norm", "margins"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7)
    # the head's updates are O(1) (lr 0.5, a 0.3-std head): float32 reductions over 8 devices differ in ~1e-5
    assert max_abs_diff(p1, p8) < 1e-4
