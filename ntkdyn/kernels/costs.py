"""Shape-level facts about a model, for the cost model: output shape, FLOPs, sizes.

Nothing here runs the model: it is traced (``jax.eval_shape`` /
``jax.make_jaxpr``) on abstract values, so every function accepts concrete
arrays and :class:`jax.ShapeDtypeStruct` leaves alike, and its answers depend
on shapes and dtypes only (which is what lets the planner cache them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn.models import Model

__all__ = [
    "TileCost",
    "abstract",
    "signature",
    "from_signature",
    "example_rows",
    "output_shape",
    "flat_param_count",
    "largest_leaf",
    "output_dtype",
    "itemsize",
    "jaxpr_cost",
    "per_example_cost",
]


@dataclasses.dataclass(frozen=True)
class TileCost:
    """Cost model of one method for one tile of ``n1 × n2`` inputs.

    Attributes:
      flops: ``flops(n1, n2)`` — floating-point operations for the tile.
      memory: ``memory(n1, n2)`` — peak bytes of the tile's intermediates and
        its result (what the compiled tile allocates beyond its arguments).
    """

    flops: Callable[[int, int], float]
    memory: Callable[[int, int], float]


def abstract(tree: Any) -> Any:
    """``tree`` with every array leaf replaced by its :class:`jax.ShapeDtypeStruct`."""
    return jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)), tree)


def signature(tree: Any) -> tuple:
    """Hashable ``(treedef, ((shape, dtype), ...))`` of a pytree (a Model's graph is part of its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(l)), jnp.dtype(jnp.result_type(l)).name) for l in leaves)


def from_signature(sig: tuple) -> Any:
    """The abstract pytree (:class:`jax.ShapeDtypeStruct` leaves) a :func:`signature` describes."""
    treedef, leaves = sig
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])


def example_rows(x, n: int = 1) -> jax.ShapeDtypeStruct:
    """Abstract batch of ``n`` inputs shaped like the rows of ``x``."""
    return jax.ShapeDtypeStruct((n, *np.shape(x)[1:]), jnp.result_type(x))


def output_shape(model: Model, params: Any, x) -> tuple[int, int]:
    """``(N, K)`` of ``model(params, x)`` for the whole batch ``x``, without running it.

    Raises ValueError naming ``apply_fn`` unless the output is a 2-D array
    with one row per input.
    """
    out = jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, abstract(x))
    n = np.shape(x)[0]
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(
            "apply_fn: expected apply_fn(params, x) to return an array of shape (N, K); "
            f"got {getattr(out, 'shape', type(out).__name__)} for x of shape {tuple(np.shape(x))}"
        )
    if out.shape[0] != n:
        raise ValueError(
            f"apply_fn: output has {out.shape[0]} rows for {n} inputs; "
            "apply_fn(params, x) must map a batch of N inputs to (N, K)"
        )
    return tuple(out.shape)


def flat_param_count(params: Any) -> int:
    """Number of scalar parameters in the pytree."""
    return int(sum(math.prod(np.shape(l)) for l in jax.tree_util.tree_leaves(params)))


def largest_leaf(params: Any) -> int:
    """Number of scalars in the largest parameter leaf."""
    return int(max((math.prod(np.shape(l)) for l in jax.tree_util.tree_leaves(params)), default=0))


def output_dtype(model: Model, params: Any, x) -> jnp.dtype:
    """dtype of ``model(params, x)`` (the kernel's dtype)."""
    return jnp.dtype(jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, abstract(x)).dtype)


def itemsize(model: Model, params: Any, x) -> int:
    """Bytes per value of the model's output dtype."""
    return output_dtype(model, params, x).itemsize


def jaxpr_cost(jaxpr) -> tuple[float, int]:
    """``(FLOPs, number of intermediate values)`` of one evaluation of a jaxpr.

    ``dot_general``: ``2·|out|·|contracted|``; ``conv_general_dilated``:
    ``2·|out|·|kernel|/out_channels``; any other op: ``|out|``. Nested
    ``jit`` / custom-derivative calls are counted through.
    """
    flops = 0.0
    values = 0
    for eqn in jaxpr.eqns:
        out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        name = eqn.primitive.name
        inner = [p for p in eqn.params.values() if hasattr(p, "jaxpr") and hasattr(p, "consts")]
        inner += [p for p in eqn.params.values() if type(p).__name__ == "Jaxpr"]
        if inner:
            sub = inner[0].jaxpr if hasattr(inner[0], "consts") else inner[0]
            f, v = jaxpr_cost(sub)
            flops += f
            values += v
            continue
        values += out
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2.0 * out * math.prod(lhs[d] for d in lc)
        elif name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval.shape
            flops += 2.0 * out * math.prod(rhs) / rhs[dn.rhs_spec[0]]
        else:
            flops += out
    return flops, values


def per_example_cost(model: Model, params: Any, x) -> tuple[float, int]:
    """FLOPs and intermediate values of ``model(params, ·)`` on one example."""
    closed = jax.make_jaxpr(lambda m, p, xx: m(p, xx))(model, params, example_rows(x))
    return jaxpr_cost(closed.jaxpr)
