"""Closed-form linearized dynamics of heavy-ball momentum (``optax.sgd(η, momentum=β)``).

optax's update (``optax.trace``, not Nesterov), full batch, per step s::

    v_{s+1} = β v_s + ∇L(θ_s),     θ_{s+1} = θ_s − η v_{s+1},     v_0 = 0.

On the linearized network ``∇L = Jᵀ r_s / n`` (``r = f − Y``, n = N·K), so
``v_s = Jᵀ u_s`` and ``θ_t = θ₀ − Jᵀ α_t``. In an eigenmode of the kernel
(eigenvalue λ, ``a = ηλ/n``) the state ``(r, ω = η u, α)`` follows a linear
recurrence; its first two rows are the 2×2 heavy-ball recurrence of ``(r, ω)``,
the third accumulates the gain::

    ω' = (η/n) r + β ω
    r' = r − λ ω'   = (1 − a) r − λβ ω
    α' = α + ω'     = (η/n) r + β ω + α

From ``(r, ω, α) = (1, 0, 0)``, t steps give the residual factor ``E_β(λ, t)``
(r) and the gain ``G_β(λ, t)`` (α), the momentum analogues of
:func:`ntkdyn.spectral.decay` and :func:`ntkdyn.spectral.gain`:

    train: ``f_t(X)  = Y + V E_β Vᵀ r₀``
    test:  ``f_t(x*) = f₀(x*) − Θ(x*, X) V G_β Vᵀ r₀``
    weights: ``θ_t = θ₀ − Jᵀ V G_β Vᵀ r₀``   (one VJP)

No entry divides by λ, so ``G_β`` is exact at λ = 0; β = 0 gives back plain
gradient descent (``E = (1 − a)^t``, ``G = (1 − E)/λ``). ``B^t`` is taken by
repeated squaring of ``B = I + D`` in the offset form ``D ← 2D + D²``
(``⌈log₂ t⌉`` 3×3 products per mode), accurate for tiny ``a`` too. A mode is stable iff
``0 < a < 2(1 + β)``; then ``t = ∞`` gives ``E = 0``, ``G = 1/λ``. Null modes
(eigenvalues at or below the cut-off of :func:`ntkdyn.spectral.spectrum`) keep
``E = 1`` and get ``G = 0``, exactly as the gradient-descent solver does.

Only discrete time is defined (momentum is a property of the step sequence);
t must be a whole number of steps or ``inf``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn import spectral
from ntkdyn._checks import is_concrete
from ntkdyn.dynamics import (
    Solution,
    UnstableLearningRateWarning,
    _check_learning_rate,
    _check_times,
    _drop_time_axis,
    flatten_kernel,
    validate_problem,
    weights_with,
)

__all__ = [
    "heavy_ball_modes",
    "heavy_ball_decay_curve",
    "heavy_ball_solve",
    "heavy_ball_function_space",
    "heavy_ball_parameter_space",
    "heavy_ball_max_learning_rate",
]


def _check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum: expected a float in [0, 1), got {momentum!r}")
    if not (0.0 <= float(momentum) < 1.0):
        raise ValueError(f"momentum: expected a float in [0, 1), got {momentum!r}")
    return float(momentum)


def _step_offset(lam: jax.Array, learning_rate, momentum: float, n: int) -> jax.Array:
    """(…, 3, 3) ``D = B − I`` for the one-step matrix B acting on the column (r, ω, α).

    Powers are taken as ``(I + D)^2 = I + (2D + D²)``: the identity is never
    added in, so ``a = ηλ/n`` far below eps keeps its relative accuracy
    (forming ``1 − a`` would round it away).
    """
    c = jnp.asarray(learning_rate / n, lam.dtype)
    beta = jnp.asarray(momentum, lam.dtype)
    one, zero = jnp.ones_like(lam), jnp.zeros_like(lam)
    rows = [
        [-c * lam, -lam * beta, zero],
        [c * one, (beta - 1.0) * one, zero],
        [c * one, beta * one, zero],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _num_bits(finite_t: jax.Array):
    """Bits of the largest t, plus one spare (a zero bit is harmless; a missing one is not)."""
    if is_concrete(finite_t):
        top = float(np.max(np.asarray(finite_t, dtype=np.float64), initial=0.0))
        return int(math.floor(math.log2(top))) + 2 if top >= 1 else 1
    top = jnp.max(finite_t, initial=0.0)
    return jnp.where(top >= 1, jnp.floor(jnp.log2(jnp.maximum(top, 1.0))) + 2, 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("momentum", "n"))
def _modes_core(lam1, t1, lr, num_bits, *, momentum, n):
    """(T, m) E and G for 1-D ``lam1``, ``t1`` of one float dtype (see :func:`heavy_ball_modes`)."""
    dtype = lam1.dtype
    beta = momentum
    offset = _step_offset(lam1, lr, beta, n)  # (m, 3, 3): B = I + D
    finite_t = jnp.where(jnp.isinf(t1), 0.0, t1)
    state = jnp.zeros((t1.shape[0], lam1.shape[0], 3), dtype).at[..., 0].set(1.0)

    def square_and_multiply(k, carry):
        # Bᵗ = Π_k B^(2^k) over the set bits k of t (the factors commute);
        # B^(2^k) = I + D_k with D_{k+1} = 2 D_k + D_k²
        state, d = carry
        bit = jnp.mod(jnp.floor(finite_t / jnp.exp2(k.astype(dtype))), 2.0) == 1.0
        moved = state + jnp.einsum("mij,tmj->tmi", d, state)
        state = jnp.where(bit[:, None, None], moved, state)
        return state, 2.0 * d + d @ d

    # a traced loop bound: one compiled program serves every t
    state, _ = jax.lax.fori_loop(0, jnp.asarray(num_bits, jnp.int32), square_and_multiply, (state, offset))
    e, g = state[..., 0], state[..., 2]

    a = lr * lam1 / n
    stable = (a > 0) & (a < 2.0 * (1.0 + beta))
    safe_lam = jnp.where(lam1 > 0, lam1, 1.0)
    inf_t = jnp.isinf(t1)[:, None]
    e_inf = jnp.where(stable, 0.0, jnp.where(lam1 == 0, 1.0, jnp.inf))
    g_inf = jnp.where(stable, 1.0 / safe_lam, jnp.inf)
    e = jnp.where(inf_t, e_inf[None], e)
    g = jnp.where(inf_t, g_inf[None], g)
    return e, g


def heavy_ball_modes(lam, t, *, learning_rate: float, momentum: float, n: int) -> tuple[jax.Array, jax.Array]:
    """Residual factor ``E_β(λ, t)`` and gain ``G_β(λ, t)`` of heavy-ball GD after t steps.

    ``(E, ω, G) = Bᵗ (1, 0, 0)`` with B the one-step matrix of the module
    docstring, ``a = ηλ/n``. ``t`` is a whole number of steps (``inf`` gives
    the limit: ``E = 0, G = 1/λ`` for stable modes, ``E = 1, G = ηt/(n(1−β)) → ∞``
    at λ = 0, inf for unstable modes). ``lam`` (m,) and ``t`` (T,) broadcast
    as ``lam[None]`` with ``t[:, None]``: results are (T, m); scalars give ().

    Null modes are the caller's business (the solvers set their G to 0).
    """
    beta = _check_momentum(momentum)
    lr = _check_learning_rate(learning_rate)
    lam = jnp.asarray(lam)
    t = jnp.asarray(t)
    if is_concrete(t):
        values = np.asarray(t, dtype=np.float64)
        if np.any(np.isnan(values)) or np.any(values < 0):
            raise ValueError(f"t: expected whole numbers of steps >= 0 (or inf), got {values}")
        finite = values[np.isfinite(values)]
        if np.any(finite != np.round(finite)):
            raise ValueError(
                "t: heavy-ball momentum is defined on whole steps only; "
                f"got fractional t={finite[finite != np.round(finite)][0]}"
            )
    scalar_lam, scalar_t = lam.ndim == 0, t.ndim == 0
    lam1, t1 = jnp.atleast_1d(lam), jnp.atleast_1d(t)
    if lam1.ndim != 1 or t1.ndim != 1:
        raise ValueError(f"lam, t: expected scalars or 1-D arrays, got shapes {lam.shape} and {t.shape}")
    dtype = jnp.result_type(lam1.dtype, t1.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    lam1, t1 = lam1.astype(dtype), t1.astype(dtype)

    num_bits = _num_bits(jnp.where(jnp.isinf(t1), 0.0, t1))
    e, g = _modes_core(lam1, t1, lr, num_bits, momentum=beta, n=int(n))
    if scalar_t:
        e, g = e[0], g[0]
    if scalar_lam:
        e, g = e[..., 0], g[..., 0]
    return e, g


def heavy_ball_decay_curve(lam, steps: int, *, learning_rate: float, momentum: float, n: int) -> jax.Array:
    """``E_β(λ, s)`` for every s = 0 … steps, shape (steps + 1, m), by iterating the recurrence.

    Cheaper than :func:`heavy_ball_modes` on a dense time grid (one 3×3
    product per mode and step; only the (r, ω) block matters for E).
    """
    beta = _check_momentum(momentum)
    lr = _check_learning_rate(learning_rate)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps!r}")
    lam = jnp.atleast_1d(jnp.asarray(lam))
    lam = lam.astype(jnp.result_type(lam.dtype, float))
    c = lr / n

    def step(carry, _):
        r, w = carry
        w = c * r + beta * w
        r = r - lam * w
        return (r, w), r

    init = (jnp.ones_like(lam), jnp.zeros_like(lam))
    _, rs = jax.lax.scan(step, init, None, length=int(steps))
    return jnp.concatenate([init[0][None], rs], axis=0)


def heavy_ball_max_learning_rate(
    k_train_train: jax.Array,
    *,
    momentum: float,
    num_outputs: int | None = None,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
) -> jax.Array:
    """Largest stable heavy-ball step, ``2(1 + β) n / λ_max`` (n = N·K).

    The one-step map of a mode has characteristic polynomial
    ``μ² − (1 − a + β) μ + β``; both roots lie in the unit disc iff
    ``0 < a < 2(1 + β)``. Kernel forms as in :func:`ntkdyn.max_learning_rate`.
    """
    from ntkdyn.dynamics import max_learning_rate

    beta = _check_momentum(momentum)
    base = max_learning_rate(
        k_train_train, num_outputs=num_outputs, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute
    )
    return (1.0 + beta) * base


@functools.partial(jax.jit, static_argnames=("momentum", "traced", "diag_reg_absolute", "rcond"))
def _solve_core(mat, r0, y_train, k_st, fx_test_0, times, lr, diag_reg, num_bits, *, momentum, traced,
                diag_reg_absolute, rcond):
    """Eigendecomposition and the heavy-ball answer at all times (inputs validated, one dtype)."""
    n_train, outputs = r0.shape
    n = n_train * outputs
    cols = r0 if traced else r0.reshape(n, 1)
    spec = spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=rcond)
    lam, vecs, null = spec.eigenvalues, spec.eigenvectors, spec.null
    e, g = _modes_core(lam, times, lr, num_bits, momentum=momentum, n=n)  # (T, m)
    e = jnp.where(null, 1.0, e)
    g = jnp.where(null, 0.0, g)
    coef = vecs.T @ cols  # (m, c)
    alpha = jnp.einsum("im,tm,mc->tic", vecs, g, coef)
    # residual r₀ − V(1 − E)Vᵀr₀: null modes (E = 1) drop out exactly
    residual = cols[None] - jnp.einsum("im,tm,mc->tic", vecs, 1.0 - e, coef)
    n_times = times.shape[0]
    train = y_train[None] + residual.reshape(n_times, n_train, outputs)
    alpha = alpha.reshape(n_times, n_train, outputs)
    test = None
    if k_st is not None:
        n_test = fx_test_0.shape[0]
        if traced:
            shift = jnp.einsum("sj,tjc->tsc", k_st, alpha)
        else:
            shift = jnp.einsum("ij,tj->ti", k_st, alpha.reshape(n_times, n))
        test = fx_test_0[None] - shift.reshape(n_times, n_test, outputs)
    return train, test, alpha, spec


def heavy_ball_solve(
    k_train_train: jax.Array,
    y_train: jax.Array,
    fx_train_0: jax.Array,
    t,
    *,
    k_test_train: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    rcond: float | None = None,
) -> Solution:
    """One eigendecomposition, then train/test outputs and ``α_t`` at all times.

    Arguments as in :func:`heavy_ball_function_space`. Returns the
    :class:`ntkdyn.dynamics.Solution` container (``train`` (T, N, K),
    ``test`` (T, Nt, K) or None, ``alpha`` (T, N, K), ``spectrum``).
    """
    beta = _check_momentum(momentum)
    prob = validate_problem(
        k_train_train, y_train, fx_train_0, t, k_test_train=k_test_train, fx_test_0=fx_test_0,
        learning_rate=learning_rate, diag_reg=diag_reg, rcond=rcond,
    )
    k_tt, y_train, fx_train_0, k_st = prob.k_tt, prob.y_train, prob.fx_train_0, prob.k_st
    fx_test_0, times, lr, traced, dtype, n = prob.fx_test_0, prob.times, prob.lr, prob.traced, prob.dtype, prob.n
    has_test = k_st is not None
    mat = (k_tt if traced else flatten_kernel(k_tt)).astype(dtype)
    num_bits = _num_bits(jnp.where(jnp.isinf(times), 0.0, times))
    train, test, alpha, spec = _solve_core(
        mat, (fx_train_0 - y_train).astype(dtype), y_train.astype(dtype),
        None if not has_test else (k_st if traced else flatten_kernel(k_st)).astype(dtype),
        None if not has_test else fx_test_0.astype(dtype),
        times, lr, diag_reg, num_bits,
        momentum=beta, traced=traced, diag_reg_absolute=diag_reg_absolute, rcond=prob.rcond,
    )
    if is_concrete(spec.eigenvalues) and is_concrete(lr):
        lam_max = float(spec.max_eigenvalue)
        if lam_max > 0 and float(lr) > 2.0 * (1.0 + beta) * n / lam_max:
            warnings.warn(
                f"learning_rate={float(lr):.6g} is above 2(1+β)n/λ_max = {2.0 * (1.0 + beta) * n / lam_max:.6g}: "
                "heavy-ball descent on the linearized model diverges",
                UnstableLearningRateWarning,
                stacklevel=3,
            )
    return Solution(train, test, alpha, spec, n)


def heavy_ball_function_space(
    k_train_train: jax.Array,
    y_train: jax.Array,
    fx_train_0: jax.Array,
    t,
    *,
    k_test_train: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    rcond: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Train and test outputs of the linearized network after t heavy-ball steps.

    ``f_t(X) = Y + V E_β(t) Vᵀ (f₀(X) − Y)``,
    ``f_t(x*) = f₀(x*) − Θ(x*, X) V G_β(t) Vᵀ (f₀(X) − Y)`` with ``Θ + reg·I = V diag(λ) Vᵀ``.

    Args:
      k_train_train: Θ(X, X), full (N, N, K, K) or output-traced (N, N).
      y_train: (N, K); fx_train_0: f₀(X), (N, K).
      t: whole steps, scalar or 1-D (``inf`` allowed).
      k_test_train, fx_test_0: Θ(x*, X) (same form) and f₀(x*) (Nt, K), both or neither.
      learning_rate: η > 0; momentum: β in [0, 1) (β = 0 is plain discrete GD).
      diag_reg, diag_reg_absolute, rcond: as in :func:`ntkdyn.function_space`.

    Returns:
      ``(fx_train_t, fx_test_t)``, (N, K)/(Nt, K), with a leading (T,) for 1-D t.

    Warns:
      UnstableLearningRateWarning: η above ``2(1+β)n/λ_max``.
    """
    _, scalar = _check_times(t)
    sol = heavy_ball_solve(
        k_train_train, y_train, fx_train_0, t,
        k_test_train=k_test_train, fx_test_0=fx_test_0, learning_rate=learning_rate, momentum=momentum,
        diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=rcond,
    )
    return _drop_time_axis(sol.train, scalar), _drop_time_axis(sol.test, scalar)


def heavy_ball_parameter_space(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    t,
    *,
    k_train_train: jax.Array | None = None,
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    rcond: float | None = None,
    ntk_method: str = "auto",
    batch_size: int | None = None,
) -> Any:
    """Weights of the linearized network after t heavy-ball steps.

    ``θ_t = θ₀ − J₀ᵀ V G_β(t) Vᵀ (f₀(X) − Y)``, ``J₀ᵀ·`` as one VJP of
    ``f(·, X)`` at θ₀ vmapped over t. ``f_lin(θ_t, ·)`` equals
    :func:`heavy_ball_function_space` to round-off.

    Returns:
      A pytree like ``params0`` with a leading (T,) axis (none for scalar t).
    """
    def solver(k, fx0):
        return heavy_ball_solve(
            k, y_train, fx0, t, learning_rate=learning_rate, momentum=momentum,
            diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, rcond=rcond,
        )

    return weights_with(solver, apply_fn, params0, x_train, t, k_train_train=k_train_train,
                        ntk_method=ntk_method, batch_size=batch_size)
