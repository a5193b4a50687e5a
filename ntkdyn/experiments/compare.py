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
from ntkdyn.linearization import linearize
from ntkdyn.models import as_model

__all__ = ["Comparison", "Side", "Losses", "WeightGaps", "compare", "layer_groups", "relative_gap"]

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
      momentum, time, layer_names: static.
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
    momentum: float = struct.field(pytree_node=False, default=0.0)
    time: str = struct.field(pytree_node=False, default="discrete")
    layer_names: tuple = struct.field(pytree_node=False, default=())

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
        for name, value in zip(self.layer_names, change[-1]):
            out[f"weight_change[{name}]"] = float(value)
        return out


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


@functools.partial(
    jax.jit,
    static_argnames=("steps", "num_records", "lr_relative", "time", "momentum", "batch_size", "diag_reg_absolute",
                     "trace_outputs", "ntk_method", "ntk_tile_size"),
)
def _compare(model, params0, x, y, x_test, y_test, t, slots, key, learning_rate, diag_reg, *, steps: int,
             num_records: int, lr_relative: bool, time: str, momentum: float, batch_size: int | None,
             diag_reg_absolute: bool, trace_outputs: bool, ntk_method: str, ntk_tile_size) -> Comparison:
    """Everything :func:`compare` computes, for validated arguments (one compiled program)."""
    names, layer_of_leaf = layer_groups(params0)
    layer_sq = functools.partial(_layer_sq_norms, layer_of_leaf=layer_of_leaf, num_layers=len(names))
    ntk = functools.partial(empirical_ntk, model, trace_outputs=trace_outputs, method=ntk_method,
                            tile_size=ntk_tile_size)
    n_train = x.shape[0]

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

    optimizer = optax.sgd(lr, momentum=momentum if momentum > 0 else None)
    buffers, losses, final_params = _train.run(
        model, params0, x, y, x_test, slots, key, lr, optimizer=optimizer, steps=steps, batch_size=batch_size,
        num_records=num_records, record_slot_fn=weight_records,
    )

    # Eq. 8 weights and the networks at them, one recorded step at a time (memory O(P))
    f_lin = linearize(model, params0)

    def eq8_at(alpha_t):
        theta = _weights_at(model, params0, x, alpha_t)
        res = {"train": model(theta, x), "train_lin": f_lin(theta, x), "delta_sq": layer_sq(_tree_sub(theta, params0))}
        if x_test is not None:
            res["test"], res["test_lin"] = model(theta, x_test), f_lin(theta, x_test)
        return res

    eq8 = jax.lax.map(eq8_at, sol.alpha)

    # kernel drift; a blown-up run is infinitely far from Θ₀
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(w)) for w in jax.tree_util.tree_leaves(final_params)]))
    k_end = ntk(final_params, x)
    drift = _ratio(jnp.linalg.norm((k_end - k_tt).ravel()), jnp.linalg.norm(k_tt.ravel()))
    drift = jnp.where(finite, drift, jnp.inf)

    # discrepancies
    train = _side(buffers["fx_train"], sol.train, eq8["train"], eq8["train_lin"], jnp.linalg.norm((fx0 - y).ravel()))
    test, test_loss, test_loss_lin = None, None, None
    if x_test is not None:
        if y_test is not None:
            d_test = jnp.linalg.norm((fx0_test - y_test).ravel())
            test_loss = jax.vmap(_train.mse_loss, in_axes=(0, None))(buffers["fx_test"], y_test)
            test_loss_lin = jax.vmap(_train.mse_loss, in_axes=(0, None))(sol.test, y_test)
        else:  # no targets: scale by the predicted movement
            moved = (sol.test - fx0_test[None]).reshape(sol.test.shape[0], -1)
            d_test = jnp.max(jnp.sqrt(jnp.sum(jnp.square(moved), axis=1)))
        test = _side(buffers["fx_test"], sol.test, eq8["test"], eq8["test_lin"], d_test)
    gap_sq, delta_sq = buffers["slot_records"]["gap_sq"], buffers["slot_records"]["delta_sq"]
    norm0 = jnp.sqrt(layer_sq(params0))[None]
    weights = WeightGaps(
        gap=_ratio(jnp.sqrt(jnp.sum(gap_sq, axis=1)), jnp.sqrt(jnp.sum(delta_sq, axis=1))),
        gap_layers=_ratio(jnp.sqrt(gap_sq), jnp.sqrt(delta_sq)),
        change=_ratio(jnp.sqrt(delta_sq), norm0),
        change_lin=_ratio(jnp.sqrt(eq8["delta_sq"]), norm0),
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
        momentum=momentum,
        time=time,
        layer_names=names,
    )


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
) -> Comparison:
    """Train the real network and compare it with its linearization at the recorded steps.

    Real training: ``optax.sgd(η)`` (``optax.sgd(η, momentum=β)`` when
    ``momentum`` > 0), full batch unless ``batch_size`` (the predictions are
    always for full-batch descent, so minibatch noise counts as discrepancy).
    Predictions from the empirical NTK Θ₀ at θ₀, one eigendecomposition
    (:func:`ntkdyn.dynamics.solve`): Eq. 9/10 (discrete time ``(I − ηΘ/n)^t``
    by default, the exact linear counterpart of the real steps;
    ``time="continuous"`` uses ``exp(−ηΘt/n)``; with momentum the heavy-ball
    modes) and Eq. 8 weights ``θ^lin_t = θ₀ − Jᵀ α_t``.

    Metrics (``‖·‖`` is the Frobenius norm over all inputs and outputs):

    * ``train.gap[t] = ‖f(θ_t, X) − f^lin_t(X)‖ / ‖f(θ₀, X) − Y‖``
    * ``test.gap[t]  = ‖f(θ_t, X*) − f^lin_t(X*)‖ / D*``, with
      ``D* = ‖f(θ₀, X*) − Y*‖`` when ``y_test`` is given, else
      ``D* = max_t ‖f^lin_t(X*) − f(θ₀, X*)‖`` (the predicted movement)
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
      batch_size, seed: minibatch SGD for the real network.
      diag_reg, diag_reg_absolute: kernel regularizer for the predictions.
      trace_outputs: predict with the output-traced kernel (exact for K = 1).
      ntk_method, ntk_tile_size: ``method`` and ``tile_size`` of :func:`ntkdyn.kernels.empirical_ntk`.

    Returns:
      :class:`Comparison`. Above the stability limit the linearized side holds
      inf/NaN and the real side whatever training did; nothing raises.

    Warns:
      UnstableLearningRateWarning: discrete time with η above the limit.
    """
    model = as_model(apply_fn)
    _validate.choice("time", time, spectral.TIMES)
    beta = _validate.fraction("momentum", momentum)
    inputs = _train.check_inputs(
        model, params0, x_train, y_train, x_test, steps=steps, learning_rate=learning_rate, optimizer=None,
        batch_size=batch_size, seed=seed,
    )
    if y_test is not None:
        if inputs.x_test is None:
            raise ValueError("y_test: given without x_test")
        y_test = _validate.matrix("y_test", y_test, inputs.x_test.shape[0], inputs.output.shape[1])
    _validate.nonnegative_scalar("diag_reg", diag_reg)
    recorded = _train.record_steps(record_at, inputs.steps)
    dtype = inputs.output.dtype
    result = _compare(
        model, params0, inputs.x_train, inputs.y_train, inputs.x_test, y_test,
        jnp.asarray(recorded, dtype), _train.record_slots(recorded, inputs.steps), jax.random.key(inputs.seed),
        jnp.asarray(inputs.learning_rate, dtype), jnp.asarray(float(np.asarray(diag_reg)), dtype),
        steps=inputs.steps, num_records=int(recorded.size), lr_relative=bool(lr_relative), time=time,
        momentum=beta, batch_size=inputs.batch_size, diag_reg_absolute=bool(diag_reg_absolute),
        trace_outputs=bool(trace_outputs), ntk_method=ntk_method, ntk_tile_size=ntk_tile_size,
    ).replace(steps=jnp.asarray(recorded))
    limit, lr = float(result.max_learning_rate), float(result.learning_rate)
    if lr_relative and not np.isfinite(limit):
        raise ValueError("lr_relative: the kernel is zero, so there is no stability limit to scale by")
    if time == "discrete" and lr > limit:
        warnings.warn(
            f"learning_rate={lr:.6g} is above max_learning_rate = 2(1+β)n/λ_max = {limit:.6g}: "
            "discrete descent on the linearized model diverges",
            UnstableLearningRateWarning,
            stacklevel=2,
        )
    return result
