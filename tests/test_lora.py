"""LoRA: zero-initialised adapters change nothing, merged equals unmerged, only adapters train (SFT, DPO and RL
steps), the reference is the base model with the adapters disabled, sharded equals single device, adapters save and
load alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.config import OptimConfig
from jaxpost.models import LM
from jaxpost.models.lora import (LoRAConfig, adapter_params, base_params, load_adapters, merge_adapters,
                                 save_adapters, with_adapters)
from jaxpost.batch import split_microbatches
from jaxpost.config import RLLossConfig
from jaxpost.train.dpo import Preference, sequence_logps
from jaxpost.train.optim import make_optimizer
from jaxpost.train.rl import PolicyGradient, PolicyModel, make_rl_scorer
from jaxpost.train.sft import SFT, sft_loss_sums
from jaxpost.train.step import step_fn
from jaxpost.train.state import abstract_train_state, new_train_state, state_shardings, trainable_of
from tests.helpers import cached_lm, max_abs_diff, random_batch, sft_single_and_sharded, single_device_mesh, tiny_config
from tests.test_dpo_step import pair_batch
from tests.test_rl_step import rollout_rows

V = 128
LORA = LoRAConfig(rank=4, alpha=8.0)


@functools.lru_cache(maxsize=None)
def _lora_lm(lora):
    return LM(tiny_config(), lora)


@functools.lru_cache(maxsize=None)
def jitted(lm):
    """lm.hidden and lm.logits under jit (eager NNX dispatches op by op: slow on CPU)."""
    hidden = jax.jit(lambda p, t, adapters=True, key=None: lm.hidden(p, t, adapters=adapters, dropout_key=key),
                     static_argnames="adapters")
    logits = jax.jit(lm.logits)
    return hidden, logits


@functools.lru_cache(maxsize=None)
def lora_setup(lora=LORA, *, random_adapters: bool = False, seed: int = 0):
    """(base LM, base params, LoRA LM, its params on that base), adapters fresh (B = 0) or random (B != 0); built
    once per test session (the arrays are immutable and no test donates them)."""
    base_lm, base = cached_lm(tiny_config())
    lm = _lora_lm(lora)
    params = lm.add_adapters(base, jax.random.PRNGKey(seed))
    if random_adapters:
        keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 64))
        params = with_adapters(params, jax.tree.map(
            lambda a: 0.3 * jax.random.normal(next(keys), a.shape, a.dtype), adapter_params(params)))
    return base_lm, base, lm, params


def test_adapters_have_the_lora_shapes_and_only_they_are_trainable():
    _, base, lm, params = lora_setup()
    ad = adapter_params(params)
    cfg = tiny_config()
    L, D, H, K, hd, F, r = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, 4
    assert ad["blocks"]["attn"]["q_lora_a"].shape == (L, D, r)
    assert ad["blocks"]["attn"]["k_lora_b"].shape == (L, r, K, hd)
    assert ad["blocks"]["attn"]["o_lora_a"].shape == (L, H, hd, r)
    assert ad["blocks"]["mlp"]["down_lora_a"].shape == (L, F, r)
    assert all(float(jnp.abs(x).max()) == 0 for k, x in ad["blocks"]["attn"].items() if k.endswith("_b"))
    assert trainable_of(lm, params) == ad
    # the base arrays are the caller's own: nothing copied
    assert base_params(params)["blocks"]["mlp"]["gate"] is base["blocks"]["mlp"]["gate"]
    only_q = LM(cfg, LoRAConfig(rank=2, targets=("q", "down")))
    assert sorted(adapter_params(only_q.abstract_params)["blocks"]["attn"]) == ["q_lora_a", "q_lora_b"]
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(rank=2, targets=("q", "wq"))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=-1)


def test_zero_initialised_adapters_leave_outputs_unchanged_and_disabled_adapters_give_the_base():
    base_lm, base, lm, params = lora_setup()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, V)
    hidden, logits = jitted(lm)
    base_hidden, base_logits = jitted(base_lm)
    np.testing.assert_array_equal(np.asarray(logits(params, tokens)), np.asarray(base_logits(base, tokens)))
    _, _, lm, rparams = lora_setup(random_adapters=True)
    h_on = hidden(rparams, tokens)
    h_off = hidden(rparams, tokens, adapters=False)
    assert float(jnp.abs(h_on - h_off).max()) > 0.1  # the random adapters do change the outputs
    np.testing.assert_array_equal(np.asarray(h_off), np.asarray(base_hidden(base, tokens)))


def test_merged_equals_unmerged_and_the_scale_is_alpha_over_rank():
    base_lm, base, lm, params = lora_setup(random_adapters=True)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, V)
    merged = merge_adapters(params, lm.lora)
    assert adapter_params(merged) == {}
    np.testing.assert_allclose(np.asarray(jitted(base_lm)[1](merged, tokens)),
                               np.asarray(jitted(lm)[1](params, tokens)), atol=2e-5, rtol=1e-5)
    # one weight by hand: W + (alpha / r) A B
    a, b = params["blocks"]["mlp"]["up_lora_a"][0], params["blocks"]["mlp"]["up_lora_b"][0]
    expected = np.asarray(base["blocks"]["mlp"]["up"][0]) + 8.0 / 4 * np.asarray(a) @ np.asarray(b)
    np.testing.assert_allclose(np.asarray(merged["blocks"]["mlp"]["up"][0]), expected, atol=1e-6)
    rs = LoRAConfig(rank=4, alpha=8.0, rslora=True)
    assert rs.scale == 4.0


def test_sft_step_trains_only_the_adapters_and_the_optimizer_holds_only_them():
    _, base, lm, params = lora_setup()
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=0, lr=1e-2), 10,
                                  logical_axes=trainable_of(lm, lm.logical_axes))
    state = new_train_state(lm, tx, params, jax.random.PRNGKey(0))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    n_adapters = sum(x.size for x in jax.tree.leaves(adapter_params(params)))
    assert n_opt == 2 * n_adapters  # Adam's two moments, of the adapters only
    step = jax.jit(step_fn(lm, tx, schedule, SFT(lm)))
    batch = split_microbatches(random_batch(np.random.default_rng(0), 4, 16, V), 1)
    loss0 = None
    for _ in range(3):
        state, metrics = step(state, batch)
        loss0 = float(metrics["loss"]) if loss0 is None else loss0
    assert float(metrics["loss"]) < loss0
    new = jax.device_get(state.params)
    assert max_abs_diff(base_params(new), base) == 0.0  # the base weights are bit-for-bit untouched
    assert max(float(np.abs(x).max()) for k, x in _items(adapter_params(new)) if k.endswith("_lora_b")) > 0


def _items(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def test_lora_gradient_is_the_chain_rule_through_the_merged_weight_and_invariant_to_the_split():
    """d loss / d B = s A^T (d loss / d W) at the merged weight: the adapter gradient is the full-model gradient
    projected, so the LoRA step is the same objective as full fine-tuning restricted to W + s A B."""
    base_lm, base, lm, params = lora_setup(random_adapters=True)
    batch = random_batch(np.random.default_rng(3), 4, 16, V, n_docs=2)
    mb = {k: jnp.asarray(v) for k, v in batch.items()}

    def mean_nll(model, p):
        s, n = sft_loss_sums(model, p, mb)
        return s / n

    g_lora = jax.jit(jax.grad(lambda t: mean_nll(lm, with_adapters(params, t))))(adapter_params(params))
    g_full = jax.jit(jax.grad(lambda p: mean_nll(base_lm, p)))(merge_adapters(params, lm.lora))
    a = np.asarray(params["blocks"]["mlp"]["gate_lora_a"], np.float64)
    gw = np.asarray(g_full["blocks"]["mlp"]["gate"], np.float64)
    expected_gb = 2.0 * np.einsum("ldr,ldf->lrf", a, gw)
    np.testing.assert_allclose(np.asarray(g_lora["blocks"]["mlp"]["gate_lora_b"]), expected_gb, atol=2e-5)
    # gradient accumulation: 1 or 4 micro-batches give the same adapter update
    tx = optax.sgd(1.0)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(1.0), SFT(lm)))
    state = new_train_state(lm, tx, params, jax.random.PRNGKey(0))
    outs = [step(state, split_microbatches(batch, A))[0].params for A in (1, 4)]
    for o in outs[1:]:  # float32 summation order only (3.5e-6 on some x86 CPUs, with adapters of size ~0.4)
        assert max_abs_diff(adapter_params(o), adapter_params(outs[0])) < 1e-5


def test_lora_dropout_is_keyed_by_the_state_and_changes_only_training_forwards():
    _, base, _, _ = lora_setup()
    lm = _lora_lm(LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
    params = lm.add_adapters(base, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 64))
    params = with_adapters(params, jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape),
                                                adapter_params(params)))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, V)
    hidden, _ = jitted(lm)
    h = hidden(params, tokens)
    h_k1 = hidden(params, tokens, key=jax.random.PRNGKey(1))
    h_k1b = hidden(params, tokens, key=jax.random.PRNGKey(1))
    h_k2 = hidden(params, tokens, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(h_k1), np.asarray(h_k1b))
    assert float(jnp.abs(h_k1 - h).max()) > 1e-3 and float(jnp.abs(h_k1 - h_k2).max()) > 1e-3
    # the frozen path sees no dropout: with B = 0 every dropout mask gives the base output
    fresh = lm.add_adapters(base, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(hidden(fresh, tokens, key=jax.random.PRNGKey(1))),
                                  np.asarray(hidden(fresh, tokens)))
    tx = optax.sgd(0.1)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(0.1), SFT(lm)))
    batch = split_microbatches(random_batch(np.random.default_rng(5), 4, 16, V), 1)
    s = new_train_state(lm, tx, params, jax.random.PRNGKey(0))
    p1 = step(s, batch)[0].params
    p1b = step(new_train_state(lm, tx, params, jax.random.PRNGKey(0)), batch)[0].params
    p2 = step(new_train_state(lm, tx, params, jax.random.PRNGKey(1)), batch)[0].params
    assert max_abs_diff(p1, p1b) == 0.0 and max_abs_diff(p1, p2) > 0


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_sharded_lora_sft_step_equals_single_device(shape):
    _, base, lm, _ = lora_setup()
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=0, lr=1e-2), 10,
                                  logical_axes=trainable_of(lm, lm.logical_axes))
    batch = split_microbatches(random_batch(np.random.default_rng(6), 8, 16, V, n_docs=2), 1)
    (m1, p1, _), (m8, p8, s8) = sft_single_and_sharded(lm, tx, schedule, batch, shape, grad_accum=1, rows=8)
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
    assert max_abs_diff(p1, p8) < 1e-5
    assert max(float(np.abs(x).max()) for k, x in _items(adapter_params(p8)) if k.endswith("_lora_b")) > 0
    a = s8.params["blocks"]["mlp"]["gate_lora_a"]  # [L, D, r]: the embed dimension over fsdp, like the weights
    assert a.sharding.spec[1] == "fsdp"
    b = s8.params["blocks"]["mlp"]["gate_lora_b"]  # [L, r, F]: mlp over tensor
    assert b.sharding.spec[2] == "tensor"
    # the optimizer state mirrors the adapters' shardings, and there is none for the base weights
    opt_leaves = [x for x in jax.tree.leaves(s8.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(adapter_params(p8)))


def test_dpo_step_with_the_base_model_as_reference():
    base_lm, base, lm, params = lora_setup()
    tx = optax.sgd(0.5)
    step = jax.jit(step_fn(lm, tx, optax.constant_schedule(0.5), Preference(lm, loss="sigmoid",
                           loss_kwargs={"beta": 0.1}, reference="model")))
    batch = split_microbatches(pair_batch(np.random.default_rng(7), 4, 16), 2)
    state = new_train_state(lm, tx, params, jax.random.PRNGKey(0))
    state, m0 = step(state, None, batch)
    np.testing.assert_allclose(float(m0["loss"]), np.log(2.0), rtol=1e-6)  # fresh adapters: policy == reference
    state, m1 = step(state, None, batch)
    assert float(m1["loss"]) < np.log(2.0)
    new = jax.device_get(state.params)
    assert max_abs_diff(base_params(new), base) == 0.0
    # the reference really is the base model: its log-probs under the trained params equal the base model's
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    ref_lp, _ = sequence_logps(lm, state.params, mb, adapters=False)
    base_lp, _ = sequence_logps(base_lm, base, mb)
    pol_lp, _ = sequence_logps(lm, state.params, mb)
    np.testing.assert_array_equal(np.asarray(ref_lp), np.asarray(base_lp))
    assert float(jnp.abs(pol_lp - base_lp).max()) > 1e-4


def test_rl_step_and_scorer_with_a_lora_policy_and_a_value_head():
    base_lm, base, lm, params = lora_setup(random_adapters=True)
    model = PolicyModel(lm, value="head")
    loss_cfg = RLLossConfig(kl_coef=0.1, kl_in="loss")
    tx = optax.adam(1e-2)
    full = model.from_policy(params, jax.random.PRNGKey(0))
    full["value"]["head"]["w"] = jnp.full_like(full["value"]["head"]["w"], 0.01)
    rows = rollout_rows(np.random.default_rng(8), 8, 16)
    mesh = single_device_mesh()
    scorer = make_rl_scorer(model, mesh, model.param_shardings(mesh), rows=8, with_ref=True)
    scored = jax.device_get(scorer(full, None, rows))
    base_scorer = make_rl_scorer(PolicyModel(base_lm), mesh, PolicyModel(base_lm).param_shardings(mesh), rows=8)
    np.testing.assert_allclose(scored["ref_logp"], jax.device_get(base_scorer({"policy": base}, None, rows))["logp"],
                               atol=1e-6)
    assert np.abs(scored["ref_logp"] - scored["logp"]).max() > 1e-3
    adv = np.where(rows["loss_mask"] > 0, np.random.default_rng(9).normal(size=rows["loss_mask"].shape), 0)
    batch = {**rows, "old_logp": scored["logp"], "ref_logp": scored["ref_logp"], "advantages": adv.astype(np.float32),
             "old_values": scored["values"], "returns": np.ones_like(scored["values"])}
    batch = {k: np.asarray(v)[None] for k, v in batch.items()}
    state = new_train_state(model, tx, full, jax.random.PRNGKey(0))
    # Adam state: policy adapters and the value head only
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(trainable_of(model, full)))
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1e-2), PolicyGradient(model, loss_cfg)))
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["ratio"]), 1.0, atol=1e-5)
    new = jax.device_get(state.params)
    assert max_abs_diff(base_params(new["policy"]), base) == 0.0
    assert max_abs_diff(adapter_params(new["policy"]), adapter_params(full["policy"])) > 0
    assert max_abs_diff(new["value"], full["value"]) > 0
    # abstract state and shardings agree with what new_train_state builds
    abstract = abstract_train_state(model, tx)
    sh = state_shardings(abstract, model.param_shardings(mesh), tx, mesh, model=model)
    assert jax.tree.structure(sh.opt_state) == jax.tree.structure(state.opt_state)


def test_adapters_save_and_load_alone(tmp_path):
    _, base, lm, params = lora_setup(random_adapters=True)
    save_adapters(params, lm.lora, str(tmp_path / "adapters"))
    files = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert files == ["adapters.safetensors", "lora_config.json"]
    fresh = lm.add_adapters(base, jax.random.PRNGKey(5))
    loaded, cfg = load_adapters(str(tmp_path / "adapters"), fresh)
    assert cfg == lm.lora
    assert max_abs_diff(loaded, params) == 0.0
    other = LM(tiny_config(), LoRAConfig(rank=2)).add_adapters(base, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(str(tmp_path / "adapters"), other)
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        load_adapters(str(tmp_path / "nothing"), fresh)


def test_the_sampler_decodes_a_lora_policy_like_its_merged_weights():
    """RL rollouts of a LoRA policy: the KV-cache path (prefill + decode) applies the adapters like the training
    forward, so sampling the adapter model equals sampling its merged weights."""
    from jaxpost.rollout import Sampler, SamplingConfig

    base_lm, _, lm, params = lora_setup(random_adapters=True)
    prompts = [[5, 9, 17, 3], [7, 7, 40, 2, 11, 12]]
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=2)
    mesh = single_device_mesh()
    ro = Sampler(lm, mesh, min_prompt_bucket=8).generate(params, prompts, cfg, seed=3)
    ro_m = Sampler(base_lm, mesh, min_prompt_bucket=8).generate(merge_adapters(params, lm.lora), prompts, cfg, seed=3)
    np.testing.assert_array_equal(ro.tokens, ro_m.tokens)
    np.testing.assert_allclose(ro.logprobs, ro_m.logprobs, atol=2e-5)
