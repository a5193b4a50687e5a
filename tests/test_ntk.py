"""Every NTK method against the explicit Jacobian oracle ``J Jᵀ`` (float64)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import ntkdyn
from ntkdyn import kernels, models

EXACT_METHODS = ["jacobian", "ntvp"]


def explicit_ntk(apply_fn, params, x1, x2):
    """Oracle: flatten every leaf of jax.jacrev and contract."""

    def jac(x):
        j = jax.jacrev(lambda p: apply_fn(p, x))(params)
        leaves = jax.tree_util.tree_leaves(j)
        return jnp.concatenate([l.reshape(l.shape[0], l.shape[1], -1) for l in leaves], axis=-1)

    return jnp.einsum("ikp,jlp->ijkl", jac(x1), jac(x2))


def nested_apply(params, x):
    """A hand-written model with a deeply nested params pytree (dict/list/tuple)."""
    h = jnp.tanh(x @ params["block"][0]["w"] + params["block"][0]["b"])
    h = jax.nn.gelu(h @ params["block"][1][0]) * params["block"][1][1]
    return h @ params["head"]["w"] + jnp.sin(params["head"]["shift"])


def nested_params(d, k, key):
    ks = jax.random.split(key, 6)
    return {
        "block": [
            {"w": jax.random.normal(ks[0], (d, 5)), "b": jax.random.normal(ks[1], (5,))},
            (jax.random.normal(ks[2], (5, 4)), jax.random.normal(ks[3], (4,))),
        ],
        "head": {"w": jax.random.normal(ks[4], (4, k)), "shift": jax.random.normal(ks[5], (k,))},
    }


def cases():
    key = jax.random.key(0)
    x1 = jax.random.normal(key, (7, 4))
    x2 = jax.random.normal(jax.random.key(1), (5, 4))
    img1 = jax.random.normal(jax.random.key(2), (5, 6, 6, 2))
    img2 = jax.random.normal(jax.random.key(3), (3, 6, 6, 2))
    for k in (1, 3):
        f, p = models.mlp(4, k, width=8, depth=2, activation="erf", dtype=jnp.float64, seed=k)
        yield f"mlp-k{k}", f, p, x1, x2
        f, p = models.cnn((6, 6, 2), k, channels=(3, 2), strides=2, activation="relu", dtype=jnp.float64, seed=k)
        yield f"cnn-k{k}", f, p, img1, img2
        yield f"nested-k{k}", nested_apply, nested_params(4, k, jax.random.key(10 + k)), x1, x2


CASES = list(cases())


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_methods_match_explicit_jacobian(case, method):
    _, f, p, x1, x2 = case
    ref12 = explicit_ntk(f, p, x1, x2)
    ref11 = explicit_ntk(f, p, x1, x1)
    k = ref12.shape[-1]
    scale = float(jnp.abs(ref11).max())
    for tile_size in (None, 3):  # 3 divides neither 7 nor 5
        got12 = kernels.empirical_ntk(f, p, x1, x2, method=method, tile_size=tile_size)
        got11 = kernels.empirical_ntk(f, p, x1, method=method, tile_size=tile_size)
        tr12 = kernels.empirical_ntk(f, p, x1, x2, method=method, tile_size=tile_size, trace_outputs=True)
        assert got12.shape == ref12.shape and got12.dtype == jnp.float64
        assert tr12.shape == ref12.shape[:2]
        np.testing.assert_allclose(got12, ref12, atol=1e-10 * scale, rtol=0)
        np.testing.assert_allclose(got11, ref11, atol=1e-10 * scale, rtol=0)
        np.testing.assert_allclose(tr12, jnp.einsum("ijkk->ij", ref12) / k, atol=1e-10 * scale, rtol=0)


def test_auto_method_is_exact():
    _, f, p, x1, x2 = CASES[0]
    np.testing.assert_allclose(kernels.empirical_ntk(f, p, x1, x2), explicit_ntk(f, p, x1, x2), atol=1e-10)


def test_symmetric_kernel_is_symmetric_and_psd():
    _, f, p, x1, _ = CASES[1]
    k = kernels.flatten_kernel(kernels.empirical_ntk(f, p, x1, tile_size=3))
    np.testing.assert_allclose(k, k.T, atol=1e-12)
    assert float(jnp.linalg.eigvalsh(k).min()) > -1e-10 * float(jnp.abs(k).max())


def test_nnx_linear_and_linen_dense_adapters():
    x = jax.random.normal(jax.random.key(0), (6, 3))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 5, rngs=rngs, param_dtype=jnp.float64)
            self.b = nnx.Linear(5, 2, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    f, p = models.as_apply_fn(Net(nnx.Rngs(0)))
    np.testing.assert_allclose(kernels.empirical_ntk(f, p, x), explicit_ntk(f, p, x, x), atol=1e-10)

    class LinenNet(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(2, param_dtype=jnp.float64)(jnp.tanh(linen.Dense(5, param_dtype=jnp.float64)(x)))

    module = LinenNet()
    variables = module.init(jax.random.key(1), x)
    f2, p2 = models.as_apply_fn(variables, module.apply)
    np.testing.assert_allclose(kernels.empirical_ntk(f2, p2, x), explicit_ntk(f2, p2, x, x), atol=1e-10)
    f3, _ = models.as_apply_fn(variables, module)
    np.testing.assert_allclose(f3(p2, x), module.apply(variables, x))


def test_float32_kernel_stays_float32():
    f, p = models.mlp(4, 1, width=16, depth=1, dtype=jnp.float32)
    x = jnp.ones((3, 4), jnp.float32)
    assert kernels.empirical_ntk(f, p, x).dtype == jnp.float32


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def small():
    f, p = models.mlp(3, 2, width=4, depth=1, dtype=jnp.float64)
    return f, p, jnp.ones((4, 3))


def test_bad_method(small):
    f, p, x = small
    with pytest.raises(ValueError, match="method"):
        kernels.empirical_ntk(f, p, x, method="magic")


@pytest.mark.parametrize("bs", [0, -2, 1.5, "big"])
def test_bad_tile_size(small, bs):
    f, p, x = small
    with pytest.raises(ValueError, match="tile_size"):
        kernels.empirical_ntk(f, p, x, tile_size=bs)


def test_nan_and_empty_and_mismatched_inputs(small):
    f, p, x = small
    with pytest.raises(ValueError, match="x1"):
        kernels.empirical_ntk(f, p, x.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="x2"):
        kernels.empirical_ntk(f, p, x, x.at[1, 1].set(jnp.inf))
    with pytest.raises(ValueError, match="x1"):
        kernels.empirical_ntk(f, p, jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="x2"):
        kernels.empirical_ntk(f, p, x, jnp.ones((2, 5)))


def test_output_must_be_two_dimensional():
    with pytest.raises(ValueError, match="^apply_fn:"):
        kernels.empirical_ntk(lambda p, x: x @ p, jnp.ones(3), jnp.ones((4, 3)))


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp", "structured"])
def test_output_rows_are_checked_on_the_whole_batch(method):
    """One output row for six inputs used to give a (1, 1, 1, 1) kernel: the shape probe saw one row only."""
    w = jnp.ones((3, 1))
    first_row = lambda p, x: (x @ p)[:1]  # noqa: E731
    with pytest.raises(ValueError, match="^apply_fn: output has 1 rows for 6 inputs"):
        kernels.empirical_ntk(first_row, w, jnp.ones((6, 3)), method=method)
    at_most_four = lambda p, x: (x @ p)[:4]  # noqa: E731  -- right for x1 (4 rows), wrong for x2 (6 rows)
    with pytest.raises(ValueError, match="^apply_fn: output has 4 rows for 6 inputs"):
        kernels.empirical_ntk(at_most_four, w, jnp.ones((4, 3)), jnp.ones((6, 3)), method=method)
    with pytest.raises(ValueError, match="^apply_fn:"):
        kernels.ntk_vp(first_row, w, jnp.ones((6, 3)), None, jnp.ones((6, 1)))


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
def test_output_rows_are_checked_on_every_batch_size_the_tiles_use(method):
    """Right shape on the whole batch only: a 2-row tile of a function that always returns 6 rows was trimmed
    into a finite wrong kernel, and one that squeezes a 1-row batch to (K,) crashed with unrelated errors."""
    w = jnp.arange(1.0, 7.0).reshape(3, 2)
    x = jnp.linspace(-1.0, 1.0, 18).reshape(6, 3)
    six_rows = lambda p, xx: jnp.broadcast_to(xx[:1] @ p, (6, 2))  # noqa: E731
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 2: output has 6 rows"):
        kernels.empirical_ntk(six_rows, w, x, method=method, tile_size=2)
    squeezed = lambda p, xx: jnp.squeeze(xx @ p)  # noqa: E731  -- (2,) for one input
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 1"):
        kernels.empirical_ntk(squeezed, w, x, method=method, tile_size=1)
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 1"):
        kernels.empirical_ntk(squeezed, w, x, method=method, memory_limit=2**30)  # the planner's one-row trace
    fixed = lambda p, xx: (xx @ p).reshape(6, -1)  # noqa: E731  -- raises on any other batch size
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 4: cannot reshape"):
        kernels.empirical_ntk(fixed, w, x, method=method, tile_size=4)
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 2: output has 6 rows"):
        kernels.ntk_vp(six_rows, w, x, None, jnp.ones((6, 2)), tile_size=2)
    with pytest.raises(ValueError, match="^apply_fn: expected apply_fn.* on a batch of 1"):
        kernels.ntk_vp(squeezed, w, x[:4], x, jnp.ones((6, 2)), memory_limit=2**30)
    # a model that maps any batch correctly, with NumPy/JAX integer tile sizes
    good = lambda p, xx: jnp.tanh(xx @ p)  # noqa: E731
    whole = kernels.empirical_ntk(good, w, x, method=method, tile_size=None)
    for tile in (np.int64(4), jnp.asarray(4), np.array(4)):
        np.testing.assert_allclose(kernels.empirical_ntk(good, w, x, method=method, tile_size=tile), whole,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_params_name_params(small, method, bad):
    f, p, x = small
    leaves, treedef = jax.tree_util.tree_flatten(p)
    poisoned = jax.tree_util.tree_unflatten(treedef, [leaves[0].at[0].set(bad)] + leaves[1:])
    with pytest.raises(ValueError, match="^params: expected finite values"):
        kernels.empirical_ntk(f, poisoned, x, method=method)
    with pytest.raises(ValueError, match="^params: expected finite values"):
        kernels.ntk_vp(f, poisoned, x, None, jnp.ones((4, 2)))


def test_top_level_names_are_the_kernels_ones():
    assert ntkdyn.empirical_ntk is kernels.empirical_ntk
    assert ntkdyn.ntk_vp is kernels.ntk_vp


def test_integer_params_rejected():
    with pytest.raises(TypeError, match="params"):
        kernels.empirical_ntk(lambda p, x: x @ p, jnp.ones((3, 1), jnp.int32), jnp.ones((4, 3)))


def test_tiled_kernel_under_jit_and_grad_over_params():
    """Tiling must not pull traced params to the host (jit/grad over θ, e.g. kernel drift)."""
    _, f, p, x1, _ = CASES[0]
    whole = lambda q: jnp.sum(kernels.empirical_ntk(f, q, x1, method="jacobian", tile_size=None) ** 2)
    tiled = lambda q: jnp.sum(kernels.empirical_ntk(f, q, x1, method="jacobian", tile_size=3) ** 2)
    np.testing.assert_allclose(jax.jit(tiled)(p), whole(p), rtol=1e-12)
    g_whole, g_tiled = jax.grad(whole)(p), jax.grad(tiled)(p)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g_whole, g_tiled)


# --------------------------------------------------------------------------- #
# compiled code is reused
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def count_compilations():
    """Backend compilations inside the block (jax.monitoring's compile events)."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("method,tile_size", [("auto", "auto"), ("jacobian", 2)])
def test_one_compilation_per_architecture(method, tile_size):
    """The model is a traced pytree argument: repeated calls on one NNX module, and on a second
    instance of the same architecture (other weights), reuse the compiled programs."""
    def instance(seed):
        return models.as_apply_fn(models.MLP(3, 2, width=6, depth=1, rngs=nnx.Rngs(seed), dtype=jnp.float64))

    (f1, p1), (f2, p2) = instance(0), instance(1)
    x = jax.random.normal(jax.random.key(4), (5, 3))
    v = jnp.ones((5, 2))
    with count_compilations() as first:
        kernels.empirical_ntk(f1, p1, x, method=method, tile_size=tile_size)
        kernels.ntk_vp(f1, p1, x, None, v)
    assert first
    with count_compilations() as again:
        k1 = kernels.empirical_ntk(f1, p1, x, method=method, tile_size=tile_size)
        k2 = kernels.empirical_ntk(f2, p2, x, method=method, tile_size=tile_size)
        vp = kernels.ntk_vp(f2, p2, x, None, v)
    assert again == []
    np.testing.assert_allclose(k2, explicit_ntk(f2, p2, x, x), atol=1e-10 * float(jnp.abs(k2).max()))
    np.testing.assert_allclose(vp, jnp.einsum("ijkl,jl->ik", k2, v), rtol=1e-10, atol=1e-10)
    assert not np.allclose(k1, k2)
