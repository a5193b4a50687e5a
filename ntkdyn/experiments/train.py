"""Real training of the (nonlinear) network with optax.

Loss (docs/conventions): ``L(θ) = 1/(2·N·K) · Σ (f(θ, X) − Y)² = mean(optax.l2_loss(f, Y))``;
``loss="cross_entropy"`` trains classification targets (rows of class
probabilities, e.g. one-hot) on ``L(θ) = −1/N · Σ_i Σ_k Y_ik log softmax(f(θ, x_i))_k``
instead (:data:`LOSSES`). The default optimizer is full-batch gradient descent ``θ ← θ − η ∇L(θ)``
(``optax.sgd(η)``), the dynamics Lee et al. (2019) linearize; ``batch_size``
switches to shuffled minibatch SGD (every epoch a fresh permutation, the
incomplete last batch dropped) and any optax optimizer can be passed, e.g.
``optax.sgd(η, momentum=β)`` for heavy-ball momentum. :data:`OPTIMIZERS`
names the ones the sweep builds from ``(η, β)``: ``sgd``, ``momentum``, ``adam``.

The whole run is one jitted ``lax.scan`` over steps. Outputs (and, when
asked, weights and a user ``record_fn``) are written into preallocated
buffers only at the recorded steps, so memory is ``O(R·(N+M)·K)`` (plus
``R·P`` with ``keep_params``) for R recorded steps, whatever ``steps`` is.

The model is a :class:`ntkdyn.models.Model` pytree passed to the compiled
loop as an ordinary argument: every model of one architecture (another seed,
another nnx module of the same graph) reuses the compiled loop, and so does
every learning rate, data set of the same shape and set of recorded steps of
the same length.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ntkdyn import _validate
from ntkdyn.kernels import output_shape
from ntkdyn.kernels.empirical import check_rows
from ntkdyn.models import Model, as_model

__all__ = [
    "TrainResult",
    "train",
    "default_record_steps",
    "record_steps",
    "mse_loss",
    "cross_entropy_loss",
    "LOSSES",
    "OPTIMIZERS",
    "make_optimizer",
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@struct.dataclass
class TrainResult:
    """What :func:`train` recorded.

    Attributes:
      steps: (R,) int, the recorded steps s (0 = initialization).
      fx_train: (R, N, K) network outputs ``f(θ_s, X)``.
      fx_test: (R, M, K) ``f(θ_s, X*)``, or None without ``x_test``.
      loss: (steps + 1,) full training-set loss ``L(θ_s)`` for s = 0 … steps
        (for minibatch SGD too: it is the full-batch loss, not the batch's).
      params: params pytree with a leading (R,) axis (``keep_params``), else None.
      records: ``record_fn`` outputs stacked on a leading (R,) axis, else None.
      final_params: ``θ_steps``.
    """

    steps: jax.Array
    fx_train: jax.Array
    fx_test: jax.Array | None
    loss: jax.Array
    params: Any
    records: Any
    final_params: Any


def mse_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
    """``1/(2·N·K) · Σ (fx − y)²`` — the loss every part of ntkdyn uses."""
    return jnp.mean(optax.l2_loss(fx, y))


def cross_entropy_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
    """``−1/N · Σ_i Σ_k y_ik log softmax(fx_i)_k``: cross-entropy of logits ``fx`` (N, K), probability rows ``y``."""
    return jnp.mean(optax.softmax_cross_entropy(fx, y))


# the training objectives by name: loss(fx (N, K), y (N, K)) -> scalar
LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "mse": mse_loss,
    "cross_entropy": cross_entropy_loss,
}


def _sgd(learning_rate, momentum: float = 0.0) -> optax.GradientTransformation:
    """``θ ← θ − η ∇L`` (``optax.sgd(η)``); heavy ball ``v ← βv + ∇L, θ ← θ − ηv`` when β > 0."""
    return optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None)


def _momentum(learning_rate, momentum: float = 0.0) -> optax.GradientTransformation:
    """Heavy ball ``v ← βv + ∇L, θ ← θ − ηv`` (``optax.sgd(η, momentum=β)``), β in (0, 1)."""
    if not momentum > 0:
        raise ValueError(f"momentum: the 'momentum' optimizer needs β in (0, 1), got {momentum!r}")
    return optax.sgd(learning_rate, momentum=momentum)


def _adam(learning_rate, momentum: float = 0.0) -> optax.GradientTransformation:
    """``optax.adam(η)`` with its defaults (b1 0.9, b2 0.999, eps 1e-8); takes no heavy-ball β."""
    if momentum:
        raise ValueError(f"momentum: adam takes no heavy-ball β, got {momentum!r} (its b1 is optax's default 0.9)")
    return optax.adam(learning_rate)


# optimizers by name, built from (η, β): make(learning_rate, momentum) -> GradientTransformation
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
}


def make_optimizer(name: str, learning_rate, momentum: float = 0.0) -> optax.GradientTransformation:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) with rate η (may be traced) and heavy-ball β."""
    _validate.choice("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name](learning_rate, momentum)


def default_record_steps(steps: int, num: int = 16) -> np.ndarray:
    """About ``num`` log-spaced steps in [0, steps], always with 0 and ``steps``.

    Returns a sorted, duplicate-free int array (``[0]`` when steps is 0).
    """
    steps = _validate.count("steps", steps, 0)
    num = _validate.count("num", num, 2)
    if steps == 0:
        return np.zeros(1, dtype=np.int64)
    inner = np.round(np.geomspace(1, steps, num - 1)).astype(np.int64)
    return np.unique(np.concatenate([[0], inner, [steps]]))


def record_steps(record_at: Sequence[int] | None, steps: int) -> np.ndarray:
    """The sorted, duplicate-free steps in [0, steps] that ``record_at`` asks for.

    ``None`` means :func:`default_record_steps`. ValueError naming ``record_at``
    for an empty list, non-integer steps or steps outside [0, steps].
    """
    if record_at is None:
        return default_record_steps(steps)
    arr = np.asarray(record_at)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"record_at: expected a non-empty 1-D list of steps, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"record_at: expected integer steps, got {record_at!r}")
        arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() > steps:
        raise ValueError(
            f"record_at: expected steps in [0, steps={steps}], got values from {arr.min()} to {arr.max()}"
        )
    return np.unique(arr.astype(np.int64))


def record_slots(recorded: np.ndarray, steps: int) -> jax.Array:
    """(steps + 1,) int32: the position of each step among ``recorded``, −1 where it is not recorded."""
    slots = np.full(steps + 1, -1, dtype=np.int32)
    slots[recorded] = np.arange(recorded.size, dtype=np.int32)
    return jnp.asarray(slots)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


class Inputs(NamedTuple):
    """Checked training inputs (see :func:`check_inputs`)."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array | None
    steps: int
    learning_rate: float | jax.Array | None
    batch_size: int | None
    seed: int
    output: jax.ShapeDtypeStruct  # f(θ₀, X)


def check_inputs(
    model: Model, params0, x_train, y_train, x_test, *, steps, learning_rate, optimizer, batch_size, seed,
    loss: str = "mse",
) -> Inputs:
    """Every eager check of :func:`train` (shared by :func:`ntkdyn.experiments.compare.compare`).

    Values are checked here, before anything is compiled: NaN/inf in the
    parameters or data, a non-positive or non-finite rate, sizes out of range.
    A concrete ``learning_rate`` (Python, NumPy or JAX scalar) becomes a
    Python float; a traced one passes through.
    """
    _validate.params_tree("params0", params0)
    steps = _validate.count("steps", steps, 0)
    x_train = _validate.batch("x_train", x_train)
    out = output_shape(model, params0, x_train)
    y_train = _validate.float_array("y_train", y_train)
    if y_train.shape != tuple(out):
        raise ValueError(
            f"y_train: expected shape {tuple(out)} (the shape of apply_fn(params0, x_train)), "
            f"got {tuple(y_train.shape)}"
        )
    _validate.finite("y_train", y_train)
    _validate.choice("loss", loss, LOSSES)
    if loss == "cross_entropy":
        probability_rows("y_train", y_train)
    if x_test is not None:
        x_test = _validate.batch("x_test", x_test)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"x_test: expected trailing shape {tuple(x_train.shape[1:])} to match x_train, "
                f"got {tuple(x_test.shape[1:])}"
            )
        check_rows(model, params0, x_train, x_test.shape[0], out[1])  # f(θ, X*) is recorded too
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer: expected an optax GradientTransformation, got {type(optimizer).__name__}")
    if learning_rate is None:
        if optimizer is None:
            raise ValueError(
                "learning_rate: required when no optimizer is given (the default is optax.sgd(learning_rate))"
            )
    else:
        _validate.positive_scalar("learning_rate", learning_rate)
        if _validate.is_concrete(learning_rate):
            learning_rate = float(np.asarray(learning_rate, dtype=np.float64))
    if batch_size is not None:
        n = x_train.shape[0]
        batch_size = _validate.count("batch_size", batch_size, 1)
        if batch_size > n:
            raise ValueError(f"batch_size: expected None or an integer in [1, N={n}], got {batch_size}")
    seed = _validate.count("seed", seed, 0)
    dtype = jax.eval_shape(model, params0, x_train).dtype
    return Inputs(x_train, y_train, x_test, steps, learning_rate, batch_size, seed,
                  jax.ShapeDtypeStruct(tuple(out), dtype))


def probability_rows(name: str, y) -> None:
    """ValueError naming ``name`` unless every row of a concrete ``y`` (N, K) is a probability vector.

    Cross-entropy targets: entries in [0, 1], rows summing to 1 (to 1e-4),
    e.g. one-hot class codes.
    """
    if not _validate.is_concrete(y):
        return
    arr = np.asarray(y, dtype=np.float64)
    if arr.min() < 0 or arr.max() > 1 or np.max(np.abs(arr.sum(axis=1) - 1.0)) > 1e-4:
        raise ValueError(
            f"{name}: loss='cross_entropy' needs rows of class probabilities (entries in [0, 1] summing to 1, "
            f"e.g. one-hot), got values in [{arr.min():.3g}, {arr.max():.3g}] with row sums from "
            f"{arr.sum(axis=1).min():.3g} to {arr.sum(axis=1).max():.3g}"
        )


# --------------------------------------------------------------------------- #
# the training loop
# --------------------------------------------------------------------------- #


def _tree_set(buf, slot, value):
    return jax.tree_util.tree_map(lambda b, v: b.at[slot].set(jnp.asarray(v, b.dtype)), buf, value)


def _alloc(template, num: int):
    return jax.tree_util.tree_map(lambda s: jnp.zeros((num, *s.shape), s.dtype), template)


def run(
    model: Model,
    params0,
    x,
    y,
    x_test,
    slots,
    key,
    learning_rate,
    *,
    optimizer: optax.GradientTransformation | None,
    steps: int,
    batch_size: int | None,
    num_records: int,
    keep_params: bool = False,
    record_fn: Callable[[Any], Any] | None = None,
    record_slot_fn: Callable[[jax.Array, Any], Any] | None = None,
    loss: str = "mse",
):
    """The training loop as a pure function of arrays (inputs checked by :func:`check_inputs`).

    ``slots`` is :func:`record_slots` of the recorded steps. At a recorded step
    the buffers receive ``f(θ_s, X)``, ``f(θ_s, X*)``, θ_s (``keep_params``),
    ``record_fn(θ_s)`` and ``record_slot_fn(slot, θ_s)`` (a hook for callers
    tracing this function inside their own program, e.g. comparing against
    per-step precomputed arrays). ``loss`` names the objective (:data:`LOSSES`).
    Returns ``(buffers, losses, θ_steps)``.
    """
    # built inside the trace so a new learning rate does not recompile
    opt = optax.sgd(learning_rate) if optimizer is None else optimizer
    objective = LOSSES[loss]
    n = x.shape[0]

    def record(slot, params, fx):
        out = {"fx_train": fx}
        if x_test is not None:
            out["fx_test"] = model(params, x_test)
        if keep_params:
            out["params"] = params
        if record_fn is not None:
            out["records"] = record_fn(params)
        if record_slot_fn is not None:
            out["slot_records"] = record_slot_fn(slot, params)
        return out

    template = jax.eval_shape(lambda p: record(jnp.zeros((), jnp.int32), p, model(p, x)), params0)
    buffers = _alloc(template, num_records)

    def write(bufs, slot, params, fx):
        return jax.lax.cond(
            slot >= 0,
            lambda b: _tree_set(b, slot, record(slot, params, fx)),
            lambda b: b,
            bufs,
        )

    def full_loss(params):
        fx = model(params, x)
        return objective(fx, y), fx

    if batch_size is not None:
        per_epoch = n // batch_size

        def batch_grad(params, s):
            epoch, pos = s // per_epoch, s % per_epoch
            perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
            idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)
            return jax.grad(lambda p: objective(model(p, x[idx]), y[idx]))(params)

    def body(carry, s):
        params, opt_state, bufs = carry
        if batch_size is None:
            (loss, fx), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        else:
            loss, fx = full_loss(params)
            grads = batch_grad(params, s)
        bufs = write(bufs, slots[s], params, fx)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, bufs), loss

    init = (params0, opt.init(params0), buffers)
    (params, _, buffers), losses = jax.lax.scan(body, init, jnp.arange(steps))
    loss_end, fx_end = full_loss(params)
    buffers = write(buffers, slots[steps], params, fx_end)
    losses = jnp.concatenate([losses, loss_end[None]])
    return buffers, losses, params


# The model is traced; the optimizer and record_fn are static (hashed by identity):
# reuse one optimizer object and one function across calls to reuse the compiled loop.
_run_jit = jax.jit(
    run, static_argnames=("optimizer", "steps", "batch_size", "num_records", "keep_params", "record_fn", "loss")
)


def train(
    apply_fn: ApplyFn,
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    steps: int,
    learning_rate: float | None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    record_at: Sequence[int] | None = None,
    x_test: jax.Array | None = None,
    seed: int = 0,
    keep_params: bool = False,
    record_fn: Callable[[Any], Any] | None = None,
    loss: str = "mse",
) -> TrainResult:
    """Train ``apply_fn`` from ``params0`` on ``L = mean(optax.l2_loss(f(θ, X), Y))`` (or cross-entropy).

    Update per step s = 0 … steps−1 (default optimizer, full batch)::

        θ_{s+1} = θ_s − η ∇L(θ_s),    ∇L = Jᵀ (f(θ_s, X) − Y) / (N·K)

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``, or a
        :class:`ntkdyn.models.Model` (from :func:`ntkdyn.models.as_apply_fn`).
      params0: initial parameters θ₀ (any pytree of finite float arrays).
      x_train: (N, ...) inputs; y_train: (N, K) targets.
      steps: number of optimizer updates (≥ 0).
      learning_rate: η of the default ``optax.sgd(η)`` (a Python, NumPy or JAX
        scalar > 0); required without ``optimizer``, informational with one.
      optimizer: any optax ``GradientTransformation`` (its own schedule and
        momentum apply); default ``optax.sgd(learning_rate)``. It is a static
        argument of the compiled loop: reuse one object to reuse the compilation.
      batch_size: None for full batch; an integer B ≤ N for shuffled minibatch
        SGD (``N // B`` batches per epoch, permutation from ``seed``).
      record_at: steps in [0, steps] at which to record (sorted, duplicates
        dropped); default :func:`default_record_steps` (log-spaced, with 0 and
        ``steps``). Step s is recorded before the s-th update, i.e. at θ_s.
      x_test: optional (M, ...) inputs whose outputs are recorded too.
      seed: minibatch shuffling seed (unused for full batch).
      keep_params: also record θ_s (memory R·P).
      record_fn: optional pure ``record_fn(params) -> pytree of arrays``,
        evaluated at every recorded step inside the compiled loop and stacked in
        ``records``. It is a static argument (hashed by identity): pass the same
        function object to reuse the compilation; it must not close over arrays
        that change between calls.
      loss: ``"mse"`` (default, the loss above) or ``"cross_entropy"``
        (softmax cross-entropy of the outputs as logits; ``y_train`` rows must
        be class probabilities, e.g. one-hot).

    Returns:
      :class:`TrainResult`. Divergent training is not an error: the recorded
      values then hold inf/NaN.
    """
    model = as_model(apply_fn)
    if record_fn is not None and not callable(record_fn):
        raise TypeError(f"record_fn: expected a callable record_fn(params) -> pytree, got {record_fn!r}")
    inputs = check_inputs(
        model, params0, x_train, y_train, x_test, steps=steps, learning_rate=learning_rate,
        optimizer=optimizer, batch_size=batch_size, seed=seed, loss=loss,
    )
    recorded = record_steps(record_at, inputs.steps)
    # η in the params' dtype, as optax.sgd(η) with a Python float would apply it
    lr_dtype = jnp.result_type(*jax.tree_util.tree_leaves(params0))
    lr = inputs.learning_rate
    lr = jnp.asarray(lr if lr is not None else 0.0, lr_dtype)
    buffers, losses, final = _run_jit(
        model,
        params0,
        inputs.x_train,
        inputs.y_train,
        inputs.x_test,
        record_slots(recorded, inputs.steps),
        jax.random.key(inputs.seed),
        lr,
        optimizer=optimizer,
        steps=inputs.steps,
        batch_size=inputs.batch_size,
        num_records=int(recorded.size),
        keep_params=bool(keep_params),
        record_fn=record_fn,
        loss=loss,
    )
    return TrainResult(
        steps=jnp.asarray(recorded),
        fx_train=buffers["fx_train"],
        fx_test=buffers.get("fx_test"),
        loss=losses,
        params=buffers.get("params"),
        records=buffers.get("records"),
        final_params=final,
    )
