"""The kernel as an operator: ``v ↦ Θ(x1, x2) v`` without forming Θ.

``Θ v = J(x1) (J(x2)ᵀ v)``: one VJP over x2 (summed chunk by chunk), then one
JVP over x1, each vmapped over the columns of v. Memory O(P + chunk
activations) per column, never O(N1·N2).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntkdyn.kernels import costs, layout
from ntkdyn.kernels.precision import kernel_jit
from ntkdyn.kernels.tiling import chunks
from ntkdyn.models import Model

__all__ = ["ntk_vp_chunked", "chunk_memory"]


@kernel_jit(static_argnames=("trace_outputs", "tile_size"))
def ntk_vp_chunked(model: Model, params: Any, x1, x2, v, *, trace_outputs: bool, tile_size: int):
    """``Θ(x1, x2) v`` for v (N2, K, M) — or (N2, M) traced — with ``tile_size`` inputs per VJP/JVP call."""
    b = tile_size
    n1, n2 = x1.shape[0], x2.shape[0]
    xs2 = chunks(x2, b)
    k = jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, xs2[0]).shape[1]  # a chunk, as the loops see it
    if trace_outputs:
        # column (k, m) of the cotangents is v[:, m] placed on output k only
        cot = jnp.einsum("jm,lk->jlkm", v, jnp.eye(k, dtype=v.dtype)).reshape(n2, k, k * v.shape[-1])
    else:
        cot = v  # (N2, K, M)
    m = cot.shape[-1]
    cs2 = jnp.concatenate([cot, jnp.zeros((xs2.shape[0] * b - n2, k, m), cot.dtype)]).reshape(xs2.shape[0], b, k, m)

    def pull(acc, xc):
        xb, cb = xc
        _, vjp = jax.vjp(lambda p: model(p, xb), params)
        t = jax.vmap(lambda c: vjp(c)[0], in_axes=-1, out_axes=-1)(cb)
        return jax.tree_util.tree_map(jnp.add, acc, t), None

    zeros_m = jax.tree_util.tree_map(lambda z: jnp.zeros((*jnp.shape(z), m), jnp.result_type(z)), params)
    tangent, _ = jax.lax.scan(pull, zeros_m, (xs2, cs2))  # Σ_j J(x2_j)ᵀ v_j, one per column

    def push(xb):
        jvp = lambda t: jax.jvp(lambda p: model(p, xb), (params,), (t,))[1]  # noqa: E731
        return jax.vmap(jvp, in_axes=-1, out_axes=-1)(tangent)  # (b, K, M)

    out = jax.lax.map(push, chunks(x1, b)).reshape(-1, k, m)[:n1]
    if trace_outputs:
        return layout.trace(jnp.moveaxis(out.reshape(n1, k, k, v.shape[-1]), -1, 1))
    return out


def chunk_memory(model: Model, params: Any, x1, x2, columns: int) -> Callable[[int], float]:
    """Bytes of :func:`ntk_vp_chunked`'s intermediates as a function of the chunk size ``b``.

    With M cotangent columns (K·M when traced): the running sum of ``Jᵀ v``
    and the new chunk's (``2·M·P``, plus L, the largest leaf, for XLA's
    relayout copy), the chunk's activations and their M tangents
    (``b·A·(1 + 2M)``), and the inputs' outputs ``(N1 + N2)·K·M``.
    """
    _, act = costs.per_example_cost(model, params, x1)
    _, k = costs.output_shape(model, params, costs.example_rows(x1))
    p = costs.flat_param_count(params)
    lead = costs.largest_leaf(params)
    item = costs.itemsize(model, params, x1)
    n = x1.shape[0] + x2.shape[0]
    return lambda b: item * (columns * (2 * p + lead) + b * act * (1 + 2 * columns) + n * k * columns)
