"""ntkdyn: predict neural-network training from the Neural Tangent Kernel.

The core API (this namespace)::

    models ─► kernels ─► spectral ─► dynamics ─► prediction
    (adapters,  (empirical NTK,  (eigh, per-mode   (one closed-form    (predict,
     builders)   operator)        functions)        solver)             Prediction)

Subpackages: :mod:`ntkdyn.kernels` (the NTK method family), :mod:`ntkdyn.krylov`
(matrix-free predictions at any N, sharded), :mod:`ntkdyn.infinite` (analytic
infinite-width NNGP/NTK and ensemble predictions), :mod:`ntkdyn.experiments`
(data, training, comparison, sweeps, reports, the ``ntkdyn`` command; imported on
first use so that ``import ntkdyn`` never loads matplotlib, tqdm or scikit-learn),
and the companions :mod:`ntkdyn.curvature` and :mod:`ntkdyn.implicit`.
"""

from ntkdyn._version import __version__
from ntkdyn import curvature, dynamics, implicit, infinite, kernels, krylov, models, spectral
from ntkdyn.dynamics import UnstableLearningRateWarning, function_space, max_learning_rate, parameter_space
from ntkdyn.implicit import SolverNotConverged
from ntkdyn.krylov import KrylovConvergenceWarning
from ntkdyn.kernels import empirical_ntk, ntk_vp
from ntkdyn.linearization import linearize
from ntkdyn.prediction import Prediction, predict
from ntkdyn.spectral import Spectrum

__all__ = [
    "__version__",
    # core API
    "empirical_ntk",
    "ntk_vp",
    "linearize",
    "function_space",
    "parameter_space",
    "max_learning_rate",
    "predict",
    "Prediction",
    "Spectrum",
    "UnstableLearningRateWarning",
    "KrylovConvergenceWarning",
    "SolverNotConverged",
    # subpackages and modules
    "models",
    "kernels",
    "infinite",
    "krylov",
    "spectral",
    "dynamics",
    "curvature",
    "implicit",
    "experiments",
]


def __getattr__(name: str):
    # the experiments layer (and its plotting/progress dependencies) loads on first use
    if name == "experiments":
        import importlib

        return importlib.import_module("ntkdyn.experiments")
    raise AttributeError(f"module 'ntkdyn' has no attribute {name!r}")
