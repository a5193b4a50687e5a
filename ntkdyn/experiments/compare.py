"""Real finite-width training side by side with its linearized predictions.

For one model, data set and schedule, :func:`compare` trains the real network
(:func:`ntkdyn.experiments.train.train`'s loop) and evaluates, at the same
recorded steps t:

* Eq. 9/10: the function-space outputs ``f^lin_t(X)``, ``f^lin_t(x*)``
  (:func:`ntkdyn.dynamics.solve`, plain or heavy-ball);
* Eq. 8: the weights ``θ^lin_t = θ₀ − Jᵀ α_t``
  (:func:`ntkdyn.dynamics.weights_from_alpha`) and two networks at them,
  ``f_lin(θ^lin_t, ·)`` (the linearized network — must equal Eq. 9/10 to
  round-off, which proves any other gap is the network's nonlinearity) and
  ``f(θ^lin_t, ·)`` (the real network at the linearized weights);

and measures how far apart they are (definitions in :func:`compare`).

It also trains the linearized network ``f_lin`` itself with the real
network's optimizer, minibatch order and steps (:class:`LinTrained`), which
works for every optimizer and loss (Adam, cross-entropy) where no closed
form exists: the gap between the two trained networks isolates the
network's nonlinearity from the optimizer's departure from gradient flow.
The closed form (Eq. 8/9/10) describes full-batch GD or heavy ball on the
MSE loss; for other optimizers or losses its metrics read NaN
(``Comparison.closed_form`` says which case a result is).

Everything after the eager argument checks is one pure jitted function of
``(model, θ₀, data, η, reg)``: the model is a :class:`ntkdyn.models.Model`
pytree, so every model of one architecture and every value of the numeric
arguments reuses one compiled program. Wall-clock timing is the caller's
business (:mod:`ntkdyn.experiments.sweep` records it per point).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ntkdyn import _validate, spectral
from ntkdyn.dynamics import UnstableLearningRateWarning, max_learning_rate, solve, weights_from_alpha
from ntkdyn.experiments import train as _train
from ntkdyn.kernels import empirical_ntk
from ntkdyn.kernels.empirical import check_rows
from ntkdyn.linearization import linearize
from ntkdyn.models import as_model

__all__ = [
    "Comparison",
    "Side",
    "Losses",
    "WeightGaps",
    "LinTrained",
    "compare",
    "compare_seeds",
    "layer_groups",
    "relative_gap",
    "CLOSED_FORM_OPTIMIZERS",
]

# the built-in optimizers whose linearized dynamics have a closed form (GD, heavy ball), on the MSE loss
CLOSED_FORM_OPTIMIZERS = ("sgd", "momentum")

ApplyFn = Callable[[Any, jax.Array], jax.Array]


# --------------------------------------------------------------------------- #
# result
# --------------------------------------------------------------------------- #


@struct.dataclass
class Side:
    """Outputs and discrepancies on one input set (train X or test X*), R recorded steps.

    Outputs, each (R, n, K):
      real: ``f(θ_t, ·)`` of real training; lin: Eq. 9/10 ``f^lin_t(·)``;
      eq8: the real network at the Eq. 8 weights, ``f(θ^lin_t, ·)``;
      lin_eq8: the linearized network there, ``f_lin(θ^lin_t, ·)``.

    Relative gaps against Eq. 9/10, each (R,) (``D`` defined in :func:`compare`):
      gap: ``‖real − lin‖ / D``; eq8_gap: ``‖eq8 − lin‖ / D``;
      consistency: ``‖lin_eq8 − lin‖ / D`` (round-off when the numerics are right).
    """

    real: jax.Array
    lin: jax.Array
    eq8: jax.Array
    lin_eq8: jax.Array
    gap: jax.Array
    eq8_gap: jax.Array
    consistency: jax.Array


@struct.dataclass
class Losses:
    """Loss curves: train (steps + 1,) at every step; test (R,) at the recorded steps.

    train: ``L(θ_s)`` of real training; train_lin: ``‖f^lin_s(X) − Y‖²/(2n)``;
    test, test_lin: the same on (X*, Y*), None without ``y_test``.
    """

    train: jax.Array
    train_lin: jax.Array
    test: jax.Array | None
    test_lin: jax.Array | None


@struct.dataclass
class WeightGaps:
    """Real against Eq. 8 weights at the recorded steps (L layers, see :func:`layer_groups`).

    gap: (R,) ``‖θ_t − θ^lin_t‖ / ‖θ_t − θ₀‖`` (0 where both vanish); gap_layers: (R, L) per layer;
    change, change_lin: (R, L) ``‖θ^l_t − θ^l_0‖ / ‖θ^l_0‖`` for the real and the Eq. 8 weights.
    """

    gap: jax.Array
    gap_layers: jax.Array
    change: jax.Array
    change_lin: jax.Array


@struct.dataclass
class LinTrained:
    """The linearized network trained like the real one: same optimizer, minibatch order and steps.

    ``f_lin(θ, x) = f(θ₀, x) + J(x)(θ − θ₀)`` trained from θ₀ on the same loss;
    ``θ^lt_t`` its weights after t steps.

    Attributes:
      train, test: (R, n, K) ``f_lin(θ^lt_t, X)`` and ``f_lin(θ^lt_t, X*)`` (test None without ``x_test``).
      train_gap: (R,) ``‖f(θ_t, X) − f_lin(θ^lt_t, X)‖ / ‖f(θ₀, X) − Y‖``.
      test_gap: (R,) ``‖f(θ_t, X*) − f_lin(θ^lt_t, X*)‖ / D*`` (``D*`` as for ``Side.gap``; without
        ``y_test`` the largest movement ``‖f_lin(θ^lt_t, X*) − f(θ₀, X*)‖`` of this run).
      loss: (steps + 1,) training loss of the linearized run at every step.
      test_loss: (R,) its test loss at the recorded steps (None without ``y_test``).
    """

    train: jax.Array
    test: jax.Array | None
    train_gap: jax.Array
    test_gap: jax.Array | None
    loss: jax.Array
    test_loss: jax.Array | None


@struct.dataclass
class Comparison:
    """Real training vs. the linearized predictions at the recorded steps.

    Attributes:
      steps: (R,) recorded steps.
      train, test: :class:`Side` on the training / test inputs (test None without ``x_test``).
      loss: :class:`Losses`.
      weights: :class:`WeightGaps`.
      kernel_drift: ``‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F`` on the training set, T = last step
        (inf when real training blew up).
      max_learning_rate: the linearized stability limit ``2(1+β)n/λ_max``.
      learning_rate: the η used (``learning_rate × max_learning_rate`` with ``lr_relative``).
      spectrum: the :class:`~ntkdyn.spectral.Spectrum` of Θ₀ (+ reg).
      final_params: real θ_T.
      lin_trained: :class:`LinTrained`, the linearized network trained like the real one.
      momentum, time, layer_names: static.
      optimizer: static, the optimizer's name (``"custom"`` for an optax object or factory).
      objective: static, the training loss, ``"mse"`` or ``"cross_entropy"``.
      closed_form: static, whether Eq. 8/9/10 describe this training (GD or heavy ball on MSE);
        when False the closed-form arrays are computed for reference and their summary metrics are NaN.
    """

    steps: jax.Array
    train: Side
    test: Side | None
    loss: Losses
    weights: WeightGaps
    kernel_drift: jax.Array
    max_learning_rate: jax.Array
    learning_rate: jax.Array
    spectrum: spectral.Spectrum
    final_params: Any
    lin_trained: LinTrained
    momentum: float = struct.field(pytree_node=False, default=0.0)
    time: str = struct.field(pytree_node=False, default="discrete")
    layer_names: tuple = struct.field(pytree_node=False, default=())
    optimizer: str = struct.field(pytree_node=False, default="sgd")
    objective: str = struct.field(pytree_node=False, default="mse")
    closed_form: bool = struct.field(pytree_node=False, default=True)

    def summary(self) -> dict[str, float | bool]:
        """Scalar digest (Python floats/bools), the numbers a sweep stores.

        ``*_gap`` = max over recorded steps (NaN read as inf: a side that
        diverged is infinitely far), ``*_final`` = at the last step;
        ``weight_gap`` = max over steps with ``θ_t ≠ θ₀``;
        ``lin_consistency`` = max of the train and test round-off columns;
        ``lr_ratio`` = ``η / max_learning_rate``; ``linear_diverged`` when
        ``lr_ratio > 1`` in discrete time (gradient flow never diverges);
        ``real_diverged`` when the real loss ends non-finite or above its
        initial value.

        ``lin_trained_train_gap`` / ``lin_trained_test_gap`` (max over steps)
        and their ``_final`` values compare the real network with the
        linearized network trained the same way (:class:`LinTrained`);
        ``lin_trained_loss_final`` is that run's last training loss;
        ``closed_form`` whether Eq. 8/9/10 describe this training.

        Without a closed form (``closed_form`` False: another optimizer or
        loss) the closed-form metrics — ``train_gap``, ``test_gap``, their
        ``_final``, ``eq8_*``, ``lin_consistency``, ``weight_gap*``,
        ``loss_lin_final``, ``test_loss_lin_final`` — are NaN, and
        ``linear_diverged`` says whether the linearized *training* ended
        non-finite or above its initial loss.
        """
        test = self.test
        loss = _host(self.loss.train)
        limit = float(self.max_learning_rate)
        lr = float(self.learning_rate)
        ratio = lr / limit if limit > 0 else float("inf")
        change = _host(self.weights.change)
        moved = change.sum(axis=1) > 0
        wg = _host(self.weights.gap)
        out: dict[str, float | bool] = {
            "train_gap": _worst(self.train.gap),
            "test_gap": _worst(None if test is None else test.gap),
            "train_gap_final": _last(self.train.gap),
            "test_gap_final": _last(None if test is None else test.gap),
            "eq8_train_gap": _worst(self.train.eq8_gap),
            "eq8_test_gap": _worst(None if test is None else test.eq8_gap),
            "lin_consistency": _worst(self.train.consistency) if test is None
            else max(_worst(self.train.consistency), _worst(test.consistency)),
            "weight_gap": _worst(wg[moved]) if moved.any() else 0.0,
            "weight_gap_final": _last(wg),
            "kernel_drift": _last(jnp.atleast_1d(self.kernel_drift)),
            "loss_initial": float(loss[0]),
            "loss_final": _last(loss),
            "loss_lin_final": _last(self.loss.train_lin),
            "test_loss_final": _last(self.loss.test),
            "test_loss_lin_final": _last(self.loss.test_lin),
            "learning_rate": lr,
            "max_learning_rate": limit,
            "lr_ratio": ratio,
            "linear_diverged": bool(self.time == "discrete" and ratio > 1.0),
            "real_diverged": bool(not np.isfinite(loss[-1]) or loss[-1] > loss[0]),
        }
        lt, lt_loss = self.lin_trained, _host(self.lin_trained.loss)
        out.update({
            "lin_trained_train_gap": _worst(lt.train_gap),
            "lin_trained_test_gap": _worst(lt.test_gap),
            "lin_trained_train_gap_final": _last(lt.train_gap),
            "lin_trained_test_gap_final": _last(lt.test_gap),
            "lin_trained_loss_final": _last(lt_loss),
            "closed_form": bool(self.closed_form),
        })
        if not self.closed_form:
            for name in _CLOSED_FORM_METRICS:
                out[name] = float("nan")
            out["linear_diverged"] = bool(not np.isfinite(lt_loss[-1]) or lt_loss[-1] > lt_loss[0])
        for name, value in zip(self.layer_names, change[-1]):
            out[f"weight_change[{name}]"] = float(value)
        return out


# the summary metrics that describe the closed form; NaN when there is none
_CLOSED_FORM_METRICS = ("train_gap", "test_gap", "train_gap_final", "test_gap_final", "eq8_train_gap",
                        "eq8_test_gap", "lin_consistency", "weight_gap", "weight_gap_final", "loss_lin_final",
                        "test_loss_lin_final")


def _host(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _worst(x) -> float:
    """max over the recorded steps, NaN read as inf (NaN without data)."""
    if x is None:
        return float("nan")
    arr = _host(x)
    return float(np.max(np.where(np.isnan(arr), np.inf, arr)))


def _last(x) -> float:
    """the value at the last step, NaN read as inf (NaN without data)."""
    if x is None:
        return float("nan")
    v = float(_host(x)[-1])
    return float("inf") if np.isnan(v) else v


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def layer_groups(params: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(layer_names, layer_of_leaf)``: leaves grouped by their parent path.

    A leaf at ``['hidden'][0]['kernel'].value`` belongs to layer
    ``"hidden.0"``; top-level leaves (``{"w": ..}``) are their own layer.
    Only the tree's structure is read, so it works on traced params too.
    """
    names: list[str] = []
    index: list[int] = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [_key_name(k) for k in path]
        if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
            parts = parts[:-1]  # nnx.Param's box, not a level of the model
        layer = ".".join(parts[:-1]) if len(parts) > 1 else ".".join(parts)
        if layer not in names:
            names.append(layer)
        index.append(names.index(layer))
    return tuple(names), tuple(index)


