"""Policy-gradient RL: the policy (+ value) model, the pure sharded update step, the scoring pass and advantages.

Batch layout: one sample per row (prompt + completion, `jaxpost.rollout.rollout_batch` with pack=False), so a row is
a sequence for the sequence-level aggregations and GSPO. The update step reads [A, b, T] micro-batches of

    inputs, targets, loss_mask, segment_ids, positions   the rows (loss_mask 1 on completion tokens)
    old_logp      float32  log-probs of the sampled tokens under the policy that sampled them (the scoring pass)
    advantages    float32  per token (sequence-level estimators broadcast over the completion)
    ref_logp      float32  under the reference policy (only with a KL term in the loss)
    is_weight     float32  the rollout-correction weight pi_old / pi_sampler, truncated or masked (only with
                           `RLLossConfig.rollout_correction`; `jaxpost.losses.rollout_correction`)
    old_values, returns    float32  (only with a value model: the scoring pass's values and GAE's returns)

Normalisation: the loss of a step is sum over its micro-batches and devices of numerator / D, with D the global
denominator of the aggregation mode (`jaxpost.losses.loss_denominator` of the whole step's mask, computed once
before the first micro-batch), so the loss and gradient are the full-batch ones however the batch is split.

Value model (PPO). `PolicyModel(lm, value=...)`: "none"; "head" (a scalar head on the policy's own final hidden
states: one forward gives log-probs and values, the value loss also trains the shared trunk, weighted by vf_coef);
"critic" (a separate decoder + head, initialised from the policy's weights, as in verl and TRL < 1.0's PPO). Params are
`{"policy": <decoder params>}` plus `{"value": {"head": {w, b}}}` or `{"value": {"lm": ..., "head": {w, b}}}`; one
optimizer updates both (their gradients are separate for "critic"). V(s_t) is read at the position whose target is
token t, i.e. before token t is emitted, aligned with log-probs and masks.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.batch import ROW_KEYS, rows_sharding
from jaxpost.config import AdvantageConfig, RLLossConfig, check_value_mode
from jaxpost.losses import (ADVANTAGE_ESTIMATORS, aggregate_loss, broadcast_to_tokens, entropy_bonus,
                            get_kl_estimator, get_policy_loss, kl_loss, kl_penalty_sequence_rewards,
                            kl_penalty_token_rewards, loss_denominator, masked_whiten, metric_means,
                            sequence_to_token_rewards, value_loss)
from jaxpost.models.heads import ScalarHeadLM
from jaxpost.models.lora import base_params
from jaxpost.sharding import replicated
from jaxpost.train.step import Context, Objective, row_layout


class PolicyModel:
    """The params tree an RL state trains: the policy decoder and, for PPO, a value head or a separate critic. Has
    the interface train states need (`abstract_params`, `logical_axes`, `param_shardings`)."""

    def __init__(self, lm, *, value: str = "none"):
        check_value_mode(value)
        self.lm, self.value = lm, value
        self.abstract_params = {"policy": lm.abstract_params}
        self.logical_axes = {"policy": lm.logical_axes}
        if value != "none":
            self.head = ScalarHeadLM(lm.cfg)
            keys = ("head",) if value == "head" else ("lm", "head")
            self.abstract_params["value"] = {k: self.head.abstract_params[k] for k in keys}
            self.logical_axes["value"] = {k: self.head.logical_axes[k] for k in keys}

    def trainable(self, params):
        """The policy's trainable params (its LoRA adapters, or all of it) and the whole value model."""
        if getattr(self.lm, "lora", None) is None:
            return params
        return {**params, "policy": self.lm.trainable(params["policy"])}

    def with_trainable(self, params, trainable):
        if getattr(self.lm, "lora", None) is None:
            return trainable
        return {**trainable, "policy": self.lm.with_trainable(params["policy"], trainable["policy"])}

    def param_shardings(self, mesh):
        out = {"policy": self.lm.param_shardings(mesh)}
        if self.value != "none":
            head = self.head.param_shardings(mesh)
            out["value"] = {k: head[k] for k in self.abstract_params["value"]}
        return out

    def from_policy(self, policy_params, key):
        """Params from trained decoder params (e.g. the SFT checkpoint): the critic starts as a copy of the policy
        (a real copy: the train state is donated, and two leaves may not share a buffer; of the base model when the
        policy has LoRA adapters: the critic trains fully); the head at 0."""
        params = {"policy": policy_params}
        if self.value != "none":
            params["value"] = {"head": self.head.init_head(key)}
            if self.value == "critic":
                params["value"]["lm"] = jax.tree.map(jnp.copy, base_params(policy_params))
        return params

    def values(self, params, mb: dict, hidden_BTD=None):
        """V [B, T] in float32: the head on the policy's hidden states ("head") or on the critic's ("critic")."""
        v = params["value"]
        if self.value == "critic":
            hidden_BTD = self.head.lm.hidden(v["lm"], mb["inputs"], mb["positions"], mb["segment_ids"])
        w_D = v["head"]["w"]
        return jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), w_D) + v["head"]["b"][0]


