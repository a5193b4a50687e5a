"""ntkdyn: predict neural-network training from the Neural Tangent Kernel.

Layers, lowest first (each imports only those before it)::

    models ─► ntk (+ structured, sketch) ─► spectral ─► dynamics ─► predict
    train ─► compare ─► sweep ─► report ─► cli
    companions: curvature, implicit (on top of ntk / dynamics)
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
from ntkdyn import structured  # registers method "structured" (ntk.py also loads it lazily)
from ntkdyn.ntk import TileCost, empirical_ntk, ntk_vp, plan_ntk
from ntkdyn.predict import Prediction, predict
from ntkdyn import data, momentum
from ntkdyn.compare import Comparison, compare
from ntkdyn.data import Dataset, digits, load_dataset, synthetic_regression
from ntkdyn.momentum import (
    heavy_ball_function_space,
    heavy_ball_max_learning_rate,
    heavy_ball_modes,
    heavy_ball_parameter_space,
)
from ntkdyn.report import write_report
from ntkdyn.sweep import SweepGrid, sweep
from ntkdyn.train import TrainResult, train
from ntkdyn.spectral import Spectrum

__all__ = [
    "__version__",
    "models",
    "spectral",
    "Spectrum",
    "empirical_ntk",
    "ntk_vp",
    "plan_ntk",
    "TileCost",
    "structured",
    "linearize",
    "function_space",
    "parameter_space",
    "max_learning_rate",
    "flatten_kernel",
    "UnstableLearningRateWarning",
    "predict",
    "Prediction",
    "data",
    "momentum",
    "Comparison",
    "compare",
    "Dataset",
    "digits",
    "load_dataset",
    "synthetic_regression",
    "heavy_ball_function_space",
    "heavy_ball_max_learning_rate",
    "heavy_ball_modes",
    "heavy_ball_parameter_space",
    "write_report",
    "SweepGrid",
    "sweep",
    "TrainResult",
    "train",
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
