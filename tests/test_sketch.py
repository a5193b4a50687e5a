"""Random-probe NTK sketches: oracles are the explicit Jacobian J (jacrev, flattened)
and the exact Gaussian-sketch error ``E‖Θ̂ − Θ‖²_F = ((tr Θ)² + ‖Θ‖²_F)/k``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from ntkdyn import dynamics, kernels
from ntkdyn.kernels import sketch


def rand(seed, shape):
    """Standard-normal test data from numpy (no per-shape XLA compile of a jax PRNG)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _flat_jacobian(apply_fn, params, x):
    """(N·K, P) Jacobian, rows in (N, K) row-major order, columns in ravel_pytree order."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda v: apply_fn(unravel(v), x))(flat)
    return jac.reshape(-1, flat.size)


def _as_full(mat, n, k):
    return mat.reshape(n, k, n, k).transpose(0, 2, 1, 3)


def erf_mlp(params, x):
    """Plain two-hidden-layer erf MLP in NTK parameterization (cheap to trace)."""
    h = x
    for w, b in params[:-1]:
        h = jax.scipy.special.erf(h @ w / jnp.sqrt(w.shape[0]) + 0.1 * b)
    w, b = params[-1]
    return h @ w / jnp.sqrt(w.shape[0]) + 0.1 * b


def erf_mlp_params(sizes, seed):
    return [
        (rand(100 * seed + 2 * i, (a, b)), rand(100 * seed + 2 * i + 1, (b,)))
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]


# a compiled forward pass is still a black box to blackbox_*: only its outputs are used
erf_mlp_forward = jax.jit(erf_mlp)


@pytest.fixture(scope="module")
def small():
    params = erf_mlp_params([3, 8, 8, 2], seed=0)
    x = rand(1, (4, 3))
    jac = _flat_jacobian(erf_mlp, params, x)
    return erf_mlp, params, x, jac, jac @ jac.T


# --------------------------------------------------------------------------- #
# the estimator itself
# --------------------------------------------------------------------------- #


def test_responses_are_exact_jvps_of_the_drawn_probes(small):
    apply_fn, params, x, jac, _ = small
    probes = sketch.jvp_probes(apply_fn, params, x, n_probes=16, seed=5, keep_directions=True, probe_batch_size=5)
    assert probes.directions.shape == (16, jac.shape[1])
    expected = (probes.directions @ jac.T).reshape(16, 4, 2)
    np.testing.assert_allclose(probes.responses, expected, rtol=1e-12, atol=1e-12)
    sketched = kernels.empirical_ntk(apply_fn, params, x, method="sketch", n_probes=16, seed=5)
    omega = probes.directions
    exact_form = jac @ omega.T @ omega @ jac.T / 16
    np.testing.assert_allclose(sketched, _as_full(exact_form, 4, 2), rtol=1e-11, atol=1e-12)


def test_tiles_share_the_probes(small):
    apply_fn, params, x, _, _ = small
    x2 = rand(2, (5, 3))
    for x_b in (None, x2):
        kw = dict(method="sketch", n_probes=16, seed=3)
        whole = kernels.empirical_ntk(apply_fn, params, x, x_b, **kw)
        tiled = kernels.empirical_ntk(apply_fn, params, x, x_b, tile_size=3, **kw)
        np.testing.assert_allclose(tiled, whole, rtol=1e-12, atol=1e-13)


def test_traced_is_the_mean_of_the_diagonal_output_pairs(small):
    apply_fn, params, x, _, _ = small
    full = sketch.sketched_ntk(apply_fn, params, x, n_probes=16, seed=1)
    traced = sketch.sketched_ntk(apply_fn, params, x, n_probes=16, seed=1, trace_outputs=True)
    np.testing.assert_allclose(traced, jnp.trace(full, axis1=2, axis2=3) / 2, rtol=1e-12)


def test_key_and_seed_select_the_same_probes(small):
    apply_fn, params, x, _, _ = small
    a = sketch.sketched_ntk(apply_fn, params, x, n_probes=16, seed=11)
    b = sketch.sketched_ntk(apply_fn, params, x, n_probes=16, key=jax.random.key(11))
    c = sketch.sketched_ntk(apply_fn, params, x, n_probes=16, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_unbiased_mean_over_many_sketches_is_the_exact_kernel(small, distribution):
    apply_fn, params, x, jac, theta = small
    n_sketch, k = 3000, 2
    keys = jax.random.split(jax.random.key(7), n_sketch)
    many = jax.vmap(
        lambda key: kernels.empirical_ntk(apply_fn, params, x, method="sketch", n_probes=k, key=key,
                                      distribution=distribution)
    )(keys)
    flat = jax.vmap(kernels.flatten_kernel)(many)
    mean = flat.mean(0)
    # per-entry standard error from the exact single-probe variance
    diag = jnp.diagonal(theta)
    var = diag[:, None] * diag[None, :] + theta**2
    if distribution == "rademacher":
        var = var - 2 * (jac**2) @ (jac**2).T
    z = (mean - theta) / jnp.sqrt(var / (k * n_sketch))
    # a relative bias of 1/k would put z near 25 here
    assert float(jnp.max(jnp.abs(z))) < 5.0
    # and the sample variance agrees with the analytic one (Rademacher's is smaller)
    emp_var = flat.var(0) * k
    np.testing.assert_allclose(jnp.sum(emp_var), jnp.sum(var), rtol=0.15)


def test_relative_error_falls_like_inverse_sqrt_k(small):
    apply_fn, params, x, _, theta = small
    norm2 = jnp.sum(theta**2)
    constant = 1.0 + jnp.trace(theta) ** 2 / norm2  # k · E[rel err²]
    ks, n_sketch = np.array([4, 32, 256]), 200
    # a k-probe sketch is kernel_from_probes of k responses (checked above): draw all the
    # i.i.d. probes at once and cut them into disjoint groups, one independent sketch per group
    pool = sketch.jvp_probes(apply_fn, params, x, n_probes=n_sketch * 256, seed=9, probe_batch_size=1024).responses
    pool = pool.reshape(n_sketch, 256, 4, 2)
    rms = []
    for k in ks:
        est = jax.vmap(lambda r: kernels.flatten_kernel(sketch.kernel_from_probes(r[:k])))(pool)
        rel2 = jnp.sum((est - theta) ** 2, axis=(1, 2)) / norm2
        np.testing.assert_allclose(k * rel2.mean(), constant, rtol=0.2)
        np.testing.assert_allclose(rel2.mean() * norm2, sketch.expected_squared_error(theta, int(k)), rtol=0.2)
        rms.append(float(jnp.sqrt(rel2.mean())))
    slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
    assert -0.56 < slope < -0.44, (slope, rms)


# --------------------------------------------------------------------------- #
# black box
# --------------------------------------------------------------------------- #


def test_blackbox_agrees_with_the_jvp_path(small):
    apply_fn, params, x, _, _ = small
    x2 = rand(4, (3, 3))
    for x_b in (None, x2):
        jvp = sketch.sketched_ntk(apply_fn, params, x, x_b, n_probes=16, seed=2)
        box = sketch.blackbox_ntk(erf_mlp_forward, params, x, x_b, n_probes=16, seed=2)
        # central differences with ε = eps^{1/3}: O(ε²) ≈ 4e-11 relative per response
        np.testing.assert_allclose(box, jvp, rtol=0, atol=1e-8 * float(jnp.abs(jvp).max()))
    traced = sketch.blackbox_ntk(erf_mlp_forward, params, x, n_probes=16, seed=2, trace_outputs=True)
    np.testing.assert_allclose(
        traced, sketch.sketched_ntk(apply_fn, params, x, n_probes=16, seed=2, trace_outputs=True), atol=1e-8
    )


def test_blackbox_works_for_a_function_jax_cannot_trace():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(3, 6)), rng.normal(size=(6, 2))
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}
    x = rng.normal(size=(5, 3))

    def numpy_model(p, inputs):  # np.asarray on a tracer fails: not differentiable by JAX
        a = np.asarray(p["w1"])
        b = np.asarray(p["w2"])
        return np.tanh(np.asarray(inputs) @ a) @ b / np.sqrt(6)

    def jax_model(p, inputs):
        return jnp.tanh(inputs @ p["w1"]) @ p["w2"] / jnp.sqrt(6.0)

    with pytest.raises(Exception):
        jax.jacrev(numpy_model)(params, x)
    box = sketch.blackbox_ntk(numpy_model, params, x, n_probes=30, seed=0)
    jvp = sketch.sketched_ntk(jax_model, params, jnp.asarray(x), n_probes=30, seed=0)
    np.testing.assert_allclose(box, jvp, atol=1e-8 * float(jnp.abs(jvp).max()))


def test_blackbox_float32_error_is_at_the_predicted_level(small):
    apply_fn, params, x, _, _ = small
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    x32 = x.astype(jnp.float32)
    box = sketch.blackbox_probes(apply_fn, p32, x32, n_probes=4, seed=0)
    assert box.responses.dtype == jnp.float32
    # float32 probes differ from float64 draws: apply the float64 Jacobian to the very same ω
    omega = sketch.probe_directions(p32, 4, seed=0).astype(jnp.float64)
    exact = (omega @ small[3].T).reshape(4, 4, 2)
    # ε = eps32^{1/3} ≈ 4.9e-3: round-off eps·|f|/ε ≈ 2.4e-5·|f| and truncation ε²·f''' ≈ 2.4e-5·f''',
    # with |f|, f''' = O(1) here; 1e-3 of the response scale leaves a 40x margin.
    scale = float(jnp.abs(exact).max())
    np.testing.assert_allclose(box.responses, exact, atol=1e-3 * scale)
    np.testing.assert_allclose(float(box.step), float(jnp.finfo(jnp.float32).eps) ** (1 / 3), rtol=1e-6)


# --------------------------------------------------------------------------- #
# dynamics from a sketched kernel
# --------------------------------------------------------------------------- #


def test_dynamics_from_sketched_kernels_converge_to_the_exact_ones():
    apply_fn, params = erf_mlp, erf_mlp_params([2, 32, 32, 1], seed=0)
    x = rand(0, (6, 2))
    xt = rand(1, (4, 2))
    both = jnp.concatenate([x, xt])
    y = jnp.sin(x[:, :1] * 2)
    f0, ft0 = apply_fn(params, x), apply_fn(params, xt)
    times = jnp.array([1.0, 10.0, 100.0])
    kw = dict(learning_rate=1.0, diag_reg=1e-3)

    def run(kernel):
        return dynamics.function_space(kernel[:6, :6], y, f0, times, k_test_train=kernel[6:, :6], fx_test_0=ft0, **kw)

    exact_train, exact_test = run(kernels.empirical_ntk(apply_fn, params, both, method="jacobian"))
    # 4 independent sketches per k from disjoint groups of one pool of probes
    pool = sketch.jvp_probes(apply_fn, params, both, n_probes=4 * 2048, seed=0, probe_batch_size=512).responses
    pool = pool.reshape(4, 2048, 10, 1)
    errors = []
    for k in (8, 128, 2048):
        err = 0.0
        for group in pool:
            tr, te = run(sketch.kernel_from_probes(group[:k]))
            err += float(jnp.sqrt(jnp.mean((tr - exact_train) ** 2) + jnp.mean((te - exact_test) ** 2)))
        errors.append(err / 4)
    assert errors[0] > errors[1] > errors[2], errors
    # 256x the probes: 1/√k predicts a 16x smaller error; ask for 6x
    assert errors[2] < errors[0] / 6, errors


# --------------------------------------------------------------------------- #
# Jacobian restoration
# --------------------------------------------------------------------------- #


def test_restore_recovers_the_jacobian_of_a_linear_model_exactly():
    x = rand(0, (5, 4))
    params = rand(1, (4, 3))
    apply_fn = lambda w, inputs: inputs @ w  # noqa: E731
    omega = sketch.probe_directions(params, 20, seed=0)
    probes = sketch.jvp_probes(apply_fn, params, x, n_probes=20, seed=0)
    fit = sketch.restore_jacobian(omega, probes.responses)
    jac = _flat_jacobian(apply_fn, params, x).reshape(5, 3, 12)
    np.testing.assert_allclose(fit.jacobian, jac, atol=1e-12)
    assert int(fit.rank) == 12
    assert float(fit.relative_residual) < 1e-13
    np.testing.assert_allclose(fit.kernel(), kernels.empirical_ntk(apply_fn, params, x, method="jacobian"), atol=1e-11)


def test_restore_from_blackbox_probes_gives_the_exact_kernel(small):
    apply_fn, params, x, jac, theta = small
    n_params = jac.shape[1]
    probes = sketch.blackbox_probes(erf_mlp_forward, params, x, n_probes=n_params + 10, seed=1, keep_directions=True)
    fit = sketch.restore_jacobian(probes.directions, probes.responses)
    assert int(fit.rank) == n_params
    np.testing.assert_allclose(fit.jacobian.reshape(-1, n_params), jac, atol=1e-8)
    np.testing.assert_allclose(kernels.flatten_kernel(fit.kernel()), theta, atol=1e-7 * float(jnp.abs(theta).max()))
    # the residual is the central-difference error, far below the signal
    assert float(fit.relative_residual) < 1e-8


def test_restore_on_a_subspace_and_its_residual(small):
    apply_fn, params, x, jac, _ = small
    n_params = jac.shape[1]
    basis, _ = jnp.linalg.qr(rand(3, (n_params, 6)))
    coords = rand(4, (15, 6))
    inside = coords @ basis.T
    fit = sketch.restore_jacobian(inside, (inside @ jac.T).reshape(15, 4, 2), basis=basis)
    np.testing.assert_allclose(fit.jacobian.reshape(-1, 6), jac @ basis, atol=1e-12)
    assert float(fit.relative_residual) < 1e-12
    np.testing.assert_allclose(kernels.flatten_kernel(fit.kernel()), jac @ basis @ basis.T @ jac.T, atol=1e-12)

    # probes leaving span(B): the fit explains the in-span part, the residual reports the rest
    outside = rand(5, (400, n_params))
    df = outside @ jac.T
    fit_out = sketch.restore_jacobian(outside, df.reshape(400, 4, 2), basis=basis)
    # E‖J(I − BBᵀ)ω‖² / E‖Jω‖² = tr(J(I − BBᵀ)Jᵀ) / tr(JJᵀ) for isotropic ω
    unexplained = jnp.trace(jac @ (jnp.eye(n_params) - basis @ basis.T) @ jac.T) / jnp.trace(jac @ jac.T)
    np.testing.assert_allclose(fit_out.relative_residual**2, unexplained, rtol=0.15)
    # the out-of-span part acts as zero-mean noise independent of c = Bᵀω: J_B stays unbiased,
    # each entry with standard error ‖row of J(I − BBᵀ)‖ / √k
    stderr = jnp.linalg.norm(jac @ (jnp.eye(n_params) - basis @ basis.T), axis=1) / jnp.sqrt(400.0)
    z = (fit_out.jacobian.reshape(-1, 6) - jac @ basis) / stderr[:, None]
    assert float(jnp.max(jnp.abs(z))) < 5.0


def test_restore_reports_the_noise_level():
    x = rand(0, (6, 3))
    params = rand(1, (3, 2))
    omega = sketch.probe_directions(params, 300, seed=2)
    jac = jnp.kron(x, jnp.eye(2))  # d(x W)/dW for row-major W, rows (N, K)
    sigma = 0.01
    df = omega @ jac.T + sigma * rand(3, (300, 12))
    fit = sketch.restore_jacobian(omega, df.reshape(300, 6, 2))
    np.testing.assert_allclose(float(fit.noise_std), sigma, rtol=0.05)
    np.testing.assert_allclose(fit.jacobian.reshape(12, 6), jac, atol=5 * sigma / np.sqrt(300) * 3)


# --------------------------------------------------------------------------- #
# shapes and bad input
# --------------------------------------------------------------------------- #


def _tanh_linear(w, inputs):
    return jnp.tanh(inputs @ w)


@settings(max_examples=4, deadline=None)
@given(
    n1=st.integers(1, 5), n2=st.integers(1, 4), k_out=st.integers(1, 3), n_probes=st.integers(1, 3),
    traced=st.booleans(), batch=st.one_of(st.none(), st.integers(1, 4)),
)
def test_shapes(n1, n2, k_out, n_probes, traced, batch):
    apply_fn = _tanh_linear
    params = jnp.ones((2, k_out)) * 0.3
    x1, x2 = jnp.ones((n1, 2)), jnp.arange(2.0 * n2).reshape(n2, 2) / 5
    out = sketch.sketched_ntk(apply_fn, params, x1, x2, n_probes=n_probes, trace_outputs=traced, tile_size=batch)
    assert out.shape == ((n1, n2) if traced else (n1, n2, k_out, k_out))
    assert bool(jnp.all(jnp.isfinite(out)))
    probes = sketch.jvp_probes(apply_fn, params, x1, n_probes=n_probes)
    assert probes.responses.shape == (n_probes, n1, k_out)


@settings(max_examples=20, deadline=None)
@given(bad=st.one_of(st.integers(-5, 0), st.floats(0.5, 3.5), st.just(True), st.just("4")))
def test_bad_n_probes(bad, small):
    apply_fn, params, x, _, _ = small
    with pytest.raises((ValueError, TypeError), match="n_probes"):
        kernels.empirical_ntk(apply_fn, params, x, method="sketch", n_probes=bad)
    with pytest.raises((ValueError, TypeError), match="n_probes"):
        sketch.blackbox_ntk(apply_fn, params, x, n_probes=bad)


def test_bad_options(small):
    apply_fn, params, x, _, _ = small
    with pytest.raises(TypeError, match="n_probes"):
        kernels.empirical_ntk(apply_fn, params, x, method="sketch")
    with pytest.raises(ValueError, match="key, seed"):
        sketch.sketched_ntk(apply_fn, params, x, n_probes=2, seed=1, key=jax.random.key(1))
    with pytest.raises(ValueError, match="distribution"):
        sketch.sketched_ntk(apply_fn, params, x, n_probes=2, distribution="uniform")
    with pytest.raises(ValueError, match="probe_batch_size"):
        sketch.sketched_ntk(apply_fn, params, x, n_probes=2, probe_batch_size=0)
    with pytest.raises(ValueError, match="step"):
        sketch.blackbox_ntk(apply_fn, params, x, n_probes=2, step=-1.0)
    with pytest.raises(ValueError, match="apply_fn"):
        sketch.blackbox_ntk(lambda p, inputs: np.zeros((3,)), params, x, n_probes=2)
    with pytest.raises(ValueError, match="apply_fn output"):
        sketch.blackbox_ntk(lambda p, inputs: np.full((4, 2), np.nan), params, x, n_probes=2)
    with pytest.raises(TypeError, match="apply_fn"):
        sketch.blackbox_ntk("not a function", params, x, n_probes=2)


def test_bad_restore_input():
    omega = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="directions"):
        sketch.restore_jacobian(jnp.ones(6), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="responses"):
        sketch.restore_jacobian(omega, jnp.ones((5, 2, 1)))
    with pytest.raises(ValueError, match="basis"):
        sketch.restore_jacobian(omega, jnp.ones((4, 2)), basis=jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="orthonormal"):
        sketch.restore_jacobian(omega, jnp.ones((4, 2)), basis=jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="responses"):
        sketch.restore_jacobian(omega, jnp.full((4, 2), jnp.nan))
    with pytest.raises(ValueError, match="kernel"):
        sketch.expected_squared_error(jnp.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="responses"):
        sketch.kernel_from_probes(jnp.ones((3, 2, 2)), jnp.ones((4, 2, 2)))
