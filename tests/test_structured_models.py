"""Structured NTK on hand-written jnp models, unrecognised leaves, tiling, float32.

Oracle: explicit ``J Jᵀ`` from ``jax.jacrev`` (float64, 1e-10 of the largest entry).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ntkdyn import kernels, models
from ntkdyn.kernels import structured
from ntkdyn.kernels.structured import gram

from _ntk_oracle import assert_matches, explicit_ntk, inputs


def test_plain_apply_fn_weight_on_either_side_and_shared_positions():
    params = {
        "w1": inputs((3, 4, 6), seed=1),  # contracts two input axes
        "w2t": inputs((5, 6), seed=2),  # used as W2ᵀ: weight on the left of dot_general
        "b2": inputs((5,), seed=3),
        "w3": inputs((5, 2), seed=4),
        "c": inputs((7, 1), seed=8),  # per-position offset after a nonlinearity: a plain bias site
    }

    def apply_fn(p, x):  # x: (N, 7, 3, 4): 7 positions share every weight
        h = jnp.tanh(jnp.einsum("nsab,abf->nsf", x, p["w1"])) + p["c"]
        h = jnp.einsum("gf,nsf->nsg", p["w2t"], h) - 0.5 * p["b2"]
        return jnp.sin(h).mean(axis=1) @ p["w3"] / 3.0

    x = inputs((4, 7, 3, 4), seed=5)
    assert_matches(apply_fn, params, x, inputs((3, 7, 3, 4), seed=6))
    assert_matches(apply_fn, params, x, trace_outputs=True)
    plan = structured.plan(apply_fn, params, x)
    names = sorted(params)
    by_leaf = {names[s.leaf]: s for s in plan.sites}
    assert sorted(by_leaf) == ["c", "w1", "w2t", "w3"] and plan.fallback == ()
    assert by_leaf["c"].kind == "add"
    # b2 (subtracted, scaled by 0.5) is folded into the W2ᵀ site as a constant input column
    assert names[by_leaf["w2t"].bias] == "b2" and by_leaf["w2t"].bias_scale == pytest.approx(0.5)
    assert (by_leaf["w1"].S, by_leaf["w2t"].S, by_leaf["w3"].S) == (7, 7, 1)


def test_unrecognised_leaves_fall_back_and_sum_stays_exact():
    params = {
        "w1": inputs((4, 6), seed=1),
        "gain": 1.0 + 0.1 * inputs((6,), seed=2),  # elementwise scale of data: not a dense/conv/bias
        "shared": inputs((6, 6), seed=3),  # used twice: weight sharing
        "w_out": inputs((6, 2), seed=4),
        "unused": inputs((3,), seed=5),
    }

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["w1"]) * p["gain"]
        h = jnp.tanh(h @ p["shared"])
        h = jnp.tanh(h @ p["shared"])
        return h @ p["w_out"]

    x = inputs((5, 4), seed=6)
    assert_matches(apply_fn, params, x, inputs((3, 4), seed=7))
    assert_matches(apply_fn, params, x, trace_outputs=True)
    plan = structured.plan(apply_fn, params, x)
    names = sorted(params)  # dict leaves are flattened in key order
    assert sorted(names[i] for i in plan.fallback) == ["gain", "shared"]
    assert [names[i] for i in plan.unused] == ["unused"]
    assert sorted(names[s.leaf] for s in plan.sites) == ["w1", "w_out"]


def test_leaf_inside_scan_falls_back():
    params = {"w": inputs((4, 4), seed=1) / 2, "v": inputs((4, 1), seed=2)}

    def apply_fn(p, x):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=3)
        return h @ p["v"]

    x = inputs((5, 4), seed=3)
    assert_matches(apply_fn, params, x)
    plan = structured.plan(apply_fn, params, x)
    assert plan.fallback == (1,) and [s.leaf for s in plan.sites] == [0]  # leaves: v, w


def test_no_recognised_leaf_at_all():
    params = (inputs((3,), seed=1),)

    def apply_fn(p, x):
        return jnp.sin(x * p[0]).sum(axis=1, keepdims=True)

    assert_matches(apply_fn, params, inputs((4, 3), seed=2), inputs((2, 3), seed=3))
    assert structured.plan(apply_fn, params, inputs((1, 3))).sites == ()


def test_tiled_structured_equals_oracle_with_odd_sizes():
    f, p = models.mlp(3, 2, width=10, depth=2, dtype=jnp.float64)
    x1, x2 = inputs((11, 3)), inputs((7, 3), seed=1)
    ref = explicit_ntk(f, p, x1, x1)
    got = kernels.empirical_ntk(f, p, x1, method="structured", tile_size=4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(ref))))
    got = kernels.empirical_ntk(f, p, x1, x2, method="structured", tile_size=3, trace_outputs=True)
    ref = explicit_ntk(f, p, x1, x2, trace_outputs=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(ref))))


def test_symmetric_row_blocks(monkeypatch):
    # force several row blocks in one symmetric tile (normally ~256 rows each)
    monkeypatch.setattr(gram, "_SYMMETRIC_BLOCK", 3)
    structured.structured_tile.clear_cache()
    try:
        f, p = models.mlp(3, 2, width=6, depth=1, dtype=jnp.float64)
        x = inputs((10, 3))
        assert_matches(f, p, x)
        assert_matches(f, p, x, trace_outputs=True)
    finally:
        structured.structured_tile.clear_cache()


def test_float32_agrees_with_float64_oracle():
    # float32 Gram products of length ≤ 65 accumulate ≈ √65·6e-8 relative error
    # per entry; 1e-5 of the largest entry leaves a wide margin.
    f, p = models.mlp(8, 2, width=64, depth=2, dtype=jnp.float32)
    x = inputs((9, 8), dtype=jnp.float32)
    got = kernels.empirical_ntk(f, p, x, method="structured", tile_size=None)
    assert got.dtype == jnp.float32
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    ref = explicit_ntk(f, p64, x.astype(jnp.float64), x.astype(jnp.float64))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@settings(max_examples=5, deadline=None)
@given(n1=st.integers(1, 6), n2=st.integers(1, 5), k=st.integers(1, 3), trace=st.booleans())
def test_shapes_and_values_property(n1, n2, k, trace):
    f, p = models.mlp(2, k, width=5, depth=1, dtype=jnp.float64)
    x1, x2 = inputs((n1, 2)), inputs((n2, 2), seed=1)
    got = assert_matches(f, p, x1, x2, trace_outputs=trace)
    assert got.shape == ((n1, n2) if trace else (n1, n2, k, k))


def test_plan_rejects_non_matrix_output():
    with pytest.raises(ValueError, match="apply_fn"):
        structured.plan(lambda p, x: (x @ p).sum(), jnp.ones((3, 2)), inputs((4, 3)))
