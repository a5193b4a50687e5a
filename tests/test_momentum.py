"""Closed-form heavy-ball dynamics (``momentum=β`` of the one solver) against exact oracles, float64.

1. per mode: β = 0 reduces to the gradient-descent spectral functions; any β
   matches the recurrence iterated step by step;
2. a linear model (linearization exact) against real optax.sgd(momentum) training,
   outputs and weights, full-rank and rank-deficient kernels;
3. ``f_lin(θ_t)`` at the closed-form weights equals the function-space answer;
4. t = ∞ against the pseudo-inverse; the stability limit 2(1+β)n/λ_max; bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkdyn
from ntkdyn import spectral
from ntkdyn.kernels import flatten_kernel


def heavy_ball_modes(lam, t, **kw):
    """(E_β, G_β) from the solver's per-mode functions."""
    fitted, g = spectral.modes(lam, t, time="discrete", **kw)
    return 1.0 - fitted, g


def heavy_ball_function_space(*args, **kw):
    return ntkdyn.function_space(*args, time="discrete", **kw)


def heavy_ball_parameter_space(*args, **kw):
    return ntkdyn.parameter_space(*args, time="discrete", **kw)


def optax_sgd_run(apply_fn, params, x, y, x_test, *, lr, beta, steps, record):
    """Oracle: optax.sgd(lr, momentum=beta) on L = mean(l2_loss(f, Y)), full batch, step by step."""
    opt = optax.sgd(lr, momentum=beta)
    state = opt.init(params)
    loss = jax.jit(jax.grad(lambda p: jnp.mean(optax.l2_loss(apply_fn(p, x), y))))
    out = {"fx": [], "fxt": [], "params": []}
    for s in range(steps + 1):
        if s in record:
            out["fx"].append(apply_fn(params, x))
            out["fxt"].append(apply_fn(params, x_test))
            out["params"].append(params)
        updates, state = opt.update(loss(params), state, params)
        params = optax.apply_updates(params, updates)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *out["params"])
    return jnp.stack(out["fx"]), jnp.stack(out["fxt"]), stacked


def linear_apply(params, x):
    return x @ params["W"] + params["b"]


