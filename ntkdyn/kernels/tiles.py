"""The two generic tile methods: Jacobian contraction and NTK-vector products.

A tile is ``Θ(x1, x2)`` for one block of inputs, full ``(N1, N2, K, K)`` or
output-traced ``(N1, N2)`` (:mod:`ntkdyn.kernels.layout`). Each tile function
has the signature ``tile(model, params, x1, x2, *, trace_outputs, same,
precision)`` — ``same`` says ``x2 is x1`` — and takes the model as an
ordinary traced argument, so one compiled program serves every call on one
architecture.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ntkdyn.kernels import costs, layout
from ntkdyn.kernels.precision import kernel_jit
from ntkdyn.models import Model

__all__ = ["jacobian_tile", "jacobian_cost", "ntvp_tile", "ntvp_cost"]


@kernel_jit(static_argnames=("trace_outputs", "same"))
def jacobian_tile(model: Model, params: Any, x1: jax.Array, x2: jax.Array, *, trace_outputs: bool, same: bool):
    """``Θ = Σ_leaves J1_leaf J2_leafᵀ`` from reverse-mode Jacobians of each side, leaf by leaf.

    Cost ≈ N·K backward passes plus ``N1·N2·K²·P`` multiply-adds; memory
    ``(N1 + N2)·K·P`` for the Jacobians.
    """
    j1 = jax.jacrev(lambda p: model(p, x1))(params)
    j2 = j1 if same else jax.jacrev(lambda p: model(p, x2))(params)
    blocks = jax.tree_util.tree_map(lambda a, b: layout.contract(a, b, trace_outputs), j1, j2)
    return functools.reduce(jnp.add, jax.tree_util.tree_leaves(blocks))


def jacobian_cost(model: Model, params: Any, x1, x2, trace_outputs: bool) -> costs.TileCost:
    """Batched ``jacrev`` (N·K reverse passes over the whole tile) + contraction.

    FLOPs ``3F·K·(n1² + n2²) + 2·n1·n2·K²·P``; bytes
    ``(K·P·(n1 + n2) + K·L·max(n1, n2) + K·A·max(n1, n2)² + 2·n1·n2·K²)·itemsize``
    (F, A: forward FLOPs and intermediate values per example; L: the largest
    leaf, whose Jacobian XLA copies once for the contraction — measured with
    ``compiled.memory_analysis()``; K² becomes K when traced).
    """
    fwd, act = costs.per_example_cost(model, params, x1)
    _, k = costs.output_shape(model, params, costs.example_rows(x1))
    kk = k if trace_outputs else k * k
    p = costs.flat_param_count(params)
    lead = costs.largest_leaf(params)
    item = costs.itemsize(model, params, x1)

    def flops(n1, n2):
        return 3.0 * fwd * k * (n1 * n1 + n2 * n2) + 2.0 * n1 * n2 * kk * p

    def memory(n1, n2):
        n = max(n1, n2)
        return item * (k * p * (n1 + n2) + k * lead * n + k * act * n**2 + 2 * n1 * n2 * kk)

    return costs.TileCost(flops, memory)


@kernel_jit(static_argnames=("trace_outputs", "same"))
def ntvp_tile(model: Model, params: Any, x1: jax.Array, x2: jax.Array, *, trace_outputs: bool, same: bool):
    """Column ``e`` of the x2 tile is ``J1 (J2ᵀ e)``: one VJP then one JVP, vmapped over the N2·K columns."""
    del same
    out2, vjp2 = jax.vjp(lambda p: model(p, x2), params)
    n2, k = out2.shape
    basis = jnp.eye(n2 * k, dtype=out2.dtype).reshape(n2 * k, n2, k)

    def column(cot):
        (tangent,) = vjp2(cot)
        return jax.jvp(lambda p: model(p, x1), (params,), (tangent,))[1]

    cols = jax.vmap(column)(basis)  # [(j, l), i, k] = Θ(x1_i, x2_j)[k, l]
    full = cols.reshape(n2, k, cols.shape[1], k).transpose(2, 0, 3, 1)
    return layout.trace(full) if trace_outputs else full


def ntvp_cost(model: Model, params: Any, x1, x2, trace_outputs: bool) -> costs.TileCost:
    """Per column of the x2 tile (N2·K of them): one VJP over N2, one JVP over N1.

    FLOPs ``K·n2·(2F·n2 + 3F·n1) + F·n2``. Bytes: every column holds its
    parameter tangent (P values) and the tangents of the activations,
    ``K·n2·(P + L + A·(n1 + n2))``, plus the tile twice — L, the largest
    leaf, is the relayout copy XLA makes of the biggest tangent before the
    JVP's contraction (measured with ``compiled.memory_analysis()``).
    """
    del trace_outputs
    fwd, act = costs.per_example_cost(model, params, x1)
    _, k = costs.output_shape(model, params, costs.example_rows(x1))
    p = costs.flat_param_count(params) + costs.largest_leaf(params)
    item = costs.itemsize(model, params, x1)

    def flops(n1, n2):
        return k * n2 * (2.0 * fwd * n2 + 3.0 * fwd * n1) + fwd * n2

    def memory(n1, n2):
        return item * (k * n2 * (p + act * (n1 + n2)) + n1 * n2 * k * k * 2)

    return costs.TileCost(flops, memory)
