"""ntkdyn: predict neural-network training from the Neural Tangent Kernel.

Layers, lowest first (each imports only those before it)::

    models ─► ntk ─► spectral ─► dynamics ─► predict
"""

from ntkdyn._version import __version__
from ntkdyn import models, spectral
from ntkdyn import curvature, implicit, sketch
from ntkdyn.curvature import spectrum_recorder
from ntkdyn.implicit import SolverNotConverged, aligned_loss, solver_layer
from ntkdyn.sketch import blackbox_ntk, restore_jacobian, sketched_ntk
from ntkdyn.dynamics import (
    UnstableLearningRateWarning,
    flatten_kernel,
    function_space,
    max_learning_rate,
    parameter_space,
)
from ntkdyn.linearize import linearize
from ntkdyn.ntk import empirical_ntk
from ntkdyn.predict import Prediction, predict
from ntkdyn.spectral import Spectrum

__all__ = [
    "__version__",
    "models",
    "spectral",
    "Spectrum",
    "empirical_ntk",
    "linearize",
    "function_space",
    "parameter_space",
    "max_learning_rate",
    "flatten_kernel",
    "UnstableLearningRateWarning",
    "predict",
    "Prediction",
    "curvature",
    "implicit",
    "sketch",
    "spectrum_recorder",
    "SolverNotConverged",
    "aligned_loss",
    "solver_layer",
    "blackbox_ntk",
    "restore_jacobian",
    "sketched_ntk",
]
