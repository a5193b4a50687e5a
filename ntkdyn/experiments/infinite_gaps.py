"""Each sweep point against the infinite-width limit (the three-way breakdown of issue 11).

For a point whose network is an :class:`ntkdyn.models.MLP` or
:class:`ntkdyn.models.CNN` (the ``mlp`` and ``cnn`` families, or any family
returning one of them) and its :class:`~ntkdyn.experiments.compare.Comparison`,
:func:`infinite_gaps` places the finite network against the limit of
:mod:`ntkdyn.infinite`. ``‖·‖`` is the Frobenius norm over all inputs and
outputs, ``t`` runs over the comparison's recorded steps:

* **kernel error** ``‖Θ_emp(θ₀) − Θ_∞ ⊗ I_K‖_F / ‖Θ_∞ ⊗ I_K‖_F`` on the
  training inputs. ``Θ_emp`` is the kernel the comparison predicted with,
  read back from its spectrum (``V diag(λ) Vᵀ − reg·I``; full
  ``(N·K) × (N·K)`` form, or output-traced (N, N) when the comparison traced
  the outputs), so no Jacobian is computed again. Expected ``∝ width^−½`` per
  seed in NTK parameterization.
* **infinite-width prediction** ``f^∞_t``: Eq. 9/10 with ``Θ_∞`` in place of
  ``Θ_emp``, from the network's own ``f₀`` (the member of the infinite-width
  ensemble that starts where this network starts), with the comparison's
  η, clock, momentum, recorded steps and the same ``diag_reg``. Its gaps, on
  the comparison's scales (``D = ‖f(θ₀, X) − Y‖``; ``D*`` as for ``test_gap``)::

      lin_train_gap[t]  = ‖f^lin_t(X) − f^∞_t(X)‖ / D      (eNTK vs infinite: finite-width kernel)
      real_train_gap[t] = ‖f(θ_t, X) − f^∞_t(X)‖ / D       (real vs infinite)

  and the same on the test inputs with ``D*``. Together with compare's
  ``train_gap``/``test_gap`` (real vs eNTK: the nonlinearity) these are the
  three sides of the breakdown. (The ensemble *mean* is not used here: it
  drops ``f₀``, an O(1) random offset at every width, so its distance to any
  one network would not shrink with width.)
* **±2σ band**: the fraction of the real outputs ``f(θ_t, ·)`` inside
  ``mean_t ± 2 σ_t`` of the infinite-width ensemble
  (:func:`ntkdyn.infinite.ensemble`: mean and covariance over initializations,
  same η, clock, ``diag_reg`` and steps). A Gaussian puts 95.4 % inside.

Where they apply: the kernel error for every supported architecture (any
optimizer or loss: it is a property of θ₀); the prediction gaps where the
closed form does (GD or heavy ball on the MSE loss, ``Comparison.closed_form``);
the band for plain GD only (the ensemble has no heavy-ball form). Everything
else is NaN and :attr:`InfiniteGaps.note` says why; an unsupported network
(a residual MLP, a linen or plain-function model) never raises.

The analytic kernels depend on the architecture and the data only, not on
the width (NTK parameterization) or the seed: pass one ``cache`` dict for a
whole sweep and they — and the ensemble, when η is the same — are computed
once.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ntkdyn import infinite, models
from ntkdyn.dynamics import function_space
from ntkdyn.experiments.compare import Comparison

__all__ = ["InfiniteGaps", "INFINITE_METRICS", "INFINITE_CURVES", "analytic_architecture", "infinite_gaps",
           "unavailable"]

# the scalar metrics a sweep record gets from InfiniteGaps.summary (NaN where not available)
INFINITE_METRICS = (
    "inf_kernel_error",
    "inf_lin_train_gap", "inf_lin_test_gap", "inf_lin_train_gap_final", "inf_lin_test_gap_final",
    "inf_real_train_gap", "inf_real_test_gap", "inf_real_train_gap_final", "inf_real_test_gap_final",
    "inf_band_train", "inf_band_test",
)
# the per-step curves a sweep record gets from InfiniteGaps.curves (only those that were computed)
INFINITE_CURVES = ("inf_lin_train_gap", "inf_lin_test_gap", "inf_real_train_gap", "inf_real_test_gap",
                   "inf_band_train", "inf_band_test")
NUM_STD = 2.0


@struct.dataclass
class InfiniteGaps:
    """One point against the infinite-width limit (definitions in the module notes).

    Attributes:
      kernel_error: () the relative Frobenius error of ``Θ_emp(θ₀)`` against ``Θ_∞ ⊗ I_K`` (NaN: not available).
      lin_train_gap, lin_test_gap: (R,) eNTK prediction vs ``f^∞_t``, or None.
      real_train_gap, real_test_gap: (R,) real network vs ``f^∞_t``, or None.
      band_train, band_test: (R,) fraction of the real outputs inside the ensemble's ±2σ band, or None.
      note: static; empty when everything was computed, else what is NaN and why.
    """

    kernel_error: np.ndarray
    lin_train_gap: np.ndarray | None = None
    lin_test_gap: np.ndarray | None = None
    real_train_gap: np.ndarray | None = None
    real_test_gap: np.ndarray | None = None
    band_train: np.ndarray | None = None
    band_test: np.ndarray | None = None
    note: str = struct.field(pytree_node=False, default="")

    def summary(self) -> dict[str, float]:
        """Python floats named as in :data:`INFINITE_METRICS`.

        ``inf_*_gap`` = max over the recorded steps (NaN read as inf, as in
        :meth:`Comparison.summary`), ``*_final`` at the last step,
        ``inf_band_*`` the fraction inside at the last step; NaN where not
        computed.
        """
        out = {"inf_kernel_error": float(np.asarray(self.kernel_error, dtype=np.float64))}
        for side in ("train", "test"):
            for kind in ("lin", "real"):
                gap = getattr(self, f"{kind}_{side}_gap")
                out[f"inf_{kind}_{side}_gap"] = _worst(gap)
                out[f"inf_{kind}_{side}_gap_final"] = _last(gap)
            band = getattr(self, f"band_{side}")
            out[f"inf_band_{side}"] = float("nan") if band is None else float(np.asarray(band)[-1])
        return {name: out[name] for name in INFINITE_METRICS}

    def curves(self) -> dict[str, np.ndarray]:
        """The computed per-step columns (names in :data:`INFINITE_CURVES`), host arrays."""
        out = {}
        for name in INFINITE_CURVES:
            value = getattr(self, name[len("inf_"):])
            if value is not None:
                out[name] = np.asarray(value, dtype=np.float64)
        return out


def _worst(x) -> float:
    if x is None:
        return float("nan")
    arr = np.asarray(x, dtype=np.float64)
    return float(np.max(np.where(np.isnan(arr), np.inf, arr)))


def _last(x) -> float:
    if x is None:
        return float("nan")
    v = float(np.asarray(x, dtype=np.float64)[-1])
    return float("inf") if math.isnan(v) else v


def unavailable(note: str) -> InfiniteGaps:
    """Every field NaN / None, with ``note`` saying why."""
    return InfiniteGaps(kernel_error=np.asarray(float("nan")), note=note)


# --------------------------------------------------------------------------- #
# which networks the analytic path covers
# --------------------------------------------------------------------------- #


def analytic_architecture(model: Any, params: Any) -> tuple[infinite.Architecture, bool]:
    """``(Architecture, flatten)`` of a sweep network ``(Model, params)``.

    An NNX model is put back together (``nnx.merge``, no copy) and read by
    :func:`ntkdyn.infinite.architecture`; the ``mlp`` family's wrapper for
    inputs of several axes is looked through (``flatten`` True: the MLP sees
    ``x.reshape(N, −1)``).

    Raises:
      TypeError: not an :class:`ntkdyn.models.MLP` / :class:`ntkdyn.models.CNN`
        (the message names what it is).
      ValueError: an architecture the analytic path does not support.
    """
    model = models.as_model(model)
    if model.kind != "nnx":
        what = "a linen module" if model.kind == "linen" else "a plain apply function"
        raise TypeError(f"model: the analytic kernels cover ntkdyn.models.MLP and CNN; this network is {what}")
    module = nnx.merge(model.graph, params, model.state)
    flatten = False
    from ntkdyn.experiments.families import _Flatten  # the mlp family's own wrapper

    if isinstance(module, _Flatten):
        module, flatten = module.inner, True
    if not isinstance(module, (models.MLP, models.CNN)):
        raise TypeError(f"model: the analytic kernels cover ntkdyn.models.MLP and CNN; this network is "
                        f"{type(module).__name__}")
    return infinite.architecture(module), flatten


# --------------------------------------------------------------------------- #
# the computation
# --------------------------------------------------------------------------- #


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cached(cache: dict | None, key: tuple, make):
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _limit_kernels(arch, x, x_test, cache):
    """``(Kernels on X, Kernels (X*, X) or None, K(X*, X*) or None)``, once per architecture and data.

    One kernel on ``X ∪ X*`` (one compiled program), sliced.
    """
    def make():
        if x_test is None:
            return infinite.kernels(arch, x), None, None
        n = x.shape[0]
        k = infinite.kernels(arch, jnp.concatenate([x, x_test.astype(x.dtype)], axis=0))
        k_tt = infinite.Kernels(nngp=k.nngp[:n, :n], ntk=k.ntk[:n, :n])
        k_st = infinite.Kernels(nngp=k.nngp[n:, :n], ntk=k.ntk[n:, :n])
        return k_tt, k_st, k.nngp[n:, n:]

    return _cached(cache, ("infinite-kernels", arch, _digest(x, x_test)), make)


def _empirical_kernel(spectrum, n_train: int, outputs: int) -> np.ndarray:
    """``Θ_emp = V diag(λ) Vᵀ − reg·I`` from a comparison's spectrum: (N, N) traced or (N, N, K, K) full."""
    vecs = np.asarray(spectrum.eigenvectors, dtype=np.float64)
    lam = np.asarray(spectrum.eigenvalues, dtype=np.float64)
    m = vecs.shape[0]
    mat = (vecs * lam) @ vecs.T - float(spectrum.reg) * np.eye(m)
    mat = 0.5 * (mat + mat.T)
    if m == n_train * outputs and outputs > 1:  # rows and columns in row-major (N, K) order
        return mat.reshape(n_train, outputs, n_train, outputs).transpose(0, 2, 1, 3)
    return mat


