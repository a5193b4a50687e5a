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
* ``"structured"`` — (:mod:`ntkdyn.structured`) dense / conv / bias layers
  as products of Gram matrices of activations and output cotangents, never
  forming per-example gradients; other leaves by per-example Jacobians.
* ``"auto"`` — picks the method with the lowest estimated time (FLOPs and
  bytes, :class:`TileCost`) at the tile size the memory budget allows.

``batch_size="auto"`` (the default) tiles only when one tile would exceed
``memory_limit`` (default: half the memory the OS reports available).
:func:`ntk_vp` computes ``Θ v`` without forming ``Θ`` (one VJP + one JVP).

Further methods register themselves in :data:`METHODS` from their own modules
(:func:`register_method`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn._checks import check_finite, check_batch, is_concrete

__all__ = [
    "empirical_ntk",
    "ntk_vp",
    "plan_ntk",
    "METHODS",
    "TileCost",
    "register_method",
    "output_shape",
    "flat_param_count",
    "jaxpr_cost",
    "available_memory",
]

# name -> tile function(apply_fn, params, x1, x2, *, trace_outputs, same, **options)
METHODS: dict[str, Callable[..., jax.Array]] = {}
# name -> cost_fn(apply_fn, params, x1, x2, trace_outputs) -> TileCost | None
_AUTO_COSTS: dict[str, Callable[..., "TileCost | None"]] = {}
# modules that register methods when imported; imported lazily so that
# ntk.py stays at the bottom of the import graph
_METHOD_MODULES = ("ntkdyn.structured", "ntkdyn.sketch")

# rough machine model for comparing methods (only ratios matter)
_FLOP_RATE = 2.0e10  # FLOP/s
_BYTE_RATE = 5.0e9  # B/s of memory traffic
_TILE_OVERHEAD = 2.0e-4  # s per tile dispatch
_MEMORY_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class TileCost:
    """Cost model of one method for one tile of ``n1 × n2`` inputs.

    Attributes:
      flops: ``flops(n1, n2)`` — floating-point operations for the tile.
      memory: ``memory(n1, n2)`` — peak bytes of the tile's intermediates.
    """

    flops: Callable[[int, int], float]
    memory: Callable[[int, int], float]

    def seconds(self, n1: int, n2: int) -> float:
        """Estimated time of one tile: ``flops/rate + bytes/bandwidth + overhead``."""
        return self.flops(n1, n2) / _FLOP_RATE + self.memory(n1, n2) / _BYTE_RATE + _TILE_OVERHEAD


def register_method(name: str, tile_fn: Callable[..., jax.Array], cost_fn: Callable[..., "TileCost | None"] | None = None):
    """Add an NTK method.

    ``tile_fn(apply_fn, params, x1, x2, *, trace_outputs, same, **options)``
    returns one tile of the kernel. ``cost_fn(apply_fn, params, x1, x2,
    trace_outputs)`` (optional) returns a :class:`TileCost` (or None when
    the method does not apply), which lets ``method="auto"`` and
    ``batch_size="auto"`` weigh it.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a non-empty method name other than 'auto', got {name!r}")
    if not callable(tile_fn):
        raise TypeError(f"tile_fn: expected a callable, got {tile_fn!r}")
    METHODS[name] = tile_fn
    if cost_fn is not None:
        _AUTO_COSTS[name] = cost_fn


def _load_methods() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


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


def _per_example_cost(apply_fn, params, x) -> tuple[float, int]:
    """FLOPs and intermediate values of ``apply_fn`` on one example."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for l in leaves]
    xs = jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.result_type(x))
    closed = jax.make_jaxpr(lambda ls, xx: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), xx))(specs, xs)
    return jaxpr_cost(closed.jaxpr)


def _jacobian_cost(apply_fn, params, x1, x2, trace_outputs) -> TileCost:
    """Batched ``jacrev`` (N·K reverse passes over the whole tile) + contraction."""
    fwd, act = _per_example_cost(apply_fn, params, x1)
    _, k = output_shape(apply_fn, params, x1[:1])
    kk = k if trace_outputs else k * k
    p = flat_param_count(params)
    item = _itemsize(apply_fn, params, x1)

    def flops(n1, n2):
        return 3.0 * fwd * k * (n1 * n1 + n2 * n2) + 2.0 * n1 * n2 * kk * p

    def memory(n1, n2):
        return item * (k * p * (n1 + n2) + k * act * max(n1, n2) ** 2 + 2 * n1 * n2 * kk)

    return TileCost(flops, memory)


