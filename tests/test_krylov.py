"""Matrix-free Krylov dynamics against the exact eigendecomposition path.

Oracles: for an explicit symmetric PSD matrix the exact path is
``spectral.spectrum`` + ``spectral.modes`` (one eigendecomposition); for the
NTK the exact path is ``ntkdyn.predict(..., solver="eigh")``. The Krylov
answers must agree within the requested tolerance, and the reported error
estimate must never sit more than 10x below the true error.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkdyn import krylov, spectral

TIMES = np.array([0.0, 1.0, 10.0, 100.0, 1.0e4, np.inf])


def _psd(m, decay, seed=0, floor=0.0):
    """(m, m) float64 PSD matrix with eigenvalues ``m/2 · (i+1)^-decay`` (+ floor·λ_max) in a random basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(m, m)))
    lam = 0.5 * m * (np.arange(m) + 1.0) ** -decay
    lam = lam + floor * lam[0]
    return (basis * lam) @ basis.T


def _exact(a, r0, times, *, n, time="continuous", momentum=0.0, reg=0.0, rcond=None):
    """(E(t) r₀, α_t) from one float64 eigendecomposition with the exact path's cut-off semantics."""
    a = np.asarray(a, np.float64)
    spec = spectral.spectrum(jnp.asarray(a + reg * np.eye(a.shape[0])), rcond=rcond)
    lam, vecs, null = (np.asarray(v) for v in (spec.eigenvalues, spec.eigenvectors, spec.null))
    fitted, gain = spectral.modes(jnp.asarray(lam), jnp.asarray(times, jnp.float64), learning_rate=1.0, n=n,
                                  time=time, momentum=momentum)
    fitted = np.where(null, 0.0, np.asarray(fitted))
    gain = np.where(null, 0.0, np.asarray(gain))
    coef = vecs.T @ np.asarray(r0, np.float64)  # (m, c)
    residual = np.asarray(r0, np.float64)[None] - np.einsum("im,tm,mc->tic", vecs, fitted, coef)
    alpha = np.einsum("im,tm,mc->tic", vecs, gain, coef)
    return residual, alpha


def _matrix_dynamics(a, r0, times, reg, **static):
    return krylov.lanczos_dynamics(lambda v: a @ v, r0, times, reg=reg, **static)


_run = jax.jit(_matrix_dynamics, static_argnames=("n", "time", "momentum", "max_iter", "check_every"))


def _solve(a, r0, times, reg=0.0, **static):
    """One compiled program per (shapes, static options), shared by the tests."""
    dtype = np.asarray(r0).dtype
    return _run(jnp.asarray(a, dtype), jnp.asarray(r0, dtype), jnp.asarray(times, dtype), jnp.asarray(reg, dtype),
                **static)


def _errors(sol, residual, alpha, r0):
    """True relative errors per time, measured as the estimate is (outputs vs ‖r₀‖, α vs ‖α‖)."""
    res = np.asarray(sol.residual, np.float64)
    alp = np.asarray(sol.alpha, np.float64)
    axes = tuple(range(1, res.ndim))
    e_out = np.sqrt(np.sum((res - residual) ** 2, axis=axes)) / np.linalg.norm(r0)
    norm_alpha = np.sqrt(np.sum(alpha**2, axis=axes))
    e_alpha = np.sqrt(np.sum((alp - alpha) ** 2, axis=axes)) / np.where(norm_alpha > 0, norm_alpha, 1.0)
    return np.maximum(e_out, e_alpha)


def _check(sol, residual, alpha, r0, tol):
    true = _errors(sol, residual, alpha, r0)
    est = np.asarray(sol.info.error_estimate, np.float64)
    assert bool(sol.info.converged)
    assert np.all(true <= tol), (true, tol)
    # the estimate may overestimate, but never sits more than 10x below the true error
    assert np.all(est * 10.0 >= true), (est, true)
    assert np.all(np.isfinite(np.asarray(sol.alpha)))


@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_float64_matches_eigh_at_every_time(time):
    m = 160
    a = _psd(m, 1.5)
    r0 = np.random.default_rng(1).normal(size=(m, 1))
    sol = _solve(a, r0, TIMES, n=m, time=time)
    residual, alpha = _exact(a, r0, TIMES, n=m, time=time)
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64))
    assert int(sol.info.iterations) < m  # converged well before spanning the space


