"""Matrix-free dynamics: Lanczos on the kernel operator, started at the residual.

The closed-form dynamics (:mod:`ntkdyn.dynamics`) need two functions of the
regularized kernel ``A = Θ + reg·I`` (m × m, m = N·K) applied to ``r₀ = f₀(X) − Y``
at every requested time t:

* the fitted part ``F(A, t) r₀ = (I − E(t)) r₀``, so the train residual is
  ``E(t) r₀ = r₀ − F(A, t) r₀`` (Eq. 9), and
* the cotangent ``α_t = G(A, t) r₀ = A⁻¹(I − E(t)) r₀`` (Eq. 8 and 10),

with ``F(λ, t) = 1 − E(λ, t)`` and ``G(λ, t) = F(λ, t)/λ`` evaluated per
eigenvalue by the stable functions of :mod:`ntkdyn.spectral`. Only products
``v ↦ A v`` are available here (for the NTK, one VJP and one JVP over the
training set). k steps of Lanczos started at ``r₀`` give an orthonormal basis
``Q_k = [q₁ … q_k]`` of the Krylov space ``span{r₀, A r₀, …, A^{k−1} r₀}`` with

    A Q_k = Q_k T_k + β_k q_{k+1} e_kᵀ,   T_k = S diag(θ) Sᵀ  (k × k, tridiagonal),

and every function of A applied to r₀ is taken from that one basis:

    f(A) r₀ ≈ ‖r₀‖ Q_k f(T_k) e₁ = ‖r₀‖ Q_k S diag(f(θ)) Sᵀ e₁,

for all times at once (only the k-vector ``f(θ)`` depends on t), by the same
per-mode functions as the exact path (:func:`ntkdyn.spectral.modes`: both
clocks, heavy-ball momentum). The approximation is exact (to round-off) once
the Krylov space is invariant (a "happy breakdown", at the latest after m
steps) and otherwise converges like a polynomial approximation of f on the
spectrum: quickly for ``E(t)`` and ``G(t)`` at moderate ``ηλ_max t/n`` (a
few dozen steps for an MLP's NTK at t = 1000, N = 10⁴), slowly when the
spectrum reaches far below ``λ_max · n/(ηt)``.

The cut-off. Round-off negative Ritz values clip to 0 at every t. At t = ∞ the
Ritz values ``θ ≤ rcond · θ_max`` (default ``rcond = N·K·eps``, as on the
exact path and in ``numpy.linalg.pinv``) are exact zeros (E = 1, G = 0): the
pseudo-inverse semantics of :func:`ntkdyn.spectral.spectrum`, which the limit
needs. At finite t no Ritz value is cut: ``0 ≤ F ≤ 1`` and ``0 ≤ G ≤ ηt/n`` are
bounded, smooth functions of λ ≥ 0 (G(0) = ηt/n), so nothing amplifies
round-off; cutting there would make the answer jump whenever a Ritz value of
the still unresolved low spectrum crosses the threshold, and the iteration
would never settle (measured: MLP 2×256, N = 10⁴, float32, where the default
cut-off is 1.2·10⁻³ λ_max — 500 steps without convergence with the cut, 30
steps to an estimate of 5·10⁻⁵ without). This differs from the exact path,
which also freezes the modes below its cut-off at finite t, by at most
``F(rcond·λ_max, t)`` times the part of ``r₀`` on those modes — nothing in
float64, and in float32 nothing while ``η·rcond·λ_max·t/n ≪ 1``; beyond that
the frozen modes are a property of the exact path's cut-off, not of the
data (docs/scale.md has the numbers). Times so large that even the modes at
the cut-off are fitted (``t ≳ n/(η·rcond·λ_max)``) are the limit: pass
``t = inf`` there.

Reliability in float32: the basis is kept orthonormal by *full*
reorthogonalization (classical Gram-Schmidt, twice, against every stored
vector), so no spurious copies of converged Ritz values appear; memory
``(max_iter + 1) · m`` values.

Error estimate and stopping rule: every ``check_every`` steps the coefficient
vectors ``c_F(t) = ‖r₀‖ F(T_k, t) e₁`` and ``c_G(t)`` are compared with those of
the previous check; because Q is orthonormal, and ``Q_kᵀ (Θ + reg·I) Q_k = T_k``,
the change of the approximation is measured on the coefficients alone,

    est_out(t)   = ‖Δc_F(t)‖ / ‖r₀‖                      (train outputs, relative to the initial residual)
    est_alpha(t) = ‖Δc_G(t)‖_{T−reg} / ‖c_G(t)‖_{T−reg}   (α_t as a weight change ‖Jᵀ·‖, relative)

with ``‖x‖²_{T−reg} = xᵀ (T_k − reg·I) x = ‖Jᵀ Q_k x‖²``: the weights
``θ₀ − Jᵀ α_t`` (Eq. 8) and, through ``|J(x*) Jᵀ δα| ≤ ‖J(x*)‖ ‖Jᵀ δα‖``,
the test outputs (Eq. 10) see α in this norm — not in the Euclidean one,
which is dominated by the modes with the smallest λ, where ``G ≈ ηt/n`` is
largest and least visible. Each is the distance between two successive
approximations, which bounds the error of the earlier one for a converging
sequence and therefore overestimates the error of the returned one. The
iteration stops when both are at or below ``tol`` for every time, when the
Krylov space is invariant (the answer is then exact up to round-off), or
after ``max_iter`` steps (then :class:`KrylovConvergenceWarning` reports the
estimate that was achieved). The reported estimate per time adds the
round-off floor, ``max(est_out, est_alpha, k·eps·√κ_t)`` with
``κ_t = max(1, θ_max · max_θ G(θ, t))`` — how much α_t amplifies round-off:
about ``ηθ_max t/n`` at moderate t, the condition number θ_max/θ_min at
t = ∞ (a heuristic: k·eps for a k-step full-reorthogonalization Lanczos,
times the square root of the worst-case amplification, which measured
errors stay below). When the floor alone is above ``tol`` the solve still
counts as converged — more steps cannot help; the estimate says how
accurate the answer can be in this dtype (the exact path has the same
limit but does not report it).

t = ∞ and singular kernels: ``G(θ, ∞) = 1/θ`` above the cut-off and 0 at or
below it, so ``α_∞`` is the Lanczos (conjugate-gradient) approximation of the
cut pseudo-inverse ``A⁺_c r₀`` and the train residual ``E(∞) r₀`` the part of
``r₀`` along the cut modes. When A is exactly singular (duplicate inputs,
conflicting targets) the component of ``r₀`` in the null space produces one
Ritz value that converges to 0 and is cut: ``α_∞`` is the minimum-norm
least-squares solution ``A⁺ r₀`` (it lies in the range of A: the exact path's
answer), the train residual ``E(∞) r₀`` is the projection of ``r₀`` onto the
null space, and the Eq. 8 weights move only along the range. This is
Lanczos' form of conjugate gradients on the consistent part of ``A α = r₀``:
the null-space component of ``r₀`` is carried by its own Ritz value and never
divided by. When the spectrum has no gap at the cut-off (eigenvalues decaying
smoothly through ``rcond · λ_max``, the usual case for an NTK at large N) the
Ritz values near the cut-off converge slowly and so does ``α_∞``; the
estimate then stays above ``tol`` and the warning says so — never a silent
wrong answer. ``diag_reg > 0`` gives the limit a well-conditioned kernel.

Columns: ``r₀`` is an (m, c) array of c independent right-hand sides sharing
one operator call per step (c = 1 for the full kernel on the flattened (N·K,)
residual; c = K for the output-traced kernel, one column per output), each
with its own Lanczos process.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate, spectral

__all__ = [
    "KrylovConvergenceWarning",
    "KrylovInfo",
    "KrylovSolution",
    "KrylovPrediction",
    "default_tol",
    "default_max_iter",
    "default_tile",
    "lanczos_dynamics",
    "warn_if_not_converged",
    "predict_operator",
    "prediction_program",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class KrylovConvergenceWarning(UserWarning):
    """The Krylov solve stopped at ``max_iter`` with its error estimate above ``tol``."""


@struct.dataclass
class KrylovInfo:
    """Convergence record of one Krylov solve.

    Attributes:
      iterations: () int, Lanczos steps taken (= operator products).
      error_estimate: (T,) estimated relative error per time,
        ``max(est_out, est_alpha, k·eps·√κ_t)`` (module docstring).
      output_error_estimate: (T,) ``est_out``: change of the fitted outputs
        relative to ``‖r₀‖``.
      alpha_error_estimate: (T,) ``est_alpha``: relative change of ``Jᵀ α_t``
        (the Eq. 8 weight change).
      converged: () bool, the iterates settled: ``est_out`` and ``est_alpha``
        at or below ``tol`` at every time (or an invariant Krylov space was
        found).
      invariant: () bool, the Krylov space became invariant (exact answer).
      ritz_values: (c, max_iter) the Ritz values θ of the last check,
        ascending per column; ``-1`` marks unused slots.
      max_eigenvalue: () the largest Ritz value, a lower bound on ``λ_max(A)``
        that converges first.
      cutoff: () the absolute cut-off ``rcond · θ_max`` (applied at t = ∞).
      reg: () the absolute regularizer in ``A = Θ + reg·I``.
      tol: the requested relative tolerance (static).
      max_iter: the iteration limit (static).
    """

    iterations: jax.Array
    error_estimate: jax.Array
    output_error_estimate: jax.Array
    alpha_error_estimate: jax.Array
    converged: jax.Array
    invariant: jax.Array
    ritz_values: jax.Array
    max_eigenvalue: jax.Array
    cutoff: jax.Array
    reg: jax.Array
    tol: float = struct.field(pytree_node=False, default=0.0)
    max_iter: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class KrylovSolution:
    """``E(t) r₀`` and ``α_t = A⁻¹(I − E(t)) r₀`` at every time, from one Krylov basis.

    Attributes:
      residual: (T, *space, c) the train residual ``E(t) r₀``.
      alpha: (T, *space, c) the cotangent ``α_t``.
      info: :class:`KrylovInfo`.
    """

    residual: jax.Array
    alpha: jax.Array
    info: KrylovInfo


def default_tol(dtype) -> float:
    """``√eps(dtype)``: 3.5e-4 in float32, 1.5e-8 in float64."""
    return float(math.sqrt(float(jnp.finfo(dtype).eps)))


def default_max_iter(dim: int) -> int:
    """``min(dim, 500)``: the basis then holds at most 501 vectors of the residual's size."""
    return int(min(dim, 500))


