"""Matmul precision of every kernel computation.

On GPUs (and TPUs) JAX multiplies float32 matrices in reduced precision by
default (TF32 / bfloat16 passes), which takes an NTK's agreement with an
explicit Jacobian from ~1e-6 to ~1e-3. Every traced kernel and kernel-operator
body here runs under ``jax.default_matmul_precision(precision)``, default
``"highest"``: the context is entered while the body is traced, so every
``dot_general`` / ``conv_general_dilated`` it emits — including those of the
user's model and of its derivatives — carries that precision in the compiled
program (an operation that sets its own precision explicitly keeps it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

__all__ = ["PRECISIONS", "normalize", "kernel_jit"]

# accepted spellings -> the name jax.default_matmul_precision takes
PRECISIONS = {
    "default": "default",
    "high": "high",
    "highest": "highest",
    "bfloat16": "default",
    "tensorfloat32": "high",
    "float32": "highest",
}


def normalize(precision) -> str:
    """``"default"``, ``"high"`` or ``"highest"`` for a :class:`jax.lax.Precision` or its name.

    Also accepts the ``jax_default_matmul_precision`` aliases ``"bfloat16"``,
    ``"tensorfloat32"`` and ``"float32"`` (case-insensitive).
    """
    if isinstance(precision, jax.lax.Precision):
        return precision.name.lower()
    if isinstance(precision, str) and precision.lower() in PRECISIONS:
        return PRECISIONS[precision.lower()]
    raise ValueError(
        f"precision: expected a jax.lax.Precision or one of {tuple(PRECISIONS)}, got {precision!r}"
    )


def kernel_jit(fn: Callable | None = None, *, static_argnames: tuple[str, ...] = ()):
    """``jax.jit(fn)`` whose body is traced under ``jax.default_matmul_precision(precision)``.

    The jitted function takes one more keyword, ``precision`` (a normalized
    name, static), besides ``fn``'s own.
    """
    if fn is None:
        return functools.partial(kernel_jit, static_argnames=static_argnames)

    def at_precision(*args, precision: str, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    at_precision.__name__ = fn.__name__
    at_precision.__qualname__ = fn.__qualname__
    at_precision.__doc__ = fn.__doc__
    return jax.jit(at_precision, static_argnames=("precision", *static_argnames))
