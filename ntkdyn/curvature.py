"""Curvature of the training loss: Hessian, Gauss-Newton, and their tie to the NTK.

Loss convention (docs/conventions.md): ``L(θ) = 1/(2n) ‖f(θ, X) − Y‖²``, n = N·K. Then

* Hessian: ``H = ∇²L = Jᵀ J / n + (1/n) Σ_a (f_a − y_a) ∇²f_a``;
* Gauss-Newton (GGN): ``G = Jᵀ H_L J`` with ``H_L = ∇²_f ℓ`` the Hessian of
  the loss in function space (``I/n`` for the MSE above), so ``G = Jᵀ J / n``.

Both are applied as matrix-free products (``hvp``: forward-over-reverse;
``gauss_newton_vp``: one JVP, one loss-Hessian product, one VJP), and their
extreme eigenvalues come from Lanczos with full reorthogonalisation.

The NTK link: ``Jᵀ J`` (P × P) and ``J Jᵀ = Θ`` (n × n) share their nonzero
eigenvalues, so ``eig⁺(G) = eig⁺(Θ / n)``. Gradient descent on the
linearized model is stable iff ``η < 2/λ_max(G) = 2n/λ_max(Θ)``, the same
number :func:`ntkdyn.dynamics.max_learning_rate` gives from the kernel side.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from ntkdyn import _validate
from ntkdyn.kernels import flat_param_count, flatten_kernel, output_shape

__all__ = [
    "LanczosResult",
    "WHICH",
    "mse_objective",
    "hvp",
    "gauss_newton_vp",
    "lanczos",
    "top_eigenvalues",
    "hessian_eigenvalues",
    "gauss_newton_eigenvalues",
    "gauss_newton_eigenvalues_from_ntk",
    "max_stable_step",
    "spectrum_recorder",
]

WHICH = ("largest", "smallest", "magnitude")
MATRICES = ("hessian", "gauss_newton")


@struct.dataclass
class LanczosResult:
    """Ritz approximations from a Lanczos run.

    Attributes:
      eigenvalues: (k,) ordered by ``which`` (largest first for ``"largest"``).
      eigenvectors: (dim, k) orthonormal Ritz vectors as columns (flat,
        ``ravel_pytree`` order when the operator acts on a params pytree).
      residuals: (k,) ``‖A v − λ v‖`` bounds ``|β_m s_{m,i}|``; an eigenvalue has
        converged when its residual is small against ``|λ|`` (exactly 0 once the
        Krylov space is invariant, e.g. num_iter = dim).
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residuals: jax.Array


# --------------------------------------------------------------------------- #
# matrix-free products
# --------------------------------------------------------------------------- #


def mse_objective(apply_fn: Callable[[Any, jax.Array], jax.Array], x: jax.Array, y: jax.Array) -> Callable[[Any], jax.Array]:
    """``L(θ) = 1/(2n) Σ (f(θ, X) − Y)²`` (= ``mean(optax.l2_loss)``), n = N·K, as a function of θ."""

    def loss(params):
        return jnp.mean(optax.l2_loss(apply_fn(params, x), y))

    return loss


def _mse_output_loss(f, y):
    return jnp.mean(optax.l2_loss(f, y))


def hvp(loss_fn: Callable[[Any], jax.Array], params: Any, v: Any) -> Any:
    """Hessian-vector product ``∇²L(θ) v`` by forward-over-reverse (a JVP of ``grad``).

    ``params``, ``v``: pytrees of the same structure; returns that structure.
    Cost ≈ 2-3 gradient evaluations; the P × P Hessian is never formed.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def gauss_newton_vp(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    v: Any,
    *,
    y: jax.Array | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Any:
    """Generalized Gauss-Newton product ``G v = Jᵀ H_L J v``.

    ``J v``: one JVP of ``f(·, x)``; ``H_L u``: the Hessian of the output loss
    ``loss(f, y)`` at ``f(θ, x)`` applied to u (forward-over-reverse in f);
    ``Jᵀ ·``: one VJP. Default loss: the MSE of the conventions, for which
    ``H_L = I/n`` (n = N·K) and no targets are needed.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)``.
      params, v: pytrees of the same structure.
      x: (N, ...) inputs.
      y: targets (N, K), required by a custom ``loss``.
      loss: scalar ``loss(f, y)``, convex in f for G to be PSD.
    """
    f, jv = jax.jvp(lambda p: apply_fn(p, x), (params,), (v,))
    if loss is None:
        hjv = jv / f.size
    else:
        if y is None:
            raise ValueError("y: targets are required with a custom loss(f, y), got None")
        hjv = jax.jvp(jax.grad(lambda out: loss(out, y)), (f,), (jv,))[1]
    _, vjp = jax.vjp(lambda p: apply_fn(p, x), params)
    return vjp(hjv)[0]


# --------------------------------------------------------------------------- #
# Lanczos
# --------------------------------------------------------------------------- #


def _check_k(k, dim: int) -> int:
    k = _validate.count("k", k)
    if k > dim:
        raise ValueError(f"k: expected at most the operator dimension {dim}, got {k}")
    return int(k)


def _check_num_iter(num_iter, k: int, dim: int) -> int:
    if num_iter is None:
        return min(dim, 2 * k + 40)
    return min(_validate.count("num_iter", num_iter, k), dim)


def _order(evals: jax.Array, k: int, which: str) -> jax.Array:
    """Indices of the k wanted Ritz values in eigh's ascending output."""
    m = evals.shape[0]
    if which == "largest":
        return jnp.arange(m - 1, m - 1 - k, -1)
    if which == "smallest":
        return jnp.arange(k)
    return jnp.argsort(-jnp.abs(evals))[:k]


