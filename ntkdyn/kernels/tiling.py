"""Host-side tiling: a kernel assembled from ``b × b`` tiles.

Any N works: the inputs are padded to a multiple of ``b`` by repeating their
last row (which stays in the input domain) and the padding is trimmed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn.kernels import layout

__all__ = ["pad_rows", "chunks", "tiled"]


def pad_rows(x: jax.Array, size: int) -> jax.Array:
    """Pad to ``size`` rows by repeating the last row."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def chunks(x: jax.Array, size: int) -> jax.Array:
    """(T, size, ...) view of ``x`` padded with its last row to a multiple of ``size``."""
    t = -(-x.shape[0] // size)
    return pad_rows(x, t * size).reshape(t, size, *x.shape[1:])


def tiled(
    tile: Callable[..., jax.Array],
    x1: jax.Array,
    x2: jax.Array,
    tile_size: int,
    *,
    trace_outputs: bool,
    symmetric: bool,
    concrete: bool,
) -> jax.Array:
    """Assemble the kernel from ``tile(x1_block, x2_block, same=...)`` tiles (upper triangle only when symmetric).

    With concrete inputs and params the tiles are written into one host buffer,
    so the peak is the kernel plus one tile; under tracing (jit/grad over
    inputs or params) they are concatenated.
    """
    b = tile_size
    n1, n2 = x1.shape[0], x2.shape[0]
    t1, t2 = -(-n1 // b), -(-n2 // b)
    p1 = pad_rows(x1, t1 * b)
    p2 = p1 if symmetric else pad_rows(x2, t2 * b)

    def block(i: int, j: int) -> jax.Array:
        return tile(p1[i * b : (i + 1) * b], p2[j * b : (j + 1) * b], same=symmetric and i == j)

    if not concrete:
        return layout.assemble(block, t1, t2, symmetric=symmetric, trace_outputs=trace_outputs)[:n1, :n2]
    out = None
    for i in range(t1):
        for j in range(i if symmetric else 0, t2):
            tile_ij = np.asarray(block(i, j))
            if out is None:
                out = np.empty((n1, n2, *tile_ij.shape[2:]), tile_ij.dtype)
            r0, c0 = i * b, j * b
            rows, cols = min(b, n1 - r0), min(b, n2 - c0)
            out[r0 : r0 + rows, c0 : c0 + cols] = tile_ij[:rows, :cols]
            if symmetric and j > i:
                out[c0 : c0 + cols, r0 : r0 + rows] = layout.transpose(tile_ij, trace_outputs)[:cols, :rows]
    return jnp.asarray(out)