def _ntvp_cost(apply_fn, params, x1, x2, trace_outputs) -> TileCost:
    """Per column of the x2 tile (N2·K of them): one VJP over N2, one JVP over N1."""
    fwd, act = _per_example_cost(apply_fn, params, x1)
    _, k = output_shape(apply_fn, params, x1[:1])
    p = flat_param_count(params)
    item = _itemsize(apply_fn, params, x1)

    def flops(n1, n2):
        return k * n2 * (2.0 * fwd * n2 + 3.0 * fwd * n1) + fwd * n2

    def memory(n1, n2):
        return item * (k * n2 * (p + act * (n1 + n2)) + n1 * n2 * k * k * 2)

    return TileCost(flops, memory)


def _itemsize(apply_fn, params, x) -> int:
    return jnp.dtype(jax.eval_shape(apply_fn, params, x[:1]).dtype).itemsize


def available_memory() -> int:
    """Bytes the OS reports available (``MemAvailable`` on Linux), for the default budget."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


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


register_method("jacobian", _jacobian_tile, _jacobian_cost)
register_method("ntvp", _ntvp_tile, _ntvp_cost)


def _largest_tile(cost: TileCost, n1: int, n2: int, budget: float) -> int:
    """Largest tile size b (≤ max(n1, n2)) whose tile fits in ``budget`` bytes (at least 1)."""
    hi = max(n1, n2)

    def fits(b):
        return cost.memory(min(b, n1), min(b, n2)) <= budget

    if fits(hi):
        return hi
    lo = 1
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _total_seconds(cost: TileCost, n1: int, n2: int, b: int, symmetric: bool) -> float:
    t1, t2 = -(-n1 // b), -(-n2 // b)
    tiles = t1 * (t1 + 1) / 2 if symmetric else t1 * t2
    return tiles * cost.seconds(min(b, n1), min(b, n2))


_COST_CACHE: "collections.OrderedDict[tuple, TileCost | None]" = collections.OrderedDict()
_COST_CACHE_SIZE = 64


def _abstract(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(l)), str(jnp.result_type(l))) for l in leaves)


def _method_cost(name, apply_fn, params, x1, x2, trace_outputs):
    """``TileCost`` of one method, cached per (apply_fn, shapes): planning traces the model.

    Costs depend on shapes only. The key holds ``apply_fn`` itself, so while
    an entry lives its function cannot be freed and its id reused; unhashable
    functions are planned afresh every call.
    """
    cost_fn = _AUTO_COSTS.get(name)
    if cost_fn is None:
        return None
    try:
        key = (name, apply_fn, _abstract(params), _abstract(x1), None if x2 is None else _abstract(x2), trace_outputs)
        hash(key)
    except TypeError:
        return cost_fn(apply_fn, params, x1, x2, trace_outputs)
    if key in _COST_CACHE:
        _COST_CACHE.move_to_end(key)
        return _COST_CACHE[key]
    cost = cost_fn(apply_fn, params, x1, x2, trace_outputs)
    _COST_CACHE[key] = cost
    if len(_COST_CACHE) > _COST_CACHE_SIZE:
        _COST_CACHE.popitem(last=False)
    return cost


def _plan_method(apply_fn, params, x1, x2, trace_outputs, symmetric, method, budget):
    """``(method, batch_size)``: the requested or cheapest method, and the tile size the budget allows."""
    names = sorted(_AUTO_COSTS) if method == "auto" else [method]
    n1, n2 = x1.shape[0], x2.shape[0]
    best = None
    concrete = all(is_concrete(l) for l in jax.tree_util.tree_leaves((params, x1, x2)))
    for name in names:
        args = (name, apply_fn, params, x1, None if symmetric else x2, trace_outputs)
        # under tracing the cost functions skip their value probes, so those plans are not cached
        cost = _method_cost(*args) if concrete else (_AUTO_COSTS[name](*args[1:]) if name in _AUTO_COSTS else None)
        if cost is None:
            continue
        b = _largest_tile(cost, n1, n2, budget) if budget is not None else max(n1, n2)
        # same number of tiles, less padding in the last one
        b = -(-max(n1, n2) // -(-max(n1, n2) // b))
        seconds = _total_seconds(cost, n1, n2, b, symmetric)
        if best is None or seconds < best[0]:
            best = (seconds, name, b)
    if best is None:
        if method == "auto":
            return "jacobian", None
        return method, None
    return best[1], best[2]


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


def _tiled(tile, x1, x2, batch_size: int, trace_outputs: bool, symmetric: bool, concrete: bool) -> jax.Array:
    """Assemble the kernel from ``batch_size × batch_size`` tiles (upper triangle only when symmetric).

    With concrete inputs and params the tiles are written into one host buffer,
    so the peak is the kernel plus one tile; under tracing (jit/grad over
    inputs or params) they are concatenated.
    """
    n1, n2 = x1.shape[0], x2.shape[0]
    t1, t2 = -(-n1 // batch_size), -(-n2 // batch_size)
    p1 = _pad_rows(x1, t1 * batch_size)
    p2 = p1 if symmetric else _pad_rows(x2, t2 * batch_size)

    def block(i, j):
        xi = p1[i * batch_size : (i + 1) * batch_size]
        xj = p2[j * batch_size : (j + 1) * batch_size]
        return tile(xi, xj, same=symmetric and i == j)

    if concrete:
        out = None
        for i in range(t1):
            for j in range(i if symmetric else 0, t2):
                b = np.asarray(block(i, j))
                if out is None:
                    out = np.empty((n1, n2, *b.shape[2:]), b.dtype)
                r0, c0 = i * batch_size, j * batch_size
                rows, cols = min(batch_size, n1 - r0), min(batch_size, n2 - c0)
                out[r0 : r0 + rows, c0 : c0 + cols] = b[:rows, :cols]
                if symmetric and j > i:
                    out[c0 : c0 + cols, r0 : r0 + rows] = np.asarray(_transpose_block(b, trace_outputs))[:cols, :rows]
        return jnp.asarray(out)

    blocks: dict[tuple[int, int], jax.Array] = {}
    for i in range(t1):
        for j in range(t2):
            if symmetric and j < i:
                blocks[i, j] = _transpose_block(blocks[j, i], trace_outputs)
            else:
                blocks[i, j] = block(i, j)
    rows = [jnp.concatenate([blocks[i, j] for j in range(t2)], axis=1) for i in range(t1)]
    return jnp.concatenate(rows, axis=0)[:n1, :n2]


# --------------------------------------------------------------------------- #
# public entry points
# --------------------------------------------------------------------------- #


def _check_inputs(apply_fn, params, x1, x2):
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
    _, k = output_shape(apply_fn, params, x1[:1])
    return x1, x2, symmetric, k


def _memory_budget(memory_limit) -> float:
    if memory_limit is None:
        return _MEMORY_FRACTION * available_memory()
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float, np.integer, np.floating)):
        raise TypeError(f"memory_limit: expected None or a number of bytes, got {memory_limit!r}")
    if not memory_limit > 0:
        raise ValueError(f"memory_limit: expected a positive number of bytes, got {memory_limit!r}")
    return float(memory_limit)


def _resolve(apply_fn, params, x1, x2, symmetric, k, trace_outputs, method, batch_size, memory_limit):
    _load_methods()
    if not isinstance(method, str) or (method != "auto" and method not in METHODS):
        raise ValueError(f"method: expected 'auto' or one of {sorted(METHODS)}, got {method!r}")
    auto_batch = isinstance(batch_size, str) and batch_size == "auto"
    if not auto_batch and batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size: expected None, 'auto' or an integer >= 1, got {batch_size!r}")
    if method != "auto" and not auto_batch:
        return method, batch_size
    budget = None
    if auto_batch:
        limit = _memory_budget(memory_limit)
        n1, n2 = x1.shape[0], x2.shape[0]
        kernel_bytes = n1 * n2 * (1 if trace_outputs else k * k) * _itemsize(apply_fn, params, x1)
        # the host buffer and the returned array both hold the kernel
        budget = limit - 2 * kernel_bytes
        if budget <= 0:
            raise ValueError(
                f"memory_limit: the kernel alone needs {2 * kernel_bytes / 2**30:.3g} GiB "
                f"(buffer + result) of the {limit / 2**30:.3g} GiB allowed; "
                "use trace_outputs=True, fewer inputs, ntk_vp, or a larger memory_limit"
            )
    method, planned = _plan_method(apply_fn, params, x1, x2, trace_outputs, symmetric, method, budget)
    return method, (planned if auto_batch else batch_size)


def plan_ntk(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    trace_outputs: bool = False,
    method: str = "auto",
    batch_size: int | str | None = "auto",
    memory_limit: float | None = None,
) -> tuple[str, int | None]:
    """``(method, batch_size)`` that :func:`empirical_ntk` would use with these arguments.

    ``"auto"`` entries are resolved with the cost model (no kernel is
    computed; the model is traced, not run, except for a two-row forward
    probe of batch independence by the structured method).
    """
    x1, x2, symmetric, k = _check_inputs(apply_fn, params, x1, x2)
    return _resolve(apply_fn, params, x1, x2, symmetric, k, trace_outputs, method, batch_size, memory_limit)


def empirical_ntk(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    trace_outputs: bool = False,
    method: str = "auto",
    batch_size: int | str | None = "auto",
    memory_limit: float | None = None,
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
      method: one of :data:`METHODS` (``"jacobian"``, ``"ntvp"``,
        ``"structured"``, plus any registered elsewhere) or ``"auto"``: the
        method with the lowest estimated time at the tile size the memory
        budget allows (cost model: :class:`TileCost` of each method).
      batch_size: tile size along N1 and N2; any N works (the last tile is
        padded and trimmed). ``None`` computes in one tile; ``"auto"`` picks
        the largest tile whose intermediates fit in ``memory_limit``.
      memory_limit: bytes the tiles' intermediates may use with
        ``batch_size="auto"`` (the kernel itself, ``N1·N2·K²`` values, comes
        on top). Default: half of the memory the OS reports available.
      **method_options: extra keywords for the chosen method (documented there).

    Returns:
      ``(N1, N2, K, K)`` or, with ``trace_outputs``, ``(N1, N2)``, in the
      output dtype of ``apply_fn``.
    """
    x1, x2, symmetric, k = _check_inputs(apply_fn, params, x1, x2)
    method, batch_size = _resolve(apply_fn, params, x1, x2, symmetric, k, trace_outputs, method, batch_size, memory_limit)
    tile_fn = METHODS[method]
    tile = functools.partial(tile_fn, apply_fn, params, trace_outputs=trace_outputs, **method_options)

    if batch_size is None or int(batch_size) >= max(x1.shape[0], x2.shape[0]):
        return tile(x1, x2, same=symmetric)
    concrete = is_concrete(x1) and is_concrete(x2) and all(is_concrete(l) for l in jax.tree_util.tree_leaves(params))
    return _tiled(tile, x1, x2, int(batch_size), trace_outputs, symmetric, concrete)