def batch_keys(model: PolicyModel, loss_cfg: RLLossConfig) -> tuple[str, ...]:
    """The arrays of an update batch (module docstring)."""
    keys = ROW_KEYS + ("old_logp", "advantages")
    if loss_cfg.kl_in_loss:
        keys += ("ref_logp",)
    if loss_cfg.rollout_correction != "none":
        keys += ("is_weight",)
    if model.value != "none":
        keys += ("old_values", "returns")
    return keys


class PolicyGradient(Objective):
    """The RL update (module docstring) on [A, b, T] micro-batches of one sample per row.

    The policy loss (`loss_cfg.policy_loss` with its registry hyperparameters), aggregated by
    `loss_cfg.aggregation` over the global denominator of the whole step's mask; plus a KL term to the reference,
    an entropy bonus and the value loss when configured. Log-probs are under softmax(logits / temperature), the
    sampler's. Metrics are means over the step's response tokens (or sequences, for per-sequence metrics): `loss`,
    `pg_loss`, `vf_loss` (their aggregated values), `clip_frac` (+ low/high/dual), `ratio`, `approx_kl` (k3 of
    KL(old || new)), `entropy`, `kl_ref` (the loss's KL estimate, with a KL term), value metrics, `tokens`.
    """

    unit = "row"

    def __init__(self, model: PolicyModel, loss_cfg: RLLossConfig, *, temperature: float = 1.0,
                 logprobs_impl: str = "auto"):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.cfg, self.temperature, self.logprobs_impl = model, loss_cfg, temperature, logprobs_impl
        self.policy_loss = get_policy_loss(loss_cfg.policy_loss)
        self.policy_kwargs = loss_cfg.policy_kwargs()

    def layout(self):
        return row_layout(batch_keys(self.model, self.cfg))

    def denominator(self, batch):
        mask = batch["loss_mask"].astype(jnp.float32)
        return loss_denominator(mask.reshape(-1, mask.shape[-1]), mode=self.cfg.aggregation,
                                max_length=self.cfg.max_length or None)

    def loss(self, params, mb, ctx: Context):
        cfg, lm, model, denom = self.cfg, self.model.lm, self.model, ctx.denom
        h_BTD = lm.hidden(params["policy"], mb["inputs"], mb["positions"], mb["segment_ids"])
        out = lm.token_logprobs(params["policy"], h_BTD, mb["targets"], temperature=self.temperature,
                                return_entropy=True, impl=self.logprobs_impl)
        m_BT = mb["loss_mask"].astype(jnp.float32)
        loss_BT, metrics = self.policy_loss(out.logp, mb["old_logp"], mb["advantages"], m_BT,
                                            is_weight_BT=mb.get("is_weight"), **self.policy_kwargs)
        metrics = dict(metrics)
        n = jnp.sum(m_BT)
        metrics["entropy"] = (jnp.sum(jax.lax.stop_gradient(out.entropy) * m_BT), n)
        pg = aggregate_loss(loss_BT, m_BT, mode=cfg.aggregation, denominator=denom)
        if cfg.kl_in_loss:
            kl_BT = kl_loss(out.logp, mb["ref_logp"], m_BT, beta=1.0, estimator=cfg.kl_estimator,
                            old_logp_BT=mb["old_logp"] if cfg.kl_importance_weighted else None)
            metrics["kl_ref"] = (jnp.sum(jax.lax.stop_gradient(kl_BT)), n)
            loss_BT = loss_BT + cfg.kl_coef * kl_BT
        if cfg.entropy_coef > 0:
            loss_BT = loss_BT + entropy_bonus(out.entropy, m_BT, coef=cfg.entropy_coef)
        loss = aggregate_loss(loss_BT, m_BT, mode=cfg.aggregation, denominator=denom)
        parts = {"pg_loss": pg}
        if model.value != "none":
            v_BT = model.values(params, mb, h_BTD)
            vl_BT, vm = value_loss(v_BT, mb["old_values"], mb["returns"], m_BT, clip_eps=cfg.vf_clip)
            metrics.update(vm)
            metrics["values"] = (jnp.sum(jax.lax.stop_gradient(v_BT) * m_BT), n)
            vf = aggregate_loss(vl_BT, m_BT, mode=cfg.aggregation, denominator=denom)
            parts["vf_loss"] = vf
            loss = loss + cfg.vf_coef * vf
        return loss, (metrics, parts, n)

    def metrics(self, loss, sums, ctx: Context):
        token_sums, parts, tokens = sums
        return {"loss": loss, **parts, **metric_means(token_sums), "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- scoring pass


def make_rl_scorer(model: PolicyModel, mesh, param_shardings, *, rows: int, temperature: float = 1.0,
                   with_ref: bool = False, policy: bool = True, logprobs_impl: str = "auto"):
    """A jitted forward-only pass over `rows` rows [rows, T] of a rollout batch:
    `score(params, ref_params, batch) -> {"logp", "entropy"[, "ref_logp"][, "values"]}`, each float32 [rows, T]:
    the old policy's log-probs (recomputed by the trainer's own forward and log-prob core, so the first PPO epoch
    has ratio 1 exactly up to float rounding), its entropy, the reference's log-probs and the value model's values.
    `policy=False` leaves out the policy's log-probs and entropy (old log-probs taken from the sampler): only the
    reference and the value model are run.
    `ref_params` are decoder params sharded like the policy's (None without a reference, or, for a LoRA policy,
    when the reference is its base model: the adapters disabled on the same arrays)."""
    lm = model.lm
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in ROW_KEYS}
    out_sh = replicated(mesh)  # read on the host by every process (the RL loop holds the whole batch on each)

    if not (policy or with_ref or model.value != "none"):
        raise ValueError("make_rl_scorer: nothing to score (policy=False, no reference, no value model)")

    def f(params, ref_params, b):
        res, h_BTD = {}, None
        if policy or model.value == "head":
            h_BTD = lm.hidden(params["policy"], b["inputs"], b["positions"], b["segment_ids"])
        if policy:
            out = lm.token_logprobs(params["policy"], h_BTD, b["targets"], temperature=temperature,
                                    return_entropy=True, impl=logprobs_impl)
            res.update(logp=out.logp, entropy=out.entropy)
        if with_ref and ref_params is None:  # a LoRA policy's base model
            h_ref = lm.hidden(params["policy"], b["inputs"], b["positions"], b["segment_ids"], adapters=False)
            res["ref_logp"] = lm.token_logprobs(params["policy"], h_ref, b["targets"], temperature=temperature,
                                                impl=logprobs_impl).logp
        elif with_ref:
            h_ref = lm.hidden(ref_params, b["inputs"], b["positions"], b["segment_ids"])
            res["ref_logp"] = lm.token_logprobs(ref_params, h_ref, b["targets"], temperature=temperature,
                                                impl=logprobs_impl).logp
        if model.value != "none":
            res["values"] = model.values(params, b, h_BTD)
        return {k: v.astype(jnp.float32) for k, v in res.items()}

    base_ref = with_ref and getattr(lm, "lora", None) is not None
    ref_sh = param_shardings["policy"] if with_ref and not base_ref else None
    jitted = jax.jit(f, in_shardings=(param_shardings, ref_sh, in_sh), out_shardings=out_sh)

    def run(params, ref_params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, ref_params if with_ref and not base_ref else None,
                          {k: jax.device_put(np.asarray(batch[k]), in_sh[k]) for k in ROW_KEYS})

    run.jitted = jitted
    return run


