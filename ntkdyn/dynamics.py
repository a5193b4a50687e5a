"""Closed-form linearized gradient-descent dynamics (Lee et al. 2019).

Conventions (docs/conventions.md): N training inputs, K outputs, ``n = N·K``, loss
``L = 1/(2n)‖f − Y‖²``, learning rate η, time t in steps (continuous time is
gradient flow on the same clock). With ``r₀ = f₀(X) − Y`` and the kernel
``Θ = Θ(X, X)`` (+ reg·I):

* train (Eq. 9):   ``f_t(X)  = Y + E(t) r₀``,  ``E(t) = exp(−ηΘt/n)`` or ``(I − ηΘ/n)^t``
* test (Eq. 10):   ``f_t(x*) = f₀(x*) − Θ(x*, X) α_t``
* weights (Eq. 8): ``θ_t = θ₀ − Jᵀ α_t``   (one VJP of ``f(·, X)`` at θ₀)

with ``α_t = Θ⁻¹(I − E(t)) r₀ = V diag(g(λ, t)) Vᵀ r₀`` from one
eigendecomposition (see :mod:`ntkdyn.spectral`).

One solver serves every optimizer: it takes the per-mode functions
``(1 − E, G)`` of :func:`ntkdyn.spectral.modes` — gradient flow, discrete
gradient descent, or heavy-ball momentum ``optax.sgd(η, momentum=β)``
(``v ← βv + g; θ ← θ − ηv``, from rest), for which ``E_β`` and ``G_β``
replace ``E`` and ``g`` in every formula above — so ``momentum=``, ``metric=``
and both clocks combine freely (momentum needs discrete time).

An optional PSD ``metric`` M changes the flow to ``ḟ = −(η/n) Θ M (f − Y)``
(e.g. ``M = H⁻¹`` for a solver layer's aligned loss). With ``P = M^{1/2}`` and
the symmetric ``S = P Θ P = V diag(λ) Vᵀ``:
``α_t = P V diag(g(λ, t)) Vᵀ P r₀`` and ``f_t(X) = f₀(X) − Θ α_t``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate, spectral
from ntkdyn.kernels.layout import flatten_kernel
from ntkdyn.spectral import Spectrum

__all__ = [
    "UnstableLearningRateWarning",
    "function_space",
    "parameter_space",
    "max_learning_rate",
    "solve",
    "Solution",
    "weights_from_alpha",
]


class UnstableLearningRateWarning(UserWarning):
    """Discrete-time descent with a step above ``2(1 + β)n/λ_max`` diverges."""


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


class _Problem(NamedTuple):
    """Validated inputs of a closed-form solve, in the working dtype."""

    mat: jax.Array  # (m, m) train kernel: full → (N·K, N·K); traced → (N, N)
    r0: jax.Array  # (m, c) residual columns: full → (N·K, 1); traced → (N, K)
    y_train: jax.Array
    k_st: jax.Array | None  # (Nt·K, N·K) or (Nt, N)
    fx_test_0: jax.Array | None
    times: jax.Array
    lr: Any
    diag_reg: Any
    traced: bool
    n: int
    rcond: float
    momentum: float
    scalar_t: bool
    time: str


def _problem(
    k_train_train, y_train, fx_train_0, t, *, k_test_train=None, fx_test_0=None, learning_rate=1.0, momentum=0.0,
    diag_reg=0.0, time="continuous", rcond=None,
) -> _Problem:
    """Check shapes, forms, finiteness and hyper-parameters; lay the problem out as matrices.

    The working dtype is the model's, ``result_type(k, f₀)`` (targets are cast
    to it), and the default ``rcond`` is ``N·K·eps`` of the kernel's own dtype:
    a float32 kernel is only float32-accurate whatever dtype Y came in.
    """
    beta = _validate.clock(time, momentum, spectral.TIMES)
    fx_train_0 = _validate.matrix("fx_train_0", fx_train_0)
    n_train, outputs = fx_train_0.shape
    y_train = _validate.matrix("y_train", y_train, n_train, outputs)
    k_tt = _validate.float_array("k_train_train", k_train_train)
    traced = _validate.kernel_form("k_train_train", k_tt, n_train, n_train, outputs)
    times, scalar_t = _validate.times(t)
    lr = _validate.positive_scalar("learning_rate", learning_rate)
    diag_reg = _validate.nonnegative_scalar("diag_reg", diag_reg)
    rcond = _validate.rcond(rcond)
    k_st = None
    if k_test_train is not None or fx_test_0 is not None:
        if k_test_train is None or fx_test_0 is None:
            raise ValueError("k_test_train, fx_test_0: pass both for test predictions, or neither")
        fx_test_0 = _validate.matrix("fx_test_0", fx_test_0, None, outputs)
        k_st = _validate.float_array("k_test_train", k_test_train)
        if _validate.kernel_form("k_test_train", k_st, fx_test_0.shape[0], n_train, outputs) != traced:
            raise ValueError(
                "k_test_train: must be in the same form (full or output-traced) as k_train_train; "
                f"got shapes {tuple(k_st.shape)} and {tuple(k_tt.shape)}"
            )
        _validate.finite("k_test_train", k_st)
    _validate.finite("k_train_train", k_tt)
    if beta > 0:
        _validate.whole_steps(times)
    dtype = jnp.result_type(k_tt, fx_train_0)
    n = n_train * outputs
    mat = (k_tt if traced else flatten_kernel(k_tt)).astype(dtype)
    _validate.symmetric("k_train_train", mat)
    r0 = (fx_train_0 - y_train).astype(dtype)
    return _Problem(
        mat=mat,
        r0=r0 if traced else r0.reshape(n, 1),
        y_train=y_train.astype(dtype),
        k_st=None if k_st is None else (k_st if traced else flatten_kernel(k_st)).astype(dtype),
        fx_test_0=None if fx_test_0 is None else fx_test_0.astype(dtype),
        times=times.astype(dtype),
        lr=lr,
        diag_reg=diag_reg,
        traced=traced,
        n=n,
        rcond=spectral.default_rcond(n, k_tt.dtype) if rcond is None else rcond,
        momentum=beta,
        scalar_t=scalar_t,
        time=time,
    )


def _metric_root(metric: jax.Array, n_examples: int, outputs: int, dtype) -> jax.Array:
    """``P = M^{1/2}`` as an (N·K, N·K) matrix from a (K, K) or (N·K, N·K) PSD M."""
    m = _validate.float_array("metric", metric)
    nk = n_examples * outputs
    if m.shape == (outputs, outputs) and outputs != nk:
        m = jnp.kron(jnp.eye(n_examples, dtype=m.dtype), m)
    if m.shape != (nk, nk):
        raise ValueError(f"metric: expected shape {(outputs, outputs)} or {(nk, nk)}, got {tuple(m.shape)}")
    _validate.finite("metric", m)
    _validate.symmetric_psd("metric", m, what="positive semi-definite matrix")
    w, v = jnp.linalg.eigh(0.5 * (m + m.T))
    return ((v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T).astype(dtype)


# --------------------------------------------------------------------------- #
# the solver
# --------------------------------------------------------------------------- #


@struct.dataclass
class Solution:
    """Everything one eigendecomposition gives.

    Attributes:
      train: (T, N, K) train outputs; test: (T, Nt, K) or None.
      alpha: (T, N, K), the cotangent ``Θ⁻¹(I − E(t)) r₀`` (``G`` for heavy
        ball) that maps to weights by ``θ_t = θ₀ − Jᵀ α_t``.
      spectrum: the :class:`~ntkdyn.spectral.Spectrum` used.
      n: N·K (static).
    """

    train: jax.Array
    test: jax.Array | None
    alpha: jax.Array
    spectrum: Spectrum
    n: int = struct.field(pytree_node=False, default=1)


def solve(k_train_train: jax.Array, y_train: jax.Array, fx_train_0: jax.Array, t, **options) -> Solution:
    """One eigendecomposition, then train/test outputs and ``α_t`` at all times (T ≥ 1).

    The engine behind :func:`function_space`, :func:`parameter_space` and
    :func:`ntkdyn.predict`. Arguments and keyword options exactly as in
    :func:`function_space`.
    """
    metric = options.pop("metric", None)
    diag_reg_absolute = options.pop("diag_reg_absolute", False)
    prob = _problem(k_train_train, y_train, fx_train_0, t, **options)
    time = prob.time
    dtype = prob.mat.dtype
    mat, root = prob.mat, None
    k_st, traced = prob.k_st, prob.traced
    r0 = prob.r0
    if metric is not None:
        n_train, outputs = prob.y_train.shape
        root = _metric_root(metric, n_train, outputs, dtype)
        if traced:  # the metric couples outputs: lift Θ_tr ⊗ I_K to the full form
            eye = jnp.eye(outputs, dtype=dtype)
            mat = jnp.kron(mat, eye)
            k_st = None if k_st is None else jnp.kron(k_st, eye)
            r0 = r0.reshape(-1, 1)
            traced = False
    spec = _decompose(mat, root, prob.diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=prob.rcond)
    _check_spectrum(spec, prob, time, metric=metric is not None)
    train, test, alpha = _evaluate(
        spec, mat, root, r0, prob.y_train, prob.times, jnp.asarray(prob.lr, dtype), jnp.asarray(prob.diag_reg, dtype),
        k_st, prob.fx_test_0, time=time, traced=traced, momentum=prob.momentum,
        psd_tol=_validate.psd_tolerance(mat.shape[0], dtype), kernel_checked=_validate.is_concrete(mat),
    )
    return Solution(train=train, test=test, alpha=alpha, spectrum=spec, n=prob.n)


def _decompose(mat, root, diag_reg, *, diag_reg_absolute: bool, rcond: float) -> Spectrum:
    """Spectrum of ``Θ + reg·I``, or of ``S = P (Θ + reg·I) P`` with a metric root P."""
    if root is None:
        return spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=rcond)
    # regularize Θ itself, then symmetrize the flow
    reg = jnp.asarray(diag_reg, mat.dtype) * (1.0 if diag_reg_absolute else jnp.mean(jnp.diagonal(mat)))
    reg_mat = mat + reg * jnp.eye(mat.shape[0], dtype=mat.dtype)
    return spectral.spectrum(root @ reg_mat @ root, rcond=rcond).replace(reg=reg)


def _kernel_extremes(spec: Spectrum) -> tuple[jax.Array, jax.Array]:
    """``(λ_min(Θ), scale)`` from the spectrum of ``Θ + reg·I``: the regularizer shifted back out.

    A regularizer must not hide an indefinite kernel, so the PSD test is on Θ
    itself; its scale is the regularized matrix's largest |eigenvalue| (the
    eigensolver's round-off is relative to that).
    """
    low = spec.smallest - spec.reg
    return low, jnp.maximum(spec.max_eigenvalue, jnp.abs(low))


def _check_spectrum(spec: Spectrum, prob: _Problem, time: str, *, metric: bool = False) -> None:
    """Eager checks that need the spectrum: indefiniteness, fractional unstable steps, the stability warning.

    With a metric the spectrum is that of ``P (Θ + reg·I) P``, which can hide
    a negative direction of Θ: the kernel is then checked on its own.
    """
    dtype = prob.mat.dtype
    if metric:
        _validate.symmetric_psd("k_train_train", prob.mat, what="kernel")
    elif _validate.is_concrete(spec.eigenvalues):
        low, scale = _kernel_extremes(spec)
        _validate.psd_eigenvalues("k_train_train", np.array([float(low), float(scale)]), dtype,
                                  size=prob.mat.shape[0])
    if time != "discrete" or not _validate.is_concrete((spec.eigenvalues, prob.lr)):
        return
    times = prob.times if _validate.is_concrete(prob.times) else None
    _check_discrete_rate(float(spec.max_eigenvalue), float(prob.lr), prob.momentum, prob.n, times, dtype)


def _check_discrete_rate(lam_max: float, lr: float, beta: float, n: int, times, dtype, *, note: str = "") -> None:
    """Eager discrete-time checks against the top eigenvalue ``λ_max`` (of Θ, or its Ritz estimate).

    Plain descent (β = 0) past ``ηλ_max/n > 1`` has a negative ``1 − ηλ/n``: only whole
    step counts are defined (ValueError for a fractional one in ``times``; None skips
    this). Past ``max_learning_rate = 2(1+β)n/λ_max`` descent diverges
    (:class:`UnstableLearningRateWarning`, ``note`` appended to the limit; reached as
    public function → solver → check → here, so it points at the user's call).
    """
    if lam_max <= 0:
        return
    if beta == 0 and lr * lam_max / n > 1 and times is not None:
        values = np.asarray(times)
        fractional = np.isfinite(values) & (values != np.round(values))
        if np.any(fractional):
            raise ValueError(
                f"t: time='discrete' with learning_rate={lr:.6g} above n/λ_max={n / lam_max:.6g} "
                "makes (1 − ηλ/n) negative, so only whole step counts are defined; "
                f"got fractional t={values[fractional][0]}"
            )
    limit = 2.0 * (1.0 + beta) * n / lam_max
    # the limit itself is stable in the sense that nothing grows (the top mode oscillates):
    # no warning there, and none for a rate a few ulps above it from rounding
    if lr > limit * (1.0 + 8.0 * float(jnp.finfo(dtype).eps)):
        what = "2n/λ_max" if beta == 0 else "2(1+β)n/λ_max"
        warnings.warn(
            f"learning_rate={lr:.6g} is above max_learning_rate = {what} = {limit:.6g}{note}: "
            "discrete descent on the linearized model diverges",
            UnstableLearningRateWarning,
            stacklevel=5,
        )


@functools.partial(jax.jit, static_argnames=("time", "traced", "momentum", "psd_tol", "kernel_checked"))
def _evaluate(spec, mat, root, r0, y_train, times, lr, diag_reg, k_st, fx_test_0, *, time: str, traced: bool,
              momentum: float, psd_tol: float, kernel_checked: bool = False):
    """Train outputs, test outputs and α at every time, from one spectrum (shapes in :class:`Solution`).

    Traced arguments are not checked eagerly: an invalid value (η ≤ 0,
    diag_reg < 0, t < 0, a fractional heavy-ball step, NaN anywhere, an
    asymmetric or indefinite kernel) makes the affected outputs NaN instead.
    """
    n_train, outputs = y_train.shape
    n = n_train * outputs
    lam, vecs, null = spec.eigenvalues, spec.eigenvectors, spec.null
    fitted, g = spectral.modes(lam, times, learning_rate=lr, n=n, time=time, momentum=momentum)  # (T, m)
    g = jnp.where(null, 0.0, g)
    coef = vecs.T @ (r0 if root is None else root @ r0)  # (m, c)
    alpha = jnp.einsum("im,tm,mc->tic", vecs, g, coef)
    if root is None:
        fitted = jnp.where(null, 0.0, fitted)
        residual = r0[None] - jnp.einsum("im,tm,mc->tic", vecs, fitted, coef)
    else:
        alpha = jnp.einsum("ij,tjc->tic", root, alpha)
        reg_mat = mat + spec.reg * jnp.eye(mat.shape[0], dtype=mat.dtype)
        residual = r0[None] - jnp.einsum("ij,tjc->tic", reg_mat, alpha)
    n_times = times.shape[0]
    train = y_train[None] + residual.reshape(n_times, n_train, outputs)
    alpha = alpha.reshape(n_times, n_train, outputs)
    test = None
    if k_st is not None:
        if traced:
            shift = jnp.einsum("sj,tjc->tsc", k_st, alpha)
        else:
            shift = jnp.einsum("ij,tj->ti", k_st, alpha.reshape(n_times, n)).reshape(n_times, -1, outputs)
        test = fx_test_0[None] - shift

    if root is None:
        low, top = _kernel_extremes(spec)
    elif kernel_checked:  # a concrete Θ was checked on the host (_check_spectrum): no second eigvalsh
        low, top = jnp.zeros((), mat.dtype), jnp.ones((), mat.dtype)
    else:  # P (Θ + reg·I) P can hide a negative direction of Θ: Θ's own spectrum
        own = jnp.linalg.eigvalsh(0.5 * (mat + mat.T))
        low, top = own[0], jnp.maximum(own[-1], jnp.abs(own[0]))
    ok = _valid_hyper(lr, diag_reg) & _validate.traced_symmetric_psd(mat, psd=False) & (low >= -psd_tol * top)
    ok_t = ok & (times >= 0)
    if momentum > 0:
        ok_t = ok_t & (jnp.isinf(times) | (times == jnp.round(times)))
    ok_t = ok_t[:, None, None]
    return _validate.nan_unless(ok_t, (train, test, alpha))


def _valid_hyper(lr, diag_reg) -> jax.Array:
    """Traced twin of the eager checks of η (finite, > 0) and diag_reg (finite, >= 0); None passes."""
    ok = jnp.asarray(True)
    if lr is not None:
        ok = ok & jnp.isfinite(lr) & (lr > 0)
    return ok & jnp.isfinite(diag_reg) & (diag_reg >= 0)


@contextlib.contextmanager
def computed_kernels(owner: str):
    """Errors about a kernel the caller computed itself name ``owner`` (the user's argument it came from).

    ``predict`` / ``parameter_space`` / ``compare`` compute Θ from the model;
    when it fails a check (NaN/inf from an overflowing Jacobian), the user
    never passed ``k_train_train``: the message names ``owner`` and keeps the
    check's own words.
    """
    try:
        yield
    except ValueError as err:
        text = str(err)
        for name in ("k_train_train", "k_test_train"):
            if text.startswith(f"{name}: "):
                where = "x_test" if name == "k_test_train" else "x"
                raise ValueError(f"{owner}: the empirical NTK computed from {owner} on {where} failed its check "
                                 f"({text[len(name) + 2:]})") from err
        raise


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
    momentum: float = 0.0,
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
    linear model, step for step), ``n = N·K``. With ``momentum = β > 0``
    (discrete time, whole steps) ``E`` and ``Θ⁻¹(I − E)`` are the heavy-ball
    functions ``V E_β Vᵀ`` and ``V G_β Vᵀ`` of ``optax.sgd(η, momentum=β)``.

    Args:
      k_train_train: Θ(X, X), full (N, N, K, K) or output-traced (N, N);
        symmetric positive semi-definite (ValueError otherwise; the tolerance
        is :func:`ntkdyn._validate.psd_tolerance` of its size and dtype).
        Θ itself is checked: neither ``diag_reg`` nor ``metric`` can make an
        indefinite kernel pass.
      y_train: targets (N, K).
      fx_train_0: f₀(X), (N, K).
      t: time in steps; scalar or 1-D; ``jnp.inf`` gives the converged limit.
      k_test_train: Θ(x*, X), (Nt, N, K, K) or (Nt, N), same form as k_train_train.
      fx_test_0: f₀(x*), (Nt, K).
      learning_rate: η (> 0; Python, NumPy or JAX scalar).
      momentum: heavy-ball β in [0, 1) (``optax.sgd`` semantics); needs
        ``time="discrete"`` when > 0.
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
      Under ``jit``, invalid traced values give NaN outputs (never finite ones).
      At exactly the stability limit, t = ∞ gives NaN (the top mode oscillates
      forever: there is no limit); whole t are exact.

    Warns:
      UnstableLearningRateWarning: discrete time with η above ``2(1+β)n/λ_max``.
    """
    sol = solve(
        k_train_train, y_train, fx_train_0, t,
        k_test_train=k_test_train, fx_test_0=fx_test_0, learning_rate=learning_rate, momentum=momentum,
        diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, metric=metric, rcond=rcond,
    )
    scalar = jnp.ndim(t) == 0
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
    ntk_method: str = "auto",
    tile_size: int | str | None = "auto",
    **options,
) -> Any:
    """Weights of the linearized network after time ``t`` (Eq. 8).

    ``θ_t = θ₀ − J₀ᵀ Θ⁻¹(I − E(t)) (f₀(X) − Y)`` (``V G_β Vᵀ`` with momentum),
    the ``Jᵀ·`` applied as one VJP of ``f(·, X)`` at θ₀ (vmapped over the
    times), so the (P × N·K) Jacobian is never formed. ``f_lin(θ_t, ·)`` equals
    :func:`function_space` to round-off (without ``diag_reg``: with it the
    train outputs of :func:`function_space` follow the regularized flow
    ``Y + E_reg r₀``, as neural-tangents does, and differ from
    ``f_lin(θ_t, X)`` by exactly ``reg·α_t``; test outputs agree).

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``.
      params0: θ₀, any pytree of floating-point arrays.
      x_train: X, (N, ...).
      y_train: Y, (N, K).
      t: scalar or 1-D times in steps (inf allowed).
      k_train_train: Θ(X, X) if already computed (full or traced); otherwise the
        exact full kernel is computed with ``ntk_method`` / ``tile_size``.
        With a traced kernel the weights use ``Θ ≈ Θ_tr ⊗ I_K`` (an approximation
        unless K = 1).
      ntk_method, tile_size: how that kernel is computed
        (:func:`ntkdyn.empirical_ntk`'s ``method`` and ``tile_size``).
      **options: every keyword of :func:`function_space` but its test data
        (``learning_rate``, ``momentum``, ``diag_reg``, ``diag_reg_absolute``,
        ``time``, ``metric``, ``rcond``), same meaning and defaults, forwarded
        unchanged to the solver (an unknown keyword raises TypeError;
        ``k_test_train``/``fx_test_0`` too: the weights need no test data).

    Returns:
      A pytree like ``params0`` with a leading (T,) axis (none for scalar t).
    """
    from ntkdyn.kernels import empirical_ntk  # kernel is computed only when not given

    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    for name in options:  # before any kernel is computed
        if name in ("k_test_train", "fx_test_0"):
            raise TypeError(f"{name}: parameter_space takes no test data (use function_space for test outputs)")
        if name not in _SOLVER_OPTIONS:
            raise TypeError(f"parameter_space() got an unexpected keyword argument {name!r}")
    x_train = _validate.batch("x_train", x_train)
    _validate.params_tree("params0", params0)
    _, scalar = _validate.times(t)
    fx0 = apply_fn(params0, x_train)
    computed = k_train_train is None
    if computed:
        k_train_train = empirical_ntk(apply_fn, params0, x_train, method=ntk_method, tile_size=tile_size)
    with computed_kernels("params0") if computed else contextlib.nullcontext():
        sol = solve(k_train_train, y_train, fx0, t, **options)
    return _drop_time_axis(weights_from_alpha(apply_fn, params0, x_train, sol.alpha), scalar)


# the keywords parameter_space forwards: function_space's keyword-only solver options
_SOLVER_OPTIONS = frozenset(
    name for name, p in inspect.signature(function_space).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def max_learning_rate(
    k_train_train: jax.Array,
    *,
    momentum: float = 0.0,
    num_outputs: int | None = None,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
) -> jax.Array:
    """Largest stable step, ``2(1 + β) n / λ_max``, n = N·K (β = 0: plain GD, ``2n/λ_max``).

    Under ``L = 1/(2n)‖f − Y‖²`` a linearized GD step multiplies each residual
    mode by ``1 − ηλ/n``; it shrinks for every mode iff ``η < 2n/λ_max``. A
    heavy-ball mode's one-step map has characteristic polynomial
    ``μ² − (1 − a + β) μ + β`` (``a = ηλ/n``); both roots lie in the unit disc
    iff ``0 < a < 2(1 + β)``. At exactly the limit the top mode oscillates
    with unit modulus forever (nothing grows, nothing converges).

    Args:
      k_train_train: full (N, N, K, K) or traced (N, N) kernel; symmetric PSD
        (ValueError otherwise).
      momentum: heavy-ball β in [0, 1).
      num_outputs: K for a traced kernel (default 1); must match the full form.
      diag_reg, diag_reg_absolute: as in :func:`function_space` (the step is for
        the regularized kernel).

    Returns:
      A scalar; ``inf`` for an all-zero kernel. Under ``jit``, NaN where the
      eager checks would raise (asymmetric or indefinite kernel, diag_reg
      negative or not finite).
    """
    beta = _validate.fraction("momentum", momentum)
    k = _validate.float_array("k_train_train", k_train_train)
    if k.ndim == 4 and k.shape[0] == k.shape[1] and k.shape[2] == k.shape[3]:
        if num_outputs is not None and num_outputs != k.shape[2]:
            raise ValueError(f"num_outputs: the full kernel has K = {k.shape[2]}, got num_outputs={num_outputs}")
        n = k.shape[0] * k.shape[2]
        mat = flatten_kernel(k)
    elif k.ndim == 2 and k.shape[0] == k.shape[1]:
        n = k.shape[0] * (1 if num_outputs is None else _validate.count("num_outputs", num_outputs))
        mat = k
    else:
        raise ValueError(f"k_train_train: expected shape (N, N, K, K) or (N, N), got {tuple(k.shape)}")
    if k.shape[0] == 0:
        raise ValueError("k_train_train: expected a non-empty kernel, got shape (0, ...)")
    _validate.finite("k_train_train", k)
    _validate.nonnegative_scalar("diag_reg", diag_reg)
    _validate.symmetric("k_train_train", mat)
    spec = spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute)
    lam_max = spec.max_eigenvalue
    low, scale = _kernel_extremes(spec)
    if _validate.is_concrete(lam_max):
        _validate.psd_eigenvalues("k_train_train", np.array([float(low), float(scale)]), mat.dtype,
                                  size=mat.shape[0])
    limit = jnp.where(lam_max > 0, 2.0 * (1.0 + beta) * n / jnp.where(lam_max > 0, lam_max, 1.0), jnp.inf)
    tol = _validate.psd_tolerance(mat.shape[0], mat.dtype)
    # under jit: NaN for what the eager checks reject (asymmetric or indefinite kernel, bad diag_reg)
    ok = (_valid_hyper(None, jnp.asarray(diag_reg, mat.dtype)) & _validate.traced_symmetric_psd(mat, psd=False)
          & (low >= -tol * scale))
    return jnp.where(ok, limit, jnp.nan)
