"""Real training (ntkdyn.experiments.train) against hand-written oracles, float64 unless stated.

Oracles: plain NumPy loops of full-batch GD, shuffled minibatch SGD and
heavy-ball momentum on a linear model, whose gradient ``Xᵀ(XW + b − Y)/n``
is written out by hand (no autodiff in the oracle).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntkdyn import models
from ntkdyn.experiments.train import TrainResult, default_record_steps, mse_loss, train


def linear_apply(params, x):
    return x @ params["W"] + params["b"]


def problem(n=9, d=3, k=2, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, k))
    xt = rng.standard_normal((n_test, d))
    params = {"W": rng.standard_normal((d, k)), "b": 0.3 * rng.standard_normal(k)}
    return params, x, y, xt


def numpy_gd(params, x, y, lr, steps, momentum=0.0, batches=None):
    """Hand-derived (minibatch) GD / heavy ball on L = ‖XW + b − Y‖²/(2·B·K); returns per-step W, b, loss."""
    w, b = params["W"].copy(), params["b"].copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    hist = []
    for s in range(steps + 1):
        r_full = x @ w + b - y
        hist.append((w.copy(), b.copy(), 0.5 * np.mean(r_full**2)))
        if s == steps:
            break
        idx = np.arange(x.shape[0]) if batches is None else batches[s]
        xb, r = x[idx], (x[idx] @ w + b - y[idx])
        scale = 1.0 / r.size
        gw, gb = scale * xb.T @ r, scale * r.sum(axis=0)
        vw, vb = momentum * vw + gw, momentum * vb + gb
        w, b = w - lr * vw, b - lr * vb
    return hist


def test_full_batch_gd_matches_numpy_loop_every_step():
    params, x, y, xt = problem()
    steps, lr = 30, 0.7
    rec = [0, 1, 2, 7, 30]
    res = train(linear_apply, params, x, y, steps=steps, learning_rate=lr, record_at=rec, x_test=xt, keep_params=True)
    hist = numpy_gd(params, x, y, lr, steps)
    assert isinstance(res, TrainResult)
    np.testing.assert_array_equal(res.steps, rec)
    np.testing.assert_allclose(res.loss, [h[2] for h in hist], rtol=1e-12, atol=1e-14)
    for i, s in enumerate(rec):
        w, b, _ = hist[s]
        np.testing.assert_allclose(res.params["W"][i], w, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(res.fx_train[i], x @ w + b, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(res.fx_test[i], xt @ w + b, rtol=1e-12, atol=1e-13)
    final_w, final_b, _ = hist[-1]
    np.testing.assert_allclose(res.final_params["W"], final_w, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res.final_params["b"], final_b, rtol=1e-12, atol=1e-13)


def test_minibatch_sgd_follows_shuffled_epochs():
    params, x, y, _ = problem(n=12)
    steps, lr, bs, seed = 14, 0.5, 4, 3
    per_epoch = 12 // bs
    batches = []
    for s in range(steps):
        epoch, pos = divmod(s, per_epoch)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), 12))
        batches.append(perm[pos * bs:(pos + 1) * bs])
    # shuffling, not sampling with replacement: each epoch visits every example once
    for e in range(steps // per_epoch):
        seen = np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])
        assert sorted(seen) == list(range(12))
    res = train(linear_apply, params, x, y, steps=steps, learning_rate=lr, batch_size=bs, seed=seed,
                record_at=range(steps + 1), keep_params=True)
    hist = numpy_gd(params, x, y, lr, steps, batches=batches)
    np.testing.assert_allclose(res.params["W"], np.stack([h[0] for h in hist]), rtol=1e-12, atol=1e-13)
    # the loss curve is the full training-set loss, not the batch's
    np.testing.assert_allclose(res.loss, [h[2] for h in hist], rtol=1e-12, atol=1e-14)
    other = train(linear_apply, params, x, y, steps=steps, learning_rate=lr, batch_size=bs, seed=seed + 1)
    assert not np.allclose(other.final_params["W"], res.final_params["W"])


def test_heavy_ball_momentum_optimizer_matches_numpy_loop():
    params, x, y, _ = problem()
    steps, lr, beta = 25, 0.3, 0.8
    res = train(linear_apply, params, x, y, steps=steps, learning_rate=lr,
                optimizer=optax.sgd(lr, momentum=beta), record_at=[0, 5, 25], keep_params=True)
    hist = numpy_gd(params, x, y, lr, steps, momentum=beta)
    for i, s in enumerate([0, 5, 25]):
        np.testing.assert_allclose(res.params["W"][i], hist[s][0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res.loss, [h[2] for h in hist], rtol=1e-11, atol=1e-14)


def test_record_fn_is_evaluated_at_recorded_steps():
    params, x, y, _ = problem()
    rec = [3, 0, 10, 3]  # unsorted with a duplicate: recorded sorted and once
    record_fn = lambda p: {"norm": jnp.sum(p["W"] ** 2), "b": p["b"]}
    res = train(linear_apply, params, x, y, steps=10, learning_rate=0.4, record_at=rec,
                keep_params=True, record_fn=record_fn)
    np.testing.assert_array_equal(res.steps, [0, 3, 10])
    np.testing.assert_allclose(res.records["norm"], jnp.sum(res.params["W"] ** 2, axis=(1, 2)), rtol=1e-13)
    np.testing.assert_allclose(res.records["b"], res.params["b"], rtol=1e-13)
    # step 0 is θ₀ itself
    np.testing.assert_allclose(res.fx_train[0], linear_apply(params, x), rtol=1e-13)


def test_default_record_steps_include_zero_and_end():
    res = train(linear_apply, problem()[0], *problem()[1:3], steps=200, learning_rate=0.1)
    steps = np.asarray(res.steps)
    assert steps[0] == 0 and steps[-1] == 200 and np.all(np.diff(steps) > 0)
    assert res.fx_train.shape == (steps.size, 9, 2) and res.fx_test is None and res.params is None
    assert res.loss.shape == (201,)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(0, 10**6), num=st.integers(2, 40))
def test_default_record_steps_property(steps, num):
    s = default_record_steps(steps, num)
    assert s[0] == 0 and s[-1] == steps
    assert np.all(np.diff(s) > 0) and s.size <= num + 1
    if steps >= 10 * num:
        # log spacing: the early steps are resolved
        assert 1 in s


def test_float32_path_keeps_dtype_and_learns():
    """float32 arrays in, float32 out (the session runs with x64 on); a nonlinear net learns.

    η = 2.5 is below this net's 2n/λ_max ≈ 5.6; 200 steps cut the loss ≈ 18× (ask for 8×).
    """
    rng = np.random.default_rng(0)
    params = {"W1": jnp.asarray(rng.standard_normal((4, 32)), jnp.float32),
              "W2": jnp.asarray(rng.standard_normal((32, 1)), jnp.float32)}
    apply_fn = lambda p, x: jnp.tanh(x @ p["W1"] / 2.0) @ p["W2"] / np.float32(np.sqrt(32))
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 1)), jnp.float32)
    res = train(apply_fn, params, x, y, steps=200, learning_rate=2.5, record_at=[0, 200])
    assert res.fx_train.dtype == jnp.float32 and res.loss.dtype == jnp.float32
    assert res.final_params["W1"].dtype == jnp.float32
    assert res.loss[-1] < res.loss[0] / 8
    np.testing.assert_allclose(res.loss[0], mse_loss(apply_fn(params, x), y), rtol=1e-6)


def test_divergent_training_returns_non_finite_values_without_raising():
    params, x, y, _ = problem()
    res = train(linear_apply, params, x, y, steps=400, learning_rate=500.0, record_at=[0, 400])
    assert not np.isfinite(np.asarray(res.loss[-1]))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(steps=-1, learning_rate=0.1), ValueError, "^steps"),
        (dict(steps=1.5, learning_rate=0.1), TypeError, "^steps"),
        (dict(steps=5, learning_rate=0.0), ValueError, "^learning_rate"),
        (dict(steps=5, learning_rate=math.nan), ValueError, "^learning_rate"),
        (dict(steps=5, learning_rate=jnp.float32(-0.1)), ValueError, "^learning_rate"),
        (dict(steps=5, learning_rate=None), ValueError, "^learning_rate"),
        (dict(steps=5, learning_rate="0.1"), TypeError, "^learning_rate"),
        (dict(steps=5, learning_rate=0.1, batch_size=10), ValueError, "^batch_size"),
        (dict(steps=5, learning_rate=0.1, batch_size=0), ValueError, "^batch_size"),
        (dict(steps=5, learning_rate=0.1, record_at=[0, 6]), ValueError, "^record_at"),
        (dict(steps=5, learning_rate=0.1, record_at=[]), ValueError, "^record_at"),
        (dict(steps=5, learning_rate=0.1, record_at=[0.5]), ValueError, "^record_at"),
        (dict(steps=5, learning_rate=0.1, seed=-1), ValueError, "^seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    params, x, y, _ = problem()
    with pytest.raises(error, match=match):
        train(linear_apply, params, x, y, **kwargs)


@pytest.mark.parametrize("lr", [jnp.float32(0.4), np.float64(0.4), jnp.asarray(0.4), np.int64(1)])
def test_numpy_and_jax_scalar_learning_rates_are_accepted(lr):
    """issue 13 item 7: the same answer as the Python float (optax gets a float)."""
    params, x, y, _ = problem()
    ref = train(linear_apply, params, x, y, steps=6, learning_rate=float(lr), record_at=[0, 6])
    got = train(linear_apply, params, x, y, steps=6, learning_rate=lr, record_at=[0, 6])
    np.testing.assert_array_equal(got.loss, ref.loss)


@pytest.mark.parametrize("kind", [np.int64, np.array, jnp.asarray, jnp.int32])
def test_numpy_and_jax_integers_for_steps_seed_and_batch_size(kind):
    params, x, y, _ = problem()
    ref = train(linear_apply, params, x, y, steps=4, learning_rate=0.1, seed=2, batch_size=3, record_at=[0, 4])
    got = train(linear_apply, params, x, y, steps=kind(4), learning_rate=0.1, seed=kind(2), batch_size=kind(3),
                record_at=[0, 4])
    np.testing.assert_array_equal(got.loss, ref.loss)


def test_test_inputs_must_map_to_one_output_row_each():
    """f(θ, X*) is recorded: a model right on X's row count only gave wrong-shaped (or crashing) records."""
    params, x, y, xt = problem()
    nine_rows = lambda p, xx: jnp.broadcast_to(linear_apply(p, xx[:1]), (9, 2))  # noqa: E731
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 5: output has 9 rows"):
        train(nine_rows, params, x, y, steps=2, learning_rate=0.1, x_test=xt)


