"""``ntkdyn.predict``: from a model and data to its linearized training trajectory.

Two solvers give the same closed-form dynamics (Eq. 9/10, optionally the
Eq. 8 weights) at every requested time:

* ``solver="eigh"`` computes the empirical NTK at θ₀ and eigendecomposes it
  once (:func:`ntkdyn.dynamics.solve`): exact, memory O((N·K)²), time
  O((N·K)³);
* ``solver="krylov"`` never forms the kernel: Lanczos on the operator
  ``v ↦ J Jᵀ v`` (one VJP and one JVP over the training set per step),
  started at the residual, with a stopping rule and an error estimate
  (:mod:`ntkdyn.krylov`), sharded over a device mesh
  (:mod:`ntkdyn.kernels.sharding`): memory O(P + N·K · iterations);
* ``solver="auto"`` (default) takes ``"eigh"`` while the kernel is small
  (:func:`choose_solver`) and ``"krylov"`` beyond.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate, krylov
from ntkdyn.dynamics import _check_discrete_rate, _drop_time_axis, computed_kernels, solve, weights_from_alpha
from ntkdyn.kernels import empirical_ntk, output_shape
from ntkdyn.kernels.planner import available_memory
from ntkdyn.kernels.precision import normalize as _precision
from ntkdyn.models import as_apply_fn
from ntkdyn.spectral import Spectrum

__all__ = ["Prediction", "predict", "choose_solver", "SOLVERS", "EIGH_MAX_SIZE"]

SOLVERS = ("auto", "eigh", "krylov")

#: largest kernel side (N·K, or N when output-traced) that ``solver="auto"`` eigendecomposes
EIGH_MAX_SIZE = 6000


@struct.dataclass
class Prediction:
    """A linearized training trajectory.

    Attributes:
      t: the times, () or (T,), in steps.
      fx_train: f_t(X), (N, K) or (T, N, K).
      fx_test: f_t(x*), (Nt, K) or (T, Nt, K), or None.
      params: Eq. 8 weights θ_t (params pytree, leading T axis for 1-D t) when
        ``weights=True``, else None.
      ntk_train_train: Θ(X, X) used, (N, N, K, K) or traced (N, N); None on
        the Krylov path (the kernel is never formed).
      ntk_test_train: Θ(x*, X) used, or None (always None on the Krylov path).
      spectrum: the :class:`~ntkdyn.spectral.Spectrum` of the (regularized)
        kernel; None on the Krylov path.
      fx_train_0, fx_test_0: the outputs at θ₀.
      iterations: () Lanczos steps (= kernel-operator products) on the Krylov
        path, None on the eigh path.
      error_estimate: () or (T,) estimated relative error per time on the
        Krylov path (:mod:`ntkdyn.krylov`), None on the eigh path.
      krylov_info: the full :class:`~ntkdyn.krylov.KrylovInfo`, or None.
      learning_rate: η; momentum: β; time: "continuous" or "discrete";
      solver: ``"eigh"`` or ``"krylov"``, the one that ran (static).
    """

    t: jax.Array
    fx_train: jax.Array
    fx_test: jax.Array | None
    params: Any
    ntk_train_train: jax.Array | None
    ntk_test_train: jax.Array | None
    spectrum: Spectrum | None
    fx_train_0: jax.Array
    fx_test_0: jax.Array | None
    iterations: jax.Array | None = None
    error_estimate: jax.Array | None = None
    krylov_info: krylov.KrylovInfo | None = None
    learning_rate: float = struct.field(pytree_node=False, default=1.0)
    momentum: float = struct.field(pytree_node=False, default=0.0)
    time: str = struct.field(pytree_node=False, default="continuous")
    solver: str = struct.field(pytree_node=False, default="eigh")


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


def choose_solver(n_train: int, outputs: int, *, trace_outputs: bool = False, itemsize: int = 8,
                  memory: float | None = None) -> str:
    """``"eigh"`` while the kernel side m (N·K, or N traced) is at most :data:`EIGH_MAX_SIZE`
    and the kernel, its eigenvectors and a work copy (``3·m²`` values) fit in
    half of ``memory`` (default: what the OS reports available); ``"krylov"`` otherwise.

    At m = 6000 a two-core CPU eigendecomposes in about a minute; the cost grows as m³.
    """
    m = n_train * (1 if trace_outputs else outputs)
    memory = available_memory() if memory is None else memory
    return "eigh" if m <= EIGH_MAX_SIZE and 3.0 * m * m * itemsize <= 0.5 * memory else "krylov"


def _krylov_options(solver: str, tol, max_iter, ntk_method: str):
    """Validated ``(tol, max_iter)``; ValueError naming an option the chosen solver cannot honour."""
    if tol is not None:
        _validate.positive_scalar("tol", tol)
        tol = float(tol)
        if tol >= 1:
            raise ValueError(f"tol: expected a relative tolerance in (0, 1), got {tol}")
    if max_iter is not None:
        max_iter = _validate.count("max_iter", max_iter)
    if solver == "eigh":
        for name, value in (("tol", tol), ("max_iter", max_iter)):
            if value is not None:
                raise ValueError(f"{name}: only solver='krylov' (or 'auto') iterates; got {name}={value!r} "
                                 "with solver='eigh'")
    if solver == "krylov" and ntk_method != "auto":
        raise ValueError(
            f"ntk_method: solver='krylov' never forms the kernel (it applies J Jᵀ by VJP/JVP), so a kernel "
            f"method cannot be honoured; got ntk_method={ntk_method!r} (use solver='eigh' or ntk_method='auto')"
        )
    return tol, max_iter


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
    solver: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    mesh=None,
    precision: str | jax.lax.Precision = "highest",
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
        :func:`ntkdyn.function_space`). On the Krylov path the mean diagonal
        of Θ is computed exactly (``tr Θ`` from per-example Jacobian norms)
        and the cut-off applies to the Ritz values.
      time: ``"continuous"`` (gradient flow) or ``"discrete"`` (GD steps).
      trace_outputs: use the output-traced kernel ``Θ_tr ⊗ I_K`` (cheaper for
        the dense kernel; exact when K = 1) instead of the full one. On the
        Krylov path the full operator is the cheaper one (one VJP/JVP pair per
        step whatever K; the traced one needs K² of them).
      weights: also return the Eq. 8 weights θ_t (one VJP, vmapped over t).
      ntk_method: the dense kernel's method (:func:`ntkdyn.empirical_ntk`);
        eigh path only.
      tile_size: eigh path: the kernel's tile size; Krylov path: inputs per
        VJP/JVP call on each device (``"auto"``: up to 4096).
      solver: ``"eigh"``, ``"krylov"`` or ``"auto"`` (:func:`choose_solver`).
      tol: Krylov relative tolerance (default ``√eps``: 3.5e-4 in float32,
        1.5e-8 in float64); max_iter: Krylov step limit (default
        ``min(N·K, 500)``). Non-convergence warns with
        :class:`ntkdyn.krylov.KrylovConvergenceWarning` and reports the
        estimate.
      mesh: a :class:`jax.sharding.Mesh` the Krylov path splits the examples
        over (all its axes; padding to a multiple of ``devices · tile_size``
        with zero-weight rows), default every device. On several hosts every
        process calls ``predict`` with the same full inputs and a global mesh.
      precision: matmul precision of every kernel and operator computation
        (default ``"highest"``: float32 stays exact on GPUs).

    Returns:
      :class:`Prediction`.
    """
    _validate.choice("solver", solver, SOLVERS)
    precision = _precision(precision)
    apply_fn, p0 = as_apply_fn(params, apply_fn)
    _validate.params_tree("params", p0)
    x = _validate.batch("x", x)
    n_train, outputs = output_shape(apply_fn, p0, x)
    y = _targets(y, n_train, outputs)
    times, scalar = _validate.times(t)
    if x_test is not None:
        x_test = _test_inputs(x_test, x)
    tol, max_iter = _krylov_options(solver, tol, max_iter, ntk_method)
    if solver == "auto":
        itemsize = jnp.dtype(jax.eval_shape(apply_fn, p0, x).dtype).itemsize
        solver = choose_solver(n_train, outputs, trace_outputs=trace_outputs, itemsize=itemsize)
        if solver == "krylov":
            _krylov_options(solver, tol, max_iter, ntk_method)
    if solver == "krylov":
        return _predict_krylov(
            apply_fn, p0, x, y, times, scalar, x_test=x_test, learning_rate=learning_rate, momentum=momentum,
            diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, trace_outputs=trace_outputs,
            weights=weights, rcond=rcond, tile_size=tile_size, tol=tol, max_iter=max_iter, mesh=mesh,
            precision=precision,
        )
    fx_train_0 = _outputs("x", apply_fn, p0, x)
    ntk = dict(trace_outputs=trace_outputs, method=ntk_method, tile_size=tile_size, precision=precision)
    if mesh is not None:
        ntk["mesh"] = mesh
    k_tt = empirical_ntk(apply_fn, p0, x, **ntk)
    k_st = fx_test_0 = None
    if x_test is not None:
        fx_test_0 = _outputs("x_test", apply_fn, p0, x_test)
        k_st = empirical_ntk(apply_fn, p0, x_test, x, **ntk)
    with computed_kernels("params"):
        sol = solve(
            k_tt, y, fx_train_0, t, k_test_train=k_st, fx_test_0=fx_test_0, learning_rate=learning_rate,
            momentum=momentum, diag_reg=diag_reg, diag_reg_absolute=diag_reg_absolute, time=time, rcond=rcond,
        )
    theta = weights_from_alpha(apply_fn, p0, x, sol.alpha) if weights else None
    return _trajectory(
        times, scalar, sol.train, sol.test, theta, ntk_train_train=k_tt, ntk_test_train=k_st, spectrum=sol.spectrum,
        fx_train_0=fx_train_0, fx_test_0=fx_test_0, learning_rate=learning_rate, momentum=momentum, time=time,
        solver="eigh",
    )


