"""The KTO step: hand values at policy == reference, the global KL baseline makes it micro-batch invariant,
precomputed == held reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost.losses import kto, kto_kl_baseline, kto_kl_sums
from jaxpost.train.dpo import sequence_logps
from jaxpost.batch import split_microbatches
from jaxpost.train.kto import Unpaired
from jaxpost.train.step import step_fn
from jaxpost.train.state import TrainState
from tests.helpers import cached_lm, max_abs_diff, tiny_config
from tests.test_dpo_step import pair_batch


def kto_batch(rng, n, T):
    """n unpaired rows (alternating labels) and KL rows pairing prompt i with completion i+1."""
    rows = pair_batch(rng, (n + 1) // 2, T)
    rows = {k: v[:n] for k, v in rows.items() if k != "pair_mask"}
    kl = {"kl_" + k: np.roll(v, -1, axis=0) for k, v in rows.items()}
    return dict(rows, **kl, label=(np.arange(n) % 3 != 0).astype(np.int32), example_mask=np.ones(n, np.float32))


def _sgd_state(params):
    tx = optax.sgd(1.0)
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))


def test_policy_equal_to_reference_gives_half_the_weights():
    lm, params = cached_lm(tiny_config())
    batch = kto_batch(np.random.default_rng(0), 6, 12)
    tx, state = _sgd_state(params)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), Unpaired(lm, loss_kwargs={"desirable_weight": 1.0,
                                                                                 "undesirable_weight": 2.0})))
    _, m = step(state, params, split_microbatches(batch, 1))
    # r = 0 and z0 = 0: loss = w / 2 per example; 4 desirable (w 1) and 2 undesirable (w 2) rows
    np.testing.assert_allclose(float(m["loss"]), (4 * 0.5 + 2 * 1.0) / 6, rtol=1e-6)
    assert float(m["kl"]) == 0.0


def test_global_kl_baseline_makes_the_step_micro_batch_invariant_and_precomputed_equals_held():
    lm, params = cached_lm(tiny_config())
    ref_params = jax.tree.map(lambda x: x * 0.8, params)
    batch = kto_batch(np.random.default_rng(1), 8, 12)
    batch["example_mask"][6] = 0.0
    tx, state = _sgd_state(params)
    sched = optax.constant_schedule(1.0)
    step = jax.jit(step_fn(lm, tx, sched, Unpaired(lm, loss_kwargs={"beta": 0.5})))
    results = [step(state, ref_params, split_microbatches(batch, a)) for a in (1, 4)]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m["loss"]), float(results[0][1]["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["kl"]), float(results[0][1]["kl"]), atol=1e-6)  # a difference of ~-30s
        assert max_abs_diff(s.params, results[0][0].params) < 1e-5
    # the loss is the plain per-example mean of `kto` with the batch's KL estimate
    j = {k: jnp.asarray(v) for k, v in batch.items()}
    rows = {k: j[k] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    kl_rows = {k: j["kl_" + k] for k in rows}
    pi, ref = sequence_logps(lm, params, rows)[0], sequence_logps(lm, ref_params, rows)[0]
    z0 = kto_kl_baseline(*kto_kl_sums(sequence_logps(lm, params, kl_rows)[0],
                                      sequence_logps(lm, ref_params, kl_rows)[0], mask_B=j["example_mask"]))
    loss_B, _ = kto(pi, ref, j["label"] > 0, kl=z0, beta=0.5)
    m = batch["example_mask"]
    np.testing.assert_allclose(float(results[0][1]["loss"]), float(jnp.sum(loss_B * m) / m.sum()), rtol=1e-5)
    # precomputed reference log-probs give the same step
    pre = dict(batch, ref_logps=np.asarray(ref), ref_kl_logps=np.asarray(sequence_logps(lm, ref_params, kl_rows)[0]))
    step_pre = jax.jit(step_fn(lm, tx, sched, Unpaired(lm, loss_kwargs={"beta": 0.5}, reference="precomputed")))
    s2, m2 = step_pre(state, None, split_microbatches(pre, 4))
    np.testing.assert_allclose(float(m2["loss"]), float(results[0][1]["loss"]), rtol=1e-5)
    assert max_abs_diff(s2.params, results[0][0].params) < 1e-5
