"""NTK of black-box and huge models from random parameter probes.

For a random direction ω in parameter space the output change is ``J ω``
(observable as a JVP, or by central differences of forward passes alone).
With k probes ``Ω = [ω_1 … ω_k]`` (P × k) and ``E[ω ωᵀ] = I_P``::

    Θ̂ = (J Ω)(J Ω)ᵀ / k = J (Ω Ωᵀ / k) Jᵀ,        E[Θ̂] = J Jᵀ = Θ.

Cost: k forward-mode passes (or 2k forward evaluations for the black-box
path) instead of N·K reverse passes; memory never holds Ω as a whole (probes
are regenerated from ``fold_in(key, i)``, :mod:`ntkdyn.kernels.probes`), so
every tile of a tiled kernel sees the same Ω and tiled and untiled results
agree.

Error (Gaussian probes, flattened (N·K) × (N·K) kernel, ``u = Jω ~ N(0, Θ)``)::

    E‖Θ̂ − Θ‖²_F = ((tr Θ)² + ‖Θ‖²_F) / k,

so the relative Frobenius error falls like ``sqrt((1 + (tr Θ)²/‖Θ‖²_F) / k)``.
Rademacher probes (±1 entries) are unbiased too and never worse.

Besides the kernel, the (ω, J ω) pairs determine J itself on the probed
subspace: :func:`restore_jacobian` fits it by least squares and reports the
residual.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate
from ntkdyn.kernels import layout
from ntkdyn.kernels.empirical import empirical_ntk, output_shape
from ntkdyn.kernels.precision import kernel_jit, normalize
from ntkdyn.kernels.probes import (
    DISTRIBUTIONS,
    check_n_probes,
    check_probe_batch,
    jvp_responses,
    kernel_from_probes,
    probe_direction,
    probe_directions,
    probe_key,
)
from ntkdyn.models import as_model

__all__ = [
    "DISTRIBUTIONS",
    "Probes",
    "JacobianFit",
    "probe_key",
    "probe_direction",
    "probe_directions",
    "jvp_probes",
    "blackbox_probes",
    "default_step",
    "kernel_from_probes",
    "sketched_ntk",
    "blackbox_ntk",
    "expected_squared_error",
    "restore_jacobian",
]


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


@struct.dataclass
class Probes:
    """Responses of a model to k parameter probes.

    Attributes:
      responses: (k, N, K), ``responses[i] = J ω_i`` (exact JVP or central
        difference) at the N inputs.
      directions: (k, P) flat probes ``ω_i`` (``ravel_pytree`` order), or None
        when they were not kept.
      step: the finite-difference step ε (0 for exact JVP probes).
    """

    responses: jax.Array
    directions: jax.Array | None = None
    step: jax.Array | float = 0.0

    @property
    def n_probes(self) -> int:
        return self.responses.shape[0]


@struct.dataclass
class JacobianFit:
    """Least-squares Jacobian on a subspace, from (ω, J ω) pairs.

    Attributes:
      jacobian: (N, K, d), ``J_B`` with ``J ω ≈ J_B c`` for coordinates
        ``c = Bᵀ ω`` (d = P and B = I when no basis was given).
      residual: ``‖DF − C J_Bᵀ‖_F``, the part of the responses the fit does
        not explain (DF: (k, N·K) responses, C: (k, d) coordinates).
      relative_residual: ``residual / ‖DF‖_F``.
      rank: numerical rank of C; J_B is unique only when rank = d.
      noise_std: ``residual / sqrt(N·K·(k − rank))``, the per-entry noise level
        implied by the residual (NaN when k = rank: no degrees of freedom left).
    """

    jacobian: jax.Array
    residual: jax.Array
    relative_residual: jax.Array
    rank: jax.Array
    noise_std: jax.Array

    def kernel(self, trace_outputs: bool = False, precision="highest") -> jax.Array:
        """``J_B J_Bᵀ``, shape (N, N, K, K) (or traced (N, N)).

        For an orthonormal B this is ``J B Bᵀ Jᵀ``: the NTK of the parameters
        restricted to span(B); without a basis it is ``J P_Ω Jᵀ`` with P_Ω the
        projector on the probed span (the exact NTK once the probes span ℝᴾ).
        """
        with jax.default_matmul_precision(normalize(precision)):
            return layout.contract(self.jacobian, self.jacobian, trace_outputs)


# --------------------------------------------------------------------------- #
# probes
# --------------------------------------------------------------------------- #


def _probes(responses: Callable, params: Any, *, n_probes: int, key=None, seed: int | None = None,
            distribution: str = "gaussian", keep_directions: bool = False, precision="highest") -> Probes:
    """The :class:`Probes` of both builders, from ``responses(key, k, distribution, precision) -> (JΩ, ε)``.

    Checks ``n_probes`` and ``distribution``, draws the key (``key`` or
    ``seed``), and regenerates the directions from it when ``keep_directions``.
    """
    n_probes = check_n_probes(n_probes)
    _validate.choice("distribution", distribution, DISTRIBUTIONS)
    key = probe_key(key, seed)
    values, step = responses(key, n_probes, distribution, normalize(precision))
    directions = None
    if keep_directions:
        directions = probe_directions(params, n_probes, key=key, distribution=distribution)
    return Probes(responses=values, directions=directions, step=step)


def jvp_probes(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    *,
    n_probes: int,
    key=None,
    seed: int | None = None,
    distribution: str = "gaussian",
    probe_batch_size: int | None = None,
    keep_directions: bool = False,
    precision="highest",
) -> Probes:
    """Exact probe responses ``J(x) ω_i`` by forward mode, i = 0 … k−1.

    Cost: k JVPs of ``apply_fn(·, x)`` (``probe_batch_size`` of them vmapped
    at a time; sequential by default, which keeps memory at one probe).

    Returns:
      :class:`Probes` with responses (k, N, K); ``directions`` (k, P) when
      ``keep_directions``.
    """
    probe_batch_size = check_probe_batch(probe_batch_size)
    model = as_model(apply_fn)
    x = _validate.batch("x", x)
    _validate.params_tree("params", params)
    output_shape(model, params, x)

    def responses(key, n_probes, distribution, precision):
        return jvp_responses(
            model, params, x, key, n_probes=n_probes, distribution=distribution, probe_batch_size=probe_batch_size,
            precision=precision,
        ), 0.0

    return _probes(responses, params, n_probes=n_probes, key=key, seed=seed, distribution=distribution,
                   keep_directions=keep_directions, precision=precision)


def default_step(params: Any) -> float:
    """Central-difference step ``ε = eps^{1/3} · max(1, rms(θ))`` for ``θ ± ε ω``.

    Balances truncation ``O(ε²)`` against round-off ``O(eps/ε)`` per
    coordinate (ω has O(1) entries), ``eps`` the machine epsilon of the
    params' dtype: ≈ 6e-6 in float64, ≈ 5e-3 in float32.
    """
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(*leaves)
    eps = float(jnp.finfo(dtype).eps)
    flat = np.concatenate([np.ravel(np.asarray(l, dtype=np.float64)) for l in leaves])
    rms = float(np.sqrt(np.mean(flat**2))) if flat.size else 0.0
    return eps ** (1.0 / 3.0) * max(1.0, rms)


def _as_outputs(out, n_rows: int) -> jax.Array:
    arr = _validate.float_array("apply_fn output", out)
    if arr.ndim != 2 or arr.shape[0] != n_rows:
        raise ValueError(
            f"apply_fn: expected apply_fn(params, x) to return shape (N, K) with N = {n_rows}, "
            f"got {tuple(arr.shape)}"
        )
    return arr


@functools.partial(jax.jit, static_argnames=("distribution",))
def _shifted_pair(params, key, index, step, *, distribution):
    """``(θ + ε ω_index, θ − ε ω_index)``, compiled once per params structure."""
    omega = probe_direction(key, index, params, distribution)
    plus = jax.tree_util.tree_map(lambda p, d: p + step * d, params, omega)
    minus = jax.tree_util.tree_map(lambda p, d: p - step * d, params, omega)
    return plus, minus


def blackbox_probes(
    apply_fn: Callable[[Any, Any], Any], params: Any, x: jax.Array, *, n_probes: int, step: float | None = None,
    **probe_options,
) -> Probes:
    """Probe responses from forward evaluations only (central differences).

    ``J ω_i ≈ (f(θ + ε ω_i, x) − f(θ − ε ω_i, x)) / (2ε)``, error ``O(ε²)``
    from the third derivative plus ``O(eps·|f|/ε)`` round-off.

    ``apply_fn`` is called eagerly, 2k times, on concrete params (a pytree of
    jax arrays in the params' structure) and may be anything that returns an
    (N, K) array: numpy code, a simulator, a wrapped device. The probes are
    the same as :func:`jvp_probes` draws for the same key, so the two paths
    can be compared probe by probe. JAX code inside ``apply_fn`` runs at
    ``precision``.

    Args:
      n_probes: k, as in :func:`jvp_probes`.
      step: ε; default :func:`default_step`.
      **probe_options: every other keyword of :func:`jvp_probes` but
        ``probe_batch_size`` (``key``, ``seed``, ``distribution``,
        ``keep_directions``, ``precision``), same meaning and defaults,
        forwarded unchanged (an unknown keyword raises TypeError).

    Returns:
      :class:`Probes` (responses (k, N, K), ``step`` = ε).
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    _validate.params_tree("params", params)
    x = _validate.batch("x", x)
    if step is None:
        step = default_step(params)
    elif not (isinstance(step, (int, float, np.floating)) and math.isfinite(step) and step > 0):
        raise ValueError(f"step: expected a finite float > 0, got {step!r}")

    def responses(key, n_probes, distribution, precision):
        n_rows = x.shape[0]
        rows = []
        with jax.default_matmul_precision(precision):
            for i in range(n_probes):
                plus, minus = _shifted_pair(params, key, i, step, distribution=distribution)
                plus = _as_outputs(apply_fn(plus, x), n_rows)
                minus = _as_outputs(apply_fn(minus, x), n_rows)
                rows.append((plus - minus) / (2.0 * step))
        values = jnp.stack(rows)
        _validate.finite("apply_fn output", values)
        return values, step

    return _probes(responses, params, n_probes=n_probes, **probe_options)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #


def sketched_ntk(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    n_probes: int,
    key=None,
    seed: int | None = None,
    distribution: str = "gaussian",
    trace_outputs: bool = False,
    tile_size: int | str | None = "auto",
    memory_limit: float | None = None,
    probe_batch_size: int | None = None,
    precision="highest",
) -> jax.Array:
    """Unbiased random-probe estimate ``Θ̂ = (JΩ)(JΩ)ᵀ/k`` of the empirical NTK.

    Same as ``empirical_ntk(..., method="sketch", n_probes=k, ...)``; shapes as
    :func:`~ntkdyn.kernels.empirical_ntk` ((N1, N2, K, K), or (N1, N2) traced).
    Expected squared Frobenius error: :func:`expected_squared_error`.
    """
    return empirical_ntk(
        apply_fn, params, x1, x2, trace_outputs=trace_outputs, method="sketch", tile_size=tile_size,
        memory_limit=memory_limit, precision=precision, n_probes=n_probes, key=key, seed=seed,
        distribution=distribution, probe_batch_size=probe_batch_size,
    )


def blackbox_ntk(
    apply_fn: Callable[[Any, Any], Any], params: Any, x1: jax.Array, x2: jax.Array | None = None, *, n_probes: int,
    trace_outputs: bool = False, precision="highest", **probe_options,
) -> jax.Array:
    """NTK estimate from forward evaluations only: ``Θ̂ = (ΔF)(ΔF)ᵀ / k``.

    ``ΔF_i = (f(θ + εω_i) − f(θ − εω_i)) / 2ε`` on x1 and x2 together (2k
    calls of ``apply_fn`` on the stacked inputs); ``apply_fn`` need not be
    differentiable or traceable by JAX (see :func:`blackbox_probes`). For the
    same key the probes equal those of ``method="sketch"``, so the result
    agrees with :func:`sketched_ntk` up to the O(ε²) difference error.

    Args:
      n_probes: k; trace_outputs: the output-traced kernel; precision: matmul
        precision of ``apply_fn``'s JAX code and of the kernel.
      **probe_options: every other keyword of :func:`blackbox_probes` but
        ``keep_directions`` (``step``, ``key``, ``seed``, ``distribution``),
        same meaning and defaults, forwarded unchanged.

    Returns:
      (N1, N2, K, K), or (N1, N2) with ``trace_outputs``.
    """
    x1 = _validate.batch("x1", x1)
    inputs = x1
    if x2 is not None:
        x2 = _validate.batch("x2", x2)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"x2: expected trailing shape {tuple(x1.shape[1:])} to match x1, got {tuple(x2.shape[1:])}"
            )
        inputs = jnp.concatenate([x1, x2.astype(x1.dtype)], axis=0)
    probes = blackbox_probes(apply_fn, params, inputs, n_probes=n_probes, precision=precision, keep_directions=False,
                             **probe_options)
    if x2 is None:
        return kernel_from_probes(probes.responses, trace_outputs=trace_outputs, precision=precision)
    r, n1 = probes.responses, x1.shape[0]
    return kernel_from_probes(r[:, :n1], r[:, n1:], trace_outputs=trace_outputs, precision=precision)


