"""Infinite-width kernels and ensemble predictions (ntkdyn.infinite), float64.

Oracles: closed forms vs the Hermite-series path (and brute-force sampling); exact linear algebra for linear
networks; Monte-Carlo averages over many wide finite networks (output
covariance for the NNGP, ``ntkdyn.empirical_ntk`` for the NTK) within their
sampling error plus an O(1/width) allowance; for the ensemble, the exact
linear map ``f₀ ↦ f_t`` of ``ntkdyn.function_space`` (the covariance of an
affine image of a Gaussian) and a Monte-Carlo ensemble of linearized wide
networks. Slower convergence studies live in ``benchmarks/infinite_convergence.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntkdyn
from ntkdyn import infinite, models


def _inputs(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _abstract(make):
    """The module ``make(rngs)`` builds, without its weights (``nnx.eval_shape``): the graph and the architecture."""
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def _spec(builder, *args, **kwargs):
    """``builder(*args, **kwargs)`` as an abstract module (no weights drawn): all the analytic kernels read."""
    return nnx.eval_shape(lambda: builder(*args, **kwargs))


def _keys(key: int, seeds: int):
    """Independent initialization keys; the RngBitGenerator implementation compiles ~2x faster than threefry."""
    return jax.random.split(jax.random.key(key, impl="rbg"), seeds)


def _ensemble(make, seeds: int, key: int = 123):
    """(apply_fn, params with a leading seed axis) of ``seeds`` independent initializations (one compiled init)."""
    apply_fn, _ = models.as_apply_fn(_abstract(make))
    init = lambda k: nnx.split(make(nnx.Rngs(k)), nnx.Param, ...)[1]
    return apply_fn, jax.jit(jax.vmap(init))(_keys(key, seeds))


def _monte_carlo(make, x, seeds: int, outputs: int, key: int = 123):
    """One ensemble of ``seeds`` networks with ``outputs`` outputs, as two Monte-Carlo estimates.

    NNGP: the output second moment over seeds and outputs (the prior mean is 0)
    and its Gaussian standard error ``√((K_ii K_jj + K_ij²)/samples)``. NTK: the
    output-traced ``ntkdyn.empirical_ntk`` of each network's first output (the
    readout sliced to one column), its mean over seeds and standard error.
    Initialization, outputs and kernels of all seeds are one compiled loop.
    """
    apply_1, _ = models.as_apply_fn(_abstract(lambda r: make(1, r)))

    def one(k):
        network = make(outputs, nnx.Rngs(k))
        params = nnx.split(network, nnx.Param, ...)[1]
        first = jax.tree_util.tree_map_with_path(
            lambda path, a: a[..., :1] if "readout" in jax.tree_util.keystr(path) else a, params)
        return network(x), ntkdyn.empirical_ntk(apply_1, first, x, trace_outputs=True, method="jacobian")

    f, ks = jax.jit(lambda keys: jax.lax.map(one, keys))(_keys(key, seeds))
    samples = f.shape[0] * f.shape[2]
    nngp = jnp.einsum("sik,sjk->ij", f, f) / samples
    d = jnp.diagonal(nngp)
    nngp_se = jnp.sqrt((jnp.outer(d, d) + nngp**2) / samples)
    return nngp, nngp_se, ks.mean(0), ks.std(0) / np.sqrt(seeds)


def _assert_mc(estimate, exact, stderr, bias, what):
    """|MC − exact| ≤ 5 standard errors + a finite-width allowance (relative to the diagonal scale)."""
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    excess = np.abs(np.asarray(estimate) - np.asarray(exact)) - 5 * np.asarray(stderr) - bias * scale
    assert excess.max() <= 0, (what, float(excess.max()), np.asarray(estimate), np.asarray(exact))


# --------------------------------------------------------------------------- #
# activations
# --------------------------------------------------------------------------- #

C = jnp.array([0.3, 0.9, -0.5, 1.0, 0.0, -1.2])
V1 = jnp.array([1.0, 1.0, 2.0, 1.0, 0.5, 1.5])
V2 = jnp.array([0.5, 1.0, 1.0, 1.0, 3.0, 1.2])


def test_erf_closed_form_matches_the_hermite_series():
    closed = infinite.moments("erf", C, V1, V2, method="closed")
    series = infinite.moments("erf", C, V1, V2, method="series")
    for a, b in zip(closed, series):
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-13)


def test_relu_closed_form_matches_the_hermite_series():
    # relu is not analytic: its series converges geometrically for |ρ| < 1 (to the O(step²) accuracy of the
    # coefficients' midpoint rule) but only algebraically at ρ = 1 — the reason relu has its closed form
    closed = np.array(infinite.moments("relu", C, V1, V2, method="closed"))
    rho = np.abs(C / jnp.sqrt(V1 * V2))
    gap = lambda terms: np.abs(np.array(infinite.moments("relu", C, V1, V2, method="series",
                                                         hermite_terms=terms)) - closed)
    short, long = gap(512), gap(2048)
    assert short[:, rho < 0.95].max() < 1e-4, short
    assert long[:, rho == 1].max() < 0.5 * short[:, rho == 1].max() < 1e-2, (short, long)


def test_linear_moments_are_exact_by_the_series():
    a, adot = infinite.moments("linear", C, V1, V2, method="series", hermite_terms=4)
    np.testing.assert_allclose(a, C, atol=1e-13)
    np.testing.assert_allclose(adot, 1.0, atol=1e-13)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu"])
def test_hermite_series_converged_at_moderate_variance(activation):
    # documented: ≤ 1e-13 relative up to variance 3 at the default 512 terms (tanh the hardest)
    c, v1, v2 = jnp.array([0.0, 1.2, 2.9, -2.0]), jnp.array([1.0, 2.0, 3.0, 3.0]), jnp.array([2.0, 1.0, 3.0, 2.0])
    default = np.array(infinite.moments(activation, c, v1, v2))
    longer = np.array(infinite.moments(activation, c, v1, v2, hermite_terms=1024))
    scale = np.array(infinite.moments(activation, v1, v1, v1, hermite_terms=1024))
    assert np.max(np.abs(default - longer) / scale) < 1e-11
    # and the series is the Gaussian expectation: E[φ(u)φ(v)] by brute-force sampling, within 5 standard errors
    u, w = jax.random.normal(jax.random.PRNGKey(0), (2, 200_000))
    rho = c / jnp.sqrt(v1 * v2)
    fn = models.ACTIVATIONS[activation]
    samples = fn(jnp.sqrt(v1)[:, None] * u) * fn(jnp.sqrt(v2)[:, None] * (rho[:, None] * u
                                                                           + jnp.sqrt(1 - rho[:, None] ** 2) * w))
    se = samples.std(1) / np.sqrt(u.size)
    assert np.all(np.abs(samples.mean(1) - default[0]) < 5 * se), (samples.mean(1), default[0], se)


def test_moments_bad_input():
    with pytest.raises(ValueError, match="activation"):
        infinite.moments("swish", C, V1, V2)
    with pytest.raises(ValueError, match="method"):
        infinite.moments("tanh", C, V1, V2, method="closed")
    with pytest.raises(ValueError, match="hermite_terms"):
        infinite.moments("tanh", C, V1, V2, hermite_terms=0)


# --------------------------------------------------------------------------- #
# kernels: exact oracles
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_linear_mlp_kernels_are_exact_linear_algebra(parameterization):
    # φ(z) = z: K¹ = σ_w² xx'/d + σ_b², K^{l+1} = σ_w² K^l + σ_b²; Θ^{l+1} = c_w K^l' + c_b + σ_w² Θ^l
    sw, sb, d, width, depth = 1.3, 0.4, 3, 7, 2
    model = _spec(models.MLP, d, 2, width=width, depth=depth, activation="linear", sigma_w=sw, sigma_b=sb,
                       parameterization=parameterization)
    x1, x2 = _inputs((4, d)), _inputs((5, d), 1)
    got = infinite.kernels(model, x1, x2)
    a = x1 @ x2.T / d  # the input moment
    k = theta = None
    for fan_in in [d] + [width] * depth:
        cw, cb = (sw**2, sb**2) if parameterization == "ntk" else (fan_in, 1.0)
        k_new = sw**2 * a + sb**2
        theta = cw * a + cb + (0.0 if theta is None else sw**2 * theta)
        k, a = k_new, k_new
    np.testing.assert_allclose(got.nngp, k, rtol=1e-13)
    np.testing.assert_allclose(got.ntk, theta, rtol=1e-13)


def test_one_pixel_cnn_is_an_mlp():
    # a 1x1 image with 1x1 convolutions is a dense network: identical kernels (flatten and pooling readouts)
    x = _inputs((5, 1, 1, 3))
    mlp = _spec(models.MLP, 3, 1, width=4, depth=2, activation="erf", sigma_w=1.2, sigma_b=0.3)
    want = infinite.kernels(mlp, x[:, 0, 0])
    for readout in ("flatten", "gap"):
        cnn = _spec(models.CNN, (1, 1, 3), 1, channels=(6, 6), kernel_size=1, activation="erf", sigma_w=1.2,
                     sigma_b=0.3, readout=readout)
        got = infinite.kernels(cnn, x)
        np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
        np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_kernels_tiles_symmetry_and_cross_blocks():
    model = _spec(models.CNN, (5, 5, 2), 1, channels=(3, 3), strides=2, activation="relu", readout="gap")
    x = _inputs((5, 5, 5, 2))
    full = infinite.kernels(model, x)
    np.testing.assert_array_equal(full.ntk, full.ntk.T)
    tiled = infinite.kernels(model, x, tile_size=2)  # 3 x 3 tiles, the last ones padded
    np.testing.assert_allclose(tiled.ntk, full.ntk, rtol=1e-12)
    np.testing.assert_allclose(tiled.nngp, full.nngp, rtol=1e-12)
    cross = infinite.kernels(model, x[:2], x[2:], tile_size=2)
    np.testing.assert_allclose(cross.ntk, full.ntk[:2, 2:], rtol=1e-10)
    assert np.all(np.linalg.eigvalsh(full.ntk) > 0) and np.all(np.linalg.eigvalsh(full.nngp) > 0)


def test_width_does_not_matter_in_ntk_parameterization_but_does_in_standard():
    x = _inputs((4, 3))
    k = lambda width, par: infinite.kernels(_spec(models.MLP, 3, 1, width=width, depth=2, parameterization=par), x)
    np.testing.assert_allclose(k(8, "ntk").ntk, k(64, "ntk").ntk, rtol=1e-14)
    np.testing.assert_allclose(k(8, "standard").nngp, k(64, "standard").nngp, rtol=1e-14)
    # the hidden layers' weight terms grow with the fan-in (8x here), the first layer's and the biases' do not
    assert np.all(np.diag(k(64, "standard").ntk) > 2 * np.diag(k(8, "standard").ntk))


def test_kernels_jit_dtype_and_compile_reuse():
    model = _spec(models.MLP, 3, 1, width=8, depth=2, activation="sigmoid")
    x = _inputs((6, 3))
    eager = infinite.kernels(model, x)
    jitted = jax.jit(lambda xs: infinite.kernels(model, xs))(x)
    np.testing.assert_allclose(jitted.ntk, eager.ntk, rtol=1e-13)
    assert eager.ntk.dtype == jnp.float64
    assert infinite.kernels(model, x.astype(jnp.float32)).ntk.dtype == jnp.float32
    before = infinite._kernels._cache_size()
    infinite.kernels(_spec(models.MLP, 3, 1, width=16, depth=2, activation="sigmoid"), x)  # same architecture
    assert infinite._kernels._cache_size() == before


# --------------------------------------------------------------------------- #
# kernels vs Monte Carlo over wide networks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "activation,parameterization,sigma_b",
    [("tanh", "ntk", 0.3), ("relu", "standard", 0.0)],  # series path; standard with a bias trained from 0
)
def test_mlp_kernels_match_monte_carlo(activation, parameterization, sigma_b):
    width, x = 512, _inputs((5, 4))
    x = x.at[1].set(0.5 * x[0])  # a strongly correlated pair
    make = lambda k, r: models.MLP(4, k, width=width, depth=2, activation=activation, sigma_w=1.4,
                                   sigma_b=sigma_b, parameterization=parameterization, rngs=r)
    exact = infinite.kernels(_abstract(lambda r: make(1, r)), x)  # an abstract module: the architecture is enough
    nngp, nngp_se, ntk, ntk_se = _monte_carlo(make, x, seeds=16, outputs=64)
    _assert_mc(nngp, exact.nngp, nngp_se, 4.0 / width, "nngp")
    _assert_mc(ntk, exact.ntk, ntk_se, 4.0 / width, "ntk")


@pytest.mark.parametrize(
    "options",
    [dict(activation="relu"),
     dict(padding="VALID", strides=2, readout="gap", activation="erf", parameterization="standard"),
     dict(strides=2, readout="gap", activation="tanh")],
    ids=["same-stride1-flatten-relu", "valid-stride2-gap-erf-standard", "same-stride2-gap-tanh"],
)
def test_cnn_kernels_match_monte_carlo(options):
    channels, x = 128, _inputs((3, 5, 5, 2), 1)
    channels_per_layer = (channels,) if options.get("padding") == "VALID" else (channels, channels)  # 5x5 -> 2x2
    make = lambda k, r: models.CNN((5, 5, 2), k, channels=channels_per_layer, rngs=r, **options)
    exact = infinite.kernels(_abstract(lambda r: make(1, r)), x)
    nngp, nngp_se, ntk, ntk_se = _monte_carlo(make, x, seeds=12, outputs=32)
    _assert_mc(nngp, exact.nngp, nngp_se, 4.0 / channels, "nngp")
    _assert_mc(ntk, exact.ntk, ntk_se, 4.0 / channels, "ntk")


def test_empirical_ntk_converges_as_inverse_sqrt_width():
    # one hidden layer keeps every width cheap; benchmarks/infinite_convergence.py runs deeper nets and CNNs
    widths, seeds = (64, 512, 4096), 8
    x = _inputs((6, 3))
    make = lambda w: (lambda r: models.MLP(3, 1, width=w, depth=1, activation="erf", rngs=r))
    exact = infinite.kernels(_abstract(make(8)), x).ntk
    rel = lambda k: np.linalg.norm(k - exact, axis=(-2, -1)) / np.linalg.norm(exact)
    per_seed, of_mean = [], []
    for w in widths:
        apply_fn, params = _ensemble(make(w), seeds, key=w)
        ks = jax.lax.map(lambda p: ntkdyn.empirical_ntk(apply_fn, p, x, trace_outputs=True, method="jacobian"), params)
        per_seed.append(rel(ks))
        of_mean.append(rel(ks.mean(0)))
    per_seed = np.array(per_seed)  # (widths, seeds)
    slopes = np.polyfit(np.log(widths), np.log(per_seed), 1)[0]  # one slope per seed
    assert np.all((slopes > -0.9) & (slopes < -0.15)), slopes
    assert abs(np.median(slopes) + 0.5) < 0.2, slopes
    # the mean over seeds is closer at every width (its fluctuation falls as 1/√(width·seeds))
    assert np.all(np.array(of_mean) < 0.75 * per_seed.mean(1)), (of_mean, per_seed.mean(1))


def test_kernel_error_is_the_relative_frobenius_distance():
    model = models.MLP(3, 2, width=16, depth=1, activation="erf", rngs=nnx.Rngs(3))
    x = _inputs((4, 3))
    exact = infinite.kernels(model, x).ntk
    apply_fn, params = models.as_apply_fn(model)
    full = ntkdyn.empirical_ntk(apply_fn, params, x, method="jacobian")  # (N, N, K, K), compared with Θ_∞ ⊗ I_K
    traced = jnp.einsum("ijkk->ij", full) / 2
    want_traced = np.linalg.norm(traced - exact) / np.linalg.norm(exact)
    want_full = np.linalg.norm(full - exact[:, :, None, None] * np.eye(2)) / (np.sqrt(2) * np.linalg.norm(exact))
    np.testing.assert_allclose(infinite.kernel_error(model, x), want_traced, rtol=1e-10)
    np.testing.assert_allclose(infinite.kernel_error(model, x, ntk=full, ntk_infinite=exact), want_full, rtol=1e-10)
    with pytest.raises(ValueError, match="ntk: expected shape"):
        infinite.kernel_error(model, x, ntk=traced[:3])


# --------------------------------------------------------------------------- #
# ensemble predictions
# --------------------------------------------------------------------------- #


def _data(n=5, nt=3, outputs=2, d=3):
    x, xt = _inputs((n, d)), _inputs((nt, d), 1)
    y = jnp.sin(x[:, :1] + jnp.arange(outputs))
    return x, xt, y


def _linear_oracle(kern_tt, kern_st, nngp_ss, y, t, get, **kwargs):
    """Mean and covariance of f_t = function_space(D, Y, f₀) over f₀ ~ N(0, K_all), from its exact affine map."""
    n, nt = kern_tt.nngp.shape[0], kern_st.nngp.shape[0]
    dyn_tt, dyn_st = (kern_tt.ntk, kern_st.ntk) if get == "ntk" else (kern_tt.nngp, kern_st.nngp)
    k_all = jnp.block([[kern_tt.nngp, kern_st.nngp.T], [kern_st.nngp, nngp_ss]])

    def solve(y_, f0):
        return ntkdyn.function_space(dyn_tt, y_, f0[:n], t, k_test_train=dyn_st, fx_test_0=f0[n:], **kwargs)

    mean_train, mean_test = solve(y, jnp.zeros((n + nt, y.shape[1])))
    # f₀ = e_i in the first output column (the others zero, so the clock n = N·K is the problem's)
    basis = jnp.eye(n + nt)[:, :, None] * (jnp.arange(y.shape[1]) == 0)
    maps = jax.vmap(lambda e: jnp.concatenate(solve(jnp.zeros_like(y), e), axis=1)[..., 0])(basis)  # (n+nt, T, n+nt)
    cov = jnp.einsum("itp,ij,jtq->tpq", maps, k_all, maps)
    return mean_train, mean_test, cov[:, :n, :n], cov[:, n:, n:]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(get="nngp"), dict(diag_reg=0.1), dict(time="discrete", learning_rate=0.8)],
    ids=["ntk", "nngp", "diag_reg", "discrete"],
)
def test_ensemble_equals_the_linear_map_of_function_space(options):
    x, xt, y = _data()
    model = _spec(models.MLP, 3, 1, width=8, depth=2, activation="tanh", sigma_w=1.5, sigma_b=0.2)
    t = jnp.array([0.0, 0.5, 4.0, 40.0, jnp.inf])
    kern_tt, kern_st = infinite.kernels(model, x), infinite.kernels(model, xt, x)
    nngp_ss = infinite.kernels(model, xt).nngp
    options = dict(options)
    if options.get("time") == "discrete":  # a fraction of n/λ_max: every mode decays monotonically
        options["learning_rate"] *= y.size / np.linalg.eigvalsh(kern_tt.ntk)[-1]
    pred = infinite.predict(model, x, y, t, x_test=xt, **options)
    get = options.pop("get", "ntk")
    mean_train, mean_test, cov_train, cov_test = _linear_oracle(kern_tt, kern_st, nngp_ss, y, t, get, **options)
    for got, want in ((pred.mean_train, mean_train), (pred.mean_test, mean_test),
                      (pred.cov_train, cov_train), (pred.cov_test, cov_test)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(pred.cov_train[0], kern_tt.nngp, atol=1e-13)  # t = 0: the NNGP
    np.testing.assert_allclose(pred.cov_test[0], nngp_ss, atol=1e-13)


def test_nngp_at_infinite_time_is_the_gp_posterior():
    x, xt, y = _data()
    model = _spec(models.MLP, 3, 1, width=8, depth=2, activation="erf")
    pred = infinite.predict(model, x, y, jnp.inf, x_test=xt, get="nngp")
    k, ks, kss = infinite.kernels(model, x).nngp, infinite.kernels(model, xt, x).nngp, infinite.kernels(model, xt).nngp
    np.testing.assert_allclose(pred.mean_test, ks @ jnp.linalg.solve(k, y), rtol=1e-8)
    np.testing.assert_allclose(pred.cov_test, kss - ks @ jnp.linalg.solve(k, ks.T), atol=1e-9)
    np.testing.assert_allclose(pred.mean_train, y, atol=1e-9)
    assert pred.mean_test.shape == (3, 2) and pred.cov_test.shape == (3, 3) and pred.std_test.shape == (3,)


def test_ensemble_matches_monte_carlo_of_linearized_wide_networks():
    width, seeds, outputs = 512, 48, 2
    x, xt, y = _data(n=4, nt=2, outputs=outputs)
    make = lambda r: models.MLP(3, outputs, width=width, depth=1, activation="erf", sigma_w=1.5, sigma_b=0.1, rngs=r)
    t = jnp.array([0.0, 4.0, 40.0])
    pred = infinite.predict(_abstract(make), x, y, t, x_test=xt, diag_reg=0.01)
    apply_fn, params = _ensemble(make, seeds)
    xs = jnp.concatenate([x, xt])

    def linearized(p):
        k, f0 = ntkdyn.empirical_ntk(apply_fn, p, xs, trace_outputs=True, method="jacobian"), apply_fn(p, xs)
        return ntkdyn.function_space(k[:4, :4], y, f0[:4], t, k_test_train=k[4:, :4], fx_test_0=f0[4:],
                                     diag_reg=0.01)

    for f, mean, cov in zip(jax.lax.map(linearized, params), (pred.mean_train, pred.mean_test),
                            (pred.cov_train, pred.cov_test)):
        sd = jnp.sqrt(jnp.diagonal(cov, axis1=1, axis2=2))  # (T, N)
        scale0 = sd[0].max()
        samples = seeds * outputs
        dev = f - f.mean(0)
        mc_cov = jnp.einsum("stik,stjk->tij", dev, dev) / (samples - 1)
        mean_err = jnp.abs(f.mean(0) - mean) - 5 * sd[..., None] / np.sqrt(seeds) - 4 / width * scale0
        cov_se = jnp.sqrt((sd[:, :, None] ** 2 * sd[:, None, :] ** 2 + cov**2) / samples)
        cov_err = jnp.abs(mc_cov - cov) - 5 * cov_se - 4 / width * scale0**2
        assert mean_err.max() <= 0 and cov_err.max() <= 0, (mean_err.max(), cov_err.max())


def test_singular_kernel_and_infinite_time_give_no_nan():
    x, xt, y = _data()
    x = x.at[1].set(x[0])  # duplicated input, conflicting targets
    y = y.at[1].set(y[0] + 1.0)
    model = _spec(models.MLP, 3, 1, width=8, depth=2, activation="relu")
    for t in (jnp.inf, 1e26, jnp.array([0.0, 1e3, jnp.inf])):
        pred = infinite.predict(model, x, y, t, x_test=xt)
        for a in (pred.mean_train, pred.mean_test, pred.cov_train, pred.cov_test):
            assert np.all(np.isfinite(a))
    # the duplicated pair converges to the mean of its targets; the others to their targets
    final = infinite.predict(model, x, y, jnp.inf).mean_train
    np.testing.assert_allclose(final[0], 0.5 * (y[0] + y[1]), atol=1e-8)
    np.testing.assert_allclose(final[2:], y[2:], atol=1e-8)


def test_predict_under_jit_and_traced_invalid_values_give_nan():
    x, xt, y = _data()
    model = _spec(models.MLP, 3, 1, width=8, depth=1, activation="erf")
    t = jnp.array([1.0, 10.0])
    eager = infinite.predict(model, x, y, t, x_test=xt, learning_rate=0.5)
    fn = jax.jit(lambda lr: infinite.predict(model, x, y, t, x_test=xt, learning_rate=lr))
    np.testing.assert_allclose(fn(0.5).cov_test, eager.cov_test, rtol=1e-10)
    bad = fn(-1.0)
    assert np.all(np.isnan(bad.mean_test)) and np.all(np.isnan(bad.cov_train))


def test_inside_band():
    mean = jnp.zeros((2, 3, 1))
    cov = jnp.broadcast_to(jnp.diag(jnp.array([1.0, 4.0, 0.0])), (2, 3, 3))
    values = jnp.array([[[1.9], [4.1], [0.0]], [[-2.1], [-3.9], [1e-3]]])
    inside = infinite.inside_band(mean, cov, values)
    np.testing.assert_array_equal(inside[..., 0], [[True, False, True], [False, True, False]])
    with pytest.raises(ValueError, match="values"):
        infinite.inside_band(mean, cov, values[:, :2])
    with pytest.raises(ValueError, match="cov"):
        infinite.inside_band(mean, cov[:, :2], values)


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #


def test_unsupported_models_are_named():
    x = _inputs((3, 3))
    with pytest.raises(TypeError, match="model: .*MLP and ntkdyn.models.CNN.*Model adapter"):
        infinite.kernels(models.mlp(3)[0], x)
    with pytest.raises(TypeError, match="model: .*got flax.nnx.*Linear"):
        infinite.kernels(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), x)
    with pytest.raises(TypeError, match="model: .*got builtins.function"):
        infinite.predict(lambda p, x: x, x, jnp.zeros((3, 1)), 1.0)
    model = _spec(models.MLP, 3, 1, width=4, depth=1)
    model.activation = "swish"
    with pytest.raises(ValueError, match="model: activation 'swish' is not supported"):
        infinite.kernels(model, x)


def test_mismatched_shapes_raise():
    model = _spec(models.MLP, 3, 1, width=4, depth=1)
    x = _inputs((4, 3))
    with pytest.raises(ValueError, match=r"x1: expected inputs of shape \(N, 3\)"):
        infinite.kernels(model, _inputs((4, 2)))
    with pytest.raises(ValueError, match="x2: expected inputs of shape"):
        infinite.kernels(model, x, _inputs((4, 5)))
    with pytest.raises(ValueError, match=r"x1: expected inputs of shape \(N, 5, 5, 2\)"):
        infinite.kernels(_spec(models.CNN, (5, 5, 2), 1, channels=(2,)), _inputs((2, 5, 4, 2)))
    with pytest.raises(ValueError, match="x_test: expected inputs of shape"):
        infinite.predict(model, x, jnp.zeros((4, 1)), 1.0, x_test=_inputs((2, 4)))
    with pytest.raises(ValueError, match="y: expected shape"):
        infinite.predict(model, x, jnp.zeros((3, 1)), 1.0)
    with pytest.raises(ValueError, match="x1: expected finite values"):
        infinite.kernels(model, x.at[0, 0].set(jnp.nan))


def test_bad_hyper_parameters_raise():
    model = _spec(models.MLP, 3, 1, width=4, depth=1)
    x, y = _inputs((4, 3)), jnp.zeros((4, 1))
    with pytest.raises(ValueError, match="get"):
        infinite.predict(model, x, y, 1.0, get="both")
    with pytest.raises(ValueError, match="time"):
        infinite.predict(model, x, y, 1.0, time="euler")
    with pytest.raises(ValueError, match="learning_rate"):
        infinite.predict(model, x, y, 1.0, learning_rate=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        infinite.predict(model, x, y, 1.0, diag_reg=-1.0)
    with pytest.raises(ValueError, match="t: expected times >= 0"):
        infinite.predict(model, x, y, -1.0)
    with pytest.raises(TypeError, match="covariance"):
        infinite.predict(model, x, y, 1.0, covariance="yes")
    with pytest.raises(ValueError, match="tile_size"):
        infinite.kernels(model, x, tile_size=0)
    with pytest.raises(ValueError, match="nngp_test_test"):
        infinite.ensemble(infinite.kernels(model, x), y, 1.0, k_test_train=infinite.kernels(model, x[:2], x))
    with pytest.raises(ValueError, match="k_train_train.ntk: expected a symmetric"):
        k = infinite.kernels(model, x)
        infinite.ensemble(k.replace(ntk=k.ntk + jnp.triu(jnp.ones((4, 4)), 1)), y, 1.0)
    with pytest.warns(ntkdyn.UnstableLearningRateWarning):
        lam = np.linalg.eigvalsh(infinite.kernels(model, x).ntk)[-1]
        infinite.predict(model, x, y, 3.0, time="discrete", learning_rate=3 * 4 / lam)


@pytest.mark.parametrize("bad", ["indefinite ntk", "asymmetric ntk", "indefinite nngp", "asymmetric nngp_test_test"])
def test_invalid_traced_kernels_give_nan_under_jit(bad):
    """ensemble under jit skips the eager kernel checks: an invalid kernel used to give finite numbers."""
    model = _spec(models.MLP, 3, 1, width=4, depth=1)
    x, xt = _inputs((4, 3)), _inputs((2, 3), seed=1)
    y = jnp.arange(4.0).reshape(4, 1)
    k, kst, kss = infinite.kernels(model, x), infinite.kernels(model, xt, x), infinite.kernels(model, xt).nngp

    def run(ntk, nngp, nngp_ss):
        return infinite.ensemble(k.replace(ntk=ntk, nngp=nngp), y, jnp.array([0.5, jnp.inf]), k_test_train=kst,
                                 nngp_test_test=nngp_ss)

    good = jax.jit(run)(k.ntk, k.nngp, kss)
    eager = run(k.ntk, k.nngp, kss)
    for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    top = float(np.linalg.eigvalsh(k.ntk)[-1])
    v = jnp.ones(4) / 2.0
    ntk, nngp, nngp_ss = k.ntk, k.nngp, kss
    if bad == "indefinite ntk":
        ntk = ntk - 1.5 * top * jnp.outer(v, v)
    elif bad == "asymmetric ntk":
        ntk = ntk + 0.3 * top * jnp.triu(jnp.ones((4, 4)), 1)
    elif bad == "indefinite nngp":
        nngp = nngp - 1.5 * float(np.linalg.eigvalsh(k.nngp)[-1]) * jnp.outer(v, v)
    else:
        nngp_ss = nngp_ss.at[0, 1].add(1.0)
    out = jax.jit(run)(ntk, nngp, nngp_ss)
    for name in ("mean_train", "mean_test", "cov_train", "cov_test"):
        assert bool(jnp.all(jnp.isnan(getattr(out, name)))), name
