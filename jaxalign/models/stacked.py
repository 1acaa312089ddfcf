"""Stacked layers: the blocks of a decoder as one module whose parameters carry a leading
``layers`` axis, run with ``jax.lax.scan`` (``ModelConfig.scan_layers``).

Layout: the unrolled decoder holds ``layers.{i}.<p>`` (an ``nnx.List`` of blocks; GPT-2:
``h.{i}.<p>``), the stacked one ``layers.<p>`` with ``layers.<p>[i] == layers.{i}.<p>`` and the
logical axes ``("layers", *axes)`` (``layers`` is never sharded). One traced block is compiled
whatever the depth; the scan body is the block (rematerialised per ``ModelConfig.remat``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.config import remat_policy

LAYERS_AXIS = "layers"
LAYER_LISTS = ("layers", "h")  # the attribute holding the blocks: Llama family, GPT-2

Path = tuple[str | int, ...]


def _stack_values(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    return jnp.stack(values)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module with the graph of ``modules[0]`` whose every variable holds the modules'
    values stacked on a leading ``layers`` axis (abstract ``ShapeDtypeStruct`` values stay
    abstract), its logical axes ``("layers", *axes)``."""
    graphdef, first = nnx.split(modules[0])
    states = [first, *(nnx.split(m)[1] for m in modules[1:])]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("out_sharding")
        return variables[0].replace(_stack_values([v.get_value() for v in variables]),
                                    out_sharding=(LAYERS_AXIS, *axes) if axes is not None else None)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def make_layers(make_block: Callable[[], nnx.Module], num_layers: int, scan: bool) -> nnx.Module:
    """``num_layers`` blocks from ``make_block`` (created in order, so random weights do not
    depend on the layout): an ``nnx.List``, or with ``scan`` one module of stacked parameters."""
    blocks = [make_block() for _ in range(num_layers)]
    return stack_modules(blocks) if scan else nnx.List(blocks)


def scan_blocks(stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                xs: Any = None, *, remat: str = "none") -> tuple[Any, Any]:
    """``jax.lax.scan`` over the layers of ``stacked``: ``body(block_i, carry, xs[i]) -> (carry,
    y_i)`` with ``block_i`` the module of layer ``i``; returns ``(carry, ys stacked)``. Unless
    ``remat == "none"`` the body is ``jax.checkpoint``-ed with that policy (``remat_policy``)."""
    graphdef, state = nnx.split(stacked)

    def step(carry: Any, layer: tuple[Any, Any]) -> tuple[Any, Any]:
        block_state, x = layer
        return body(nnx.merge(graphdef, block_state), carry, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=remat_policy(remat), prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))


def checkpointed(fn: Callable[[nnx.Module, Any], Any], module: nnx.Module, x: Any, *, remat: str = "none") -> Any:
    """``fn(module, x)``, ``jax.checkpoint``-ed with the ``remat`` policy unless it is ``"none"``.
    The module enters as its split state, so the checkpointed function is pure whatever trace
    the module was built in (a reference forward inside the accumulation scan, for one)."""
    if remat == "none":
        return fn(module, x)
    graphdef, state = nnx.split(module)
    run = jax.checkpoint(lambda state, x: fn(nnx.merge(graphdef, state), x), policy=remat_policy(remat))
    return run(state, x)


def is_stacked(variable: nnx.Variable) -> bool:
    """Whether ``variable`` is a stacked block parameter (leading logical axis ``layers``)."""
    axes = variable.get_metadata().get("out_sharding")
    return bool(axes) and axes[0] == LAYERS_AXIS


def stacked_path(path: Path) -> tuple[Path, int | None]:
    """The unrolled path ``(layers, i, *rest)`` as ``((layers, *rest), i)``; any other path as
    ``(path, None)``."""
    if len(path) > 1 and path[0] in LAYER_LISTS and isinstance(path[1], int):
        return (path[0], *path[2:]), path[1]
    return path, None


def layer_paths(path: Path, num_layers: int) -> list[Path]:
    """The unrolled paths of the stacked path ``(layers, *rest)``: ``(layers, i, *rest)`` for
    each layer ``i``; ``[path]`` for a path outside the blocks."""
    if path and path[0] in LAYER_LISTS and not (len(path) > 1 and isinstance(path[1], int)):
        return [(path[0], i, *path[1:]) for i in range(num_layers)]
    return [path]


def layout(tree: Any) -> str | None:
    """``"stacked"`` or ``"unrolled"``: how a pytree holding a decoder's parameters (a train
    state, a params State) stores the blocks, read from its paths; None when it holds none."""
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        for name, following in zip(names, names[1:]):
            if name in LAYER_LISTS:
                return "unrolled" if isinstance(following, int) else "stacked"
    return None