def _lanczos_flat(matvec, v0: jax.Array, num_iter: int, key: jax.Array):
    """m = num_iter steps of Lanczos with full reorthogonalisation (Gram-Schmidt twice).

    Returns (alpha (m,), beta (m,), Q (m, dim)); ``beta[j]`` couples q_j and
    q_{j+1}. A breakdown (``β ≈ 0``: the Krylov space is invariant) restarts
    from a random vector orthogonal to Q with ``β = 0``, so T stays exact.
    """
    dim = v0.shape[0]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    q0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((num_iter + 1, dim), dtype).at[0].set(q0)
    alpha = jnp.zeros((num_iter,), dtype)
    beta = jnp.zeros((num_iter,), dtype)

    def orthogonalize(w, basis, j):
        mask = (jnp.arange(num_iter + 1) <= j)[:, None]
        qs = jnp.where(mask, basis, 0.0)
        w = w - qs.T @ (qs @ w)
        return w - qs.T @ (qs @ w)

    def body(j, carry):
        basis, alpha, beta, scale = carry
        q = basis[j]
        w = matvec(q)
        a = jnp.dot(q, w)
        w = orthogonalize(w, basis, j)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(a) + b)
        broke = b <= 10.0 * eps * jnp.sqrt(dim) * scale
        fresh = orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (dim,), dtype), basis, j)
        fresh = fresh / jnp.maximum(jnp.linalg.norm(fresh), jnp.finfo(dtype).tiny)
        nxt = jnp.where(broke, fresh, w / jnp.where(broke, 1.0, b))
        basis = basis.at[j + 1].set(nxt)
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(broke, 0.0, b)), scale

    basis, alpha, beta, _ = jax.lax.fori_loop(
        0, num_iter, body, (basis, alpha, beta, jnp.zeros((), dtype))
    )
    return alpha, beta, basis[:num_iter]


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    dim: int,
    *,
    k: int = 1,
    num_iter: int | None = None,
    which: str = "largest",
    key=None,
    seed: int = 0,
    dtype=None,
) -> LanczosResult:
    """Extreme eigenpairs of a symmetric operator from ``matvec`` alone.

    Builds the tridiagonal ``T = Qᵀ A Q`` (m × m) of the Krylov space of a
    random start vector, keeping Q orthonormal by full reorthogonalisation
    (memory m·dim), and returns Ritz pairs of T. With ``num_iter = dim`` the
    result is exact up to round-off; otherwise extreme eigenvalues converge
    first (check ``residuals``). jit/vmap/scan-friendly: fixed iteration count,
    no host round-trips.

    Args:
      matvec: ``v (dim,) -> A v (dim,)``, A symmetric.
      dim: operator size.
      k: number of eigenpairs.
      num_iter: Krylov dimension m (default ``min(dim, 2k + 40)``), ≥ k.
      which: ``"largest"`` (algebraic, first), ``"smallest"`` or ``"magnitude"``.
      key, seed: start-vector randomness (``key`` wins when given).
      dtype: working dtype (default float, i.e. float64 with x64).

    Returns:
      :class:`LanczosResult`.
    """
    if not callable(matvec):
        raise TypeError(f"matvec: expected a callable v -> A v, got {matvec!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
    if which not in WHICH:
        raise ValueError(f"which: expected one of {WHICH}, got {which!r}")
    k = _check_k(k, dim)
    num_iter = _check_num_iter(num_iter, k, dim)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    key = jax.random.key(seed) if key is None else key

    # one compiled program per call (the caller's jit, if any, simply inlines it)
    @jax.jit
    def run(key):
        start_key, restart_key = jax.random.split(key)
        v0 = jax.random.normal(start_key, (dim,), dtype)
        alpha, beta, q = _lanczos_flat(lambda v: matvec(v).astype(dtype), v0, num_iter, restart_key)
        tri = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
        evals, svecs = jnp.linalg.eigh(tri)
        residuals = jnp.abs(beta[-1] * svecs[-1, :])
        if num_iter == dim:  # the Krylov space is the whole space: T is A in the basis Q
            residuals = jnp.zeros_like(residuals)
        idx = _order(evals, k, which)
        return LanczosResult(eigenvalues=evals[idx], eigenvectors=q.T @ svecs[:, idx], residuals=residuals[idx])

    return run(key)


def top_eigenvalues(operator: Callable[[Any], Any], params: Any, **lanczos_options) -> LanczosResult:
    """Lanczos on an operator acting on pytrees shaped like ``params``.

    ``operator(v_tree) -> A v_tree`` (e.g. ``lambda v: hvp(loss, params, v)``).
    The pytree is flattened with ``ravel_pytree``; Ritz vectors come back flat
    (dim, k) in that order. The working dtype is the params' own.

    ``lanczos_options``: every keyword of :func:`lanczos` but ``dtype`` —
    ``k``, ``num_iter``, ``which``, ``key``, ``seed`` — forwarded unchanged
    (same defaults; an unknown keyword raises TypeError).
    """
    _validate.params_tree("params", params)
    flat, unravel = ravel_pytree(params)

    def matvec(v):
        return ravel_pytree(operator(unravel(v.astype(flat.dtype))))[0]

    return lanczos(matvec, flat.size, dtype=flat.dtype, **lanczos_options)


def hessian_eigenvalues(loss_fn: Callable[[Any], jax.Array], params: Any, **lanczos_options) -> LanczosResult:
    """Top-k (by ``which``) eigenpairs of ``∇²L(θ)`` from Hessian-vector products.

    ``lanczos_options``: ``k``, ``num_iter``, ``which``, ``key``, ``seed`` as in :func:`top_eigenvalues`.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(params) -> scalar, got {loss_fn!r}")
    return top_eigenvalues(lambda v: hvp(loss_fn, params, v), params, **lanczos_options)


def gauss_newton_eigenvalues(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    *,
    y: jax.Array | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    k: int = 1,
    num_iter: int | None = None,
    key=None,
    seed: int = 0,
) -> LanczosResult:
    """Top-k eigenpairs of the Gauss-Newton matrix ``Jᵀ H_L J`` (``Jᵀ J / n`` for MSE).

    G is PSD with rank ≤ N·K, so Lanczos needs at most N·K + 1 steps to find
    its whole nonzero spectrum; ``num_iter`` defaults accordingly.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    x = _validate.batch("x", x)
    n_out = int(np.prod(output_shape(apply_fn, params, x)))
    if num_iter is None:
        dim = flat_param_count(params)
        num_iter = min(dim, max(_check_k(k, dim), n_out + 1))
    return top_eigenvalues(
        lambda v: gauss_newton_vp(apply_fn, params, x, v, y=y, loss=loss),
        params, k=k, num_iter=num_iter, which="largest", key=key, seed=seed,
    )


def gauss_newton_eigenvalues_from_ntk(k_train_train: jax.Array) -> jax.Array:
    """Eigenvalues of ``Θ / n`` (descending, n = N·K): the nonzero spectrum of ``G = Jᵀ J / n``.

    ``Jᵀ J`` and ``J Jᵀ = Θ`` have the same nonzero eigenvalues (SVD of J), so
    the MSE Gauss-Newton spectrum comes from one (n × n) ``eigh`` of the full
    kernel (N, N, K, K) instead of a (P × P) problem. G has ``P − rank Θ``
    further zeros.

    The kernel must be symmetric positive semi-definite (``ValueError`` naming
    ``k_train_train`` otherwise, tolerance :func:`ntkdyn._validate.psd_tolerance`;
    under ``jit``, NaN eigenvalues): an indefinite Θ is no ``J Jᵀ``, and its
    negative eigenvalues would read as a Gauss-Newton spectrum.
    """
    kern = _validate.float_array("k_train_train", k_train_train)
    if kern.ndim != 4 or kern.shape[0] != kern.shape[1] or kern.shape[2] != kern.shape[3]:
        raise ValueError(
            "k_train_train: expected the full kernel of shape (N, N, K, K) (the output-traced kernel "
            f"loses the cross-output blocks), got {tuple(kern.shape)}"
        )
    mat = flatten_kernel(kern)
    _validate.finite("k_train_train", mat)
    _validate.symmetric_psd("k_train_train", mat, what="kernel")
    n = mat.shape[0]
    values = jnp.linalg.eigvalsh(0.5 * (mat + mat.T))[::-1] / n
    return _validate.nan_unless(_validate.traced_symmetric_psd(mat), values)


def max_stable_step(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    matrix: str = "gauss_newton",
    num_iter: int | None = None,
    seed: int = 0,
) -> jax.Array:
    """Largest stable GD step from the curvature side: ``2 / λ_max`` of the Gauss-Newton matrix or the Hessian.

    (The kernel-side twin, for every optimizer the solver knows, is
    :func:`ntkdyn.max_learning_rate`.)

    With ``matrix="gauss_newton"`` this is ``2 / λ_max(Jᵀ J / n) = 2n/λ_max(Θ)``,
    equal to :func:`ntkdyn.dynamics.max_learning_rate` of the kernel (GD on
    the linearized model is stable iff η is below it). With
    ``matrix="hessian"`` (needs ``y``) it is ``2 / λ_max(∇²L)``, the classical
    stability threshold of GD on the real loss at θ ("edge of stability").
    """
    _validate.choice("matrix", matrix, MATRICES)
    if matrix == "hessian":
        if y is None:
            raise ValueError("y: the Hessian of the loss needs the targets, got None")
        x = _validate.batch("x", x)
        lam = hessian_eigenvalues(mse_objective(apply_fn, x, y), params, k=1, num_iter=num_iter, seed=seed).eigenvalues[0]
    else:
        lam = gauss_newton_eigenvalues(apply_fn, params, x, k=1, num_iter=num_iter, seed=seed).eigenvalues[0]
    return jnp.where(lam > 0, 2.0 / jnp.where(lam > 0, lam, 1.0), jnp.inf)


# --------------------------------------------------------------------------- #
# tracking along training
# --------------------------------------------------------------------------- #


def spectrum_recorder(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    x_train: jax.Array,
    y_train: jax.Array,
    *,
    k: int = 1,
    num_iter: int = 20,
    matrices: Sequence[str] = MATRICES,
    seed: int = 0,
) -> Callable[[Any], dict[str, jax.Array]]:
    """Build ``record_fn(params) -> {"hessian": (k,), "gauss_newton": (k,)}``.

    Top-k eigenvalues (largest first) of the MSE loss Hessian ``∇²L`` and of
    ``G = Jᵀ J / n`` at ``params``, each by ``num_iter`` Lanczos steps with a
    fixed start vector (``seed``), so the function is pure and traceable:
    hand it to ``ntkdyn.experiments.train(..., record_fn=record_fn, record_at=...)`` to
    watch the spectrum along a run (``2/η`` is the stability edge for
    ``"hessian"``), or map it over saved parameter snapshots.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    x_train = _validate.batch("x_train", x_train)
    y_train = _validate.float_array("y_train", y_train)
    if y_train.ndim != 2 or y_train.shape[0] != x_train.shape[0]:
        raise ValueError(
            f"y_train: expected shape (N, K) with N = {x_train.shape[0]}, got {tuple(y_train.shape)}"
        )
    matrices = tuple(matrices)
    if not matrices or any(m not in MATRICES for m in matrices):
        raise ValueError(f"matrices: expected a non-empty subset of {MATRICES}, got {matrices!r}")
    k = _validate.count("k", k)
    num_iter = _validate.count("num_iter", num_iter, k)
    loss_fn = mse_objective(apply_fn, x_train, y_train)
    key = jax.random.key(seed)

    def record_fn(params) -> dict[str, jax.Array]:
        out = {}
        if "hessian" in matrices:
            out["hessian"] = hessian_eigenvalues(loss_fn, params, k=k, num_iter=num_iter, key=key).eigenvalues
        if "gauss_newton" in matrices:
            out["gauss_newton"] = top_eigenvalues(
                lambda v: gauss_newton_vp(apply_fn, params, x_train, v), params, k=k, num_iter=num_iter, key=key
            ).eigenvalues
        return out

    return record_fn