def _trajectory(times, scalar: bool, train, test, params, **fields) -> Prediction:
    """A :class:`Prediction` from (T, ...) outputs and weights: a scalar ``t`` drops their time axis."""
    return Prediction(
        t=times[0] if scalar else times,
        fx_train=_drop_time_axis(train, scalar),
        fx_test=_drop_time_axis(test, scalar),
        params=_drop_time_axis(params, scalar),
        **fields,
    )


def _predict_krylov(
    apply_fn, p0, x, y, times, scalar, *, x_test, learning_rate, momentum, diag_reg, diag_reg_absolute, time,
    trace_outputs, weights, rcond, tile_size, tol, max_iter, mesh, precision,
) -> Prediction:
    """The Krylov branch of :func:`predict`: checks, :func:`ntkdyn.krylov.predict_operator`, eager diagnostics."""
    from ntkdyn import spectral

    beta = _validate.clock(time, momentum, spectral.TIMES)
    if beta > 0:
        _validate.whole_steps(times)
    _validate.positive_scalar("learning_rate", learning_rate)
    _validate.nonnegative_scalar("diag_reg", diag_reg)
    rcond = _validate.rcond(rcond)
    if tile_size == "auto":
        tile_size = None
    elif tile_size is not None:
        tile_size = _validate.count("tile_size", tile_size)
    out = krylov.predict_operator(
        apply_fn, p0, x, y, times, x_test=x_test, learning_rate=learning_rate, diag_reg=diag_reg,
        diag_reg_absolute=diag_reg_absolute, time=time, momentum=beta, trace_outputs=trace_outputs, weights=weights,
        rcond=rcond, tol=tol, max_iter=max_iter, mesh=mesh, tile_size=tile_size, precision=precision,
    )
    _finite_outputs(out)
    _check_steps(out.info, learning_rate, beta, y.size, time, times)
    krylov.warn_if_not_converged(out.info, stacklevel=4)
    return _trajectory(
        times, scalar, out.fx_train, out.fx_test, out.params, ntk_train_train=None, ntk_test_train=None,
        spectrum=None, fx_train_0=out.fx_train_0, fx_test_0=out.fx_test_0, iterations=out.info.iterations,
        error_estimate=_drop_time_axis(out.info.error_estimate, scalar), krylov_info=out.info,
        learning_rate=learning_rate, momentum=beta, time=time, solver="krylov",
    )


