"""Curvature: matrix-free products against dense jax.hessian / jacrev matrices, Lanczos
against dense eigh and known spectra, and the Gauss-Newton / NTK eigenvalue identity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from ntkdyn import curvature, dynamics, kernels


def rand(seed, shape):
    """Standard-normal test data from numpy (no per-shape XLA compile of a jax PRNG)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def tanh_mlp(params, x):
    (w1, b1), (w2, b2) = params
    h = jnp.tanh(x @ w1 / jnp.sqrt(w1.shape[0]) + b1)
    return h @ w2 / jnp.sqrt(w2.shape[0]) + b2


def make_params(d_in=3, width=6, k=2, seed=0):
    return [
        (rand(seed, (d_in, width)), 0.1 * rand(seed + 1, (width,))),
        (rand(seed + 2, (width, k)), 0.1 * rand(seed + 3, (k,))),
    ]


@jax.jit
def _dense_matrices(flat, x, y):
    """Dense Hessian of the MSE loss and flat Jacobian (N·K, P), one compiled program."""
    unravel = ravel_pytree(make_params())[1]
    loss = curvature.mse_objective(tanh_mlp, x, y)
    hess = jax.hessian(lambda v: loss(unravel(v)))(flat)
    jac = jax.jacrev(lambda v: tanh_mlp(unravel(v), x))(flat)
    return hess, jac.reshape(-1, flat.size)


@pytest.fixture(scope="module")
def problem():
    params = make_params()
    x = rand(1, (5, 3))
    y = rand(2, (5, 2))
    flat, unravel = ravel_pytree(params)
    hess, jac = _dense_matrices(flat, x, y)
    return params, x, y, flat, unravel, hess, jac


def _known_operator(eigenvalues, seed=0):
    dim = len(eigenvalues)
    q, _ = jnp.linalg.qr(rand(seed, (dim, dim)))
    return q @ jnp.diag(jnp.asarray(eigenvalues, float)) @ q.T


# --------------------------------------------------------------------------- #
# products
# --------------------------------------------------------------------------- #


def test_hvp_of_a_quadratic_is_the_matrix():
    a = _known_operator([3.0, 1.0, -2.0, 0.5])
    v = jnp.array([1.0, -1.0, 2.0, 0.3])
    out = curvature.hvp(lambda p: 0.5 * p @ a @ p + jnp.sum(p), jnp.ones(4), v)
    np.testing.assert_allclose(out, a @ v, rtol=1e-13, atol=1e-13)


def test_hvp_and_ggn_products_match_dense_matrices(problem):
    params, x, y, flat, unravel, hess, jac = problem
    v = rand(3, flat.shape)
    loss = curvature.mse_objective(tanh_mlp, x, y)
    np.testing.assert_allclose(ravel_pytree(curvature.hvp(loss, params, unravel(v)))[0], hess @ v, rtol=1e-10, atol=1e-12)
    gn = jac.T @ jac / 10
    np.testing.assert_allclose(
        ravel_pytree(curvature.gauss_newton_vp(tanh_mlp, params, x, unravel(v)))[0], gn @ v, rtol=1e-10, atol=1e-12
    )
    # a custom convex output loss: softmax cross-entropy, H_L = blockdiag(diag(s) − s sᵀ) / N
    labels = jax.nn.one_hot(jnp.array([0, 1, 1, 0, 1]), 2)
    xent = lambda f, t: jnp.mean(optax.softmax_cross_entropy(f, t))  # noqa: E731
    s = jax.nn.softmax(tanh_mlp(params, x))
    h_l = jax.scipy.linalg.block_diag(*[(jnp.diag(si) - jnp.outer(si, si)) / 5 for si in s])
    out = curvature.gauss_newton_vp(tanh_mlp, params, x, unravel(v), y=labels, loss=xent)
    np.testing.assert_allclose(ravel_pytree(out)[0], jac.T @ h_l @ jac @ v, rtol=1e-10, atol=1e-12)
    # for MSE the GGN with the explicit loss equals the default I/n
    mse = lambda f, t: jnp.mean(optax.l2_loss(f, t))  # noqa: E731
    np.testing.assert_allclose(
        ravel_pytree(curvature.gauss_newton_vp(tanh_mlp, params, x, unravel(v), y=y, loss=mse))[0], gn @ v,
        rtol=1e-10, atol=1e-12,
    )


