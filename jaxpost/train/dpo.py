"""The preference-optimisation objective (the DPO family, SimPO/AlphaPO, CPO, ORPO, weighted mixtures of them as
in MPO; LD-DPO's length desensitisation and WPO's weighting) for `jaxpost.train.step.make_step`.

Batches hold chosen and rejected sequences in one array, interleaved: row 2i is pair i's chosen sequence and row 2i+1
its rejected one (`jaxpost.data.preference`), so one forward pass scores both and any split of rows into
micro-batches or devices keeps pairs together. Per-sequence log-probs are sums of `token_logprobs` over each row's
completion tokens (loss_mask).

The reference policy's log-probs come either from a frozen reference model held sharded beside the policy
(`reference="model"`: one extra forward per step, a second copy of the weights), or precomputed once in a pass over
the data (`reference="precomputed"`: the batch carries `ref_logps`, and the step needs neither the reference
weights nor their forward), or not at all for the reference-free losses (`reference="none"`: simpo, orpo).

Normalisation: the loss is sum over pairs of loss_B / (number of real pairs in the whole batch), so that gradient
accumulation over micro-batches and data parallelism give exactly the full-batch mean (except for the losses of
`BATCH_LEVEL_DPO_LOSSES`, which sort within each micro-batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS, device_put_batch, process_rows, rows_sharding
from jaxpost.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES, ld_sequence_logps, wpo_weights
from jaxpost.train.step import Context, Objective, row_layout

REFERENCES = ("model", "precomputed", "none")
#: Over which tokens ORPO's NLL term runs: the chosen completion (the paper) or the whole chosen row, prompt
#: included (TRL's ORPOTrainer).
ORPO_NLL = ("completion", "sequence")
#: How the NLL terms on the chosen response average: each sequence's token mean, or TRL's token mean over the batch.
NLL_MEANS = ("sequence", "batch")


def token_logps(lm, params, mb: dict, *, logprobs_impl: str = "auto", adapters: bool = True):
    """Per-token log-probs [R, T] of rows' targets."""
    hidden_RTD = lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], adapters=adapters)
    return lm.token_logprobs(params, hidden_RTD, mb["targets"], impl=logprobs_impl).logp, hidden_RTD


def pair_sums(logp_RT, mask_RT, ld_alpha: float | None = None):
    """Summed completion log-probs [R] of interleaved pair rows: plain sums, or with `ld_alpha` LD-DPO's
    length-desensitised sums (`jaxpost.losses.ld_sequence_logps`; rows 2i and 2i+1 are one pair)."""
    mask_RT = mask_RT.astype(jnp.float32)
    if ld_alpha is None:
        return jnp.sum(logp_RT * mask_RT, axis=-1)
    (lc, lr), (mc, mr) = split_pairs(logp_RT), split_pairs(mask_RT)
    c_B, r_B = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=ld_alpha)
    return jnp.stack([c_B, r_B], axis=1).reshape(-1)


def sequence_logps(lm, params, mb: dict, *, logprobs_impl: str = "auto", adapters: bool = True,
                   ld_alpha: float | None = None):
    """(summed completion log-probs [R], completion token counts [R]) of rows [R, T] (`pair_sums`: with
    `ld_alpha`, rows are interleaved pairs and the sums length-desensitised)."""
    logp_RT, _ = token_logps(lm, params, mb, logprobs_impl=logprobs_impl, adapters=adapters)
    mask_RT = mb["loss_mask"].astype(jnp.float32)
    return pair_sums(logp_RT, mask_RT, ld_alpha), jnp.sum(mask_RT, axis=-1)


def reference_sequence_logps(lm, params, ref_params, rows: dict, *, logprobs_impl: str = "auto",
                             ld_alpha: float | None = None):
    """Summed completion log-probs [R] of rows under the held reference: `ref_params`, or, when None, a LoRA
    model's own base (its adapters disabled on `params`: no second copy of the weights)."""
    if ref_params is not None:
        return sequence_logps(lm, ref_params, rows, logprobs_impl=logprobs_impl, ld_alpha=ld_alpha)[0]
    if getattr(lm, "lora", None) is None:
        raise ValueError("reference='model' needs ref_params (or a LoRA model: adapters disabled)")
    return sequence_logps(lm, params, rows, logprobs_impl=logprobs_impl, adapters=False, ld_alpha=ld_alpha)[0]


