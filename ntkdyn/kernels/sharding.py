"""Data parallelism: the NTK operator and dense kernel rows split over a device mesh.

The kernel operator is a sum over examples,

    Θ v = J (Jᵀ v),   Jᵀ v = Σ_i J(x_i)ᵀ v_i,

so examples are split over the devices of a mesh: every device pulls its own
examples' cotangents back to parameter space (a VJP, ``tile`` rows at a time),
one ``psum`` over the mesh adds the partial tangents, and every device pushes
the total tangent forward through its own examples (a JVP). Parameters are
replicated; arrays of the size of the data (outputs, residuals, Lanczos
vectors) are split like the examples. This is JAX's own SPMD
(:func:`jax.shard_map` inside ``jit``): on several hosts the same program runs
in every process on a global mesh after ``jax.distributed.initialize``, with no
other communication.

Examples are split over *all* axes of the mesh together (``PartitionSpec``
``(mesh.axis_names,)`` on the example axis). When their number is not a
multiple of ``devices × tile`` the data are padded with copies of the last
example carrying weight 0 (``mask``): padded rows add nothing to ``Jᵀ v`` and
their outputs are set to 0, so the padded operator is ``diag(Θ, 0)`` and every
result on the real rows is unchanged; callers trim the padding.

The dense kernel shards the same way (:func:`kernel_rows`, behind
``empirical_ntk(..., mesh=)``): each device computes the rows of Θ(x1, x2) of
its share of x1 against all of x2, tile by tile, and the result stays a
row-sharded array.

The ``local_*`` functions run *inside* ``shard_map`` on one device's rows;
:func:`all_sum` is the reduction they use for small replicated quantities: an
``all_gather`` followed by the same fixed-order sum on every device, so
replicated values are bit-identical everywhere and every device takes the same
branch of a data-dependent loop (a float ``psum`` promises no such thing).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntkdyn import _validate
from ntkdyn.kernels import tiling

__all__ = [
    "default_mesh",
    "check_mesh",
    "example_spec",
    "padded_size",
    "pad_rows",
    "row_mask",
    "place",
    "all_sum",
    "from_first",
    "local_forward",
    "local_pull",
    "local_push",
    "local_matvec",
    "local_traced_matvec",
    "local_squared_jacobian_norm",
    "kernel_rows",
]

Axes = tuple


def default_mesh() -> Mesh:
    """A one-axis mesh ``("data",)`` over every device of every process (one process: all local devices)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_mesh(mesh) -> Mesh:
    """``mesh`` (a :class:`jax.sharding.Mesh`), or :func:`default_mesh` for None; TypeError otherwise."""
    if mesh is None:
        return default_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected None or a jax.sharding.Mesh, got {type(mesh).__name__}")
    return mesh


def example_spec(mesh: Mesh) -> PartitionSpec:
    """Axis 0 (examples) split over all mesh axes together."""
    return PartitionSpec(tuple(mesh.axis_names))


def padded_size(n: int, mesh: Mesh, tile: int) -> int:
    """Smallest multiple of ``devices · tile`` that is ≥ n."""
    unit = mesh.size * tile
    return unit * max(1, math.ceil(n / unit))


def pad_rows(x, size: int):
    """``x`` with copies of its last row appended up to ``size`` rows (finite, valid model inputs).

    NumPy in, NumPy out for concrete values (placed later, per process); traced values stay traced.
    """
    if not _validate.is_concrete(x):
        return tiling.pad_rows(x, size)
    x = np.asarray(x)
    extra = size - x.shape[0]
    if extra <= 0:
        return x
    return np.concatenate([x, np.broadcast_to(x[-1:], (extra, *x.shape[1:]))], axis=0)


def row_mask(n: int, size: int, dtype) -> np.ndarray:
    """(size,) weights: 1 on the n real rows, 0 on the padding."""
    return (np.arange(size) < n).astype(dtype)


def place(x, mesh: Mesh, spec: PartitionSpec):
    """A global array with ``NamedSharding(mesh, spec)`` from a value every process holds in full.

    Traced values are returned as they are (``jit`` lays them out).
    """
    if not _validate.is_concrete(x):
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])


# --------------------------------------------------------------------------- #
# collectives (inside shard_map)
# --------------------------------------------------------------------------- #


