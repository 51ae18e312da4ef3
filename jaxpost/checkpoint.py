"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG), data-iterator state and metadata.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves only an ignored temporary directory and the previous complete checkpoint is the latest.
Restoring takes abstract targets that carry shardings, which is how a checkpoint lands on a different mesh layout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Starts an (asynchronous) save of `state` and JSON-serialisable iterator state and metadata."""
        items = {"state": ocp.args.StandardSave(state),
                 "data": ocp.args.JsonSave(data_state or {}),
                 "meta": ocp.args.JsonSave(meta or {})}
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step` (default: the latest). `abstract_state` is a tree of
        `jax.ShapeDtypeStruct`s with shardings: the arrays come back in that layout, whatever mesh saved them."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the params of a saved train state (e.g. to start DPO or RL from an SFT run)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        path = os.path.join(self.directory, str(step), "state")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                    abstract_params)
        out = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                              restore_args={"params": restore_args}, partial_restore=True))
        return out["params"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
