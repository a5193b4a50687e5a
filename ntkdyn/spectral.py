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

The per-mode functions of every optimizer the solver knows live here too
(:func:`modes`): gradient flow, discrete gradient descent and heavy-ball
momentum (``optax.sgd(η, momentum=β)``: ``v ← βv + g; θ ← θ − ηv``, from rest).
For heavy ball a mode's state ``(r, ω = η u, α)`` follows the linear recurrence

    ω' = (η/n) r + β ω
    r' = r − λ ω'   = (1 − a) r − λβ ω
    α' = α + ω'

whose t-th power from ``(1, 0, 0)`` gives the residual factor ``E_β`` (r) and
the gain ``G_β`` (α). No entry divides by λ, so ``G_β`` is exact at λ = 0;
β = 0 gives back discrete GD. ``Bᵗ`` is taken by repeated squaring of
``B = I + D`` in the offset form ``D ← 2D + D²`` (``⌈log₂ t⌉`` 3×3 products
per mode), accurate for tiny ``a`` too. A heavy-ball mode is stable iff
``0 < a < 2(1 + β)``.

At exactly the stability limit (``a = 2`` for GD, ``2(1 + β)`` with momentum)
the mode oscillates forever with unit modulus: every whole t is exact, and
t = ∞ has no limit, so it gives NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate

__all__ = [
    "Spectrum",
    "spectrum",
    "decay",
    "decay_complement",
    "gain",
    "modes",
    "decay_curve",
    "default_rcond",
]

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
      smallest: the smallest eigenvalue before clipping (negative for an
        indefinite kernel; the solvers reject it below ``−tol·λ_max``).
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    reg: jax.Array
    cutoff: jax.Array
    null: jax.Array
    smallest: jax.Array

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

    The decomposition is computed in float64 and cast back to the kernel's
    dtype: a float32 ``eigh`` moves small eigenvalues by ``O(√m·eps₃₂)·λ_max``,
    which is the size of the cut-off itself, and mixes the modes on either
    side of it, so a mode just above it could get a gain off by O(1).
    Concrete kernels go to LAPACK (``syevd``) on the host; under ``jit`` the
    program upcasts when ``jax_enable_x64`` is on, and otherwise (no float64
    in the program) runs in the kernel's dtype (:func:`_eigh64`).

    Args:
      kernel_matrix: symmetric (m, m) kernel (symmetrized as ``(Θ + Θᵀ)/2``;
        callers check that it is symmetric).
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
    lam, vecs = _eigh64(k)
    return _clip(lam, vecs, reg, default_rcond(m, k.dtype) if rcond is None else rcond)


