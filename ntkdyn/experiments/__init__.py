"""The experiment harness: real training beside the NTK predictions, sweeps and reports.

One direction of flow, each module importing only those before it::

    data, families ─► train ─► compare ─► infinite_gaps ─► sweep ─► report ─► cli

* :mod:`~ntkdyn.experiments.data`: small local data sets and your own ``.npz``
  (:class:`Dataset`).
* :mod:`~ntkdyn.experiments.families`: network families ``family(width, *,
  seed, input_shape, out_features)``, built in (mlp, cnn, resmlp) or yours
  by import path (docs/own_models.md).
* :mod:`~ntkdyn.experiments.train`: real training with optax (MSE or
  cross-entropy; sgd, momentum, adam or any optax optimizer), one jitted scan
  (``train.train``, :class:`TrainResult`).
* :mod:`~ntkdyn.experiments.compare`: real training against Eq. 8/9/10 and
  against the linearized network trained the same way, as one jitted pure
  function returning a metrics pytree (``compare.compare``, several seeds in
  one vmapped call: ``compare.compare_seeds``; :class:`Comparison`).
* :mod:`~ntkdyn.experiments.infinite_gaps`: a point against the
  infinite-width limit (kernel error at θ₀, the Θ_∞ prediction's gaps to the
  eNTK prediction and to the real network, ±2σ band coverage).
* :mod:`~ntkdyn.experiments.sweep`: resumable, locked grids of comparisons
  (``sweep.sweep``, :class:`SweepGrid`), the only writer of ``results.jsonl``.
* :mod:`~ntkdyn.experiments.executors`: where a sweep's points run (in process,
  local worker processes, Ray, Slurm via submitit; :class:`Executor`).
* :mod:`~ntkdyn.experiments.report`: CSV tables, figures and ``report.md``
  from ``results.jsonl`` alone (:func:`write_report`).
* :mod:`~ntkdyn.experiments.cli`: the ``ntkdyn`` command.

The modules are exported under their own names and the functions that share a
module's name stay inside it (``experiments.train.train``), so no function
shadows a module. matplotlib, tqdm and scikit-learn are imported only inside
the functions that draw, show progress or read the digits.
"""

from ntkdyn.experiments import compare, data, executors, families, infinite_gaps, report, sweep, train
from ntkdyn.experiments.compare import Comparison
from ntkdyn.experiments.data import Dataset, load_dataset
from ntkdyn.experiments.report import write_report
from ntkdyn.experiments.sweep import SweepGrid, SweepOutcome, load_results
from ntkdyn.experiments.train import TrainResult

__all__ = [
    "data",
    "families",
    "train",
    "compare",
    "infinite_gaps",
    "sweep",
    "executors",
    "report",
    "Dataset",
    "load_dataset",
    "TrainResult",
    "Comparison",
    "SweepGrid",
    "SweepOutcome",
    "load_results",
    "write_report",
]
