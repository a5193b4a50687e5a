"""Grids of :func:`ntkdyn.experiments.compare.compare` runs, resumable point by point.

A :class:`SweepGrid` is the product width × training-set size × seed (and
depth, learning rate, activation, parameterization when more than one is
given). :func:`sweep` runs every point of it and appends each finished point
to ``<out>/results.jsonl`` at once (one JSON object per line, flushed and
fsynced), keyed by a hash of its full configuration. Running again with the
same folder skips the finished points, so an interrupted sweep (Ctrl-C,
``kill -9``) loses at most the point that was running.

The results folder is safe to share:

* a sweep holds an exclusive ``fcntl.flock`` on ``<out>/.ntkdyn-sweep.lock``
  for its whole lifetime; a second sweep on the same folder waits for it (or
  refuses, ``wait=False``), so no point is computed twice;
* every append starts on a fresh line, so a torn line left by a killed or
  foreign writer never swallows the next record;
* the start-up repair (torn lines, malformed or duplicate records) runs only
  under the lock, writes through a symlinked ``results.jsonl`` and keeps its
  file mode; the lines it takes out are moved to ``results.rejected.jsonl``,
  never deleted;
* a record counts only if its ``key`` is the hash of its ``config``, its config
  has the fields and ``record_version`` of this version (records of another
  schema stay in the file but are counted separately, never merged) and values
  a grid can produce, and its metrics and curves are well formed.

Each line holds ``key``, the full ``config`` (with ``record_version``: a
folder written by an earlier version is recomputed, never misread), the
library ``version``, the scalar ``metrics`` of :meth:`Comparison.summary`
plus the infinite-width ``inf_*`` metrics of
:mod:`ntkdyn.experiments.infinite_gaps` (NaN where they do not apply, and
``infinite_note`` says why), short ``curves`` at the recorded steps,
``timings`` (seconds spent building data and model, JAX tracing +
compilation, and running — the infinite-width comparison included, its
share also in ``infinite_seconds``) and ``seconds``. Non-finite numbers (a
diverging linearized model) are written as the strings ``"inf"``, ``"-inf"``,
``"nan"`` so every line is strict JSON.

This is the only module that loops over configurations, and :func:`sweep` is
the only writer of the results folder: points are computed by an executor
(:mod:`ntkdyn.experiments.executors`: in process, local worker processes, Ray,
Slurm) and handed back to the driver, which appends them as they arrive. A
point that fails (on a worker or here) is appended to ``failures.jsonl`` with
its error and a traceback summary, never to ``results.jsonl``, so the next run
retries it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from ntkdyn import _validate, models
from ntkdyn._version import __version__
from ntkdyn.dynamics import UnstableLearningRateWarning
from ntkdyn.experiments import families
from ntkdyn.experiments.data import DATASETS, SUBSETS, Dataset, file_hash, is_npz, load_dataset, read_npz
from ntkdyn.experiments.families import MODEL_FAMILIES
from ntkdyn.experiments.train import LOSSES, OPTIMIZERS, make_optimizer, probability_rows
from ntkdyn.experiments.executors import Executor, failure_record, resolve_executor, run_points

__all__ = [
    "SweepGrid",
    "SweepOutcome",
    "RESULTS_FILE",
    "REJECTED_FILE",
    "FAILURES_FILE",
    "LOCK_FILE",
    "CONFIG_FIELDS",
    "RECORD_VERSION",
    "MODEL_FAMILIES",
    "ResultsWarning",
    "ResultsLocked",
    "sweep",
    "run_point",
    "run_seed_group",
    "run_points_batched",
    "seed_groups",
    "point_key",
    "load_results",
    "prepare_output",
    "results_lock",
]

RESULTS_FILE = "results.jsonl"
REJECTED_FILE = "results.rejected.jsonl"
FAILURES_FILE = "failures.jsonl"  # one line per failed attempt (error, traceback summary, worker); never read back
LOCK_FILE = ".ntkdyn-sweep.lock"
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class ResultsWarning(UserWarning):
    """``results.jsonl`` holds lines that were left out (torn, malformed, another schema)."""


class ResultsLocked(RuntimeError):
    """Another sweep holds the results folder's lock (raised with ``wait=False``)."""


# --------------------------------------------------------------------------- #
# the grid
# --------------------------------------------------------------------------- #


def _tuple(name: str, values, kind) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = (values,)
    values = tuple(values)
    if not values:
        raise ValueError(f"{name}: expected at least one value, got an empty list (the grid would be empty)")
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"{name}: expected integers, got {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))):
            raise ValueError(f"{name}: expected numbers, got {v!r}")
        if kind is str and not isinstance(v, str):
            raise ValueError(f"{name}: expected strings, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct values, got {list(values)}")
    return tuple(kind(v) for v in values)


# every point's configuration has exactly these fields (their types: int, number, bool, str)
_INT_FIELDS = ("n_train", "n_test", "data_seed", "in_features", "out_features", "width", "depth", "seed", "steps",
               "num_records", "batch_size", "record_version")
_NUMBER_FIELDS = ("sigma_w", "sigma_b", "learning_rate", "momentum")
_BOOL_FIELDS = ("lr_relative",)
_STR_FIELDS = ("dataset", "data_hash", "subset", "model", "model_hash", "activation", "parameterization", "optimizer",
               "loss", "time", "dtype")
# family keywords (families.OPTIONS) a family may not take: the grid's default, and what its configs then record
_UNUSED_OPTIONS = {"depth": (2, 0), "activation": ("erf", ""), "parameterization": ("ntk", ""),
                   "sigma_w": (1.5, 0.0), "sigma_b": (0.05, 0.0)}
