"""The NTK method family: empirical kernels, the kernel operator, sketches.

``Θ(x, x') = J(x) J(x')ᵀ`` (full (N1, N2, K, K), or output-traced (N1, N2)),
computed tile by tile by one of the methods of the static table
:data:`METHODS` — ``"jacobian"``, ``"ntvp"``, ``"structured"``, ``"sketch"`` —
or ``"auto"``: the exact method of least estimated time at the largest tile
the memory budget allows (:mod:`.planner`). :func:`ntk_vp` applies Θ without
forming it.

Modules: :mod:`.empirical` (entry points), :mod:`.tiles` (jacobian, ntvp),
:mod:`.structured` (jaxpr reading, layer matching, Gram evaluation),
:mod:`.probes` / :mod:`.sketch` (random-probe and black-box kernels,
Jacobian restoring), :mod:`.operator` (``Θ v``), :mod:`.methods` (the table),
:mod:`.planner` (cost model, memory budget, plan cache), :mod:`.costs`
(shape-level model facts), :mod:`.tiling` (host-side tiles), :mod:`.layout`
(kernel forms), :mod:`.precision` (matmul precision of every traced body).
"""

from ntkdyn.kernels import layout, planner, sketch, structured
from ntkdyn.kernels.costs import TileCost, flat_param_count, jaxpr_cost
from ntkdyn.kernels.empirical import empirical_ntk, ntk_vp, output_shape, plan_ntk
from ntkdyn.kernels.layout import flatten_kernel
from ntkdyn.kernels.methods import METHODS, Method
from ntkdyn.kernels.planner import available_memory
from ntkdyn.kernels.sketch import (
    JacobianFit,
    Probes,
    blackbox_ntk,
    blackbox_probes,
    default_step,
    expected_squared_error,
    jvp_probes,
    kernel_from_probes,
    probe_directions,
    restore_jacobian,
    sketched_ntk,
)

__all__ = [
    "empirical_ntk",
    "ntk_vp",
    "plan_ntk",
    "output_shape",
    "flatten_kernel",
    "METHODS",
    "Method",
    "TileCost",
    "flat_param_count",
    "jaxpr_cost",
    "available_memory",
    "sketched_ntk",
    "blackbox_ntk",
    "jvp_probes",
    "blackbox_probes",
    "kernel_from_probes",
    "probe_directions",
    "default_step",
    "expected_squared_error",
    "restore_jacobian",
    "Probes",
    "JacobianFit",
    "layout",
    "planner",
    "sketch",
    "structured",
]
