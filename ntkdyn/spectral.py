"""One eigendecomposition and the stable spectral functions of the dynamics.

Gradient descent on ``L = 1/(2n)‖f − Y‖²`` (n = N·K) with learning rate η
moves each kernel eigenmode independently. With ``a = ηλ/n``:

* residual decay after t steps/time units
    continuous: ``E(λ, t) = exp(−a t)``
    discrete:   ``E(λ, t) = (1 − a)^t``
* its complement ``1 − E`` (how much of the mode has been fitted), and
* the gain ``g(λ, t) = (1 − E(λ, t)) / λ`` — the spectral form of
  ``Θ⁻¹(I − E(t))`` in Eq. 8–10 — whose limit at λ → 0 is ``ηt/n``.

All three are evaluated without cancellation: ``1 − E`` as ``−expm1(−x)`` with
``x = t·r(a)`` (``r = a`` continuous, ``r = −log1p(−a)`` discrete), and
``g = (ηt/n) · h(x) · r(a)/a`` with ``h(x) = (1 − e^{−x})/x`` — which stays
exact at λ = 0, for tiny λ, and at t = ∞ (where ``g = 1/λ``).

Modes whose eigenvalue is at or below the cut-off are *exact zeros*: they never
move (``E = 1``) and the gain there is 0, so at t = ∞ ``I − E`` is the projector
onto the kernel's numerical range and ``Θ⁻¹(I − E)`` its pseudo-inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Spectrum", "spectrum", "decay", "decay_complement", "gain", "default_rcond"]

TIMES = ("continuous", "discrete")


@struct.dataclass
class Spectrum:
    """Eigendecomposition of the regularized kernel ``Θ + reg·I = V diag(λ) Vᵀ``.

    Attributes:
      eigenvalues: (m,) ascending; round-off negatives clipped to 0 and every
        value at or below ``cutoff`` set to exactly 0.
      eigenvectors: (m, m), orthonormal columns ``V``.
      reg: the absolute diagonal regularizer that was added.
      cutoff: the absolute eigenvalue threshold used.
      null: (m,) bool, the modes treated as exact zeros.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    reg: jax.Array
    cutoff: jax.Array
    null: jax.Array

    @property
    def max_eigenvalue(self) -> jax.Array:
        return self.eigenvalues[-1]

    @property
    def rank(self) -> jax.Array:
        return jnp.sum(~self.null)


def default_rcond(m: int, dtype) -> float:
    """``m · eps(dtype)``: the relative cut-off ``numpy.linalg.pinv`` uses."""
    return float(m * jnp.finfo(dtype).eps)


def spectrum(
    kernel_matrix: jax.Array,
    *,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    rcond: float | None = None,
) -> Spectrum:
    """Eigendecompose ``Θ + reg·I`` with a pseudo-inverse-style cut-off.

    Args:
      kernel_matrix: symmetric (m, m) kernel (symmetrized as ``(Θ + Θᵀ)/2``).
      diag_reg: regularizer; ``reg = diag_reg · mean(diag Θ)`` by default,
        ``reg = diag_reg`` when ``diag_reg_absolute``.
      rcond: relative cut-off; eigenvalues ``≤ rcond · λ_max`` are exact zeros.
        Default ``m · eps(dtype)`` (as ``numpy.linalg.pinv``).

    Returns:
      :class:`Spectrum`.
    """
    k = jnp.asarray(kernel_matrix)
    m = k.shape[0]
    mean_diag = jnp.mean(jnp.diagonal(k))
    reg = jnp.asarray(diag_reg, k.dtype) * (1.0 if diag_reg_absolute else mean_diag)
    k = 0.5 * (k + k.T) + reg * jnp.eye(m, dtype=k.dtype)
    lam, vecs = jnp.linalg.eigh(k)
    lam = jnp.maximum(lam, 0.0)
    rel = default_rcond(m, k.dtype) if rcond is None else rcond
    cutoff = jnp.asarray(rel, k.dtype) * lam[-1]
    null = lam <= cutoff
    lam = jnp.where(null, 0.0, lam)
    return Spectrum(eigenvalues=lam, eigenvectors=vecs, reg=reg, cutoff=cutoff, null=null)


# --------------------------------------------------------------------------- #
# spectral functions
# --------------------------------------------------------------------------- #


def _check_time(time: str) -> None:
    if time not in TIMES:
        raise ValueError(f"time: expected one of {TIMES}, got {time!r}")