def _check_every(max_iter: int) -> int:
    """Steps between convergence checks: about 50 checks at most, every 5 steps at least."""
    return int(max(5, math.ceil(max_iter / 50)))


# --------------------------------------------------------------------------- #
# the small problem: Ritz pairs of T_k and the per-mode functions
# --------------------------------------------------------------------------- #


def _ritz(alphas: jax.Array, betas: jax.Array, k: jax.Array, scale: jax.Array):
    """Ritz values θ (c, M) and first-row weights × eigenvectors of the padded T_k.

    ``alphas``/``betas``: (M, c), ``betas[j]`` couples q_j and q_{j+1}. T_k is
    embedded in an (M, M) matrix whose trailing block is diagonal with the
    value ``−(2·scale + 1)``, decoupled from T_k and below every Ritz value,
    so one compiled eigh serves every k; those padding modes have zero weight
    on e₁ and fall under the cut-off.
    """
    m_max = alphas.shape[0]
    idx = jnp.arange(m_max)
    pad = -(2.0 * scale + 1.0)
    diag = jnp.where((idx < k)[:, None], alphas, pad)  # (M, c)
    off = jnp.where((idx < k - 1)[:, None], betas, 0.0)
    tri = (
        jax.vmap(jnp.diag, in_axes=1)(diag)
        + jax.vmap(lambda b: jnp.diag(b[:-1], 1), in_axes=1)(off)
        + jax.vmap(lambda b: jnp.diag(b[:-1], -1), in_axes=1)(off)
    )  # (c, M, M)
    # one column at a time: XLA:CPU's batched eigh runs its batch on the shared thread pool,
    # which deadlocks against collectives pending on other devices of the same process
    theta, vecs = jax.lax.map(jnp.linalg.eigh, tri)
    return theta, vecs, theta[:, :] > 0.5 * pad  # live Ritz values (not padding)


