"""Decoder params as an Orbax checkpoint directory: what `tools/convert_hf.py to-orbax` writes and recipes can load.

Layout of a params directory:

    model_config.json   the `ModelConfig` (`dataclasses.asdict`)
    checkpoints/0/      a `jaxpost.checkpoint.Checkpointer` checkpoint whose state is {"params": params}, so
                        `Checkpointer.restore_params` (and the recipes' `load_params(lm, mesh, directory)`) read it
    hf_config.json      the source Hugging Face `config.json`, when the params came from one

Restoring goes through abstract targets that carry shardings: the params land directly in their layout on any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from jax.sharding import SingleDeviceSharding

from jaxpost.config import ModelConfig
from jaxpost.models.hf import Pretrained, lm_for

MODEL_CONFIG = "model_config.json"
HF_CONFIG = "hf_config.json"
CHECKPOINTS = "checkpoints"


def save_orbax_params(params: dict, cfg: ModelConfig, directory: str | os.PathLike, *,
                      hf_config: dict | None = None) -> None:
    """Writes `params` (decoder params of `cfg`, any sharding) and their config into `directory`. Every process must
    call it (Orbax writes from all of them); the JSON files are written by process 0."""
    from jaxpost.checkpoint import Checkpointer

    directory = os.fspath(directory)
    ckpt = Checkpointer(os.path.join(directory, CHECKPOINTS), keep=1, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{directory}/{CHECKPOINTS} already holds a checkpoint: write into a new directory")
        ckpt.save(0, {"params": params}, meta={"model_config": dataclasses.asdict(cfg)}, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    if jax.process_index() == 0:
        with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        if hf_config is not None:
            with open(os.path.join(directory, HF_CONFIG), "w") as f:
                json.dump(hf_config, f, indent=2, sort_keys=True)


def load_orbax_params(directory: str | os.PathLike, mesh=None) -> tuple[Pretrained, ModelConfig]:
    """(model, config) from a directory written by `save_orbax_params`: the params restored directly in their
    sharded layout on `mesh` (without, on the first device); the model carries `hf_config.json` when there is one."""
    from jaxpost.checkpoint import Checkpointer

    directory = os.fspath(directory)
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG} (not a params directory written by "
                                f"save_orbax_params or tools/convert_hf.py to-orbax)")
    with open(path) as f:
        cfg = ModelConfig(**json.load(f))
    lm = lm_for(cfg)
    if mesh is not None:
        shardings = lm.param_shardings(mesh)
    else:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, lm.abstract_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lm.abstract_params,
                            shardings)
    ckpt = Checkpointer(os.path.join(directory, CHECKPOINTS), async_save=False)
    try:
        params = ckpt.restore_params(None, abstract)
    finally:
        ckpt.close()
    hf_config = None
    if os.path.exists(os.path.join(directory, HF_CONFIG)):
        with open(os.path.join(directory, HF_CONFIG)) as f:
            hf_config = json.load(f)
    return Pretrained(lm, params, hf_config), cfg
