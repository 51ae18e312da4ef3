"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG), data-iterator state and metadata.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves only an ignored temporary directory and the previous complete checkpoint is the latest.
Restoring takes abstract targets that carry shardings, which is how a checkpoint lands on a different mesh layout.

A checkpoint that cannot be read (a truncated array file, missing or garbled metadata, a missing item) is not
fatal: restoring the latest step falls back to the next newest, with a warning naming the step and what was wrong,
and only when every step fails is it an error (`CheckpointError`, listing each step and why). Nothing is deleted:
before the first save after such a fallback the unreadable steps are moved into `<directory>/unreadable/`, so that
they neither hold a `keep` slot (Orbax's garbage collection keeps the newest `keep` steps, and would otherwise count
them and delete good ones) nor collide with the steps the resumed run writes again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


#: Where unreadable steps are moved (inside the checkpoint directory; not a step name, so Orbax ignores it).
UNREADABLE = "unreadable"


class CheckpointError(RuntimeError):
    """No step of a checkpoint directory could be restored (the message lists each step and why)."""


def _reason(e: BaseException) -> str:
    """One line saying why a read failed: the innermost cause (e.g. TensorStore's `OUT_OF_RANGE: Error reading "a/0"
    ... byte range [0, 2560) is not valid for value of size 1399`), which names the file."""
    seen = []
    while e is not None and e not in seen and len(seen) < 10:
        seen.append(e)
        e = e.__cause__ or e.__context__
    inner = seen[-1]
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _key_name(keypath) -> str:
    """'params/blocks/mlp/gate' of a pytree key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        #: step -> why it could not be restored (filled by `restore` / `restore_params` when they fall back).
        self.unreadable: dict[int, str] = {}
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
        if self.unreadable:
            self._set_aside_unreadable()
        items = {"state": ocp.args.StandardSave(state),
                 "data": ocp.args.JsonSave(data_state or {}),
                 "meta": ocp.args.JsonSave(meta or {})}
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step` (default: the latest readable one, falling back past unreadable
        steps: module docstring). `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings: the arrays
        come back in that layout, whatever mesh saved them."""
        def read(s):
            for item in ("data", "meta"):  # Orbax reads a JSON item whose file is missing as None
                if not os.path.isfile(os.path.join(self.directory, str(s), item, "metadata")):
                    raise FileNotFoundError(f"{item}/metadata is missing")
            self._check_shapes(s, abstract_state)
            restored = self._manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
            for item in ("data", "meta"):
                if not isinstance(restored[item], dict):
                    raise ValueError(f"{item}/metadata holds {type(restored[item]).__name__}, not a JSON object")
            return restored["state"], dict(restored["data"]), dict(restored["meta"])

        return self._first_readable(step, read)[1]

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the params of a saved train state (e.g. to start DPO or RL from an SFT run); `step` None: the latest
        readable one, falling back past unreadable steps."""
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                    abstract_params)

        def read(s):
            self._check_shapes(s, {"params": abstract_params})
            out = ocp.PyTreeCheckpointer().restore(
                os.path.join(self.directory, str(s), "state"),
                args=ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                            partial_restore=True))
            return out["params"]

        return self._first_readable(step, read)[1]

    def _check_shapes(self, step: int, abstract: Any) -> None:
        """Raises ValueError naming the tensor whose stored shape differs from the target's (Orbax's own error names
        neither): a checkpoint or params directory that disagrees with the model config it is restored for."""
        path = os.path.join(self.directory, str(step), "state")
        try:
            stored_tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports what is wrong
            return
        stored = {_key_name(k): leaf for k, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            name = _key_name(keypath)
            have = getattr(stored.get(name), "shape", None)
            if have is not None and tuple(have) != tuple(leaf.shape):
                raise ValueError(f"{path}: tensor {name!r} is stored with shape {tuple(have)}, but the target "
                                 f"(the model config) expects {tuple(leaf.shape)}")

    def _first_readable(self, step: int | None, read: Callable[[int], Any]) -> tuple[int, Any]:
        """(step, read(step)) of `step`, or of the newest step `read` succeeds on; warns about each failure."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        failed = {}
        for s in steps:
            try:
                out = read(s)
            except Exception as e:  # noqa: BLE001 - any failure to read a step is reported, then the next tried
                failed[s] = _reason(e)
                log.warning("checkpoint %s is unreadable (%s)%s", os.path.join(self.directory, str(s)), failed[s],
                            "" if s == steps[-1] else ": falling back to the next newest step")
                continue
            if failed:
                log.warning("restored step %d of %s; newer unreadable steps %s are kept (moved into %s/ at the next "
                            "save)", s, self.directory, sorted(failed), UNREADABLE)
                self.unreadable.update(failed)
            return s, out
        listing = "; ".join(f"step {s}: {why}" for s, why in failed.items())
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({listing})")

    def _set_aside_unreadable(self) -> None:
        """Moves the unreadable steps found by a restore out of the step namespace (nothing is deleted)."""
        self._manager.wait_until_finished()
        for s in sorted(self.unreadable):
            src = os.path.join(self.directory, str(s))
            if os.path.isdir(src) and jax.process_index() == 0:
                dst = os.path.join(self.directory, UNREADABLE, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.move(src, dst)
                with open(dst + ".why.txt", "w") as f:
                    f.write(self.unreadable[s] + "\n")
                log.warning("moved unreadable checkpoint step %d to %s", s, dst)
        self.unreadable.clear()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxpost: unreadable checkpoints set aside")
        self._manager.reload()

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
