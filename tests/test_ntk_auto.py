"""Method choice, memory-bounded tiling and the cost model of ``empirical_ntk``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdyn import kernels, models
from ntkdyn.kernels import planner


def data(n, d=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d), jnp.float64)


@pytest.fixture(scope="module")
def net():
    return models.mlp(3, 2, width=16, depth=2, dtype=jnp.float64)


def oracle(f, p, x1, x2=None, trace_outputs=False):
    return kernels.empirical_ntk(f, p, x1, x2, method="jacobian", tile_size=None, trace_outputs=trace_outputs)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10 * float(np.max(np.abs(b))))


def test_auto_prefers_structured_for_dense_networks(net):
    f, p = net
    assert kernels.plan_ntk(f, p, data(40)) == ("structured", 40)
    close(kernels.empirical_ntk(f, p, data(9)), oracle(f, p, data(9)))


def test_memory_limit_shrinks_tiles_and_result_is_unchanged(net):
    f, p = net
    x1, x2 = data(23), data(17, seed=1)
    kernel_bytes = 23 * 17 * 4 * 8
    method, b = kernels.plan_ntk(f, p, x1, x2, memory_limit=2 * kernel_bytes + 60_000)
    assert method in kernels.METHODS and 1 <= b < 23
    got = kernels.empirical_ntk(f, p, x1, x2, memory_limit=2 * kernel_bytes + 60_000)
    close(got, oracle(f, p, x1, x2))
    got = kernels.empirical_ntk(f, p, x1, trace_outputs=True, memory_limit=2 * 23 * 23 * 8 + 30_000)
    close(got, oracle(f, p, x1, trace_outputs=True))


COSTED = [("jacobian", {}), ("ntvp", {}), ("structured", {}), ("sketch", {"n_probes": 8})]


@pytest.mark.parametrize("method,options", COSTED)
def test_each_cost_model_fits_its_budget(net, method, options):
    f, p = net
    x = data(50)
    cost = kernels.METHODS[method].cost(f, p, x, None, False, **options)
    budget = 300_000
    b = planner.largest_tile(cost, 50, 50, budget)
    assert cost.memory(b, b) <= budget
    assert b == 50 or cost.memory(b + 1, b + 1) > budget
    assert planner.largest_tile(cost, 50, 50, cost.memory(1, 1) - 1) is None  # below the floor


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 200), trace=st.booleans())
def test_cost_models_grow_with_tile_size(net, b, trace):
    f, p = net
    x = data(4)
    for name, options in COSTED:
        cost = kernels.METHODS[name].cost(f, p, x, None, trace, **options)
        assert 0 < cost.memory(b, b) < cost.memory(b + 1, b + 1), name
        assert 0 < cost.flops(b, b) < cost.flops(b + 1, b + 1), name


def test_kernel_larger_than_limit_is_refused(net):
    f, p = net
    with pytest.raises(ValueError, match="^memory_limit:"):
        kernels.empirical_ntk(f, p, data(30), memory_limit=30 * 30 * 4 * 8)
    with pytest.raises(TypeError, match="^memory_limit:"):
        kernels.empirical_ntk(f, p, data(3), memory_limit="1GB")


@pytest.mark.parametrize("limit", [-5, 0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("tile_size", ["auto", None, 2])
def test_non_positive_memory_limit_is_refused_with_any_tile_size(net, limit, tile_size):
    """memory_limit=-1 used to be ignored silently whenever tile_size was not "auto"."""
    f, p = net
    with pytest.raises(ValueError, match="^memory_limit:"):
        kernels.empirical_ntk(f, p, data(3), tile_size=tile_size, memory_limit=limit)
    with pytest.raises(ValueError, match="^memory_limit:"):
        kernels.ntk_vp(f, p, data(3), None, jnp.ones((3, 2)), tile_size=tile_size, memory_limit=limit)


def _tile_bytes(f, p, x1, x2, method, options):
    """Bytes XLA allocates for one tile (intermediates and result), from the compiled program."""
    one_tile = jax.jit(lambda q, a, b: kernels.empirical_ntk(f, q, a, b, method=method, tile_size=None, **options))
    stats = one_tile.lower(p, x1, x2).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


@pytest.mark.parametrize("method,options", COSTED)
def test_planned_tiles_fit_the_memory_limit(method, options):
    """Every method's tiles fit the budget memory_limit leaves beside the kernel, as XLA allocates them.

    On the old cost models the ntvp tiles (no room for XLA's copy of the largest leaf's tangents) and
    the jacobian tiles (same copy of the leaf's Jacobian) overran, and the sketch was never tiled.
    """
    if method == "sketch":  # activations, not the P-sized probes, must dominate for tiling to matter
        f, p = models.cnn((8, 8, 3), 2, channels=(8, 8), dtype=jnp.float32)
        x = jax.random.normal(jax.random.key(0), (24, 8, 8, 3), jnp.float32)
        budgets = (0.2, 0.4)
    else:
        f, p = models.mlp(16, 2, width=256, depth=2, dtype=jnp.float32)
        x = jax.random.normal(jax.random.key(0), (24, 16), jnp.float32)
        budgets = (3, 8)
    kernel_bytes = 24 * 24 * 2 * 2 * 4
    for tiles_mib in budgets:
        budget = tiles_mib * 2**20
        name, b = kernels.plan_ntk(f, p, x, method=method, memory_limit=2 * kernel_bytes + budget, **options)
        assert name == method and 1 <= b <= 24
        assert _tile_bytes(f, p, x[:b], x[b : 2 * b] if b <= 12 else x[:b] + 1, method, options) <= budget


@pytest.mark.parametrize("method,options", COSTED)
def test_budget_below_the_smallest_tile_is_refused(net, method, options):
    f, p = net
    x = data(10)
    with pytest.raises(ValueError, match="^memory_limit: leaves .* below the smallest"):
        kernels.empirical_ntk(f, p, x, method=method, memory_limit=2 * 10 * 10 * 4 * 8 + 64, **options)
    with pytest.raises(ValueError, match="^memory_limit:"):
        kernels.ntk_vp(f, p, x, None, jnp.ones((10, 2)), memory_limit=64)


def test_explicit_tile_over_an_explicit_budget_is_refused(net):
    f, p = net
    with pytest.raises(ValueError, match="^tile_size: a tile of 50 inputs"):
        kernels.empirical_ntk(f, p, data(50), method="jacobian", tile_size=50, memory_limit=2 * 50 * 50 * 32 + 10_000)
    with pytest.raises(ValueError, match="^tile_size: all inputs per call"):
        kernels.ntk_vp(f, p, data(50), None, jnp.ones((50, 2)), tile_size=None, memory_limit=10_000)


def test_ntk_vp_auto_tiles_fit_the_memory_limit():
    f, p = models.mlp(16, 2, width=256, depth=2, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (24, 16), jnp.float32)
    v = jnp.ones((24, 2, 3), jnp.float32)
    whole = kernels.ntk_vp(f, p, x, None, v, tile_size=None)
    for mib in (3, 6):
        budget = mib * 2**20
        tiled = kernels.ntk_vp(f, p, x, None, v, memory_limit=budget)
        np.testing.assert_allclose(tiled, whole, rtol=2e-5, atol=2e-5 * float(jnp.abs(whole).max()))
        jitted = jax.jit(lambda q, xx, vv: kernels.ntk_vp(f, q, xx, None, vv, memory_limit=budget))
        stats = jitted.lower(p, x, v).compile().memory_analysis()  # the auto tile is planned while tracing
        assert stats.temp_size_in_bytes + stats.output_size_in_bytes <= budget


def test_bad_method_and_tile_size(net):
    f, p = net
    with pytest.raises(ValueError, match="^method:"):
        kernels.empirical_ntk(f, p, data(3), method="fast")
    with pytest.raises(ValueError, match="^tile_size:"):
        kernels.empirical_ntk(f, p, data(3), tile_size="big")
    with pytest.raises(ValueError, match="^tile_size:"):
        kernels.empirical_ntk(f, p, data(3), tile_size=0)
    with pytest.raises(TypeError, match="^n_probes: not an option of method 'jacobian'"):
        kernels.empirical_ntk(f, p, data(3), method="jacobian", n_probes=3)
    with pytest.raises(TypeError, match="^n_probes: not an option of method 'auto'"):
        kernels.empirical_ntk(f, p, data(3), n_probes=3)
    with pytest.raises(ValueError, match="^precision:"):
        kernels.empirical_ntk(f, p, data(3), precision="fp8")


def test_batch_mixing_model_is_not_given_to_structured():
    params = {"w": data(3, 4, seed=5), "v": data(4, 1, seed=6)}

    def centred(p, x):  # subtracts the batch mean: row i depends on every input
        h = jnp.tanh(x @ p["w"])
        return (h - h.mean(axis=0)) @ p["v"]

    x = data(6)
    method, _ = kernels.plan_ntk(centred, params, x)
    assert method != "structured"
    close(kernels.empirical_ntk(centred, params, x, tile_size=None), oracle(centred, params, x))


def test_model_the_analyser_cannot_read_is_an_expected_outcome():
    """A typed outcome (structured.Unsupported, a ValueError naming apply_fn; no cost), not a swallowed error."""
    params = {"w": data(3, 2, seed=5)}

    def pairs(p, x):  # needs an even batch: per-example tracing fails
        return (x.reshape(-1, 2, 3) @ p["w"]).reshape(x.shape[0], 2)

    x = data(6)
    with pytest.raises(kernels.structured.Unsupported, match="^apply_fn: cannot be traced on a single example"):
        kernels.structured.plan(pairs, params, x)
    assert kernels.METHODS["structured"].cost(models.as_model(pairs), params, x, None, False) is None
    with pytest.raises(ValueError, match="^apply_fn:"):
        kernels.empirical_ntk(pairs, params, x, method="structured", tile_size=None)


def test_analyser_bugs_are_not_swallowed(monkeypatch):
    """A failure inside the analyser itself propagates instead of silently switching method."""
    from ntkdyn.kernels.structured import matching

    def broken(*args):
        raise RuntimeError("analyser bug")

    monkeypatch.setattr(matching, "_analyse", broken)
    f, p = models.mlp(3, 1, width=5, depth=1, dtype=jnp.float64, seed=11)  # a fresh shape: not planned before
    with pytest.raises(RuntimeError, match="analyser bug"):
        kernels.plan_ntk(f, p, data(13))


def test_tiling_under_jit(net):
    f, p = net
    x = data(11)
    jitted = jax.jit(lambda xx: kernels.empirical_ntk(f, p, xx, method="structured", tile_size=4))
    close(jitted(x), oracle(f, p, x))
    jitted = jax.jit(lambda xx: kernels.empirical_ntk(f, p, xx, trace_outputs=True, memory_limit=2 * 11 * 11 * 8 + 30_000))
    close(jitted(x), oracle(f, p, x, trace_outputs=True))


def test_method_table_is_static():
    assert set(kernels.METHODS) == {"jacobian", "ntvp", "structured", "sketch"}
    with pytest.raises(TypeError):
        kernels.METHODS["free"] = kernels.METHODS["jacobian"]  # no registration


def test_jaxpr_cost_counts_dense_and_conv_flops():
    dense = jax.make_jaxpr(lambda a, w: a @ w)(jnp.ones((2, 4)), jnp.ones((4, 3)))
    assert kernels.jaxpr_cost(dense.jaxpr) == (2.0 * 2 * 3 * 4, 6)
    conv = jax.make_jaxpr(
        lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)))
    assert kernels.jaxpr_cost(conv.jaxpr) == (2.0 * (3 * 3 * 4) * (3 * 3 * 2), 36)


def test_available_memory_is_positive():
    assert kernels.available_memory() > 0


def test_repeated_calls_do_not_run_the_models_python_again():
    """Planning traces the model; a second call with one model and the same shapes reuses every plan
    (and compiled program), so the model's Python body does not run at all. A new shape is planned
    afresh, and a different function (one that mixes rows) never inherits another's plan."""
    w = data(3, 2, seed=4)
    runs = []

    def counted(p, x):
        runs.append(1)
        return jnp.tanh(x @ p)

    x = data(6, seed=1)
    k1 = kernels.empirical_ntk(counted, w, x)
    v = jnp.ones((6, 2))
    vp1 = kernels.ntk_vp(counted, w, x, None, v)
    assert runs
    runs.clear()
    k2 = kernels.empirical_ntk(counted, w, x)
    vp2 = kernels.ntk_vp(counted, w, x, None, v)
    assert runs == []
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(vp1, vp2)
    kernels.empirical_ntk(counted, w, x[:5])  # new shape: planned again
    assert runs

    def mixing(p, z):  # batch statistics couple the rows
        out = counted(p, z)
        return out - jnp.mean(out, axis=0, keepdims=True)

    assert kernels.plan_ntk(mixing, w, x)[0] != "structured"
    close(kernels.empirical_ntk(mixing, w, x), oracle(mixing, w, x))


def test_everything_concrete_inside_jit(net):
    """Concrete params and inputs closed over by an outer jit: the value checks and the structured probe
    still run on their values (not on tracers)."""
    f, p = models.mlp(3, 2, width=7, depth=1, dtype=jnp.float64, seed=21)  # a fresh signature: probed here
    x = data(6, seed=3)
    close(jax.jit(lambda: kernels.empirical_ntk(f, p, x))(), oracle(f, p, x))
    bad = jax.tree_util.tree_map(lambda a: a * jnp.nan, p)
    with pytest.raises(ValueError, match="^params:"):
        jax.jit(lambda: kernels.empirical_ntk(f, bad, x))()
