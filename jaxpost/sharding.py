"""Meshes and logical-axis sharding.

Models name their parameter and activation axes logically (`"embed"`, `"mlp"`, `"batch"`, ...). Two rule tables map
those names onto mesh axes: one for parameter storage (FSDP shards the embedding dimension of every weight) and one for
activations (batch over data and fsdp, model-parallel dims over tensor). Models never name mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxpost.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Where each logical axis is stored. A weight's "embed" dimension is split over fsdp (ZeRO-3 style); model-parallel
# dimensions over tensor. The stacked "layers" dimension is never split.
PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "lora": None,  # the rank of a LoRA adapter: small, never split
}

# How activations are laid out during compute: the batch over every data-parallel axis, features replicated except
# the model-parallel ones.
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": None,
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "lora": None,
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes (what NNX and sharding constraints
    need)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(logical: Sequence[str | None], rules: dict, mesh=None, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axis names. With `mesh` and `shape`, a dimension the mesh axes do not divide is left
    replicated rather than unevenly split, and a mesh axis is used at most once."""
    out, used = [], set()
    for i, name in enumerate(logical):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        if axes is not None:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            if mesh is not None:
                axes_t = tuple(a for a in axes_t if a not in used and mesh.shape.get(a, 1) > 1)
                if shape is not None and axes_t and shape[i] % _axis_size(mesh, axes_t):
                    axes_t = ()
            used.update(axes_t)
            axes = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
        out.append(axes)
    return P(*out)


def shard(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's layout by logical names. A no-op when no mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, ACTIVATION_RULES, mesh, x.shape))


def param_logical_axes(abstract_state) -> dict:
    """Logical axis names of every parameter of an `nnx.split` state, as a pure dict like `state.to_pure_dict()`.
    Stacked (scanned) layers get a leading "layers" axis."""

    def axes_of(v):
        axes = tuple(v.get_metadata().get("axes", ()))
        ndim = len(v.shape)
        if len(axes) == ndim - 1:
            axes = ("layers",) + axes
        if len(axes) != ndim:
            raise ValueError(f"parameter of shape {v.shape} has logical axes {axes}")
        return axes

    tree = jax.tree.map(axes_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.State(tree).to_pure_dict() if not isinstance(tree, dict) else tree


def tree_shardings(abstract_tree, logical_tree, mesh, rules=PARAM_RULES):
    """NamedShardings for a tree of ShapeDtypeStructs given a matching tree of logical-axis tuples."""
    return jax.tree.map(
        lambda a, names: NamedSharding(mesh, logical_to_spec(names, rules, mesh, a.shape)),
        abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