def _mode_functions(lam, t, *, learning_rate, n, time, momentum):
    """(fitted F = 1 − E, gain G = F/λ), each (T, *lam.shape), by the exact path's :func:`ntkdyn.spectral.modes`."""
    fitted, gain = spectral.modes(lam.reshape(-1), t, learning_rate=learning_rate, n=n, time=time, momentum=momentum)
    return fitted.reshape(t.shape[0], *lam.shape), gain.reshape(t.shape[0], *lam.shape)


def _coefficients(alphas, betas, k, scale, beta0, times, *, lr, n, time, momentum, rcond):
    """Coefficients ``‖r₀‖ f(T_k) e₁`` of F and G in the basis Q, (T, M, c) each, and the Ritz data.

    Finite t: every Ritz value as it is (round-off negatives clipped to 0);
    t = ∞: Ritz values at or below ``rcond · θ_max`` are exact zeros (module docstring).
    """
    theta, vecs, live = _ritz(alphas, betas, k, scale)
    # an operator that overflowed leaves non-finite entries in T_k, which the live test would hide: θ_max NaN
    broken = ~(jnp.all(jnp.isfinite(alphas)) & jnp.all(jnp.isfinite(betas)) & jnp.isfinite(scale)
               & jnp.all(jnp.isfinite(theta)) & jnp.all(jnp.isfinite(beta0)))
    theta_max = jnp.where(broken, jnp.nan, jnp.max(jnp.where(live, theta, 0.0)))
    cutoff = jnp.asarray(rcond, theta.dtype) * theta_max
    lam = jnp.where(live, jnp.maximum(theta, 0.0), 0.0)  # (c, M)
    null = (~live) | (lam <= cutoff)
    infinite = jnp.isinf(times)
    fitted, gain = _mode_functions(lam, jnp.where(infinite, 0.0, times), learning_rate=lr, n=n, time=time,
                                   momentum=momentum)
    fitted_inf, gain_inf = _mode_functions(jnp.where(null, 0.0, lam), jnp.full((1,), jnp.inf, times.dtype),
                                           learning_rate=lr, n=n, time=time, momentum=momentum)
    at_inf = infinite[:, None, None]
    fitted = jnp.where(at_inf, jnp.where(null[None], 0.0, fitted_inf), jnp.where(live[None], fitted, 0.0))
    gain = jnp.where(at_inf, jnp.where(null[None], 0.0, gain_inf), jnp.where(live[None], gain, 0.0))
    first = vecs[:, 0, :] * beta0[:, None]  # (c, M): ‖r₀‖ Sᵀ e₁
    c_fit = jnp.einsum("cji,tci,ci->tjc", vecs, fitted, first, precision=_HIGHEST)
    c_gain = jnp.einsum("cji,tci,ci->tjc", vecs, gain, first, precision=_HIGHEST)
    live_rows = (jnp.arange(alphas.shape[0]) < k)[None, :, None]
    ritz = jnp.where(live, theta, -1.0)
    # how much α_t can amplify round-off: θ_max · max G(θ, t) (κ at t = ∞, about ηθ_max t/n before)
    amplification = jnp.maximum(1.0, theta_max * jnp.max(gain, axis=(1, 2)))
    return (jnp.where(live_rows, c_fit, 0.0), jnp.where(live_rows, c_gain, 0.0), ritz, theta_max, cutoff,
            amplification)


