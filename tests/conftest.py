"""Test session setup and shared fixtures.

Exactness claims are checked in float64 (enabled here for the whole session);
float32 paths are exercised by passing float32 arrays explicitly.
"""

import jax
import jax.numpy as jnp
import pytest

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
