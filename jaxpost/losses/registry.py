"""Registries of pure losses: a name -> function mapping that also knows each entry's hyperparameters.

A caller never branches on a loss's name to decide which keyword arguments to pass: it asks the registry,
`POLICY_LOSSES.kwargs("ppo", config)`, which reads each hyperparameter the entry accepts from the config (its field
of the same name, or the field named in the entry's mapping, e.g. grpo's `scale` <- `grpo_scale`) and leaves out the
ones the config does not have.

By default an entry's hyperparameters are its keyword-only arguments with a default, minus the registry's data
arguments (arrays and batch-structure arguments such as `group_size`, and any name with a shape suffix like
`chosen_tokens_B`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_SHAPE_SUFFIX = re.compile(r"_[A-Z]+$")


def _default_hparams(fn: Callable, data: frozenset[str]) -> dict[str, str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
            and p.name not in data and not _SHAPE_SUFFIX.search(p.name)}


class Registry(dict):
    """{name: function} plus, per name, the hyperparameters it accepts: {keyword argument: config field}."""

    def __init__(self, what: str, entries: Mapping[str, Callable], *,
                 hparams: Mapping[str, Iterable[str] | Mapping[str, str]] | None = None,
                 data: Iterable[str] = ()):
        super().__init__(entries)
        self.what = what
        data = frozenset(data)
        explicit = dict(hparams or {})
        self._hparams: dict[str, dict[str, str]] = {}
        for name, fn in entries.items():
            given = explicit.get(name)
            if given is None:
                self._hparams[name] = _default_hparams(fn, data)
            else:
                self._hparams[name] = dict(given) if isinstance(given, Mapping) else {k: k for k in given}

    def get(self, name: str) -> Callable:  # type: ignore[override]
        """The function registered under `name` (a ValueError naming the known entries otherwise)."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {sorted(self)}") from None

    def hparams(self, name: str) -> dict[str, str]:
        """{keyword argument: config field} of entry `name`."""
        self.get(name)
        return dict(self._hparams[name])

    def kwargs(self, name: str, source: Any) -> dict:
        """The keyword arguments of entry `name` read from `source` (a mapping, or an object such as a config
        dataclass): every hyperparameter of the entry whose field `source` has."""
        out = {}
        for arg, field in self.hparams(name).items():
            if isinstance(source, Mapping):
                if field in source:
                    out[arg] = source[field]
            elif hasattr(source, field):
                out[arg] = getattr(source, field)
        return out