# --------------------------------------------------------------------------- #
# Lanczos
# --------------------------------------------------------------------------- #


def test_lanczos_recovers_a_known_spectrum():
    lam = np.array([9.0, 7.5, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, -1.0, -6.0] + list(np.linspace(-0.5, 0.5, 14)))
    a = _known_operator(lam, seed=1)
    srt = np.sort(lam)
    for which, expected in (("largest", srt[::-1][:3]), ("smallest", srt[:3]),
                            ("magnitude", lam[np.argsort(-np.abs(lam))][:3])):
        res = curvature.lanczos(lambda v: a @ v, 24, k=3, num_iter=24, which=which, seed=2)
        np.testing.assert_allclose(res.eigenvalues, expected, atol=1e-11)
        np.testing.assert_allclose(a @ res.eigenvectors, res.eigenvectors * res.eigenvalues, atol=1e-10)
        np.testing.assert_allclose(res.eigenvectors.T @ res.eigenvectors, np.eye(3), atol=1e-12)


def test_lanczos_residual_bounds_the_error_when_not_converged():
    # a wide spectrum with a well-separated top: 15 Krylov steps of 200 dimensions
    lam = np.concatenate([[100.0, 80.0, 60.0], np.linspace(0.0, 10.0, 197)])
    a = _known_operator(lam, seed=3)
    res = curvature.lanczos(lambda v: a @ v, 200, k=3, num_iter=15, seed=0)
    # Ritz values of a symmetric operator lie within their residual of a true eigenvalue
    err = np.min(np.abs(np.asarray(res.eigenvalues)[:, None] - lam[None]), axis=1)
    assert np.all(err <= np.asarray(res.residuals) + 1e-10)
    np.testing.assert_allclose(res.eigenvalues, [100.0, 80.0, 60.0], rtol=1e-8)
    # the residual is the actual one: ‖A v − λ v‖
    actual = np.linalg.norm(a @ res.eigenvectors - res.eigenvectors * res.eigenvalues, axis=0)
    np.testing.assert_allclose(actual, res.residuals, rtol=1e-4, atol=1e-10)


def test_lanczos_through_an_invariant_subspace():
    # rank-4 operator in 40 dimensions: the Krylov space closes after 5 steps (β = 0),
    # and the restart keeps T exact instead of injecting round-off directions
    u = rand(0, (40, 4))
    a = u @ u.T
    res = curvature.lanczos(lambda v: a @ v, 40, k=6, num_iter=20, seed=1)
    expected = np.sort(np.linalg.eigvalsh(np.asarray(a)))[::-1][:6]
    np.testing.assert_allclose(res.eigenvalues, expected, atol=1e-10)
    np.testing.assert_allclose(res.eigenvectors.T @ res.eigenvectors, np.eye(6), atol=1e-10)


def test_hessian_eigenvalues_match_dense_eigh(problem):
    params, x, y, flat, _, hess, _ = problem
    dense = np.sort(np.linalg.eigvalsh(np.asarray(hess)))
    res = curvature.hessian_eigenvalues(curvature.mse_objective(tanh_mlp, x, y), params, k=3, num_iter=flat.size)
    np.testing.assert_allclose(res.eigenvalues, dense[::-1][:3], rtol=1e-9, atol=1e-12)
    low = curvature.hessian_eigenvalues(curvature.mse_objective(tanh_mlp, x, y), params, k=2, which="smallest",
                                        num_iter=flat.size)
    np.testing.assert_allclose(low.eigenvalues, dense[:2], rtol=1e-9, atol=1e-12)


@settings(max_examples=4, deadline=None)
@given(dim=st.integers(2, 12), seed=st.integers(0, 1000))
def test_lanczos_full_krylov_is_exact_on_random_symmetric_matrices(dim, seed):
    m = np.random.default_rng(seed).normal(size=(dim, dim))
    a = jnp.asarray(m + m.T)
    k = min(2, dim)
    res = curvature.lanczos(lambda v: a @ v, dim, k=k, num_iter=dim, seed=seed)
    np.testing.assert_allclose(res.eigenvalues, np.sort(np.linalg.eigvalsh(m + m.T))[::-1][:k],
                               atol=1e-10 * np.abs(m).max() * dim)