def make_teacher_scorer(teacher_lm, mesh, teacher_shardings, *, rows: int, temperature: float = 1.0,
                        logprobs_impl: str = "auto"):
    """A jitted forward-only pass of a teacher decoder (any width and depth, the policy's tokenizer) over `rows`
    rows [rows, T] of a rollout batch: `score(teacher_params, batch) -> teacher log-probs` float32 [rows, T] of the
    sampled tokens at `temperature` (the rollout's, as the policy's old log-probs): on-policy distillation's dense
    per-token reward `jaxpost.losses.on_policy_distill_advantages` reads them."""
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in ROW_KEYS}

    def f(tparams, b):
        h_BTD = teacher_lm.hidden(tparams, b["inputs"], b["positions"], b["segment_ids"])
        return teacher_lm.token_logprobs(tparams, h_BTD, b["targets"], temperature=temperature,
                                         impl=logprobs_impl).logp.astype(jnp.float32)

    jitted = jax.jit(f, in_shardings=(teacher_shardings, in_sh), out_shardings=replicated(mesh))

    def run(teacher_params, batch):  # every process reads the whole result (as make_rl_scorer's)
        with jax.set_mesh(mesh):
            return jitted(teacher_params, {k: jax.device_put(np.asarray(batch[k]), in_sh[k]) for k in ROW_KEYS})

    return run


