"""Explicit-Jacobian oracle shared by the structured-NTK test files."""

import jax
import jax.numpy as jnp
import numpy as np

from ntkdyn import kernels
from ntkdyn.kernels import structured


def explicit_ntk(apply_fn, params, x1, x2, trace_outputs=False):
    """Θ = J(x1) J(x2)ᵀ from full Jacobians, all leaves flattened into one P axis."""

    def flat_jac(x):
        jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
        n, k = apply_fn(params, x).shape
        return jnp.concatenate([l.reshape(n, k, -1) for l in jax.tree_util.tree_leaves(jac)], axis=-1)

    # jitted: one compilation is much cheaper than op-by-op dispatch of jacrev
    j1, j2 = jax.jit(flat_jac)(x1), jax.jit(flat_jac)(x2)
    full = jnp.einsum("ikp,jlp->ijkl", j1, j2)
    if trace_outputs:
        return jnp.einsum("ijkk->ij", full) / full.shape[-1]
    return full


def assert_matches(apply_fn, params, x1, x2=None, *, trace_outputs=False, tol=1e-10):
    ref = explicit_ntk(apply_fn, params, x1, x1 if x2 is None else x2, trace_outputs)
    got = kernels.empirical_ntk(apply_fn, params, x1, x2, method="structured", trace_outputs=trace_outputs, tile_size=None)
    assert got.shape == ref.shape
    assert got.dtype == ref.dtype
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=tol * scale)
    return got


def kinds(apply_fn, params, x):
    p = structured.plan(apply_fn, params, x)
    return sorted(s.kind for s in p.sites), p.fallback


def inputs(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


