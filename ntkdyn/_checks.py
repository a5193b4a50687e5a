"""Argument checks shared by the public functions.

Value checks (NaN/inf, negative times) need concrete arrays; under ``jit``
the arguments are tracers and only the shape checks run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_concrete", "check_finite", "check_batch", "as_float_array"]


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x) -> jax.Array:
    """``x`` as a floating-point jax array (ints are promoted); TypeError otherwise."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from err
    if jnp.issubdtype(arr.dtype, jnp.bool_) or not jnp.issubdtype(arr.dtype, jnp.number):
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        arr = arr.astype(jnp.result_type(float))
    return arr


def check_finite(name: str, x) -> None:
    """Raise ValueError naming ``name`` when ``x`` holds NaN or inf."""
    if not is_concrete(x):
        return
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries of {arr.size}")


def check_batch(name: str, x) -> jax.Array:
    """A non-empty batch of inputs (N, ...) with N >= 1."""
    arr = as_float_array(name, x)
    if arr.ndim < 1:
        raise ValueError(f"{name}: expected a batch of shape (N, ...), got a scalar")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one input, got an empty batch of shape {tuple(arr.shape)}")
    return arr
