"""Kernel layouts, written once for every method.

Three forms of one kernel ``Θ(x1, x2)`` between N1 and N2 inputs with K outputs:

* full: ``(N1, N2, K, K)``, ``Θ[i, j, k, l] = ∂f_k(x1_i)/∂θ · ∂f_l(x2_j)/∂θ``;
* output-traced: ``(N1, N2)``, the mean over the diagonal output pairs,
  ``Θ_tr[i, j] = (1/K) Σ_k Θ[i, j, k, k]``;
* flat: ``(N1·K, N2·K)``, rows and columns in row-major (N, K) order, the
  matrix the dynamics eigendecompose.

Every array here may be a jax or a NumPy array (host-side tiling uses these
on NumPy buffers).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["kernel_shape", "contract", "trace", "transpose", "flatten_kernel", "assemble"]


def kernel_shape(n1: int, n2: int, k: int, trace_outputs: bool) -> tuple[int, ...]:
    """``(N1, N2)`` when output-traced, else ``(N1, N2, K, K)``."""
    return (n1, n2) if trace_outputs else (n1, n2, k, k)


def contract(a: jax.Array, b: jax.Array, trace_outputs: bool) -> jax.Array:
    """Kernel of two factors: ``Θ[i, j, k, l] = Σ_p a[i, k, p] b[j, l, p]``.

    ``a`` (N1, K, ...) and ``b`` (N2, K, ...) are per-example Jacobians (the
    trailing axes, e.g. a parameter leaf's shape, are flattened into one axis
    p) or any factors with ``Θ = a bᵀ``, e.g. probe responses. Traced:
    ``(1/K) Σ_{k,p} a[i, k, p] b[j, k, p]``, shape (N1, N2).
    """
    a = a.reshape(a.shape[0], a.shape[1], -1)
    b = b.reshape(b.shape[0], b.shape[1], -1)
    if trace_outputs:
        return jnp.einsum("ikp,jkp->ij", a, b) / a.shape[1]
    return jnp.einsum("ikp,jlp->ijkl", a, b)


def trace(full: jax.Array) -> jax.Array:
    """Output-traced form of a full kernel: ``(1/K) Σ_k Θ[..., k, k]`` over the last two axes."""
    return jnp.trace(full, axis1=-2, axis2=-1) / full.shape[-1]


def transpose(block: jax.Array, trace_outputs: bool) -> jax.Array:
    """``Θ(x2, x1)`` from ``Θ(x1, x2)``: swap the input axes (and the output axes of a full kernel)."""
    return block.T if trace_outputs else block.transpose(1, 0, 3, 2)


def flatten_kernel(k: jax.Array) -> jax.Array:
    """(N1, N2, K, K) → (N1·K, N2·K), rows/cols in row-major (N, K) order."""
    n1, n2, k1, k2 = k.shape
    return k.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)


def assemble(
    block: Callable[[int, int], jax.Array], rows: int, cols: int, *, symmetric: bool, trace_outputs: bool
) -> jax.Array:
    """Concatenate a ``rows × cols`` grid of kernel blocks ``block(i, j)`` into one kernel.

    When ``symmetric`` (``Θ(x, x)``, ``rows == cols``) only the upper block
    triangle is computed; block ``(i, j)`` below the diagonal is
    ``transpose(block(j, i))``. Traceable (jit/grad): no host buffers.
    """
    blocks: dict[tuple[int, int], jax.Array] = {}
    for i in range(rows):
        for j in range(cols):
            if symmetric and j < i:
                blocks[i, j] = transpose(blocks[j, i], trace_outputs)
            else:
                blocks[i, j] = block(i, j)
    return jnp.concatenate([jnp.concatenate([blocks[i, j] for j in range(cols)], axis=1) for i in range(rows)])
