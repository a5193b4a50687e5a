"""Solver layers: implicit gradients against autodiff through an unrolled Newton solver and
closed forms; the aligned loss's gradient; the metric closed form against real gradient descent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdyn import dynamics, implicit


def rand(seed, shape):
    """Standard-normal test data from numpy (no per-shape XLA compile of a jax PRNG)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def smooth_cost(x, w, s):
    """½ xᵀ(I + WWᵀ)x + s Σ log cosh x: strictly convex, ∇C onto ℝᵈ, depends on (w, s)."""
    return 0.5 * x @ (x + w @ (w.T @ x)) + s * jnp.sum(jnp.log(jnp.cosh(x)))


def unrolled(cost, p, *args, steps=30):
    """Plain Newton with full steps and no custom gradient: autodiff goes through every iteration."""
    def newton_step(x, _):
        g = jax.grad(cost)(x, *args) - p
        return x - jnp.linalg.solve(jax.hessian(cost)(x, *args), g), None

    return jax.lax.scan(newton_step, jnp.zeros_like(p), None, length=steps)[0]


H = jnp.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.2], [0.0, -0.2, 0.25]])
# layers shared across tests: each compiles its solves once per input shape
SMOOTH = implicit.solver_layer(smooth_cost)
QUADRATIC = implicit.solver_layer(implicit.quadratic_cost(H))


def tanh_plus_identity_cost(x):
    """∇C(x) = x + tanh x."""
    return 0.5 * jnp.sum(x**2) + jnp.sum(jnp.log(jnp.cosh(x)))


TANH_PLUS_IDENTITY = implicit.solver_layer(tanh_plus_identity_cost)


# --------------------------------------------------------------------------- #
# forward solves
# --------------------------------------------------------------------------- #


def test_quadratic_layer_is_the_inverse_map():
    layer = QUADRATIC
    p = rand(0, (4, 3))
    np.testing.assert_allclose(layer(p), jnp.linalg.solve(H, p.T).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.jacobian(layer)(p[0]), jnp.linalg.inv(H), rtol=1e-12, atol=1e-12)


def test_line_search_keeps_a_domain_restricted_cost_in_its_domain():
    # C(x) = Σ x log x − x on x > 0 (NaN outside): ∇C = log x, so q = exp(p) and ∂q/∂p = diag(exp p).
    # Full Newton steps from x = 1 leave the domain for p = 3; the line search must backtrack.
    entropy = lambda x: jnp.sum(x * jnp.log(x) - x)  # noqa: E731
    layer = implicit.solver_layer(entropy, x0=jnp.ones(3))
    p = jnp.array([3.0, -2.0, 0.5])
    np.testing.assert_allclose(layer(p), jnp.exp(p), rtol=1e-12)
    np.testing.assert_allclose(jax.jacobian(layer)(p), jnp.diag(jnp.exp(p)), rtol=1e-10)
    res = implicit.newton_solve(entropy, p, x0=jnp.ones(3))
    assert bool(res.converged) and int(res.iterations) < 20


# --------------------------------------------------------------------------- #
# implicit gradients
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
def test_implicit_gradient_equals_autodiff_through_the_unrolled_solver(linear_solver):
    w = 0.5 * rand(1, (4, 2))
    s = jnp.asarray(1.3)
    p = jnp.array([0.7, -2.0, 3.0, 0.1])
    layer = SMOOTH if linear_solver == "dense" else implicit.solver_layer(smooth_cost, linear_solver="cg")
    np.testing.assert_allclose(layer(p, w, s), unrolled(smooth_cost, p, w, s), rtol=1e-12, atol=1e-12)
    tol = 1e-10 if linear_solver == "dense" else 1e-7  # CG stops at its own residual tolerance
    implicit_jacs = jax.jacobian(layer, argnums=(0, 1, 2))(p, w, s)
    unrolled_jacs = jax.jit(jax.jacobian(lambda *a: unrolled(smooth_cost, *a), argnums=(0, 1, 2)))(p, w, s)
    for implicit_jac, unrolled_jac in zip(implicit_jacs, unrolled_jacs):
        np.testing.assert_allclose(implicit_jac, unrolled_jac, rtol=tol, atol=tol)


def test_jacobian_is_the_inverse_hessian_at_the_solution():
    w = 0.5 * rand(2, (4, 1))
    layer = SMOOTH
    p = jnp.array([1.0, -0.5, 2.0, 0.0])
    q = layer(p, w, 1.0)
    np.testing.assert_allclose(jax.grad(smooth_cost)(q, w, 1.0), p, atol=1e-10)
    np.testing.assert_allclose(jax.jacobian(layer)(p, w, 1.0), implicit.inverse_hessian(smooth_cost, q, w, 1.0),
                               rtol=1e-10)