# --------------------------------------------------------------------------- #
# Lanczos with full reorthogonalization
# --------------------------------------------------------------------------- #


def _energy(x: jax.Array, alphas: jax.Array, betas: jax.Array, k, reg) -> jax.Array:
    """Per time: ``Σ_c xᵀ (T_k − reg·I) x`` for coefficient blocks x (T, M, c), clipped at 0.

    For ``v = Q_k x`` this is ``vᵀ Θ v = ‖Jᵀ v‖²`` (Lanczos: ``Q_kᵀ (Θ + reg·I) Q_k = T_k``):
    the squared size of ``v`` as a change of the weights.
    """
    idx = jnp.arange(alphas.shape[0])[:, None]
    diag = jnp.where(idx < k, alphas - reg, 0.0)
    off = jnp.where(idx < k - 1, betas, 0.0)[:-1]
    quad = jnp.sum(diag * x * x, axis=(1, 2)) + 2.0 * jnp.sum(off * x[:, :-1] * x[:, 1:], axis=(1, 2))
    return jnp.maximum(quad, 0.0)


def _norm_sq(x: jax.Array, axes) -> jax.Array:
    return jnp.sum(x * x, axis=axes)


def _relative_change(new, old, scale):
    """Per time: ``‖new − old‖ / scale`` over the (M, c) coefficient block; 0 where both vanish."""
    diff = jnp.sqrt(_norm_sq(new - old, (1, 2)))
    return jnp.where(diff > 0, diff / jnp.where(scale > 0, scale, 1.0), 0.0)