def all_sum(x: jax.Array, axes: Axes) -> jax.Array:
    """Sum over the devices, bit-identical on every device: all-gather, then one fixed-order sum."""
    return jnp.sum(jax.lax.all_gather(x, axes), axis=0)


def from_first(tree: Any, axes: Axes) -> Any:
    """Every device gets device 0's copy (a ``psum`` of one non-zero term: exact)."""
    first = jax.lax.axis_index(axes) == 0
    return jax.tree_util.tree_map(lambda a: jax.lax.psum(jnp.where(first, a, jnp.zeros_like(a)), axes), tree)


# --------------------------------------------------------------------------- #
# one device's rows
# --------------------------------------------------------------------------- #


def _blocks(x: jax.Array, tile: int) -> jax.Array:
    return x.reshape(x.shape[0] // tile, tile, *x.shape[1:])


def _columns_zero(params: Any, c: int) -> Any:
    return jax.tree_util.tree_map(lambda z: jnp.zeros((*jnp.shape(z), c), jnp.result_type(z)), params)


def local_forward(model, params, x: jax.Array, tile: int) -> jax.Array:
    """``f(θ, x)`` for these rows, ``tile`` at a time: (n, K)."""
    out = jax.lax.map(lambda xb: model(params, xb), _blocks(x, tile))
    return out.reshape(x.shape[0], *out.shape[2:])


def local_pull(model, params, x: jax.Array, mask: jax.Array, v: jax.Array, tile: int) -> Any:
    """``Σ_i mask_i J(x_i)ᵀ v_i`` over these rows for v (n, K, c): params tree with a trailing c axis."""
    c = v.shape[-1]
    weighted = v * mask[:, None, None].astype(v.dtype)

    def body(acc, chunk):
        xb, vb = chunk
        out, vjp = jax.vjp(lambda p: model(p, xb), params)
        g = jax.vmap(lambda col: vjp(col.astype(out.dtype))[0], in_axes=-1, out_axes=-1)(vb)
        return jax.tree_util.tree_map(jnp.add, acc, g), None

    tangent, _ = jax.lax.scan(body, _columns_zero(params, c), (_blocks(x, tile), _blocks(weighted, tile)))
    return tangent


def local_push(model, params, x: jax.Array, mask: jax.Array, tangent: Any, tile: int) -> jax.Array:
    """``mask_i · J(x_i) t`` for these rows and a tangent with a trailing c axis: (n, K, c)."""

    def chunk(xb):
        jvp = lambda t: jax.jvp(lambda p: model(p, xb), (params,), (t,))[1]  # noqa: E731
        return jax.vmap(jvp, in_axes=-1, out_axes=-1)(tangent)

    out = jax.lax.map(chunk, _blocks(x, tile))
    out = out.reshape(x.shape[0], *out.shape[2:])
    return out * mask[:, None, None].astype(out.dtype)


def local_matvec(model, params, x, mask, v, *, axes: Axes, tile: int, x_out=None, mask_out=None) -> jax.Array:
    """Rows of ``Θ(x_out, x) v`` (full kernel; ``x_out = x`` by default) for v (n, K, c): (n_out, K, c).

    One VJP over this device's rows of x, one ``psum`` of the tangents over
    the mesh, one JVP over this device's rows of ``x_out``, per column.
    """
    tangent = jax.lax.psum(local_pull(model, params, x, mask, v, tile), axes)
    if x_out is None:
        x_out, mask_out = x, mask
    return local_push(model, params, x_out, mask_out, tangent, tile)


def local_traced_matvec(model, params, x, mask, v, *, axes: Axes, tile: int, x_out=None, mask_out=None):
    """Rows of ``Θ_tr(x_out, x) v`` for v (n, c): ``(1/K) Σ_k J_k(x_out) J_k(x)ᵀ v`` per column.

    K·c VJP/JVP columns: column (k, j) carries ``v[:, j]`` on output k only.
    """
    n, c = v.shape
    k = jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, _blocks(x, tile)[0]).shape[1]  # a call's batch
    cot = jnp.einsum("nj,lk->nlkj", v, jnp.eye(k, dtype=v.dtype)).reshape(n, k, k * c)
    out = local_matvec(model, params, x, mask, cot, axes=axes, tile=tile, x_out=x_out, mask_out=mask_out)
    return jnp.einsum("nkkj->nj", out.reshape(out.shape[0], k, k, c)) / k