def infinite_gaps(
    comparison: Comparison,
    model: Any,
    params0: Any,
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    x_test: jax.Array | None = None,
    y_test: jax.Array | None = None,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    cache: dict | None = None,
) -> InfiniteGaps:
    """The point's kernel error, infinite-width prediction gaps and ±2σ band coverage (module notes).

    Args:
      comparison: what :func:`~ntkdyn.experiments.compare.compare` returned for
        this network and data (one member of :func:`compare_seeds` is fine).
      model, params0: the network and θ₀ that were compared (a
        :class:`ntkdyn.models.Model` or anything :func:`ntkdyn.models.as_model` takes).
      x_train, y_train, x_test, y_test: the comparison's data.
      diag_reg, diag_reg_absolute: the comparison's regularizer (relative to
        the mean diagonal unless absolute; for the ensemble an absolute one
        becomes relative to ``Θ_∞``'s mean diagonal, the same ``reg``).
      cache: a dict shared by the points of a sweep (analytic kernels, ensembles).

    Returns:
      :class:`InfiniteGaps`; fields that do not apply are NaN / None and
      ``note`` says why. Never raises for a network the analytic path does
      not cover.
    """
    try:
        arch, flatten = analytic_architecture(model, params0)
    except (TypeError, ValueError) as err:
        return unavailable(f"not available: {str(err).removeprefix('model: ')}")
    model = models.as_model(model)
    x_inf = x_train.reshape(x_train.shape[0], -1) if flatten else x_train
    x_test_inf = None if x_test is None else (x_test.reshape(x_test.shape[0], -1) if flatten else x_test)
    k_tt, k_st, nngp_ss = _limit_kernels(arch, x_inf, x_test_inf, cache)

    n_train, outputs = y_train.shape
    kernel_error = _kernel_error(_empirical_kernel(comparison.spectrum, n_train, outputs), _host(k_tt.ntk))
    if not comparison.closed_form:
        return InfiniteGaps(kernel_error=kernel_error,
                            note=f"no closed form for {comparison.optimizer} on {comparison.objective}: "
                                 "only the kernel error")

    steps = np.asarray(comparison.steps)
    dtype = k_tt.ntk.dtype
    lr = float(comparison.learning_rate)
    if steps[0] == 0:  # the real network's outputs at step 0 are f(θ₀): no forward pass to compile
        fx0 = comparison.train.real[0]
        fx0_test = None if x_test is None else comparison.test.real[0]
    else:
        fx0 = model(params0, x_train)
        fx0_test = None if x_test is None else model(params0, x_test)
    reg = float(diag_reg)
    if diag_reg_absolute and reg > 0:  # the same absolute reg, relative to Θ_∞'s mean diagonal
        reg = reg / float(jnp.mean(jnp.diagonal(k_tt.ntk)))

    def ensemble(targets):
        return infinite.ensemble(k_tt, targets, jnp.asarray(steps, dtype), k_test_train=k_st,
                                 nngp_test_test=nngp_ss, learning_rate=lr, diag_reg=reg, time=comparison.time)

    if comparison.momentum > 0:  # heavy ball: the solver's own modes
        f_train, f_test = function_space(
            k_tt.ntk, y_train, fx0, jnp.asarray(steps, dtype), k_test_train=None if k_st is None else k_st.ntk,
            fx_test_0=fx0_test, learning_rate=lr, momentum=comparison.momentum, diag_reg=diag_reg,
            diag_reg_absolute=diag_reg_absolute, time=comparison.time,
        )
    else:
        # the ensemble mean is linear in the targets: with Y − f₀ it is (I − E)(Y − f₀) and M_t (Y − f₀), so
        # f^∞_t = f₀ + mean_t — Eq. 9/10 with Θ_∞, from the program the band below uses (compiled once)
        shifted = ensemble(y_train - fx0)
        f_train = fx0 + shifted.mean_train
        f_test = None if x_test is None else fx0_test + shifted.mean_test
    # small host arrays from here on: NumPy, no compilation per shape
    f_train, lin, real = _host(f_train), _host(comparison.train.lin), _host(comparison.train.real)
    d_train = np.linalg.norm(_host(fx0) - _host(y_train))
    gaps = {"lin_train_gap": _relative_gap(lin, f_train, d_train),
            "real_train_gap": _relative_gap(real, f_train, d_train)}
    if x_test is not None:
        f_test, lin, real, fx0_test = (_host(a) for a in (f_test, comparison.test.lin, comparison.test.real,
                                                          fx0_test))
        if y_test is not None:
            d_test = np.linalg.norm(fx0_test - _host(y_test))
        else:  # compare's scale without targets: the largest predicted movement of the eNTK prediction
            d_test = np.max(np.linalg.norm((lin - fx0_test[None]).reshape(steps.size, -1), axis=1))
        gaps["lin_test_gap"] = _relative_gap(lin, f_test, d_test)
        gaps["real_test_gap"] = _relative_gap(real, f_test, d_test)
    if comparison.momentum > 0:
        return InfiniteGaps(kernel_error=kernel_error, **gaps,
                            note="band: the infinite-width ensemble (ntkdyn.infinite.ensemble) has no heavy-ball "
                                 "form; the ±2σ coverage is NaN with momentum")

    key = ("infinite-ensemble", arch, _digest(x_inf, x_test_inf, y_train, steps), lr, reg, comparison.time)
    ens = _cached(cache, key, lambda: ensemble(y_train))
    bands = {"band_train": _fraction_inside(ens.mean_train, ens.cov_train, comparison.train.real)}
    if x_test is not None:
        bands["band_test"] = _fraction_inside(ens.mean_test, ens.cov_test, comparison.test.real)
    return InfiniteGaps(kernel_error=kernel_error, **gaps, **bands)


