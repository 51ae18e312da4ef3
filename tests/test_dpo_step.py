"""The preference step: hand values at policy == reference, micro-batch invariance, precomputed == held reference,
sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.models import LM
from jaxpost.batch import split_microbatches
from jaxpost.train.dpo import Preference, make_reference_logps, sequence_logps
from jaxpost.train.step import make_step, step_fn
from jaxpost.train.state import TrainState, create_train_state
from tests.helpers import cached_lm, max_abs_diff, mesh_of, single_device_mesh, tiny_config

V = 128


def pair_batch(rng: np.random.Generator, pairs: int, T: int, *, prompt_len: int = 4) -> dict:
    """Interleaved chosen/rejected rows sharing a prompt, right-padded to different completion lengths."""
    R = 2 * pairs
    inputs = rng.integers(3, V, (R, T)).astype(np.int32)
    inputs[1::2, :prompt_len] = inputs[0::2, :prompt_len]
    lengths = rng.integers(prompt_len + 2, T + 1, R)
    seg = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((R, 1), np.int32)], axis=1)
    loss_mask = ((np.arange(T)[None, :] >= prompt_len - 1) & (np.arange(T)[None, :] < lengths[:, None] - 1))
    return dict(inputs=inputs * seg, targets=targets * seg, loss_mask=loss_mask.astype(np.float32),
                segment_ids=seg, positions=(np.arange(T)[None, :] * seg).astype(np.int32),
                pair_mask=np.ones(pairs, np.float32))


def _sgd_state(params):
    tx = optax.sgd(1.0)
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    lm, params = cached_lm(tiny_config())
    batch = split_microbatches(pair_batch(np.random.default_rng(0), 4, 12), 1)
    tx, state = _sgd_state(params)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), Preference(lm, loss="sigmoid",
                           loss_kwargs={"beta": 0.1})))
    _, m = step(state, params, batch)
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    assert float(m["chosen_rewards"]) == 0.0 and float(m["margins"]) == 0.0
    assert float(m["pairs"]) == 4.0


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split_and_skip_padding_pairs():
    lm, params = cached_lm(tiny_config())
    rng = np.random.default_rng(1)
    batch = pair_batch(rng, 8, 12)
    batch["pair_mask"][5] = 0.0  # a padding pair: it must change nothing
    _, ref_params = lm, jax.tree.map(lambda x: x * 0.9, params)  # a different reference, so the loss is not log 2
    tx, state = _sgd_state(params)
    objective = Preference(lm, loss="sigmoid", loss_kwargs={"beta": 0.5, "sft_weight": 0.3})
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), objective))
    results = [step(state, ref_params, split_microbatches(batch, a)) for a in (1, 4)]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m["loss"]), float(results[0][1]["loss"]), rtol=1e-5)
        assert max_abs_diff(s.params, results[0][0].params) < 1e-6
    # the padding pair is ignored: changing its tokens changes nothing
    other = {k: v.copy() for k, v in batch.items()}
    other["inputs"][10:12] = (other["inputs"][10:12] + 7) % V
    s2, m2 = step(state, ref_params, split_microbatches(other, 4))
    assert max_abs_diff(s2.params, results[0][0].params) < 1e-6
    assert float(m2["pairs"]) == 7.0


def test_precomputed_reference_equals_the_held_reference_model():
    lm, params = cached_lm(tiny_config())
    ref_params = jax.tree.map(lambda x: x * 1.1, params)
    batch = pair_batch(np.random.default_rng(2), 4, 12)
    mesh = single_device_mesh()
    ref_fn = make_reference_logps(lm, mesh, lm.param_shardings(mesh), rows=8)
    pre = dict(batch, ref_logps=np.asarray(ref_fn(ref_params, batch)))
    np.testing.assert_allclose(pre["ref_logps"], np.asarray(
        sequence_logps(lm, ref_params, {k: jnp.asarray(v) for k, v in batch.items()})[0]), rtol=1e-6)
    tx, state = _sgd_state(params)
    sched = optax.constant_schedule(1.0)
    held = jax.jit(step_fn(lm, tx, sched, Preference(lm, loss="ipo",
                           loss_kwargs={"beta": 0.1})))
    precomputed = jax.jit(step_fn(lm, tx, sched, Preference(lm, loss="ipo", loss_kwargs={"beta": 0.1},
                                                            reference="precomputed")))
    s1, m1 = held(state, ref_params, split_microbatches(batch, 2))
    s2, m2 = precomputed(state, None, split_microbatches(pre, 2))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    assert max_abs_diff(s1.params, s2.params) < 1e-6


def test_reference_free_losses_and_mode_errors():
    lm, params = cached_lm(tiny_config())
    tx, state = _sgd_state(params)
    sched = optax.constant_schedule(0.0)
    batch = split_microbatches(pair_batch(np.random.default_rng(3), 2, 10), 1)
    for loss in ("simpo", "orpo"):
        _, m = jax.jit(step_fn(lm, tx, sched, Preference(lm, loss=loss, reference="none")))(state, None, batch)
        assert np.isfinite(float(m["loss"]))
    with pytest.raises(ValueError, match="reference-free"):
        step_fn(lm, tx, sched, Preference(lm, loss="simpo", reference="model"))
    with pytest.raises(ValueError, match="needs reference"):
        step_fn(lm, tx, sched, Preference(lm, loss="sigmoid", reference="none"))
    with pytest.raises(ValueError, match="unknown preference loss"):
        step_fn(lm, tx, sched, Preference(lm, loss="dpo"))


@pytest.mark.parametrize("shape", [(2, 2, 2)])  # the SFT step tests (1, 8, 1) too
def test_sharded_step_equals_single_device(shape):
    lm = LM(tiny_config())
    # plain SGD: the params after two steps compare the gradients directly (Adam would amplify round-off in
    # near-zero gradient entries to a full lr-sized step)
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    batch = split_microbatches(pair_batch(np.random.default_rng(4), 16, 12), 2)
    out = {}
    for name, mesh in (("single", single_device_mesh()), ("sharded", mesh_of(*shape))):
        state, shardings = create_train_state(lm, tx, mesh, seed=0)
        ref_params = jax.tree.map(lambda x: x * 0.95, state.params)  # sharded like the policy
        step = make_step(lm, tx, schedule, Preference(lm, loss="sigmoid", loss_kwargs={"beta": 0.2}), mesh=mesh,
                         state_shardings=shardings, units=16, grad_accum=2)
        for _ in range(2):
            state, metrics = step(state, ref_params, batch)
        out[name] = (jax.device_get(metrics), jax.device_get(state.params))
        if name == "sharded":
            assert ref_params["blocks"]["mlp"]["gate"].sharding.spec == state.params["blocks"]["mlp"]["gate"].sharding.spec
    (m1, p1), (m8, p8) = out["single"], out["sharded"]
    for k in ("loss", "grad_norm", "margins", "accuracies"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7)
    assert max_abs_diff(p1, p8) < 1e-5
