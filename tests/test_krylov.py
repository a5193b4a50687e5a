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


def _errors(sol, residual, alpha, r0, a):
    """True relative errors per time, measured as the estimate is: outputs vs ‖r₀‖, α in the weights
    norm ``‖v‖_Θ = √(vᵀ Θ v) = ‖Jᵀ v‖``."""
    res = np.asarray(sol.residual, np.float64)
    alp = np.asarray(sol.alpha, np.float64)
    e_out = np.sqrt(np.sum((res - residual) ** 2, axis=(1, 2))) / np.linalg.norm(r0)
    theta_norm = lambda v: np.sqrt(np.maximum(np.einsum("tic,ij,tjc->t", v, a, v), 0.0))  # noqa: E731
    size = theta_norm(alpha)
    e_alpha = theta_norm(alp - alpha) / np.where(size > 0, size, 1.0)
    return np.maximum(e_out, e_alpha)


def _check(sol, residual, alpha, r0, tol, a):
    true = _errors(sol, residual, alpha, r0, np.asarray(a, np.float64))
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
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64), a)
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
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float32), a)


def test_columns_are_independent_processes_and_reg_is_added():
    m = 120
    a = _psd(m, 2.0, seed=3)
    r0 = np.random.default_rng(3).normal(size=(m, 3))
    reg = 0.01 * np.trace(a) / m
    sol = _solve(a, r0, TIMES, n=3 * m, reg=reg)
    residual, alpha = _exact(a, r0, TIMES, n=3 * m, reg=reg)
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64), a)
    one = _solve(a, r0[:, 1:2], TIMES, n=3 * m, reg=reg)
    np.testing.assert_allclose(np.asarray(sol.residual)[..., 1], np.asarray(one.residual)[..., 0], atol=1e-9)


def test_heavy_ball_momentum_matches_its_modes():
    m = 120
    a = _psd(m, 1.5, seed=4)
    r0 = np.random.default_rng(4).normal(size=(m, 1))
    times = np.array([0.0, 1.0, 7.0, 100.0, 1000.0])
    sol = _solve(a, r0, times, n=m, time="discrete", momentum=0.9)
    residual, alpha = _exact(a, r0, times, n=m, time="discrete", momentum=0.9)
    _check(sol, residual, alpha, r0, krylov.default_tol(jnp.float64), a)


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
    true = _errors(sol, residual, alpha, r0, a)
    est = np.asarray(sol.info.error_estimate)
    assert np.all(est * 10 >= true) and est.max() > sol.info.tol
    with pytest.warns(krylov.KrylovConvergenceWarning, match=r"estimated relative error is \d"):
        krylov.warn_if_not_converged(sol.info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        krylov.warn_if_not_converged(_solve(a, r0, np.array([1.0]), n=m).info)


# --------------------------------------------------------------------------- #
# ntkdyn.predict(solver="krylov") against solver="eigh"
# --------------------------------------------------------------------------- #

import ntkdyn  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from ntkdyn import models  # noqa: E402

PRED_TIMES = np.array([0.0, 1.0, 10.0, 100.0, 1.0e4])


def _net(outputs, dtype, seed=0):
    return models.mlp(3, outputs, width=24, depth=2, dtype=dtype, seed=seed)


def _data(n, outputs, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(dtype)
    return x, np.sin(2 * x[:, :outputs]).astype(dtype), rng.normal(size=(7, 3)).astype(dtype)


def _weight_moves(pred):
    """(T, P) flattened θ_t − θ₀."""
    flat = [ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], pred.params))[0] for i in range(len(pred.t))]
    return np.stack([np.asarray(f, np.float64) for f in flat])


def _relative(a, b, axis=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(1, b.ndim))
    return np.sqrt(np.sum((a - b) ** 2, axis=axes)) / np.sqrt(np.sum(b**2, axis=axes)).max()


def _compare(kry, eig, tol, weights=False):
    """Train/test outputs (relative to the largest output) and weight moves; the estimate covers them."""
    errors = [_relative(kry.fx_train - kry.fx_train_0, eig.fx_train - eig.fx_train_0)]
    if eig.fx_test is not None:
        errors.append(_relative(kry.fx_test - kry.fx_test_0, eig.fx_test - eig.fx_test_0))
    if weights:
        w0 = ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], eig.params))[0]
        moves_k, moves_e = _weight_moves(kry) - np.asarray(w0), _weight_moves(eig) - np.asarray(w0)
        errors.append(_relative(moves_k, moves_e))
    true = np.max(errors, axis=0)
    est = np.asarray(kry.error_estimate, np.float64)
    assert kry.solver == "krylov" and eig.solver == "eigh"
    assert kry.ntk_train_train is None and kry.spectrum is None and eig.iterations is None
    assert np.all(true <= tol), (true, tol)
    assert np.all(10 * est >= true), (est, true)
    return true


