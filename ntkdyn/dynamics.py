"""Closed-form linearized gradient-descent dynamics (Lee et al. 2019).

Conventions (DESIGN.md): N training inputs, K outputs, ``n = N·K``, loss
``L = 1/(2n)‖f − Y‖²``, learning rate η, time t in steps (continuous time is
gradient flow on the same clock). With ``r₀ = f₀(X) − Y`` and the kernel
``Θ = Θ(X, X)`` (+ reg·I):

* train (Eq. 9):   ``f_t(X)  = Y + E(t) r₀``,  ``E(t) = exp(−ηΘt/n)`` or ``(I − ηΘ/n)^t``
* test (Eq. 10):   ``f_t(x*) = f₀(x*) − Θ(x*, X) α_t``
* weights (Eq. 8): ``θ_t = θ₀ − Jᵀ α_t``   (one VJP of ``f(·, X)`` at θ₀)

with ``α_t = Θ⁻¹(I − E(t)) r₀ = V diag(g(λ, t)) Vᵀ r₀`` from one
eigendecomposition (see :mod:`ntkdyn.spectral`).

An optional PSD ``metric`` M changes the flow to ``ḟ = −(η/n) Θ M (f − Y)``
(e.g. ``M = H⁻¹`` for a solver layer's aligned loss). With ``P = M^{1/2}`` and
the symmetric ``S = P Θ P = V diag(λ) Vᵀ``:
``α_t = P V diag(g(λ, t)) Vᵀ P r₀`` and ``f_t(X) = f₀(X) − Θ α_t``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn import spectral
from ntkdyn._checks import as_float_array, check_batch, check_finite, is_concrete
from ntkdyn.spectral import Spectrum

__all__ = [
    "UnstableLearningRateWarning",
    "flatten_kernel",
    "function_space",
    "parameter_space",
    "max_learning_rate",
    "solve",
    "Solution",
]


class UnstableLearningRateWarning(UserWarning):
    """Discrete-time gradient descent with a step above ``2n/λ_max`` diverges."""


# --------------------------------------------------------------------------- #
# kernel layout
# --------------------------------------------------------------------------- #


def flatten_kernel(k: jax.Array) -> jax.Array:
    """(N1, N2, K, K) → (N1·K, N2·K), rows/cols in row-major (N, K) order."""
    n1, n2, k1, k2 = k.shape
    return k.transpose(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)


def _kernel_form(name: str, k: jax.Array, rows: int, cols: int, outputs: int) -> bool:
    """True for the traced (rows, cols) form, False for the full form; ValueError otherwise."""
    if k.ndim == 2 and k.shape == (rows, cols):
        return True
    if k.ndim == 4 and k.shape == (rows, cols, outputs, outputs):
        return False
    raise ValueError(
        f"{name}: expected shape {(rows, cols, outputs, outputs)} (full) or {(rows, cols)} (output-traced), "
        f"got {tuple(k.shape)}"
    )


def _check_2d(name: str, x, rows: int | None = None, cols: int | None = None) -> jax.Array:
    x = as_float_array(name, x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, K), got {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows or cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name}: expected shape {(rows, cols)}, got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, K) array, got shape {tuple(x.shape)}")
    return x


def _check_times(t) -> tuple[jax.Array, bool]:
    """(1-D times, was_scalar). Times are ≥ 0, may be inf, never NaN."""
    arr = as_float_array("t", t)
    if arr.ndim > 1:
        raise ValueError(f"t: expected a scalar or a 1-D array of times, got shape {tuple(arr.shape)}")
    if is_concrete(arr):
        values = np.asarray(arr)
        if np.any(np.isnan(values)):
            raise ValueError("t: expected times >= 0 (inf allowed), got NaN")
        if np.any(values < 0):
            raise ValueError(f"t: expected times >= 0, got {values[values < 0].min()}")
    return jnp.atleast_1d(arr), arr.ndim == 0


# --------------------------------------------------------------------------- #
# the solver
# --------------------------------------------------------------------------- #


class Solution:
    """Everything one eigendecomposition gives (plain container, not a pytree).

    ``train``: (T, N, K); ``test``: (T, Nt, K) or None; ``alpha``: (T, N, K), the
    cotangent ``Θ⁻¹(I − E(t)) r₀`` that maps to weights by ``θ_t = θ₀ − Jᵀ α_t``;
    ``spectrum``: the :class:`~ntkdyn.spectral.Spectrum` used.
    """

    def __init__(self, train, test, alpha, spectrum, n):
        self.train, self.test, self.alpha, self.spectrum, self.n = train, test, alpha, spectrum, n


def _metric_root(metric: jax.Array, n_examples: int, outputs: int) -> jax.Array:
    """``P = M^{1/2}`` as an (N·K, N·K) matrix from a (K, K) or (N·K, N·K) PSD M."""
    m = as_float_array("metric", metric)
    nk = n_examples * outputs
    if m.shape == (outputs, outputs) and outputs != nk:
        m = jnp.kron(jnp.eye(n_examples, dtype=m.dtype), m)
    if m.shape != (nk, nk):
        raise ValueError(f"metric: expected shape {(outputs, outputs)} or {(nk, nk)}, got {tuple(m.shape)}")
    if is_concrete(m):
        check_finite("metric", m)
        values = np.asarray(m)
        scale = max(float(np.abs(values).max()), 1e-300)
        if np.abs(values - values.T).max() > 1e-6 * scale:
            raise ValueError("metric: expected a symmetric positive semi-definite matrix; it is not symmetric")
        w = np.linalg.eigvalsh(0.5 * (values + values.T))
        if w.min() < -1e-6 * scale:
            raise ValueError(f"metric: expected a positive semi-definite matrix; smallest eigenvalue is {w.min():.3g}")
    w, v = jnp.linalg.eigh(0.5 * (m + m.T))
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T


class Problem(NamedTuple):
    """Validated inputs of a closed-form solve (see :func:`validate_problem`)."""

    k_tt: jax.Array
    y_train: jax.Array
    fx_train_0: jax.Array
    k_st: jax.Array | None
    fx_test_0: jax.Array | None
    times: jax.Array
    lr: Any
    traced: bool
    dtype: Any
    n: int
    rcond: float


def validate_problem(
    k_train_train, y_train, fx_train_0, t, *, k_test_train=None, fx_test_0=None,
    learning_rate=1.0, diag_reg=0.0, rcond=None,
) -> Problem:
    """Check shapes, forms, finiteness and hyper-parameters of a kernel solve.

    Shared by every closed-form solver (plain and heavy-ball). The working
    dtype is the model's, ``result_type(k, f₀)`` (targets are cast to it), and
    the default ``rcond`` is ``N·K·eps`` of the kernel's own dtype: a float32
    kernel is only float32-accurate whatever dtype Y came in.
    """
    fx_train_0 = _check_2d("fx_train_0", fx_train_0)
    n_train, outputs = fx_train_0.shape
    y_train = _check_2d("y_train", y_train, n_train, outputs)
    k_tt = as_float_array("k_train_train", k_train_train)
    traced = _kernel_form("k_train_train", k_tt, n_train, n_train, outputs)
    times, _ = _check_times(t)
    lr = _check_learning_rate(learning_rate)
    _check_diag_reg(diag_reg)
    _check_rcond(rcond)
    k_st = None
    if k_test_train is not None or fx_test_0 is not None:
        if k_test_train is None or fx_test_0 is None:
            raise ValueError("k_test_train, fx_test_0: pass both for test predictions, or neither")
        fx_test_0 = _check_2d("fx_test_0", fx_test_0, None, outputs)
        k_st = as_float_array("k_test_train", k_test_train)
        if _kernel_form("k_test_train", k_st, fx_test_0.shape[0], n_train, outputs) != traced:
            raise ValueError(
                "k_test_train: must be in the same form (full or output-traced) as k_train_train; "
                f"got shapes {tuple(k_st.shape)} and {tuple(k_tt.shape)}"
            )
    for name, arr in (("k_train_train", k_tt), ("y_train", y_train), ("fx_train_0", fx_train_0),
                      ("k_test_train", k_st), ("fx_test_0", fx_test_0)):
        if arr is not None:
            check_finite(name, arr)
    dtype = jnp.result_type(k_tt, fx_train_0)
    n = n_train * outputs
    rcond = spectral.default_rcond(n, k_tt.dtype) if rcond is None else float(rcond)
    return Problem(k_tt, y_train, fx_train_0, k_st, fx_test_0, times.astype(dtype), lr, traced, dtype, n, rcond)


def solve(
    k_train_train: jax.Array,
    y_train: jax.Array,
    fx_train_0: jax.Array,
    t,
    *,
    k_test_train: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    metric: jax.Array | None = None,
    rcond: float | None = None,
) -> Solution:
    """Validate, eigendecompose once, and evaluate train/test/α at all times.

    Shared by :func:`function_space`, :func:`parameter_space` and
    :func:`ntkdyn.predict`. Arguments as in :func:`function_space`.
    """
    spectral._check_time(time)
    prob = validate_problem(
        k_train_train, y_train, fx_train_0, t, k_test_train=k_test_train, fx_test_0=fx_test_0,
        learning_rate=learning_rate, diag_reg=diag_reg, rcond=rcond,
    )
    k_tt, y_train, fx_train_0, k_st, fx_test_0 = prob.k_tt, prob.y_train, prob.fx_train_0, prob.k_st, prob.fx_test_0
    times, lr, traced, dtype, n, rcond = prob.times, prob.lr, prob.traced, prob.dtype, prob.n, prob.rcond
    n_train, outputs = fx_train_0.shape
    has_test = k_st is not None
    root = None
    if metric is not None:
        root = _metric_root(metric, n_train, outputs).astype(dtype)
        if traced:  # the metric couples outputs: lift Θ_tr ⊗ I_K to the full form
            k_tt = jnp.einsum("ij,kl->ijkl", k_tt, jnp.eye(outputs, dtype=k_tt.dtype))
            if has_test:
                k_st = jnp.einsum("ij,kl->ijkl", k_st, jnp.eye(outputs, dtype=k_st.dtype))
            traced = False

    # m × c layout: full kernel → (N·K, 1) residual; traced → (N, K), one kernel per column
    mat = (k_tt if traced else flatten_kernel(k_tt)).astype(dtype)
    r0 = (fx_train_0 - y_train).astype(dtype)
    r0 = r0 if traced else r0.reshape(n, 1)
    spec = _decompose(mat, root, jnp.asarray(diag_reg, dtype), diag_reg_absolute=diag_reg_absolute, rcond=rcond)
    _warn_unstable(spec, lr, n, time, times)
    if has_test:
        k_st = (k_st if traced else flatten_kernel(k_st)).astype(dtype)
        fx_test_0 = fx_test_0.astype(dtype)
    train, test, alpha = _evaluate(
        spec, mat, root, r0, y_train.astype(dtype), times, jnp.asarray(lr, dtype),
        k_st if has_test else None, fx_test_0 if has_test else None, time=time, traced=traced,
    )
    return Solution(train, test, alpha, spec, n)


@functools.partial(jax.jit, static_argnames=("diag_reg_absolute", "rcond"))
def _decompose(mat, root, diag_reg, *, diag_reg_absolute: bool, rcond: float | None) -> Spectrum:
    """Spectrum of ``Θ + reg·I``, or of ``S = P (Θ + reg·I) P`` with a metric root P."""
    if root is None:
        return spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=rcond)
    # regularize Θ itself, then symmetrize the flow
    reg = diag_reg * (1.0 if diag_reg_absolute else jnp.mean(jnp.diagonal(mat)))
    reg_mat = mat + reg * jnp.eye(mat.shape[0], dtype=mat.dtype)
    return spectral.spectrum(root @ reg_mat @ root, rcond=rcond).replace(reg=reg)


@functools.partial(jax.jit, static_argnames=("time", "traced"))
def _evaluate(spec, mat, root, r0, y_train, times, lr, k_st, fx_test_0, *, time: str, traced: bool):
    """Train outputs, test outputs and α at every time, from one spectrum (shapes in :class:`Solution`)."""
    n_train, outputs = y_train.shape
    n = n_train * outputs
    lam, vecs, null = spec.eigenvalues, spec.eigenvectors, spec.null
    tt = times[:, None]
    g = jnp.where(null, 0.0, spectral.gain(lam, tt, learning_rate=lr, n=n, time=time))  # (T, m)
    coef = vecs.T @ (r0 if root is None else root @ r0)  # (m, c)
    alpha = jnp.einsum("im,tm,mc->tic", vecs, g, coef)
    if root is None:
        fitted = jnp.where(null, 0.0, spectral.decay_complement(lam, tt, learning_rate=lr, n=n, time=time))
        residual = r0[None] - jnp.einsum("im,tm,mc->tic", vecs, fitted, coef)
    else:
        alpha = jnp.einsum("ij,tjc->tic", root, alpha)
        reg_mat = mat + spec.reg * jnp.eye(mat.shape[0], dtype=mat.dtype)
        residual = r0[None] - jnp.einsum("ij,tjc->tic", reg_mat, alpha)
    n_times = times.shape[0]
    train = y_train[None] + residual.reshape(n_times, n_train, outputs)
    alpha = alpha.reshape(n_times, n_train, outputs)
    if k_st is None:
        return train, None, alpha
    if traced:
        shift = jnp.einsum("sj,tjc->tsc", k_st, alpha)
    else:
        shift = jnp.einsum("ij,tj->ti", k_st, alpha.reshape(n_times, n)).reshape(n_times, -1, outputs)
    return train, fx_test_0[None] - shift, alpha


def _check_learning_rate(learning_rate) -> float | jax.Array:
    """A finite scalar η > 0 (value checks only when concrete: under jit it is traced)."""
    if isinstance(learning_rate, bool) or not isinstance(
        learning_rate, (int, float, np.floating, np.integer, np.ndarray, jax.Array)
    ):
        raise TypeError(f"learning_rate: expected a positive float, got {learning_rate!r}")
    if np.ndim(learning_rate) != 0:
        raise ValueError(f"learning_rate: expected a scalar, got shape {np.shape(learning_rate)}")
    if is_concrete(learning_rate):
        value = float(np.asarray(learning_rate))
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"learning_rate: expected a finite value > 0, got {value}")
    return learning_rate


def _check_diag_reg(diag_reg) -> None:
    if np.ndim(diag_reg) != 0:
        raise ValueError(f"diag_reg: expected a scalar, got shape {np.shape(diag_reg)}")
    if is_concrete(diag_reg):
        value = float(np.asarray(diag_reg))
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"diag_reg: expected a finite value >= 0, got {value}")


def _check_rcond(rcond) -> None:
    if rcond is None:
        return
    if isinstance(rcond, bool) or not isinstance(rcond, (int, float, np.floating, np.integer)):
        raise TypeError(f"rcond: expected None or a Python float in [0, 1), got {type(rcond).__name__}")
    if not 0 <= float(rcond) < 1:
        raise ValueError(f"rcond: expected None or a float in [0, 1), got {rcond}")


def _warn_unstable(spec: Spectrum, lr, n: int, time: str, times) -> None:
    if time != "discrete" or not is_concrete(spec.eigenvalues) or not is_concrete(lr):
        return
    lam_max = float(spec.max_eigenvalue)
    limit = 2.0 * n / lam_max if lam_max > 0 else np.inf
    a_max = float(lr) * lam_max / n
    if a_max > 1 and is_concrete(times):
        values = np.asarray(times)
        fractional = np.isfinite(values) & (values != np.round(values))
        if np.any(fractional):
            raise ValueError(
                f"t: time='discrete' with learning_rate={float(lr):.6g} above n/λ_max={n / lam_max:.6g} "
                "makes (1 − ηλ/n) negative, so only whole step counts are defined; "
                f"got fractional t={values[fractional][0]}"
            )
    if float(lr) > limit:
        warnings.warn(
            f"learning_rate={float(lr):.6g} is above max_learning_rate = 2n/λ_max = {limit:.6g}: "
            "discrete gradient descent on the linearized model diverges",
            UnstableLearningRateWarning,
            stacklevel=4,
        )


def _drop_time_axis(x, scalar: bool):
    if x is None or not scalar:
        return x
    return jax.tree_util.tree_map(lambda a: a[0], x)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


def function_space(
    k_train_train: jax.Array,
    y_train: jax.Array,
    fx_train_0: jax.Array,
    t,
    *,
    k_test_train: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    metric: jax.Array | None = None,
    rcond: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Train and test outputs of the linearized network after time ``t`` (Eq. 9/10).

    ``f_t(X) = Y + E(t)(f₀(X) − Y)``,
    ``f_t(x*) = f₀(x*) − Θ(x*, X) Θ⁻¹(I − E(t))(f₀(X) − Y)``,
    ``E(t) = exp(−ηΘt/n)`` (``time="continuous"``) or ``(I − ηΘ/n)^t``
    (``time="discrete"``: exactly what full-batch gradient descent does to a
    linear model, step for step), ``n = N·K``.

    Args:
      k_train_train: Θ(X, X), full (N, N, K, K) or output-traced (N, N).
      y_train: targets (N, K).
      fx_train_0: f₀(X), (N, K).
      t: time in steps; scalar or 1-D; ``jnp.inf`` gives the converged limit.
      k_test_train: Θ(x*, X), (Nt, N, K, K) or (Nt, N), same form as k_train_train.
      fx_test_0: f₀(x*), (Nt, K).
      learning_rate: η (> 0).
      diag_reg: regularizer added to Θ(X, X): ``diag_reg · mean(diag Θ)``, or
        ``diag_reg`` itself with ``diag_reg_absolute=True``.
      time: ``"continuous"`` or ``"discrete"``.
      metric: optional PSD M, (K, K) or (N·K, N·K): flow ``ḟ = −(η/n)ΘM(f − Y)``.
      rcond: relative eigenvalue cut-off in [0, 1): eigenvalues ``≤ rcond·λ_max``
        are exact zeros. Default ``N·K·eps`` of the kernel's dtype (as ``pinv``),
        for the traced kernel too.

    Returns:
      ``(fx_train_t, fx_test_t)``: (N, K) and (Nt, K) for scalar t, with a
      leading time axis (T, ...) for 1-D t; ``fx_test_t`` is None without test data.

    Warns:
      UnstableLearningRateWarning: discrete time with η above ``2n/λ_max``.
    """
    _, scalar = _check_times(t)
    sol = solve(
        k_train_train, y_train, fx_train_0, t,
        k_test_train=k_test_train, fx_test_0=fx_test_0, learning_rate=learning_rate,
        diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, metric=metric, rcond=rcond,
    )
    return _drop_time_axis(sol.train, scalar), _drop_time_axis(sol.test, scalar)