def local_squared_jacobian_norm(model, params, x, mask, *, axes: Axes, tile: int) -> jax.Array:
    """``Σ_i mask_i Σ_k ‖J_k(x_i)‖² = tr Θ`` over all devices' rows (replicated scalar).

    Exact: per-example Jacobians by reverse mode, vmapped over ``tile`` rows
    at a time (memory ``tile · K · P``), squared and summed, then
    :func:`all_sum`. ``tr Θ / (N·K)`` is the mean diagonal of the full kernel
    and of the output-traced one alike.
    """

    def one(xi):
        jac = jax.jacrev(lambda p: model(p, xi[None])[0])(params)
        return sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(jac))

    def chunk(acc, xm):
        xb, mb = xm
        sq = jax.vmap(one)(xb)
        return acc + jnp.sum(sq * mb.astype(sq.dtype)), None

    dtype = jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, _blocks(x, tile)[0]).dtype
    total, _ = jax.lax.scan(chunk, jnp.zeros((), dtype), (_blocks(x, tile), _blocks(mask, tile)))
    return all_sum(total, axes)


# --------------------------------------------------------------------------- #
# the dense kernel, by rows
# --------------------------------------------------------------------------- #


@functools.partial(
    jax.jit, static_argnames=("tile_fn", "mesh", "tile_size", "trace_outputs", "precision", "static_options")
)
def _rows(model, params, x1, x2, array_options, *, tile_fn, mesh, tile_size, trace_outputs, precision,
          static_options):
    spec = example_spec(mesh)
    rep = PartitionSpec()

    def body(model, params, x1, x2, array_options):
        tile = functools.partial(tile_fn, model, params, trace_outputs=trace_outputs, precision=precision,
                                 **dict(static_options), **array_options)
        if tile_size is None or tile_size >= max(x1.shape[0], x2.shape[0]):
            return tile(x1, x2, same=False)
        return tiling.tiled(tile, x1, x2, tile_size, trace_outputs=trace_outputs, symmetric=False, concrete=False)

    return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, spec, rep, rep), out_specs=spec, check_vma=False)(
        model, params, x1, x2, array_options
    )


def kernel_rows(
    tile_fn: Callable[..., jax.Array],
    model,
    params: Any,
    x1,
    x2,
    *,
    mesh,
    tile_size: int | None,
    trace_outputs: bool,
    precision: str,
    options: dict | None = None,
) -> jax.Array:
    """``Θ(x1, x2)`` with its rows computed on, and left on, the devices of ``mesh``.

    x1 is padded to a multiple of the device count (copies of its last row)
    and split over all mesh axes; x2 is replicated; every device evaluates
    ``tile_fn`` on its rows against all of x2, in ``tile_size`` tiles. The
    result is row-sharded (``NamedSharding(mesh, P(mesh.axis_names))``) when
    N1 is a multiple of the device count; otherwise the padding rows are
    trimmed and JAX, which has no uneven shardings, returns the kernel
    replicated — pass N1 divisible by the number of devices to keep it split.

    Args:
      tile_fn: a method's tile function ``tile(model, params, x1, x2, *,
        trace_outputs, same, precision, **options)``.
      options: the method's keyword options (arrays are traced, the rest static).
    """
    mesh = check_mesh(mesh)
    options = dict(options or {})
    array_options = {k: v for k, v in options.items() if isinstance(v, (jax.Array, np.ndarray))}
    static_options = tuple(sorted((k, v) for k, v in options.items() if k not in array_options))
    n1 = x1.shape[0]
    n_pad = mesh.size * max(1, math.ceil(n1 / mesh.size))
    spec, rep = example_spec(mesh), PartitionSpec()
    x1p = place(pad_rows(x1, n_pad), mesh, spec)
    out = _rows(
        jax.tree_util.tree_map(lambda a: place(a, mesh, rep), model),
        jax.tree_util.tree_map(lambda a: place(a, mesh, rep), params),
        x1p, place(x2, mesh, rep), jax.tree_util.tree_map(lambda a: place(a, mesh, rep), array_options),
        tile_fn=tile_fn, mesh=mesh, tile_size=tile_size, trace_outputs=trace_outputs, precision=precision,
        static_options=static_options,
    )
    return out if n_pad == n1 else out[:n1]
