"""Every kernel and kernel-operator computation runs at full matmul precision by default.

On GPUs float32 matmuls default to TF32; the kernels run their traced bodies under
``jax.default_matmul_precision(precision)`` (default "highest"), user model included.
Checked on CPU in the lowered program: every ``dot_general`` and ``convolution`` must
carry HIGHEST precision (or have float64 operands).
"""

import jax
import jax.numpy as jnp
import pytest

from ntkdyn import kernels, models

MATMULS = ("stablehlo.dot_general", "stablehlo.convolution")


def matmul_lines(text):
    return [line for line in text.splitlines() if any(op in line for op in MATMULS)]


def full_precision(line):
    """Both operands at HIGHEST (``precision = [HIGHEST, HIGHEST]`` for dots, ``precision_config`` for
    convolutions), or operands that are all float64."""
    operands = line.rsplit(" : ", 1)[-1].split("->")[0]
    return line.count("HIGHEST") == 2 or all(t.endswith("xf64>") or t.endswith("<f64>")
                                             for t in operands.strip("() ").split(", "))


def assert_full_precision(text):
    lines = matmul_lines(text)
    assert lines, "no matmul in the lowered program"
    for line in lines:
        assert full_precision(line), line


@pytest.fixture(scope="module")
def nets():
    mlp = models.mlp(4, 2, width=8, depth=1, dtype=jnp.float32)
    cnn = models.cnn((6, 6, 2), 2, channels=(3,), dtype=jnp.float32)
    x_mlp = jnp.ones((5, 4), jnp.float32)
    x_cnn = jnp.ones((3, 6, 6, 2), jnp.float32)
    return [(mlp, x_mlp), (cnn, x_cnn)]


METHODS = [("jacobian", {}), ("ntvp", {}), ("structured", {}), ("sketch", {"n_probes": 3})]


@pytest.mark.parametrize("method,options", METHODS)
@pytest.mark.parametrize("trace_outputs", [False, True])
def test_every_method_lowers_at_highest_precision(nets, method, options, trace_outputs):
    for (f, p), x in nets:
        for tile_size in (None, 2):
            call = jax.jit(lambda q, xx, yy: kernels.empirical_ntk(
                f, q, xx, yy, method=method, tile_size=tile_size, trace_outputs=trace_outputs, **options))
            assert_full_precision(call.lower(p, x, x[:2] + 1).as_text())
            symmetric = jax.jit(lambda q, xx: kernels.empirical_ntk(f, q, xx, method=method, tile_size=tile_size,
                                                                     **options))
            assert_full_precision(symmetric.lower(p, x).as_text())


@pytest.mark.parametrize("trace_outputs", [False, True])
def test_ntk_vp_lowers_at_highest_precision(nets, trace_outputs):
    for (f, p), x in nets:
        v = jnp.ones((x.shape[0],) if trace_outputs else (x.shape[0], 2), jnp.float32)
        for tile_size in (None, 2):
            call = jax.jit(lambda q, xx, vv: kernels.ntk_vp(f, q, xx, None, vv, trace_outputs=trace_outputs,
                                                          tile_size=tile_size))
            assert_full_precision(call.lower(p, x, v).as_text())


def test_auto_and_sketch_helpers_lower_at_highest_precision(nets):
    (f, p), x = nets[0]
    assert_full_precision(jax.jit(lambda q, xx: kernels.empirical_ntk(f, q, xx)).lower(p, x).as_text())
    assert_full_precision(jax.jit(lambda q, xx: kernels.sketched_ntk(f, q, xx, n_probes=2)).lower(p, x).as_text())
    r = jnp.ones((3, 5, 2), jnp.float32)
    assert_full_precision(jax.jit(lambda a: kernels.kernel_from_probes(a, a + 1)).lower(r).as_text())


@pytest.mark.parametrize("precision", ["default", jax.lax.Precision.DEFAULT, "bfloat16"])
def test_lower_precision_is_opt_in(nets, precision):
    (f, p), x = nets[0]
    text = jax.jit(lambda q, xx: kernels.empirical_ntk(f, q, xx, method="jacobian", precision=precision)).lower(
        p, x).as_text()
    assert matmul_lines(text) and not any("HIGHEST" in line for line in matmul_lines(text))
    text = jax.jit(lambda q, xx: kernels.ntk_vp(f, q, xx, None, jnp.ones((5, 2)), precision=precision)).lower(
        p, x).as_text()
    assert not any("HIGHEST" in line for line in matmul_lines(text))


@pytest.mark.parametrize("precision", ["highest", "HIGHEST", "float32", jax.lax.Precision.HIGHEST])
def test_precision_spellings(nets, precision):
    (f, p), x = nets[0]
    text = jax.jit(lambda q, xx: kernels.empirical_ntk(f, q, xx, method="ntvp", precision=precision)).lower(
        p, x).as_text()
    assert_full_precision(text)


@pytest.mark.parametrize("bad", ["fp8", None, 3])
def test_bad_precision_names_precision(nets, bad):
    (f, p), x = nets[0]
    with pytest.raises(ValueError, match="^precision:"):
        kernels.empirical_ntk(f, p, x, precision=bad)
    with pytest.raises(ValueError, match="^precision:"):
        kernels.ntk_vp(f, p, x, None, jnp.ones((5, 2)), precision=bad)