def _eigh64(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``eigh`` computed in float64 and returned in ``k``'s dtype, wherever float64 exists.

    Concrete: LAPACK on the host. Traced: in the program, upcast when
    ``jax_enable_x64`` is on; without it the program has no float64 and the
    kernel's own dtype is used (float32 then mixes modes within ~eps·λ_max of
    each other, which matters at t = ∞ next to the cut-off: call eagerly, or
    enable x64, for float64 accuracy there).
    """
    if _validate.is_concrete(k):
        lam64, vecs64 = np.linalg.eigh(np.asarray(k, dtype=np.float64))
        return jnp.asarray(lam64, k.dtype), jnp.asarray(vecs64, k.dtype)
    if jnp.finfo(k.dtype).bits < 64 and jax.config.jax_enable_x64:
        lam, vecs = jnp.linalg.eigh(k.astype(jnp.float64))
        return lam.astype(k.dtype), vecs.astype(k.dtype)
    return jnp.linalg.eigh(k)


def _clip(lam, vecs, reg, rel) -> Spectrum:
    smallest = lam[0]
    lam = jnp.maximum(lam, 0.0)
    cutoff = jnp.asarray(rel, lam.dtype) * lam[-1]
    null = lam <= cutoff
    lam = jnp.where(null, 0.0, lam)
    return Spectrum(eigenvalues=lam, eigenvectors=vecs, reg=reg, cutoff=cutoff, null=null, smallest=smallest)


# --------------------------------------------------------------------------- #
# spectral functions
# --------------------------------------------------------------------------- #


def _check_time(time: str) -> None:
    _validate.choice("time", time, TIMES)


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
    # at exactly a = 2 the mode flips sign forever: t = ∞ has no limit
    no_limit = jnp.isinf(t) & (base == -1.0)
    return jnp.where(base < 0, jnp.where(fractional | no_limit, jnp.nan, sign), 1.0) * mag


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


# --------------------------------------------------------------------------- #
# per-mode functions of each optimizer
# --------------------------------------------------------------------------- #


def modes(lam, t, *, learning_rate, n, time: str = "continuous", momentum: float = 0.0):
    """``(1 − E(λ, t), G(λ, t))`` for every mode and time: how much of each mode is fitted, and its gain.

    Gradient flow / discrete GD (``momentum = 0``): ``1 − E`` is
    :func:`decay_complement` and ``G = (1 − E)/λ`` is :func:`gain`. Heavy ball
    (``momentum = β > 0``, discrete time, whole t): ``(E_β, ·, G_β) = Bᵗ(1, 0, 0)``
    (module docstring). The solver computes ``α_t = V diag(G) Vᵀ r₀`` and the
    train residual ``r₀ − V diag(1 − E) Vᵀ r₀`` from these, for any optimizer.

    Args:
      lam: (m,) eigenvalues (≥ 0); t: (T,) times in steps. Scalars allowed.
      learning_rate: η; n: N·K; time: ``"continuous"`` or ``"discrete"``;
      momentum: β in [0, 1).

    Returns:
      ``(fitted, gain)``, each (T, m) (axes dropped for scalar inputs). Null
      modes are the caller's business (the solver sets their gain to 0).
    """
    lam, t = jnp.asarray(lam), jnp.asarray(t)
    scalar_lam, scalar_t = lam.ndim == 0, t.ndim == 0
    lam1, t1 = jnp.atleast_1d(lam), jnp.atleast_1d(t)
    if lam1.ndim != 1 or t1.ndim != 1:
        raise ValueError(f"lam, t: expected scalars or 1-D arrays, got shapes {lam.shape} and {t.shape}")
    beta = _validate.clock(time, momentum, TIMES)
    _validate.positive_scalar("learning_rate", learning_rate)
    _validate.times(t1)
    if beta == 0.0:
        tt = t1[:, None]
        fitted = decay_complement(lam1, tt, learning_rate=learning_rate, n=n, time=time)
        g = gain(lam1, tt, learning_rate=learning_rate, n=n, time=time)
    else:
        dtype = jnp.result_type(lam1.dtype, t1.dtype, float)
        lam1, t1 = lam1.astype(dtype), t1.astype(dtype)
        _validate.whole_steps(t1)
        e, g = _heavy_ball_core(lam1, t1, learning_rate, _num_bits(t1), momentum=beta, n=int(n))
        fitted = 1.0 - e
    if scalar_t:
        fitted, g = fitted[0], g[0]
    if scalar_lam:
        fitted, g = fitted[..., 0], g[..., 0]
    return fitted, g


def decay_curve(lam, steps: int, *, learning_rate, n, time: str = "discrete", momentum: float = 0.0) -> jax.Array:
    """``E(λ, s)`` at every s = 0 … steps, shape (steps + 1, m): the residual factor along the whole run.

    Cheaper than :func:`modes` on a dense step grid: heavy ball iterates its
    recurrence once per step (one 2×2 update per mode); GD evaluates
    :func:`decay` at the integer grid.
    """
    steps = _validate.count("steps", steps, 0)
    beta = _validate.clock(time, momentum, TIMES)
    lam = jnp.atleast_1d(jnp.asarray(lam))
    lam = lam.astype(jnp.result_type(lam.dtype, float))
    if beta == 0.0:
        grid = jnp.arange(steps + 1, dtype=lam.dtype)[:, None]
        return decay(lam, grid, learning_rate=learning_rate, n=n, time=time)
    c = learning_rate / n

    def step(carry, _):
        r, w = carry
        w = c * r + beta * w
        r = r - lam * w
        return (r, w), r

    init = (jnp.ones_like(lam), jnp.zeros_like(lam))
    _, rs = jax.lax.scan(step, init, None, length=steps)
    return jnp.concatenate([init[0][None], rs], axis=0)


def _step_offset(lam: jax.Array, learning_rate, momentum: float, n: int) -> jax.Array:
    """(…, 3, 3) ``D = B − I`` for the one-step matrix B acting on the column (r, ω, α).

    Powers are taken as ``(I + D)^2 = I + (2D + D²)``: the identity is never
    added in, so ``a = ηλ/n`` far below eps keeps its relative accuracy
    (forming ``1 − a`` would round it away).
    """
    c = jnp.asarray(learning_rate, lam.dtype) / n
    beta = jnp.asarray(momentum, lam.dtype)
    one, zero = jnp.ones_like(lam), jnp.zeros_like(lam)
    rows = [
        [-c * lam, -lam * beta, zero],
        [c * one, (beta - 1.0) * one, zero],
        [c * one, beta * one, zero],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _num_bits(t: jax.Array):
    """Bits of the largest finite t, plus one spare (a zero bit is harmless; a missing one is not)."""
    finite_t = jnp.where(jnp.isinf(t), 0.0, t)
    if _validate.is_concrete(finite_t):
        top = float(np.max(np.asarray(finite_t, dtype=np.float64), initial=0.0))
        return int(math.floor(math.log2(top))) + 2 if top >= 1 else 1
    top = jnp.max(finite_t, initial=0.0)
    return jnp.where(top >= 1, jnp.floor(jnp.log2(jnp.maximum(top, 1.0))) + 2, 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("momentum", "n"))
def _heavy_ball_core(lam1, t1, lr, num_bits, *, momentum, n):
    """(T, m) ``E_β`` and ``G_β`` for 1-D ``lam1``, ``t1`` of one float dtype."""
    dtype = lam1.dtype
    beta = momentum
    offset = _step_offset(lam1, lr, beta, n)  # (m, 3, 3): B = I + D
    finite_t = jnp.where(jnp.isinf(t1), 0.0, t1)
    state = jnp.zeros((t1.shape[0], lam1.shape[0], 3), dtype).at[..., 0].set(1.0)

    def square_and_multiply(k, carry):
        # Bᵗ = Π_k B^(2^k) over the set bits k of t (the factors commute);
        # B^(2^k) = I + D_k with D_{k+1} = 2 D_k + D_k²
        state, d = carry
        bit = jnp.mod(jnp.floor(finite_t / jnp.exp2(k.astype(dtype))), 2.0) == 1.0
        moved = state + jnp.einsum("mij,tmj->tmi", d, state)
        state = jnp.where(bit[:, None, None], moved, state)
        return state, 2.0 * d + d @ d

    # a traced loop bound: one compiled program serves every t
    state, _ = jax.lax.fori_loop(0, jnp.asarray(num_bits, jnp.int32), square_and_multiply, (state, offset))
    e, g = state[..., 0], state[..., 2]

    a = lr * lam1 / n
    limit = 2.0 * (1.0 + beta)
    stable = (a > 0) & (a < limit)
    safe_lam = jnp.where(lam1 > 0, lam1, 1.0)
    inf_t = jnp.isinf(t1)[:, None]
    # at a = 2(1 + β) one root is −1: the mode oscillates forever (no limit)
    unstable = jnp.where(a == limit, jnp.nan, jnp.inf)
    e_inf = jnp.where(stable, 0.0, jnp.where(lam1 == 0, 1.0, unstable))
    g_inf = jnp.where(stable, 1.0 / safe_lam, unstable)
    e = jnp.where(inf_t, e_inf[None], e)
    g = jnp.where(inf_t, g_inf[None], g)
    return e, g