def test_predict_krylov_full_kernel_two_outputs_diag_reg_weights():
    f, p = _net(2, np.float64)
    x, y, xt = _data(40, 2, np.float64)
    kw = dict(apply_fn=f, x_test=xt, weights=True, diag_reg=0.05, learning_rate=0.5)
    eig = ntkdyn.predict(p, x, y, PRED_TIMES, solver="eigh", **kw)
    kry = ntkdyn.predict(p, x, y, PRED_TIMES, solver="krylov", **kw)
    _compare(kry, eig, 1e-7, weights=True)
    assert int(kry.iterations) < 80 and kry.error_estimate.shape == (len(PRED_TIMES),)


@pytest.mark.parametrize("kw", [dict(trace_outputs=True, time="discrete", learning_rate=0.7),
                                dict(time="discrete", momentum=0.9)], ids=["traced-discrete", "heavy-ball"])
def test_predict_krylov_traced_kernel_and_momentum(kw):
    f, p = _net(2, np.float64, seed=1)
    x, y, xt = _data(40, 2, np.float64, seed=1)
    times = np.array([0.0, 1.0, 10.0, 100.0, 1000.0])
    eig = ntkdyn.predict(p, x, y, times, apply_fn=f, x_test=xt, solver="eigh", **kw)
    kry = ntkdyn.predict(p, x, y, times, apply_fn=f, x_test=xt, solver="krylov", **kw)
    _compare(kry, eig, 1e-7)


def test_predict_krylov_float32_within_its_tolerance():
    f, p = _net(1, np.float32, seed=2)
    x, y, xt = _data(60, 1, np.float32, seed=2)
    kw = dict(apply_fn=f, x_test=xt, weights=True)
    eig = ntkdyn.predict(p, x, y, PRED_TIMES.astype(np.float32), solver="eigh", **kw)
    kry = ntkdyn.predict(p, x, y, PRED_TIMES.astype(np.float32), solver="krylov", **kw)
    assert kry.fx_train.dtype == jnp.float32
    _compare(kry, eig, krylov.default_tol(jnp.float32), weights=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_predict_krylov_at_infinity_on_a_singular_kernel(dtype):
    # every input twice, with conflicting targets: Θ is singular and r₀ is not in its range
    f, p = _net(1, dtype, seed=3)
    x, y, xt = _data(15, 1, dtype, seed=3)
    x, y = np.concatenate([x, x]), np.concatenate([y, -y])
    times = np.array([10.0, np.inf], dtype)
    eig = ntkdyn.predict(p, x, y, times, apply_fn=f, x_test=xt, weights=True, solver="eigh")
    kry = ntkdyn.predict(p, x, y, times, apply_fn=f, x_test=xt, weights=True, solver="krylov")
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(kry.params))
    _compare(kry, eig, 10 * krylov.default_tol(dtype), weights=True)
    # at t = ∞ each duplicated pair is fitted to its mean target (the least-squares answer)
    pair_mean = 0.5 * (kry.fx_train[-1, :15] + kry.fx_train[-1, 15:])
    np.testing.assert_allclose(pair_mean, 0.0, atol=10 * krylov.default_tol(dtype))


def test_predict_krylov_warns_when_not_converged():
    f, p = _net(1, np.float64, seed=4)
    x, y, _ = _data(40, 1, np.float64, seed=4)
    with pytest.warns(krylov.KrylovConvergenceWarning, match=r"after 2 iterations .* estimated relative error"):
        kry = ntkdyn.predict(p, x, y, PRED_TIMES, apply_fn=f, solver="krylov", max_iter=2)
    assert int(kry.iterations) == 2 and np.max(kry.error_estimate) > kry.krylov_info.tol


