"""Placing parameters on the mesh: sharded creation (no host holds the full model) and resharding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxalign.parallel.rules import LOGICAL_AXIS_RULES, Rules, param_shardings

M = TypeVar("M", bound=nnx.Module)


def create_sharded(create_fn: Callable[[], M], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> M:
    """Runs ``create_fn`` (e.g. ``lambda: make_model(config, seed=0)``) directly into sharded arrays.

    The module is first traced abstractly (``nnx.eval_shape``) to read its parameters' logical
    axes, then created inside ``jax.jit`` with ``out_shardings`` from the rule table, so each
    device materialises only its own shards. Flax's eager sharding is switched off while
    tracing: placement comes from ``rules`` alone, with the divisibility fallback of
    :func:`jaxalign.parallel.rules.logical_to_spec`.

    Only ``jax.random``-based initialisers avoid a full host copy: values that ``create_fn``
    draws on the host (numpy, as ``jaxalign.models.make_model`` does) enter the jitted
    function as constants. That is fine for test-sized models; large ones come from
    ``from_pretrained(..., sharding_fn=sharding_fn(mesh))``, which places tensor by tensor.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(create_fn)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = param_shardings(abstract_state, mesh, rules)

        def create_state() -> Any:
            return nnx.split(create_fn())[1]

        state = jax.jit(create_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_tree(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``tree`` (State / Module state / train-state pytree with Variables) moved onto ``mesh`` by ``rules``."""
    if isinstance(tree, nnx.Module):
        graphdef, state = nnx.split(tree)
        return nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh, rules)))
    return jax.device_put(tree, param_shardings(tree, mesh, rules))
