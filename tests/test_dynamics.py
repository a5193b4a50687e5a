"""Closed-form dynamics against exact oracles (float64 unless stated).

1. a linear model, where linearization is exact, against real optax GD;
2. ``f_lin(θ_t)`` (Eq. 8 weights through the linearized net) against Eq. 9/10;
3. singular kernels against the float64 pseudo-inverse answer, float32 included;
4. the stability limit; 5. bad input.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkdyn
from ntkdyn import models
from ntkdyn.kernels import flatten_kernel


from conftest import linear_apply
from conftest import make_linear_problem as linear_problem


def run_gd(apply_fn, params, x, y, xt, lr, steps, momentum=None):
    """Real full-batch GD with optax on L = mean(l2_loss); returns outputs and weights per step."""
    opt = optax.sgd(lr)
    state = opt.init(params)
    loss = lambda p: jnp.mean(optax.l2_loss(apply_fn(p, x), y))
    out = []
    for step in range(steps + 1):
        out.append((apply_fn(params, x), apply_fn(params, xt), params))
        updates, state = opt.update(jax.grad(loss)(params), state)
        params = optax.apply_updates(params, updates)
    return out


# --------------------------------------------------------------------------- #
# 1. linear-model oracle
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k_out,fraction", [(1, 0.4), (3, 0.95)])
def test_linear_model_discrete_matches_optax_gd_step_for_step(k_out, fraction):
    """fraction 0.95 of the limit puts the top modes past n/λ: they oscillate while decaying."""
    params, x, xt, y = linear_problem(k_out)
    steps = 40
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    kst = ntkdyn.empirical_ntk(linear_apply, params, xt, x)
    lr = fraction * float(ntkdyn.max_learning_rate(k))
    traj = run_gd(linear_apply, params, x, y, xt, lr, steps)
    ts = jnp.arange(steps + 1.0)
    tr, te = ntkdyn.function_space(
        k, y, linear_apply(params, x), ts, k_test_train=kst, fx_test_0=linear_apply(params, xt),
        learning_rate=lr, time="discrete",
    )
    theta = ntkdyn.parameter_space(linear_apply, params, x, y, ts, learning_rate=lr, time="discrete")
    for i, (f_tr, f_te, p) in enumerate(traj):
        np.testing.assert_allclose(tr[i], f_tr, atol=1e-10, rtol=0)
        np.testing.assert_allclose(te[i], f_te, atol=1e-10, rtol=0)
        np.testing.assert_allclose(theta["W"][i], p["W"], atol=1e-10, rtol=0)
        np.testing.assert_allclose(theta["b"][i], p["b"], atol=1e-10, rtol=0)


def test_linear_model_traced_kernel_is_exact_for_shared_features():
    """x W + b has Θ_full = Θ_tr ⊗ I_K exactly, so the traced path is exact too."""
    params, x, xt, y = linear_problem(3)
    traj = run_gd(linear_apply, params, x, y, xt, 1.0, 10)
    k = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    kst = ntkdyn.empirical_ntk(linear_apply, params, xt, x, trace_outputs=True)
    tr, te = ntkdyn.function_space(
        k, y, linear_apply(params, x), 10.0, k_test_train=kst, fx_test_0=linear_apply(params, xt),
        learning_rate=1.0, time="discrete",
    )
    np.testing.assert_allclose(tr, traj[10][0], atol=1e-10)
    np.testing.assert_allclose(te, traj[10][1], atol=1e-10)


def test_continuous_time_is_the_small_step_limit_of_gd():
    params, x, xt, y = linear_problem(1)
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    f0 = linear_apply(params, x)
    cont, _ = ntkdyn.function_space(k, y, f0, 50.0, learning_rate=0.01)
    disc, _ = ntkdyn.function_space(k, y, f0, 50.0, learning_rate=0.01, time="discrete")
    fine, _ = ntkdyn.function_space(k, y, f0, 5000.0, learning_rate=0.0001, time="discrete")
    # GD differs from the flow by O(η); shrinking η 100-fold shrinks the gap ~100-fold
    gap_coarse = float(jnp.abs(cont - disc).max())
    gap_fine = float(jnp.abs(cont - fine).max())
    assert 0 < gap_fine < gap_coarse / 50


# --------------------------------------------------------------------------- #
# 2. Eq. 8 weights through f_lin reproduce Eq. 9/10, at any width
# --------------------------------------------------------------------------- #

TIMES = jnp.array([0.0, 1.0, 10.0, 1e3, 1e6, jnp.inf])


@pytest.mark.parametrize("width", [8, 128])
@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_flin_of_eq8_weights_equals_function_space(width, time):
    f, p = models.mlp(4, 2, width=width, depth=2, activation="erf", dtype=jnp.float64, seed=width)
    x = jax.random.normal(jax.random.key(0), (10, 4))
    xt = jax.random.normal(jax.random.key(1), (5, 4))
    y = jnp.sin(x[:, :2])
    k = ntkdyn.empirical_ntk(f, p, x)
    kst = ntkdyn.empirical_ntk(f, p, xt, x)
    lr = 0.5 * float(ntkdyn.max_learning_rate(k))
    tr, te = ntkdyn.function_space(
        k, y, f(p, x), TIMES, k_test_train=kst, fx_test_0=f(p, xt), learning_rate=lr, time=time
    )
    theta = ntkdyn.parameter_space(f, p, x, y, TIMES, k_train_train=k, learning_rate=lr, time=time)
    f_lin = ntkdyn.linearize(f, p)
    lin_tr = jax.vmap(f_lin, in_axes=(0, None))(theta, x)
    lin_te = jax.vmap(f_lin, in_axes=(0, None))(theta, xt)
    assert bool(jnp.all(jnp.isfinite(lin_tr))) and bool(jnp.all(jnp.isfinite(lin_te)))
    np.testing.assert_allclose(lin_tr, tr, atol=1e-9, rtol=0)
    np.testing.assert_allclose(lin_te, te, atol=1e-9, rtol=0)
    np.testing.assert_allclose(tr[-1], y, atol=1e-9)  # full-rank kernel: fits the data at t = ∞


def test_parameter_space_scalar_t_and_recomputed_kernel():
    f, p = models.mlp(3, 1, width=16, depth=1, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    y = jnp.cos(x[:, :1])
    one = ntkdyn.parameter_space(f, p, x, y, 7.0)
    many = ntkdyn.parameter_space(f, p, x, y, jnp.array([7.0]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b[0], atol=1e-12), one, many)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a.shape, b.shape), one, p)


# --------------------------------------------------------------------------- #
# 3. singular kernels: duplicated inputs, consistent and conflicting targets
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=None)
def _singular_mlp():
    return models.mlp(3, 1, width=64, depth=2, activation="erf", dtype=jnp.float64, seed=0)


def singular_problem(dtype, shift):
    f, p = _singular_mlp()  # one apply_fn for every case, so jit compiles once per dtype
    x = np.asarray(jax.random.normal(jax.random.key(0), (10, 3)))
    x = np.concatenate([x, x[:3]], 0)  # 3 exact duplicates → Θ has rank 10 of 13
    y = np.sin(x.sum(1, keepdims=True))
    y[10:] += shift  # shift ≠ 0: the copies ask for different targets
    xt = np.asarray(jax.random.normal(jax.random.key(1), (5, 3)))
    p = jax.tree_util.tree_map(lambda a: a.astype(dtype), p)
    return f, p, jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(xt, dtype)


def pinv_reference(shift):
    """f₀ − Θ(·, X) Θ⁺ (f₀(X) − Y), all in float64."""
    f, p, x, y, xt = singular_problem(jnp.float64, shift)
    k = np.asarray(ntkdyn.empirical_ntk(f, p, x, trace_outputs=True))
    kst = np.asarray(ntkdyn.empirical_ntk(f, p, xt, x, trace_outputs=True))
    r0 = np.asarray(f(p, x) - y)
    kp = np.linalg.pinv(k, hermitian=True)
    return np.asarray(f(p, x)) - k @ kp @ r0, np.asarray(f(p, xt)) - kst @ kp @ r0


@pytest.mark.parametrize("shift", [0.0, 0.5])
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-3)])
@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_singular_kernel_limit_is_the_pseudo_inverse_answer(shift, dtype, tol, time):
    ref_tr, ref_te = pinv_reference(shift)
    f, p, x, y, xt = singular_problem(dtype, shift)
    k = ntkdyn.empirical_ntk(f, p, x)
    kst = ntkdyn.empirical_ntk(f, p, xt, x)
    ts = jnp.array([1.0, 1e3, 1e26, jnp.inf], dtype)
    tr, te = ntkdyn.function_space(k, y, f(p, x), ts, k_test_train=kst, fx_test_0=f(p, xt), time=time)
    assert tr.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(tr))) and bool(jnp.all(jnp.isfinite(te)))
    np.testing.assert_array_equal(tr[2], tr[3])  # t = 1e26 is t = ∞
    np.testing.assert_array_equal(te[2], te[3])
    scale = float(jnp.abs(y).max())
    np.testing.assert_allclose(np.asarray(tr[3], np.float64), ref_tr, atol=tol * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(te[3], np.float64), ref_te, atol=tol * scale, rtol=0)
    if shift:
        # conflicting copies converge to the mean of their targets (f₀ agrees on copies)
        np.testing.assert_allclose(ref_tr[10:], ref_tr[:3], atol=1e-8)
        np.testing.assert_allclose(ref_tr[:3], np.asarray(y[:3] + shift / 2), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_singular_kernel_weights_stay_bounded(dtype):
    f, p, x, y, _ = singular_problem(dtype, 0.5)
    ts = jnp.array([1.0, 10.0, 1e3, 1e26, jnp.inf], dtype)
    k = ntkdyn.empirical_ntk(f, p, x)
    theta = ntkdyn.parameter_space(f, p, x, y, ts, k_train_train=k)
    flat = lambda tree: jnp.concatenate([l.reshape(l.shape[0], -1) for l in jax.tree_util.tree_leaves(tree)], 1)
    dist = jnp.linalg.norm(flat(theta) - flat(jax.tree_util.tree_map(lambda a: a[None], p)), axis=1)
    assert bool(jnp.all(jnp.isfinite(dist)))
    n = x.shape[0]
    j_norm = float(jnp.sqrt(jnp.linalg.eigvalsh(flatten_kernel(k).astype(jnp.float64)).max()))
    r_norm = float(jnp.linalg.norm(f(p, x) - y))
    for ti, di in zip(np.asarray(ts[:3]), np.asarray(dist[:3])):
        assert di <= ti / n * j_norm * r_norm * (1 + 1e-3)
    np.testing.assert_allclose(dist[3], dist[4], rtol=1e-5)
    # θ_∞ is the minimum-norm move: ‖θ_∞ − θ₀‖² = r₀ᵀ Θ⁺ r₀ restricted to the range
    k64 = np.asarray(flatten_kernel(k), np.float64)
    r0 = np.asarray(f(p, x) - y, np.float64).ravel()
    expected = np.sqrt(r0 @ np.linalg.pinv(k64, hermitian=True, rcond=1e-5 if dtype == jnp.float32 else 1e-15) @ r0)
    np.testing.assert_allclose(float(dist[4]), expected, rtol=1e-2 if dtype == jnp.float32 else 1e-8)


def test_diag_reg_relative_and_absolute():
    f, p, x, y, _ = singular_problem(jnp.float64, 0.5)
    k = ntkdyn.empirical_ntk(f, p, x, trace_outputs=True)
    f0 = f(p, x)
    mean_diag = float(jnp.mean(jnp.diagonal(k)))
    rel, _ = ntkdyn.function_space(k, y, f0, jnp.inf, diag_reg=1e-2)
    ab, _ = ntkdyn.function_space(k, y, f0, jnp.inf, diag_reg=1e-2 * mean_diag, diag_reg_absolute=True)
    np.testing.assert_allclose(rel, ab, atol=1e-12)
    # the regularized flow fits the train targets at t = ∞ (as neural-tangents does) and its test
    # outputs are kernel ridge regression: f₀(x*) − Θ(x*, X)(Θ + reg·I)⁻¹ r₀
    np.testing.assert_allclose(rel, y, atol=1e-10)
    reg = 1e-2 * mean_diag
    _, _, _, _, xt = singular_problem(jnp.float64, 0.5)
    kst = ntkdyn.empirical_ntk(f, p, xt, x, trace_outputs=True)
    _, te = ntkdyn.function_space(k, y, f0, jnp.inf, diag_reg=1e-2, k_test_train=kst, fx_test_0=f(p, xt))
    ridge = np.asarray(f(p, xt)) - np.asarray(kst) @ np.linalg.solve(np.asarray(k) + reg * np.eye(13), np.asarray(f0 - y))
    np.testing.assert_allclose(te, ridge, atol=1e-10)


# --------------------------------------------------------------------------- #
# metric (solver-layer flows): ḟ = −(η/n) Θ M (f − Y)
# --------------------------------------------------------------------------- #


def test_metric_flow_matches_gd_on_preconditioned_linear_loss():
    """GD on L = 1/(2n) rᵀ M r  (M SPD) for a linear model is the metric flow, step for step."""
    params, x, xt, y = linear_problem(2, n=5)
    a = np.random.default_rng(0).normal(size=(2, 2))
    m_small = jnp.asarray(a @ a.T + 0.5 * np.eye(2))
    lr, steps = 0.3, 25
    n = y.size
    loss = lambda p: 0.5 / n * jnp.sum(((linear_apply(p, x) - y) @ m_small) * (linear_apply(p, x) - y))
    p = params
    outs = []
    for _ in range(steps + 1):
        outs.append((linear_apply(p, x), linear_apply(p, xt), p))
        p = jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(loss)(p))
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    kst = ntkdyn.empirical_ntk(linear_apply, params, xt, x)
    ts = jnp.arange(steps + 1.0)
    kw = dict(learning_rate=lr, time="discrete", metric=m_small)
    tr, te = ntkdyn.function_space(k, y, linear_apply(params, x), ts, k_test_train=kst,
                                   fx_test_0=linear_apply(params, xt), **kw)
    theta = ntkdyn.parameter_space(linear_apply, params, x, y, ts, **kw)
    for i, (f_tr, f_te, pi) in enumerate(outs):
        np.testing.assert_allclose(tr[i], f_tr, atol=1e-10)
        np.testing.assert_allclose(te[i], f_te, atol=1e-10)
        np.testing.assert_allclose(theta["W"][i], pi["W"], atol=1e-10)


def test_identity_metric_is_no_metric():
    params, x, xt, y = linear_problem(2)
    k = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    f0 = linear_apply(params, x)
    ts = jnp.array([0.0, 3.0, jnp.inf])
    plain, _ = ntkdyn.function_space(k, y, f0, ts)
    metric, _ = ntkdyn.function_space(k, y, f0, ts, metric=jnp.eye(2))
    np.testing.assert_allclose(plain, metric, atol=1e-10)


# --------------------------------------------------------------------------- #
# stability limit
# --------------------------------------------------------------------------- #


def test_max_learning_rate_separates_convergence_from_divergence():
    params, x, xt, y = linear_problem(2)
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    lr_max = float(ntkdyn.max_learning_rate(k))
    lam_max = float(jnp.linalg.eigvalsh(flatten_kernel(k)).max())
    assert lr_max == pytest.approx(2 * y.size / lam_max, rel=1e-12)
    traced = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    assert float(ntkdyn.max_learning_rate(traced, num_outputs=2)) == pytest.approx(lr_max, rel=1e-10)

    def final_loss(lr):
        traj = run_gd(linear_apply, params, x, y, xt, lr, 300)
        return float(jnp.mean((traj[-1][0] - y) ** 2))

    initial = float(jnp.mean((linear_apply(params, x) - y) ** 2))
    design = jnp.c_[x, jnp.ones(len(x))]
    optimum = float(jnp.mean((design @ jnp.linalg.lstsq(design, y)[0] - y) ** 2))
    assert final_loss(0.9 * lr_max) == pytest.approx(optimum, rel=1e-6)
    assert final_loss(1.1 * lr_max) > 1e3 * initial
    with pytest.warns(ntkdyn.UnstableLearningRateWarning, match="max_learning_rate"):
        tr, _ = ntkdyn.function_space(k, y, linear_apply(params, x), 300.0, learning_rate=1.1 * lr_max,
                                      time="discrete")
    np.testing.assert_allclose(tr, run_gd(linear_apply, params, x, y, xt, 1.1 * lr_max, 300)[-1][0], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntkdyn.function_space(k, y, linear_apply(params, x), 300.0, learning_rate=0.9 * lr_max, time="discrete")


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def good():
    params, x, xt, y = linear_problem(2)
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    kst = ntkdyn.empirical_ntk(linear_apply, params, xt, x)
    return dict(k=k, y=y, f0=linear_apply(params, x), kst=kst, ft0=linear_apply(params, xt))


def call(g, **over):
    args = dict(k_train_train=g["k"], y_train=g["y"], fx_train_0=g["f0"], t=1.0)
    args.update(over)
    return ntkdyn.function_space(args.pop("k_train_train"), args.pop("y_train"), args.pop("fx_train_0"),
                                 args.pop("t"), **args)


@pytest.mark.parametrize(
    "override,name",
    [
        (dict(y_train=jnp.ones((7, 3))), "y_train"),
        (dict(y_train=jnp.ones((6, 2))), "y_train"),
        (dict(fx_train_0=jnp.ones((7,))), "fx_train_0"),
        (dict(k_train_train=jnp.ones((7, 6))), "k_train_train"),
        (dict(k_train_train=jnp.ones((7, 7, 1, 1))), "k_train_train"),
        (dict(t=-1.0), "t"),
        (dict(t=jnp.array([1.0, jnp.nan])), "t"),
        (dict(t=jnp.ones((2, 2))), "t"),
        (dict(time="euler"), "time"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=jnp.nan), "learning_rate"),
        (dict(diag_reg=-1.0), "diag_reg"),
        (dict(diag_reg=jnp.array(-1.0)), "diag_reg"),
        (dict(diag_reg=jnp.nan), "diag_reg"),
        (dict(diag_reg=jnp.inf), "diag_reg"),
        (dict(learning_rate=jnp.array([1.0, 2.0])), "learning_rate"),
        (dict(rcond=-1e-3), "rcond"),
        (dict(rcond=jnp.array([1e-3])), "rcond"),  # a 0-d NumPy/JAX rcond is a scalar (issue 13 item 7)
        (dict(rcond=jnp.array(1.5)), "rcond"),
        (dict(k_test_train=jnp.ones((4, 7, 2, 2))), "k_test_train, fx_test_0"),
        (dict(k_test_train=jnp.ones((4, 7)), fx_test_0=jnp.ones((4, 2))), "k_test_train"),
        (dict(k_test_train=jnp.ones((4, 6, 2, 2)), fx_test_0=jnp.ones((4, 2))), "k_test_train"),
        (dict(metric=jnp.ones((3, 3))), "metric"),
        (dict(metric=jnp.array([[1.0, 2.0], [0.0, 1.0]])), "metric"),
        (dict(metric=-jnp.eye(2)), "metric"),
    ],
)
def test_bad_input_names_the_argument(good, override, name):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}:"):
        call(good, **override)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("name", ["k_train_train", "y_train", "fx_train_0", "k_test_train", "fx_test_0"])
def test_non_finite_inputs_rejected(good, name, value):
    key = {"k_train_train": "k", "y_train": "y", "fx_train_0": "f0", "k_test_train": "kst", "fx_test_0": "ft0"}[name]
    bad = good[key].at[(0,) * good[key].ndim].set(value)
    args = dict(k_test_train=good["kst"], fx_test_0=good["ft0"])
    args[name] = bad
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call(good, **args)


def test_gradient_in_time_is_exact_at_zero(good):
    """d f_t/dt at t = 0 is −(η/n) Θ r₀ (the guard for 0·∞ must not cut it)."""
    k, y, f0 = good["k"], good["y"], good["f0"]
    n = y.size
    dfdt = jax.jacfwd(lambda t: ntkdyn.function_space(k, y, f0, t, learning_rate=0.3)[0])(0.0)
    expected = -(0.3 / n) * (flatten_kernel(k) @ (f0 - y).ravel()).reshape(y.shape)
    np.testing.assert_allclose(dfdt, expected, atol=1e-12)


def test_jitted_fractional_unstable_discrete_time_is_nan_not_garbage(good):
    lr = 0.75 * float(ntkdyn.max_learning_rate(good["k"]))
    fn = jax.jit(lambda t: ntkdyn.function_space(good["k"], good["y"], good["f0"], t, learning_rate=lr,
                                                   time="discrete")[0])
    assert bool(jnp.all(jnp.isfinite(fn(3.0))))
    assert bool(jnp.any(jnp.isnan(fn(2.5))))


def test_float32_model_with_float64_targets_uses_the_float32_cut_off():
    """A narrow float32 net (P < N) with numpy float64 targets: the kernel is only float32-accurate,
    so its round-off modes must be cut exactly as with float32 targets (and outputs stay float32)."""
    f, p = models.mlp(2, 1, width=3, depth=1, activation="tanh", dtype=jnp.float32, seed=1)
    x = jax.random.normal(jax.random.key(0), (40, 2), jnp.float32)
    y64 = np.sin(np.asarray(x, np.float64).sum(1, keepdims=True))
    k = ntkdyn.empirical_ntk(f, p, x)
    f0 = f(p, x)
    a, _ = ntkdyn.function_space(k, y64.astype(np.float32), f0, jnp.inf)
    b, _ = ntkdyn.function_space(k, y64, f0, jnp.inf)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    rank_p = sum(l.size for l in jax.tree_util.tree_leaves(p))
    theta = ntkdyn.parameter_space(f, p, x, y64, jnp.inf, k_train_train=k)
    move = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(jax.tree_util.tree_leaves(theta),
                                                             jax.tree_util.tree_leaves(p))) ** 0.5
    # minimum-norm move through at most P directions: bounded by ‖r₀‖/√λ_min(kept); a kept round-off
    # mode (λ ~ eps32·λ_max) would make it ~1e3× larger
    spec = ntkdyn.spectral.spectrum(flatten_kernel(k), rcond=40 * float(jnp.finfo(jnp.float32).eps))
    assert int(spec.rank) <= rank_p
    kept = spec.eigenvalues[~spec.null]
    assert move <= float(jnp.linalg.norm(f0 - y64) / jnp.sqrt(kept.min())) * 1.01


def test_discrete_fractional_steps_above_n_over_lambda_rejected(good):
    lr = 0.75 * float(ntkdyn.max_learning_rate(good["k"]))  # between n/λ and 2n/λ: (1 − ηλ/n) < 0
    with pytest.raises(ValueError, match=r"^t:"):
        call(good, t=2.5, learning_rate=lr, time="discrete")
    call(good, t=3.0, learning_rate=lr, time="discrete")


def test_max_learning_rate_bad_input():
    with pytest.raises(ValueError, match="^k_train_train:"):
        ntkdyn.max_learning_rate(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="^num_outputs:"):
        ntkdyn.max_learning_rate(jnp.ones((3, 3, 2, 2)), num_outputs=3)
    with pytest.raises(ValueError, match="^k_train_train:"):
        ntkdyn.max_learning_rate(jnp.full((2, 2), jnp.inf))
    with pytest.raises(ValueError, match="^diag_reg:"):
        ntkdyn.max_learning_rate(jnp.eye(2), diag_reg=-10.0, diag_reg_absolute=True)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 6),
    k_out=st.integers(1, 3),
    n_times=st.integers(0, 4),
    traced=st.booleans(),
    time=st.sampled_from(["continuous", "discrete"]),
)
def test_output_shapes(n, k_out, n_times, traced, time):
    rng = np.random.default_rng(n * 10 + k_out)
    a = rng.normal(size=(n * k_out, 2))
    kf = (a @ a.T).reshape(n, k_out, n, k_out).transpose(0, 2, 1, 3)  # rank ≤ 2: singular for most draws
    k = jnp.einsum("ijkk->ij", kf) / k_out if traced else jnp.asarray(kf)
    y, f0 = jnp.asarray(rng.normal(size=(n, k_out))), jnp.zeros((n, k_out))
    kst = k[:2] if traced else jnp.asarray(kf[:2])
    t = 3.0 if n_times == 0 else jnp.linspace(0.0, 5.0, n_times)
    tr, te = ntkdyn.function_space(k, y, f0, t, k_test_train=kst, fx_test_0=f0[:2], time=time, learning_rate=0.1)
    lead = () if n_times == 0 else (n_times,)
    assert tr.shape == lead + (n, k_out) and te.shape == lead + (min(n, 2), k_out)
    assert bool(jnp.all(jnp.isfinite(tr))) and bool(jnp.all(jnp.isfinite(te)))