def test_reverse_mode_works_although_the_solver_is_a_while_loop():
    # JAX cannot reverse-differentiate a while_loop, so a gradient here exists only because the
    # backward pass is the implicit one; it must equal dq/dp = 1/(1 + sech² q) from q + tanh q = p
    cost, layer = tanh_plus_identity_cost, TANH_PLUS_IDENTITY
    p = jnp.array([1.0, -2.0, 0.3])
    q = layer(p)
    np.testing.assert_allclose(q + jnp.tanh(q), p, atol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(layer(v)))(p), 1.0 / (2.0 - jnp.tanh(q) ** 2), rtol=1e-12)
    with pytest.raises(ValueError, match="[Rr]everse-mode"):
        jax.grad(lambda v: jnp.sum(implicit.newton_solve(cost, v).x))(p)


# --------------------------------------------------------------------------- #
# the aligned loss
# --------------------------------------------------------------------------- #


def test_aligned_loss_gradient_is_inverse_hessian_times_residual():
    w = 0.5 * rand(3, (3, 2))
    loss = implicit.aligned_loss(smooth_cost, layer=SMOOTH)
    p = rand(4, (5, 3))
    y = rand(5, (5, 3))
    grad = jax.grad(loss)(p, y, w, 0.7)
    q = SMOOTH(p, w, 0.7)
    inv_h = jax.vmap(lambda qi: implicit.inverse_hessian(smooth_cost, qi, w, 0.7))(q)
    expected = jnp.einsum("iab,ib->ia", inv_h, p - y) / 15
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-13)
    # the Bregman form has the same gradient in p, is ≥ 0 and vanishes at p = y
    breg = implicit.aligned_loss(smooth_cost, bregman=True, layer=SMOOTH)
    np.testing.assert_allclose(jax.grad(breg)(p, y, w, 0.7), grad, rtol=1e-10, atol=1e-13)
    assert float(breg(p, y, w, 0.7)) > 0
    assert abs(float(breg(y, y, w, 0.7))) < 1e-12


def test_aligned_loss_of_a_quadratic_is_the_metric_weighted_mse():
    loss = implicit.aligned_loss(implicit.quadratic_cost(H), bregman=True, layer=QUADRATIC)
    p = rand(6, (4, 3))
    y = rand(7, (4, 3))
    r = p - y
    expected = 0.5 * jnp.einsum("ik,kl,il->", r, jnp.linalg.inv(H), r) / 12
    np.testing.assert_allclose(loss(p, y), expected, rtol=1e-12)
    # with H = I the aligned loss is the MSE of the conventions, gradient (p − y)/n
    mse_like = implicit.aligned_loss(implicit.quadratic_cost(jnp.eye(3)))
    np.testing.assert_allclose(jax.grad(mse_like)(p, y), r / 12, rtol=1e-12)


