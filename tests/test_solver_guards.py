"""The closed-form solver never returns a plausible wrong answer (issue 13, items 1, 2, 5, 6, 7).

Each case here gave a finite wrong number (or a crash) before: indefinite or
asymmetric kernels, invalid values under ``jit``, float32 at t = ∞ next to the
cut-off, half-precision inputs, NumPy/JAX scalars, the stability limit itself.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_apply, make_linear_problem

import ntkdyn


@pytest.fixture(scope="module")
def problem():
    params, x, xt, y = make_linear_problem(k_out=1, n=6, d=8)
    k = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    kst = ntkdyn.empirical_ntk(linear_apply, params, xt, x, trace_outputs=True)
    return dict(k=k, y=y, f0=linear_apply(params, x), kst=kst, ft0=linear_apply(params, xt), params=params, x=x)


def indefinite_like(k, fraction):
    """``k`` with its smallest eigenvalue replaced by ``−fraction·λ_max``."""
    w, v = np.linalg.eigh(np.asarray(k))
    w[0] = -fraction * w[-1]
    return jnp.asarray((v * w) @ v.T)


# ------------------------------------------------------------------ item 1


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_indefinite_kernel_is_rejected(problem, fraction):
    bad = indefinite_like(problem["k"], fraction)
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.function_space(bad, problem["y"], problem["f0"], 1.0)
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.max_learning_rate(bad)


def test_negative_kernel_has_no_max_learning_rate():
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.max_learning_rate(-10.0 * jnp.eye(4))


def test_round_off_negative_eigenvalues_are_accepted(problem):
    # a rank-deficient float32 kernel: eigenvalues at −O(eps)·λ_max are round-off, not indefiniteness
    x = jnp.concatenate([problem["x"], problem["x"][:2]]).astype(jnp.float32)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), problem["params"])
    k = ntkdyn.empirical_ntk(linear_apply, params, x, trace_outputs=True)
    tr, _ = ntkdyn.function_space(k, jnp.zeros((8, 1), jnp.float32), linear_apply(params, x), jnp.inf)
    assert bool(jnp.all(jnp.isfinite(tr)))
    assert np.isfinite(float(ntkdyn.max_learning_rate(k)))


def test_regularizer_does_not_hide_an_indefinite_kernel(problem):
    """Θ with λ_min = −1.5·tol·λ_max: diag_reg = 0.1 made Θ + reg·I PSD and it used to pass silently."""
    k = problem["k"]
    lam = np.linalg.eigvalsh(np.asarray(k))
    bad = indefinite_like(k, 1.5 * ntkdyn._validate.psd_tolerance(lam.size, k.dtype))
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.function_space(bad, problem["y"], problem["f0"], 1.0, diag_reg=0.1)
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.max_learning_rate(bad, diag_reg=0.1)
    traced = jax.jit(lambda kk: ntkdyn.function_space(kk, problem["y"], problem["f0"], 1.0, diag_reg=0.1)[0])
    assert bool(jnp.all(jnp.isnan(traced(bad))))
    assert bool(jnp.isnan(jax.jit(lambda kk: ntkdyn.max_learning_rate(kk, diag_reg=0.1))(bad)))
    # a PSD kernel under a large regularizer is not mistaken for an indefinite one
    assert bool(jnp.all(jnp.isfinite(ntkdyn.function_space(k, problem["y"], problem["f0"], 1.0, diag_reg=1e6)[0])))


def test_metric_does_not_hide_an_indefinite_kernel(problem):
    """A metric whose range leaves out Θ's negative direction made P Θ P PSD: Θ itself is checked."""
    bad = indefinite_like(problem["k"], 0.5)
    w, v = np.linalg.eigh(np.asarray(bad))
    metric = jnp.asarray(np.eye(w.size) - np.outer(v[:, 0], v[:, 0]))
    with pytest.raises(ValueError, match="^k_train_train: expected a positive semi-definite kernel"):
        ntkdyn.function_space(bad, problem["y"], problem["f0"], 1.0, metric=metric)
    traced = jax.jit(lambda kk: ntkdyn.function_space(kk, problem["y"], problem["f0"], 1.0, metric=metric)[0])
    assert bool(jnp.all(jnp.isnan(traced(bad))))
    assert bool(jnp.all(jnp.isfinite(traced(problem["k"]))))


def test_traced_max_learning_rate_is_nan_for_what_the_eager_checks_reject(problem):
    k = np.array(problem["k"])
    asym = k.copy()
    asym[0, 1] += 0.2 * np.abs(k).max()
    assert bool(jnp.isnan(jax.jit(ntkdyn.max_learning_rate)(jnp.asarray(asym))))
    limit = jax.jit(lambda r: ntkdyn.max_learning_rate(problem["k"], diag_reg=r))
    assert np.isfinite(float(limit(0.0))) and bool(jnp.isnan(limit(-0.01)))


