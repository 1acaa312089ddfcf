"""The logical-axis rule table and the shardings it produces.

Model parameters carry *logical* axis names (``nnx`` ``out_sharding`` metadata, e.g.
``("embed", "mlp")`` for an MLP up-projection); :data:`LOGICAL_AXIS_RULES` maps each name to
mesh axes:

* FSDP: the model dimension ``embed`` (present in every large matrix) is split over ``fsdp``,
  so every big parameter and its optimizer moments are divided by the ``fsdp`` size;
* tensor parallelism: ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` are split over ``tensor``
  (Megatron-style column/row split of attention and MLP, vocab-parallel embeddings);
* ``head_dim``, ``norm``, ``layers`` stay replicated.

Resolution of one tensor (``logical_to_spec``), dimension by dimension:

1. a ``None`` name is replicated; a name missing from the rules is an error;
2. mesh axes of size 1 and mesh axes already used by an earlier dimension are dropped (a mesh
   axis may shard only one dimension of a tensor);
3. if the dimension's size is not divisible by the product of the remaining mesh axes, the
   longest prefix of them that divides it is kept (often none: the dimension is then
   *replicated*, e.g. GPT-2's vocabulary of 50257 under ``tensor=2``). This costs memory, never
   correctness, and is logged once per (name, size, axes).

The table uses Flax's format (a tuple of ``(logical_name, mesh_axes)`` pairs), so it also works
with ``nnx.logical_axis_rules``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations / batches
    ("batch", ("data", "fsdp")),
    ("length", None),
)

_log = logging.getLogger(__name__)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


@functools.lru_cache(maxsize=256)
def _log_fallback(name: str, size: int, wanted: tuple[str, ...], kept: tuple[str, ...], product: int) -> None:
    _log.warning(
        "logical axis %r of size %d is not divisible by mesh axes %s (product %d); sharding it over %s instead",
        name,
        size,
        wanted,
        product,
        kept or "nothing (replicated)",
    )


def logical_to_spec(
    logical_axes: Sequence[str | None] | PartitionSpec | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` of a tensor of ``shape`` whose dims have ``logical_axes`` names.

    ``logical_axes=None`` (no annotation) gives a fully replicated spec.
    """
    if logical_axes is None:
        return PartitionSpec()
    logical_axes = tuple(logical_axes)
    shape = tuple(shape)
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"logical axes {logical_axes} have {len(logical_axes)} names but the tensor has "
            f"shape {shape} ({len(shape)} dims)"
        )
    table = dict(rules)
    for name, mesh_axes in table.items():
        for axis in _as_tuple(mesh_axes):
            if axis not in mesh.shape:
                raise ValueError(f"rule {name!r} -> {mesh_axes!r}: mesh axis {axis!r} not in mesh axes {tuple(mesh.shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"unknown logical axis name {name!r} (in {logical_axes}, shape {shape}); "
                f"the rule table knows {sorted(table)}"
            )
        wanted = tuple(a for a in _as_tuple(table[name]) if mesh.shape[a] > 1 and a not in used)
        kept = wanted
        while kept and size % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        if kept != wanted:
            _log_fallback(name, size, wanted, kept, math.prod(mesh.shape[a] for a in wanted))
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def sharding_fn(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Callable[[Any, Sequence[int]], NamedSharding]:
    """``f(logical_axes, shape) -> NamedSharding`` placing one tensor on ``mesh`` by ``rules``.

    This is what ``jaxalign.models.from_pretrained(..., sharding_fn=...)`` calls per tensor.
    """

    def place(logical_axes: Any, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))

    return place


def _variable_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an ``nnx.Variable`` (``out_sharding`` metadata), or None."""
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every array of ``tree``, read from its logical-axis metadata.

    ``tree`` is an ``nnx.State`` (e.g. ``nnx.split(model, nnx.Param)[1]``, concrete or from
    ``nnx.eval_shape``), an ``nnx.Module`` (read via ``nnx.state``), or any pytree containing
    ``nnx.Variable`` leaves - a whole train state works in one call: optimizer moments created
    by ``optax`` from a State of Variables keep the Variables and their metadata, so they get
    the sharding of the parameter they mirror. Variables without ``out_sharding`` metadata and
    plain leaves (step counters, RNG keys) are replicated.

    Returns a tree of the same structure (Variables hold a ``NamedSharding``), usable as
    ``jax.jit`` ``in_shardings``/``out_shardings`` or as an Orbax restore target's shardings.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            if not hasattr(value, "shape"):
                return leaf.replace(replicated)
            axes = _variable_axes(leaf)
            try:
                spec = logical_to_spec(axes, value.shape, mesh, rules)
            except ValueError as err:
                raise ValueError(f"{type(leaf).__name__} with shape {tuple(value.shape)}: {err}") from None
            return leaf.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(opt_state: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state whose moments mirror ``params`` (any optax state).

    Every subtree of ``opt_state`` with the same tree structure as ``params`` (``mu``, ``nu``,
    ...) gets ``params_shardings``; every other leaf (counts, scalars) is replicated. Works for
    plain-array parameter trees too, where no metadata survives inside the optimizer state.
    """
    params_def = jax.tree.structure(params)
    if jax.tree.structure(params_shardings) != params_def:
        raise ValueError("params_shardings must have the same tree structure as params")
    replicated = NamedSharding(mesh, PartitionSpec())

    def mirrors_params(node: Any) -> bool:
        return params_def.num_leaves > 1 and jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: params_shardings if mirrors_params(node) else replicated,
        opt_state,
        is_leaf=mirrors_params,
    )


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES) -> jax.Array:
    """``x`` constrained to the sharding its logical axes give on the current mesh (else unchanged).

    For activations inside a jitted step run under ``jax.set_mesh(mesh)``; without a mesh
    context this is the identity, so model code can call it unconditionally. The residual
    stream ``[B, L, D]`` named ``("batch", "length", "embed")`` becomes rows split over
    ``("data", "fsdp")`` (``embed`` loses ``fsdp`` to ``batch``): pinned at every block boundary,
    it makes XLA all-gather FSDP weights instead of all-gathering the batch, which automatic
    propagation otherwise tends to choose (the weights' sharded ``embed`` dim is the contraction
    dim of every projection).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def under_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``fn`` (e.g. a jitted step) called, and so traced, with ``mesh`` as the context mesh
    (``jax.set_mesh``): the activation constraints of ``with_logical_constraint`` in the models
    take effect. Outside it they are the identity. A jitted ``fn``'s ``lower`` is kept, under
    the mesh too, for ahead-of-time analysis."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    if hasattr(fn, "lower"):
        call.lower = under_mesh(fn.lower, mesh)  # type: ignore[attr-defined]
    return call
