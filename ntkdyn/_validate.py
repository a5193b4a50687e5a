"""Every argument check of the public API, in one message style.

Messages read ``"<argument>: expected <what>, got <what came in>"`` and name
the argument as the *user* passed it.

Value checks (NaN/inf, signs, PSD-ness) need concrete arrays. Under ``jit``
the arguments are tracers: only shape checks run eagerly, and the numeric
cores poison their outputs with NaN through :func:`nan_unless` instead, so a
bad traced value never turns into a finite wrong number.

Scalars: every numeric option takes Python, NumPy and JAX scalars alike
(0-d arrays included); options that shape the program (``rcond``, counts
such as ``steps`` or ``tile_size``, ``momentum``) must be concrete.

Dtype rule: integer and bool-free numeric inputs are promoted to the default
float; float16 / bfloat16 are computed in float32 (XLA's CPU eigensolvers and
the 50-digit-checked spectral functions have no half-precision form, and a
half-precision kernel's cut-off would be meaningless).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "is_concrete",
    "float_array",
    "finite",
    "batch",
    "matrix",
    "kernel_form",
    "psd_tolerance",
    "symmetric",
    "psd_eigenvalues",
    "symmetric_psd",
    "positive_definite",
    "times",
    "whole_steps",
    "positive_scalar",
    "nonnegative_scalar",
    "fraction",
    "clock",
    "rcond",
    "count",
    "choice",
    "params_tree",
    "nan_unless",
]

_HALF = (jnp.float16, jnp.bfloat16)
_REAL_SCALARS = (int, float, np.floating, np.integer)


def is_concrete(x) -> bool:
    """True when every leaf of ``x`` holds values (no tracer inside jit/vmap/grad)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def float_array(name: str, x) -> jax.Array:
    """``x`` as a floating-point jax array (ints promoted, half precision to float32); TypeError otherwise."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from err
    if jnp.issubdtype(arr.dtype, jnp.bool_) or not jnp.issubdtype(arr.dtype, jnp.number):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name}: expected a real array, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        arr = arr.astype(jnp.result_type(float))
    elif arr.dtype in _HALF:
        arr = arr.astype(jnp.float32)
    return arr


def finite(name: str, x) -> None:
    """ValueError naming ``name`` when a concrete ``x`` (array or pytree) holds NaN or inf."""
    leaves = jax.tree_util.tree_leaves(x)
    if not is_concrete(leaves):
        return
    bad = total = 0
    for leaf in leaves:
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.inexact):
            continue
        bad += int(arr.size - np.count_nonzero(np.isfinite(arr)))
        total += arr.size
    if bad:
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries of {total}")


def batch(name: str, x) -> jax.Array:
    """A non-empty, finite batch of inputs (N, ...) with N >= 1."""
    arr = float_array(name, x)
    if arr.ndim < 1:
        raise ValueError(f"{name}: expected a batch of shape (N, ...), got a scalar")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one input, got an empty batch of shape {tuple(arr.shape)}")
    finite(name, arr)
    return arr


def matrix(name: str, x, rows: int | None = None, cols: int | None = None) -> jax.Array:
    """A finite, non-empty (rows, cols) float array (either size free when None)."""
    arr = float_array(name, x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, K), got {tuple(arr.shape)}")
    if (rows is not None and arr.shape[0] != rows) or (cols is not None and arr.shape[1] != cols):
        want = (rows if rows is not None else "N", cols if cols is not None else "K")
        raise ValueError(f"{name}: expected shape ({want[0]}, {want[1]}), got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, K) array, got shape {tuple(arr.shape)}")
    finite(name, arr)
    return arr


def kernel_form(name: str, k: jax.Array, rows: int, cols: int, outputs: int) -> bool:
    """True for the output-traced (rows, cols) form, False for the full (rows, cols, K, K); ValueError otherwise."""
    if k.ndim == 2 and k.shape == (rows, cols):
        return True
    if k.ndim == 4 and k.shape == (rows, cols, outputs, outputs):
        return False
    raise ValueError(
        f"{name}: expected shape {(rows, cols, outputs, outputs)} (full) or {(rows, cols)} (output-traced), "
        f"got {tuple(k.shape)}"
    )


def psd_tolerance(m: int, dtype) -> float:
    """Relative tolerance for asymmetry and negative eigenvalues of an (m, m) kernel of ``dtype``.

    ``min(0.1, max(√eps, 100·m·eps))``: an eigensolver moves eigenvalues by
    ``O(m·eps)·λ_max`` and a kernel assembled from Jacobian products carries
    entry errors of the same relative order, so round-off stays far below this
    (float32: 3.5e-4 up to m ≈ 30, 1.2e-2 at m = 1000; float64: 1.5e-8 up to
    m ≈ 7e5), while a genuinely indefinite or asymmetric input lies far above.
    """
    eps = float(jnp.finfo(dtype).eps)
    return min(0.1, max(math.sqrt(eps), 100.0 * m * eps))


def symmetric(name: str, mat, *, what: str = "kernel") -> None:
    """ValueError naming ``name`` when a concrete square ``mat`` is clearly asymmetric.

    Asymmetry is measured as ``max|M − Mᵀ| / max|M|`` against :func:`psd_tolerance`.
    Tracers pass (the solvers' NaN guard covers indefiniteness under jit).
    """
    if not is_concrete(mat):
        return
    values = np.asarray(mat)
    if values.size == 0:
        return
    tol = psd_tolerance(values.shape[0], values.dtype)
    scale = float(np.abs(values).max())
    asym = float(np.abs(values - values.T).max())
    if asym > tol * scale:
        raise ValueError(
            f"{name}: expected a symmetric {what}, got max |M − Mᵀ| = {asym:.3g} "
            f"({asym / scale:.2g} of max |M|; tolerance {tol:.2g})"
        )


def psd_eigenvalues(name: str, eigenvalues, dtype, *, size: int | None = None, what: str = "kernel") -> None:
    """ValueError naming ``name`` when concrete ``eigenvalues`` go below ``−tol·max|λ|``.

    ``size`` is the matrix order for :func:`psd_tolerance` (default: the number
    of eigenvalues given, so a caller may pass just the extreme pair).
    """
    if not is_concrete(eigenvalues):
        return
    w = np.asarray(eigenvalues, dtype=np.float64)
    if w.size == 0:
        return
    tol = psd_tolerance(w.size if size is None else size, dtype)
    top = float(np.abs(w).max())
    low = float(w.min())
    if low < -tol * top:
        raise ValueError(
            f"{name}: expected a positive semi-definite {what}, got smallest eigenvalue {low:.3g} "
            f"({low / top:.2g} of the largest |eigenvalue|; tolerance {tol:.2g})"
        )


def symmetric_psd(name: str, mat, *, what: str = "matrix") -> None:
    """:func:`symmetric` and :func:`psd_eigenvalues` on a concrete square matrix (one eigvalsh)."""
    if not is_concrete(mat):
        return
    symmetric(name, mat, what=what)
    values = np.asarray(mat, dtype=np.float64)
    if values.size:
        psd_eigenvalues(name, np.linalg.eigvalsh(0.5 * (values + values.T)), np.asarray(mat).dtype, what=what)


def positive_definite(name: str, mat) -> jax.Array:
    """A finite, square, symmetric positive definite matrix (value checks when concrete)."""
    arr = float_array(name, mat)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty square matrix, got shape {tuple(arr.shape)}")
    finite(name, arr)
    if is_concrete(arr):
        symmetric(name, arr, what="positive definite matrix")
        values = np.asarray(arr, dtype=np.float64)
        smallest = float(np.linalg.eigvalsh(0.5 * (values + values.T)).min())
        if smallest <= 0:
            raise ValueError(f"{name}: expected a positive definite matrix, got smallest eigenvalue {smallest:.3g}")
    return arr


def times(t) -> tuple[jax.Array, bool]:
    """(1-D times, was_scalar): times ≥ 0, inf allowed, never NaN; ValueError otherwise."""
    arr = float_array("t", t)
    if arr.ndim > 1:
        raise ValueError(f"t: expected a scalar or a 1-D array of times, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("t: expected at least one time, got an empty array")
    if is_concrete(arr):
        values = np.asarray(arr)
        if np.any(np.isnan(values)):
            raise ValueError("t: expected times >= 0 (inf allowed), got NaN")
        if np.any(values < 0):
            raise ValueError(f"t: expected times >= 0, got {values[values < 0].min()}")
    return jnp.atleast_1d(arr), arr.ndim == 0


def whole_steps(t) -> None:
    """ValueError naming ``t`` when concrete finite times are not whole steps (heavy-ball momentum)."""
    if not is_concrete(t):
        return
    values = np.asarray(t, dtype=np.float64)
    finite_values = values[np.isfinite(values)]
    fractional = finite_values[finite_values != np.round(finite_values)]
    if fractional.size:
        raise ValueError(
            f"t: heavy-ball momentum is defined on whole steps only; got fractional t={fractional[0]}"
        )


def _real_scalar(name: str, value, kind: str):
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise TypeError(f"{name}: expected {kind}, got {value!r}")
    if not isinstance(value, (*_REAL_SCALARS, np.ndarray, jax.Array)):
        raise TypeError(f"{name}: expected {kind}, got {type(value).__name__} {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
                                  or dtype == jnp.bfloat16):
        raise TypeError(f"{name}: expected {kind}, got dtype {dtype}")
    return value


def positive_scalar(name: str, value):
    """A finite real scalar > 0 (Python, NumPy or JAX; traced values pass unchecked)."""
    return _signed_scalar(name, value, strict=True)


def nonnegative_scalar(name: str, value):
    """A finite real scalar >= 0 (Python, NumPy or JAX; traced values pass unchecked)."""
    return _signed_scalar(name, value, strict=False)


def _signed_scalar(name: str, value, *, strict: bool):
    _real_scalar(name, value, "a positive float" if strict else "a float >= 0")
    if is_concrete(value):
        v = float(np.asarray(value, dtype=np.float64))
        if not np.isfinite(v) or v < 0 or (strict and v == 0):
            raise ValueError(f"{name}: expected a finite value {'>' if strict else '>='} 0, got {v}")
    return value


def fraction(name: str, value) -> float:
    """A concrete real in [0, 1) (momentum β): it shapes the compiled program, so no tracers."""
    _real_scalar(name, value, "a float in [0, 1)")
    if not is_concrete(value):
        raise TypeError(f"{name}: expected a concrete float in [0, 1), got a traced value")
    v = float(np.asarray(value, dtype=np.float64))
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {v}")
    return v


def clock(time, momentum, clocks: Iterable[str]) -> float:
    """Check ``time`` (one of ``clocks``) and heavy-ball ``momentum`` together; return β.

    Momentum is a property of the step sequence: β > 0 needs ``time="discrete"``.
    """
    choice("time", time, clocks)
    beta = fraction("momentum", momentum)
    if beta > 0 and time != "discrete":
        raise ValueError(
            "time: heavy-ball momentum is defined on discrete steps only; pass time='discrete' "
            f"(its small-step limit is gradient flow with learning_rate/(1 − momentum)), got time={time!r}"
        )
    return beta


def rcond(value) -> float | None:
    """None or a concrete real scalar in [0, 1) (Python, NumPy or JAX; static: it selects the cut-off)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (*_REAL_SCALARS, np.ndarray, jax.Array)):
        raise TypeError(f"rcond: expected None or a float in [0, 1), got {type(value).__name__}")
    _real_scalar("rcond", value, "None or a float in [0, 1)")
    if not is_concrete(value):
        raise TypeError("rcond: expected a concrete float in [0, 1) (it selects the cut-off), got a traced value")
    v = float(np.asarray(value, dtype=np.float64))
    if not 0 <= v < 1:
        raise ValueError(f"rcond: expected None or a float in [0, 1), got {v}")
    return v


