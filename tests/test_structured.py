"""The structured NTK against the explicit oracle ``J Jᵀ`` (jacrev, flattened), float64.

Every case also checks what the structured method recognised, so a silent
fallback to per-example Jacobians (which would also be exact) cannot pass as
the structured path.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from ntkdyn import models
from ntkdyn.kernels import structured

from _ntk_oracle import assert_matches, inputs, kinds


# --------------------------------------------------------------------------- #
# MLPs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "depth,activation,parameterization,k",
    [
        (0, "linear", "ntk", 1),
        (1, "erf", "ntk", 3),
        (3, "relu", "standard", 2),
    ],
)
def test_mlp_matches_jjt(depth, activation, parameterization, k):
    f, p = models.mlp(5, k, width=12, depth=depth, activation=activation, parameterization=parameterization, dtype=jnp.float64)
    x1, x2 = inputs((7, 5)), inputs((4, 5), seed=1)
    assert_matches(f, p, x1, x2)
    assert_matches(f, p, x1, trace_outputs=True)
    site_kinds, fallback = kinds(f, p, x1)
    assert site_kinds == ["dense"] * (depth + 1) and fallback == ()


def test_mlp_biases_are_folded_into_dense_sites():
    f, p = models.mlp(3, 2, width=8, depth=2, dtype=jnp.float64)
    plan = structured.plan(f, p, inputs((2, 3)))
    assert all(s.bias is not None for s in plan.sites)
    # σ_w/√fan_in of each layer (first 1.5/√3, then 1.5/√8), σ_b = 0.05
    np.testing.assert_allclose([s.scale for s in plan.sites], [1.5 / math.sqrt(3), 1.5 / math.sqrt(8), 1.5 / math.sqrt(8)])
    np.testing.assert_allclose([s.bias_scale for s in plan.sites], [0.05] * 3)


def test_mlp_without_bias_and_single_example():
    f, p = models.mlp(3, 2, width=6, depth=2, sigma_b=None, dtype=jnp.float64)
    assert_matches(f, p, inputs((1, 3)))
    assert_matches(f, p, inputs((1, 3)), inputs((5, 3), seed=3))


# --------------------------------------------------------------------------- #
# CNNs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "strides,padding,k,kernel_size",
    [(2, "SAME", 3, 3), (2, "VALID", 1, 2), (1, ((2, 0), (1, 1)), 2, 3)],
)
def test_cnn_matches_jjt(strides, padding, k, kernel_size):
    f, p = models.cnn(
        (7, 6, 2), k, channels=(3, 4), kernel_size=kernel_size, strides=strides, padding=padding, dtype=jnp.float64
    )
    x1, x2 = inputs((5, 7, 6, 2)), inputs((3, 7, 6, 2), seed=1)
    assert_matches(f, p, x1, x2)
    assert_matches(f, p, x1, trace_outputs=True)
    site_kinds, fallback = kinds(f, p, x1)
    assert site_kinds == ["conv", "conv", "dense"] and fallback == ()


def test_conv_uses_jacobian_form_when_positions_are_many():
    f, p = models.cnn((10, 10, 1), 2, channels=(2,), dtype=jnp.float64)
    site = [s for s in structured.plan(f, p, inputs((1, 10, 10, 1))).sites if s.kind == "conv"][0]
    assert site.S == 100
    assert not structured.uses_gram(site, 6, 6, 2, False)
    assert_matches(f, p, inputs((6, 10, 10, 1)))


def test_conv_nchw_and_dilation():
    w = inputs((4, 2, 3, 3), seed=4)  # OIHW

    def apply_fn(params, x):
        y = jax.lax.conv_general_dilated(
            x, params["w"], (1, 2), ((1, 1), (0, 2)), rhs_dilation=(2, 1), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return jnp.tanh(y).reshape(x.shape[0], -1)[:, :3]

    params = {"w": w}
    x = inputs((4, 2, 7, 6), seed=5)
    assert_matches(apply_fn, params, x, inputs((3, 2, 7, 6), seed=6))
    assert kinds(apply_fn, params, x) == (["conv"], ())


# --------------------------------------------------------------------------- #
# flax modules
# --------------------------------------------------------------------------- #


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), strides=(2, 1), padding="SAME", rngs=rngs)
        self.dense = nnx.Linear(3 * 5 * 5, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        x = jnp.tanh(self.dense(x.reshape(x.shape[0], -1)))
        return self.out(x)


def test_nnx_linear_and_conv():
    model = NNXNet(nnx.Rngs(0))
    f, p = models.as_apply_fn(model)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    x = inputs((5, 9, 5, 2))
    assert_matches(f, p, x, inputs((2, 9, 5, 2), seed=2))
    assert_matches(f, p, x, trace_outputs=True)
    site_kinds, fallback = kinds(f, p, x)
    assert site_kinds == ["conv", "dense", "dense"] and fallback == ()


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.Conv(3, (2, 2), strides=(1, 1), padding="VALID")(x)
        x = jax.nn.gelu(x).reshape(x.shape[0], -1)
        x = linen.Dense(6)(x)
        return linen.Dense(3, use_bias=False)(jnp.sin(x))


def test_linen_dense_and_conv():
    module = LinenNet()
    x = inputs((5, 4, 4, 2))
    variables = module.init(jax.random.key(0), x)
    f, p = models.as_apply_fn(variables, module)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    assert_matches(f, p, x, inputs((3, 4, 4, 2), seed=7))
    assert_matches(f, p, x, trace_outputs=True)
    site_kinds, fallback = kinds(f, p, x)
    assert site_kinds == ["conv", "dense", "dense"] and fallback == ()