# --------------------------------------------------------------------------- #
# NTK-vector products
# --------------------------------------------------------------------------- #


def _chunks(x: jax.Array, size: int) -> jax.Array:
    """(T, size, ...) view of x padded with its last row to a multiple of ``size``."""
    t = -(-x.shape[0] // size)
    return _pad_rows(x, t * size).reshape(t, size, *x.shape[1:])


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "batch_size"))
def _ntk_vp(apply_fn, params, x1, x2, v, *, trace_outputs: bool, batch_size: int):
    n1, n2 = x1.shape[0], x2.shape[0]
    k = jax.eval_shape(apply_fn, params, x2[:1]).shape[1]
    if trace_outputs:
        # column (k, m) of the cotangents is v[:, m] placed on output k only
        cot = jnp.einsum("jm,lk->jlkm", v, jnp.eye(k, dtype=v.dtype)).reshape(n2, k, k * v.shape[-1])
    else:
        cot = v  # (N2, K, M)
    m = cot.shape[-1]
    xs2 = _chunks(x2, batch_size)
    cs2 = jnp.concatenate([cot, jnp.zeros((xs2.shape[0] * batch_size - n2, k, m), cot.dtype)]).reshape(
        xs2.shape[0], batch_size, k, m
    )

    def pull(acc, xc):
        xb, cb = xc
        _, vjp = jax.vjp(lambda p: apply_fn(p, xb), params)
        t = jax.vmap(lambda c: vjp(c)[0], in_axes=-1, out_axes=-1)(cb)
        return jax.tree_util.tree_map(jnp.add, acc, t), None

    zeros_m = jax.tree_util.tree_map(lambda z: jnp.zeros((*jnp.shape(z), m), jnp.result_type(z)), params)
    tangent, _ = jax.lax.scan(pull, zeros_m, (xs2, cs2))  # Σ_j J(x2_j)ᵀ v_j, one per column

    def push(xb):
        jvp = lambda t: jax.jvp(lambda p: apply_fn(p, xb), (params,), (t,))[1]  # noqa: E731
        return jax.vmap(jvp, in_axes=-1, out_axes=-1)(tangent)  # (b, K, M)

    out = jax.lax.map(push, _chunks(x1, batch_size)).reshape(-1, k, m)[:n1]
    if trace_outputs:
        out = out.reshape(n1, k, k, v.shape[-1])
        return jnp.sum(jnp.diagonal(out, axis1=1, axis2=2), axis=-1) / k
    return out


