"""Entry points: the empirical NTK, its plan, and the NTK-vector product.

``Θ(x, x') = J(x) J(x')ᵀ`` with ``J = ∂f/∂θ`` at the given params, all
parameter leaves flattened and summed over::

    Θ(x1_i, x2_j)[k, l] = Σ_p ∂f_k(θ, x1_i)/∂θ_p · ∂f_l(θ, x2_j)/∂θ_p

Full form (N1, N2, K, K); output-traced form (N1, N2), the mean over the
diagonal output pairs (:mod:`ntkdyn.kernels.layout`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn import _validate
from ntkdyn.kernels import costs, planner
from ntkdyn.kernels.methods import METHODS
from ntkdyn.kernels.operator import ntk_vp_chunked
from ntkdyn.kernels.precision import normalize
from ntkdyn.kernels.tiling import tiled
from ntkdyn.models import as_model

__all__ = ["empirical_ntk", "plan_ntk", "ntk_vp", "output_shape"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@functools.lru_cache(maxsize=256)
def _output(model_sig, params_sig, x_sig) -> tuple[tuple[int, int], np.dtype]:
    model, params, x = (costs.from_signature(s) for s in (model_sig, params_sig, x_sig))
    return costs.output_shape(model, params, x), costs.output_dtype(model, params, x)


def _output_of(model, params, x) -> tuple[tuple[int, int], np.dtype]:
    """``((N, K), dtype)`` of ``model(params, x)``, checked; cached per (model graph, shapes)."""
    return _output(*(costs.signature(t) for t in (model, params, x)))


def output_shape(apply_fn: ApplyFn, params: Any, x) -> tuple[int, int]:
    """``(N, K)`` of ``apply_fn(params, x)`` for the whole batch, without running it.

    ValueError naming ``apply_fn`` unless the output is 2-D with one row per
    input. Cached per (model graph, shapes): the model is traced once.
    """
    return _output_of(as_model(apply_fn), params, x if hasattr(x, "shape") else jnp.asarray(x))[0]


def check_rows(model, params, x, rows: int, k: int) -> None:
    """ValueError naming ``apply_fn`` unless a batch of ``rows`` inputs like ``x`` maps to ``(rows, k)``.

    Tiles, chunks, device shares and the cost model evaluate the model on
    batches of other sizes than the whole one (whose output :func:`output_shape`
    checks): every size actually used must give one row per input and the
    same K, or the assembled kernel would be silently wrong. Shapes only
    (cached per model graph and shapes); the whole batch itself is skipped.
    """
    if rows == np.shape(x)[0]:
        return
    try:
        (_, got), _ = _output_of(model, params, costs.example_rows(x, rows))
    except Exception as err:  # noqa: BLE001 -- whatever the model raises on this batch size, name apply_fn
        detail = str(err).split("\n")[0]
        if detail.startswith("apply_fn: "):
            detail = detail[len("apply_fn: "):]
        raise ValueError(
            f"apply_fn: expected apply_fn(params, x) to map any batch of n inputs to (n, K) (tiles, chunks and "
            f"the cost model evaluate it on batches of {rows}); on a batch of {rows}: {detail}"
        ) from err
    if got != k:
        raise ValueError(
            f"apply_fn: output has {got} columns for a batch of {rows} inputs but {k} for the whole batch; "
            "apply_fn(params, x) must map any batch of n inputs to (n, K)"
        )


@jax.jit
def _all_finite(params) -> jax.Array:
    """Whether every parameter is finite: NaN/inf make the sum of a leaf non-finite (one fused pass)."""
    return functools.reduce(jnp.logical_and, [jnp.isfinite(jnp.sum(l)) for l in jax.tree_util.tree_leaves(params)])


def _check_params(params) -> None:
    """Structure and dtypes, then values (when concrete) on the device: ~3× cheaper than on the host for large P."""
    _validate.params_tree("params", params, values=False)
    if not _validate.is_concrete(params):
        return
    with jax.ensure_compile_time_eval():  # concrete params inside someone's jit: still check them now
        ok = bool(_all_finite(params))
    if not ok:
        _validate.finite("params", params)  # counts the bad entries for the message


def _inputs(apply_fn, params, x1, x2):
    """``(model, x1, x2, symmetric, K)`` after every argument check that needs no plan."""
    model = as_model(apply_fn)
    _check_params(params)
    x1 = _validate.batch("x1", x1)
    symmetric = x2 is None
    x2 = x1 if symmetric else _validate.batch("x2", x2)
    if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x2: expected trailing shape {tuple(x1.shape[1:])} to match x1, got {tuple(x2.shape[1:])}")
    (_, k), _ = _output_of(model, params, x1)
    if not symmetric:
        _output_of(model, params, x2)
    return model, x1, x2, symmetric, k


def _tile_size(tile_size) -> int | str | None:
    """None, ``"auto"`` or a concrete integer >= 1 (Python, NumPy or JAX scalar) as a Python int."""
    if isinstance(tile_size, str) and tile_size == "auto":
        return tile_size
    if tile_size is None:
        return None
    try:
        return _validate.count("tile_size", tile_size)
    except (TypeError, ValueError):
        raise ValueError(f"tile_size: expected None, 'auto' or an integer >= 1, got {tile_size!r}") from None


def _check_fits(memory: float, budget: float, tile: int | None, what: str) -> None:
    if memory > budget:
        raise ValueError(
            f"tile_size: a tile of {tile if tile is not None else 'all'} inputs needs about {memory / 2**20:.3g} MiB "
            f"for {what}, more than the {budget / 2**20:.3g} MiB memory_limit leaves; "
            "use tile_size='auto' (or a smaller tile)"
        )


def _resolve(model, params, x1, x2, symmetric, k, trace_outputs, method, tile_size, memory_limit, options):
    """``(method, tile size)`` after validating method, options, tile_size and memory_limit."""
    if not isinstance(method, str) or (method != "auto" and method not in METHODS):
        raise ValueError(f"method: expected 'auto' or one of {sorted(METHODS)}, got {method!r}")
    allowed = () if method == "auto" else METHODS[method].options
    for name in options:
        if name not in allowed:
            raise TypeError(
                f"{name}: not an option of method {method!r} (its options: {allowed or 'none'}); "
                "method options need an explicit method"
            )
    tile_size = _tile_size(tile_size)
    auto_tile = tile_size == "auto"
    if method == "auto" or auto_tile or memory_limit is not None:
        check_rows(model, params, x1, 1, k)  # the cost model traces one input
    budget = None
    if auto_tile or memory_limit is not None:
        limit = planner.memory_budget(memory_limit)
        n1, n2 = x1.shape[0], x2.shape[0]
        kernel_bytes = n1 * n2 * (1 if trace_outputs else k * k) * _output_of(model, params, x1)[1].itemsize
        # the host buffer and the returned array both hold the kernel
        budget = limit - 2 * kernel_bytes
        if budget <= 0:
            raise ValueError(
                f"memory_limit: the kernel alone needs {2 * kernel_bytes / 2**30:.3g} GiB "
                f"(buffer + result) of the {limit / 2**30:.3g} GiB allowed; "
                "use trace_outputs=True, fewer inputs, ntk_vp, or a larger memory_limit"
            )
    if method == "auto" or auto_tile:
        method, planned = planner.choose(
            method, model, params, x1, x2, symmetric=symmetric, trace_outputs=trace_outputs,
            budget=budget if auto_tile else None, options=options,
        )
        if auto_tile:
            return method, planned
    if budget is not None:  # an explicit tile under an explicit budget
        cost = planner.method_cost(method, model, params, x1, None if symmetric else x2, trace_outputs, options)
        if cost is not None:
            b = max(x1.shape[0], x2.shape[0]) if tile_size is None else tile_size
            memory = cost.memory(min(b, x1.shape[0]), min(b, x2.shape[0]))
            _check_fits(memory, budget, tile_size, f"method {method!r}")
    return method, tile_size


def plan_ntk(apply_fn: ApplyFn, params: Any, x1: jax.Array, x2: jax.Array | None = None, *,
             trace_outputs: bool = False, method: str = "auto", tile_size: int | str | None = "auto",
             memory_limit: float | None = None, **method_options) -> tuple[str, int | None]:
    """``(method, tile_size)`` that :func:`empirical_ntk` would use with these arguments.

    ``"auto"`` entries are resolved with the cost model (no kernel is
    computed; the model is traced, not run, except for a two-row forward
    probe of batch independence before ``"auto"`` picks the structured method).
    """
    model, x1, x2, symmetric, k = _inputs(apply_fn, params, x1, x2)
    return _resolve(model, params, x1, x2, symmetric, k, trace_outputs, method, tile_size, memory_limit,
                    method_options)


def empirical_ntk(
    apply_fn: ApplyFn,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    trace_outputs: bool = False,
    method: str = "auto",
    tile_size: int | str | None = "auto",
    memory_limit: float | None = None,
    precision: str | jax.lax.Precision = "highest",
    mesh=None,
    **method_options,
) -> jax.Array:
    """Empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` at ``params``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``, pure and differentiable,
        row i depending on ``x[i]`` only; a :class:`ntkdyn.models.Model` or any
        callable (wrapped with :func:`ntkdyn.models.as_model`).
      params: any pytree of floating-point arrays (the θ the Jacobian is taken in).
      x1: inputs, shape (N1, ...).
      x2: inputs, shape (N2, ...) with the same trailing shape; ``None`` means
        ``x1`` (and the symmetric kernel is computed once per tile pair).
      trace_outputs: return the output-traced kernel (N1, N2) — the mean of the
        diagonal output pairs — instead of the full (N1, N2, K, K).
      method: one of :data:`ntkdyn.kernels.METHODS` — ``"jacobian"`` (Jacobian
        contraction), ``"ntvp"`` (NTK-vector products), ``"structured"``
        (Gram matrices of dense/conv layers), ``"sketch"`` (random-probe
        estimate; options below) — or ``"auto"``: the exact method with the
        lowest estimated time at the tile size the memory budget allows.
      tile_size: tile size along N1 and N2; any N works (the last tile is
        padded and trimmed). ``None`` computes in one tile; ``"auto"`` picks
        the largest tile whose intermediates fit in ``memory_limit``.
      memory_limit: bytes for the kernel (held twice while tiles are written
        into a host buffer) plus one tile's intermediates. Default: half of the
        memory the OS reports available. ValueError when even the smallest
        tile does not fit, or when an explicit ``tile_size`` does not.
      precision: matmul precision of everything traced inside, the model
        included (a :class:`jax.lax.Precision` or ``"default"``, ``"high"``,
        ``"highest"``); ``"highest"`` keeps float32 exact on GPUs (no TF32).
      mesh: a :class:`jax.sharding.Mesh`: the rows of Θ are computed on its
        devices (x1 split over all its axes, x2 replicated) and returned as a
        row-sharded array (replicated when N1 is not a multiple of the device
        count: :func:`ntkdyn.kernels.sharding.kernel_rows`). Default None: one device.
      **method_options: keywords of the chosen method (``"sketch"``:
        ``n_probes``, ``key`` / ``seed``, ``distribution``, ``probe_batch_size``).

    Returns:
      ``(N1, N2, K, K)`` or, with ``trace_outputs``, ``(N1, N2)``, in the
      output dtype of ``apply_fn``.

    Raises:
      ValueError naming ``apply_fn`` when its output is not (N, K) with one row
      per input, on the whole batch or on a batch size the tiles or the cost
      model use (:func:`check_rows`); ``params`` / ``x1`` / ``x2`` for
      non-finite values (checked when concrete), ``memory_limit`` /
      ``tile_size`` for budgets that cannot be met; TypeError for non-float
      params or an option the method lacks.
    """
    precision = normalize(precision)
    model, x1, x2, symmetric, k = _inputs(apply_fn, params, x1, x2)
    method, tile_size = _resolve(
        model, params, x1, x2, symmetric, k, trace_outputs, method, tile_size, memory_limit, method_options
    )
    _check_tile_rows(model, params, x1, x2, k, tile_size, mesh)
    if mesh is not None:
        from ntkdyn.kernels import sharding

        return sharding.kernel_rows(METHODS[method].tile, model, params, x1, x2, mesh=mesh, tile_size=tile_size,
                                    trace_outputs=trace_outputs, precision=precision, options=method_options)
    tile = functools.partial(
        METHODS[method].tile, model, params, trace_outputs=trace_outputs, precision=precision, **method_options
    )
    if tile_size is None or tile_size >= max(x1.shape[0], x2.shape[0]):
        return tile(x1, x2, same=symmetric)
    concrete = _validate.is_concrete((model, params, x1, x2, method_options))  # e.g. a sketch key under vmap
    return tiled(tile, x1, x2, tile_size, trace_outputs=trace_outputs, symmetric=symmetric, concrete=concrete)


def _check_tile_rows(model, params, x1, x2, k: int, tile_size: int | None, mesh) -> None:
    """:func:`check_rows` for the batches the tiles will hold (padded to ``tile_size``; a device's share of x1)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    if mesh is not None:
        from ntkdyn.kernels import sharding

        n1 = -(-n1 // sharding.check_mesh(mesh).size)  # this device's rows (x1 padded to a multiple of the devices)
        check_rows(model, params, x1, n1, k)
    if tile_size is not None and tile_size < max(n1, n2):
        check_rows(model, params, x1, tile_size, k)


def _vp_vector(v, n2: int, k: int, trace_outputs: bool) -> tuple[jax.Array, bool]:
    """``v`` as a float array with a trailing column axis, and whether it had none."""
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        raise TypeError(f"v: expected a floating-point array, got dtype {v.dtype}")
    single = v.ndim == (1 if trace_outputs else 2)
    expected = f"({n2},) or ({n2}, M)" if trace_outputs else f"({n2}, {k}) or ({n2}, {k}, M)"
    lead = v.shape[:1] if trace_outputs else v.shape[:2]
    if v.ndim not in ((1, 2) if trace_outputs else (2, 3)) or lead != ((n2,) if trace_outputs else (n2, k)):
        raise ValueError(f"v: expected shape {expected}, got {tuple(v.shape)}")
    _validate.finite("v", v)
    return (v[..., None] if single else v), single


def ntk_vp(
    apply_fn: ApplyFn,
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None,
    v: jax.Array,
    *,
    trace_outputs: bool = False,
    tile_size: int | str | None = "auto",
    memory_limit: float | None = None,
    precision: str | jax.lax.Precision = "highest",
) -> jax.Array:
    """NTK-vector product ``Θ(x1, x2) · v`` without forming Θ (matrix-free).

    Full kernel: ``(Θ v)[i, k] = Σ_{j,l} Θ(x1_i, x2_j)[k, l] v[j, l] = J(x1) (J(x2)ᵀ v)``,
    one VJP over ``x2`` followed by one JVP over ``x1``: cost ≈ 3 forward
    passes over N1 + N2 inputs per vector, memory O(P + tile activations).
    Traced kernel: ``(Θ_tr v)[i] = (1/K) Σ_k Σ_j J_k(x1_i)·J_k(x2_j) v[j]``
    (K VJP/JVP pairs).

    Args:
      apply_fn, params: as for :func:`empirical_ntk`.
      x1: (N1, ...) inputs; x2: (N2, ...) inputs or None for ``x1``.
      v: full kernel: (N2, K) or a batch of M vectors (N2, K, M); traced:
        (N2,) or (N2, M).
      trace_outputs: multiply by the output-traced kernel (N1, N2) instead.
      tile_size: inputs per VJP/JVP call; ``None`` processes all inputs at
        once, ``"auto"`` the most whose intermediates fit in ``memory_limit``.
      memory_limit: bytes for the result and one call's intermediates
        (default: half of the available memory); ValueError below the floor
        of one input per call.
      precision: as for :func:`empirical_ntk`.

    Returns:
      Same layout as ``v`` with N1 rows: (N1, K[, M]) or traced (N1[, M]).
    """
    precision = normalize(precision)
    model, x1, x2, _, k = _inputs(apply_fn, params, x1, x2)
    vm, single = _vp_vector(v, x2.shape[0], k, trace_outputs)
    tile_size = _tile_size(tile_size)
    budget = planner.memory_budget(memory_limit) if (tile_size == "auto" or memory_limit is not None) else None
    columns = vm.shape[-1] * (k if trace_outputs else 1)
    if budget is not None:
        check_rows(model, params, x1, 1, k)  # the memory model traces one input
    chunk = planner.chunk_size(model, params, x1, x2, columns, tile_size, budget)
    check_rows(model, params, x1, chunk, k)  # both sides are cut (and padded) into chunks of this size
    out_dtype = _output_of(model, params, x1)[1]
    out = ntk_vp_chunked(model, params, x1, x2, vm.astype(out_dtype), trace_outputs=trace_outputs,
                         tile_size=chunk, precision=precision)
    return out[..., 0] if single else out
