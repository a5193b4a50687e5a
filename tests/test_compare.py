"""compare(): real training beside Eq. 8/9/10, float64.

Oracles: a linear model (linearization exact, so every gap is round-off and
the kernel never moves); for an MLP, each reported array is recomputed from
its definition with independent calls (train, function_space,
parameter_space, empirical_ntk).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import CompileCounter

import ntkdyn
from ntkdyn import models
from ntkdyn.experiments.compare import Comparison, compare, layer_groups
from ntkdyn.experiments.train import train


def linear_apply(params, x):
    return x @ params["W"] + params["b"]


def data(n=8, d=3, k=2, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((n, k)), rng.standard_normal((n_test, d)), \
        rng.standard_normal((n_test, k))


@pytest.mark.parametrize("momentum", [0.0, 0.8])
def test_linear_model_every_gap_is_round_off(momentum):
    x, y, xt, yt = data()
    rng = np.random.default_rng(1)
    params = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    c = compare(linear_apply, params, x, y, steps=40, learning_rate=0.5, lr_relative=True, momentum=momentum,
                x_test=xt, y_test=yt, record_at=[0, 1, 5, 40])
    assert isinstance(c, Comparison)
    for side in (c.train, c.test):
        for gap in (side.gap, side.eq8_gap, side.consistency):
            assert float(jnp.max(gap)) < 1e-10
    assert float(jnp.max(c.weights.gap)) < 1e-9
    assert float(c.kernel_drift) < 1e-12
    np.testing.assert_allclose(c.loss.train, c.loss.train_lin, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(c.loss.test, c.loss.test_lin, rtol=1e-9)
    s = c.summary()
    assert s["lr_ratio"] == pytest.approx(0.5) and not s["linear_diverged"] and not s["real_diverged"]
    assert s["learning_rate"] == pytest.approx(0.5 * float(c.max_learning_rate))


def test_traced_kernel_path_on_a_model_where_it_is_exact():
    """x W + b has Θ_full = (x·x' + 1) ⊗ I_K, so the output-traced kernel loses nothing."""
    x, y, xt, yt = data(k=3)
    rng = np.random.default_rng(4)
    params = {"W": rng.standard_normal((3, 3)), "b": rng.standard_normal(3)}
    c = compare(linear_apply, params, x, y, steps=20, learning_rate=0.7, lr_relative=True, x_test=xt, y_test=yt,
                record_at=[0, 4, 20], trace_outputs=True)
    assert float(jnp.max(c.test.gap)) < 1e-10 and float(jnp.max(c.train.consistency)) < 1e-10
    k_full = ntkdyn.empirical_ntk(linear_apply, params, x)
    np.testing.assert_allclose(c.max_learning_rate, ntkdyn.max_learning_rate(k_full), rtol=1e-10)


@pytest.fixture(scope="module")
def mlp_case():
    apply_fn, params = models.mlp(3, 2, width=24, depth=2, seed=0)
    x, y, xt, yt = data()
    rec = [0, 1, 3, 10, 60]
    c = compare(apply_fn, params, x, y, steps=60, learning_rate=1.0, x_test=xt, y_test=yt, record_at=rec)
    return apply_fn, params, x, y, xt, yt, rec, c


def test_mlp_arrays_match_their_definitions(mlp_case):
    apply_fn, params, x, y, xt, yt, rec, c = mlp_case
    real = train(apply_fn, params, x, y, steps=60, learning_rate=1.0, record_at=rec, x_test=xt, keep_params=True)
    np.testing.assert_allclose(c.train.real, real.fx_train, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c.loss.train, real.loss, rtol=1e-10, atol=1e-14)
    k = ntkdyn.empirical_ntk(apply_fn, params, x)
    kt = ntkdyn.empirical_ntk(apply_fn, params, xt, x)
    t = jnp.asarray(rec, float)
    f0, f0t = apply_fn(params, x), apply_fn(params, xt)
    lin, lin_t = ntkdyn.function_space(k, y, f0, t, k_test_train=kt, fx_test_0=f0t, learning_rate=1.0,
                                       time="discrete")
    np.testing.assert_allclose(c.train.lin, lin, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c.test.lin, lin_t, rtol=1e-9, atol=1e-10)
    theta = ntkdyn.parameter_space(apply_fn, params, x, y, t, k_train_train=k, learning_rate=1.0, time="discrete")
    f_at = jax.vmap(apply_fn, in_axes=(0, None))
    np.testing.assert_allclose(c.test.eq8, f_at(theta, xt), rtol=1e-9, atol=1e-10)
    f_lin = jax.vmap(ntkdyn.linearize(apply_fn, params), in_axes=(0, None))
    np.testing.assert_allclose(c.train.lin_eq8, f_lin(theta, x), rtol=1e-9, atol=1e-10)

    # metric definitions
    d_test = np.linalg.norm(f0t - yt)
    gap = np.linalg.norm((real.fx_test - lin_t).reshape(len(rec), -1), axis=1) / d_test
    np.testing.assert_allclose(c.test.gap, gap, rtol=1e-8, atol=1e-12)
    names, layer_of_leaf = layer_groups(params)
    leaves0 = jax.tree_util.tree_leaves(params)
    leaves_t = jax.tree_util.tree_leaves(real.params)
    leaves_8 = jax.tree_util.tree_leaves(theta)
    for li in range(len(names)):
        idx = [i for i, l in enumerate(layer_of_leaf) if l == li]
        d_real = np.sqrt(sum(np.sum((leaves_t[i] - leaves0[i][None]) ** 2, axis=tuple(range(1, leaves0[i].ndim + 1)))
                             for i in idx))
        d_gap = np.sqrt(sum(np.sum((leaves_t[i] - leaves_8[i]) ** 2, axis=tuple(range(1, leaves0[i].ndim + 1)))
                            for i in idx))
        norm0 = np.sqrt(sum(np.sum(leaves0[i] ** 2) for i in idx))
        np.testing.assert_allclose(c.weights.change[:, li], d_real / norm0, rtol=1e-8, atol=1e-14)
        ok = d_real > 0
        # step 1 is exact up to round-off (≈1e-15), so compare with an absolute floor
        np.testing.assert_allclose(c.weights.gap_layers[ok, li], d_gap[ok] / d_real[ok], rtol=1e-6, atol=1e-12)
    k_end = ntkdyn.empirical_ntk(apply_fn, c.final_params, x)
    drift = np.linalg.norm(k_end - k) / np.linalg.norm(k)
    np.testing.assert_allclose(c.kernel_drift, drift, rtol=1e-8)


def test_mlp_numerics_column_and_first_step(mlp_case):
    *_, c = mlp_case
    # f_lin at the Eq. 8 weights is the function-space answer to round-off, at any width
    assert float(jnp.max(c.train.consistency)) < 1e-10
    assert float(jnp.max(c.test.consistency)) < 1e-10
    # one discrete step of real GD is the linearized step exactly
    assert float(c.weights.gap[1]) < 1e-9
    assert float(c.train.gap[0]) < 1e-12
    # the network is nonlinear: a finite gap later on, and the kernel moved
    assert float(jnp.max(c.train.gap)) > 1e-6 and float(c.kernel_drift) > 1e-6
    assert c.layer_names == ("hidden.0", "hidden.1", "readout")


def test_discrepancy_falls_with_width():
    """Width 16 → 1024 (64×): the test discrepancy shrinks ≈ 10× here (≈ 1/width expected); ask for 3×."""
    x, y, xt, yt = data(n=8, d=4, k=1, n_test=8, seed=3)
    gaps = {}
    for width in (16, 1024):
        apply_fn, params = models.mlp(4, 1, width=width, depth=1, seed=0)
        c = compare(apply_fn, params, x, y, steps=60, learning_rate=0.5, lr_relative=True, x_test=xt,
                    y_test=yt, record_at=[0, 10, 60])
        gaps[width] = c.summary()["test_gap"]
    assert gaps[1024] < gaps[16] / 3


def test_above_the_stability_limit_reports_instead_of_crashing():
    apply_fn, params = models.mlp(3, 1, width=32, depth=1, seed=0)
    x, y, xt, yt = data(k=1)
    with pytest.warns(ntkdyn.UnstableLearningRateWarning, match="above max_learning_rate"):
        c = compare(apply_fn, params, x, y, steps=200, learning_rate=1.5, lr_relative=True, x_test=xt, y_test=yt,
                    record_at=[0, 1, 50, 200])
    s = c.summary()
    assert s["linear_diverged"] and s["lr_ratio"] == pytest.approx(1.5)
    # |1 − ηλ_max/n| = 2 per step: 2^200 ≈ 1e60 in float64 (inf in float32)
    assert s["test_gap"] > 1e20 and s["loss_lin_final"] > 1e20
    assert np.isfinite(s["loss_final"]) or s["real_diverged"]
    assert all(isinstance(v, (float, bool)) for v in s.values())


def test_continuous_time_and_momentum():
    apply_fn, params = models.mlp(3, 2, width=16, depth=1, seed=2)
    x, y, xt, yt = data()
    c = compare(apply_fn, params, x, y, steps=30, learning_rate=0.2, time="continuous", x_test=xt,
                record_at=[0, 30])
    # Eq. 8 and Eq. 9/10 agree in continuous time too; y_test absent: test gap still defined
    assert float(jnp.max(c.test.consistency)) < 1e-10 and c.loss.test is None
    assert np.isfinite(c.summary()["test_gap"])
    with pytest.raises(ValueError, match="time"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=0.1, momentum=0.5, time="continuous")


def test_bad_arguments():
    apply_fn, params = models.mlp(3, 2, width=4, depth=1, seed=0)
    x, y, xt, yt = data()
    with pytest.raises(ValueError, match="y_test"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=0.1, y_test=yt)
    with pytest.raises(ValueError, match="y_test"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=0.1, x_test=xt, y_test=yt[:, :1])
    with pytest.raises(ValueError, match="momentum"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="time"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=0.1, time="sometimes")
    with pytest.raises(ValueError, match="learning_rate"):
        compare(apply_fn, params, x, y, steps=3, learning_rate=-1.0)


def linear_case(k=2):
    x, y, xt, yt = data(k=k)
    rng = np.random.default_rng(1)
    return {"W": rng.standard_normal((3, k)), "b": rng.standard_normal(k)}, x, y, xt, yt


def message_of(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("diag_reg", [-0.5, np.nan, np.inf])
def test_diag_reg_is_checked_before_the_jitted_solve_with_the_solvers_message(diag_reg):
    """issue 13 item 3: compare's solve runs under jit, so compare checks diag_reg eagerly itself."""
    params, x, y, xt, yt = linear_case()
    k = ntkdyn.empirical_ntk(linear_apply, params, x)
    expected = message_of(lambda: ntkdyn.function_space(k, y, linear_apply(params, x), 1.0, diag_reg=diag_reg))
    got = message_of(lambda: compare(linear_apply, params, x, y, steps=3, learning_rate=0.1, x_test=xt,
                                     y_test=yt, diag_reg=diag_reg))
    assert got == expected and got.startswith("diag_reg: ")
    with pytest.raises(TypeError, match="^diag_reg"):
        compare(linear_apply, params, x, y, steps=3, learning_rate=0.1, diag_reg=None)


def test_non_finite_inputs_are_errors_naming_the_users_argument():
    """NaN in params / inputs / test targets: an error, not inf metrics read as divergence."""
    params, x, y, xt, yt = linear_case()
    nan_params = {"W": params["W"].copy(), "b": params["b"]}
    nan_params["W"][0, 0] = np.nan
    expected = message_of(lambda: ntkdyn.parameter_space(linear_apply, nan_params, x, y, 1.0))
    assert message_of(lambda: compare(linear_apply, nan_params, x, y, steps=3, learning_rate=0.1)) == expected
    assert expected.startswith("params0: expected finite values")
    bad_x, bad_yt = x.copy(), yt.copy()
    bad_x[2, 1], bad_yt[0, 0] = np.inf, np.nan
    with pytest.raises(ValueError, match="^x_train: expected finite values"):
        compare(linear_apply, params, bad_x, y, steps=3, learning_rate=0.1)
    with pytest.raises(ValueError, match="^y_test: expected finite values"):
        compare(linear_apply, params, x, y, steps=3, learning_rate=0.1, x_test=xt, y_test=bad_yt)
    with pytest.raises(ValueError, match="^x_test: expected finite values"):
        compare(linear_apply, params, x, y, steps=3, learning_rate=0.1, x_test=np.full_like(xt, np.nan))


def test_kernel_overflow_and_bad_batch_sizes_name_the_users_arguments():
    """Finite float32 params whose Jacobian overflows: inf metrics came back (read as divergence). A model right
    on X only crashed inside the program on the X ∪ X* batch the kernel is computed on."""
    x, y, xt, _ = data(k=2)

    def net(p, xx):
        return jnp.tanh(xx @ p["w1"]) @ p["w2"]

    big = {"w1": jnp.full((3, 4), 0.1, jnp.float32), "w2": jnp.full((4, 2), 1e20, jnp.float32)}
    with pytest.raises(ValueError, match="^params0: expected parameters whose NTK on x_train is finite"):
        compare(net, big, x.astype(np.float32), y.astype(np.float32), steps=2, learning_rate=1e-3,
                record_at=[0, 2])
    params, x, y, xt, yt = linear_case()
    fixed = lambda p, xx: linear_apply(p, xx).reshape(x.shape[0], -1)  # noqa: E731  -- only N rows work
    with pytest.raises(ValueError, match=rf"^apply_fn: expected apply_fn.* on a batch of {xt.shape[0]}:"):
        compare(fixed, params, x, y, steps=2, learning_rate=0.1, x_test=xt, y_test=yt, record_at=[0, 2])


@pytest.mark.parametrize("lr", [np.float64(0.25), jnp.float32(0.25), jnp.asarray(0.25), np.int64(1)])
def test_numpy_and_jax_scalar_learning_rates_give_the_python_float_answer(lr):
    """issue 13 item 7 (the settings of test_linear_model_every_gap_is_round_off: one compilation)."""
    params, x, y, xt, yt = linear_case()
    kw = dict(steps=40, x_test=xt, y_test=yt, record_at=[0, 1, 5, 40], lr_relative=True)
    ref = compare(linear_apply, params, x, y, learning_rate=float(lr), **kw)
    got = compare(linear_apply, params, x, y, learning_rate=lr, **kw)
    np.testing.assert_array_equal(got.loss.train, ref.loss.train)
    np.testing.assert_array_equal(got.test.lin, ref.test.lin)
    assert got.summary() == ref.summary()


def test_one_compiled_program_per_architecture(mlp_case):
    """Another module of the same architecture, other rates, regularizer, data and recorded steps: no compile."""
    _, _, x, y, xt, yt, rec, first = mlp_case  # the architecture and settings of mlp_case: compiled there
    f2, p2 = models.mlp(3, 2, width=24, depth=2, seed=7)
    with CompileCounter() as compiles:
        second = compare(f2, p2, 2 * x, y, steps=60, learning_rate=jnp.float32(0.5), x_test=xt, y_test=-yt,
                         record_at=[0, 2, 4, 30, 60], diag_reg=1e-3)
    assert compiles.count == 0
    assert first.summary()["test_gap"] != second.summary()["test_gap"]


def test_comparison_is_a_pytree_of_grouped_results():
    params, x, y, xt, yt = linear_case()
    c = compare(linear_apply, params, x, y, steps=40, learning_rate=0.3, lr_relative=True, x_test=xt, y_test=yt,
                record_at=[0, 1, 5, 40])
    assert len(dataclasses.fields(Comparison)) < 28
    leaves = jax.tree_util.tree_leaves(c)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    same = jax.tree_util.tree_map(lambda a: a, c)
    assert isinstance(same, Comparison) and same.layer_names == ("W", "b") and same.time == "discrete"
    assert c.train.real.shape == (4, 8, 2) and c.test.gap.shape == (4,) and c.weights.change.shape == (4, 2)


def test_layer_groups():
    _, params = models.mlp(3, 2, width=4, depth=2, seed=0)
    names, index = layer_groups(params)
    assert names == ("hidden.0", "hidden.1", "readout") and len(index) == 6
    assert layer_groups({"w": np.ones(2), "b": np.ones(1)}) == (("b", "w"), (0, 1))