def weights_from_alpha(apply_fn: Callable, params0: Any, x_train: jax.Array, alpha: jax.Array) -> Any:
    """``θ_t = θ₀ − Jᵀ α_t`` for every t, as one VJP of ``f(·, X)`` at θ₀ vmapped over time.

    ``alpha``: (T, N, K). Returns params with a leading (T,) axis.
    """
    out, vjp = jax.vjp(lambda p: apply_fn(p, x_train), params0)
    deltas = jax.vmap(lambda a: vjp(a.astype(out.dtype))[0])(alpha)
    return jax.tree_util.tree_map(lambda p0, d: p0[None] - d.astype(p0.dtype), params0, deltas)


def parameter_space(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    t,
    *,
    k_train_train: jax.Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    metric: jax.Array | None = None,
    rcond: float | None = None,
    ntk_method: str = "auto",
    batch_size: int | None = None,
) -> Any:
    """Weights of the linearized network after time ``t`` (Eq. 8).

    ``θ_t = θ₀ − J₀ᵀ Θ⁻¹(I − E(t)) (f₀(X) − Y)``, the ``Jᵀ·`` applied as one VJP
    of ``f(·, X)`` at θ₀ (vmapped over the times), so the (P × N·K) Jacobian is
    never formed. ``f_lin(θ_t, ·)`` equals :func:`function_space` to round-off
    (without ``diag_reg``: with it the train outputs of :func:`function_space`
    follow the regularized flow ``Y + E_reg r₀``, as neural-tangents does, and
    differ from ``f_lin(θ_t, X)`` by exactly ``reg·α_t``; test outputs agree).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``.
      params0: θ₀, any pytree of floating-point arrays.
      x_train: X, (N, ...).
      y_train: Y, (N, K).
      t: scalar or 1-D times in steps (inf allowed).
      k_train_train: Θ(X, X) if already computed (full or traced); otherwise the
        exact full kernel is computed with ``ntk_method`` / ``batch_size``.
        With a traced kernel the weights use ``Θ ≈ Θ_tr ⊗ I_K`` (an approximation
        unless K = 1).
      learning_rate, diag_reg, diag_reg_absolute, time, metric, rcond: as in
        :func:`function_space`.

    Returns:
      A pytree like ``params0`` with a leading (T,) axis (none for scalar t).
    """
    def solver(k, fx0):
        return solve(
            k, y_train, fx0, t, learning_rate=learning_rate, diag_reg=diag_reg,
            diag_reg_absolute=diag_reg_absolute, time=time, metric=metric, rcond=rcond,
        )

    return weights_with(solver, apply_fn, params0, x_train, t, k_train_train=k_train_train,
                        ntk_method=ntk_method, batch_size=batch_size)