CONFIG_FIELDS = frozenset(_INT_FIELDS + _NUMBER_FIELDS + _BOOL_FIELDS + _STR_FIELDS)
# what a record of this version holds; part of every config (so of every key): a folder written by an
# earlier version is recomputed, its lines kept and counted as another schema, never read as this one.
# 2: the infinite-width metrics (inf_*, ntkdyn.experiments.infinite_gaps), infinite_note, infinite_seconds
RECORD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """The configurations of a sweep (every field is validated by :meth:`validate`).

    Attributes:
      widths: hidden widths (≥ 1).
      samples: training-set sizes N (≥ 1).
      seeds: network-initialization seeds (≥ 0); the data are fixed by ``data_seed``.
      depths: numbers of hidden layers (≥ 1; blocks of ``resmlp``, convolutions of ``cnn``).
      learning_rates: η (> 0); multiples of the stability limit
        ``2(1+β)n/λ_max`` of each point's Θ₀ when ``lr_relative``.
      activations, parameterizations: see :mod:`ntkdyn.models`.
      dataset: ``"synthetic"``, ``"digits"`` or the path of a ``.npz`` with
        ``x_train, y_train, x_test, y_test`` (:mod:`ntkdyn.experiments.data`;
        configs record its absolute path and content hash).
      n_test: test-set size.
      subset: which rows of a ``.npz`` ``samples`` takes: ``"first"`` N, or
        ``"random"`` (a permutation from ``data_seed``).
      model: the network family (:mod:`ntkdyn.experiments.families`): ``"mlp"``
        (default), ``"cnn"``, ``"resmlp"``, ``"path/file.py:NAME"``,
        ``"package.module:NAME"`` or a top-level function; configs record
        its import path and source hash. Options the family does not take
        (``depths``, ``activations``, ``parameterizations``) must stay at
        their defaults and are recorded as 0 / ``""``.
      optimizer: ``"sgd"`` (GD; heavy ball when ``momentum`` > 0, recorded
        as ``"momentum"``), ``"momentum"`` or ``"adam"``; the real and the
        linearized network are trained with it.
      batch_size: minibatch size B ≤ min(samples), None or 0 for full batch
        (minibatch order from the point's seed, shared by both trainings).
      loss: ``"mse"`` or ``"cross_entropy"`` (classification data: digits, or a
        ``.npz`` with integer labels or probability rows; no closed form).
      steps: real training steps per point; num_records: recorded steps (log-spaced).
      time: prediction clock, ``"discrete"`` or ``"continuous"``.
      momentum: heavy-ball β in [0, 1) (real and predicted).
      data_seed: seed of the data set (shared by all points).
      in_features, out_features: synthetic input dimension and outputs; for
        ``"digits"`` in_features is 64 and out_features the number of classes
        (2 … 10; the default 1 means all 10).
      dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
    """

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    samples: tuple[int, ...] = (8, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    depths: tuple[int, ...] = (2,)
    learning_rates: tuple[float, ...] = (1.0,)
    lr_relative: bool = False
    activations: tuple[str, ...] = ("erf",)
    parameterizations: tuple[str, ...] = ("ntk",)
    dataset: str = "synthetic"
    n_test: int = 32
    steps: int = 500
    num_records: int = 16
    time: str = "discrete"
    momentum: float = 0.0
    data_seed: int = 0
    in_features: int = 8
    out_features: int = 1
    dtype: str = "float32"
    model: Any = "mlp"
    optimizer: str = "sgd"
    batch_size: int | None = None
    loss: str = "mse"
    subset: str = "first"

    def validate(self) -> "SweepGrid":
        """Check every field; returns a normalized copy (tuples, ints, floats). Raises ValueError."""
        widths = _tuple("widths", self.widths, int)
        samples = _tuple("samples", self.samples, int)
        seeds = _tuple("seeds", self.seeds, int)
        depths = _tuple("depths", self.depths, int)
        lrs = _tuple("learning_rates", self.learning_rates, float)
        activations = _tuple("activations", self.activations, str)
        params = _tuple("parameterizations", self.parameterizations, str)
        for name, values, lo in (("widths", widths, 1), ("samples", samples, 1), ("seeds", seeds, 0), ("depths", depths, 1)):
            bad = [v for v in values if v < lo]
            if bad:
                raise ValueError(f"{name}: expected integers >= {lo}, got {bad}")
        bad = [v for v in lrs if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"learning_rates: expected finite values > 0, got {bad}")
        bad = [a for a in activations if a not in models.ACTIVATIONS]
        if bad:
            raise ValueError(f"activations: expected names from {sorted(models.ACTIVATIONS)}, got {bad}")
        bad = [p for p in params if p not in models.PARAMETERIZATIONS]
        if bad:
            raise ValueError(f"parameterizations: expected names from {list(models.PARAMETERIZATIONS)}, got {bad}")
        if not is_npz(self.dataset) and self.dataset not in DATASETS:
            raise ValueError(
                f"dataset: expected one of {sorted(DATASETS)} or the path of a .npz file, got {self.dataset!r}"
            )
        for name in ("n_test", "steps", "num_records", "data_seed", "in_features", "out_features"):
            value = getattr(self, name)
            lo = {"steps": 1, "num_records": 2, "data_seed": 0}.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        if self.time not in ("discrete", "continuous"):
            raise ValueError(f"time: expected 'discrete' or 'continuous', got {self.time!r}")
        if isinstance(self.momentum, bool) or not (
            isinstance(self.momentum, (int, float, np.integer, np.floating)) and 0.0 <= self.momentum < 1.0
        ):
            raise ValueError(f"momentum: expected a float in [0, 1), got {self.momentum!r}")
        if self.momentum > 0 and self.time != "discrete":
            raise ValueError("time: heavy-ball momentum is only defined in discrete time, got 'continuous'")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                "dtype: 'float64' needs 64-bit JAX; enable it first with "
                "jax.config.update('jax_enable_x64', True) (the CLI's --x64 does this)"
            )
        in_features, out_features = int(self.in_features), int(self.out_features)
        if self.dataset == "digits":
            in_features = 64
            if out_features == 1:  # the synthetic default: use all ten digits
                out_features = 10
            if not 2 <= out_features <= 10:
                raise ValueError(f"out_features: digits has 2 to 10 classes, got {out_features}")
            available = _digits_count(out_features)
            worst = max(samples) + int(self.n_test)
            if worst > available:
                raise ValueError(
                    f"samples: the {out_features}-class digits set has {available} images; "
                    f"max(samples) + n_test = {worst} does not fit"
                )
        dataset = self.dataset
        if is_npz(dataset):
            dataset, in_features, out_features = _check_npz(dataset, samples, int(self.n_test), out_features,
                                                            self.loss)
        _validate.choice("subset", self.subset, SUBSETS)
        if self.subset != "first" and not is_npz(dataset):
            raise ValueError(f"subset: {self.subset!r} is for .npz data; {dataset} has its own seeded split")
        model, _ = families.resolve(self.model)
        unused = set(_UNUSED_OPTIONS) - families.accepted_options(families.load(model))
        for name, values in (("depths", depths), ("activations", activations), ("parameterizations", params)):
            option = name[:-1] if name != "depths" else "depth"
            if option in unused and values != (_UNUSED_OPTIONS[option][0],):
                raise ValueError(f"{name}: the model family {model!r} takes no {option}= keyword, got {list(values)}")
        optimizer = _check_optimizer(self.optimizer, float(self.momentum))
        _validate.choice("loss", self.loss, LOSSES)
        if self.loss == "cross_entropy" and dataset == "synthetic":
            raise ValueError("loss: cross_entropy needs classification data (digits or a .npz with class labels), "
                             "got the synthetic regression task")
        batch_size = 0 if self.batch_size is None else self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not (
            0 <= batch_size <= min(samples)
        ):
            raise ValueError(
                f"batch_size: expected None/0 (full batch) or an integer in [1, min(samples)={min(samples)}], "
                f"got {self.batch_size!r}"
            )
        return dataclasses.replace(
            self, widths=widths, samples=samples, seeds=seeds, depths=depths, learning_rates=lrs,
            activations=activations, parameterizations=params, n_test=int(self.n_test), steps=int(self.steps),
            num_records=int(self.num_records), data_seed=int(self.data_seed), in_features=in_features,
            out_features=out_features, momentum=float(self.momentum), lr_relative=bool(self.lr_relative),
            dataset=dataset, model=model, optimizer=optimizer, batch_size=int(batch_size),
        )

    def points(self) -> list[dict]:
        """Every point's full configuration, in run order.

        Seeds vary slowest, then N, learning rate, architecture, width: an
        interrupted sweep has whole width series for the first seeds.
        """
        g = self.validate()
        model, model_hash = families.resolve(g.model)
        unused = set(_UNUSED_OPTIONS) - families.accepted_options(families.load(model, model_hash))
        data_hash = file_hash(g.dataset) if is_npz(g.dataset) else ""
        out = []
        for seed, n, lr, depth, act, par, width in itertools.product(
            g.seeds, g.samples, g.learning_rates, g.depths, g.activations, g.parameterizations, g.widths
        ):
            config = {
                "dataset": g.dataset,
                "data_hash": data_hash,
                "subset": g.subset,
                "n_train": n,
                "n_test": g.n_test,
                "data_seed": g.data_seed,
                "in_features": g.in_features,
                "out_features": g.out_features,
                "width": width,
                "depth": depth,
                "activation": act,
                "parameterization": par,
                "sigma_w": 1.5,
                "sigma_b": 0.05,
                "seed": seed,
                "learning_rate": lr,
                "lr_relative": g.lr_relative,
                "momentum": g.momentum,
                "steps": g.steps,
                "num_records": g.num_records,
                "time": g.time,
                "dtype": g.dtype,
                "model": model,
                "model_hash": model_hash,
                "optimizer": g.optimizer,
                "batch_size": g.batch_size,
                "loss": g.loss,
                "record_version": RECORD_VERSION,
            }
            config.update({name: _UNUSED_OPTIONS[name][1] for name in unused})
            out.append(config)
        return out


