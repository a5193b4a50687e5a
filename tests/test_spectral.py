"""Spectral functions against 50-digit references, limits, and the cut-off."""

import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntkdyn import spectral

mpmath.mp.dps = 50
LR, N = 0.7, 12.0


def ref_gain(lam, t, time):
    lam, t = mpmath.mpf(lam), mpmath.mpf(t)
    a = LR * lam / N
    if lam == 0:
        return LR * t / N
    x = a * t if time == "continuous" else -t * mpmath.log1p(-a)
    return -mpmath.expm1(-x) / lam


def ref_decay(lam, t, time):
    a = LR * mpmath.mpf(lam) / N
    return mpmath.exp(-a * t) if time == "continuous" else (1 - a) ** mpmath.mpf(t)


LAMS = [0.0, 1e-300, 1e-30, 1e-18, 1e-12, 1e-8, 1e-5, 1e-3, 0.1, 1.0, 7.5, 15.0]
TIMES = [0.0, 1e-7, 1.0, 3.0, 100.0, 1e4, 1e8]


@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_gain_and_decay_match_high_precision_float64(time):
    lam = jnp.array(LAMS)[None, :]
    t = jnp.array(TIMES)[:, None]
    if time == "discrete":
        t = jnp.round(t)
    g = np.asarray(spectral.gain(lam, t, learning_rate=LR, n=N, time=time))
    e = np.asarray(spectral.decay(lam, t, learning_rate=LR, n=N, time=time))
    c = np.asarray(spectral.decay_complement(lam, t, learning_rate=LR, n=N, time=time))
    for i, ti in enumerate(np.asarray(t)[:, 0]):
        for j, lj in enumerate(LAMS):
            rg, re = ref_gain(lj, ti, time), ref_decay(lj, ti, time)
            assert g[i, j] == pytest.approx(float(rg), rel=1e-13, abs=1e-300), (ti, lj)
            assert e[i, j] == pytest.approx(float(re), rel=1e-13, abs=1e-300), (ti, lj)
            assert c[i, j] == pytest.approx(float(rg) * lj, rel=1e-12, abs=1e-300), (ti, lj)


@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_float32_gain_is_accurate(time):
    lam = jnp.array(LAMS[2:], jnp.float32)[None, :]
    t = jnp.array([0.0, 1.0, 10.0, 1000.0, 1e6], jnp.float32)[:, None]
    g = np.asarray(spectral.gain(lam, t, learning_rate=LR, n=N, time=time))
    assert g.dtype == np.float32
    for i, ti in enumerate(np.asarray(t)[:, 0]):
        for j, lj in enumerate(np.asarray(lam)[0]):
            assert g[i, j] == pytest.approx(float(ref_gain(float(lj), float(ti), time)), rel=2e-5, abs=1e-37)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("time", ["continuous", "discrete"])
def test_infinite_time_limits(time, dtype):
    lam = jnp.array([0.0, 1e-20, 1e-6, 0.5, 3.0], dtype)
    inf = jnp.array(jnp.inf, dtype)
    g = spectral.gain(lam, inf, learning_rate=LR, n=N, time=time)
    e = spectral.decay(lam, inf, learning_rate=LR, n=N, time=time)
    c = spectral.decay_complement(lam, inf, learning_rate=LR, n=N, time=time)
    assert g[0] == jnp.inf  # λ = 0 exactly: ηt/n → ∞ (the solver masks this mode)
    np.testing.assert_array_equal(e, jnp.array([1, 0, 0, 0, 0], dtype))
    np.testing.assert_array_equal(c, jnp.array([0, 1, 1, 1, 1], dtype))
    np.testing.assert_allclose(g[1:], 1 / lam[1:], rtol=1e-6 if dtype == jnp.float32 else 1e-15)
    big = spectral.gain(lam[1:], jnp.array(1e26, dtype), learning_rate=LR, n=N, time=time)
    if time == "continuous" or dtype == jnp.float64:
        np.testing.assert_allclose(big[1:], g[2:], rtol=1e-6)


