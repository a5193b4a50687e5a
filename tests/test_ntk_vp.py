"""Matrix-free NTK-vector products against the formed kernel (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdyn import kernels, models


def data(n, d=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d), jnp.float64)


@pytest.fixture(scope="module")
def net():
    return models.mlp(3, 2, width=8, depth=2, dtype=jnp.float64)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-11 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("tile_size", [None, 3, 7])
def test_full_kernel_times_vector(net, tile_size):
    f, p = net
    x1, x2 = data(7), data(5, seed=1)
    kern = kernels.empirical_ntk(f, p, x1, x2, method="jacobian", tile_size=None)
    v = data(5, 2, seed=2)
    close(kernels.ntk_vp(f, p, x1, x2, v, tile_size=tile_size), jnp.einsum("ijkl,jl->ik", kern, v))
    vm = jax.random.normal(jax.random.key(3), (5, 2, 4), jnp.float64)
    close(kernels.ntk_vp(f, p, x1, x2, vm, tile_size=tile_size), jnp.einsum("ijkl,jlm->ikm", kern, vm))


def test_traced_kernel_times_vector(net):
    f, p = net
    x1, x2 = data(6), data(4, seed=1)
    kern = kernels.empirical_ntk(f, p, x1, x2, method="jacobian", trace_outputs=True, tile_size=None)
    v = data(4, 1, seed=2)[:, 0]
    close(kernels.ntk_vp(f, p, x1, x2, v, trace_outputs=True, tile_size=4), kern @ v)
    vm = data(4, 3, seed=3)
    close(kernels.ntk_vp(f, p, x1, x2, vm, trace_outputs=True), kern @ vm)


def test_symmetric_and_jit(net):
    f, p = net
    x = data(6)
    kern = kernels.empirical_ntk(f, p, x, method="jacobian", tile_size=None)
    v = data(6, 2, seed=4)
    close(kernels.ntk_vp(f, p, x, None, v), jnp.einsum("ijkl,jl->ik", kern, v))
    jitted = jax.jit(lambda params, vv: kernels.ntk_vp(f, params, x, None, vv, tile_size=4))
    close(jitted(p, v), jnp.einsum("ijkl,jl->ik", kern, v))


def test_conjugate_gradient_solve_matches_dense_solve(net):
    # the use ntk_vp exists for: an iterative solve of (Θ + λI) α = y without forming Θ
    f, p = net
    x = data(8)
    y = data(8, 2, seed=5)
    reg = 0.1
    matvec = lambda a: kernels.ntk_vp(f, p, x, None, a) + reg * a  # noqa: E731
    alpha, _ = jax.scipy.sparse.linalg.cg(matvec, y, tol=1e-12, maxiter=200)
    kern = kernels.empirical_ntk(f, p, x, method="jacobian", tile_size=None).transpose(0, 2, 1, 3).reshape(16, 16)
    close(alpha.reshape(-1), jnp.linalg.solve(kern + reg * jnp.eye(16), y.reshape(-1)))


@settings(max_examples=10, deadline=None)
@given(
    shape=st.sampled_from([(5,), (5, 3), (4, 2), (5, 2, 1, 1), ()]),
    trace=st.booleans(),
)
def test_bad_v_shape_names_v(net, shape, trace):
    f, p = net
    ok = (shape in [(5,), (5, 3)]) if trace else (shape in [(5, 2)])
    v = jnp.ones(shape)
    if ok:
        out = kernels.ntk_vp(f, p, data(3), data(5, seed=1), v, trace_outputs=trace)
        assert out.shape == (3, *shape[1:]) if trace else out.shape == (3, 2)
    else:
        with pytest.raises(ValueError, match="^v: expected shape"):
            kernels.ntk_vp(f, p, data(3), data(5, seed=1), v, trace_outputs=trace)


def test_bad_arguments(net):
    f, p = net
    x = data(4)
    with pytest.raises(TypeError, match="^v:"):
        kernels.ntk_vp(f, p, x, None, jnp.ones((4, 2), jnp.int32))
    with pytest.raises(ValueError, match="^v:"):
        kernels.ntk_vp(f, p, x, None, jnp.full((4, 2), jnp.nan))
    with pytest.raises(ValueError, match="^tile_size:"):
        kernels.ntk_vp(f, p, x, None, jnp.ones((4, 2)), tile_size=0)
    with pytest.raises(ValueError, match="^x2:"):
        kernels.ntk_vp(f, p, x, jnp.ones((4, 5)), jnp.ones((4, 2)))