def test_predict_krylov_overflow_names_params():
    """Finite float32 parameters whose outputs' norm overflows: NaN predictions came back without an error."""
    def net(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": jnp.full((3, 4), 0.1, jnp.float32), "w2": jnp.full((4, 2), 1e20, jnp.float32)}
    x, y, _ = _data(6, 2, np.float32)
    with pytest.raises(ValueError, match="^params: expected parameters whose outputs and NTK on x stay finite"):
        ntkdyn.predict(params, x, y, 1.0, apply_fn=net, solver="krylov")


def test_solver_auto_picks_by_size():
    assert ntkdyn.prediction.choose_solver(500, 2, memory=2**34) == "eigh"
    assert ntkdyn.prediction.choose_solver(5000, 10, memory=2**34) == "krylov"
    assert ntkdyn.prediction.choose_solver(5000, 10, trace_outputs=True, memory=2**34) == "eigh"
    assert ntkdyn.prediction.choose_solver(5000, 1, memory=2**28) == "krylov"  # 3·m² doubles do not fit
    f, p = _net(1, np.float64)
    x, y, _ = _data(10, 1, np.float64)
    assert ntkdyn.predict(p, x, y, 1.0, apply_fn=f).solver == "eigh"


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(solver="lanczos"), "solver"),
        (dict(solver="krylov", tol=0.0), "tol"),
        (dict(solver="krylov", tol=-1e-3), "tol"),
        (dict(solver="krylov", tol=2.0), "tol"),
        (dict(solver="krylov", max_iter=0), "max_iter"),
        (dict(solver="eigh", tol=1e-6), "tol"),
        (dict(solver="eigh", max_iter=10), "max_iter"),
        (dict(solver="krylov", ntk_method="jacobian"), "ntk_method"),
        (dict(solver="krylov", momentum=0.5), "time"),
        (dict(solver="krylov", learning_rate=-1.0), "learning_rate"),
        (dict(solver="krylov", diag_reg=-1.0), "diag_reg"),
        (dict(solver="krylov", tile_size=0), "tile_size"),
        (dict(solver="krylov", precision="fast"), "precision"),
    ],
)
def test_predict_krylov_bad_input(kw, name):
    f, p = _net(1, np.float64)
    x, y, _ = _data(10, 1, np.float64)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, **kw)


def test_predict_krylov_bad_mesh_and_max_iter_type():
    f, p = _net(1, np.float64)
    x, y, _ = _data(10, 1, np.float64)
    with pytest.raises(TypeError, match="^mesh:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, solver="krylov", mesh="all")
    with pytest.raises(TypeError, match="^max_iter:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, solver="krylov", max_iter=2.5)


def test_krylov_program_runs_every_matmul_at_full_precision():
    from tests.test_kernels_precision import assert_full_precision

    f, p = _net(2, np.float32)
    x, y, xt = _data(12, 2, np.float32)
    for kw in (dict(), dict(trace_outputs=True, diag_reg=0.1)):
        program, args, static = krylov.prediction_program(
            models.as_model(f), p, jnp.asarray(x), jnp.asarray(y), jnp.asarray([1.0, 10.0], jnp.float32),
            x_test=jnp.asarray(xt), weights=True, **kw,
        )
        assert static["precision"] == "highest"
        assert_full_precision(program.lower(*args, **static).as_text())


def test_an_exactly_singular_kernel_at_infinite_time_converges_long_before_its_rank():
    """Duplicate inputs / P < N give exact zeros: the null part of r0 must not hold the t = inf solve open.

    A stricter t = inf estimate (reverted) counted the null Ritz pair as undecided until its residual fell to
    the cut-off, so this solve ran to max_iter with a KrylovConvergenceWarning although it had converged.
    """
    rng = np.random.default_rng(1)
    m, rank = 120, 100
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    lam = np.r_[np.zeros(m - rank), np.linspace(1.0, 10.0, rank)]
    a = jnp.asarray((q * lam) @ q.T, dtype=jnp.float64)
    r0 = jnp.asarray(rng.standard_normal((m, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", krylov.KrylovConvergenceWarning)
        sol = krylov.lanczos_dynamics(lambda v: a @ v, r0, jnp.inf, n=m, max_iter=rank)
    keep = lam > 0
    coef = q.T @ np.asarray(r0)
    exact = q[:, keep] @ (coef[keep] / lam[keep, None])
    assert bool(sol.info.converged) and int(sol.info.iterations) <= rank // 2
    np.testing.assert_allclose(np.asarray(sol.alpha)[0], exact, rtol=0, atol=1e-8 * np.abs(exact).max())