def lanczos_dynamics(
    matvec: Callable[[jax.Array], jax.Array],
    r0: jax.Array,
    t,
    *,
    learning_rate=1.0,
    n: int | None = None,
    time: str = "continuous",
    momentum: float = 0.0,
    reg=0.0,
    rcond: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    check_every: int | None = None,
    dim: int | None = None,
    axes: tuple | None = None,
) -> KrylovSolution:
    """``E(t) r₀`` and ``α_t`` for every t from one Lanczos basis of ``A = Θ + reg·I``.

    Pure and jit-compatible (one ``lax.while_loop``; the model and data enter
    only through ``matvec``). Formulas, estimate and stopping rule: module
    docstring.

    Args:
      matvec: ``V -> Θ V`` on arrays shaped like ``r0``, column by column
        (last axis), Θ symmetric PSD on the flattened leading axes.
      r0: (*space, c) start block: c independent right-hand sides of
        m = prod(space) entries each.
      t: times, (T,) or scalar, ``inf`` allowed.
      learning_rate: η; n: the loss normalizer N·K (default m·c).
      time: ``"continuous"`` or ``"discrete"``; momentum: heavy-ball β
        (needs :func:`ntkdyn.spectral.modes`).
      reg: absolute regularizer added to Θ.
      rcond: relative cut-off on the Ritz values (default ``n · eps``, as the
        exact path).
      tol: relative tolerance of the estimate (default :func:`default_tol`).
      max_iter: step limit (default :func:`default_max_iter`), clipped to the
        dimension.
      check_every: steps between convergence checks (default about
        ``max_iter / 50``, at least 5).
      dim: the dimension of the space (default m: rows that are padding
        and never reached by the operator do not count).
      axes: mesh axis names when called inside ``shard_map`` with this
        device's rows of ``r0`` (and a ``matvec`` on those rows): every
        inner product is then summed over the devices by
        :func:`ntkdyn.kernels.sharding.all_sum`, bit-identical everywhere.

    Returns:
      :class:`KrylovSolution` with (T, *space, c) arrays.
    """
    r0 = jnp.asarray(r0)
    if r0.ndim < 2:
        raise ValueError(f"r0: expected shape (*space, c), got {tuple(r0.shape)}")
    dtype = r0.dtype
    c = r0.shape[-1]
    m = math.prod(r0.shape[:-1])
    space = tuple(range(r0.ndim - 1))
    times = jnp.atleast_1d(jnp.asarray(t, dtype))
    n = m * c if n is None else int(n)
    dim = m if dim is None else int(dim)
    rcond = spectral.default_rcond(n, dtype) if rcond is None else float(rcond)
    tol = default_tol(dtype) if tol is None else float(tol)
    max_iter = default_max_iter(dim) if max_iter is None else int(max_iter)
    max_iter = int(max(1, min(max_iter, dim)))
    check_every = _check_every(max_iter) if check_every is None else int(check_every)
    eps = float(jnp.finfo(dtype).eps)
    if axes is None:
        total = lambda a: a  # noqa: E731
    else:
        from ntkdyn.kernels.sharding import all_sum

        total = lambda a: all_sum(a, axes)  # noqa: E731
    reg = jnp.asarray(reg, dtype)
    lr = jnp.asarray(learning_rate, dtype)
    n_times = times.shape[0]
    big = max_iter

    def operator(v):
        return matvec(v).astype(dtype) + reg * v

    def norm(v):
        return jnp.sqrt(total(_norm_sq(v, space)))

    beta0 = norm(r0)  # (c,)
    q0 = r0 / jnp.where(beta0 > 0, beta0, 1.0)
    basis = jnp.zeros((big + 1, *r0.shape), dtype).at[0].set(q0)
    coeffs = dict(lr=lr, n=n, time=time, momentum=momentum, rcond=rcond)

    def reorthogonalize(w, basis):
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            h = total(jnp.einsum("j...c,...c->jc", basis, w, precision=_HIGHEST))
            w = w - jnp.einsum("j...c,jc->...c", basis, h, precision=_HIGHEST)
        return w

    def step(state):
        j = state["j"]
        q = state["basis"][j]
        q_prev = state["basis"][jnp.maximum(j - 1, 0)]
        b_prev = jnp.where(j > 0, state["betas"][jnp.maximum(j - 1, 0)], 0.0)
        w = operator(q)
        a = total(jnp.sum(q * w, axis=space))
        w = w - a * q - b_prev * q_prev
        w = reorthogonalize(w, state["basis"])
        b = norm(w)
        scale = jnp.maximum(state["scale"], jnp.max(jnp.abs(a) + b + b_prev))
        # invariant Krylov space: what is left after reorthogonalization is round-off
        broke = state["done"] | (b <= 2.0 * eps * scale)
        q_next = jnp.where(broke, 0.0, w / jnp.where(broke, 1.0, b))
        return dict(
            state,
            j=j + 1,
            basis=state["basis"].at[j + 1].set(q_next),
            alphas=state["alphas"].at[j].set(jnp.where(state["done"], 0.0, a)),
            betas=state["betas"].at[j].set(jnp.where(broke, 0.0, b)),
            done=broke,
            scale=scale,
        )

    def check(state):
        k = state["j"]
        c_fit, c_gain, ritz, theta_max, cutoff, amplification = _coefficients(
            state["alphas"], state["betas"], k, state["scale"], beta0, times, **coeffs
        )
        est_out = _relative_change(c_fit, state["c_fit"], jnp.sqrt(jnp.sum(beta0 * beta0)))
        energy = lambda x: _energy(x, state["alphas"], state["betas"], k, reg)  # noqa: E731
        moved, size = jnp.sqrt(energy(c_gain - state["c_gain"])), jnp.sqrt(energy(c_gain))
        est_alpha = jnp.where(moved > 0, moved / jnp.where(size > 0, size, 1.0), 0.0)
        invariant = jnp.all(state["done"])
        est_out = jnp.where(invariant, 0.0, est_out)
        est_alpha = jnp.where(invariant, 0.0, est_alpha)
        # round-off floor: k·eps for the outputs, k·eps·√(amplification) for α_t in the weights norm
        floor = k.astype(dtype) * eps * jnp.sqrt(amplification)
        return dict(
            state,
            c_fit=c_fit, c_gain=c_gain, ritz=ritz, theta_max=theta_max, cutoff=cutoff,
            est=jnp.maximum(jnp.maximum(est_out, est_alpha), floor), est_out=est_out, est_alpha=est_alpha,
            converged=invariant | jnp.all(jnp.maximum(est_out, est_alpha) <= tol),
        )

    def body(state):
        state = step(state)
        due = (state["j"] % check_every == 0) | jnp.all(state["done"]) | (state["j"] >= big)
        return jax.lax.cond(due, check, lambda s: s, state)

    def cond(state):
        return (state["j"] < big) & ~state["converged"] & ~jnp.all(state["done"])

    zeros_t = jnp.zeros((n_times,), dtype)
    unknown = jnp.where(jnp.all(beta0 == 0), 0.0, 1.0)  # r₀ = 0 is answered exactly, without a step
    state = dict(
        j=jnp.zeros((), jnp.int32),
        basis=basis,
        alphas=jnp.zeros((big, c), dtype),
        betas=jnp.zeros((big, c), dtype),
        done=beta0 == 0,
        scale=jnp.zeros((), dtype),
        c_fit=jnp.zeros((n_times, big, c), dtype),
        c_gain=jnp.zeros((n_times, big, c), dtype),
        ritz=jnp.full((c, big), -1.0, dtype),
        theta_max=jnp.zeros((), dtype),
        cutoff=jnp.zeros((), dtype),
        est=zeros_t + unknown,
        est_out=zeros_t + unknown,
        est_alpha=zeros_t + unknown,
        converged=jnp.all(beta0 == 0),
    )
    state = jax.lax.while_loop(cond, body, state)
    pad = jnp.zeros((n_times, 1, c), dtype)

    def expand(coefficients):  # Q x for every time, x padded to the basis' M + 1 rows
        x = jnp.concatenate([coefficients, pad], axis=1)
        return jnp.einsum("j...c,tjc->t...c", state["basis"], x, precision=_HIGHEST)

    fitted, alpha = expand(state["c_fit"]), expand(state["c_gain"])
    info = KrylovInfo(
        iterations=state["j"],
        error_estimate=state["est"],
        output_error_estimate=state["est_out"],
        alpha_error_estimate=state["est_alpha"],
        converged=state["converged"],
        invariant=jnp.all(state["done"]),
        ritz_values=state["ritz"],
        max_eigenvalue=state["theta_max"],
        cutoff=state["cutoff"],
        reg=reg,
        tol=tol,
        max_iter=max_iter,
    )
    return KrylovSolution(residual=r0[None] - fitted, alpha=alpha, info=info)