def reference_param_shardings(lm, reference: str, param_shardings):
    """In-shardings of a step's `ref_params`: the policy's with a held reference model, else None (precomputed, none,
    or a LoRA model's base)."""
    return param_shardings if reference == "model" and getattr(lm, "lora", None) is None else None


def split_pairs(x_R):
    """Interleaved rows [2B, ...] -> (chosen [B, ...], rejected [B, ...])."""
    x_B2 = x_R.reshape(x_R.shape[0] // 2, 2, *x_R.shape[1:])
    return x_B2[:, 0], x_B2[:, 1]


def get_preference_loss(name: str, reference: str) -> Callable:
    """The registered loss `name`, checked against the reference mode it needs."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if name in REFERENCE_FREE_LOSSES:
        if reference != "none":
            raise ValueError(f"loss {name!r} is reference-free: set reference='none', got {reference!r}")
        return REFERENCE_FREE_LOSSES[name]
    if name in DPO_LOSSES:
        if reference == "none":
            raise ValueError(f"loss {name!r} needs reference log-probs: reference='model' or 'precomputed'")
        return DPO_LOSSES[name]
    raise ValueError(f"unknown preference loss {name!r}; known: {sorted(DPO_LOSSES) + sorted(REFERENCE_FREE_LOSSES)}")


def loss_names(loss: str | Sequence[str]) -> tuple[str, ...]:
    """The loss names of a name, a comma-separated list of names ("sigmoid,bco_pair,sft", the command line's form)
    or a sequence of names."""
    return tuple(n.strip() for n in loss.split(",")) if isinstance(loss, str) else tuple(loss)


def preference_terms(loss: str | Sequence[str], loss_weights: Sequence[float] | None,
                     reference: str) -> list[tuple[str, float, Callable | None]]:
    """[(name, weight, fn or None for "sft")] of a loss name or a weighted list (`loss_names`; MPO: TRL's
    `loss_type=[...]` with `loss_weights`; "sft" is the NLL of the chosen response, a term of its own)."""
    names = loss_names(loss)
    if not names:
        raise ValueError("preference loss: give at least one loss name")
    weights = (1.0,) * len(names) if not loss_weights else tuple(float(w) for w in loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} losses {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"preference loss: a name appears twice in {list(names)}")
    if all(n == "sft" for n in names):
        raise ValueError("preference loss: 'sft' alone is SFT; add a preference loss to the list")
    return [(n, w, None if n == "sft" else get_preference_loss(n, reference)) for n, w in zip(names, weights)]


def masked_sums(metrics: dict, mask_B) -> dict:
    """Sums over the real units (mask_B) of a loss's per-unit [B] metrics (scalars are left out)."""
    return {k: jnp.sum(v * mask_B) for k, v in metrics.items() if jnp.ndim(v) == 1}


class Preference(Objective):
    """A pairwise preference loss on interleaved chosen/rejected rows. The step is `step(state, ref_params, batch)`.

    loss: a `DPO_LOSSES` or `REFERENCE_FREE_LOSSES` name, or a list of names summed with `loss_weights` (MPO:
    e.g. ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0]; "sft" is the chosen response's NLL, each sequence's
    token mean); `loss_kwargs`: the hyperparameters, each term taking those its signature has.
    ld_alpha: LD-DPO's length desensitisation of the policy's and the reference's log-probs (None: off).
    use_weighting: WPO, each term of each pair times w(chosen) w(rejected) (`jaxpost.losses.wpo_weights`; not the
    NLL term, which TRL 1.16 cannot combine with it).
    The NLL of the chosen response (the "sft" term, `loss_kwargs["sft_weight"]`, ORPO's, CPO's) is always on the
    plain summed log-probs, never LD-DPO's desensitised ones; sft_weight and the "sft" terms are added once.
    orpo_nll: "completion" (the paper) or "sequence" (TRL: the chosen row's prompt and completion) for orpo.
    nll_mean: "sequence" (each chosen response's token mean, the default) or "batch" (TRL's token mean over the
    whole batch's chosen tokens: `prepare` computes the denominator from the batch's masks).

    batch: ROW_KEYS as [A, 2b, T] (A micro-batches of b interleaved pairs), `pair_mask` [A, b] (0 for padding pairs)
    and, with reference="precomputed", `ref_logps` [A, 2b] (computed with the same ld_alpha). ref_params: the frozen
    reference params with reference="model", else None; for a LoRA model with reference="model", None means the
    policy's own base model with its adapters disabled (no second copy of the weights). Metrics are means over the
    real pairs of the whole batch (the first preference term's).
    """

    unit = "pair"
    with_reference = True

    def __init__(self, lm, *, loss: str | Sequence[str], loss_kwargs: dict | None = None,
                 loss_weights: Sequence[float] | None = None, reference: str = "model", logprobs_impl: str = "auto",
                 ld_alpha: float | None = None, use_weighting: bool = False, orpo_nll: str = "completion",
                 nll_mean: str = "sequence"):
        self.terms = preference_terms(loss, loss_weights, reference)
        if orpo_nll not in ORPO_NLL:
            raise ValueError(f"orpo_nll must be one of {ORPO_NLL}, got {orpo_nll!r}")
        if nll_mean not in NLL_MEANS:
            raise ValueError(f"nll_mean must be one of {NLL_MEANS}, got {nll_mean!r}")
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1] (or None), got {ld_alpha}")
        kwargs = dict(loss_kwargs or {})
        # the NLL on the chosen response is this objective's own term, on the plain (never length-desensitised)
        # log-probs: sft_weight is taken out of the losses' arguments and applied once
        self.sft_weight = float(kwargs.pop("sft_weight", 0.0))
        self.sft_denominator = kwargs.pop("sft_denominator", None)  # a fixed NLL denominator (else nll_mean's)
        self.term_kwargs = {}
        for n, _, fn in self.terms:
            if fn is not None:
                params = inspect.signature(fn).parameters
                self.term_kwargs[n] = {k: v for k, v in kwargs.items() if k in params}
                if "sft_weight" in params:
                    self.term_kwargs[n]["sft_weight"] = 0.0
        self.lm, self.reference, self.logprobs_impl = lm, reference, logprobs_impl
        self.ld_alpha, self.use_weighting, self.orpo_nll, self.nll_mean = ld_alpha, use_weighting, orpo_nll, nll_mean
        self.orpo = any(n == "orpo" for n, _, _ in self.terms)

    def layout(self):
        out = {**row_layout(ROW_KEYS, rows_per_unit=2), "pair_mask": (1, 2)}
        if self.reference == "precomputed":
            out["ref_logps"] = (2, 2)
        return out

    def denominator(self, batch):
        return jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

    def reference_shardings(self, param_shardings):
        return reference_param_shardings(self.lm, self.reference, param_shardings)

    def _reference_logps(self, params, ref_params, mb):
        if self.reference == "precomputed":
            return mb["ref_logps"]
        return reference_sequence_logps(self.lm, params, ref_params, mb, logprobs_impl=self.logprobs_impl,
                                        ld_alpha=self.ld_alpha)

    def _nll_mask(self, mb):
        """[R, T] mask of the tokens the chosen response's NLL covers: its completion, or (ORPO with
        orpo_nll="sequence", TRL's form) the whole row, prompt included."""
        if self.orpo and self.orpo_nll == "sequence":
            return (mb["segment_ids"] > 0).astype(jnp.float32)
        return mb["loss_mask"].astype(jnp.float32)

    def prepare(self, params, ref_params, batch):
        """With nll_mean="batch": the NLL's denominator, (NLL tokens of the whole batch's real chosen responses) /
        (real pairs), so that each pair's -logp / d averages to TRL's batch token mean (a statistic of the masks)."""
        if self.nll_mean != "batch":
            return None
        mb = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
        pair_B = mb["pair_mask"].astype(jnp.float32)
        tokens_B = split_pairs(jnp.sum(self._nll_mask(mb), axis=-1))[0]
        return jnp.sum(tokens_B * pair_B) / jnp.maximum(jnp.sum(pair_B), 1.0)

    def loss(self, params, mb, ctx: Context):
        logp_RT, hidden_RTD = token_logps(self.lm, params, mb, logprobs_impl=self.logprobs_impl)
        mask_RT = mb["loss_mask"].astype(jnp.float32)
        logps_R, tokens_R = pair_sums(logp_RT, mask_RT, self.ld_alpha), jnp.sum(mask_RT, axis=-1)
        (c_B, r_B), (tc_B, tr_B) = split_pairs(logps_R), split_pairs(tokens_R)
        nll_mask_RT = self._nll_mask(mb)
        nll_logps_B = split_pairs(jnp.sum(logp_RT * nll_mask_RT, axis=-1))[0]
        nll_tokens_B = split_pairs(jnp.sum(nll_mask_RT, axis=-1))[0]
        fixed_den = ctx.stats if ctx.stats is not None else self.sft_denominator
        nll_B = -nll_logps_B / jnp.maximum(nll_tokens_B if fixed_den is None else fixed_den, 1.0)
        data = {"chosen_tokens_B": tc_B, "rejected_tokens_B": tr_B, "nll_logps_B": nll_logps_B,
                "nll_tokens_B": nll_tokens_B, "sft_denominator": fixed_den}
        args = (c_B, r_B)
        if self.reference != "none":
            ref_R = jax.lax.stop_gradient(self._reference_logps(params, ctx.ref_params, mb).astype(jnp.float32))
            args = (c_B, r_B, *split_pairs(ref_R))
        weight_B = None
        if self.use_weighting:
            lss_RT = self.lm.log_sum_sq_probs(params, hidden_RTD)
            w_R = wpo_weights(logp_RT, lss_RT, mask_RT)
            w_c, w_r = split_pairs(w_R)
            weight_B = w_c * w_r
        total_B, metrics, nll_weight = 0.0, None, self.sft_weight
        for name, weight, fn in self.terms:
            if fn is None:  # "sft"
                nll_weight += weight
                continue
            fn_data = {k: v for k, v in data.items() if k in inspect.signature(fn).parameters}
            term_B, m = fn(*args, **fn_data, **self.term_kwargs[name])
            metrics = m if metrics is None else metrics
            if weight_B is not None:
                term_B = term_B * weight_B
            total_B = total_B + weight * term_B
        m_B = mb["pair_mask"].astype(jnp.float32)
        sums = masked_sums(metrics, m_B)
        if nll_weight:
            sums["preference_loss"] = jnp.sum(jax.lax.stop_gradient(total_B) * m_B)
            sums["sft_loss"] = jnp.sum(jax.lax.stop_gradient(nll_B) * m_B)
            total_B = total_B + nll_weight * nll_B
        sums["chosen_tokens"] = jnp.sum(tc_B * m_B)
        sums["rejected_tokens"] = jnp.sum(tr_B * m_B)
        if weight_B is not None:
            sums["wpo_weight"] = jnp.sum(weight_B * m_B)
        return jnp.sum(total_B * m_B) / ctx.denom, sums

    def metrics(self, loss, sums, ctx: Context):
        return {"loss": loss, "pairs": ctx.denom, **{k: v / ctx.denom for k, v in sums.items()}}


def make_reference_logps(lm, mesh, param_shardings, *, rows: int, logprobs_impl: str = "auto",
                         ld_alpha: float | None = None):
    """A jitted `f(params, batch) -> logps [rows]` over one host batch of ROW_KEYS [rows, T]: the pass that
    precomputes the reference log-probs (reference="precomputed"; with `ld_alpha`, of interleaved pairs,
    length-desensitised like the policy's). `rows` are this process's: in a multi-process run each process passes
    its own rows of the global batch and gets their log-probs back."""
    out_sh = rows_sharding(mesh, rows * jax.process_count(), 1, rows_axis=0)
    in_sh = {k: rows_sharding(mesh, rows * jax.process_count(), 2, rows_axis=0) for k in ROW_KEYS}

    def f(params, batch):
        return sequence_logps(lm, params, {k: batch[k] for k in ROW_KEYS}, logprobs_impl=logprobs_impl,
                              ld_alpha=ld_alpha)[0]

    jitted = jax.jit(f, in_shardings=(param_shardings, in_sh), out_shardings=out_sh)

    def run(params, batch):
        with jax.set_mesh(mesh):
            return process_rows(jitted(params, device_put_batch(batch, in_sh, rows_axis=0)))

    return run
