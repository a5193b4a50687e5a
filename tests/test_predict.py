"""``ntkdyn.predict`` end to end, and the model builders it is usually given."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import ntkdyn
from ntkdyn import models


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (9, 4))
    return x, jnp.tanh(x[:, :2]), jax.random.normal(jax.random.key(1), (3, 4))


def test_predict_nnx_module_matches_the_parts(data):
    x, y, xt = data
    model = models.MLP(4, 2, width=32, depth=2, rngs=nnx.Rngs(3), dtype=jnp.float64)
    ts = jnp.array([0.0, 5.0, jnp.inf])
    pred = ntkdyn.predict(model, x, y, ts, x_test=xt, learning_rate=0.5, weights=True)
    f, p = models.as_apply_fn(model)
    k = ntkdyn.empirical_ntk(f, p, x)
    tr, te = ntkdyn.function_space(k, y, f(p, x), ts, k_test_train=ntkdyn.empirical_ntk(f, p, xt, x),
                                   fx_test_0=f(p, xt), learning_rate=0.5)
    np.testing.assert_allclose(pred.fx_train, tr, atol=1e-12)
    np.testing.assert_allclose(pred.fx_test, te, atol=1e-12)
    np.testing.assert_allclose(pred.fx_train[0], f(p, x), atol=1e-12)
    np.testing.assert_allclose(pred.ntk_train_train, k, atol=1e-12)
    assert pred.spectrum.eigenvalues.shape == (18,)
    lin = jax.vmap(ntkdyn.linearize(f, p), in_axes=(0, None))(pred.params, xt)
    np.testing.assert_allclose(lin, pred.fx_test, atol=1e-9)
    # the weights go back into the module
    nnx.update(model, jax.tree_util.tree_map(lambda a: a[1], pred.params))
    assert model(x).shape == (9, 2)


def test_predict_plain_and_linen_and_scalar_t(data):
    x, y, _ = data

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(2, param_dtype=jnp.float64)(jnp.tanh(linen.Dense(16, param_dtype=jnp.float64)(x)))

    net = Net()
    variables = net.init(jax.random.key(0), x)
    a = ntkdyn.predict(variables, x, y, 3.0, apply_fn=net.apply, weights=True)
    b = ntkdyn.predict(variables["params"], x, y, 3.0,
                       apply_fn=lambda p, z: net.apply({"params": p}, z), weights=True)
    assert a.fx_train.shape == (9, 2) and a.fx_test is None and a.t.shape == ()
    np.testing.assert_allclose(a.fx_train, b.fx_train, atol=1e-12)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), a.params, b.params)


def test_predict_traced_equals_full_when_single_output(data):
    x, y, xt = data
    f, p = models.mlp(4, 1, width=16, depth=1, dtype=jnp.float64)
    full = ntkdyn.predict(p, x, y[:, 0], 10.0, apply_fn=f, x_test=xt)
    traced = ntkdyn.predict(p, x, y[:, :1], 10.0, apply_fn=f, x_test=xt, trace_outputs=True)
    assert traced.ntk_train_train.shape == (9, 9)
    np.testing.assert_allclose(full.fx_test, traced.fx_test, atol=1e-12)


def test_prediction_is_a_pytree(data):
    x, y, _ = data
    f, p = models.mlp(4, 2, width=8, depth=1, dtype=jnp.float64)
    pred = ntkdyn.predict(p, x, y, jnp.array([1.0, 2.0]), apply_fn=f)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, pred)
    np.testing.assert_allclose(doubled.fx_train, 2 * pred.fx_train)
    assert doubled.time == "continuous"


def test_predict_bad_input(data):
    x, y, _ = data
    f, p = models.mlp(4, 2, width=8, depth=1, dtype=jnp.float64)
    with pytest.raises(TypeError, match="^apply_fn:"):
        ntkdyn.predict(p, x, y, 1.0)
    with pytest.raises(TypeError, match="^apply_fn:"):
        ntkdyn.predict(models.MLP(4, 2, width=8, rngs=nnx.Rngs(0)), x, y, 1.0, apply_fn=f)
    with pytest.raises(ValueError, match="^y:"):
        ntkdyn.predict(p, x, y[:, :1], 1.0, apply_fn=f)
    with pytest.raises(ValueError, match="^y:"):
        ntkdyn.predict(p, x, y.at[0, 0].set(jnp.inf), 1.0, apply_fn=f)
    with pytest.raises(ValueError, match="^x_test:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, x_test=jnp.full((2, 4), jnp.nan))
    with pytest.raises(ValueError, match="^x_test:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, x_test=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="^x:"):
        ntkdyn.predict(p, x.at[1, 1].set(jnp.nan), y, 1.0, apply_fn=f)
    with pytest.raises(ValueError, match="^t:"):
        ntkdyn.predict(p, x, y, -2.0, apply_fn=f)
    with pytest.raises(ValueError, match="^time:"):
        ntkdyn.predict(p, x, y, 1.0, apply_fn=f, time="later")
    with pytest.raises(ValueError, match="^x:"):
        ntkdyn.predict(p, jnp.zeros((0, 4)), y[:0], 1.0, apply_fn=f)


def test_errors_name_the_users_arguments_not_internal_ones(data):
    """A kernel predict computed itself failed with 'k_train_train: ...', an argument the user never passed;
    a 2-row Krylov call of a function that always returns 9 rows gave a reshape crash."""
    x, y, _ = data

    def net(p, xx):
        return jnp.tanh(xx @ p["w1"]) @ p["w2"]

    big = {"w1": jnp.full((4, 3), 0.1, jnp.float32), "w2": jnp.full((3, 2), 1e20, jnp.float32)}
    with pytest.raises(ValueError, match="^params: the empirical NTK computed from params on x failed its check "
                                         r"\(expected finite values"):
        ntkdyn.predict(big, x.astype(jnp.float32), y.astype(jnp.float32), 1.0, apply_fn=net, solver="eigh")
    nine_rows = lambda p, xx: jnp.broadcast_to(jnp.tanh(xx[:1] @ p["w1"]) @ p["w2"], (9, 2))  # noqa: E731
    small = {"w1": jnp.full((4, 3), 0.1), "w2": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 2: output has 9 rows"):
        ntkdyn.predict(small, x, y, 1.0, apply_fn=nine_rows, solver="krylov", tile_size=2)


@pytest.mark.parametrize("solver", ["eigh", "krylov"])
def test_numpy_and_jax_scalars_for_every_option(data, solver):
    x, y, xt = data
    f, p = models.mlp(4, 2, width=8, depth=1, dtype=jnp.float64)
    extra = dict(max_iter=jnp.asarray(18), tile_size=np.int64(3)) if solver == "krylov" else dict(tile_size=np.array(4))
    got = ntkdyn.predict(p, x, y, jnp.float32(3.0), apply_fn=f, x_test=xt, learning_rate=np.float32(0.5),
                         diag_reg=jnp.asarray(0.01), rcond=jnp.float32(1e-12), solver=solver, **extra)
    extra = dict(max_iter=18, tile_size=3) if solver == "krylov" else dict(tile_size=4)
    ref = ntkdyn.predict(p, x, y, 3.0, apply_fn=f, x_test=xt, learning_rate=0.5, diag_reg=0.01,
                         rcond=float(jnp.float32(1e-12)), solver=solver, **extra)
    np.testing.assert_allclose(got.fx_test, ref.fx_test, rtol=1e-6, atol=1e-9)


class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.count += 1


def _compiles(fn):
    """How many XLA compilations ``fn()`` triggers."""
    counter = _CompileCounter()
    loggers = [logging.getLogger(name) for name in ("jax._src.interpreters.pxla", "jax._src.dispatch")]
    for logger in loggers:
        logger.addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    try:
        fn()
    finally:
        jax.config.update("jax_log_compiles", False)
        for logger in loggers:
            logger.removeHandler(counter)
    return counter.count


@pytest.mark.parametrize("solver", ["eigh", "krylov"])
def test_repeated_predict_reuses_compiled_programs(data, solver):
    """A second module of the same architecture (other weights) runs the programs compiled for the first."""
    x, y, xt = data
    first = models.MLP(4, 2, width=8, depth=1, rngs=nnx.Rngs(0), dtype=jnp.float64)
    second = models.MLP(4, 2, width=8, depth=1, rngs=nnx.Rngs(1), dtype=jnp.float64)
    f1, _ = models.as_apply_fn(first)
    f2, _ = models.as_apply_fn(second)
    assert jax.tree_util.tree_structure(f1) == jax.tree_util.tree_structure(f2)  # the graph is the static part
    ts = jnp.array([1.0, 10.0])
    kw = dict(x_test=xt, weights=True, solver=solver)
    a = ntkdyn.predict(first, x, y, ts, **kw)
    assert _compiles(lambda: ntkdyn.predict(second, x, y, ts, **kw)) == 0
    b = ntkdyn.predict(second, x, y, ts, **kw)
    assert not np.allclose(a.fx_test, b.fx_test)  # a separate, correct answer for the other weights
    k = ntkdyn.empirical_ntk(f2, models.as_apply_fn(second)[1], x)
    np.testing.assert_allclose(b.fx_train, ntkdyn.function_space(k, y, f2(models.as_apply_fn(second)[1], x), ts)[0],
                               atol=1e-7)


# --------------------------------------------------------------------------- #
# builders
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_ntk_and_standard_parameterization_compute_the_same_function(activation):
    """Standard weights = NTK weights scaled by σ_w/√fan_in (σ_b for biases): same outputs."""
    x = jax.random.normal(jax.random.key(0), (5, 6))
    ntk = models.MLP(6, 3, width=20, depth=2, activation=activation, rngs=nnx.Rngs(0), dtype=jnp.float64)
    std = models.MLP(6, 3, width=20, depth=2, activation=activation, parameterization="standard",
                     rngs=nnx.Rngs(0), dtype=jnp.float64)
    for ln, ls in zip(list(ntk.hidden) + [ntk.readout], list(std.hidden) + [std.readout]):
        ls.kernel[...] = ln.kernel[...] * ln.w_mult
        ls.bias[...] = ln.bias[...] * ln.b_mult
    np.testing.assert_allclose(ntk(x), std(x), atol=1e-12)


def test_ntk_parameterization_init_statistics():
    m = models.MLP(10, 1, width=2048, depth=1, rngs=nnx.Rngs(0), dtype=jnp.float64)
    w = np.asarray(m.hidden[0].kernel[...])
    assert abs(w.std() - 1.0) < 0.02 and abs(w.mean()) < 0.02
    s = models.MLP(10, 1, width=2048, depth=1, parameterization="standard", sigma_w=2.0,
                   rngs=nnx.Rngs(0), dtype=jnp.float64)
    assert abs(np.asarray(s.hidden[0].kernel[...]).std() - 2.0 / np.sqrt(10)) < 0.02


def test_cnn_shapes_and_strides():
    f, p = models.cnn((8, 8, 3), 10, channels=(4, 5), strides=2, padding="VALID", dtype=jnp.float64)
    assert f(p, jnp.ones((2, 8, 8, 3))).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(activation="swish9"), "activation"),
        (dict(parameterization="mup"), "parameterization"),
        (dict(width=0), "width"),
        (dict(depth=-1), "depth"),
    ],
)
def test_builder_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        models.MLP(3, 1, rngs=nnx.Rngs(0), **kwargs)