def expected_squared_error(kernel: jax.Array, n_probes: int) -> jax.Array:
    """``E‖Θ̂ − Θ‖²_F = ((tr Θ)² + ‖Θ‖²_F) / k`` for a k-probe Gaussian sketch.

    ``kernel``: the exact (or a plug-in) full kernel (N, N, K, K) or its
    flattened (N·K, N·K) form. Follows from ``u = Jω ~ N(0, Θ)``:
    ``Var(u_a u_b) = Θ_aa Θ_bb + Θ_ab²``. Divide by ``‖Θ‖²_F`` for the squared
    relative error.
    """
    n_probes = check_n_probes(n_probes)
    k = _validate.float_array("kernel", kernel)
    if k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        k = layout.flatten_kernel(k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel: expected shape (N, N, K, K) or (m, m), got {tuple(np.shape(kernel))}")
    return (jnp.trace(k) ** 2 + jnp.sum(k**2)) / n_probes


# --------------------------------------------------------------------------- #
# Jacobian restoration
# --------------------------------------------------------------------------- #


def restore_jacobian(
    directions: jax.Array,
    responses: jax.Array,
    *,
    basis: jax.Array | None = None,
    rcond: float | None = None,
    precision="highest",
) -> JacobianFit:
    """Least-squares Jacobian on a subspace from probe pairs (ω_i, J ω_i).

    With coordinates ``c_i = Bᵀ ω_i`` (B: P × d, orthonormal columns; B = I
    when ``basis`` is None) solve ``min_G Σ_i ‖df_i − J_B c_i‖²``::

        J_Bᵀ = pinv(C) DF,   C = Ω B (k × d),   DF (k × N·K).

    When every ω_i lies in span(B) and df_i = J ω_i exactly, ``J_B = J B``
    once rank(C) = d, and the residual is round-off. Probe components outside
    span(B), noise, or a nonlinear black box show up in the residual. Without
    a basis and fewer probes than parameters the minimum-norm solution is
    ``J P_Ω`` (J restricted to the probed span).

    Args:
      directions: (k, P) flat probes (:func:`probe_directions`, or
        ``Probes.directions``).
      responses: (k, N, K) or (k, M) observed output changes per unit probe.
      basis: optional (P, d) with orthonormal columns.
      rcond: relative singular-value cut-off for the least squares (default
        ``max(k, d) · eps``).

    Returns:
      :class:`JacobianFit`.
    """
    omega = _validate.float_array("directions", directions)
    df = _validate.float_array("responses", responses)
    if omega.ndim != 2:
        raise ValueError(f"directions: expected a flat (k, P) array, got shape {tuple(omega.shape)}")
    if df.ndim == 2:
        df = df[:, :, None]
    if df.ndim != 3 or df.shape[0] != omega.shape[0]:
        raise ValueError(
            f"responses: expected shape (k, N, K) with k = {omega.shape[0]} probes, got {tuple(df.shape)}"
        )
    _validate.finite("directions", omega)
    _validate.finite("responses", df)
    k, n_rows, outputs = df.shape
    precision = normalize(precision)
    if basis is None:
        coords = omega
    else:
        b = _validate.float_array("basis", basis)
        if b.ndim != 2 or b.shape[0] != omega.shape[1]:
            raise ValueError(f"basis: expected shape ({omega.shape[1]}, d), got {tuple(b.shape)}")
        if _validate.is_concrete(b):
            gram = np.asarray(b.T @ b)
            if np.abs(gram - np.eye(gram.shape[0])).max() > 1e3 * np.finfo(gram.dtype).eps * max(1, gram.shape[0]):
                raise ValueError("basis: expected orthonormal columns (BᵀB = I); orthonormalize it first, e.g. by QR")
        with jax.default_matmul_precision(precision):
            coords = omega @ b
    dtype = jnp.result_type(coords, df)
    coords, flat = coords.astype(dtype), df.reshape(k, -1).astype(dtype)
    if rcond is None:
        rcond = max(k, coords.shape[1]) * float(jnp.finfo(dtype).eps)
    return _fit(coords, flat, rcond, n_rows=n_rows, outputs=outputs, precision=precision)


@kernel_jit(static_argnames=("n_rows", "outputs"))
def _fit(coords, flat, rcond, *, n_rows, outputs) -> JacobianFit:
    k, d = coords.shape
    sol, _, rank, _ = jnp.linalg.lstsq(coords, flat, rcond=rcond)
    resid = flat - coords @ sol
    residual = jnp.sqrt(jnp.sum(resid**2))
    total = jnp.sqrt(jnp.sum(flat**2))
    relative = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), 0.0)
    dof = (k - rank) * flat.shape[1]
    noise = jnp.where(dof > 0, residual / jnp.sqrt(jnp.maximum(dof, 1)), jnp.nan)
    jac = sol.T.reshape(n_rows, outputs, d)
    return JacobianFit(jacobian=jac, residual=residual, relative_residual=relative, rank=rank, noise_std=noise)