def _check_optimizer(optimizer: str, momentum: float) -> str:
    """The optimizer's recorded name: plain ``"sgd"`` with β > 0 is heavy ball, recorded as ``"momentum"``."""
    _validate.choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd" and momentum > 0:
        return "momentum"
    make_optimizer(optimizer, 1.0, momentum)  # ValueError naming momentum when the optimizer cannot take it
    return optimizer


def _check_npz(path, samples: tuple[int, ...], n_test: int, out_features: int, loss: str) -> tuple[str, int, int]:
    """``(absolute path, in_features, out_features)`` of a .npz data set, checked against the grid."""
    path = Path(path).expanduser().resolve()
    arrays = read_npz(path)
    n_available, k = arrays["x_train"].shape[0], arrays["y_train"].shape[1]
    if max(samples) > n_available:
        raise ValueError(f"samples: {str(path)!r} has {n_available} rows in x_train, asked for {max(samples)}")
    if n_test > arrays["x_test"].shape[0]:
        raise ValueError(f"n_test: {str(path)!r} has {arrays['x_test'].shape[0]} rows in x_test, asked for {n_test}")
    if out_features not in (1, k):
        raise ValueError(f"out_features: {str(path)!r} has {k} outputs per target, got {out_features}")
    if loss == "cross_entropy":
        probability_rows("y_train", arrays["y_train"])
    return str(path), int(math.prod(arrays["x_train"].shape[1:])), int(k)