def warn_if_not_converged(info: KrylovInfo, stacklevel: int = 3) -> None:
    """Warn with :class:`KrylovConvergenceWarning` when a concrete ``info`` did not reach its ``tol``."""
    if not _validate.is_concrete(info.converged) or bool(np.asarray(info.converged)):
        return
    est = np.asarray(info.error_estimate, dtype=np.float64)
    warnings.warn(
        f"Krylov solve did not converge: after {int(np.asarray(info.iterations))} iterations "
        f"(max_iter={info.max_iter}) the estimated relative error is {est.max():.3g} "
        f"(worst time; tol={info.tol:.3g}); raise max_iter or tol, or use solver='eigh'",
        KrylovConvergenceWarning,
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------------- #
# the whole prediction on the NTK operator
# --------------------------------------------------------------------------- #


@struct.dataclass
class KrylovPrediction:
    """Everything one matrix-free solve gives (time axis first; padding trimmed).

    Attributes:
      fx_train: (T, N, K) ``Y + E(t) r₀`` (Eq. 9).
      fx_test: (T, Nt, K) ``f₀(x*) − Θ(x*, X) α_t`` (Eq. 10), or None.
      alpha: (T, N, K) ``α_t``.
      params: the Eq. 8 weights ``θ₀ − Jᵀ α_t`` (leading T axis), or None.
      fx_train_0, fx_test_0: outputs at θ₀.
      mean_diagonal: () ``tr Θ / (N·K)`` when a relative ``diag_reg`` needed it, else 0.
      info: :class:`KrylovInfo`.
    """

    fx_train: jax.Array
    fx_test: jax.Array | None
    alpha: jax.Array
    params: object
    fx_train_0: jax.Array
    fx_test_0: jax.Array | None
    mean_diagonal: jax.Array
    info: KrylovInfo


_STATIC = (
    "n_train", "n_test", "trace_outputs", "time", "momentum", "diag_reg_absolute", "use_mean_diagonal", "rcond",
    "tol", "max_iter", "mesh", "tile", "trace_tile", "weights", "precision",
)


def _local_solve(
    model, params, x, mask, y, x_test, mask_test, times, lr, diag_reg, *, axes, n_train, trace_outputs, time,
    momentum, diag_reg_absolute, use_mean_diagonal, rcond, tol, max_iter, tile, trace_tile, weights,
):
    """One device's share of the whole prediction (inside ``shard_map``): its rows of every data-sized array."""
    from ntkdyn.kernels import sharding

    f0 = sharding.local_forward(model, params, x, tile)  # (n, K) this device's rows
    dtype = f0.dtype
    n_rows, outputs = f0.shape
    n = n_train * outputs
    times = times.astype(dtype)
    r0 = (f0 - y.astype(dtype)) * mask[:, None].astype(dtype)
    mean_diag = jnp.zeros((), dtype)
    if use_mean_diagonal:
        trace = sharding.local_squared_jacobian_norm(model, params, x, mask, axes=axes, tile=trace_tile)
        mean_diag = (trace / n).astype(dtype)
    reg = diag_reg.astype(dtype) * (1.0 if diag_reg_absolute else mean_diag)
    ops = dict(axes=axes, tile=tile)
    if trace_outputs:  # one Lanczos process per output column, Θ_tr on (N,) vectors
        matvec = lambda v: sharding.local_traced_matvec(model, params, x, mask, v, **ops)  # noqa: E731
        start, dim = r0, n_train
    else:  # the full kernel on the (N·K,) residual, kept as (N, K, 1)
        matvec = lambda v: sharding.local_matvec(model, params, x, mask, v, **ops)  # noqa: E731
        start, dim = r0[..., None], n
    sol = lanczos_dynamics(
        matvec, start, times, learning_rate=lr.astype(dtype), n=n, time=time, momentum=momentum, reg=reg,
        rcond=rcond, tol=tol, max_iter=max_iter, dim=dim, axes=axes,
    )
    n_times = times.shape[0]
    residual = sol.residual.reshape(n_times, n_rows, outputs)
    alpha = sol.alpha.reshape(n_times, n_rows, outputs)
    out = dict(fx_train=y.astype(dtype)[None] + residual, alpha=alpha, fx_train_0=f0, mean_diagonal=mean_diag,
               info=sol.info, fx_test=None, fx_test_0=None, params=None)
    cot = jnp.moveaxis(alpha, 0, -1)  # (n, K, T): one column per time
    if x_test is not None:
        f0_test = sharding.local_forward(model, params, x_test, tile)
        cross = dict(ops, x_out=x_test, mask_out=mask_test)
        if trace_outputs:  # Θ_tr(x*, X) applied to each output column of α, for every time
            flat = cot.reshape(n_rows, outputs * n_times)
            shift = sharding.local_traced_matvec(model, params, x, mask, flat, **cross)
            shift = shift.reshape(-1, outputs, n_times)
        else:
            shift = sharding.local_matvec(model, params, x, mask, cot, **cross)
        out.update(fx_test=f0_test[None] - jnp.moveaxis(shift, -1, 0), fx_test_0=f0_test)
    if weights:  # θ_t = θ₀ − Jᵀ α_t, identical on every device
        tangent = sharding.from_first(jax.lax.psum(sharding.local_pull(model, params, x, mask, cot, tile), axes), axes)
        out["params"] = jax.tree_util.tree_map(
            lambda p0, d: p0[None] - jnp.moveaxis(d, -1, 0).astype(p0.dtype), params, tangent
        )
    # under jit the hyper-parameters are not checked eagerly: an invalid one gives NaN, never a wrong number
    ok = jnp.isfinite(lr) & (lr > 0) & jnp.isfinite(diag_reg) & (diag_reg >= 0)
    ok_t = ok & (times >= 0)
    if momentum > 0:
        ok_t = ok_t & (jnp.isinf(times) | (times == jnp.round(times)))
    for key in ("fx_train", "alpha", "fx_test", "params"):
        out[key] = jax.tree_util.tree_map(
            lambda a: _validate.nan_unless(ok_t.reshape(-1, *([1] * (a.ndim - 1))), a), out[key]
        )
    return out


def _pipeline(model, params, x, mask, y, x_test, mask_test, times, lr, diag_reg, *, precision, mesh, n_test, **static):
    """The sharded program: :func:`_local_solve` under ``shard_map``, then padding trimmed and results replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ntkdyn.kernels import sharding

    spec = sharding.example_spec(mesh)
    axes = tuple(mesh.axis_names)
    rows, rep, timed = spec, PartitionSpec(), PartitionSpec(None, *spec)
    has_test = x_test is not None
    out_specs = dict(
        fx_train=timed, alpha=timed, fx_train_0=rows, mean_diagonal=rep, info=rep,
        fx_test=timed if has_test else None, fx_test_0=rows if has_test else None,
        params=rep if static["weights"] else None,
    )
    in_specs = (rep, rep, rows, rows, rows, rows if has_test else None, rows if has_test else None, rep, rep, rep)

    def body(*args):
        with jax.default_matmul_precision(precision):
            return _local_solve(*args, axes=axes, **static)

    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        model, params, x, mask, y, x_test, mask_test, times, lr, diag_reg
    )
    n_train = static["n_train"]
    replicated = NamedSharding(mesh, PartitionSpec())
    keep = lambda a: None if a is None else jax.lax.with_sharding_constraint(a, replicated)  # noqa: E731
    out["fx_train"], out["alpha"] = out["fx_train"][:, :n_train], out["alpha"][:, :n_train]
    out["fx_train_0"] = out["fx_train_0"][:n_train]
    if has_test:
        out["fx_test"], out["fx_test_0"] = out["fx_test"][:, :n_test], out["fx_test_0"][:n_test]
    return {key: jax.tree_util.tree_map(keep, value) for key, value in out.items()}


_pipeline_jit = jax.jit(_pipeline, static_argnames=_STATIC)


def default_tile(model, params, x_local, columns: int) -> int:
    """Rows per VJP/JVP call on one device: at most 4096, and no more than the kernel planner's
    operator memory model fits in a quarter of the memory budget (:func:`ntkdyn.kernels.planner.chunk_size`)."""
    from ntkdyn.kernels import planner

    budget = planner.memory_budget(None) / 4
    return int(min(4096, planner.chunk_size(model, params, x_local, x_local, columns, "auto", budget)))


def predict_operator(
    model,
    params,
    x: jax.Array,
    y: jax.Array,
    times: jax.Array,
    **options,
) -> KrylovPrediction:
    """The linearized trajectory from Lanczos on the NTK operator, never forming the kernel.

    Inputs are assumed validated (:func:`ntkdyn.predict` does it): ``model`` a
    :class:`~ntkdyn.models.Model`, ``x`` (N, ...), ``y`` (N, K), ``times`` 1-D.
    Examples are padded to a multiple of ``devices · tile_size`` with
    zero-weight rows and split over ``mesh`` (:mod:`ntkdyn.kernels.sharding`);
    every returned array is replicated on every device (and process) and
    trimmed to the real rows.

    Keyword options (those of :func:`ntkdyn.predict`, with the Krylov ones):
      x_test, learning_rate, diag_reg, diag_reg_absolute, time, momentum,
      trace_outputs, weights, rcond;
      tol, max_iter: stopping rule (:func:`lanczos_dynamics`);
      mesh: a :class:`jax.sharding.Mesh` (examples split over all its axes)
        or None for every device;
      tile_size: rows per VJP/JVP call on each device (default: up to 4096);
      precision: matmul precision the program is traced with.

    Returns:
      :class:`KrylovPrediction`.
    """
    program, args, static = prediction_program(model, params, x, y, times, **options)
    return KrylovPrediction(**program(*args, **static))


def prediction_program(
    model,
    params,
    x: jax.Array,
    y: jax.Array,
    times: jax.Array,
    *,
    x_test: jax.Array | None = None,
    learning_rate=1.0,
    diag_reg=0.0,
    diag_reg_absolute: bool = False,
    time: str = "continuous",
    momentum: float = 0.0,
    trace_outputs: bool = False,
    weights: bool = False,
    rcond: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    mesh=None,
    tile_size: int | None = None,
    precision: str = "highest",
):
    """``(program, args, static)`` with ``program(*args, **static)`` the whole sharded Krylov prediction.

    What :func:`predict_operator` runs (arguments as there), for inspection:
    ``program.lower(*args, **static).as_text()`` is the program every device
    executes. The data are padded, and placed on the mesh, here.
    """
    from ntkdyn.kernels import sharding
    from ntkdyn.kernels.empirical import check_rows

    mesh = sharding.check_mesh(mesh)
    n_train, outputs = y.shape
    dtype = jnp.result_type(jax.eval_shape(lambda m, p, xx: m(p, xx), model, params, x).dtype)
    n_local = -(-n_train // mesh.size)
    use_mean_diagonal = bool(not diag_reg_absolute and (not _validate.is_concrete(diag_reg) or float(diag_reg) != 0.0))
    if tile_size is None or use_mean_diagonal:  # the memory model and tr Θ's per-example Jacobians use one input
        check_rows(model, params, x, 1, outputs)
    if tile_size is None:
        columns = max(1 if not trace_outputs else outputs, np.shape(times)[0]) * (outputs if trace_outputs else 1)
        tile = default_tile(model, params, x[:n_local], columns)
    else:
        tile = _validate.count("tile_size", tile_size)
    tile = int(min(tile, max(n_local, 1)))
    check_rows(model, params, x, tile, outputs)  # every VJP/JVP call holds tile rows
    params_size = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))
    trace_tile = _divisor_at_most(tile, max(1, 2**24 // max(1, params_size * outputs)))
    n_pad = sharding.padded_size(n_train, mesh, tile)
    spec = sharding.example_spec(mesh)
    x_p = sharding.place(sharding.pad_rows(x, n_pad), mesh, spec)
    mask = sharding.place(sharding.row_mask(n_train, n_pad, dtype), mesh, spec)
    y_p = sharding.place(sharding.pad_rows(jnp.asarray(y).astype(dtype), n_pad), mesh, spec)
    xt_p = mt = None
    n_test = 0
    if x_test is not None:
        n_test = x_test.shape[0]
        nt_pad = sharding.padded_size(n_test, mesh, tile)
        xt_p = sharding.place(sharding.pad_rows(x_test, nt_pad), mesh, spec)
        mt = sharding.place(sharding.row_mask(n_test, nt_pad, dtype), mesh, spec)
    from jax.sharding import PartitionSpec

    rep = lambda a: sharding.place(a, mesh, PartitionSpec())  # noqa: E731
    rcond = spectral.default_rcond(n_train * outputs, dtype) if rcond is None else float(rcond)
    args = (
        jax.tree_util.tree_map(rep, model), jax.tree_util.tree_map(rep, params), x_p, mask, y_p, xt_p, mt,
        rep(jnp.asarray(times, dtype)), rep(jnp.asarray(learning_rate, dtype)), rep(jnp.asarray(diag_reg, dtype)),
    )
    static = dict(
        n_train=n_train, n_test=n_test, trace_outputs=bool(trace_outputs), time=time, momentum=float(momentum),
        diag_reg_absolute=bool(diag_reg_absolute), use_mean_diagonal=use_mean_diagonal, rcond=rcond,
        tol=default_tol(dtype) if tol is None else float(tol), max_iter=max_iter, mesh=mesh, tile=tile,
        trace_tile=trace_tile, weights=bool(weights), precision=precision,
    )
    return _pipeline_jit, args, static


def _divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of n that is ≤ limit (≥ 1)."""
    best = 1
    for d in range(1, int(math.isqrt(n)) + 1):
        if n % d == 0:
            for e in (d, n // d):
                if e <= limit:
                    best = max(best, e)
    return best