def test_float32_matches_float64_reference_within_tol():
    # a spectrum that stays far above the float32 cut-off, so both paths keep every mode
    m = 160
    a = _psd(m, 1.0, floor=1e-3)
    r0 = np.random.default_rng(2).normal(size=(m, 1))
    sol = _solve(a.astype(np.float32), r0.astype(np.float32), TIMES.astype(np.float32), n=m)
    assert sol.residual.dtype == jnp.float32
    residual, alpha = _exact(a.astype(np.float32), r0.astype(np.float32), TIMES, n=m,
                             rcond=spectral.default_rcond(m, jnp.float32))
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float32))


def test_columns_are_independent_processes_and_reg_is_added():
    m = 120
    a = _psd(m, 2.0, seed=3)
    r0 = np.random.default_rng(3).normal(size=(m, 3))
    reg = 0.01 * np.trace(a) / m
    sol = _solve(a, r0, TIMES, n=3 * m, reg=reg)
    residual, alpha = _exact(a, r0, TIMES, n=3 * m, reg=reg)
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64))
    one = _solve(a, r0[:, 1:2], TIMES, n=3 * m, reg=reg)
    np.testing.assert_allclose(np.asarray(sol.residual)[..., 1], np.asarray(one.residual)[..., 0], atol=1e-9)


def test_heavy_ball_momentum_matches_its_modes():
    m = 120
    a = _psd(m, 1.5, seed=4)
    r0 = np.random.default_rng(4).normal(size=(m, 1))
    times = np.array([0.0, 1.0, 7.0, 100.0, 1000.0])
    sol = _solve(a, r0, times, n=m, time="discrete", momentum=0.9)
    residual, alpha = _exact(a, r0, times, n=m, time="discrete", momentum=0.9)
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_singular_kernel_at_infinity_is_the_minimum_norm_least_squares_answer(dtype):
    # NTK of a linear model on duplicated inputs with conflicting targets: rank 6 of 90
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(30, 6))
    x = np.concatenate([feats, feats, feats])
    a = x @ x.T
    r0 = rng.normal(size=(90, 1))  # duplicates get different residuals: not in the range of Θ
    sol = _solve(a.astype(dtype), r0.astype(dtype), np.array([np.inf], dtype), n=90)
    pinv = np.linalg.pinv(a, rcond=1e-10)
    alpha = np.asarray(sol.alpha, np.float64)[0]
    residual = np.asarray(sol.residual, np.float64)[0]
    tol = 10 * krylov.default_tol(dtype)
    assert np.all(np.isfinite(alpha)) and bool(sol.info.converged)
    # α_∞ = Θ⁺ r₀ (minimum norm: it lies in the range of Θ) and E(∞) r₀ is r₀'s null-space part
    np.testing.assert_allclose(alpha, pinv @ r0, atol=tol * np.linalg.norm(pinv @ r0))
    np.testing.assert_allclose(residual, r0 - a @ pinv @ r0, atol=tol * np.linalg.norm(r0))
    assert int(sol.info.iterations) <= 8  # six modes plus the null direction, then the space is invariant


def test_zero_residual_gives_zero_without_iterating():
    a = _psd(40, 1.0)
    sol = _solve(a, np.zeros((40, 1)), TIMES, n=40)
    assert int(sol.info.iterations) == 0 and bool(sol.info.converged)
    assert np.all(np.asarray(sol.alpha) == 0) and np.all(np.asarray(sol.residual) == 0)


def test_non_convergence_is_reported_and_warned():
    m = 200
    a = _psd(m, 1.0, seed=6)
    r0 = np.random.default_rng(6).normal(size=(m, 1))
    sol = _solve(a, r0, np.array([10.0, 1.0e4]), n=m, max_iter=6, check_every=3)
    assert not bool(sol.info.converged)
    assert int(sol.info.iterations) == 6
    residual, alpha = _exact(a, r0, np.array([10.0, 1.0e4]), n=m)
    true = _errors(sol, residual, alpha, r0)
    est = np.asarray(sol.info.error_estimate)
    assert np.all(est * 10 >= true) and est.max() > sol.info.tol
    with pytest.warns(krylov.KrylovConvergenceWarning, match=r"estimated relative error is \d"):
        krylov.warn_if_not_converged(sol.info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        krylov.warn_if_not_converged(_solve(a, r0, np.array([1.0]), n=m).info)
