"""Empirical Neural Tangent Kernel.

``Θ(x, x') = J(x) J(x')ᵀ`` with ``J = ∂f/∂θ`` at the given params, all
parameter leaves flattened and summed over::

    Θ(x1_i, x2_j)[k, l] = Σ_p ∂f_k(θ, x1_i)/∂θ_p · ∂f_l(θ, x2_j)/∂θ_p

Full form: shape (N1, N2, K, K). Output-traced form (``trace_outputs=True``):
the mean over the diagonal output pairs, ``(1/K) Σ_k Θ[:, :, k, k]``, shape
(N1, N2); ``Θ_full ≈ Θ_tr ⊗ I_K`` for wide networks with a dense readout.

Methods (each computes one tile; tiling over x1 and x2 bounds memory):

* ``"jacobian"`` — Jacobian contraction: per-tile Jacobians by reverse mode,
  contracted leaf by leaf over the params pytree. Cost ≈ N·K backward passes
  plus ``N1·N2·K²·P`` multiply-adds; memory ``(N1+N2)·K·P``.
* ``"ntvp"`` — NTK-vector products: for every column ``e`` of the x2 tile,
  ``J1 (J2ᵀ e)`` as one VJP followed by one JVP. Cost ≈ N2·K (VJP + JVP).
* ``"auto"`` — picks among the registered methods from the sizes.

Further methods (structured derivatives, random-probe sketches) register
themselves in :data:`METHODS` from their own modules.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn._checks import check_finite, check_batch, is_concrete

__all__ = ["empirical_ntk", "METHODS", "register_method", "output_shape", "flat_param_count"]

# name -> tile function(apply_fn, params, x1, x2, *, trace_outputs, same, **options)
METHODS: dict[str, Callable[..., jax.Array]] = {}
# name -> chooser hook(apply_fn, params, x1, x2, trace_outputs) -> score (lower is better) or None
_AUTO_COSTS: dict[str, Callable[..., float | None]] = {}


def register_method(name: str, tile_fn: Callable[..., jax.Array], cost_fn: Callable[..., float | None] | None = None):
    """Add an NTK method. ``cost_fn`` (optional) lets ``method="auto"`` weigh it."""
    METHODS[name] = tile_fn
    if cost_fn is not None:
        _AUTO_COSTS[name] = cost_fn


def output_shape(apply_fn, params, x) -> tuple[int, int]:
    """``(N, K)`` of ``apply_fn(params, x)``, without running it; checks it is 2-D."""
    out = jax.eval_shape(apply_fn, params, x)
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(
            "apply_fn: expected apply_fn(params, x) to return an array of shape (N, K); "
            f"got {getattr(out, 'shape', type(out).__name__)} for x of shape {tuple(x.shape)}"
        )
    if out.shape[0] != x.shape[0]:
        raise ValueError(
            f"apply_fn: output has {out.shape[0]} rows for {x.shape[0]} inputs; "
            "apply_fn(params, x) must map a batch of N inputs to (N, K)"
        )
    return tuple(out.shape)


def flat_param_count(params) -> int:
    """Number of scalar parameters in the pytree."""
    return int(sum(math.prod(np.shape(l)) for l in jax.tree_util.tree_leaves(params)))


def _check_params(params) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params: the pytree has no array leaves; there is nothing to differentiate")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"params: leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "every parameter must be a floating-point array to be differentiated"
            )


# --------------------------------------------------------------------------- #
# tile methods
# --------------------------------------------------------------------------- #


def _contract(j1: jax.Array, j2: jax.Array, trace_outputs: bool) -> jax.Array:
    """Contract per-leaf Jacobians (N1, K, *s) and (N2, K, *s) over the leaf axes."""
    a = j1.reshape(j1.shape[0], j1.shape[1], -1)
    b = j2.reshape(j2.shape[0], j2.shape[1], -1)
    if trace_outputs:
        return jnp.einsum("ikp,jkp->ij", a, b) / a.shape[1]
    return jnp.einsum("ikp,jlp->ijkl", a, b)


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "same"))
def _jacobian_tile(apply_fn, params, x1, x2, *, trace_outputs: bool, same: bool) -> jax.Array:
    j1 = jax.jacrev(lambda p: apply_fn(p, x1))(params)
    j2 = j1 if same else jax.jacrev(lambda p: apply_fn(p, x2))(params)
    blocks = jax.tree_util.tree_map(lambda a, b: _contract(a, b, trace_outputs), j1, j2)
    return functools.reduce(jnp.add, jax.tree_util.tree_leaves(blocks))


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "same"))
def _ntvp_tile(apply_fn, params, x1, x2, *, trace_outputs: bool, same: bool) -> jax.Array:
    del same
    out2, vjp2 = jax.vjp(lambda p: apply_fn(p, x2), params)
    n2, k = out2.shape
    basis = jnp.eye(n2 * k, dtype=out2.dtype).reshape(n2 * k, n2, k)

    def column(cot):
        (tangent,) = vjp2(cot)
        return jax.jvp(lambda p: apply_fn(p, x1), (params,), (tangent,))[1]

    cols = jax.vmap(column)(basis)  # [(j, l), i, k] = Θ(x1_i, x2_j)[k, l]
    full = cols.reshape(n2, k, cols.shape[1], k).transpose(2, 0, 3, 1)
    if trace_outputs:
        return jnp.trace(full, axis1=2, axis2=3) / k
    return full


register_method("jacobian", _jacobian_tile)
register_method("ntvp", _ntvp_tile)


def _auto_method(apply_fn, params, x1, x2, trace_outputs) -> str:
    scored = []
    for name, cost in _AUTO_COSTS.items():
        value = cost(apply_fn, params, x1, x2, trace_outputs)
        if value is not None:
            scored.append((value, name))
    if scored:
        return min(scored)[1]
    return "jacobian"


# --------------------------------------------------------------------------- #
# tiling
# --------------------------------------------------------------------------- #


def _pad_rows(x: jax.Array, size: int) -> jax.Array:
    """Pad to ``size`` rows by repeating the last row (stays in the input domain)."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def _transpose_block(block: jax.Array, trace_outputs: bool) -> jax.Array:
    return block.T if trace_outputs else block.transpose(1, 0, 3, 2)


