"""``ntkdyn.predict``: from a model and data to its linearized training trajectory.

One call computes the empirical NTK at θ₀, eigendecomposes it once, and
evaluates the closed-form dynamics (Eq. 9/10, optionally Eq. 8 weights) at the
requested times.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from ntkdyn import _validate
from ntkdyn.dynamics import _drop_time_axis, solve, weights_from_alpha
from ntkdyn.kernels import empirical_ntk, output_shape
from ntkdyn.models import as_apply_fn
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
      learning_rate: η; momentum: β; time: "continuous" or "discrete" (static).
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
    momentum: float = struct.field(pytree_node=False, default=0.0)
    time: str = struct.field(pytree_node=False, default="continuous")


def _targets(y, n_train: int, outputs: int) -> jax.Array:
    y = _validate.float_array("y", y)
    if y.ndim == 1 and outputs == 1 and y.shape[0] == n_train:
        y = y[:, None]
    if y.shape != (n_train, outputs):
        raise ValueError(f"y: expected shape {(n_train, outputs)} to match the model's outputs, got {tuple(y.shape)}")
    _validate.finite("y", y)
    return y


def _test_inputs(x_test, x) -> jax.Array:
    x_test = _validate.batch("x_test", x_test)
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"x_test: expected inputs of trailing shape {tuple(x.shape[1:])} like x, got {tuple(x_test.shape[1:])}"
        )
    return x_test


def _outputs(name: str, apply_fn, params, x) -> jax.Array:
    """``f(θ₀, x)``; ValueError naming ``params`` when finite inputs give non-finite outputs."""
    out = apply_fn(params, x)
    if not _validate.is_concrete(out) or bool(jnp.all(jnp.isfinite(out))):
        return out
    raise ValueError(f"params: expected parameters whose outputs on {name} are finite, got NaN/inf outputs")


def predict(
    params: Any,
    x: jax.Array,
    y: jax.Array,
    t,
    *,
    apply_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    x_test: jax.Array | None = None,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    trace_outputs: bool = False,
    weights: bool = False,
    rcond: float | None = None,
    ntk_method: str = "auto",
    tile_size: int | str | None = "auto",
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
      momentum: heavy-ball β in [0, 1) (``optax.sgd(η, momentum=β)``; needs
        ``time="discrete"`` when > 0).
      diag_reg, diag_reg_absolute, rcond: regularization and cut-off (see
        :func:`ntkdyn.function_space`).
      time: ``"continuous"`` (gradient flow) or ``"discrete"`` (GD steps).
      trace_outputs: use the output-traced kernel ``Θ_tr ⊗ I_K`` (cheaper;
        exact when K = 1) instead of the full one.
      weights: also return the Eq. 8 weights θ_t (one VJP, vmapped over t).
      ntk_method, tile_size: passed to :func:`ntkdyn.empirical_ntk`.

    Returns:
      :class:`Prediction`.
    """
    apply_fn, p0 = as_apply_fn(params, apply_fn)
    _validate.params_tree("params", p0)
    x = _validate.batch("x", x)
    n_train, outputs = output_shape(apply_fn, p0, x)
    y = _targets(y, n_train, outputs)
    times, scalar = _validate.times(t)
    fx_train_0 = _outputs("x", apply_fn, p0, x)
    ntk = dict(trace_outputs=trace_outputs, method=ntk_method, tile_size=tile_size)
    k_tt = empirical_ntk(apply_fn, p0, x, **ntk)
    k_st = fx_test_0 = None
    if x_test is not None:
        x_test = _test_inputs(x_test, x)
        fx_test_0 = _outputs("x_test", apply_fn, p0, x_test)
        k_st = empirical_ntk(apply_fn, p0, x_test, x, **ntk)
    sol = solve(
        k_tt, y, fx_train_0, t, k_test_train=k_st, fx_test_0=fx_test_0, learning_rate=learning_rate,
        momentum=momentum, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, rcond=rcond,
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
        momentum=momentum,
        time=time,
    )
