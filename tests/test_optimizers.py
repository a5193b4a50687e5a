"""Optimizers beyond GD and the linearized-trained comparison (issue 12 item 3), float64.

Oracles: a linear model is its own linearization, so for EVERY optimizer, loss and minibatch order the
trained f_lin equals the real network to round-off (and would not if the two runs saw different
minibatches); for full-batch GD / heavy ball on MSE the trained f_lin IS the discrete closed form
(Eq. 9/10); the cross-entropy gradient of a linear model, written out by hand.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkdyn import models
from ntkdyn.experiments.compare import compare
from ntkdyn.experiments.report import comparisons_text
from ntkdyn.experiments.sweep import SweepGrid, run_point
from ntkdyn.experiments.train import cross_entropy_loss, make_optimizer, train


def linear_apply(params, x):
    return x @ params["W"] + params["b"]


def case(n=8, d=3, k=3, n_test=5, seed=0, labels=False):
    rng = np.random.default_rng(seed)
    x, xt = rng.standard_normal((n, d)), rng.standard_normal((n_test, d))
    if labels:
        y, yt = np.eye(k)[rng.integers(0, k, n)], np.eye(k)[rng.integers(0, k, n_test)]
    else:
        y, yt = rng.standard_normal((n, k)), rng.standard_normal((n_test, k))
    params = {"W": rng.standard_normal((d, k)), "b": 0.3 * rng.standard_normal(k)}
    return params, x, y, xt, yt


CLOSED_FORM_METRICS = ("train_gap", "test_gap", "eq8_test_gap", "lin_consistency", "weight_gap", "loss_lin_final")


def test_cross_entropy_training_matches_the_hand_written_gradient():
    params, x, y, _, _ = case(labels=True)
    steps, lr = 12, 0.4
    res = train(linear_apply, params, x, y, steps=steps, learning_rate=lr, loss="cross_entropy",
                record_at=[0, steps], keep_params=True)
    w, b = params["W"].copy(), params["b"].copy()
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - y) / x.shape[0]  # ∂/∂z of −1/N Σ y·log softmax(z)
        w, b = w - lr * x.T @ g, b - lr * g.sum(axis=0)
    np.testing.assert_allclose(res.final_params["W"], w, rtol=1e-12, atol=1e-13)
    z = x @ params["W"] + params["b"]
    expected = -np.mean(np.sum(y * (z - np.log(np.exp(z).sum(axis=1, keepdims=True))), axis=1))
    assert float(cross_entropy_loss(z, y)) == pytest.approx(expected, rel=1e-12)
    assert float(res.loss[0]) == pytest.approx(expected, rel=1e-12)


def test_optimizer_names_and_their_momentum():
    assert make_optimizer("sgd", 0.1) is not None and make_optimizer("momentum", 0.1, 0.9) is not None
    with pytest.raises(ValueError, match="momentum: the 'momentum' optimizer needs β"):
        make_optimizer("momentum", 0.1)
    with pytest.raises(ValueError, match="momentum: adam takes no heavy-ball β"):
        make_optimizer("adam", 0.1, 0.5)
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        make_optimizer("lbfgs", 0.1)


@pytest.mark.parametrize(
    "optimizer,loss,batch_size,momentum",
    [("adam", "mse", 4, 0.0), ("momentum", "mse", 2, 0.6), ("sgd", "cross_entropy", None, 0.0)],
)
def test_linear_model_trained_linearization_is_the_real_network(optimizer, loss, batch_size, momentum):
    params, x, y, xt, yt = case(labels=loss == "cross_entropy")
    c = compare(linear_apply, params, x, y, steps=25, learning_rate=0.05, x_test=xt, y_test=yt,
                record_at=[0, 3, 25], optimizer=optimizer, loss=loss, batch_size=batch_size, momentum=momentum,
                seed=3)
    lt = c.lin_trained
    np.testing.assert_allclose(lt.train, c.train.real, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lt.test, c.test.real, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lt.loss, c.loss.train, rtol=1e-12, atol=1e-14)
    s = c.summary()
    assert s["lin_trained_test_gap"] < 1e-12 and s["lin_trained_train_gap"] < 1e-12
    # the real network did train (the run is not trivially zero)
    assert float(jnp.max(jnp.abs(c.train.real[-1] - c.train.real[0]))) > 1e-3
    closed = optimizer in ("sgd", "momentum") and loss == "mse"
    assert c.closed_form is closed and s["closed_form"] is closed
    for name in CLOSED_FORM_METRICS:
        assert bool(np.isnan(s[name])) == (not closed), name
    if not closed:
        assert not s["linear_diverged"]  # the trained f_lin converged


def test_minibatch_order_comes_from_the_seed_and_is_shared():
    params, x, y, xt, yt = case()
    kw = dict(steps=9, learning_rate=0.1, x_test=xt, y_test=yt, record_at=[0, 9], optimizer="adam", batch_size=2)
    c = compare(linear_apply, params, x, y, seed=5, **kw)
    opt = optax.adam(0.1)
    ref = train(linear_apply, params, x, y, steps=9, learning_rate=None, optimizer=opt, batch_size=2, seed=5,
                record_at=[0, 9], x_test=xt)
    np.testing.assert_allclose(c.train.real, ref.fx_train, rtol=1e-12, atol=1e-13)
    other = compare(linear_apply, params, x, y, seed=6, **kw)
    assert not np.allclose(other.train.real[-1], c.train.real[-1])


def test_any_optax_optimizer_or_factory_from_python():
    params, x, y, xt, yt = case()
    kw = dict(steps=10, learning_rate=0.05, x_test=xt, y_test=yt, record_at=[0, 10], batch_size=4)
    by_object = compare(linear_apply, params, x, y, optimizer=optax.adam(0.05), **kw)
    by_factory = compare(linear_apply, params, x, y, optimizer=optax.adam, **kw)  # built from the traced η
    ref = train(linear_apply, params, x, y, steps=10, learning_rate=None, optimizer=optax.adam(0.05), batch_size=4,
                record_at=[0, 10])
    for other in (by_object, by_factory):
        np.testing.assert_allclose(other.train.real, ref.fx_train, rtol=1e-12)
        assert not other.closed_form and other.optimizer == "custom"
    with pytest.raises(TypeError, match="optimizer: a factory must return"):
        compare(linear_apply, params, x, y, optimizer=lambda lr: lr, **kw)
    with pytest.raises(TypeError, match="optimizer: expected a name"):
        compare(linear_apply, params, x, y, optimizer=3, **kw)


def test_full_batch_heavy_ball_trained_linearization_is_the_discrete_closed_form():
    """Plain GD: the same check through a whole sweep point (test_families.test_linen_and_plain_families_sweep)."""
    momentum = 0.7
    apply_fn, params = models.mlp(3, 2, width=12, depth=1, seed=0)
    _, x, y, xt, yt = case(k=2)
    c = compare(apply_fn, params, x, y, steps=30, learning_rate=0.5, lr_relative=True, x_test=xt, y_test=yt,
                record_at=[0, 1, 7, 30], momentum=momentum)
    assert c.closed_form and c.optimizer == "sgd"
    np.testing.assert_allclose(c.lin_trained.train, c.train.lin, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(c.lin_trained.test, c.test.lin, rtol=1e-9, atol=1e-11)
    s = c.summary()
    assert s["lin_trained_test_gap"] == pytest.approx(s["test_gap"], rel=1e-7)


def test_cross_entropy_needs_probability_rows():
    params, x, y, xt, yt = case()
    with pytest.raises(ValueError, match="y_train: loss='cross_entropy' needs rows of class probabilities"):
        compare(linear_apply, params, x, y, steps=2, learning_rate=0.1, loss="cross_entropy")
    _, _, y1, _, _ = case(labels=True)
    with pytest.raises(ValueError, match="y_test: loss='cross_entropy'"):
        compare(linear_apply, params, x, y1, steps=2, learning_rate=0.1, loss="cross_entropy", x_test=xt, y_test=yt)
    with pytest.raises(ValueError, match="loss: expected one of"):
        compare(linear_apply, params, x, y, steps=2, learning_rate=0.1, loss="hinge")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(optimizer="adam", momentum=0.5), "momentum: adam takes no heavy-ball"),
        (dict(optimizer="momentum"), "momentum: the 'momentum' optimizer needs"),
        (dict(optimizer="rmsprop"), "optimizer: expected one of"),
        (dict(batch_size=9), r"batch_size: .* min\(samples\)=8"),
        (dict(batch_size=-1), "batch_size"),
        (dict(loss="cross_entropy"), "loss: cross_entropy needs classification data"),
        (dict(loss="l1"), "loss: expected one of"),
    ],
)
def test_bad_optimizer_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepGrid(samples=(8, 16), **kwargs).validate()


def test_sweep_records_heavy_ball_as_momentum_and_full_batch_as_0():
    grid = SweepGrid(samples=(8,), momentum=0.5).validate()
    assert grid.optimizer == "momentum" and grid.batch_size == 0
    assert SweepGrid(samples=(8,), batch_size=None).validate().batch_size == 0


def test_cross_entropy_point_on_digits_and_its_report():
    grid = SweepGrid(dataset="digits", out_features=3, widths=(4,), samples=(12,), seeds=(0,), steps=6, n_test=6,
                     num_records=3, dtype="float64", depths=(1,), loss="cross_entropy", optimizer="adam",
                     learning_rates=(0.05,), batch_size=4)
    (config,) = grid.points()
    rec = run_point(config)
    m = rec["metrics"]
    assert not m["closed_form"] and np.isnan(m["test_gap"]) and np.isfinite(m["lin_trained_test_gap"])
    assert "loss_lin" not in rec["curves"] and "loss_lin_trained" in rec["curves"]
    assert m["loss_final"] < m["loss_initial"]  # cross-entropy on plain one-hot digits targets
    assert "softmax cross-entropy has no closed form" in comparisons_text([rec])
