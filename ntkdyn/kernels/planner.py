"""Planning an NTK computation: which method, what tile size, within which memory.

The cost model weighs each method's :class:`~ntkdyn.kernels.costs.TileCost`
on a rough machine model (only ratios matter)::

    seconds(tile) = FLOPs / FLOP_RATE + bytes / BYTE_RATE + TILE_OVERHEAD

and the tile size is the largest whose intermediates fit the memory budget.
Costs depend on shapes only, so they are cached per (model graph, shapes,
options) with :func:`functools.lru_cache`; the one value-dependent check (the
structured method's probe that the model does not mix rows) is cached per the
same key, with the answer of the first call, as the plan itself is.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np

from ntkdyn import _validate
from ntkdyn.kernels import costs, operator
from ntkdyn.kernels.methods import AUTO, METHODS

__all__ = [
    "FLOP_RATE",
    "BYTE_RATE",
    "TILE_OVERHEAD",
    "MEMORY_FRACTION",
    "available_memory",
    "memory_budget",
    "tile_seconds",
    "largest_fitting",
    "largest_tile",
    "method_cost",
    "applies",
    "choose",
    "chunk_size",
]

# rough machine model for comparing methods (only ratios matter)
FLOP_RATE = 2.0e10  # FLOP/s
BYTE_RATE = 5.0e9  # B/s of memory traffic
TILE_OVERHEAD = 2.0e-4  # s per tile dispatch
MEMORY_FRACTION = 0.5  # of the available memory, the default budget
_CACHE_SIZE = 64


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


def memory_budget(memory_limit) -> float:
    """``memory_limit`` in bytes (a finite number > 0), or ``MEMORY_FRACTION`` of :func:`available_memory`."""
    if memory_limit is None:
        return MEMORY_FRACTION * available_memory()
    _validate.positive_scalar("memory_limit", memory_limit)
    if not _validate.is_concrete(memory_limit):
        raise TypeError("memory_limit: expected a concrete number of bytes, got a traced value")
    return float(memory_limit)


def tile_seconds(cost: costs.TileCost, n1: int, n2: int) -> float:
    """Estimated time of one tile: ``flops/FLOP_RATE + bytes/BYTE_RATE + TILE_OVERHEAD``."""
    return cost.flops(n1, n2) / FLOP_RATE + cost.memory(n1, n2) / BYTE_RATE + TILE_OVERHEAD


def largest_fitting(fits: Callable[[int], bool], hi: int) -> int | None:
    """Largest ``b`` in ``[1, hi]`` with ``fits(b)`` (``fits`` monotone decreasing); None when not even 1 fits."""
    if fits(hi):
        return hi
    if not fits(1):
        return None
    lo = 1
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_tile(cost: costs.TileCost, n1: int, n2: int, budget: float) -> int | None:
    """Largest tile size b (≤ max(n1, n2)) whose tile fits in ``budget`` bytes; None below the 1×1 floor."""
    return largest_fitting(lambda b: cost.memory(min(b, n1), min(b, n2)) <= budget, max(n1, n2))


def even_tiles(b: int, n: int) -> int:
    """The smallest tile size giving as many tiles over ``n`` rows as ``b`` does (less padding in the last)."""
    return -(-n // -(-n // b))


def _total_seconds(cost: costs.TileCost, n1: int, n2: int, b: int, symmetric: bool) -> float:
    t1, t2 = -(-n1 // b), -(-n2 // b)
    tiles = t1 * (t1 + 1) / 2 if symmetric else t1 * t2
    return tiles * tile_seconds(cost, min(b, n1), min(b, n2))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_cost(name: str, model_sig, params_sig, x1_sig, x2_sig, trace_outputs: bool, options: tuple):
    args = [None if s is None else costs.from_signature(s) for s in (model_sig, params_sig, x1_sig, x2_sig)]
    return METHODS[name].cost(*args, trace_outputs, **dict(options))


def method_cost(name: str, model, params, x1, x2, trace_outputs: bool, options: dict) -> costs.TileCost | None:
    """:class:`~ntkdyn.kernels.costs.TileCost` of one method (None: it cannot analyse the model).

    Cached per (name, model graph, shapes and dtypes, ``trace_outputs``,
    cost options): planning traces the model, and its answer depends on
    shapes only. The key holds the model's static part (for a plain function,
    the function itself), so while an entry lives that function is kept alive.
    """
    method = METHODS[name]
    opts = tuple((k, options[k]) for k in method.cost_options if k in options)
    sigs = tuple(None if t is None else costs.signature(t) for t in (model, params, x1, x2))
    try:
        hash(opts)
    except TypeError:  # an unhashable option value: plan without the cache
        return method.cost(*(None if s is None else costs.from_signature(s) for s in sigs), trace_outputs, **dict(opts))
    return _cached_cost(name, *sigs, trace_outputs, opts)


class _Verdict:
    """Answer of one value probe, kept for later calls with the same key."""

    __slots__ = ("value",)

    def __init__(self):
        self.value: bool | None = None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _verdict(name: str, model_sig, params_sig, x1_sig, x2_sig) -> _Verdict:
    return _Verdict()


def applies(name: str, model, params, x1, x2) -> bool:
    """Whether the method's value probe (:attr:`Method.applies`) passes; True for methods without one.

    The first call per (name, model graph, shapes) runs the probe on its
    concrete values; later calls with the same key reuse the answer.
    """
    check = METHODS[name].applies
    if check is None:
        return True
    memo = _verdict(name, *(None if t is None else costs.signature(t) for t in (model, params, x1, x2)))
    if memo.value is None:
        with jax.ensure_compile_time_eval():  # concrete values inside someone's jit: probe them now
            memo.value = bool(check(model, params, x1, x2))
    return memo.value


def choose(
    method: str,
    model,
    params: Any,
    x1,
    x2,
    *,
    symmetric: bool,
    trace_outputs: bool,
    budget: float | None,
    options: dict,
) -> tuple[str, int | None]:
    """``(method, tile size)``: the requested method, or for ``"auto"`` the exact one of least estimated time.

    With a ``budget`` (bytes for the tiles' intermediates) the tile size is the
    largest that fits; without one, one tile. A method whose 1×1 tile does not
    fit is skipped by ``"auto"``; ValueError naming ``memory_limit`` when no
    candidate fits. A requested method without a cost (it cannot analyse the
    model) runs in one tile.
    """
    names = AUTO if method == "auto" else (method,)
    n1, n2 = np.shape(x1)[0], np.shape(x2)[0]
    concrete = _validate.is_concrete((params, x1, x2, model))
    best, floors = None, {}
    for name in names:
        cost = method_cost(name, model, params, x1, None if symmetric else x2, trace_outputs, options)
        if cost is None:
            continue
        if method == "auto" and concrete and not applies(name, model, params, x1, None if symmetric else x2):
            continue
        b = max(n1, n2) if budget is None else largest_tile(cost, n1, n2, budget)
        if b is None:
            floors[name] = cost.memory(1, 1)
            continue
        b = even_tiles(b, max(n1, n2))
        seconds = _total_seconds(cost, n1, n2, b, symmetric)
        if best is None or seconds < best[0]:
            best = (seconds, name, b)
    if best is not None:
        return best[1], best[2]
    if floors:
        need = ", ".join(f"{name}: {floor / 2**20:.3g} MiB" for name, floor in floors.items())
        raise ValueError(
            f"memory_limit: leaves {budget / 2**20:.3g} MiB for the tiles beside the kernel, below the "
            f"smallest (1×1) tile of every candidate method ({need}); raise memory_limit, use "
            "trace_outputs=True or ntk_vp"
        )
    return ("jacobian" if method == "auto" else method), None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _chunk_memory(model_sig, params_sig, x1_sig, x2_sig, columns: int) -> Callable[[int], float]:
    return operator.chunk_memory(*(costs.from_signature(s) for s in (model_sig, params_sig, x1_sig, x2_sig)), columns)


def chunk_size(model, params: Any, x1, x2, columns: int, tile_size: int | str | None, budget: float | None) -> int:
    """Inputs per VJP/JVP call of the kernel operator (``ntk_vp``) for ``columns`` vector columns.

    ``tile_size="auto"``: the largest (evened out) chunk whose intermediates
    fit ``budget`` bytes; an explicit size (None: all inputs) is checked
    against the budget when there is one. ValueError naming ``memory_limit``
    below the one-input floor, ``tile_size`` for an explicit chunk over it.
    """
    largest = max(np.shape(x1)[0], np.shape(x2)[0])
    if budget is None:
        return largest if tile_size in ("auto", None) else min(tile_size, largest)
    memory = _chunk_memory(*(costs.signature(t) for t in (model, params, x1, x2)), columns)
    if tile_size != "auto":
        b = largest if tile_size is None else min(tile_size, largest)
        if memory(b) > budget:
            raise ValueError(
                f"tile_size: {tile_size if tile_size is not None else 'all'} inputs per call need about "
                f"{memory(b) / 2**20:.3g} MiB, more than the {budget / 2**20:.3g} MiB of memory_limit; "
                "use tile_size='auto' (or a smaller tile)"
            )
        return b
    b = largest_fitting(lambda b: memory(b) <= budget, largest)
    if b is None:
        raise ValueError(
            f"memory_limit: {budget / 2**20:.3g} MiB is below the {memory(1) / 2**20:.3g} MiB the kernel "
            f"operator needs with one input per call ({columns} vector columns); raise memory_limit or "
            "pass fewer columns"
        )
    return even_tiles(b, largest)