def _tiled(tile, x1, x2, batch_size: int, trace_outputs: bool, symmetric: bool) -> jax.Array:
    n1, n2 = x1.shape[0], x2.shape[0]
    t1, t2 = -(-n1 // batch_size), -(-n2 // batch_size)
    p1 = _pad_rows(x1, t1 * batch_size)
    p2 = p1 if symmetric else _pad_rows(x2, t2 * batch_size)
    blocks: dict[tuple[int, int], jax.Array] = {}
    for i in range(t1):
        xi = p1[i * batch_size : (i + 1) * batch_size]
        for j in range(t2):
            if symmetric and j < i:
                blocks[i, j] = _transpose_block(blocks[j, i], trace_outputs)
                continue
            xj = p2[j * batch_size : (j + 1) * batch_size]
            blocks[i, j] = tile(xi, xj, same=symmetric and i == j)
    rows = [jnp.concatenate([blocks[i, j] for j in range(t2)], axis=1) for i in range(t1)]
    return jnp.concatenate(rows, axis=0)[:n1, :n2]


# --------------------------------------------------------------------------- #
# public entry point
# --------------------------------------------------------------------------- #


def empirical_ntk(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    trace_outputs: bool = False,
    method: str = "auto",
    batch_size: int | None = None,
    **method_options,
) -> jax.Array:
    """Empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` at ``params``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``, pure and differentiable.
      params: any pytree of floating-point arrays (the θ the Jacobian is taken in).
      x1: inputs, shape (N1, ...).
      x2: inputs, shape (N2, ...) with the same trailing shape; ``None`` means
        ``x1`` (and the symmetric kernel is computed once per tile pair).
      trace_outputs: return the output-traced kernel (N1, N2) — the mean of the
        diagonal output pairs — instead of the full (N1, N2, K, K).
      method: one of :data:`METHODS` (``"jacobian"``, ``"ntvp"``, plus any
        registered by other modules) or ``"auto"``.
      batch_size: tile size along N1 and N2; any N works (the last tile is
        padded and trimmed). ``None`` computes in one tile.
      **method_options: extra keywords for the chosen method (documented there).

    Returns:
      ``(N1, N2, K, K)`` or, with ``trace_outputs``, ``(N1, N2)``, in the
      output dtype of ``apply_fn``.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    _check_params(params)
    x1 = check_batch("x1", x1)
    symmetric = x2 is None
    x2 = x1 if symmetric else check_batch("x2", x2)
    if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x2: expected trailing shape {tuple(x1.shape[1:])} to match x1, got {tuple(x2.shape[1:])}"
        )
    if is_concrete(x1):
        check_finite("x1", x1)
        if not symmetric:
            check_finite("x2", x2)
    output_shape(apply_fn, params, x1[:1])

    if method == "auto":
        method = _auto_method(apply_fn, params, x1, x2, trace_outputs)
    if method not in METHODS:
        raise ValueError(f"method: expected 'auto' or one of {sorted(METHODS)}, got {method!r}")
    tile_fn = METHODS[method]
    tile = functools.partial(tile_fn, apply_fn, params, trace_outputs=trace_outputs, **method_options)

    if batch_size is None:
        return tile(x1, x2, same=symmetric)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected None or an integer >= 1, got {batch_size!r}")
    batch_size = int(min(batch_size, max(x1.shape[0], x2.shape[0])))
    return _tiled(lambda a, b, same: tile(a, b, same=same), x1, x2, batch_size, trace_outputs, symmetric)