def _finite_outputs(out: krylov.KrylovPrediction) -> None:
    """ValueError naming ``params`` for non-finite outputs at θ₀, or a kernel operator that overflowed."""
    for name, value in (("x", out.fx_train_0), ("x_test", out.fx_test_0)):
        if value is not None and _validate.is_concrete(value) and not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"params: expected parameters whose outputs on {name} are finite, got NaN/inf outputs")
    info = out.info
    if _validate.is_concrete((info.max_eigenvalue, info.reg)) and not (
        np.isfinite(float(info.max_eigenvalue)) and np.isfinite(float(info.reg))
    ):
        raise ValueError(
            "params: expected parameters whose outputs and NTK on x stay finite in their dtype, got NaN/inf "
            "in the Krylov solve (an overflow of the residual's norm or of the J Jᵀ products)"
        )


def _check_steps(info: krylov.KrylovInfo, lr, beta: float, n: int, time: str, times) -> None:
    """Discrete-time checks on the Ritz estimate of λ_max (a lower bound that converges first)."""
    if time != "discrete" or not _validate.is_concrete((info.max_eigenvalue, lr, times)):
        return
    _check_discrete_rate(
        float(info.max_eigenvalue), float(lr), beta, n, times, info.max_eigenvalue.dtype,
        note=" (λ_max from the largest Ritz value)",
    )
