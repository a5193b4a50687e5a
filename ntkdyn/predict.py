"""``ntkdyn.predict``: from a model and data to its linearized training trajectory.

One call computes the empirical NTK at θ₀, eigendecomposes it once, and
evaluates the closed-form dynamics (Eq. 9/10, optionally Eq. 8 weights) at the
requested times.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import struct

from ntkdyn._checks import as_float_array, check_batch, check_finite
from ntkdyn.dynamics import _check_times, _drop_time_axis, solve, weights_from_alpha
from ntkdyn.models import as_apply_fn
from ntkdyn.ntk import empirical_ntk, output_shape
from ntkdyn.spectral import Spectrum

__all__ = ["Prediction", "predict"]


@struct.dataclass
class Prediction:
    """A linearized training trajectory.

    Attributes:
      t: the times, () or (T,), in steps.
      fx_train: f_t(X), (N, K) or (T, N, K).
      fx_test: f_t(x*), (Nt, K) or (T, Nt, K), or None.
      params: Eq. 8 weights θ_t (params pytree, leading T axis for 1-D t) when
        ``weights=True``, else None.
      ntk_train_train: Θ(X, X) used, (N, N, K, K) or traced (N, N).
      ntk_test_train: Θ(x*, X) used, or None.
      spectrum: the :class:`~ntkdyn.spectral.Spectrum` of the (regularized) kernel.
      fx_train_0, fx_test_0: the outputs at θ₀.
      learning_rate: η; time: "continuous" or "discrete" (static).
    """

    t: jax.Array
    fx_train: jax.Array
    fx_test: jax.Array | None
    params: Any
    ntk_train_train: jax.Array
    ntk_test_train: jax.Array | None
    spectrum: Spectrum
    fx_train_0: jax.Array
    fx_test_0: jax.Array | None
    learning_rate: float = struct.field(pytree_node=False, default=1.0)
    time: str = struct.field(pytree_node=False, default="continuous")


def _targets(y, n_train: int, outputs: int) -> jax.Array:
    y = as_float_array("y", y)
    if y.ndim == 1 and outputs == 1 and y.shape[0] == n_train:
        y = y[:, None]
    if y.shape != (n_train, outputs):
        raise ValueError(f"y: expected shape {(n_train, outputs)} to match the model's outputs, got {tuple(y.shape)}")
    check_finite("y", y)
    return y


def _test_inputs(x_test, x) -> jax.Array:
    x_test = check_batch("x_test", x_test)
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"x_test: expected inputs of trailing shape {tuple(x.shape[1:])} like x, got {tuple(x_test.shape[1:])}"
        )
    check_finite("x_test", x_test)
    return x_test


def predict(
    params: Any,
    x: jax.Array,
    y: jax.Array,
    t,
    *,
    apply_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    x_test: jax.Array | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    trace_outputs: bool = False,
    weights: bool = False,
    rcond: float | None = None,
    ntk_method: str = "auto",
    batch_size: int | None = None,
) -> Prediction:
    """Predict training of ``params`` on ``(x, y)`` by gradient descent, in closed form.

    Args:
      params: a flax ``nnx.Module`` (``apply_fn`` not needed), a params pytree
        with ``apply_fn(params, x) -> (N, K)``, or linen variables with the
        linen module (or its ``apply``) as ``apply_fn``.
      x: training inputs (N, ...); y: targets (N, K) (or (N,) when K = 1).
      t: time(s) in steps, scalar or 1-D, ``jnp.inf`` allowed.
      x_test: optional test inputs (Nt, ...).
      learning_rate: η; loss ``1/(2·N·K)‖f − Y‖²``.
      diag_reg, diag_reg_absolute, rcond: regularization and cut-off (see
        :func:`ntkdyn.function_space`).
      time: ``"continuous"`` (gradient flow) or ``"discrete"`` (GD steps).
      trace_outputs: use the output-traced kernel ``Θ_tr ⊗ I_K`` (cheaper;
        exact when K = 1) instead of the full one.
      weights: also return the Eq. 8 weights θ_t (one VJP, vmapped over t).
      ntk_method, batch_size: passed to :func:`ntkdyn.empirical_ntk`.

    Returns:
      :class:`Prediction`.
    """
    apply_fn, p0 = as_apply_fn(params, apply_fn)
    x = check_batch("x", x)
    check_finite("x", x)
    n_train, outputs = output_shape(apply_fn, p0, x)
    y = _targets(y, n_train, outputs)
    times, scalar = _check_times(t)
    fx_train_0 = apply_fn(p0, x)
    ntk = dict(trace_outputs=trace_outputs, method=ntk_method, batch_size=batch_size)
    k_tt = empirical_ntk(apply_fn, p0, x, **ntk)
    k_st = fx_test_0 = None
    if x_test is not None:
        x_test = _test_inputs(x_test, x)
        fx_test_0 = apply_fn(p0, x_test)
        k_st = empirical_ntk(apply_fn, p0, x_test, x, **ntk)
    sol = solve(
        k_tt, y, fx_train_0, t, k_test_train=k_st, fx_test_0=fx_test_0, learning_rate=learning_rate,
        diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, rcond=rcond,
    )
    theta = weights_from_alpha(apply_fn, p0, x, sol.alpha) if weights else None
    return Prediction(
        t=times[0] if scalar else times,
        fx_train=_drop_time_axis(sol.train, scalar),
        fx_test=_drop_time_axis(sol.test, scalar),
        params=_drop_time_axis(theta, scalar),
        ntk_train_train=k_tt,
        ntk_test_train=k_st,
        spectrum=sol.spectrum,
        fx_train_0=fx_train_0,
        fx_test_0=fx_test_0,
        learning_rate=learning_rate,
        time=time,
    )