def count(name: str, value, minimum: int = 1) -> int:
    """A concrete integer >= ``minimum`` (Python, NumPy or JAX scalar, 0-d arrays included), as a Python int."""
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and np.issubdtype(value.dtype, np.integer)
    )
    if isinstance(value, (bool, np.bool_)) or not integral:
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if not is_concrete(value):
        raise TypeError(f"{name}: expected a concrete integer >= {minimum}, got a traced value")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def choice(name: str, value, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; ValueError listing them otherwise."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def params_tree(name: str, params: Any, *, values: bool = True) -> None:
    """A non-empty pytree of floating-point arrays with finite values (when concrete).

    ``values=False`` checks structure and dtypes only, for callers that check
    the values their own (faster, on-device) way.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree with at least one array, got {type(params).__name__} with no leaves")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name}: expected floating-point arrays as leaves, got {type(leaf).__name__} "
                            f"of dtype {dtype}")
    if values:
        finite(name, leaves)


def traced_symmetric_psd(mat, *, psd: bool = True) -> jax.Array:
    """Traced twin of :func:`symmetric_psd` (``psd=False``: of :func:`symmetric`): a boolean scalar.

    Concrete matrices give ``True`` without computing anything: the eager
    checks have raised already. For a traced ``(m, m)`` matrix: asymmetry
    ``max|M − Mᵀ| <= tol·max|M|`` and, with ``psd``, ``λ_min >= −tol·max|λ|``
    of its symmetric part (one ``eigvalsh``), ``tol`` from :func:`psd_tolerance`
    — for ``nan_unless``, so an invalid traced kernel gives NaN.
    """
    if mat is None or is_concrete(mat) or mat.shape[0] == 0:
        return jnp.asarray(True)
    tol = psd_tolerance(mat.shape[0], mat.dtype)
    ok = jnp.max(jnp.abs(mat - mat.T)) <= tol * jnp.max(jnp.abs(mat))
    if psd:
        lam = jnp.linalg.eigvalsh(0.5 * (mat + mat.T))
        ok = ok & (lam[0] >= -tol * jnp.maximum(lam[-1], jnp.abs(lam[0])))
    return ok


def nan_unless(ok: jax.Array, tree: Any) -> Any:
    """``tree`` where ``ok`` holds, NaN everywhere else (the traced twin of a ValueError)."""
    return jax.tree_util.tree_map(
        lambda a: a if a is None else jnp.where(ok, a, jnp.asarray(jnp.nan, a.dtype)), tree
    )