def _host(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _kernel_error(emp: np.ndarray, inf: np.ndarray) -> np.ndarray:
    """``‖Θ_emp − Θ_∞ ⊗ I_K‖_F / ‖Θ_∞ ⊗ I_K‖_F`` for a traced (N, N) or full (N, N, K, K) ``Θ_emp``
    (:func:`ntkdyn.infinite.kernel_error`'s definition, on host arrays)."""
    if emp.ndim == 2:
        return np.asarray(np.linalg.norm(emp - inf) / np.linalg.norm(inf))
    outputs = emp.shape[2]
    diff = emp - inf[:, :, None, None] * np.eye(outputs)
    return np.asarray(np.linalg.norm(diff.ravel()) / (math.sqrt(outputs) * np.linalg.norm(inf)))


def _relative_gap(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """:func:`~ntkdyn.experiments.compare.relative_gap` on host arrays: ``‖a_t − b_t‖_F / scale`` per t."""
    diff = np.sqrt(np.sum(np.square(a - b).reshape(a.shape[0], -1), axis=1))
    if scale > 0:
        return diff / scale
    return np.where(diff == 0, 0.0, np.inf)


def _fraction_inside(mean, cov, values) -> np.ndarray:
    """(R,) the fraction of ``values[t]`` inside ``mean[t] ± 2σ[t]`` (a non-finite value is outside).

    :func:`ntkdyn.infinite.inside_band`'s test, ``|v − mean| ≤ 2√diag(cov)``, on host arrays.
    """
    mean, cov, values = _host(mean), _host(cov), _host(values)
    std = np.sqrt(np.maximum(np.diagonal(cov, axis1=-2, axis2=-1), 0.0))[..., None]
    with np.errstate(invalid="ignore"):
        inside = np.abs(values - mean) <= NUM_STD * std
    return inside.reshape(inside.shape[0], -1).mean(axis=1)