def ntk_vp(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None,
    v: jax.Array,
    *,
    trace_outputs: bool = False,
    batch_size: int | None = None,
) -> jax.Array:
    """NTK-vector product ``Θ(x1, x2) · v`` without forming Θ (matrix-free).

    Full kernel: ``(Θ v)[i, k] = Σ_{j,l} Θ(x1_i, x2_j)[k, l] v[j, l] = J(x1) (J(x2)ᵀ v)``,
    one VJP over ``x2`` followed by one JVP over ``x1``: cost ≈ 3 forward
    passes over N1 + N2 inputs per vector, memory O(P + batch activations).
    Traced kernel: ``(Θ_tr v)[i] = (1/K) Σ_k Σ_j J_k(x1_i)·J_k(x2_j) v[j]``
    (K VJP/JVP pairs).

    Args:
      apply_fn, params: as for :func:`empirical_ntk`.
      x1: (N1, ...) inputs; x2: (N2, ...) inputs or None for ``x1``.
      v: full kernel: (N2, K) or a batch of M vectors (N2, K, M); traced:
        (N2,) or (N2, M).
      trace_outputs: multiply by the output-traced kernel (N1, N2) instead.
      batch_size: inputs per VJP/JVP call (bounds memory at large N);
        ``None`` processes all inputs at once.

    Returns:
      Same layout as ``v`` with N1 rows: (N1, K[, M]) or traced (N1[, M]).
    """
    x1, x2, _, k = _check_inputs(apply_fn, params, x1, x2)
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        raise TypeError(f"v: expected a floating-point array, got dtype {v.dtype}")
    n2 = x2.shape[0]
    single = v.ndim == (1 if trace_outputs else 2)
    expected = f"({n2},) or ({n2}, M)" if trace_outputs else f"({n2}, {k}) or ({n2}, {k}, M)"
    lead = v.shape[:1] if trace_outputs else v.shape[:2]
    if v.ndim not in ((1, 2) if trace_outputs else (2, 3)) or lead != ((n2,) if trace_outputs else (n2, k)):
        raise ValueError(f"v: expected shape {expected}, got {tuple(v.shape)}")
    if is_concrete(v):
        check_finite("v", v)
    if batch_size is None:
        batch_size = max(x1.shape[0], n2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected None or an integer >= 1, got {batch_size!r}")
    vm = v[..., None] if single else v
    out_dtype = jax.eval_shape(apply_fn, params, x1[:1]).dtype
    out = _ntk_vp(apply_fn, params, x1, x2, vm.astype(out_dtype), trace_outputs=trace_outputs,
                  batch_size=int(min(batch_size, max(x1.shape[0], n2))))
    return out[..., 0] if single else out