def test_continuity_across_the_small_argument_branch():
    lam = jnp.logspace(-40, 1, 4001)
    g = np.asarray(spectral.gain(lam, 10.0, learning_rate=LR, n=N))
    gl = g * np.asarray(lam)
    # g is smooth and monotone decreasing in λ; λ·g = 1 − E is monotone increasing
    assert np.all(np.diff(g) <= 1e-15 * g[:-1])
    assert np.all(np.diff(gl) >= -1e-15)
    assert g[0] == pytest.approx(LR * 10.0 / N, rel=1e-15)


def test_discrete_unstable_and_oscillating_steps():
    # a = ηλ/n: 1.5 oscillates and decays, 2.5 diverges, exactly 1 kills the mode in one step
    lam = jnp.array([1.5, 2.5, 1.0]) * N / LR
    t = jnp.arange(6.0)[:, None]
    e = spectral.decay(lam, t, learning_rate=LR, n=N, time="discrete")
    expected = np.stack([(-0.5) ** np.arange(6), (-1.5) ** np.arange(6), [1, 0, 0, 0, 0, 0]], axis=1)
    np.testing.assert_allclose(e, expected, rtol=1e-14, atol=1e-15)
    g = spectral.gain(lam, t, learning_rate=LR, n=N, time="discrete")
    np.testing.assert_allclose(g, (1 - expected) / np.asarray(lam), rtol=1e-14, atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(
    lam=st.one_of(st.just(0.0), st.floats(1e-250, 1e6)),
    t=st.floats(0, 1e12, allow_nan=False),
    time=st.sampled_from(["continuous", "discrete"]),
)
def test_gain_properties(lam, t, time):
    """0 ≤ g ≤ ηt/n, λ·g = 1 − E, 0 ≤ E ≤ 1 while ηλ/n ≤ 1.

    In discrete time the bound g ≤ ηt/n is Bernoulli's inequality, which needs
    whole step counts.
    """
    if time == "discrete":
        lam, t = min(lam, N / LR), float(np.round(t))
    kw = dict(learning_rate=LR, n=N, time=time)
    g = float(spectral.gain(jnp.float64(lam), jnp.float64(t), **kw))
    e = float(spectral.decay(jnp.float64(lam), jnp.float64(t), **kw))
    c = float(spectral.decay_complement(jnp.float64(lam), jnp.float64(t), **kw))
    assert np.isfinite(g) and 0 <= g <= LR * t / N * (1 + 1e-12)
    assert 0 <= e <= 1 and 0 <= c <= 1
    assert c == pytest.approx(1 - e, abs=1e-15)
    assert lam * g == pytest.approx(c, rel=1e-12, abs=1e-300)


# --------------------------------------------------------------------------- #
# Spectrum
# --------------------------------------------------------------------------- #


def test_spectrum_cutoff_zeroes_round_off_and_keeps_real_modes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 3))
    k = a @ a.T  # rank 3; eigh gives round-off values of either sign for the rest
    s = spectral.spectrum(jnp.asarray(k))
    assert int(s.rank) == 3 and int(jnp.sum(s.null)) == 3
    assert bool(jnp.all(s.eigenvalues[s.null] == 0)) and bool(jnp.all(s.eigenvalues >= 0))
    np.testing.assert_allclose(np.sort(s.eigenvalues)[-3:], np.sort(np.linalg.eigvalsh(a.T @ a)), rtol=1e-12)
    v = np.asarray(s.eigenvectors)
    np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-12)


def test_spectrum_regularization_relative_and_absolute():
    k = jnp.diag(jnp.array([4.0, 2.0, 0.0]))
    rel = spectral.spectrum(k, diag_reg=0.5)
    np.testing.assert_allclose(rel.reg, 0.5 * 2.0)
    np.testing.assert_allclose(jnp.sort(rel.eigenvalues), [1.0, 3.0, 5.0])
    ab = spectral.spectrum(k, diag_reg=0.5, diag_reg_absolute=True)
    np.testing.assert_allclose(jnp.sort(ab.eigenvalues), [0.5, 2.5, 4.5])
    assert not bool(jnp.any(ab.null))


def test_bad_time_name():
    with pytest.raises(ValueError, match="time"):
        spectral.gain(1.0, 1.0, learning_rate=1.0, n=1, time="euler")
