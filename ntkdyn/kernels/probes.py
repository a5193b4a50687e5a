"""Random parameter probes and the sketch tile (``method="sketch"``).

For a random direction ω in parameter space the output change is ``J ω``.
With k probes ``Ω = [ω_1 … ω_k]`` (P × k) and ``E[ω ωᵀ] = I_P``::

    Θ̂ = (J Ω)(J Ω)ᵀ / k = J (Ω Ωᵀ / k) Jᵀ,        E[Θ̂] = J Jᵀ = Θ.

Probes are regenerated from ``fold_in(key, i)`` wherever they are needed, so
memory never holds Ω as a whole and every tile of a tiled kernel sees the
same Ω. The public sketch API (:func:`ntkdyn.kernels.sketch.sketched_ntk`,
black-box probes, Jacobian restoring) is built on these in
:mod:`ntkdyn.kernels.sketch`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntkdyn import _validate
from ntkdyn.kernels import costs, layout
from ntkdyn.kernels.precision import kernel_jit, normalize
from ntkdyn.models import Model

__all__ = [
    "DISTRIBUTIONS",
    "probe_key",
    "probe_direction",
    "probe_directions",
    "jvp_responses",
    "kernel_from_probes",
    "sketch_tile",
    "sketch_cost",
    "check_n_probes",
    "check_probe_batch",
]

DISTRIBUTIONS = ("gaussian", "rademacher")


def probe_key(key=None, seed: int | None = None) -> jax.Array:
    """The PRNG key of a sketch: ``key`` as given, else ``jax.random.key(seed or 0)``."""
    if key is not None and seed is not None:
        raise ValueError(f"key, seed: pass one of them, got both (key={key!r}, seed={seed!r})")
    if key is not None:
        return key
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    return jax.random.key(int(seed))


def check_n_probes(n_probes) -> int:
    """The number k of probes: an integer >= 1 (required)."""
    if n_probes is None:
        raise TypeError("n_probes: required for a sketch (the number k of random probes), got None")
    return _validate.count("n_probes", n_probes)


def check_probe_batch(probe_batch_size) -> int | None:
    """None (one probe at a time) or an integer >= 1 probes vmapped together."""
    return None if probe_batch_size is None else _validate.count("probe_batch_size", probe_batch_size)


def probe_direction(key: jax.Array, index, params: Any, distribution: str = "gaussian") -> Any:
    """Probe ``ω_index``: a pytree like ``params`` with i.i.d. entries, ``E[ωωᵀ] = I``.

    Drawn as one flat vector (``ravel_pytree`` order, the leaves' common
    dtype) from ``fold_in(key, index)``, so any probe can be regenerated alone.
    Entries are N(0, 1) (``"gaussian"``) or ±1 (``"rademacher"``).
    """
    flat, unravel = ravel_pytree(params)
    sub = jax.random.fold_in(key, index)
    if distribution == "gaussian":
        draw = jax.random.normal(sub, flat.shape, flat.dtype)
    elif distribution == "rademacher":
        draw = jax.random.rademacher(sub, flat.shape, flat.dtype)
    else:
        raise ValueError(f"distribution: expected one of {DISTRIBUTIONS}, got {distribution!r}")
    return unravel(draw)


def probe_directions(
    params: Any, n_probes: int, *, key=None, seed: int | None = None, distribution: str = "gaussian"
) -> jax.Array:
    """All k probes as one flat (k, P) array (``ravel_pytree`` order of ``params``).

    Materializes k·P numbers: for small models, tests and Jacobian restoring.
    """
    n_probes = check_n_probes(n_probes)
    _validate.choice("distribution", distribution, DISTRIBUTIONS)
    return _flat_probes(params, probe_key(key, seed), n_probes=n_probes, distribution=distribution)


@functools.partial(jax.jit, static_argnames=("n_probes", "distribution"))
def _flat_probes(params, key, *, n_probes, distribution):
    return jax.vmap(lambda i: ravel_pytree(probe_direction(key, i, params, distribution))[0])(jnp.arange(n_probes))


def _responses(model, params, x, key, n_probes, distribution, probe_batch_size):
    def one(i):
        omega = probe_direction(key, i, params, distribution)
        return jax.jvp(lambda p: model(p, x), (params,), (omega,))[1]

    return jax.lax.map(one, jnp.arange(n_probes), batch_size=probe_batch_size)


@kernel_jit(static_argnames=("n_probes", "distribution", "probe_batch_size"))
def jvp_responses(model: Model, params: Any, x: jax.Array, key: jax.Array, *, n_probes: int, distribution: str,
                  probe_batch_size: int | None) -> jax.Array:
    """``J(x) ω_i`` for i = 0 … k−1, shape (k, N, K): k JVPs, ``probe_batch_size`` vmapped at a time."""
    return _responses(model, params, x, key, n_probes, distribution, probe_batch_size)


def _from_probes(a, b, trace_outputs: bool):
    """``(1/k) Σ_i a_i b_iᵀ`` of (k, N1, K) and (k, N2, K) responses, in any kernel form."""
    return layout.contract(jnp.moveaxis(a, 0, -1), jnp.moveaxis(b, 0, -1), trace_outputs) / a.shape[0]


@kernel_jit(static_argnames=("trace_outputs",))
def _kernel_from_probes(a, b, *, trace_outputs):
    return _from_probes(a, b, trace_outputs)


def kernel_from_probes(
    responses1: jax.Array,
    responses2: jax.Array | None = None,
    *,
    trace_outputs: bool = False,
    precision="highest",
) -> jax.Array:
    """``Θ̂(x1, x2) = (1/k) Σ_i (J1 ω_i)(J2 ω_i)ᵀ`` from (k, N1, K) and (k, N2, K) responses.

    Both response sets must come from the same probes. Returns (N1, N2, K, K),
    or the traced ``(1/K) Σ_c Θ̂[:, :, c, c]`` of shape (N1, N2).
    """
    a = _validate.float_array("responses1", responses1)
    b = a if responses2 is None else _validate.float_array("responses2", responses2)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(
            f"responses1, responses2: expected shape (k, N, K), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            "responses2: expected the same number of probes k and outputs K as responses1, "
            f"got {tuple(b.shape)} vs {tuple(a.shape)}"
        )
    return _kernel_from_probes(a, b, trace_outputs=trace_outputs, precision=normalize(precision))


@kernel_jit(static_argnames=("trace_outputs", "same", "n_probes", "distribution", "probe_batch_size"))
def _sketch_tile(model, params, x1, x2, key, *, trace_outputs, same, n_probes, distribution, probe_batch_size):
    a = _responses(model, params, x1, key, n_probes, distribution, probe_batch_size)
    b = a if same else _responses(model, params, x2, key, n_probes, distribution, probe_batch_size)
    return _from_probes(a, b, trace_outputs)


def sketch_tile(
    model: Model,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    *,
    trace_outputs: bool,
    same: bool,
    precision: str,
    n_probes: int | None = None,
    key=None,
    seed: int | None = None,
    distribution: str = "gaussian",
    probe_batch_size: int | None = None,
) -> jax.Array:
    """``method="sketch"`` tile: ``Θ̂ = (J1 Ω)(J2 Ω)ᵀ / k``.

    Options: ``n_probes`` (k, required), ``key`` or ``seed`` (default seed 0),
    ``distribution`` (``"gaussian"``/``"rademacher"``), ``probe_batch_size``.
    The probes depend only on the key, so all tiles share Ω.
    """
    n_probes = check_n_probes(n_probes)
    _validate.choice("distribution", distribution, DISTRIBUTIONS)
    return _sketch_tile(
        model, params, x1, x2, probe_key(key, seed), trace_outputs=trace_outputs, same=same, n_probes=n_probes,
        distribution=distribution, probe_batch_size=check_probe_batch(probe_batch_size), precision=precision,
    )


def sketch_cost(
    model: Model, params: Any, x1, x2, trace_outputs: bool, *, n_probes: int | None = None,
    probe_batch_size: int | None = None,
) -> costs.TileCost:
    """Cost of :func:`sketch_tile`: k JVPs per side, then the (k-term) contraction.

    FLOPs ``3F·k·(n1 + n2) + 2·n1·n2·K²·k``; bytes: the responses
    ``k·K·(n1 + n2)``, per vmapped probe and side its random draw, direction and
    tangents ``b·(8P + A·(n1 + n2))`` (b = ``probe_batch_size``, 1 by default;
    drawing P normal numbers takes about 4P values of random bits and
    intermediates per side — measured with ``compiled.memory_analysis()``),
    and the tile twice.
    """
    k_probes = check_n_probes(n_probes)
    batch = check_probe_batch(probe_batch_size) or 1
    fwd, act = costs.per_example_cost(model, params, x1)
    _, k = costs.output_shape(model, params, costs.example_rows(x1))
    kk = k if trace_outputs else k * k
    p = costs.flat_param_count(params)
    item = costs.itemsize(model, params, x1)

    def flops(n1, n2):
        return 3.0 * fwd * k_probes * (n1 + n2) + 2.0 * n1 * n2 * kk * k_probes

    def memory(n1, n2):
        return item * (k_probes * k * (n1 + n2) + batch * (8 * p + act * (n1 + n2)) + 2 * n1 * n2 * kk)

    return costs.TileCost(flops, memory)