def test_nan_in_params_or_data_is_an_error_naming_it():
    params, x, y, xt = problem()
    bad = {**params, "b": params["b"].copy()}
    bad["b"][0] = np.nan
    with pytest.raises(ValueError, match="^params0: expected finite values"):
        train(linear_apply, bad, x, y, steps=2, learning_rate=0.1)
    with pytest.raises(ValueError, match="^y_train: expected finite values"):
        train(linear_apply, params, x, np.where(np.eye(9, 2) > 0, np.nan, y), steps=2, learning_rate=0.1)
    with pytest.raises(ValueError, match="^x_test: expected finite values"):
        train(linear_apply, params, x, y, steps=2, learning_rate=0.1, x_test=np.full_like(xt, np.inf))


class CompileCounter:
    """Counts XLA compilations (jax.monitoring events) inside a ``with`` block."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_two_modules_of_one_architecture_share_one_compilation():
    """The model is a traced pytree: another seed, rate, data of the same shape or record list reuse the loop."""
    f1, p1 = models.mlp(3, 2, width=8, depth=1, seed=0)
    f2, p2 = models.mlp(3, 2, width=8, depth=1, seed=1)
    assert f1 is not f2
    _, x, y, xt = problem()
    record_fn = lambda p: jnp.sum(p["readout"]["kernel"][...] ** 2)  # noqa: E731
    first = train(f1, p1, x, y, steps=4, learning_rate=0.1, x_test=xt, record_at=[0, 4], record_fn=record_fn)
    with CompileCounter() as compiles:
        second = train(f2, p2, 2 * x, y, steps=4, learning_rate=jnp.float32(0.2), x_test=xt, record_at=[1, 3],
                       record_fn=record_fn)
        train(f1, p1, x, y, steps=4, learning_rate=0.3, x_test=xt, record_at=[0, 2], record_fn=record_fn)
    assert compiles.count == 0
    assert not np.allclose(first.loss, second.loss)


def test_bad_shapes_and_types():
    params, x, y, xt = problem()
    with pytest.raises(ValueError, match="y_train"):
        train(linear_apply, params, x, y[:, :1], steps=2, learning_rate=0.1)
    with pytest.raises(ValueError, match="x_test"):
        train(linear_apply, params, x, y, steps=2, learning_rate=0.1, x_test=xt[:, :2])
    with pytest.raises(ValueError, match="x_train"):
        train(linear_apply, params, np.where(np.eye(9, 3) > 0, np.nan, x), y, steps=2, learning_rate=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        train(linear_apply, params, x, y, steps=2, learning_rate=0.1, optimizer="sgd")
    with pytest.raises(TypeError, match="record_fn"):
        train(linear_apply, params, x, y, steps=2, learning_rate=0.1, record_fn=3)
    with pytest.raises(TypeError, match="apply_fn"):
        train(None, params, x, y, steps=2, learning_rate=0.1)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 3), steps=st.integers(0, 4))
def test_output_shapes_property(n, k, steps):
    params, x, y, xt = problem(n=n, k=k, n_test=2)
    res = train(linear_apply, params, x, y, steps=steps, learning_rate=0.05, x_test=xt, record_at=[0, steps])
    r = np.unique([0, steps]).size
    assert res.fx_train.shape == (r, n, k) and res.fx_test.shape == (r, 2, k)
    assert res.loss.shape == (steps + 1,)
