"""Convex solver layers with implicit gradients, and the loss aligned with them.

A network's prediction p (K per example) feeds a solver layer

    q(p) = argmax_x  pᵀx − C(x),       C strictly convex and smooth,

whose optimality condition is ``∇C(q) = p``. Differentiating it gives
``∂q/∂p = H⁻¹`` with ``H = ∇²C(q)``: the backward pass applies ``H⁻¹`` by
one linear solve at the solution (implicit function theorem) and never
differentiates through the solver's iterations.

The aligned loss ``ℓ(p, y) = C(q) − yᵀq`` has ``∇_p ℓ = H⁻¹(p − y)`` (because
``∇_q ℓ = p − y``): minimising it drives p to y, with the weight ``H⁻¹``
largest where the cost is flat. With the averaging of the MSE convention
(n = N·K), ``L = (1/n) Σ_i ℓ(p_i, y_i)``, gradient descent on a network
whose kernel is Θ follows, linearized,

    ṗ = −(η/n) Θ M (p − y),     M = blockdiag_i H(q_i)⁻¹,

which for a quadratic cost ``C = ½ qᵀHq`` (M = I_N ⊗ H⁻¹, constant) is
solved in closed form by :func:`ntkdyn.dynamics.function_space` with
``metric=M``. Adding the constant ``C*(y)`` makes ℓ the Bregman divergence
``D_{C*}(y, p) ≥ 0`` of the convex conjugate (``bregman=True``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate

__all__ = [
    "SolverNotConverged",
    "NewtonResult",
    "LINEAR_SOLVERS",
    "default_tol",
    "newton_solve",
    "solver_layer",
    "aligned_loss",
    "quadratic_cost",
    "quadratic_metric",
    "inverse_hessian",
    "solver_metric",
]

LINEAR_SOLVERS = ("dense", "cg")
ON_FAILURE = ("raise", "nan")


class SolverNotConverged(RuntimeError):
    """The inner Newton solve of a solver layer did not reach its tolerance.

    Raised directly in eager code. Inside ``jit`` the check runs as a host
    callback, and the runtime error it produces carries this message.
    """


@struct.dataclass
class NewtonResult:
    """Outcome of :func:`newton_solve`.

    Attributes:
      x: (d,) the iterate returned.
      converged: whether ``residual ≤ tol``.
      iterations: Newton steps taken.
      residual: ``‖∇C(x) − p‖_∞ / (1 + ‖p‖_∞)``, the relative optimality gap.
    """

    x: jax.Array
    converged: jax.Array
    iterations: jax.Array
    residual: jax.Array


def default_tol(dtype) -> float:
    """``eps^{2/3}`` of the dtype (≈ 3.7e-11 float64, 2.4e-5 float32).

    Newton converges quadratically, so a residual this small is one step away
    from round-off; asking for less than ~eps is not attainable.
    """
    return float(jnp.finfo(dtype).eps) ** (2.0 / 3.0)


# --------------------------------------------------------------------------- #
# the inner solver
# --------------------------------------------------------------------------- #


def newton_solve(
    cost: Callable[..., jax.Array],
    p: jax.Array,
    *cost_args: Any,
    x0: jax.Array | None = None,
    tol: float | None = None,
    max_iter: int = 50,
    max_backtracks: int = 40,
) -> NewtonResult:
    """Minimise ``F(x) = C(x, *cost_args) − pᵀx`` by damped Newton.

    Step ``d = −H⁻¹ ∇F`` (``H = ∇²C``, dense solve; steepest descent when that
    is not a descent direction), backtracking line search halving the step
    until the Armijo condition ``F(x + s d) ≤ F(x) + 10⁻⁴ s ∇Fᵀd`` holds, up
    to the rounding of F (``16·eps·(1 + |F|)``), with a finite value (so a cost defined on a domain — ``+inf``/NaN outside —
    is never left). Stops when ``‖∇C(x) − p‖_∞ ≤ tol · (1 + ‖p‖_∞)`` or after
    ``max_iter`` steps. jit/vmap-compatible; does not raise (see
    ``converged``).

    Args:
      cost: ``C(x, *cost_args) -> scalar``, strictly convex and twice
        differentiable in x (d,).
      p: (d,) the linear term.
      x0: start (default zeros; must lie in the cost's domain).
      tol: relative tolerance (default :func:`default_tol` of p's dtype).
    """
    p = jnp.asarray(p)
    dtype = p.dtype
    tol = default_tol(dtype) if tol is None else tol
    x0 = jnp.zeros_like(p) if x0 is None else jnp.asarray(x0, dtype)
    scale = 1.0 + jnp.max(jnp.abs(p))

    def objective(x):
        return cost(x, *cost_args) - jnp.dot(p, x)

    grad_f = jax.grad(objective)
    hess_c = jax.hessian(lambda x: cost(x, *cost_args))

    def residual(g):
        r = jnp.max(jnp.abs(g)) / scale
        return jnp.where(jnp.isfinite(r), r, jnp.inf)

    def cond(state):
        x, _, it, res = state
        return (res > tol) & (it < max_iter) & jnp.all(jnp.isfinite(x))

    def body(state):
        x, g, it, _ = state
        d = -jnp.linalg.solve(hess_c(x), g)
        slope = jnp.dot(g, d)
        descent = jnp.all(jnp.isfinite(d)) & (slope < 0)
        d = jnp.where(descent, d, -g)
        slope = jnp.where(descent, slope, -jnp.dot(g, g))
        f0 = objective(x)
        # near the optimum the decrease (~½gᵀH⁻¹g) drops below the rounding of F itself;
        # without this slack Armijo would reject every full Newton step there and stall
        slack = 16 * jnp.finfo(dtype).eps * (1 + jnp.abs(f0))

        def rejected(ls):
            s, k = ls
            f1 = objective(x + s * d)
            return ~(jnp.isfinite(f1) & (f1 <= f0 + 1e-4 * s * slope + slack)) & (k < max_backtracks)

        s, _ = jax.lax.while_loop(rejected, lambda ls: (0.5 * ls[0], ls[1] + 1), (jnp.ones((), dtype), 0))
        x_new = x + s * d
        g_new = grad_f(x_new)
        return x_new, g_new, it + 1, residual(g_new)

    g0 = grad_f(x0)
    x, _, it, res = jax.lax.while_loop(cond, body, (x0, g0, jnp.zeros((), jnp.int32), residual(g0)))
    return NewtonResult(x=x, converged=res <= tol, iterations=it, residual=res)


def _failure_message(iterations, residual, tol, max_iter) -> str:
    return (
        f"solver layer: Newton did not converge (relative residual ‖∇C(q) − p‖∞/(1+‖p‖∞) = "
        f"{float(residual):.3g} > tol = {tol:.3g} after {int(iterations)} of max_iter = {max_iter} steps). "
        "Check that C is strictly convex and that ∇C(x) = p has a solution for this p "
        "(its range may not cover p), or raise max_iter / tol."
    )


def _raise_unless_converged(converged, iterations, residual, tol, max_iter) -> None:
    conv, its, res = (np.ravel(np.asarray(a)) for a in (converged, iterations, residual))
    if conv.all():
        return
    bad = np.flatnonzero(~conv)
    worst = bad[np.argmax(res[bad])]
    raise SolverNotConverged(
        _failure_message(its[worst], res[worst], tol, max_iter) + f" [{bad.size} of {conv.size} problems failed]"
    )


# --------------------------------------------------------------------------- #
# the layer
# --------------------------------------------------------------------------- #


def _apply_inverse_hessian(cost, q, cost_args, g, linear_solver: str, tol: float):
    """``H(q)⁻¹ g``: dense Cholesky-free solve, or CG on Hessian-vector products."""
    c = lambda x: cost(x, *cost_args)  # noqa: E731
    if linear_solver == "dense":
        return jnp.linalg.solve(jax.hessian(c)(q), g)
    grad_c = jax.grad(c)
    matvec = lambda v: jax.jvp(grad_c, (q,), (v,))[1]  # noqa: E731
    u, _ = jax.scipy.sparse.linalg.cg(matvec, g, tol=tol, maxiter=10 * q.shape[0])
    return u


def solver_layer(
    cost: Callable[..., jax.Array],
    *,
    tol: float | None = None,
    max_iter: int = 50,
    max_backtracks: int = 40,
    x0: jax.Array | None = None,
    linear_solver: str = "dense",
    on_failure: str = "raise",
) -> Callable[..., jax.Array]:
    """Return ``layer(p, *cost_args) = argmax_x pᵀx − C(x, *cost_args)`` with implicit gradients.

    Forward: :func:`newton_solve` (damped Newton, line search, ``tol``,
    ``max_iter``). Backward (``jax.custom_vjp``), for a cotangent q̄ at the
    solution q with ``H = ∇²_x C(q)``::

        p̄ = H⁻¹ q̄,        ā = −(∂_a ∇_x C(q, a))ᵀ H⁻¹ q̄

    (implicit function theorem on ``∇_x C(q, a) = p``), one linear solve —
    ``"dense"`` (``jnp.linalg.solve`` on the d × d Hessian) or ``"cg"``
    (conjugate gradients on Hessian-vector products, for large d).

    ``p`` has shape (d,) or (..., d); leading axes are independent problems
    sharing ``cost_args`` (floating-point arrays/pytrees, differentiable).

    Args:
      cost: ``C(x, *cost_args) -> scalar``, strictly convex, smooth in x.
      tol, max_iter, max_backtracks, x0: inner-solver settings (see
        :func:`newton_solve`); ``x0`` (d,) must lie in C's domain.
      linear_solver: ``"dense"`` or ``"cg"``.
      on_failure: ``"raise"`` raises :class:`SolverNotConverged` (eagerly;
        under ``jit`` from a host callback, surfacing as a runtime error with
        the same message); ``"nan"`` returns NaN for unconverged problems.
    """
    if not callable(cost):
        raise TypeError(f"cost: expected a callable C(x, *cost_args) -> scalar, got {cost!r}")
    if tol is not None:
        _validate.positive_scalar("tol", tol)
    max_iter = _validate.count("max_iter", max_iter)
    max_backtracks = _validate.count("max_backtracks", max_backtracks)
    if linear_solver not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver: expected one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure: expected one of {ON_FAILURE}, got {on_failure!r}")

    # compiled once per layer (and per shape): eager calls reuse the program
    @jax.jit
    def solve_batch(p, cost_args):
        def one(pi):
            return newton_solve(
                cost, pi, *cost_args, x0=x0, tol=tol, max_iter=max_iter, max_backtracks=max_backtracks
            )

        return jax.vmap(one)(p)

    def forward(p, cost_args):
        res = solve_batch(p, cost_args)
        used_tol = default_tol(p.dtype) if tol is None else tol
        if on_failure == "nan":
            return jnp.where(res.converged[:, None], res.x, jnp.nan)
        if _validate.is_concrete(res.converged):
            _raise_unless_converged(res.converged, res.iterations, res.residual, used_tol, max_iter)
        else:
            jax.debug.callback(
                lambda c, i, r: _raise_unless_converged(c, i, r, used_tol, max_iter),
                res.converged, res.iterations, res.residual,
            )
        return res.x

    @jax.jit
    def backward(q, cost_args, q_bar):
        used_tol = default_tol(q.dtype) if tol is None else tol

        def one(qi, gi):
            u = _apply_inverse_hessian(cost, qi, cost_args, gi, linear_solver, used_tol)
            _, vjp_args = jax.vjp(lambda a: jax.grad(lambda x: cost(x, *a))(qi), cost_args)
            return u, vjp_args(-u)[0]

        u, a_bar = jax.vmap(one)(q, q_bar)
        return u, jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), a_bar)

    @jax.custom_vjp
    def solve(p, cost_args):
        return forward(p, cost_args)

    def solve_fwd(p, cost_args):
        q = forward(p, cost_args)
        return q, (q, cost_args)

    def solve_bwd(residuals, q_bar):
        q, cost_args = residuals
        return backward(q, cost_args, q_bar)

    solve.defvjp(solve_fwd, solve_bwd)

    def layer(p, *cost_args):
        p = _validate.float_array("p", p)
        if p.ndim == 0:
            raise ValueError("p: expected shape (d,) or (..., d), got a scalar")
        if _validate.is_concrete(p):
            _validate.finite("p", p)
        cost_args = jax.tree_util.tree_map(jnp.asarray, tuple(cost_args))
        q = solve(p.reshape(-1, p.shape[-1]), cost_args)
        return q.reshape(p.shape)

    return layer


# --------------------------------------------------------------------------- #
# the aligned loss
# --------------------------------------------------------------------------- #


def aligned_loss(
    cost: Callable[..., jax.Array],
    *,
    bregman: bool = False,
    layer: Callable[..., jax.Array] | None = None,
    **layer_options,
) -> Callable[..., jax.Array]:
    """Return ``loss(p, y, *cost_args) = (1/n) Σ_i [C(q_i) − y_iᵀ q_i]``, ``q = layer(p)``.

    ``p``, ``y``: (N, K); n = N·K (the MSE convention's averaging, so for
    ``C = ½‖q‖²`` the loss is ``1/(2n)‖p − y‖²`` up to a constant).
    Gradient: ``∇_{p_i} loss = H(q_i)⁻¹ (p_i − y_i) / n``.

    ``bregman=True`` adds ``C*(y_i) = y_iᵀq(y_i) − C(q(y_i))`` (one more
    solve, at y), making each term the Bregman divergence ``D_{C*}(y_i, p_i)``:
    ≥ 0, zero iff p_i = y_i; for ``C = ½qᵀHq`` it is ``½(p − y)ᵀH⁻¹(p − y)``.

    ``layer``: an existing ``solver_layer(cost, ...)`` to reuse (its compiled
    solves are shared); otherwise one is built from ``layer_options``.
    """
    if layer is None:
        layer = solver_layer(cost, **layer_options)
    elif layer_options:
        raise ValueError(f"layer_options: pass either layer or solver options, got both (options {sorted(layer_options)})")

    def loss(p, y, *cost_args):
        p = _validate.float_array("p", p)
        y = _validate.float_array("y", y)
        if p.ndim != 2 or y.shape != p.shape:
            raise ValueError(f"p, y: expected two arrays of the same shape (N, K), got {tuple(p.shape)} and {tuple(y.shape)}")
        q = layer(p, *cost_args)
        per_example = jax.vmap(lambda qi, yi: cost(qi, *cost_args) - jnp.dot(yi, qi))(q, y)
        if bregman:
            qy = layer(y, *cost_args)
            per_example = per_example + jax.vmap(lambda qi, yi: jnp.dot(yi, qi) - cost(qi, *cost_args))(qy, y)
        return jnp.sum(per_example) / p.size

    return loss


# --------------------------------------------------------------------------- #
# metrics for the linearized dynamics
# --------------------------------------------------------------------------- #


def quadratic_cost(h: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``C(x) = ½ xᵀ H x`` for a symmetric positive definite (K, K) H; ``q(p) = H⁻¹p``."""
    h = _validate.positive_definite("h", h)

    def cost(x):
        return 0.5 * jnp.dot(x, h @ x)

    return cost


def quadratic_metric(h: jax.Array) -> jax.Array:
    """``M = H⁻¹`` (K, K) for the quadratic cost ``½ qᵀHq``: pass as ``metric=`` to
    :func:`ntkdyn.dynamics.function_space` / ``parameter_space`` (applied per example)."""
    h = _validate.positive_definite("h", h)
    inv = jnp.linalg.inv(h)
    return 0.5 * (inv + inv.T)


def inverse_hessian(cost: Callable[..., jax.Array], q: jax.Array, *cost_args: Any) -> jax.Array:
    """``H(q)⁻¹`` (d, d) with ``H = ∇²_x C(q, *cost_args)``: the layer's Jacobian ``∂q/∂p`` at q."""
    q = _validate.float_array("q", q)
    if q.ndim != 1:
        raise ValueError(f"q: expected a single point of shape (d,), got {tuple(q.shape)}")
    inv = jnp.linalg.inv(jax.hessian(lambda x: cost(x, *cost_args))(q))
    return 0.5 * (inv + inv.T)


def solver_metric(
    cost: Callable[..., jax.Array],
    p: jax.Array,
    *cost_args: Any,
    layer: Callable[..., jax.Array] | None = None,
    **layer_options,
) -> jax.Array:
    """``M = blockdiag_i H(q_i)⁻¹`` (N·K, N·K) at ``q = layer(p)``, p of shape (N, K).

    The metric of the aligned loss's linearized flow ``ṗ = −(η/n) Θ M (p − y)``
    around p (rows/cols in the (N, K) row-major order of
    :func:`ntkdyn.kernels.flatten_kernel`). Constant, equal to
    ``I_N ⊗ H⁻¹``, for a quadratic cost; for other costs M changes as p moves,
    and the closed form with M frozen at p₀ is a local approximation.
    ``layer``/``layer_options``: as in :func:`aligned_loss`.
    """
    p = _validate.float_array("p", p)
    if p.ndim != 2:
        raise ValueError(f"p: expected shape (N, K), got {tuple(p.shape)}")
    if layer is None:
        layer = solver_layer(cost, **layer_options)
    q = layer(p, *cost_args)
    blocks = jax.vmap(lambda qi: inverse_hessian(cost, qi, *cost_args))(q)
    n, k = p.shape
    eye = jnp.eye(n, dtype=blocks.dtype)
    return jnp.einsum("ij,iab->iajb", eye, blocks).reshape(n * k, n * k)