def linear_problem(n=7, d=3, k=2, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    params = {"W": rng.standard_normal((d, k)), "b": 0.3 * rng.standard_normal(k)}
    return params, rng.standard_normal((n, d)), rng.standard_normal((n, k)), rng.standard_normal((n_test, d))


def iterate_modes(lam, t_max, lr, beta, n):
    """Oracle: v ← βv + λ r/n; r ← r − ηλ v… written on (r, u) with α accumulated, one step at a time."""
    r, u, alpha = np.ones_like(lam), np.zeros_like(lam), np.zeros_like(lam)
    out = [(r.copy(), alpha.copy())]
    for _ in range(t_max):
        u = beta * u + r / n  # function-space velocity per unit λ: v = Jᵀ u
        r = r - lr * lam * u
        alpha = alpha + lr * u
        out.append((r.copy(), alpha.copy()))
    return out


def test_zero_momentum_is_gradient_descent():
    lam = jnp.array([0.0, 1e-14, 1e-6, 0.3, 1.0, 4.0])
    t = jnp.array([0.0, 1.0, 7.0, 100.0, 1e7, 1e26, jnp.inf])
    kw = dict(learning_rate=0.7, n=3)
    # β → 0 runs the heavy-ball recurrence itself (β = 0 would route to the GD functions)
    e, g = heavy_ball_modes(lam, t, momentum=1e-300, **kw)
    e_gd = spectral.decay(lam, t[:, None], time="discrete", **kw)
    g_gd = spectral.gain(lam, t[:, None], time="discrete", **kw)
    np.testing.assert_allclose(e, e_gd, rtol=1e-12, atol=1e-15)
    # λ = 0 at t = ∞: both infinite (null modes are zeroed by the solvers)
    finite = np.isfinite(np.asarray(g_gd))
    np.testing.assert_allclose(np.asarray(g)[finite], np.asarray(g_gd)[finite], rtol=1e-12)
    assert np.all(np.isinf(np.asarray(g)[~finite]))


@pytest.mark.parametrize("beta", [0.3, 0.9, 0.99])
def test_modes_match_step_by_step_recurrence(beta):
    rng = np.random.default_rng(1)
    n, lr = 5, 0.8
    # stable modes up to the edge a = ηλ/n < 2(1+β), plus λ = 0
    lam = np.concatenate([[0.0], rng.uniform(0, 2 * (1 + beta) * n / lr * 0.99, 12)])
    hist = iterate_modes(lam, 150, lr, beta, n)
    t = np.array([0, 1, 2, 3, 17, 64, 150])
    e, g = heavy_ball_modes(jnp.asarray(lam), jnp.asarray(t, float), learning_rate=lr, momentum=beta, n=n)
    np.testing.assert_allclose(e, np.stack([hist[s][0] for s in t]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g, np.stack([hist[s][1] for s in t]), rtol=1e-9, atol=1e-12)
    curve = spectral.decay_curve(jnp.asarray(lam), 150, learning_rate=lr, momentum=beta, n=n, time="discrete")
    np.testing.assert_allclose(curve, np.stack([h[0] for h in hist]), rtol=1e-9, atol=1e-12)
    # jit-compatible: traced t and learning rate give the same numbers
    e_jit, g_jit = jax.jit(lambda lam_, s, lr_: heavy_ball_modes(lam_, s, learning_rate=lr_, momentum=beta, n=n))(
        jnp.asarray(lam), jnp.asarray(t, float), lr)
    np.testing.assert_allclose(e_jit, e, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_jit, g, rtol=1e-12, atol=1e-15)


def test_stable_limit_and_tiny_eigenvalues():
    beta, lr, n = 0.9, 1.0, 4
    lam = jnp.array([1e-9, 0.5, 3.0])
    e, g = heavy_ball_modes(lam, jnp.array([1e26, jnp.inf]), learning_rate=lr, momentum=beta, n=n)
    np.testing.assert_allclose(e, 0.0, atol=1e-12)
    np.testing.assert_allclose(g, np.broadcast_to(1.0 / lam, (2, 3)), rtol=1e-9)
    # the first steps of a tiny mode: α_t = (η/n) Σ_{s<t} (1 − β^{s+1})/(1 − β) to first order in λ
    t = np.arange(0, 20)
    _, g_small = heavy_ball_modes(jnp.array([1e-13]), jnp.asarray(t, float), learning_rate=lr, momentum=beta, n=n)
    expect = (lr / n) * np.array([sum((1 - beta ** (s + 1)) / (1 - beta) for s in range(k)) for k in t])
    np.testing.assert_allclose(g_small[:, 0], expect, rtol=1e-9)


@pytest.mark.parametrize("n_params_small", [False, True])
@pytest.mark.parametrize("edge", [False, True])
def test_linear_model_matches_optax_momentum_training(n_params_small, edge):
    """Full-rank kernel (d+1 ≥ N) and rank-deficient one (P = 8 < N·K = 14): exact either way,
    also at 0.97 × the stability limit 2(1+β)n/λ_max where the top modes oscillate."""
    d = 3 if n_params_small else 8
    params, x, y, xt = linear_problem(n=7, d=d)
    beta, steps = 0.85, 60
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    kt = ntkdyn.empirical_ntk(linear_apply, params, xt, x)
    limit = float(ntkdyn.max_learning_rate(k, momentum=beta))
    lam_max = float(np.linalg.eigvalsh(np.asarray(flatten_kernel(k)))[-1])
    np.testing.assert_allclose(limit, 2 * (1 + beta) * 14 / lam_max, rtol=1e-12)
    lr = 0.97 * limit if edge else 0.6
    rec = [0, 1, 2, 9, 33, 60]
    fx_real, fxt_real, p_real = optax_sgd_run(linear_apply, params, x, y, xt, lr=lr, beta=beta, steps=steps,
                                              record=rec)
    t = jnp.asarray(rec, float)
    fx, fxt = heavy_ball_function_space(k, y, linear_apply(params, x), t, k_test_train=kt,
                                        fx_test_0=linear_apply(params, xt), learning_rate=lr, momentum=beta)

    def close(a, b):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * float(jnp.max(jnp.abs(b)))

    close(fx, fx_real)
    close(fxt, fxt_real)
    theta = heavy_ball_parameter_space(linear_apply, params, x, y, t, k_train_train=k, learning_rate=lr,
                                       momentum=beta)
    close(theta["W"], p_real["W"])
    close(theta["b"], p_real["b"])


def test_traced_kernel_equals_full_kernel_for_one_output():
    params, x, y, xt = linear_problem(k=1)
    k_full = ntkdyn.empirical_ntk(linear_apply, params, x)
    k_tr = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    t = jnp.array([0.0, 5.0, 40.0])
    kw = dict(learning_rate=0.5, momentum=0.5)
    a, _ = heavy_ball_function_space(k_full, y, linear_apply(params, x), t, **kw)
    b, _ = heavy_ball_function_space(k_tr, y, linear_apply(params, x), t, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def tanh_net(params, x):
    return jnp.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] / np.sqrt(params["W1"].shape[1])


def test_f_lin_at_closed_form_weights_equals_function_space_for_a_nonlinear_net():
    rng = np.random.default_rng(2)
    apply_fn = tanh_net
    params = {"W1": rng.standard_normal((3, 16)), "b1": rng.standard_normal(16), "W2": rng.standard_normal((16, 2))}
    x, y, xt = rng.standard_normal((6, 3)), rng.standard_normal((6, 2)), rng.standard_normal((4, 3))
    k = ntkdyn.empirical_ntk(apply_fn, params, x, method="jacobian")
    kt = ntkdyn.empirical_ntk(apply_fn, params, xt, x, method="jacobian")
    t = jnp.array([1.0, 10.0, 300.0, jnp.inf])
    kw = dict(learning_rate=0.5, momentum=0.9)
    fx, fxt = heavy_ball_function_space(k, y, apply_fn(params, x), t, k_test_train=kt,
                                        fx_test_0=apply_fn(params, xt), **kw)
    theta = heavy_ball_parameter_space(apply_fn, params, x, y, t, k_train_train=k, **kw)
    f_lin = jax.jit(jax.vmap(ntkdyn.linearize(apply_fn, params), in_axes=(0, None)))
    np.testing.assert_allclose(f_lin(theta, x), fx, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(f_lin(theta, xt), fxt, rtol=1e-9, atol=1e-10)
    # t = ∞ is the kernel-regression limit Θ(x*, X) Θ⁺ r₀, whatever β
    km = flatten_kernel(k)
    r0 = (apply_fn(params, x) - y).reshape(-1)
    expect = apply_fn(params, xt).reshape(-1) - flatten_kernel(kt) @ np.linalg.pinv(km) @ r0
    np.testing.assert_allclose(fxt[-1].reshape(-1), expect, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(fx[-1], y, rtol=1e-8, atol=1e-9)


def test_stability_limit():
    params, x, y, _ = linear_problem()
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    beta = 0.7
    limit = float(ntkdyn.max_learning_rate(k, momentum=beta))
    np.testing.assert_allclose(limit, (1 + beta) * float(ntkdyn.max_learning_rate(k)), rtol=1e-12)
    lam_max = float(jnp.linalg.eigvalsh(flatten_kernel(k))[-1])
    n = 14
    t = jnp.array([200.0, 400.0])
    e_below, _ = heavy_ball_modes(jnp.array([lam_max]), t, learning_rate=0.99 * limit, momentum=beta, n=n)
    e_above, _ = heavy_ball_modes(jnp.array([lam_max]), t, learning_rate=1.01 * limit, momentum=beta, n=n)
    assert abs(float(e_below[1, 0])) < abs(float(e_below[0, 0])) < 1
    assert abs(float(e_above[1, 0])) > abs(float(e_above[0, 0])) > 1
    with pytest.warns(ntkdyn.UnstableLearningRateWarning):
        heavy_ball_function_space(k, y, linear_apply(params, x), 10.0, learning_rate=1.01 * limit, momentum=beta)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5])
def test_bad_momentum(beta):
    with pytest.raises(ValueError, match="momentum"):
        heavy_ball_modes(jnp.array([1.0]), 3.0, learning_rate=0.1, momentum=beta, n=1)


def test_bad_times_and_rates():
    with pytest.raises(ValueError, match="t:.*whole"):
        heavy_ball_modes(jnp.array([1.0]), jnp.array([0.5]), learning_rate=0.1, momentum=0.5, n=1)
    with pytest.raises(ValueError, match="t"):
        heavy_ball_modes(jnp.array([1.0]), jnp.array([-1.0]), learning_rate=0.1, momentum=0.5, n=1)
    with pytest.raises(ValueError, match="learning_rate"):
        heavy_ball_modes(jnp.array([1.0]), 2.0, learning_rate=-1.0, momentum=0.5, n=1)
    params, x, y, _ = linear_problem()
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    with pytest.raises(ValueError, match="y_train"):
        heavy_ball_function_space(k, y[:, :1], linear_apply(params, x), 1.0, momentum=0.5)
    with pytest.raises(ValueError, match="k_test_train"):
        heavy_ball_function_space(k, y, linear_apply(params, x), 1.0, k_test_train=k, momentum=0.5)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 3), t_len=st.integers(1, 3), beta=st.floats(0.0, 0.95), scalar_t=st.booleans())
