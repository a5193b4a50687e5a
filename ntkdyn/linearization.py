"""The network linearized around its initial parameters.

``f_lin(θ, x) = f(θ₀, x) + J(x)(θ − θ₀)`` (Lee et al. 2019, Eq. 5), computed
as one forward-mode JVP, so the Jacobian is never stored.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["linearize"]


def linearize(apply_fn: Callable[[Any, jax.Array], jax.Array], params0: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """Return ``f_lin(params, x) = f(θ₀, x) + J(x)(params − θ₀)``.

    ``params`` must have the structure of ``params0``. For a stack of
    parameters with a leading time axis (as :func:`ntkdyn.parameter_space`
    returns), map over it: ``jax.vmap(f_lin, in_axes=(0, None))(params_t, x)``.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")

    def f_lin(params, x):
        delta = jax.tree_util.tree_map(lambda p, p0: p - p0, params, params0)
        f0, df = jax.jvp(lambda p: apply_fn(p, x), (params0,), (delta,))
        return f0 + df

    return f_lin