def test_solver_metric_is_the_layer_jacobian():
    w = 0.5 * rand(8, (2, 2))
    p = rand(9, (3, 2))
    metric = implicit.solver_metric(smooth_cost, p, w, 1.0, layer=SMOOTH)
    jac = jax.jacobian(lambda v: SMOOTH(v.reshape(3, 2), w, 1.0).reshape(-1))(p.reshape(-1))
    np.testing.assert_allclose(metric, jac, rtol=1e-10, atol=1e-13)
    quad = implicit.solver_metric(implicit.quadratic_cost(H), jnp.ones((2, 3)), layer=QUADRATIC)
    np.testing.assert_allclose(quad, jnp.kron(jnp.eye(2), implicit.quadratic_metric(H)), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- #
# linearized dynamics with the metric: exact for a linear model
# --------------------------------------------------------------------------- #


def test_metric_closed_form_matches_gradient_descent_on_a_linear_model():
    n, d, k = 6, 4, 3
    x = rand(10, (n, d))
    y = rand(11, (n, k))
    w0 = 0.3 * rand(12, (d, k))
    apply_fn = lambda w, inputs: inputs @ w  # noqa: E731
    loss = implicit.aligned_loss(implicit.quadratic_cost(H), layer=QUADRATIC)
    eta, steps = 0.7, 25  # below max_learning_rate = 2n/λ_max(H^{-1/2} Θ H^{-1/2}) ≈ 0.77

    step = jax.jit(lambda w: w - eta * jax.grad(lambda v: loss(apply_fn(v, x), y))(w))
    ws = [w0]
    for _ in range(steps):
        ws.append(step(ws[-1]))
    outputs = jnp.stack([apply_fn(w, x) for w in ws])

    kernel = jnp.einsum("ij,kl->ijkl", x @ x.T, jnp.eye(k))  # exact NTK of x ↦ x W
    metric = implicit.quadratic_metric(H)
    times = jnp.arange(steps + 1.0)
    closed, _ = dynamics.function_space(kernel, y, apply_fn(w0, x), times, learning_rate=eta, time="discrete",
                                        metric=metric)
    np.testing.assert_allclose(closed, outputs, rtol=1e-10, atol=1e-11)
    weights = dynamics.parameter_space(apply_fn, w0, x, y, times, k_train_train=kernel, learning_rate=eta,
                                       time="discrete", metric=metric)
    np.testing.assert_allclose(weights, jnp.stack(ws), rtol=1e-10, atol=1e-11)
    # the metric matters: plain MSE dynamics give a different trajectory
    plain, _ = dynamics.function_space(kernel, y, apply_fn(w0, x), times, learning_rate=eta, time="discrete")
    assert float(jnp.max(jnp.abs(plain - outputs))) > 1e-2


def test_flat_cost_directions_are_fitted_first():
    # the error along H's flattest eigendirection (small curvature, H⁻¹ large) decays fastest
    evals, evecs = jnp.linalg.eigh(H)
    x = jnp.eye(4)
    y = jnp.zeros((4, 3))
    f0 = jnp.ones((4, 3)) @ evecs.T  # equal error on every eigendirection of H
    kernel = jnp.einsum("ij,kl->ijkl", x @ x.T, jnp.eye(3))
    ft, _ = dynamics.function_space(kernel, y, f0, 2.0, metric=implicit.quadratic_metric(H))
    remaining = jnp.abs(ft @ evecs)[0]  # per direction, ascending curvature
    np.testing.assert_allclose(remaining, jnp.exp(-2.0 / evals / 12), rtol=1e-10)
    assert remaining[0] < remaining[1] < remaining[2]


# --------------------------------------------------------------------------- #
# failures and bad input
# --------------------------------------------------------------------------- #


def test_non_convergence_raises_a_clear_error():
    saturating = lambda x: jnp.sum(jnp.log(jnp.cosh(x)))  # noqa: E731  ∇C = tanh(x) never reaches |p| ≥ 1
    layer = implicit.solver_layer(saturating)
    np.testing.assert_allclose(layer(jnp.array([0.5, -0.2])), jnp.arctanh(jnp.array([0.5, -0.2])), rtol=1e-10)
    with pytest.raises(implicit.SolverNotConverged, match="did not converge") as info:
        layer(jnp.array([0.5, 1.5]))
    assert "max_iter = 50" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(implicit.SolverNotConverged, match="max_iter = 1"):
        implicit.solver_layer(smooth_cost, max_iter=1)(jnp.array([5.0, -4.0]), jnp.zeros((2, 1)), 3.0)
    # under jit the check runs as a host callback; the runtime error carries the same message
    with pytest.raises(RuntimeError, match="did not converge"):
        jax.block_until_ready(jax.jit(layer)(jnp.array([0.5, 1.5])))
    nan_layer = implicit.solver_layer(saturating, on_failure="nan")
    out = nan_layer(jnp.array([[0.5, 0.2], [0.5, 1.5]]))
    assert bool(jnp.all(jnp.isfinite(out[0]))) and bool(jnp.all(jnp.isnan(out[1])))


def test_bad_input():
    with pytest.raises(TypeError, match="cost"):
        implicit.solver_layer("not a cost")
    with pytest.raises(ValueError, match="linear_solver"):
        implicit.solver_layer(smooth_cost, linear_solver="lu")
    with pytest.raises(ValueError, match="on_failure"):
        implicit.solver_layer(smooth_cost, on_failure="ignore")
    with pytest.raises(ValueError, match="max_iter"):
        implicit.solver_layer(smooth_cost, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        implicit.solver_layer(smooth_cost, tol=-1.0)
    with pytest.raises(ValueError, match="h"):
        implicit.quadratic_cost(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive definite"):
        implicit.quadratic_metric(jnp.array([[1.0, 0.0], [0.0, -1.0]]))
    layer = QUADRATIC
    with pytest.raises(ValueError, match="p:"):
        layer(jnp.asarray(1.0))
    with pytest.raises(ValueError, match="p:"):
        layer(jnp.array([1.0, jnp.nan, 0.0]))
    loss = implicit.aligned_loss(implicit.quadratic_cost(H), layer=QUADRATIC)
    with pytest.raises(ValueError, match="p, y"):
        loss(jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="layer"):
        implicit.aligned_loss(implicit.quadratic_cost(H), layer=QUADRATIC, max_iter=3)
    with pytest.raises(ValueError, match="metric"):
        dynamics.function_space(jnp.ones((2, 2)), jnp.ones((2, 3)), jnp.zeros((2, 3)), 1.0, metric=jnp.ones((2, 2)))


@settings(max_examples=3, deadline=None)
@given(batch=st.tuples(st.integers(1, 3), st.integers(1, 3)), dim=st.integers(1, 4))
def test_batched_shapes(batch, dim):
    p = jnp.linspace(-2.0, 2.0, int(np.prod(batch)) * dim).reshape(*batch, dim)
    q = TANH_PLUS_IDENTITY(p)
    assert q.shape == p.shape
    np.testing.assert_allclose(q + jnp.tanh(q), p, atol=1e-10)