def _digits_count(num_classes: int) -> int:
    from sklearn.datasets import load_digits  # local file, read in a few ms

    return int(load_digits(n_class=num_classes).target.shape[0])


def point_key(config: dict) -> str:
    """Stable id of a configuration: sha256 of its canonical JSON, 16 hex digits."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- #
# records: encoding and checking
# --------------------------------------------------------------------------- #


# the metrics the report reads from every record (Comparison.summary always writes them)
_REQUIRED_METRICS = ("train_gap", "test_gap", "eq8_test_gap", "lin_consistency", "weight_gap", "kernel_drift",
                     "loss_initial", "loss_final", "loss_lin_final", "learning_rate", "max_learning_rate",
                     "lr_ratio", "linear_diverged", "real_diverged")


def _encode(obj):
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _encode(np.asarray(obj).tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, str) and obj in _NON_FINITE:
        return _NON_FINITE[obj]
    return obj


def _is_number(v) -> bool:
    """An int or float that converts to a float (a 400-digit integer does not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


# the least value of every integer field a grid can produce (depth 0: a family without depth=)
_INT_MINIMUM = {"n_train": 1, "n_test": 1, "data_seed": 0, "in_features": 1, "out_features": 1, "width": 1,
                "depth": 0, "seed": 0, "steps": 1, "num_records": 2, "batch_size": 0}
_INT_LIMIT = 2**63  # JAX/NumPy seeds and sizes are 64-bit


def _config_ok(config: dict) -> bool:
    """Whether ``config`` has the types and values :meth:`SweepGrid.points` gives (its key is checked apart).

    A hand-edited or foreign record with width 0, a 400-digit width, η ≤ 0 or
    an unknown dtype is not a point any grid runs, and would break or mislead
    the report.
    """
    if not (all(isinstance(config[k], int) and not isinstance(config[k], bool) for k in _INT_FIELDS)
            and all(_is_number(config[k]) for k in _NUMBER_FIELDS)
            and all(isinstance(config[k], bool) for k in _BOOL_FIELDS)
            and all(isinstance(config[k], str) for k in _STR_FIELDS)):
        return False
    if not all(lo <= config[k] < _INT_LIMIT for k, lo in _INT_MINIMUM.items()):
        return False
    if config["batch_size"] > config["n_train"]:
        return False
    lr, momentum = float(config["learning_rate"]), float(config["momentum"])
    if not (math.isfinite(lr) and lr > 0 and 0.0 <= momentum < 1.0):
        return False
    if not all(math.isfinite(float(config[k])) for k in ("sigma_w", "sigma_b")):
        return False
    choices = {"time": ("discrete", "continuous"), "dtype": ("float32", "float64"), "loss": LOSSES,
               "optimizer": OPTIMIZERS, "subset": SUBSETS, "activation": (*models.ACTIVATIONS, ""),
               "parameterization": (*models.PARAMETERIZATIONS, "")}
    return all(config[k] in allowed for k, allowed in choices.items())


def _curves_ok(curves) -> bool:
    """``steps`` (non-negative integers) and curves that are lists of numbers (the report draws a curve only
    where it has one value per step)."""
    if not isinstance(curves, dict) or not isinstance(curves.get("steps"), list):
        return False
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in curves["steps"]):
        return False
    return all(isinstance(v, list) and all(_is_number(x) for x in v) for v in curves.values())