# --------------------------------------------------------------------------- #
# the Gauss-Newton / NTK identity
# --------------------------------------------------------------------------- #


def test_gauss_newton_spectrum_equals_ntk_spectrum_over_n(problem):
    params, x, _, flat, _, _, jac = problem
    kernel = kernels.empirical_ntk(tanh_mlp, params, x, method="jacobian")
    from_ntk = curvature.gauss_newton_eigenvalues_from_ntk(kernel)
    dense_gn = np.sort(np.linalg.eigvalsh(np.asarray(jac.T @ jac / 10)))[::-1]
    assert flat.size > 10  # P > n: G has P − n extra zeros
    np.testing.assert_allclose(from_ntk, dense_gn[:10], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense_gn[10:], 0.0, atol=1e-12)
    lz = curvature.gauss_newton_eigenvalues(tanh_mlp, params, x, k=4)  # default num_iter = n + 1
    np.testing.assert_allclose(lz.eigenvalues, from_ntk[:4], rtol=1e-9)


def test_max_learning_rate_from_either_side(problem):
    params, x, y, *_ = problem
    kernel = kernels.empirical_ntk(tanh_mlp, params, x, method="jacobian")
    from_kernel = dynamics.max_learning_rate(kernel)
    from_curvature = curvature.max_stable_step(tanh_mlp, params, x)
    np.testing.assert_allclose(from_curvature, from_kernel, rtol=1e-9)
    hess_side = curvature.max_stable_step(tanh_mlp, params, x, y, matrix="hessian", num_iter=62)
    lam = np.linalg.eigvalsh(np.asarray(problem[5])).max()
    np.testing.assert_allclose(hess_side, 2.0 / lam, rtol=1e-9)


def test_max_learning_rate_is_the_gd_stability_edge_of_a_linear_model():
    x = rand(0, (6, 4))
    y = rand(1, (6, 2))
    linear = lambda w, inputs: inputs @ w  # noqa: E731
    w0 = jnp.zeros((4, 2))
    eta = float(curvature.max_stable_step(linear, w0, x))
    np.testing.assert_allclose(eta, float(curvature.max_stable_step(linear, w0, x, y, matrix="hessian")), rtol=1e-10)
    grad = jax.jit(jax.grad(curvature.mse_objective(linear, x, y)))

    def distance_after(lr, steps=400):
        w = w0
        for _ in range(steps):
            w = w - lr * grad(w)
        return float(jnp.linalg.norm(w - jnp.linalg.lstsq(x, y)[0]))

    assert distance_after(0.98 * eta) < 1e-2
    assert distance_after(1.02 * eta) > 1e2


# --------------------------------------------------------------------------- #
# tracking along a training run
# --------------------------------------------------------------------------- #


def _dense_top(params, x, y, k):
    flat, unravel = ravel_pytree(params)
    h, j = _dense_matrices(flat, x, y)
    g = j.T @ j / j.shape[0]
    return np.sort(np.linalg.eigvalsh(np.asarray(h)))[::-1][:k], np.sort(np.linalg.eigvalsh(np.asarray(g)))[::-1][:k]


def test_spectrum_recorder_on_snapshots(problem):
    params, x, y, flat, unravel, *_ = problem
    record = curvature.spectrum_recorder(tanh_mlp, x, y, k=2, num_iter=flat.size)
    record_jit = jax.jit(record)
    snapshots = [unravel(flat + 0.3 * s * rand(s, flat.shape)) for s in range(3)]
    for snap in snapshots:
        out = record_jit(snap)
        h, g = _dense_top(snap, x, y, 2)
        np.testing.assert_allclose(out["hessian"], h, rtol=1e-9)
        np.testing.assert_allclose(out["gauss_newton"], g, rtol=1e-9)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *snapshots)
    mapped = jax.jit(jax.vmap(record))(stacked)
    assert mapped["hessian"].shape == (3, 2)
    np.testing.assert_allclose(mapped["gauss_newton"][2], record_jit(snapshots[2])["gauss_newton"], rtol=1e-10)