def _layer_sq_norms(tree, layer_of_leaf: tuple[int, ...], num_layers: int) -> jax.Array:
    """(L,) squared Euclidean norm of ``tree`` per layer."""
    leaves = jax.tree_util.tree_leaves(tree)
    sums = jnp.stack([jnp.sum(jnp.square(leaf)) for leaf in leaves])
    return jax.ops.segment_sum(sums, jnp.asarray(layer_of_leaf), num_segments=num_layers)


def relative_gap(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``‖a_t − b_t‖_F / scale`` for every leading index t (0 when both are 0, inf for 0 scale)."""
    diff = jnp.sqrt(jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1))
    return _ratio(diff, scale)


def _ratio(num, den):
    den = jnp.asarray(den)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.where(num == 0, 0.0, jnp.inf))


def _tree_sub(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def _weights_at(model, params0, x, alpha_t):
    """Eq. 8 weights ``θ₀ − Jᵀ α_t`` for one (N, K) ``alpha_t``."""
    return jax.tree_util.tree_map(lambda w: w[0], weights_from_alpha(model, params0, x, alpha_t[None]))


def _lin_loss_curve(sol, r0, steps: int, *, learning_rate, momentum: float, time: str, traced: bool):
    """Eq. 9 train loss at every step 0 … steps from the spectrum: ``Σ (E(λ_m, s) (Vᵀr₀)_m)² / (2n)``."""
    spec, n = sol.spectrum, sol.n
    cols = r0 if traced else r0.reshape(n, 1)
    coef_sq = jnp.sum(jnp.square(spec.eigenvectors.T @ cols.astype(spec.eigenvectors.dtype)), axis=1)  # (m,)
    e = spectral.decay_curve(spec.eigenvalues, steps, learning_rate=learning_rate, n=n, time=time,
                             momentum=momentum)
    e = jnp.where(spec.null, 1.0, e)
    return jnp.sum(jnp.square(e) * coef_sq, axis=1) / (2.0 * n)


def _side(real, lin, eq8, lin_eq8, scale) -> Side:
    return Side(real=real, lin=lin, eq8=eq8, lin_eq8=lin_eq8, gap=relative_gap(real, lin, scale),
                eq8_gap=relative_gap(eq8, lin, scale), consistency=relative_gap(lin_eq8, lin, scale))


# --------------------------------------------------------------------------- #
# the comparison as one pure function
# --------------------------------------------------------------------------- #

_STATIC = ("steps", "num_records", "lr_relative", "time", "momentum", "batch_size", "diag_reg_absolute",
           "trace_outputs", "ntk_method", "ntk_tile_size", "optimizer", "loss")


def _is_transformation(obj) -> bool:
    return hasattr(obj, "init") and hasattr(obj, "update")


def _build_optimizer(optimizer, learning_rate, momentum: float) -> optax.GradientTransformation:
    """A name built from the (traced) η and β, an optax transformation as it is, or ``factory(η)``."""
    if isinstance(optimizer, str):
        return _train.make_optimizer(optimizer, learning_rate, momentum)
    if _is_transformation(optimizer):
        return optimizer
    return optimizer(learning_rate)


def _has_closed_form(optimizer, loss: str) -> bool:
    return isinstance(optimizer, str) and optimizer in CLOSED_FORM_OPTIMIZERS and loss == "mse"


def _compare_impl(model, params0, x, y, x_test, y_test, t, slots, key, learning_rate, diag_reg, *, steps: int,
                  num_records: int, lr_relative: bool, time: str, momentum: float, batch_size: int | None,
                  diag_reg_absolute: bool, trace_outputs: bool, ntk_method: str, ntk_tile_size, optimizer,
                  loss: str) -> Comparison:
    """Everything :func:`compare` computes, for validated arguments (pure; jitted as one program below)."""
    names, layer_of_leaf = layer_groups(params0)
    layer_sq = functools.partial(_layer_sq_norms, layer_of_leaf=layer_of_leaf, num_layers=len(names))
    ntk = functools.partial(empirical_ntk, model, trace_outputs=trace_outputs, method=ntk_method,
                            tile_size=ntk_tile_size)
    n_train = x.shape[0]
    objective = _train.LOSSES[loss]

    # kernel at θ₀: one kernel on X ∪ X* gives Θ(X, X) and Θ(X*, X) from one set of Jacobians
    x_all = x if x_test is None else jnp.concatenate([x, x_test.astype(x.dtype)], axis=0)
    k_all = ntk(params0, x_all)
    k_tt = k_all[:n_train, :n_train]
    k_st = None if x_test is None else k_all[n_train:, :n_train]
    fx0 = model(params0, x)
    fx0_test = None if x_test is None else model(params0, x_test)

    # stability limit 2(1+β)n/λ_max, and η when it is relative
    limit = max_learning_rate(k_tt, momentum=momentum, num_outputs=fx0.shape[1] if trace_outputs else None,
                              diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute)
    lr = learning_rate * limit if lr_relative else learning_rate

    # closed form: Eq. 9/10 at the recorded steps, α_t for Eq. 8, the Eq. 9 loss at every step
    sol = solve(k_tt, y, fx0, t, k_test_train=k_st, fx_test_0=fx0_test, learning_rate=lr, momentum=momentum,
                diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time)
    loss_lin = _lin_loss_curve(sol, fx0 - y, steps, learning_rate=lr, momentum=momentum, time=time,
                               traced=trace_outputs)

    # real training, recording per-layer ‖θ_t − θ₀‖² and ‖θ_t − θ^lin_t‖² (no weights kept)
    def weight_records(slot, params):
        theta_lin = _weights_at(model, params0, x, sol.alpha[slot])
        return {"delta_sq": layer_sq(_tree_sub(params, params0)), "gap_sq": layer_sq(_tree_sub(params, theta_lin))}

    opt = _build_optimizer(optimizer, lr, momentum)
    run = functools.partial(_train.run, params0=params0, x=x, y=y, x_test=x_test, slots=slots, key=key,
                            learning_rate=lr, optimizer=opt, steps=steps, batch_size=batch_size,
                            num_records=num_records, loss=loss)
    closed_form = _has_closed_form(optimizer, loss)
    records = weight_records if closed_form else _nan_weight_records(layer_sq, params0)
    buffers, losses, final_params = run(model, record_slot_fn=records)

    # the linearized network trained the same way: same optimizer, minibatch order (key) and steps
    f_lin = linearize(model, params0)
    lin_buffers, lin_losses, _ = run(f_lin)

    # Eq. 8 weights and the networks at them, one recorded step at a time (memory O(P))
    def eq8_at(alpha_t):
        theta = _weights_at(model, params0, x, alpha_t)
        res = {"train": model(theta, x), "train_lin": f_lin(theta, x), "delta_sq": layer_sq(_tree_sub(theta, params0))}
        if x_test is not None:
            res["test"], res["test_lin"] = model(theta, x_test), f_lin(theta, x_test)
        return res

    if closed_form:
        eq8 = jax.lax.map(eq8_at, sol.alpha)
    else:  # Eq. 8 does not describe this training: NaN of the right shapes, nothing computed
        eq8 = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                                     jax.eval_shape(lambda a: jax.lax.map(eq8_at, a), sol.alpha))

    # kernel drift; a blown-up run is infinitely far from Θ₀
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree_util.tree_leaves(final_params)]))
    k_end = ntk(final_params, x)
    drift = _ratio(jnp.linalg.norm((k_end - k_tt).ravel()), jnp.linalg.norm(k_tt.ravel()))
    drift = jnp.where(finite, drift, jnp.inf)

    # discrepancies
    d_train = jnp.linalg.norm((fx0 - y).ravel())
    train = _side(buffers["fx_train"], sol.train, eq8["train"], eq8["train_lin"], d_train)
    test, test_loss, test_loss_lin, lt_test_gap, lt_test_loss = None, None, None, None, None
    if x_test is not None:
        if y_test is not None:
            d_test = d_test_lt = jnp.linalg.norm((fx0_test - y_test).ravel())
            per_step = jax.vmap(objective, in_axes=(0, None))
            test_loss, lt_test_loss = per_step(buffers["fx_test"], y_test), per_step(lin_buffers["fx_test"], y_test)
            test_loss_lin = jax.vmap(_train.mse_loss, in_axes=(0, None))(sol.test, y_test)
        else:  # no targets: scale by the predicted movement
            d_test, d_test_lt = _largest_move(sol.test, fx0_test), _largest_move(lin_buffers["fx_test"], fx0_test)
        test = _side(buffers["fx_test"], sol.test, eq8["test"], eq8["test_lin"], d_test)
        lt_test_gap = relative_gap(buffers["fx_test"], lin_buffers["fx_test"], d_test_lt)
    gap_sq, delta_sq = buffers["slot_records"]["gap_sq"], buffers["slot_records"]["delta_sq"]
    norm0 = jnp.sqrt(layer_sq(params0))[None]
    weights = WeightGaps(
        gap=_ratio(jnp.sqrt(jnp.sum(gap_sq, axis=1)), jnp.sqrt(jnp.sum(delta_sq, axis=1))),
        gap_layers=_ratio(jnp.sqrt(gap_sq), jnp.sqrt(delta_sq)),
        change=_ratio(jnp.sqrt(delta_sq), norm0),
        change_lin=_ratio(jnp.sqrt(eq8["delta_sq"]), norm0),
    )
    lin_trained = LinTrained(
        train=lin_buffers["fx_train"], test=lin_buffers.get("fx_test"),
        train_gap=relative_gap(buffers["fx_train"], lin_buffers["fx_train"], d_train), test_gap=lt_test_gap,
        loss=lin_losses, test_loss=lt_test_loss,
    )
    return Comparison(
        steps=t,
        train=train,
        test=test,
        loss=Losses(train=losses, train_lin=loss_lin, test=test_loss, test_lin=test_loss_lin),
        weights=weights,
        kernel_drift=drift,
        max_learning_rate=limit,
        learning_rate=jnp.asarray(lr, limit.dtype),
        spectrum=sol.spectrum,
        final_params=final_params,
        lin_trained=lin_trained,
        momentum=momentum,
        time=time,
        layer_names=names,
        optimizer=optimizer if isinstance(optimizer, str) else "custom",
        objective=loss,
        closed_form=closed_form,
    )


def _nan_weight_records(layer_sq, params0):
    """The per-step records of the real run without a closed form: ‖θ_t − θ₀‖² per layer, NaN gaps."""
    def records(slot, params):
        delta = layer_sq(_tree_sub(params, params0))
        return {"delta_sq": delta, "gap_sq": jnp.full_like(delta, jnp.nan)}

    return records


def _largest_move(f_t, f_0):
    """``max_t ‖f_t − f_0‖_F`` over the leading axis."""
    moved = (f_t - f_0[None]).reshape(f_t.shape[0], -1)
    return jnp.max(jnp.sqrt(jnp.sum(jnp.square(moved), axis=1)))


_compare = jax.jit(_compare_impl, static_argnames=_STATIC)

# positions of (model, θ₀, key) among _compare_impl's arrays: the axes a batch of initializations maps over
_SEED_AXES = (0, 0, None, None, None, None, None, None, 0, None, None)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _compare_many(*arrays, **static) -> list[Comparison]:
    """:func:`_compare_impl` vmapped over stacked models, initial parameters and minibatch keys: one program.

    Returns one :class:`Comparison` per member (sliced inside the program, so
    the caller gets them without one dispatch per leaf and member).
    """
    batched = jax.vmap(functools.partial(_compare_impl, **static), in_axes=_SEED_AXES)(*arrays)
    size = jax.tree_util.tree_leaves(arrays[1])[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], batched) for i in range(size)]


# --------------------------------------------------------------------------- #
# the public entry points: eager checks, then the one compiled program
# --------------------------------------------------------------------------- #


def _check_optimizer(optimizer, momentum: float, learning_rate) -> None:
    if isinstance(optimizer, str):
        _validate.choice("optimizer", optimizer, _train.OPTIMIZERS)
        _train.make_optimizer(optimizer, 1.0, momentum)  # raises for a β the optimizer does not take
    elif _is_transformation(optimizer):
        return
    elif callable(optimizer):
        made = optimizer(learning_rate)
        if not _is_transformation(made):
            raise TypeError(
                f"optimizer: a factory must return an optax GradientTransformation, got {type(made).__name__}"
            )
    else:
        raise TypeError(
            f"optimizer: expected a name from {tuple(_train.OPTIMIZERS)}, an optax GradientTransformation or a "
            f"factory(learning_rate) -> GradientTransformation, got {type(optimizer).__name__}"
        )


def _prepare(model, params0, x_train, y_train, *, steps, learning_rate, x_test, y_test, record_at, time, momentum,
             batch_size, seed, diag_reg, optimizer, loss):
    """Every eager check of :func:`compare`; returns ``(arrays, recorded steps)`` for :func:`_compare_impl`."""
    _validate.choice("time", time, spectral.TIMES)
    beta = _validate.fraction("momentum", momentum)
    inputs = _train.check_inputs(
        model, params0, x_train, y_train, x_test, steps=steps, learning_rate=learning_rate, optimizer=None,
        batch_size=batch_size, seed=seed, loss=loss,
    )
    _check_optimizer(optimizer, beta, inputs.learning_rate)
    if inputs.x_test is not None:  # Θ₀ is computed on X ∪ X* in one batch
        check_rows(model, params0, inputs.x_train, inputs.x_train.shape[0] + inputs.x_test.shape[0],
                   inputs.output.shape[1])
    if y_test is not None:
        if inputs.x_test is None:
            raise ValueError("y_test: given without x_test")
        y_test = _validate.matrix("y_test", y_test, inputs.x_test.shape[0], inputs.output.shape[1])
        if loss == "cross_entropy":
            _train.probability_rows("y_test", y_test)
    _validate.nonnegative_scalar("diag_reg", diag_reg)
    recorded = _train.record_steps(record_at, inputs.steps)
    dtype = inputs.output.dtype
    arrays = (
        model, params0, inputs.x_train, inputs.y_train, inputs.x_test, y_test, jnp.asarray(recorded, dtype),
        _train.record_slots(recorded, inputs.steps), jax.random.key(inputs.seed),
        jnp.asarray(inputs.learning_rate, dtype), jnp.asarray(float(np.asarray(diag_reg)), dtype),
    )
    return arrays, inputs, beta, recorded


def _finish(result: Comparison, recorded, *, lr_relative: bool, time: str, owner: str = "params0") -> Comparison:
    """Recorded steps as integers; a non-finite kernel, the lr_relative error and the stability warning.

    The stability limit is NaN only when Θ₀ itself is not finite (every other
    input was checked eagerly): the Jacobian at ``owner`` overflowed.
    """
    result = result.replace(steps=jnp.asarray(recorded))
    limit, lr = float(result.max_learning_rate), float(result.learning_rate)
    if np.isnan(limit):
        raise ValueError(
            f"{owner}: expected parameters whose NTK on x_train is finite, got NaN/inf kernel entries "
            "(the Jacobian overflows the dtype)"
        )
    if lr_relative and not np.isfinite(limit):
        raise ValueError("lr_relative: the kernel is zero, so there is no stability limit to scale by")
    if time == "discrete" and lr > limit and result.closed_form:
        warnings.warn(
            f"learning_rate={lr:.6g} is above max_learning_rate = 2(1+β)n/λ_max = {limit:.6g}: "
            "discrete descent on the linearized model diverges",
            UnstableLearningRateWarning,
            stacklevel=3,
        )
    return result


def compare(
    apply_fn: ApplyFn,
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    steps: int,
    learning_rate: float,
    lr_relative: bool = False,
    x_test: jax.Array | None = None,
    y_test: jax.Array | None = None,
    record_at: Sequence[int] | None = None,
    time: str = "discrete",
    momentum: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    trace_outputs: bool = False,
    ntk_method: str = "auto",
    ntk_tile_size: int | str | None = "auto",
    optimizer: str | optax.GradientTransformation | Callable[[Any], optax.GradientTransformation] = "sgd",
    loss: str = "mse",
) -> Comparison:
    """Train the real network and compare it with its linearization at the recorded steps.

    Real training: ``optimizer`` on ``loss`` from θ₀ — by default
    ``optax.sgd(η)`` (``optax.sgd(η, momentum=β)`` when ``momentum`` > 0) on
    the MSE loss, full batch unless ``batch_size``. The linearized network
    ``f_lin`` is trained the same way (same optimizer, loss, minibatch order,
    steps: :class:`LinTrained`). Predictions from the empirical NTK Θ₀ at θ₀,
    one eigendecomposition (:func:`ntkdyn.dynamics.solve`): Eq. 9/10
    (discrete time ``(I − ηΘ/n)^t`` by default, the exact linear counterpart
    of full-batch steps; ``time="continuous"`` uses ``exp(−ηΘt/n)``; with
    momentum the heavy-ball modes) and Eq. 8 weights
    ``θ^lin_t = θ₀ − Jᵀ α_t``. They are always for full-batch descent on MSE,
    so minibatch noise counts as discrepancy, and for another optimizer or
    loss they do not apply (``closed_form`` False, their summary metrics NaN).

    Metrics (``‖·‖`` is the Frobenius norm over all inputs and outputs):

    * ``train.gap[t] = ‖f(θ_t, X) − f^lin_t(X)‖ / ‖f(θ₀, X) − Y‖``
    * ``test.gap[t]  = ‖f(θ_t, X*) − f^lin_t(X*)‖ / D*``, with
      ``D* = ‖f(θ₀, X*) − Y*‖`` when ``y_test`` is given, else
      ``D* = max_t ‖f^lin_t(X*) − f(θ₀, X*)‖`` (the predicted movement)
    * ``lin_trained.train_gap[t] = ‖f(θ_t, X) − f_lin(θ^lt_t, X)‖ / ‖f(θ₀, X) − Y‖``
      and ``lin_trained.test_gap`` likewise, ``θ^lt_t`` the trained linearized weights
    * ``*.eq8_gap[t]``: the same with ``f(θ^lin_t, ·)`` in place of the real
      outputs — how nonlinear the network is along the predicted path
    * ``*.consistency[t]``: the same with ``f_lin(θ^lin_t, ·)`` — Eq. 8
      against Eq. 9/10; round-off (≈ eps·cond) whatever the width
    * ``weights.gap[t] = ‖θ_t − θ^lin_t‖ / ‖θ_t − θ₀‖`` (0 where both vanish),
      per layer in ``weights.gap_layers``
    * ``weights.change[t, l] = ‖θ^l_t − θ^l_0‖ / ‖θ^l_0‖`` (real), and
      ``weights.change_lin`` for the Eq. 8 weights
    * ``kernel_drift = ‖Θ(θ_T) − Θ(θ₀)‖_F / ‖Θ(θ₀)‖_F`` on X, T = ``steps``
    * ``loss.train`` / ``loss.train_lin``: ``L(θ_s)`` and ``‖f^lin_s − Y‖²/(2n)`` for every s

    All value checks run eagerly, before anything is compiled, with the
    messages of the public solvers (``diag_reg``, ``learning_rate``, NaN in
    ``params0``/``x_train``/``y_train``/``x_test``/``y_test``); the rest is one
    jitted pure function, compiled once per architecture and shape.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)`` or a :class:`ntkdyn.models.Model`
        (see :func:`ntkdyn.models.as_apply_fn`).
      params0: θ₀.
      x_train, y_train: (N, ...) and (N, K).
      steps: number of real steps; learning_rate: η > 0 (Python, NumPy or JAX scalar).
      lr_relative: read ``learning_rate`` as a multiple of the linearized
        stability limit ``2(1+β)n/λ_max`` of Θ₀ (so 1.0 is the edge).
      x_test, y_test: optional test inputs (M, ...) and targets (M, K).
      record_at: recorded steps (default log-spaced, with 0 and ``steps``).
      time: ``"discrete"`` (default) or ``"continuous"`` (plain GD only).
      momentum: β in [0, 1) (heavy ball, discrete time).
      batch_size, seed: minibatch SGD for the real and the linearized network (one order for both).
      diag_reg, diag_reg_absolute: kernel regularizer for the predictions.
      trace_outputs: predict with the output-traced kernel (exact for K = 1).
      ntk_method, ntk_tile_size: ``method`` and ``tile_size`` of :func:`ntkdyn.kernels.empirical_ntk`.
      optimizer: ``"sgd"`` (default; heavy ball when ``momentum`` > 0),
        ``"momentum"`` (heavy ball, needs ``momentum`` > 0), ``"adam"``
        (``optax.adam(η)``), built from the (possibly relative) η inside the
        compiled program; or any optax ``GradientTransformation`` (used as is;
        static, so reuse one object to reuse the compilation); or a
        ``factory(η) -> GradientTransformation``.
      loss: ``"mse"`` (default) or ``"cross_entropy"`` (softmax of the
        outputs; targets must be class-probability rows, e.g. one-hot).

    Returns:
      :class:`Comparison`. Above the stability limit the linearized side holds
      inf/NaN and the real side whatever training did; nothing raises.

    Warns:
      UnstableLearningRateWarning: discrete time with η above the limit, when the closed form applies.
    """
    model = as_model(apply_fn)
    arrays, inputs, beta, recorded = _prepare(
        model, params0, x_train, y_train, steps=steps, learning_rate=learning_rate, x_test=x_test, y_test=y_test,
        record_at=record_at, time=time, momentum=momentum, batch_size=batch_size, seed=seed, diag_reg=diag_reg,
        optimizer=optimizer, loss=loss,
    )
    result = _compare(*arrays, **_static(inputs, recorded, beta, lr_relative=lr_relative, time=time,
                                         diag_reg_absolute=diag_reg_absolute, trace_outputs=trace_outputs,
                                         ntk_method=ntk_method, ntk_tile_size=ntk_tile_size, optimizer=optimizer,
                                         loss=loss))
    return _finish(result, recorded, lr_relative=lr_relative, time=time)


def _static(inputs, recorded, beta, **options) -> dict:
    options["lr_relative"] = bool(options["lr_relative"])
    options["diag_reg_absolute"] = bool(options["diag_reg_absolute"])
    options["trace_outputs"] = bool(options["trace_outputs"])
    return dict(steps=inputs.steps, num_records=int(recorded.size), momentum=beta, batch_size=inputs.batch_size,
                **options)


def compare_seeds(
    members: Sequence[tuple[ApplyFn, Any]],
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    seeds: Sequence[int] | None = None,
    **options,
) -> list[Comparison]:
    """:func:`compare` for several initializations of one architecture, as one compiled, vmapped call.

    ``[compare(f_i, θ₀_i, x_train, y_train, seed=seeds[i], **options) for i]``
    to float round-off, with the S members' training, kernels and solves
    batched along a leading axis (cheaper than S calls: one program, wider
    operations). Every member must have the same graph and parameter shapes
    (e.g. one family at one width, other seeds).

    Args:
      members: ``(apply_fn, params0)`` pairs (``apply_fn`` a function or a
        :class:`ntkdyn.models.Model`).
      x_train, y_train: the data, shared by every member.
      seeds: the minibatch seed of each member (default 0 for all).
      **options: every keyword argument of :func:`compare` except ``seed``.

    Every check of :func:`compare` runs on the first member and the shared
    data; each further member is checked for its own values (finite
    parameters, a seed >= 0) and its architecture, all before anything is
    compiled. The host work (checks, dispatch, results) is done once for the
    S members, not S times.

    Raises:
      ValueError naming ``members`` when they cannot be stacked (another
      graph, parameter shape or dtype), ``members[i]`` / ``seeds[i]`` for a
      member's bad values, and everything :func:`compare` raises.
    """
    members = list(members)
    if not members:
        raise ValueError("members: expected at least one (apply_fn, params0) pair, got none")
    if "seed" in options:
        raise TypeError("seed: compare_seeds takes one minibatch seed per member in seeds=")
    seeds = [0] * len(members) if seeds is None else list(seeds)
    if len(seeds) != len(members):
        raise ValueError(f"seeds: expected one seed per member ({len(members)}), got {len(seeds)}")
    lr_relative, time = options.get("lr_relative", False), options.get("time", "discrete")
    statics = {k: options.pop(k, default) for k, default in (
        ("lr_relative", False), ("diag_reg_absolute", False), ("trace_outputs", False), ("ntk_method", "auto"),
        ("ntk_tile_size", "auto"), ("optimizer", "sgd"), ("loss", "mse"))}
    options.setdefault("diag_reg", 0.0)
    for name in ("x_test", "y_test", "record_at"):
        options.setdefault(name, None)
    options.setdefault("time", "discrete")
    options.setdefault("momentum", 0.0)
    options.setdefault("batch_size", None)
    # every check of compare() on the first member and the shared data; the others only need their own values
    (f0, p0), s0 = members[0], seeds[0]
    arrays, inputs, beta, recorded = _prepare(as_model(f0), p0, x_train, y_train, seed=s0,
                                              optimizer=statics["optimizer"], loss=statics["loss"], **options)
    model, params, key = _stack_members(members, seeds, arrays[0], arrays[1], arrays[8])
    batched_arrays = (model, params, *arrays[2:8], key, *arrays[9:])
    result = _compare_many(*batched_arrays, **_static(inputs, recorded, beta, time=time, **statics))
    return [_finish(one, recorded, lr_relative=lr_relative, time=time, owner=f"members[{i}]")
            for i, one in enumerate(result)]


def _signature(tree) -> tuple:
    """Structure, shapes and dtypes of a pytree (what must match to stack members)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(a), a.dtype if hasattr(a, "dtype") else np.result_type(a)) for a in leaves)


def _stack_members(members, seeds, model0, params0, key0):
    """``(models, θ₀s, keys)`` stacked on a leading member axis, after each further member's own checks.

    The first member went through :func:`_prepare`; every other must have its
    graph, parameter shapes and dtypes (so its output shape and dtype too),
    finite parameters and a seed >= 0.
    """
    models, params, keys = [model0], [params0], [key0]
    reference = (_signature(model0), _signature(params0))
    for i, ((f, p), s) in enumerate(zip(members[1:], seeds[1:]), 1):
        model = as_model(f)
        _validate.params_tree(f"members[{i}]", p)
        if (_signature(model), _signature(p)) != reference:
            raise ValueError(
                f"members: the initializations must share one architecture (graph, parameter shapes and dtypes) "
                f"to be batched; members[{i}] differs from members[0]"
            )
        models.append(model)
        params.append(p)
        keys.append(jax.random.key(_validate.count(f"seeds[{i}]", s, 0)))
    return _stack(models, params, keys)


def _stack(models, params, keys):
    """The members' trees stacked leaf by leaf on a new leading axis."""
    return tuple(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees) for trees in (models, params, keys))