def _classify(rec) -> str:
    """``"ok"``, ``"schema"`` (config of another version), ``"mismatch"`` (key ≠ hash of config) or ``"malformed"``.

    ``rec`` is a decoded JSON value. A record is of this schema when its
    config has exactly the fields of this version and its ``record_version``
    (an earlier or later version's record is never read as this one's). It is
    ok when its key is the hash of its config, the config is one a grid
    produces (types and ranges), the metrics are numbers (booleans for the
    flags), the curves are lists of numbers beside integer ``steps``, and the
    text and timing fields have their types.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("config"), dict):
        return "malformed"
    config = rec["config"]
    if set(config) != CONFIG_FIELDS or config["record_version"] != RECORD_VERSION:
        return "schema"
    if point_key(config) != rec["key"]:
        return "mismatch"
    metrics = rec.get("metrics")
    if not _config_ok(config) or not isinstance(metrics, dict):
        return "malformed"
    if not all(isinstance(metrics.get(k), bool) for k in ("linear_diverged", "real_diverged")):
        return "malformed"
    if not isinstance(metrics.get("closed_form", True), bool):
        return "malformed"
    if not all(_is_number(v) or isinstance(v, bool) for v in metrics.values()):
        return "malformed"
    if not all(k in metrics for k in _REQUIRED_METRICS):
        return "malformed"
    if not _curves_ok(rec.get("curves")):
        return "malformed"
    timings = rec.get("timings", {})
    if not _is_number(rec.get("seconds", 0.0)) or not isinstance(timings, dict) or not all(
        _is_number(v) for v in timings.values()
    ):
        return "malformed"
    if not all(isinstance(rec.get(k, ""), str) for k in ("version", "infinite_note")):
        return "malformed"
    return "ok"


@dataclasses.dataclass
class _Scan:
    """One pass over ``results.jsonl``: the usable records and what was left out."""

    records: list[dict]  # decoded, first valid record of each key, in file order
    keep: list[bytes]  # raw lines a repair keeps: the records above and other-schema records
    reject: list[bytes]  # raw lines a repair moves to REJECTED_FILE
    counts: dict[str, int]  # torn, malformed, mismatch, duplicate, schema
    clean: bool  # nothing to repair (every line kept, file ends with a newline)
    size: int = 0  # bytes read


def _read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (missing = empty).

    OSError for anything else: a folder (EISDIR), a FIFO or device (which
    would block or never end), no permission.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        return b""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _scan(path: Path) -> _Scan:
    """Read ``path`` (missing = empty). OSError (not a regular file, no permission) propagates."""
    raw = _read_regular(path)
    counts = dict.fromkeys(("torn", "malformed", "mismatch", "duplicate", "schema"), 0)
    records, keep, reject, seen = [], [], [], set()
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = _decode(json.loads(line))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, an integer of over 4300 digits, deep nesting
            counts["torn"] += 1
            reject.append(line)
            continue
        kind = _classify(rec)
        if kind == "ok" and rec["key"] in seen:
            kind = "duplicate"
        if kind == "ok":
            seen.add(rec["key"])
            records.append(rec)
        if kind != "ok":
            counts[kind] += 1
        (keep if kind in ("ok", "schema") else reject).append(line)
    clean = not reject and (not raw or raw.endswith(b"\n")) and raw.count(b"\n") == len(keep)
    return _Scan(records, keep, reject, counts, clean, len(raw))


def _left_out(path: Path, counts: dict[str, int]) -> str | None:
    """One sentence saying which lines of ``path`` were left out, or None."""
    what = {"torn": "torn or unparseable", "malformed": "malformed", "mismatch": "with a key that does not match "
            "their config", "duplicate": "duplicate", "schema": "of another schema (config fields differ; kept in "
            "the file, not counted)"}
    parts = [f"{n} {what[k]}" for k, n in counts.items() if n]
    if not parts:
        return None
    total = sum(counts.values())
    return f"{path}: left out {total} line{'s' if total != 1 else ''}: " + ", ".join(parts)


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read ``results.jsonl`` (a folder or the file itself); one dict per finished point, read-only.

    Records are checked (see the module docstring): torn lines, malformed
    records, records whose key does not match their config, duplicates and
    records of another schema are left out, with ONE :class:`ResultsWarning`
    counting them. OSError (e.g. the path is a folder, unreadable) propagates.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    scan = _scan(path)
    message = _left_out(path, scan.counts)
    if message:
        warnings.warn(message, ResultsWarning, stacklevel=2)
    return scan.records


# --------------------------------------------------------------------------- #
# the results folder: lock, append, repair
# --------------------------------------------------------------------------- #


def _read_only(path: str | os.PathLike) -> bool:
    """Whether ``path`` may not be written: no write permission, or all its write bits off.

    The mode bits are honoured even for root (who may write anyway), so a
    folder or file a user marked read-only is never changed.
    """
    return not os.access(path, os.W_OK) or not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def prepare_output(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check it is a writable folder (ValueError otherwise).

    Refused: an empty path, an existing file, a folder or ``results.jsonl``
    that is read-only (:func:`_read_only`), a ``results.jsonl`` that is not a
    regular file, or a symlink to a file in a folder that does not exist.
    """
    if str(out).strip() == "":
        raise ValueError(f"out: expected a folder path, got {str(out)!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a folder, got the existing file {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if _read_only(out):
            raise PermissionError(errno.EACCES, "the folder is read-only")
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"out: cannot write results to {str(out)!r} ({err.strerror or err})") from err
    results = out / RESULTS_FILE
    if results.exists() and not results.is_file():
        raise ValueError(f"out: {str(results)!r} exists and is not a regular file")
    if results.exists() and _read_only(results):
        raise ValueError(f"out: {str(results)!r} exists and is read-only")
    if results.is_symlink() and not results.exists():
        target = Path(os.path.realpath(results))
        if not target.parent.is_dir():
            raise ValueError(f"out: {str(results)!r} is a symlink to {str(target)!r}, whose folder does not exist")
    return out


@contextlib.contextmanager
def results_lock(out: str | os.PathLike, *, wait: bool = True, on_wait: Callable[[str], None] | None = None):
    """Hold the exclusive ``flock`` of the results folder ``out`` for the ``with`` block.

    The lock file (``.ntkdyn-sweep.lock``) stays in the folder; the lock dies
    with the process, so a killed sweep never leaves the folder locked. When
    another process holds it: ``wait=False`` raises :class:`ResultsLocked`;
    otherwise ``on_wait(message)`` is called once (default: the message goes
    to stderr) and the call blocks until the lock is free.
    """
    import fcntl  # POSIX; imported here so the package imports everywhere

    lock_path = Path(out) / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise ResultsLocked(
                    f"out: {str(out)!r} is in use by another sweep (lock {str(lock_path)!r}); "
                    "run again without --no-wait to queue behind it, or use another folder"
                ) from None
            message = f"ntkdyn sweep: {out} is in use by another sweep; waiting for it to finish ..."
            if on_wait is None:
                print(message, file=sys.stderr, flush=True)
            else:
                on_wait(message)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        if written <= 0:  # pragma: no cover - os.write raises on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = data[written:]


