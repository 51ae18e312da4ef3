"""Command-line entry for experiments: absl flags with ml_collections overrides of frozen config dataclasses.

    python -m experiments.sft_arith --workdir runs/sft --config.steps=200 --config.optim.lr=3e-4

ml_collections assigns overrides by `setattr`, which frozen dataclasses refuse, so the default config is turned into
a (type-checked) `ConfigDict`, overridden there, and rebuilt into the frozen dataclass, whose `__post_init__`
validates it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags, logging
from ml_collections import config_dict, config_flags


def _optional_inner(annotation) -> type | None:
    """T for `T | None` / Optional[T] annotations (strings resolved by the caller), else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def to_config_dict(cfg: Any) -> config_dict.ConfigDict:
    """A frozen dataclass (nested) -> ConfigDict. `None` fields become typed placeholders so they can be set."""
    hints = typing.get_type_hints(type(cfg))
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config_dict(value)
        elif value is None:
            inner = _optional_inner(hints[f.name])
            out[f.name] = config_dict.placeholder(inner if inner in (str, int, float, bool) else str)
        else:
            out[f.name] = value
    return config_dict.ConfigDict(out)


def from_config_dict(cls: type, cd: config_dict.ConfigDict | dict) -> Any:
    """The inverse of `to_config_dict`: builds (and so validates) the frozen dataclass. Unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    data = cd.to_dict() if isinstance(cd, config_dict.ConfigDict) else dict(cd)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t) and isinstance(value, dict):
            value = from_config_dict(t, value)
        elif isinstance(value, list) and typing.get_origin(t) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def to_json_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_config(cfg: Any, workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump({"class": type(cfg).__name__, **to_json_dict(cfg)}, f, indent=2, sort_keys=True)
    return path


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """`jax.distributed.initialize` when the environment asks for several processes (before JAX starts a backend);
    returns whether it did. One process per host (or per local process group of `tools/launch_local.py`):

      JAXPOST_COORDINATOR=host0:1234 JAXPOST_NUM_PROCESSES=N JAXPOST_PROCESS_ID=i   explicit (multi-GPU hosts, CPU)
      JAXPOST_DISTRIBUTED=1 (or JAX_COORDINATOR_ADDRESS set)   jax's auto-detection (Cloud TPU, SLURM, Open MPI, k8s)
    """
    import jax

    coordinator = environ.get("JAXPOST_COORDINATOR")
    if coordinator:
        missing = [k for k in ("JAXPOST_NUM_PROCESSES", "JAXPOST_PROCESS_ID") if not environ.get(k)]
        if missing:
            raise ValueError(f"JAXPOST_COORDINATOR={coordinator} needs {' and '.join(missing)} as well")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(environ["JAXPOST_NUM_PROCESSES"]),
                                   process_id=int(environ["JAXPOST_PROCESS_ID"]))
        return True
    if environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("JAXPOST_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def run(main: Callable[[Any, str], Any], default_config: Any, *, default_workdir: str) -> None:
    """Parses `--workdir` and `--config.*` overrides, then calls `main(config, workdir)`."""
    flags.DEFINE_string("workdir", default_workdir, "Directory for config.json, metrics.jsonl, checkpoints, plots.")
    holder = config_flags.DEFINE_config_dict("config", to_config_dict(default_config),
                                             "Experiment config; override fields with --config.a.b=value.")

    def _main(argv):
        logging.set_verbosity(logging.WARNING)  # Orbax and grain log every file operation at INFO
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        cfg = from_config_dict(type(default_config), holder.value)
        initialize_distributed()
        workdir = flags.FLAGS.workdir
        os.makedirs(workdir, exist_ok=True)
        main(cfg, workdir)

    app.run(_main, argv=sys.argv)