def test_modes_shapes_and_finiteness_property(m, t_len, beta, scalar_t):
    lam = jnp.linspace(0.0, 3.0, m)
    t = jnp.asarray(7.0) if scalar_t else jnp.arange(t_len, dtype=float) * 13
    e, g = heavy_ball_modes(lam, t, learning_rate=1.0, momentum=beta, n=3)  # a ≤ 1 < 2(1+β): all stable
    shape = (m,) if scalar_t else (t_len, m)
    assert e.shape == shape and g.shape == shape
    assert np.all(np.isfinite(e)) and np.all(np.isfinite(g)) and np.all(np.abs(np.asarray(e)) <= 1.0 + 1e-12)


def test_momentum_needs_discrete_time_and_combines_with_a_metric():
    params, x, y, xt = linear_problem()
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    f0 = linear_apply(params, x)
    with pytest.raises(ValueError, match="^time:.*discrete"):
        ntkdyn.function_space(k, y, f0, 3.0, momentum=0.5)
    t = jnp.array([0.0, 4.0, 50.0, jnp.inf])
    plain, _ = heavy_ball_function_space(k, y, f0, t, learning_rate=0.4, momentum=0.6)
    eye, _ = heavy_ball_function_space(k, y, f0, t, learning_rate=0.4, momentum=0.6, metric=jnp.eye(2))
    np.testing.assert_allclose(eye, plain, rtol=1e-10, atol=1e-12)
    # a scaled metric is a scaled learning rate
    half, _ = heavy_ball_function_space(k, y, f0, t, learning_rate=0.8, momentum=0.6, metric=0.5 * jnp.eye(2))
    np.testing.assert_allclose(half, plain, rtol=1e-10, atol=1e-12)


def test_float32_kernel_with_float64_targets_keeps_float32_and_its_cut_off():
    """Same validation as the plain solver: the model's dtype wins and the cut-off is the kernel's."""
    from ntkdyn import models

    f, p = models.mlp(2, 1, width=3, depth=1, activation="tanh", dtype=jnp.float32, seed=1)
    x = jax.random.normal(jax.random.key(0), (40, 2), jnp.float32)
    y64 = np.sin(np.asarray(x, np.float64).sum(1, keepdims=True))
    k = ntkdyn.empirical_ntk(f, p, x)
    f0 = f(p, x)
    a, _ = heavy_ball_function_space(k, y64.astype(np.float32), f0, jnp.inf, learning_rate=0.5, momentum=0.5)
    b, _ = heavy_ball_function_space(k, y64, f0, jnp.inf, learning_rate=0.5, momentum=0.5)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="^diag_reg:"):
        heavy_ball_function_space(k, y64, f0, 1.0, diag_reg=jnp.array(-1.0))
