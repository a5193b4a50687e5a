"""Test session setup and shared fixtures.

Exactness claims are checked in float64 (enabled here for the whole session);
float32 paths are exercised by passing float32 arrays explicitly.

The test programs are tiny and many, so compiling them costs far more than
running them: XLA:CPU compiles them here without LLVM's optimization passes
(``--xla_backend_optimization_level=0``, about 35 % less suite time; the
operations and their IEEE semantics are the same, only the generated code is
slower). Set ``NTKDYN_TEST_XLA_OPT=1`` to test with the default level.
Notebook kernels inherit it; the multi-device workers set their own flags.
"""

import os

if os.environ.get("NTKDYN_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def linear_apply(params, x):
    """The oracle model: ``f(θ, x) = x W + b``, whose NTK is ``(x x'ᵀ + 1) ⊗ I_K`` and whose linearization is exact."""
    return x @ params["W"] + params["b"]


def make_linear_problem(k_out=2, n=7, n_test=4, d=3, seed=0, dtype=jnp.float64):
    """(params, x, x_test, y) for :func:`linear_apply`, Gaussian draws from ``seed``."""
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (n, d), dtype)
    xt = jax.random.normal(ks[1], (n_test, d), dtype)
    y = jax.random.normal(ks[2], (n, k_out), dtype)
    params = {"W": jax.random.normal(ks[3], (d, k_out), dtype), "b": 0.3 * jax.random.normal(ks[4], (k_out,), dtype)}
    return params, x, xt, y


@pytest.fixture
def linear_model():
    """``(apply_fn, make_problem)``: the linear oracle model and its problem factory."""
    return linear_apply, make_linear_problem