def test_spectrum_recorder_inside_train(problem):
    from ntkdyn.experiments import train as train_mod
    params, x, y, flat, *_ = problem
    record = curvature.spectrum_recorder(tanh_mlp, x, y, k=1, num_iter=flat.size, matrices=("hessian",))
    result = train_mod.train(tanh_mlp, params, x, y, steps=30, learning_rate=2.0, record_at=[0, 10, 30],
                             keep_params=True, record_fn=record)
    assert result.records["hessian"].shape == (3, 1)
    for r in range(3):
        snap = jax.tree_util.tree_map(lambda a: a[r], result.params)
        h, _ = _dense_top(snap, x, y, 1)
        np.testing.assert_allclose(result.records["hessian"][r], h, rtol=1e-9)
    assert not np.allclose(result.records["hessian"][0], result.records["hessian"][2])


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #


def test_bad_input(problem):
    params, x, y, *_ = problem
    eye = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="k:"):
        curvature.lanczos(eye, 4, k=5)
    with pytest.raises(ValueError, match="k:"):
        curvature.lanczos(eye, 4, k=0)
    with pytest.raises(ValueError, match="num_iter"):
        curvature.lanczos(eye, 10, k=3, num_iter=2)
    with pytest.raises(ValueError, match="which"):
        curvature.lanczos(eye, 4, which="top")
    with pytest.raises(ValueError, match="dim"):
        curvature.lanczos(eye, 0)
    with pytest.raises(TypeError, match="matvec"):
        curvature.lanczos("A", 4)
    with pytest.raises(ValueError, match="matrix"):
        curvature.max_stable_step(tanh_mlp, params, x, matrix="fisher")
    with pytest.raises(ValueError, match="y:"):
        curvature.max_stable_step(tanh_mlp, params, x, matrix="hessian")
    with pytest.raises(ValueError, match="y:"):
        curvature.gauss_newton_vp(tanh_mlp, params, x, params, loss=lambda f, t: jnp.sum(f))
    with pytest.raises(ValueError, match="k_train_train"):
        curvature.gauss_newton_eigenvalues_from_ntk(jnp.eye(5))
    with pytest.raises(ValueError, match="matrices"):
        curvature.spectrum_recorder(tanh_mlp, x, y, matrices=("fisher",))
    with pytest.raises(ValueError, match="y_train"):
        curvature.spectrum_recorder(tanh_mlp, x, y[:3])
    with pytest.raises(ValueError, match="num_iter"):
        curvature.spectrum_recorder(tanh_mlp, x, y, k=3, num_iter=2)


def test_gauss_newton_spectrum_of_an_indefinite_or_asymmetric_kernel_is_refused():
    """It used to return the negative eigenvalue as if it were part of a Gauss-Newton spectrum."""
    j = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)))
    kern = (j @ j.T).reshape(4, 4, 1, 1)
    good = curvature.gauss_newton_eigenvalues_from_ntk(kern)
    np.testing.assert_allclose(jax.jit(curvature.gauss_newton_eigenvalues_from_ntk)(kern), good, rtol=1e-10)
    top = float(good[0]) * 4
    indefinite = kern - 1.5 * top * (jnp.ones((4, 4)) / 4).reshape(4, 4, 1, 1)
    asymmetric = kern + 0.3 * top * jnp.triu(jnp.ones((4, 4)), 1).reshape(4, 4, 1, 1)
    with pytest.raises(ValueError, match="^k_train_train: .*positive semi-definite"):
        curvature.gauss_newton_eigenvalues_from_ntk(indefinite)
    with pytest.raises(ValueError, match="^k_train_train: .*symmetric"):
        curvature.gauss_newton_eigenvalues_from_ntk(asymmetric)
    with pytest.raises(ValueError, match="^k_train_train: .*finite"):
        curvature.gauss_newton_eigenvalues_from_ntk(kern.at[0, 0, 0, 0].set(jnp.nan))
    for bad in (indefinite, asymmetric):
        assert bool(jnp.all(jnp.isnan(jax.jit(curvature.gauss_newton_eigenvalues_from_ntk)(bad))))
