"""Real training of the (nonlinear) network with optax.

Loss (DESIGN.md): ``L(θ) = 1/(2·N·K) · Σ (f(θ, X) − Y)² = mean(optax.l2_loss(f, Y))``.
The default optimizer is full-batch gradient descent ``θ ← θ − η ∇L(θ)``
(``optax.sgd(η)``), the dynamics Lee et al. (2019) linearize; ``batch_size``
switches to shuffled minibatch SGD (every epoch a fresh permutation, the
incomplete last batch dropped) and any optax optimizer can be passed, e.g.
``optax.sgd(η, momentum=β)`` for heavy-ball momentum.

The whole run is one jitted ``lax.scan`` over steps. Outputs (and, when
asked, weights and a user ``record_fn``) are written into preallocated
buffers only at the recorded steps, so memory is ``O(R·(N+M)·K)`` (plus
``R·P`` with ``keep_params``) for R recorded steps, whatever ``steps`` is.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ntkdyn._checks import check_batch, check_finite, is_concrete
from ntkdyn.ntk import output_shape

__all__ = ["TrainResult", "train", "default_record_steps", "mse_loss"]

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


def default_record_steps(steps: int, num: int = 16) -> np.ndarray:
    """About ``num`` log-spaced steps in [0, steps], always with 0 and ``steps``.

    Returns a sorted, duplicate-free int array (``[0]`` when steps is 0).
    """
    steps = _check_steps(steps)
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2:
        raise ValueError(f"num: expected an integer >= 2, got {num!r}")
    if steps == 0:
        return np.zeros(1, dtype=np.int64)
    inner = np.round(np.geomspace(1, steps, num - 1)).astype(np.int64)
    return np.unique(np.concatenate([[0], inner, [steps]]))


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps!r}")
    return int(steps)


def _check_record_at(record_at, steps: int) -> np.ndarray:
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


def _check_learning_rate(learning_rate) -> float:
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.floating, np.integer)):
        raise TypeError(f"learning_rate: expected a positive float, got {learning_rate!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate: expected a finite float > 0, got {learning_rate!r}")
    return float(learning_rate)


def _tree_set(buf, slot, value):
    return jax.tree_util.tree_map(lambda b, v: b.at[slot].set(jnp.asarray(v, b.dtype)), buf, value)


def _alloc(template, num: int):
    return jax.tree_util.tree_map(lambda s: jnp.zeros((num, *s.shape), s.dtype), template)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "optimizer", "steps", "batch_size", "record_fn", "num_records", "keep_params"),
)
def _run(
    params0,
    x,
    y,
    x_test,
    slots,
    key,
    learning_rate,
    record_aux,
    *,
    apply_fn,
    optimizer,
    steps,
    batch_size,
    record_fn,
    num_records,
    keep_params,
):
    # built inside the trace so a new learning rate does not recompile
    opt = optax.sgd(learning_rate) if optimizer is None else optimizer
    n = x.shape[0]

    def record(slot, params, fx):
        out = {"fx_train": fx}
        if x_test is not None:
            out["fx_test"] = apply_fn(params, x_test)
        if keep_params:
            out["params"] = params
        if record_fn is not None:
            out["records"] = record_fn(slot, params, record_aux)
        return out

    template = jax.eval_shape(lambda p: record(jnp.zeros((), jnp.int32), p, apply_fn(p, x)), params0)
    buffers = _alloc(template, num_records)

    def write(bufs, slot, params, fx):
        return jax.lax.cond(
            slot >= 0,
            lambda b: _tree_set(b, slot, record(slot, params, fx)),
            lambda b: b,
            bufs,
        )

    def full_loss(params):
        fx = apply_fn(params, x)
        return mse_loss(fx, y), fx

    if batch_size is not None:
        per_epoch = n // batch_size

        def batch_grad(params, s):
            epoch, pos = s // per_epoch, s % per_epoch
            perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
            idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)
            return jax.grad(lambda p: mse_loss(apply_fn(p, x[idx]), y[idx]))(params)

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


def _validate(apply_fn, params0, x_train, y_train, x_test, steps, learning_rate, optimizer, batch_size, seed):
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    if not jax.tree_util.tree_leaves(params0):
        raise ValueError("params0: the pytree has no array leaves; there is nothing to train")
    steps = _check_steps(steps)
    x_train = check_batch("x_train", x_train)
    y_train = jnp.asarray(y_train)
    out = output_shape(apply_fn, params0, x_train)
    if y_train.shape != out:
        raise ValueError(
            f"y_train: expected shape {out} (the shape of apply_fn(params0, x_train)), got {tuple(y_train.shape)}"
        )
    if x_test is not None:
        x_test = check_batch("x_test", x_test)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"x_test: expected trailing shape {tuple(x_train.shape[1:])} to match x_train, "
                f"got {tuple(x_test.shape[1:])}"
            )
    if is_concrete(x_train):
        check_finite("x_train", x_train)
        check_finite("y_train", y_train)
        if x_test is not None:
            check_finite("x_test", x_test)
    if optimizer is None:
        if learning_rate is None:
            raise ValueError("learning_rate: required when no optimizer is given (the default is optax.sgd(learning_rate))")
        learning_rate = _check_learning_rate(learning_rate)
    elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer: expected an optax GradientTransformation, got {type(optimizer).__name__}")
    elif learning_rate is not None:
        learning_rate = _check_learning_rate(learning_rate)
    if batch_size is not None:
        n = x_train.shape[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size: expected None or an integer in [1, N={n}], got {batch_size!r}")
        batch_size = int(batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return x_train, y_train, x_test, steps, learning_rate, batch_size


def _train(
    apply_fn: ApplyFn,
    params0: Any,
    x_train,
    y_train,
    *,
    steps: int,
    learning_rate: float | None,
    optimizer=None,
    batch_size: int | None = None,
    record_at=None,
    x_test=None,
    seed: int = 0,
    keep_params: bool = False,
    indexed_record_fn: Callable[[jax.Array, Any, Any], Any] | None = None,
    record_aux: Any = None,
) -> TrainResult:
    """:func:`train` with ``indexed_record_fn(slot, params, record_aux)``.

    ``slot`` is the position of the current step in the recorded steps, so a
    caller can compare against per-step precomputed data (``record_aux``, a
    traced pytree: new values do not recompile) without keeping the weights.
    """
    x_train, y_train, x_test, steps, learning_rate, batch_size = _validate(
        apply_fn, params0, x_train, y_train, x_test, steps, learning_rate, optimizer, batch_size, seed
    )
    recorded = _check_record_at(record_at, steps)
    slots = np.full(steps + 1, -1, dtype=np.int32)
    slots[recorded] = np.arange(recorded.size, dtype=np.int32)
    # η in the params' dtype, as optax.sgd(η) with a Python float would apply it
    lr_dtype = jnp.result_type(*jax.tree_util.tree_leaves(params0))
    lr = jnp.asarray(learning_rate if learning_rate is not None else 0.0, lr_dtype)
    buffers, losses, final = _run(
        params0,
        x_train,
        y_train,
        x_test,
        jnp.asarray(slots),
        jax.random.key(seed),
        lr,
        record_aux,
        apply_fn=apply_fn,
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        record_fn=indexed_record_fn,
        num_records=int(recorded.size),
        keep_params=bool(keep_params),
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


def _params_only(record_fn):
    # a stable wrapper per record_fn keeps jit's cache warm across calls
    return _ParamsOnly(record_fn)


class _ParamsOnly:
    """Adapts ``record_fn(params)`` to the indexed form; hashes like the wrapped function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, slot, params, aux):
        del slot, aux
        return self.fn(params)

    def __hash__(self):
        return hash(self.fn)

    def __eq__(self, other):
        return isinstance(other, _ParamsOnly) and other.fn is self.fn


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
) -> TrainResult:
    """Train ``apply_fn`` from ``params0`` on ``L = mean(optax.l2_loss(f(θ, X), Y))``.

    Update per step s = 0 … steps−1 (default optimizer, full batch)::

        θ_{s+1} = θ_s − η ∇L(θ_s),    ∇L = Jᵀ (f(θ_s, X) − Y) / (N·K)

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``.
      params0: initial parameters θ₀ (any pytree of float arrays).
      x_train: (N, ...) inputs; y_train: (N, K) targets.
      steps: number of optimizer updates (≥ 0).
      learning_rate: η of the default ``optax.sgd(η)``; required without
        ``optimizer``, informational with one.
      optimizer: any optax ``GradientTransformation`` (its own schedule and
        momentum apply); default ``optax.sgd(learning_rate)``.
      batch_size: None for full batch; an integer B ≤ N for shuffled minibatch
        SGD (``N // B`` batches per epoch, permutation from ``seed``).
      record_at: steps in [0, steps] at which to record (sorted, duplicates
        dropped); default :func:`default_record_steps` (log-spaced, with 0 and
        ``steps``). Step s is recorded before the s-th update, i.e. at θ_s.
      x_test: optional (M, ...) inputs whose outputs are recorded too.
      seed: minibatch shuffling seed (unused for full batch).
      keep_params: also record θ_s (memory R·P).
      record_fn: optional ``record_fn(params) -> pytree of arrays``, evaluated
        at every recorded step (inside the jitted loop), stacked in ``records``.

    Returns:
      :class:`TrainResult`. Divergent training is not an error: the recorded
      values then hold inf/NaN.
    """
    if record_fn is not None and not callable(record_fn):
        raise TypeError(f"record_fn: expected a callable record_fn(params) -> pytree, got {record_fn!r}")
    return _train(
        apply_fn,
        params0,
        x_train,
        y_train,
        steps=steps,
        learning_rate=learning_rate,
        optimizer=optimizer,
        batch_size=batch_size,
        record_at=record_at,
        x_test=x_test,
        seed=seed,
        keep_params=keep_params,
        indexed_record_fn=None if record_fn is None else _params_only(record_fn),
    )
