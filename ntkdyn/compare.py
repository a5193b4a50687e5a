"""Real finite-width training side by side with its linearized predictions.

For one model, data set and schedule, :func:`compare` trains the real network
(:func:`ntkdyn.train.train`) and evaluates, at the same recorded steps t:

* Eq. 9/10: the function-space outputs ``f^lin_t(X)``, ``f^lin_t(x*)``;
* Eq. 8: the weights ``θ^lin_t = θ₀ − Jᵀ α_t`` and two networks at them,
  ``f_lin(θ^lin_t, ·)`` (the linearized network — must equal Eq. 9/10 to
  round-off, which proves any other gap is the network's nonlinearity) and
  ``f(θ^lin_t, ·)`` (the real network at the linearized weights);

and measures how far apart they are (definitions in :func:`compare`).
"""

from __future__ import annotations

import functools
import time as _time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ntkdyn import spectral
from ntkdyn.dynamics import flatten_kernel, solve
from ntkdyn.linearize import linearize
from ntkdyn.momentum import _check_momentum, heavy_ball_decay_curve, heavy_ball_solve
from ntkdyn.ntk import empirical_ntk
from ntkdyn.train import _check_record_at, _train, _validate, mse_loss

__all__ = ["Comparison", "compare", "layer_groups", "relative_gap"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


# --------------------------------------------------------------------------- #
# result
# --------------------------------------------------------------------------- #


@struct.dataclass
class Comparison:
    """Real training vs. the linearized predictions at the recorded steps.

    Shapes: R recorded steps, N train / M test inputs, K outputs, L layers.

    Attributes:
      steps: (R,) recorded steps.
      fx_train, fx_test: real network ``f(θ_t, ·)``, (R, N, K) / (R, M, K).
      fx_train_lin, fx_test_lin: Eq. 9 / Eq. 10 function-space predictions.
      fx_train_eq8, fx_test_eq8: real network at the Eq. 8 weights, ``f(θ^lin_t, ·)``.
      fx_train_lin_eq8, fx_test_lin_eq8: linearized network at the Eq. 8
        weights, ``f_lin(θ^lin_t, ·)``.
      loss, loss_lin: (steps + 1,) train loss of real training and of the
        Eq. 9 prediction at every step.
      test_loss, test_loss_lin: (R,) test losses (None without ``y_test``).
      train_gap, test_gap: (R,) relative output discrepancy real vs. Eq. 9/10.
      eq8_train_gap, eq8_test_gap: (R,) same, for ``f(θ^lin_t)`` vs. Eq. 9/10.
      lin_consistency_train, lin_consistency_test: (R,) same, for
        ``f_lin(θ^lin_t)`` vs. Eq. 9/10 (round-off when the numerics are right).
      weight_gap: (R,) ``‖θ_t − θ^lin_t‖ / ‖θ_t − θ₀‖``; weight_gap_layers (R, L) per layer.
      weight_change, weight_change_lin: (R, L) ``‖θ^l_t − θ^l_0‖ / ‖θ^l_0‖``
        for the real and the Eq. 8 weights.
      kernel_drift: ``‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F`` on the training set, T = last step.
      max_learning_rate: the linearized stability limit ``2(1+β)n/λ_max``.
      spectrum: the :class:`~ntkdyn.spectral.Spectrum` of Θ₀ (+ reg).
      final_params: real θ_T.
      learning_rate, momentum, time, layer_names, timings (seconds per phase): static.
    """

    steps: jax.Array
    fx_train: jax.Array
    fx_test: jax.Array | None
    fx_train_lin: jax.Array
    fx_test_lin: jax.Array | None
    fx_train_eq8: jax.Array
    fx_test_eq8: jax.Array | None
    fx_train_lin_eq8: jax.Array
    fx_test_lin_eq8: jax.Array | None
    loss: jax.Array
    loss_lin: jax.Array
    test_loss: jax.Array | None
    test_loss_lin: jax.Array | None
    train_gap: jax.Array
    test_gap: jax.Array | None
    eq8_train_gap: jax.Array
    eq8_test_gap: jax.Array | None
    lin_consistency_train: jax.Array
    lin_consistency_test: jax.Array | None
    weight_gap: jax.Array
    weight_gap_layers: jax.Array
    weight_change: jax.Array
    weight_change_lin: jax.Array
    kernel_drift: jax.Array
    max_learning_rate: jax.Array
    spectrum: spectral.Spectrum
    final_params: Any
    learning_rate: float = struct.field(pytree_node=False, default=1.0)
    momentum: float = struct.field(pytree_node=False, default=0.0)
    time: str = struct.field(pytree_node=False, default="discrete")
    layer_names: tuple = struct.field(pytree_node=False, default=())
    timings: tuple = struct.field(pytree_node=False, default=())

    def summary(self) -> dict[str, float | bool]:
        """Scalar digest (Python floats/bools), the numbers a sweep stores.

        ``*_gap`` = max over recorded steps (NaN read as inf: a side that
        diverged is infinitely far), ``*_final`` = at the last step;
        ``weight_gap`` = max over steps with ``θ_t ≠ θ₀``;
        ``lin_consistency`` = max of the train and test round-off columns;
        ``lr_ratio`` = ``η / max_learning_rate``; ``linear_diverged`` when
        ``lr_ratio > 1`` in discrete time (gradient flow never diverges); ``real_diverged`` when the real loss ends non-finite
        or above its initial value.
        """

        def worst(x):
            if x is None:
                return float("nan")
            arr = np.asarray(x, dtype=np.float64)
            return float(np.max(np.where(np.isnan(arr), np.inf, arr)))

        def last(x):
            if x is None:
                return float("nan")
            v = float(np.asarray(x, dtype=np.float64)[-1])
            return float("inf") if np.isnan(v) else v

        loss = np.asarray(self.loss, dtype=np.float64)
        limit = float(self.max_learning_rate)
        ratio = self.learning_rate / limit if limit > 0 else float("inf")
        moved = np.asarray(self.weight_change, dtype=np.float64).sum(axis=1) > 0
        wg = np.asarray(self.weight_gap, dtype=np.float64)
        out: dict[str, float | bool] = {
            "train_gap": worst(self.train_gap),
            "test_gap": worst(self.test_gap),
            "train_gap_final": last(self.train_gap),
            "test_gap_final": last(self.test_gap),
            "eq8_train_gap": worst(self.eq8_train_gap),
            "eq8_test_gap": worst(self.eq8_test_gap),
            "lin_consistency": max(worst(self.lin_consistency_train), worst(self.lin_consistency_test))
            if self.lin_consistency_test is not None
            else worst(self.lin_consistency_train),
            "weight_gap": worst(wg[moved]) if moved.any() else 0.0,
            "weight_gap_final": last(wg),
            "kernel_drift": last(jnp.atleast_1d(self.kernel_drift)),
            "loss_initial": float(loss[0]),
            "loss_final": last(loss),
            "loss_lin_final": last(self.loss_lin),
            "test_loss_final": last(self.test_loss),
            "test_loss_lin_final": last(self.test_loss_lin),
            "learning_rate": self.learning_rate,
            "max_learning_rate": limit,
            "lr_ratio": ratio,
            "linear_diverged": bool(self.time == "discrete" and ratio > 1.0),
            "real_diverged": bool(not np.isfinite(loss[-1]) or loss[-1] > loss[0]),
        }
        change = np.asarray(self.weight_change, dtype=np.float64)[-1]
        for name, value in zip(self.layer_names, change):
            out[f"weight_change[{name}]"] = float(value)
        return out


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


class _StaticFn:
    """Hashable-by-content wrapper so jit caches across calls with the same model."""

    def __init__(self, apply_fn, layer_of_leaf, num_layers):
        self.apply_fn, self.layer_of_leaf, self.num_layers = apply_fn, layer_of_leaf, num_layers

    def _key(self):
        return (self.apply_fn, self.layer_of_leaf, self.num_layers)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return type(other) is type(self) and other._key() == self._key()


class _WeightGapRecorder(_StaticFn):
    """In-training record: per-layer ``‖θ_t − θ₀‖²`` and ``‖θ_t − θ^lin_t‖²`` (no weights kept).

    ``θ^lin_t − θ₀ = −Jᵀα_t`` is rebuilt at each recorded step from
    ``α[slot]`` by one VJP at θ₀, so memory stays O(P).
    """

    def __call__(self, slot, params, aux):
        params0, x, alpha = aux
        out, vjp = jax.vjp(lambda p: self.apply_fn(p, x), params0)
        (jt_alpha,) = vjp(alpha[slot].astype(out.dtype))
        delta = jax.tree_util.tree_map(lambda p, p0: p - p0, params, params0)
        gap = jax.tree_util.tree_map(lambda d, j: d + j.astype(d.dtype), delta, jt_alpha)
        return {
            "delta_sq": _layer_sq_norms(delta, self.layer_of_leaf, self.num_layers),
            "gap_sq": _layer_sq_norms(gap, self.layer_of_leaf, self.num_layers),
        }


class _Eq8Evaluator(_StaticFn):
    """For every α_t: θ^lin_t, then ``f``, ``f_lin`` at it on train/test and per-layer ‖θ^lin_t − θ₀‖²."""

    def __call__(self, params0, x, x_test, alpha):
        out, vjp = jax.vjp(lambda p: self.apply_fn(p, x), params0)
        f_lin = linearize(self.apply_fn, params0)

        def one(a):
            (jt_alpha,) = vjp(a.astype(out.dtype))
            theta = jax.tree_util.tree_map(lambda p0, j: p0 - j.astype(p0.dtype), params0, jt_alpha)
            delta = jax.tree_util.tree_map(lambda p, p0: p - p0, theta, params0)
            res = {
                "train": self.apply_fn(theta, x),
                "train_lin": f_lin(theta, x),
                "delta_sq": _layer_sq_norms(delta, self.layer_of_leaf, self.num_layers),
            }
            if x_test is not None:
                res["test"] = self.apply_fn(theta, x_test)
                res["test_lin"] = f_lin(theta, x_test)
            return res

        return jax.lax.map(one, alpha)


_eq8_jit = jax.jit(lambda ev, params0, x, x_test, alpha: ev(params0, x, x_test, alpha), static_argnums=0)
_apply_jit = jax.jit(lambda apply_fn, params, x: apply_fn(params, x), static_argnums=0)


@functools.partial(jax.jit, static_argnames=("diag_reg_absolute",))
def _lam_max_jit(k_tt, diag_reg, *, diag_reg_absolute):
    mat = k_tt if k_tt.ndim == 2 else flatten_kernel(k_tt)
    return spectral.spectrum(mat, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute).max_eigenvalue


@functools.partial(jax.jit, static_argnames=("time", "diag_reg_absolute", "momentum", "steps"))
def _closed_form_jit(k_tt, y, fx0, t, k_st, fx0_test, learning_rate, diag_reg, *, time, diag_reg_absolute,
                     momentum, steps):
    """Eq. 9/10 outputs, α_t and the Eq. 9 loss at every step, compiled as one program."""
    common = dict(k_test_train=k_st, fx_test_0=fx0_test, learning_rate=learning_rate,
                  diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute)
    if momentum > 0:
        sol = heavy_ball_solve(k_tt, y, fx0, t, momentum=momentum, **common)
    else:
        sol = solve(k_tt, y, fx0, t, time=time, **common)
    r0 = (fx0 - y).astype(sol.train.dtype)
    r0_cols = r0 if k_tt.ndim == 2 else r0.reshape(sol.n, 1)
    loss_lin = _lin_loss_curve(sol.spectrum, r0_cols, steps, learning_rate=learning_rate,
                               momentum=momentum, time=time, n=sol.n)
    return sol.train, sol.test, sol.alpha, sol.spectrum, loss_lin


@functools.partial(jax.jit, static_argnums=(2,))
def _drift_jit(k_end, k_all, n_train):
    k0, k1 = k_all[:n_train, :n_train], k_end[:n_train, :n_train]
    return _ratio(jnp.linalg.norm((k1 - k0).ravel()), jnp.linalg.norm(k0.ravel()))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _layer_norms_jit(params, layer_of_leaf, num_layers):
    return _layer_sq_norms(params, layer_of_leaf, num_layers)


@jax.jit
def _metrics_jit(fx0, y, fx0_test, y_test, lin_train, lin_test, fx_train, fx_test, eq8, records, norm0_sq):
    """Every discrepancy of :func:`compare` from the recorded arrays (definitions there)."""
    out = {}
    d_train = jnp.linalg.norm((fx0 - y).ravel())
    out["train_gap"] = relative_gap(fx_train, lin_train, d_train)
    out["eq8_train_gap"] = relative_gap(eq8["train"], lin_train, d_train)
    out["cons_train"] = relative_gap(eq8["train_lin"], lin_train, d_train)
    for name in ("test_gap", "eq8_test_gap", "cons_test", "test_loss", "test_loss_lin"):
        out[name] = None
    if fx0_test is not None:
        if y_test is not None:
            d_test = jnp.linalg.norm((fx0_test - y_test).ravel())
        else:
            moved = lin_test - fx0_test[None]
            d_test = jnp.max(jnp.sqrt(jnp.sum(jnp.square(moved).reshape(moved.shape[0], -1), axis=1)))
        out["test_gap"] = relative_gap(fx_test, lin_test, d_test)
        out["eq8_test_gap"] = relative_gap(eq8["test"], lin_test, d_test)
        out["cons_test"] = relative_gap(eq8["test_lin"], lin_test, d_test)
        if y_test is not None:
            out["test_loss"] = jax.vmap(mse_loss, in_axes=(0, None))(fx_test, y_test)
            out["test_loss_lin"] = jax.vmap(mse_loss, in_axes=(0, None))(lin_test, y_test)
    gap_sq, delta_sq = records["gap_sq"], records["delta_sq"]
    out["weight_gap"] = _ratio(jnp.sqrt(jnp.sum(gap_sq, axis=1)), jnp.sqrt(jnp.sum(delta_sq, axis=1)))
    out["weight_gap_layers"] = _ratio(jnp.sqrt(gap_sq), jnp.sqrt(delta_sq))
    out["weight_change"] = _ratio(jnp.sqrt(delta_sq), jnp.sqrt(norm0_sq)[None])
    out["weight_change_lin"] = _ratio(jnp.sqrt(eq8["delta_sq"]), jnp.sqrt(norm0_sq)[None])
    return out


def _block(tree):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def _lin_loss_curve(spec, r0_cols, steps, *, learning_rate, momentum, time, n):
    """Eq. 9 train loss at every step 0 … steps from the spectrum: ``Σ (E(λ_m, s) (Vᵀr₀)_m)² / (2n)``."""
    coef_sq = jnp.sum(jnp.square(spec.eigenvectors.T @ r0_cols), axis=1)  # (m,)
    lam = spec.eigenvalues
    if momentum > 0:
        e = heavy_ball_decay_curve(lam, steps, learning_rate=learning_rate, momentum=momentum, n=n)
    else:
        s = jnp.arange(steps + 1, dtype=lam.dtype)[:, None]
        e = spectral.decay(lam, s, learning_rate=learning_rate, n=n, time=time)
    e = jnp.where(spec.null, 1.0, e)
    return jnp.sum(jnp.square(e) * coef_sq, axis=1) / (2.0 * n)


# --------------------------------------------------------------------------- #
# the comparison
# --------------------------------------------------------------------------- #


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
    ntk_batch_size: int | str | None = "auto",
) -> Comparison:
    """Train the real network and compare it with its linearization at the recorded steps.

    Real training: ``optax.sgd(η)`` (``optax.sgd(η, momentum=β)`` when
    ``momentum`` > 0), full batch unless ``batch_size`` (the predictions are
    always for full-batch descent, so minibatch noise counts as discrepancy).
    Predictions from the empirical NTK Θ₀ at θ₀, one eigendecomposition:
    Eq. 9/10 (discrete time ``(I − ηΘ/n)^t`` by default, the exact linear
    counterpart of the real steps; ``time="continuous"`` uses ``exp(−ηΘt/n)``;
    with momentum the heavy-ball recurrence of :mod:`ntkdyn.momentum`) and
    Eq. 8 weights ``θ^lin_t = θ₀ − Jᵀ α_t``.

    Metrics (``‖·‖`` is the Frobenius norm over all inputs and outputs):

    * ``train_gap[t] = ‖f(θ_t, X) − f^lin_t(X)‖ / ‖f(θ₀, X) − Y‖``
    * ``test_gap[t]  = ‖f(θ_t, X*) − f^lin_t(X*)‖ / D*``, with
      ``D* = ‖f(θ₀, X*) − Y*‖`` when ``y_test`` is given, else
      ``D* = max_t ‖f^lin_t(X*) − f(θ₀, X*)‖`` (the predicted movement)
    * ``eq8_*_gap[t]``: the same with ``f(θ^lin_t, ·)`` in place of the real
      outputs — how nonlinear the network is along the predicted path
    * ``lin_consistency_*[t]``: the same with ``f_lin(θ^lin_t, ·)`` — Eq. 8
      against Eq. 9/10; round-off (≈ eps·cond) whatever the width
    * ``weight_gap[t] = ‖θ_t − θ^lin_t‖ / ‖θ_t − θ₀‖`` (0 where both vanish),
      per layer in ``weight_gap_layers``
    * ``weight_change[t, l] = ‖θ^l_t − θ^l_0‖ / ‖θ^l_0‖`` (real), and
      ``weight_change_lin`` for the Eq. 8 weights
    * ``kernel_drift = ‖Θ(θ_T) − Θ(θ₀)‖_F / ‖Θ(θ₀)‖_F`` on X, T = ``steps``
    * ``loss`` / ``loss_lin``: ``L(θ_s)`` and ``‖f^lin_s − Y‖²/(2n)`` for every s

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)`` (see :func:`ntkdyn.models.as_apply_fn`).
      params0: θ₀.
      x_train, y_train: (N, ...) and (N, K).
      steps: number of real steps; learning_rate: η > 0.
      lr_relative: read ``learning_rate`` as a multiple of the linearized
        stability limit ``2(1+β)n/λ_max`` of Θ₀ (so 1.0 is the edge).
      x_test, y_test: optional test inputs (M, ...) and targets (M, K).
      record_at: recorded steps (default log-spaced, with 0 and ``steps``).
      time: ``"discrete"`` (default) or ``"continuous"`` (plain GD only).
      momentum: β in [0, 1) (heavy ball, discrete time).
      batch_size, seed: minibatch SGD for the real network.
      diag_reg, diag_reg_absolute: kernel regularizer for the predictions.
      trace_outputs: predict with the output-traced kernel (exact for K = 1).
      ntk_method, ntk_batch_size: passed to :func:`ntkdyn.empirical_ntk`.

    Returns:
      :class:`Comparison`. Above the stability limit the linearized side holds
      inf/NaN and the real side whatever training did; nothing raises.
    """
    spectral._check_time(time)
    beta = _check_momentum(momentum)
    if beta > 0 and time != "discrete":
        raise ValueError(f"time: heavy-ball momentum is only defined in discrete time, got time={time!r}")
    x_train, y_train, x_test, steps, learning_rate, batch_size = _validate(
        apply_fn, params0, x_train, y_train, x_test, steps, learning_rate, None, batch_size, seed
    )
    if y_test is not None:
        if x_test is None:
            raise ValueError("y_test: given without x_test")
        y_test = jnp.asarray(y_test)
        want = (x_test.shape[0], y_train.shape[1])
        if y_test.shape != want:
            raise ValueError(f"y_test: expected shape {want}, got {tuple(y_test.shape)}")
    recorded = _check_record_at(record_at, steps)
    names, layer_of_leaf = layer_groups(params0)
    timings: dict[str, float] = {}

    # --- kernel at θ₀ -------------------------------------------------------
    # one kernel on X ∪ X* gives Θ(X, X) and Θ(X*, X) from one set of Jacobians,
    # and the same compiled tiles serve the drift kernel at θ_T below
    tic = _time.perf_counter()
    ntk = dict(trace_outputs=trace_outputs, method=ntk_method, batch_size=ntk_batch_size)
    n_train = x_train.shape[0]
    x_all = x_train if x_test is None else jnp.concatenate([x_train, x_test.astype(x_train.dtype)], axis=0)
    k_all = empirical_ntk(apply_fn, params0, x_all, **ntk)
    k_tt = k_all[:n_train, :n_train]
    k_st = None if x_test is None else k_all[n_train:, :n_train]
    fx0 = _apply_jit(apply_fn, params0, x_train)
    fx0_test = None if x_test is None else _apply_jit(apply_fn, params0, x_test)
    _block((k_tt, k_st, fx0, fx0_test))
    timings["ntk"] = _time.perf_counter() - tic

    # --- eigendecomposition: stability limit (and η when it is relative) ----
    tic = _time.perf_counter()
    n = fx0.shape[0] * fx0.shape[1]
    lam_max = float(_lam_max_jit(k_tt, diag_reg, diag_reg_absolute=diag_reg_absolute))
    limit = (1.0 + beta) * 2.0 * n / lam_max if lam_max > 0 else float("inf")
    timings["eigh"] = _time.perf_counter() - tic
    if lr_relative:
        if not np.isfinite(limit):
            raise ValueError("lr_relative: the kernel is zero, so there is no stability limit to scale by")
        learning_rate = learning_rate * limit

    # --- closed form (Eq. 9/10 and α_t for Eq. 8) ----------------------------
    tic = _time.perf_counter()
    t = jnp.asarray(recorded, dtype=fx0.dtype)
    lin_train, lin_test, alpha, spec, loss_lin = _block(_closed_form_jit(
        k_tt, y_train, fx0, t, k_st, fx0_test, learning_rate, diag_reg,
        time=time, diag_reg_absolute=diag_reg_absolute, momentum=beta, steps=steps,
    ))
    timings["solve"] = _time.perf_counter() - tic

    # --- real training -----------------------------------------------------
    tic = _time.perf_counter()
    optimizer = None if beta == 0 else optax.sgd(learning_rate, momentum=beta)
    recorder = _WeightGapRecorder(apply_fn, layer_of_leaf, len(names))
    run = _train(
        apply_fn, params0, x_train, y_train, steps=steps, learning_rate=learning_rate, optimizer=optimizer,
        batch_size=batch_size, record_at=recorded, x_test=x_test, seed=seed,
        indexed_record_fn=recorder, record_aux=(params0, x_train, alpha),
    )
    _block(run)
    timings["train"] = _time.perf_counter() - tic

    # --- Eq. 8 weights and the networks at them ------------------------------
    tic = _time.perf_counter()
    evaluator = _Eq8Evaluator(apply_fn, layer_of_leaf, len(names))
    eq8 = _block(_eq8_jit(evaluator, params0, x_train, x_test, alpha))
    timings["eq8"] = _time.perf_counter() - tic

    # --- kernel drift ------------------------------------------------------
    tic = _time.perf_counter()
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(run.final_params))
    if finite:
        k_end = empirical_ntk(apply_fn, run.final_params, x_all, **ntk)
        drift = _block(_drift_jit(k_end, k_all, n_train))
    else:  # training blew up: the kernel at θ_T is undefined, infinitely far from Θ₀
        drift = jnp.asarray(jnp.inf, k_tt.dtype)
    timings["ntk_final"] = _time.perf_counter() - tic

    m = _metrics_jit(
        fx0, y_train, fx0_test, y_test, lin_train, lin_test, run.fx_train, run.fx_test, eq8, run.records,
        _layer_norms_jit(params0, layer_of_leaf, len(names)),
    )

    return Comparison(
        steps=run.steps,
        fx_train=run.fx_train,
        fx_test=run.fx_test,
        fx_train_lin=lin_train,
        fx_test_lin=lin_test,
        fx_train_eq8=eq8["train"],
        fx_test_eq8=eq8.get("test"),
        fx_train_lin_eq8=eq8["train_lin"],
        fx_test_lin_eq8=eq8.get("test_lin"),
        loss=run.loss,
        loss_lin=loss_lin,
        test_loss=m["test_loss"],
        test_loss_lin=m["test_loss_lin"],
        train_gap=m["train_gap"],
        test_gap=m["test_gap"],
        eq8_train_gap=m["eq8_train_gap"],
        eq8_test_gap=m["eq8_test_gap"],
        lin_consistency_train=m["cons_train"],
        lin_consistency_test=m["cons_test"],
        weight_gap=m["weight_gap"],
        weight_gap_layers=m["weight_gap_layers"],
        weight_change=m["weight_change"],
        weight_change_lin=m["weight_change_lin"],
        kernel_drift=drift,
        max_learning_rate=jnp.asarray(limit),
        spectrum=spec,
        final_params=run.final_params,
        learning_rate=float(learning_rate),
        momentum=beta,
        time=time,
        layer_names=names,
        timings=tuple(timings.items()),
    )