# ---------------------------------------------------------------------------------------------------- advantages


def compute_advantages(rewards_B, mask_BT, row_mask_B, old_logp_BT=None, ref_logp_BT=None, values_BT=None, *,
                       cfg: AdvantageConfig, group_size: int, kl_coef: float = 0.0, kl_estimator: str = "k1"):
    """(advantages [B, T], returns [B, T] or None, rewards used [B]) of a whole rollout batch (groups of
    `group_size` consecutive rows; `row_mask_B` 0 on padding rows). With kl_coef > 0 the KL to the reference
    (`kl_estimator` of old vs ref log-probs) is subtracted from the reward first: per sequence for the
    sequence-level estimators, per token for reinforce_pp / gae. The negative advantages are then multiplied by
    `cfg.negative_scale`. Pure; jit it with the keywords static."""
    adv_BT, ret_BT, r_B = _advantages(rewards_B, mask_BT, row_mask_B, old_logp_BT, ref_logp_BT, values_BT, cfg=cfg,
                                      group_size=group_size, kl_coef=kl_coef, kl_estimator=kl_estimator)
    if cfg.negative_scale != 1.0:
        adv_BT = jnp.where(adv_BT < 0, adv_BT * cfg.negative_scale, adv_BT)
    return adv_BT, ret_BT, r_B


def _advantages(rewards_B, mask_BT, row_mask_B, old_logp_BT, ref_logp_BT, values_BT, *, cfg: AdvantageConfig,
                group_size: int, kl_coef: float, kl_estimator: str):
    m_BT = mask_BT.astype(jnp.float32) * row_mask_B.astype(jnp.float32)[:, None]
    r_B = rewards_B.astype(jnp.float32)
    kl_BT = None
    if kl_coef > 0:
        kl_BT = get_kl_estimator(kl_estimator)(old_logp_BT, ref_logp_BT, m_BT)
    est = ADVANTAGE_ESTIMATORS.get(cfg.estimator)
    if cfg.sequence_level:
        if kl_BT is not None:
            r_B = kl_penalty_sequence_rewards(r_B, kl_BT, m_BT, beta=kl_coef)
        adv_B = est(r_B, group_size=group_size, mask_B=row_mask_B, **cfg.kwargs())
        return broadcast_to_tokens(adv_B, m_BT), None, r_B
    tok_BT = sequence_to_token_rewards(r_B, m_BT)
    if kl_BT is not None:
        tok_BT = kl_penalty_token_rewards(tok_BT, kl_BT, m_BT, beta=kl_coef)
    if cfg.needs_values:
        adv_BT, ret_BT = est(tok_BT, m_BT, values_BT=values_BT, **cfg.kwargs())
        if cfg.whiten:
            adv_BT = masked_whiten(adv_BT, m_BT, eps=cfg.whiten_eps, ddof=cfg.whiten_ddof)
        return adv_BT, ret_BT, r_B
    adv_BT, ret_BT = est(tok_BT, m_BT, **cfg.kwargs())
    return adv_BT, ret_BT, r_B