def _rate(a: jax.Array, time: str):
    """Per-unit-time log-decay ``r(a)`` and ``r(a)/a`` (→ 1 at a = 0), for a < 1 in discrete time."""
    safe_a = jnp.where(a > 0, a, 1.0)
    if time == "continuous":
        return a, jnp.ones_like(a)
    # discrete, a < 1: (1 − a)^t = exp(−t·r), r = −log1p(−a) ≥ a
    a_lt1 = jnp.where(a < 1, a, 0.5)
    r = -jnp.log1p(-a_lt1)
    ratio = jnp.where(a > 0, r / jnp.where(a < 1, safe_a, 1.0), 1.0)
    return jnp.where(a < 1, r, jnp.inf), ratio


def _x(a, t, time):
    """``x = t · r(a)`` with ``0 · ∞`` read as 0 (a mode that does not move)."""
    r, ratio = _rate(a, time)
    # a mode with r = 0 never moves, even at t = ∞ (0·∞); elsewhere x = r·t keeps d/dt exact at t = 0
    x = jnp.where(r == 0, 0.0, r * t)
    return x, ratio


def _oscillating_decay(a, t):
    """``(1 − a)^t`` for a ≥ 1 (discrete steps past n/λ): sign from the step parity.

    A negative base has no real power at fractional t: NaN there (eager calls
    raise before reaching this; under jit the NaN makes the misuse visible).
    """
    base = 1.0 - a
    sign = jnp.where(jnp.mod(t, 2.0) == 1.0, -1.0, 1.0)
    mag = jnp.where(base == 0, jnp.where(t == 0, 1.0, 0.0), jnp.abs(base) ** t)
    fractional = jnp.isfinite(t) & (t != jnp.round(t))
    return jnp.where(base < 0, jnp.where(fractional, jnp.nan, sign), 1.0) * mag


def decay(lam, t, *, learning_rate, n, time: str = "continuous") -> jax.Array:
    """``E(λ, t)``: ``exp(−ηλt/n)`` (continuous) or ``(1 − ηλ/n)^t`` (discrete).

    ``lam`` and ``t`` broadcast. Exact 1 where λ = 0 or t = 0, exact 0 at t = ∞
    for every stable λ > 0.
    """
    _check_time(time)
    lam, t = jnp.asarray(lam), jnp.asarray(t)
    a = learning_rate * lam / n
    x, _ = _x(a, t, time)
    e = jnp.exp(-x)
    if time == "discrete":
        e = jnp.where(a < 1, e, _oscillating_decay(a, t))
    return e


def decay_complement(lam, t, *, learning_rate, n, time: str = "continuous") -> jax.Array:
    """``1 − E(λ, t)``, computed as ``−expm1(−x)`` (no cancellation for small x)."""
    _check_time(time)
    lam, t = jnp.asarray(lam), jnp.asarray(t)
    a = learning_rate * lam / n
    x, _ = _x(a, t, time)
    c = -jnp.expm1(-x)
    if time == "discrete":
        c = jnp.where(a < 1, c, 1.0 - _oscillating_decay(a, t))
    return c


def gain(lam, t, *, learning_rate, n, time: str = "continuous") -> jax.Array:
    """``g(λ, t) = (1 − E(λ, t)) / λ``; ``ηt/n`` at λ = 0; ``1/λ`` at t = ∞.

    Evaluated as ``(ηt/n) · h(x) · r(a)/a`` with ``h(x) = −expm1(−x)/x``
    (``h(0) = 1``) while ``x = t·r(a) ≤ 1``, which is exact for tiny and zero
    λ; as ``(1 − E)/λ`` for ``x > 1``, t = ∞ and discrete steps with ηλ/n ≥ 1. Null modes are the
    caller's business (the dynamics set their gain to 0).
    """
    _check_time(time)
    lam, t = jnp.asarray(lam), jnp.asarray(t)
    a = learning_rate * lam / n
    x, ratio = _x(a, t, time)
    h = jnp.where(x > 0, -jnp.expm1(-x) / jnp.where(x > 0, x, 1.0), 1.0)
    finite_t = jnp.where(jnp.isinf(t), 0.0, t)
    g_series = (learning_rate * finite_t / n) * h * ratio
    safe_lam = jnp.where(lam > 0, lam, 1.0)
    comp = decay_complement(lam, t, learning_rate=learning_rate, n=n, time=time)
    g_direct = jnp.where(lam > 0, comp / safe_lam, jnp.inf)
    # past x = 1 the direct quotient has no cancellation, and it makes every
    # t with E(t) = 0 (1e26 as well as ∞) give exactly 1/λ
    use_direct = jnp.isinf(t) | (x > 1.0)
    if time == "discrete":
        use_direct = use_direct | (a >= 1)
    return jnp.where(use_direct, g_direct, g_series)