def weights_with(
    solver: Callable[[jax.Array, jax.Array], Solution],
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params0: Any,
    x_train: jax.Array,
    t,
    *,
    k_train_train: jax.Array | None = None,
    ntk_method: str = "auto",
    batch_size: int | None = None,
) -> Any:
    """Eq. 8 weights ``θ₀ − Jᵀ α_t`` for any closed-form solver.

    Validates the inputs, evaluates ``f₀(X)``, computes the full kernel when
    ``k_train_train`` is None, takes ``α_t`` from ``solver(k, f₀).alpha`` and
    applies ``Jᵀ`` by one VJP vmapped over t (no time axis for scalar t).
    """
    from ntkdyn.ntk import empirical_ntk  # kernel is computed only when not given

    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    x_train = check_batch("x_train", x_train)
    check_finite("x_train", x_train)
    _, scalar = _check_times(t)
    fx0 = apply_fn(params0, x_train)
    if k_train_train is None:
        k_train_train = empirical_ntk(apply_fn, params0, x_train, method=ntk_method, batch_size=batch_size)
    alpha = solver(k_train_train, fx0).alpha
    return _drop_time_axis(weights_from_alpha(apply_fn, params0, x_train, alpha), scalar)


def max_learning_rate(
    k_train_train: jax.Array,
    *,
    num_outputs: int | None = None,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
) -> jax.Array:
    """Largest stable gradient-descent step, ``2n/λ_max``, n = N·K.

    Under ``L = 1/(2n)‖f − Y‖²`` a linearized GD step multiplies each residual
    mode by ``1 − ηλ/n``; it shrinks for every mode iff ``η < 2n/λ_max``.

    Args:
      k_train_train: full (N, N, K, K) or traced (N, N) kernel.
      num_outputs: K for a traced kernel (default 1); must match the full form.
      diag_reg, diag_reg_absolute: as in :func:`function_space` (the step is for
        the regularized kernel).
    """
    k = as_float_array("k_train_train", k_train_train)
    if k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        if num_outputs is not None and num_outputs != k.shape[2]:
            raise ValueError(f"num_outputs: the full kernel has K = {k.shape[2]}, got num_outputs={num_outputs}")
        n = k.shape[0] * k.shape[2]
        mat = flatten_kernel(k)
    elif k.ndim == 2 and k.shape[0] == k.shape[1]:
        if num_outputs is not None and (not isinstance(num_outputs, (int, np.integer)) or num_outputs < 1):
            raise ValueError(f"num_outputs: expected an integer >= 1, got {num_outputs!r}")
        n = k.shape[0] * (num_outputs or 1)
        mat = k
    else:
        raise ValueError(f"k_train_train: expected shape (N, N, K, K) or (N, N), got {tuple(k.shape)}")
    if k.shape[0] == 0:
        raise ValueError("k_train_train: expected a non-empty kernel")
    check_finite("k_train_train", k)
    _check_diag_reg(diag_reg)
    spec = spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute)
    lam_max = spec.max_eigenvalue
    return jnp.where(lam_max > 0, 2.0 * n / jnp.where(lam_max > 0, lam_max, 1.0), jnp.inf)