def _append(path: Path, record: dict) -> None:
    """Append one record as a line that starts on a fresh line, then fsync.

    A foreign writer may have left a torn line (no newline at the end): the
    record is then preceded by a newline. If such a fragment lands between the
    check and the write, the record is written again on a fresh line, so it is
    never glued to someone else's bytes.
    """
    line = (json.dumps(_encode(record), sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for _ in range(8):
            size = os.fstat(fd).st_size
            lead = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
            _write_all(fd, lead + line)
            start = os.lseek(fd, 0, os.SEEK_CUR) - len(line)
            if start == 0 or os.pread(fd, 1, start - 1) == b"\n":
                break
        os.fsync(fd)
    finally:
        os.close(fd)


def _repair(path: Path, scan: _Scan) -> bool:
    """Rewrite ``path`` with ``scan.keep`` only (call with the folder's lock held); whether it did.

    The rejected lines are appended to ``REJECTED_FILE`` first (nothing is
    lost if the process dies in between). The new file replaces the real file
    behind a symlink, atomically, with the old file's mode (and owner, when
    permitted). If the file is no longer the one scanned (a writer that does
    not take the lock appended to it), nothing is replaced and False is
    returned: the unusable lines stay, and every reader skips them anyway.
    """
    real = Path(os.path.realpath(path))
    info = os.stat(real)

    def unchanged() -> bool:
        now = os.stat(real)
        return (now.st_ino, now.st_size) == (info.st_ino, scan.size)

    if not unchanged():
        return False
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=".results-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in scan.keep))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(info.st_mode))
        with contextlib.suppress(OSError):
            os.chown(tmp, info.st_uid, info.st_gid)
        if scan.reject:
            rejected = path.parent / REJECTED_FILE
            fd = os.open(rejected, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _write_all(fd, b"".join(line + b"\n" for line in scan.reject))
                os.fsync(fd)
            finally:
                os.close(fd)
        if not unchanged():
            os.unlink(tmp)
            return False
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


# --------------------------------------------------------------------------- #
# one point
# --------------------------------------------------------------------------- #


def _dataset(config: dict, cache: dict) -> Dataset:
    """The point's data set (shared through ``cache``); a .npz must still hash to ``config["data_hash"]``."""
    c = config
    key = (c["dataset"], c["data_hash"], c["subset"], c["n_train"], c["n_test"], c["data_seed"], c["in_features"],
           c["out_features"], c["dtype"], c["loss"])
    if key not in cache:
        if is_npz(c["dataset"]):
            digest = file_hash(c["dataset"])
            if digest != c["data_hash"]:
                raise ValueError(
                    f"data: {c['dataset']!r} changed since this point was configured (hash {digest}, recorded "
                    f"{c['data_hash']}); changed data is a new point: run the sweep again to configure it"
                )
            arrays = cache.get(("npz", c["dataset"], digest))
            if arrays is None:
                arrays = cache[("npz", c["dataset"], digest)] = read_npz(c["dataset"])
            options = {"subset": c["subset"], "arrays": arrays}
        elif c["dataset"] == "synthetic":
            options = {"in_features": c["in_features"], "out_features": c["out_features"]}
        else:  # digits: centered one-hot codes for MSE, plain one-hot (class probabilities) for cross-entropy
            options = {"num_classes": c["out_features"], "centered": c["loss"] != "cross_entropy"}
        cache[key] = load_dataset(c["dataset"], c["n_train"], c["n_test"], seed=c["data_seed"], dtype=c["dtype"],
                                  **options)
    return cache[key]


def _network(config: dict, data: Dataset) -> tuple[Any, Any]:
    """``(Model, θ₀)`` of the point's family at its width and seed (the family's source must still match)."""
    family = families.load(config["model"], config["model_hash"])
    options = {name: config[name] for name in families.OPTIONS}
    return families.build(family, config["width"], seed=config["seed"], input_shape=data.input_shape,
                          out_features=data.num_outputs, options=options)


@contextlib.contextmanager
def _compile_clock() -> Iterator[Callable[[], float]]:
    """Seconds JAX spends tracing, lowering and compiling inside the block.

    Read from ``jax.monitoring`` time spans; nested spans (a jitted function
    traced inside another) are counted once, as the union of the intervals.
    """
    spans: list[tuple[float, float]] = []

    def listen(event: str, start: float, end: float, **_):
        if event.startswith("/jax/core/compile/"):
            spans.append((start, end))

    def seconds() -> float:
        total, reach = 0.0, -math.inf
        for start, end in sorted(spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    jax.monitoring.register_event_time_span_listener(listen)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_time_span_listener(listen)


def _compare_options(config: dict) -> dict:
    """The keyword arguments of :func:`~ntkdyn.experiments.compare.compare` that a config fixes (all but the seed)."""
    from ntkdyn.experiments.train import default_record_steps

    return dict(
        steps=config["steps"], learning_rate=config["learning_rate"], lr_relative=config["lr_relative"],
        record_at=default_record_steps(config["steps"], config["num_records"]), time=config["time"],
        momentum=config["momentum"], batch_size=config["batch_size"] or None, optimizer=config["optimizer"],
        loss=config["loss"],
    )


def _record(config: dict, result, timings: dict[str, float], limit=None, **extra) -> dict:
    """The results line of one point from its :class:`~ntkdyn.experiments.compare.Comparison`.

    ``limit``: the point's :class:`~ntkdyn.experiments.infinite_gaps.InfiniteGaps`
    (its ``inf_*`` metrics and curves, and ``infinite_note``).
    """
    metrics = result.summary()
    if limit is not None:
        metrics.update(limit.summary())
    steps = np.asarray(result.steps)
    test, lt = result.test, result.lin_trained
    curves = {
        "steps": steps,
        "loss": np.asarray(result.loss.train)[steps],
        "test_loss": result.loss.test,
        "loss_lin_trained": np.asarray(lt.loss)[steps],
        "test_loss_lin_trained": lt.test_loss,
        "lin_trained_train_gap": lt.train_gap,
        "lin_trained_test_gap": lt.test_gap,
    }
    if result.closed_form:  # the closed-form columns exist only where Eq. 8/9/10 describe the training
        cons = np.asarray(result.train.consistency)
        if test is not None:
            cons = np.maximum(cons, np.asarray(test.consistency))
        curves.update({
            "loss_lin": np.asarray(result.loss.train_lin)[steps],
            "test_loss_lin": result.loss.test_lin,
            "train_gap": result.train.gap,
            "test_gap": None if test is None else test.gap,
            "lin_consistency": cons,
            "eq8_train_gap": result.train.eq8_gap,
            "eq8_test_gap": None if test is None else test.eq8_gap,
            "weight_gap": result.weights.gap,
        })
    if limit is not None:
        curves.update(limit.curves())
        extra["infinite_note"] = limit.note
    return {
        "key": point_key(config),
        "config": config,
        "version": __version__,
        "jax_version": jax.__version__,
        "metrics": metrics,
        "curves": {k: v for k, v in curves.items() if v is not None},
        "timings": timings,
        "seconds": sum(timings.values()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def run_point(config: dict, data_cache: dict | None = None) -> dict:
    """Run :func:`ntkdyn.experiments.compare.compare` for one configuration; return its results record.

    A pure function of the JSON configuration (top level, picklable: workers
    call it with configs shipped from the driver). ``data_cache`` (a dict)
    lets the points of one sweep share data sets. The record's ``timings``:
    ``setup`` (data and model), ``compile`` (JAX tracing and compilation; 0
    when the architecture and shapes were seen before), ``run`` (the rest of
    the comparison, results on the host).
    """
    from ntkdyn.experiments.compare import compare

    cache = {} if data_cache is None else data_cache
    tic = time.perf_counter()
    data = _dataset(config, cache)
    model, params0 = _network(config, data)
    setup = time.perf_counter() - tic
    with _compile_clock() as compile_seconds, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableLearningRateWarning)
        result = compare(model, params0, data.x_train, data.y_train, x_test=data.x_test, y_test=data.y_test,
                         seed=config["seed"], **_compare_options(config))
        result.summary()  # waits for the device
        (limit,), inf_seconds = _limits([(model, params0)], [result], data, cache)
    seconds, compiled = time.perf_counter() - tic, compile_seconds()
    return _record(config, result, {"setup": setup, "compile": compiled, "run": seconds - setup - compiled}, limit,
                   infinite_seconds=inf_seconds)


def _limits(members, results, data: Dataset, cache: dict) -> tuple[list, float]:
    """Each comparison against the infinite-width limit (:mod:`ntkdyn.experiments.infinite_gaps`); seconds taken
    (compilation included).

    The analytic kernels (and the ensemble, for a shared η) are computed once
    per architecture and data set and kept in ``cache``. These metrics are an
    addition to the comparison: if they fail, the point keeps its record with
    them NaN and the error in ``infinite_note``.
    """
    from ntkdyn.experiments.infinite_gaps import infinite_gaps, unavailable

    tic = time.perf_counter()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableLearningRateWarning)  # above the limit: inf gaps, as compare
        for (model, params0), result in zip(members, results):
            try:
                limit = infinite_gaps(result, model, params0, data.x_train, data.y_train, x_test=data.x_test,
                                      y_test=data.y_test, cache=cache)
            except Exception as err:  # noqa: BLE001 - the comparison's record must not be lost to its addition
                limit = unavailable(f"failed: {type(err).__name__}: {err}")
            out.append(limit)
    return out, time.perf_counter() - tic


def _without_seed(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def seed_groups(configs: Iterable[dict], max_size: int = 8) -> list[list[dict]]:
    """``configs`` grouped into runs of at most ``max_size`` points that differ only in their seed.

    Groups keep the order of their first point; within a group, the order of
    ``configs``. Each group is one :func:`run_seed_group` call.
    """
    max_size = _validate.count("max_size", max_size, 1)
    groups: dict[str, list[dict]] = {}
    for config in configs:
        groups.setdefault(_without_seed(config), []).append(config)
    return [group[i:i + max_size] for group in groups.values() for i in range(0, len(group), max_size)]


def run_seed_group(configs: list[dict], data_cache: dict | None = None) -> list[dict]:
    """The records of points that differ only in their seed, from one compiled, vmapped call.

    Every network is built, then :func:`ntkdyn.experiments.compare.compare_seeds`
    trains and compares them together (real and linearized training, kernels
    and solves batched over the initializations), so S seeds cost less than S
    points. Each record equals :func:`run_point`'s for its config to float
    round-off; its ``timings`` are the group's divided by S and it carries
    ``seed_batch = S``. Raises ValueError when the configs differ in more than
    the seed or the family cannot be batched (another graph per seed), and
    whatever a point raises; :func:`run_points_batched` then runs them one by one.
    """
    from ntkdyn.experiments.compare import compare_seeds

    configs = list(configs)
    if not configs or len({_without_seed(c) for c in configs}) != 1:
        raise ValueError("configs: expected points that differ only in their seed")
    if len(configs) == 1:
        return [run_point(configs[0], data_cache)]
    cache = {} if data_cache is None else data_cache
    tic = time.perf_counter()
    data = _dataset(configs[0], cache)
    members = [_network(c, data) for c in configs]
    setup = time.perf_counter() - tic
    with _compile_clock() as compile_seconds, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableLearningRateWarning)
        results = compare_seeds(members, data.x_train, data.y_train, x_test=data.x_test, y_test=data.y_test,
                                seeds=[c["seed"] for c in configs], **_compare_options(configs[0]))
        for result in results:
            result.summary()  # waits for the device
        limits, inf_seconds = _limits(members, results, data, cache)
    seconds, compiled = time.perf_counter() - tic, compile_seconds()
    size = len(configs)
    timings = {"setup": setup / size, "compile": compiled / size, "run": (seconds - setup - compiled) / size}
    return [_record(c, r, dict(timings), limit, seed_batch=size, infinite_seconds=inf_seconds / size)
            for c, r, limit in zip(configs, results, limits)]


def run_points_batched(
    configs: Iterable[dict], data_cache: dict | None = None, *, max_seeds: int = 8
) -> Iterator[tuple[dict, dict | None, BaseException | None]]:
    """Run ``configs`` in process with seed batching: ``(config, record, None)`` or ``(config, None, error)``.

    Points that differ only in their seed run as one :func:`run_seed_group`
    call (at most ``max_seeds`` at a time); a group that cannot be batched or
    fails is run again point by point with :func:`run_point`, so every point
    gets its own record or its own error. Groups come back in the order of
    their first point, all of a group's points together.
    """
    data_cache = {} if data_cache is None else data_cache
    for group in seed_groups(configs, max_seeds):
        try:
            records = run_seed_group(group, data_cache) if len(group) > 1 else None
        except Exception:  # noqa: BLE001 - rerun one by one: each point gets its own record or error
            records = None
        if records is not None:
            yield from ((c, r, None) for c, r in zip(group, records))
            continue
        for config in group:
            try:
                record = run_point(config, data_cache)
            except Exception as err:  # noqa: BLE001 - one bad point must not end the sweep
                yield config, None, err
            else:
                yield config, record, None


# --------------------------------------------------------------------------- #
# the sweep
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class SweepOutcome:
    """What one call of :func:`sweep` did.

    ``records``: every usable finished point in the folder (this grid's and
    earlier ones'); ``left_out``: lines of ``results.jsonl`` that are not
    counted at the end (by kind: torn, malformed, mismatch, duplicate,
    schema); ``moved_aside``: unusable lines the start-up repair moved to
    ``results.rejected.jsonl`` (by kind).
    """

    out: Path
    total: int
    skipped: int
    ran: int
    failed: list[tuple[dict, str]]
    records: list[dict]
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)
    moved_aside: dict[str, int] = dataclasses.field(default_factory=dict)


def sweep(grid: SweepGrid, out: str | os.PathLike, *, progress: bool = False, wait: bool = True,
          executor: Executor | str | None = None) -> SweepOutcome:
    """Run every point of ``grid`` not yet in ``<out>/results.jsonl``; append each as it finishes.

    The grid and the folder are checked before any work (ValueError for an
    empty or invalid grid, an unwritable folder). The folder's lock is held
    from before reading the results until the last append: a second sweep on
    the same folder waits (a message on stderr) or, with ``wait=False``,
    raises :class:`ResultsLocked` without touching anything. The points run
    on ``executor`` and come back to this process, the only writer, which
    appends each as it arrives. A point that raises (here or on a worker) is
    reported in ``failed`` and appended to ``failures.jsonl`` (error and
    traceback summary), not to ``results.jsonl``, so the next run retries it;
    Ctrl-C stops at once, cancels the queued and running points and loses
    only those. OSError while writing (disk full) propagates; the lines
    already written stay.

    Args:
      grid: the configurations.
      out: results folder (created if needed).
      progress: show a tqdm bar that advances per point.
      wait: wait for another sweep holding the folder (default) or raise.
      executor: where the points run: an :class:`~ntkdyn.experiments.executors.Executor`,
        a kind name (``"local"``, ``"ray"``, ``"slurm"``, ``"submitit-local"``) or
        None (in this process, one after another). Checked before any work.
    """
    if not isinstance(grid, SweepGrid):
        raise TypeError(f"grid: expected a SweepGrid, got {type(grid).__name__}")
    points = grid.validate().points()
    executor = resolve_executor(executor)
    out = prepare_output(out)
    path = out / RESULTS_FILE
    failed: list[tuple[dict, str]] = []
    with results_lock(out, wait=wait):
        scan = _scan(path)
        moved_aside = {}
        if not scan.clean and path.exists() and _repair(path, scan):
            moved_aside = {k: n for k, n in scan.counts.items() if n and k != "schema"}
        done = {r["key"] for r in scan.records}
        todo = [c for c in points if point_key(c) not in done]
        skipped = len(points) - len(todo)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(points), initial=skipped, unit="point", dynamic_ncols=True)
        try:
            for result in run_points(todo, executor, out=out):
                config = result.config
                if result.record is None:
                    failed.append((config, result.error))
                    _append(out / FAILURES_FILE, failure_record(result))
                else:
                    _append(path, result.record)
                if bar is not None:
                    bar.set_postfix_str(
                        f"width={config['width']} N={config['n_train']} seed={config['seed']} "
                        f"lr={config['learning_rate']:g}{'×limit' if config['lr_relative'] else ''}"
                    )
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        final = _scan(path)
    return SweepOutcome(
        out=out, total=len(points), skipped=skipped, ran=len(todo) - len(failed), failed=failed,
        records=final.records, left_out={k: v for k, v in final.counts.items() if v}, moved_aside=moved_aside,
    )