def test_asymmetric_kernel_is_rejected(problem):
    k = np.array(problem["k"])
    k[0, 1] += 0.2 * np.abs(k).max()
    with pytest.raises(ValueError, match="^k_train_train: expected a symmetric kernel"):
        ntkdyn.function_space(jnp.asarray(k), problem["y"], problem["f0"], 1.0)
    with pytest.raises(ValueError, match="^k_train_train: expected a symmetric kernel"):
        ntkdyn.max_learning_rate(jnp.asarray(k))


# ------------------------------------------------------------------ item 2


def jitted(problem, **fixed):
    def fn(t, lr, reg):
        return ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], t, k_test_train=problem["kst"],
                                     fx_test_0=problem["ft0"], learning_rate=lr, diag_reg=reg, **fixed)

    return jax.jit(fn)


@pytest.mark.parametrize(
    "t,lr,reg",
    [(-5.0, 1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 0.0, 0.0), (1.0, jnp.nan, 0.0), (1.0, 1.0, -2.0),
     (1.0, 1.0, jnp.nan), (jnp.nan, 1.0, 0.0)],
)
def test_invalid_traced_values_give_nan_never_finite_numbers(problem, t, lr, reg):
    fn = jitted(problem)
    good_train, good_test = fn(1.0, 1.0, 0.0)
    assert bool(jnp.all(jnp.isfinite(good_train))) and bool(jnp.all(jnp.isfinite(good_test)))
    train, test = fn(t, lr, reg)
    assert bool(jnp.all(jnp.isnan(train))) and bool(jnp.all(jnp.isnan(test)))


def test_only_the_invalid_times_are_nan_under_jit(problem):
    fn = jitted(problem)
    train, _ = fn(jnp.array([1.0, -3.0, jnp.inf]), 1.0, 0.0)
    assert bool(jnp.all(jnp.isfinite(train[0]))) and bool(jnp.all(jnp.isfinite(train[2])))
    assert bool(jnp.all(jnp.isnan(train[1])))


def test_traced_fractional_heavy_ball_step_is_nan(problem):
    fn = jax.jit(lambda t: ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], t, momentum=0.5,
                                                 time="discrete")[0])
    assert bool(jnp.all(jnp.isfinite(fn(3.0))))
    assert bool(jnp.all(jnp.isnan(fn(2.5))))


def test_traced_indefinite_kernel_gives_nan(problem):
    bad = indefinite_like(problem["k"], 0.5)
    out = jax.jit(lambda k: ntkdyn.function_space(k, problem["y"], problem["f0"], 1.0)[0])(bad)
    assert bool(jnp.all(jnp.isnan(out)))


def test_parameter_space_with_negative_traced_time_gives_nan_weights(problem):
    fn = jax.jit(lambda t: ntkdyn.parameter_space(linear_apply, problem["params"], problem["x"], problem["y"], t,
                                                  k_train_train=problem["k"]))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(fn(2.0)))
    assert all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree_util.tree_leaves(fn(-3.0)))


# ------------------------------------------------------------------ item 5


@pytest.mark.parametrize("jit", [False, True])
def test_float32_infinite_time_next_to_the_cut_off_matches_the_float64_oracle(jit):
    """Kept eigenvalue at 1.2× the float32 cut-off, six null modes at 0.8×: the float32 answer is the
    float64 one, eagerly and under jit (a float32 eigh mixes these modes: 4e-2·|r₀| off on train, 3e-2
    on test outputs; under jit it ran in float32 until the program upcast it with x64 on)."""
    rng = np.random.default_rng(1)
    m = 40
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    w = np.geomspace(1.0, 1e-2, m)
    cutoff = m * np.finfo(np.float32).eps
    w[-6:] = 0.8 * cutoff
    w[-7] = 1.2 * cutoff
    k32 = ((q * w) @ q.T).astype(np.float32)
    r0 = rng.standard_normal((m, 1)).astype(np.float32)

    def solve(k, f0):
        return ntkdyn.function_space(k, jnp.zeros((m, 1), jnp.float32), f0, jnp.inf, k_test_train=k[:5],
                                     fx_test_0=jnp.zeros((5, 1), jnp.float32))

    tr, te = (jax.jit(solve) if jit else solve)(jnp.asarray(k32), jnp.asarray(r0))
    k64 = k32.astype(np.float64)
    lam, vec = np.linalg.eigh(k64)
    keep = lam > cutoff * lam[-1]
    assert keep.sum() == m - 6
    alpha = ((vec[:, keep] / lam[keep]) @ vec[:, keep].T) @ r0.astype(np.float64)
    scale = np.abs(r0).max()
    assert np.abs(np.asarray(tr, np.float64) - (r0 - k64 @ alpha)).max() < 1e-3 * scale
    assert np.abs(np.asarray(te, np.float64) + k64[:5] @ alpha).max() < 1e-3 * scale


