"""The NTK method family: one static table, name -> (tile, cost, ...).

No registration, no import side effects: this table is the whole family.
Each :class:`Method` names

* ``tile(model, params, x1, x2, *, trace_outputs, same, precision, **options)``,
  one ``(N1, N2[, K, K])`` block of the kernel;
* ``cost(model, params, x1, x2, trace_outputs, **cost_options)`` on abstract
  values (shapes only) -> :class:`~ntkdyn.kernels.costs.TileCost`, or None when
  the method cannot analyse the model;
* ``applies(model, params, x1, x2)`` (optional): a probe on concrete values
  that must pass before ``method="auto"`` picks it;
* ``exact``: whether ``method="auto"`` may pick it (approximate methods are
  used only when asked for);
* ``options``: the keywords ``tile`` accepts, and ``cost_options`` those of
  them the cost depends on (hashable values).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Mapping

from ntkdyn.kernels import probes, structured, tiles

__all__ = ["Method", "METHODS", "AUTO"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One NTK method (see the module docstring)."""

    tile: Callable
    cost: Callable
    exact: bool = True
    applies: Callable | None = None
    options: tuple[str, ...] = ()
    cost_options: tuple[str, ...] = ()


METHODS: Mapping[str, Method] = types.MappingProxyType(
    {
        "jacobian": Method(tiles.jacobian_tile, tiles.jacobian_cost),
        "ntvp": Method(tiles.ntvp_tile, tiles.ntvp_cost),
        "structured": Method(
            structured.structured_tile, structured.structured_cost, applies=structured.rows_independent
        ),
        "sketch": Method(
            probes.sketch_tile,
            probes.sketch_cost,
            exact=False,
            options=("n_probes", "key", "seed", "distribution", "probe_batch_size"),
            cost_options=("n_probes", "probe_batch_size"),
        ),
    }
)

# the methods method="auto" chooses between, in a fixed order
AUTO = tuple(sorted(name for name, m in METHODS.items() if m.exact))
