"""Method choice, memory-bounded tiling and the cost model of ``empirical_ntk``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdyn import models, ntk


def data(n, d=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d), jnp.float64)


@pytest.fixture(scope="module")
def net():
    return models.mlp(3, 2, width=16, depth=2, dtype=jnp.float64)


def oracle(f, p, x1, x2=None, trace_outputs=False):
    return ntk.empirical_ntk(f, p, x1, x2, method="jacobian", batch_size=None, trace_outputs=trace_outputs)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10 * float(np.max(np.abs(b))))


def test_auto_prefers_structured_for_dense_networks(net):
    f, p = net
    assert ntk.plan_ntk(f, p, data(40)) == ("structured", 40)
    close(ntk.empirical_ntk(f, p, data(9)), oracle(f, p, data(9)))


def test_memory_limit_shrinks_tiles_and_result_is_unchanged(net):
    f, p = net
    x1, x2 = data(23), data(17, seed=1)
    kernel_bytes = 23 * 17 * 4 * 8
    method, b = ntk.plan_ntk(f, p, x1, x2, memory_limit=2 * kernel_bytes + 60_000)
    assert method in ntk.METHODS and 1 <= b < 23
    got = ntk.empirical_ntk(f, p, x1, x2, memory_limit=2 * kernel_bytes + 60_000)
    close(got, oracle(f, p, x1, x2))
    got = ntk.empirical_ntk(f, p, x1, trace_outputs=True, memory_limit=2 * 23 * 23 * 8 + 30_000)
    close(got, oracle(f, p, x1, trace_outputs=True))


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
def test_each_cost_model_fits_its_budget(net, method):
    f, p = net
    x = data(50)
    cost = ntk._AUTO_COSTS[method](f, p, x, None, False)
    budget = 300_000
    b = ntk._largest_tile(cost, 50, 50, budget)
    assert cost.memory(b, b) <= budget or b == 1
    assert b == 50 or cost.memory(b + 1, b + 1) > budget


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 200), trace=st.booleans())
def test_cost_models_grow_with_tile_size(net, b, trace):
    f, p = net
    x = data(4)
    for name, cost_fn in ntk._AUTO_COSTS.items():
        cost = cost_fn(f, p, x, None, trace)
        if cost is None:
            continue
        assert 0 < cost.memory(b, b) < cost.memory(b + 1, b + 1), name
        assert 0 < cost.flops(b, b) < cost.flops(b + 1, b + 1), name


def test_kernel_larger_than_limit_is_refused(net):
    f, p = net
    with pytest.raises(ValueError, match="^memory_limit:"):
        ntk.empirical_ntk(f, p, data(30), memory_limit=30 * 30 * 4 * 8)
    with pytest.raises(TypeError, match="^memory_limit:"):
        ntk.empirical_ntk(f, p, data(3), memory_limit="1GB")
    with pytest.raises(ValueError, match="^memory_limit:"):
        ntk.empirical_ntk(f, p, data(3), memory_limit=-5)


def test_bad_method_and_batch_size(net):
    f, p = net
    with pytest.raises(ValueError, match="^method:"):
        ntk.empirical_ntk(f, p, data(3), method="fast")
    with pytest.raises(ValueError, match="^batch_size:"):
        ntk.empirical_ntk(f, p, data(3), batch_size="big")
    with pytest.raises(ValueError, match="^batch_size:"):
        ntk.empirical_ntk(f, p, data(3), batch_size=0)


def test_batch_mixing_model_is_not_given_to_structured():
    params = {"w": data(3, 4, seed=5), "v": data(4, 1, seed=6)}

    def centred(p, x):  # subtracts the batch mean: row i depends on every input
        h = jnp.tanh(x @ p["w"])
        return (h - h.mean(axis=0)) @ p["v"]

    x = data(6)
    method, _ = ntk.plan_ntk(centred, params, x)
    assert method != "structured"
    close(ntk.empirical_ntk(centred, params, x, batch_size=None), oracle(centred, params, x))


def test_tiling_under_jit(net):
    f, p = net
    x = data(11)
    jitted = jax.jit(lambda xx: ntk.empirical_ntk(f, p, xx, method="structured", batch_size=4))
    close(jitted(x), oracle(f, p, x))
    jitted = jax.jit(lambda xx: ntk.empirical_ntk(f, p, xx, trace_outputs=True, memory_limit=2 * 11 * 11 * 8 + 30_000))
    close(jitted(x), oracle(f, p, x, trace_outputs=True))


def test_registered_method_with_cost_is_chosen_when_cheapest(net, monkeypatch):
    f, p = net
    calls = []

    def tile(apply_fn, params, x1, x2, *, trace_outputs, same):
        calls.append(x1.shape[0])
        return ntk.METHODS["jacobian"](apply_fn, params, x1, x2, trace_outputs=trace_outputs, same=same)

    free = ntk.TileCost(flops=lambda a, b: 1.0 * a * b, memory=lambda a, b: 1.0 * a * b)
    monkeypatch.setitem(ntk.METHODS, "free", tile)
    monkeypatch.setitem(ntk._AUTO_COSTS, "free", lambda *args: free)
    x = data(5)
    close(ntk.empirical_ntk(f, p, x), oracle(f, p, x))
    assert calls == [5]


def test_register_method_validates():
    with pytest.raises(ValueError, match="^name:"):
        ntk.register_method("auto", lambda *a, **k: None)
    with pytest.raises(TypeError, match="^tile_fn:"):
        ntk.register_method("x", 3)


def test_jaxpr_cost_counts_dense_and_conv_flops():
    dense = jax.make_jaxpr(lambda a, w: a @ w)(jnp.ones((2, 4)), jnp.ones((4, 3)))
    assert ntk.jaxpr_cost(dense.jaxpr) == (2.0 * 2 * 3 * 4, 6)
    conv = jax.make_jaxpr(
        lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)))
    assert ntk.jaxpr_cost(conv.jaxpr) == (2.0 * (3 * 3 * 4) * (3 * 3 * 2), 36)


def test_available_memory_is_positive():
    assert ntk.available_memory() > 0


def test_auto_plans_are_cached_per_function_and_shape(monkeypatch):
    """Planning traces the model; repeated calls with one apply_fn and shapes reuse the plan,
    and a different function (here one that mixes rows, so structured does not apply) never
    inherits another's plan."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntkdyn import models, ntk
    from _ntk_oracle import explicit_ntk

    f, p = models.mlp(3, 2, width=8, depth=1, dtype=jnp.float64, seed=4)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    calls = []
    original = ntk._AUTO_COSTS["structured"]
    monkeypatch.setitem(ntk._AUTO_COSTS, "structured", lambda *a: calls.append(1) or original(*a))
    ntk._COST_CACHE.clear()
    k1 = ntk.empirical_ntk(f, p, x)
    k2 = ntk.empirical_ntk(f, p, x)
    assert len(calls) == 1
    np.testing.assert_array_equal(k1, k2)
    ntk.empirical_ntk(f, p, x[:5])  # new shape: planned again
    assert len(calls) == 2

    def mixing(params, z):  # batch statistics couple the rows
        out = f(params, z)
        return out - jnp.mean(out, axis=0, keepdims=True)

    assert ntk.plan_ntk(mixing, p, x)[0] != "structured"
    np.testing.assert_allclose(ntk.empirical_ntk(mixing, p, x), explicit_ntk(mixing, p, x, x), atol=1e-10)