# ------------------------------------------------------------------ item 6


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(problem, dtype):
    k, y, f0 = (problem[key].astype(dtype) for key in ("k", "y", "f0"))
    tr, _ = ntkdyn.function_space(k, y, f0, jnp.array([0.0, 5.0, jnp.inf]))
    assert tr.dtype == jnp.float32
    ref, _ = ntkdyn.function_space(k.astype(jnp.float32), y.astype(jnp.float32), f0.astype(jnp.float32),
                                   jnp.array([0.0, 5.0, jnp.inf]))
    np.testing.assert_array_equal(tr, ref)
    assert np.isfinite(float(ntkdyn.max_learning_rate(k)))


@pytest.mark.parametrize("name", ["diag_reg", "learning_rate"])
def test_none_hyper_parameters_name_themselves(problem, name):
    with pytest.raises(TypeError, match=rf"^{name}:"):
        ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], 1.0, **{name: None})


# ------------------------------------------------------------------ item 7


@pytest.mark.parametrize("lr", [0.5, np.float32(0.5), jnp.float32(0.5), np.array(0.5), jnp.asarray(0.5)])
def test_numpy_and_jax_scalar_learning_rates(problem, lr):
    tr, _ = ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], 3.0, learning_rate=lr)
    ref, _ = ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], 3.0, learning_rate=0.5)
    np.testing.assert_allclose(tr, ref, rtol=1e-6)


@pytest.mark.parametrize("rcond", [np.float32(1e-6), jnp.float32(1e-6), np.array(1e-6), jnp.asarray(1e-6)])
def test_numpy_and_jax_scalar_rcond(problem, rcond):
    tr, _ = ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], jnp.inf, rcond=rcond)
    ref, _ = ntkdyn.function_space(problem["k"], problem["y"], problem["f0"], jnp.inf, rcond=float(rcond))
    np.testing.assert_array_equal(tr, ref)


def test_a_kernel_that_overflowed_names_the_parameters(problem):
    """parameter_space computes Θ itself: a non-finite Θ blamed k_train_train, which the user never passed."""
    def net(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": jnp.full((8, 3), 0.1, jnp.float32), "w2": jnp.full((3, 1), 1e20, jnp.float32)}
    x = problem["x"].astype(jnp.float32)
    with pytest.raises(ValueError, match="^params0: the empirical NTK computed from params0 on x failed its check"):
        ntkdyn.parameter_space(net, params, x, problem["y"].astype(jnp.float32), 1.0)
    with pytest.raises(ValueError, match="^k_train_train: expected finite values"):  # a kernel the user passed
        ntkdyn.parameter_space(net, params, x, problem["y"], 1.0, k_train_train=jnp.full((6, 6), jnp.inf))


@pytest.mark.parametrize("momentum", [0.0, 0.6])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_exactly_the_max_learning_rate_does_not_warn(problem, momentum, dtype):
    k, y, f0 = (problem[key].astype(dtype) for key in ("k", "y", "f0"))
    lr = ntkdyn.max_learning_rate(k, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr, _ = ntkdyn.function_space(k, y, f0, jnp.array([10.0, 11.0]), learning_rate=lr, momentum=momentum,
                                      time="discrete")
    assert bool(jnp.all(jnp.isfinite(tr)))
    with pytest.warns(ntkdyn.UnstableLearningRateWarning):
        ntkdyn.function_space(k, y, f0, 10.0, learning_rate=1.01 * lr, momentum=momentum, time="discrete")


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_infinite_time_at_exactly_the_limit_is_nan(momentum):
    """At a = 2(1+β) the top mode oscillates with unit modulus forever: t = ∞ has no limit."""
    k = jnp.diag(jnp.array([1.0, 0.5, 0.25]))
    y = jnp.zeros((3, 1))
    f0 = jnp.ones((3, 1))
    lr = 2.0 * (1.0 + momentum) * 3 / 1.0
    assert float(ntkdyn.max_learning_rate(k, momentum=momentum)) == lr
    tr, _ = ntkdyn.function_space(k, y, f0, jnp.array([40.0, 41.0, jnp.inf]), learning_rate=lr,
                                  momentum=momentum, time="discrete")
    top = np.asarray(tr[:, 0, 0])
    # roots −1 and −β of μ² + (1+β)μ + β: after the −β part has died the mode flips sign at constant size
    assert abs(top[0]) > 0.5 and abs(abs(top[0]) - abs(top[1])) < 1e-6 * abs(top[0])
    assert np.sign(top[0]) != np.sign(top[1])
    assert np.isnan(top[2])


def test_parameter_space_rejects_unknown_and_test_keywords_before_any_kernel(problem, monkeypatch):
    import ntkdyn.kernels as kernels

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was computed before the keywords were checked")

    monkeypatch.setattr(kernels, "empirical_ntk", no_kernel)
    args = (linear_apply, problem["params"], problem["x"], problem["y"], 1.0)
    with pytest.raises(TypeError, match="learning_rat"):
        ntkdyn.parameter_space(*args, learning_rat=0.1)
    with pytest.raises(TypeError, match="^k_test_train: parameter_space takes no test data"):
        ntkdyn.parameter_space(*args, k_test_train=np.zeros((2, 6)))
