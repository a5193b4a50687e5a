"""Grids of :func:`ntkdyn.compare.compare` runs, resumable point by point.

A :class:`SweepGrid` is the product width × training-set size × seed (and
depth, learning rate, activation, parameterization when more than one is
given). :func:`sweep` runs every point of it and appends each finished point
to ``<out>/results.jsonl`` at once (one JSON object per line, flushed and
fsynced), keyed by a hash of its full configuration. Running again with the
same folder skips the finished points, so an interrupted sweep (Ctrl-C,
``kill -9``) loses at most the point that was running; a torn last line is
dropped on the next start.

Each line holds ``key``, the full ``config``, the library ``version``, the
scalar ``metrics`` of :meth:`Comparison.summary`, short ``curves`` at the
recorded steps, per-phase ``timings`` and ``seconds``. Non-finite numbers
(a diverging linearized model) are written as the strings ``"inf"``,
``"-inf"``, ``"nan"`` so every line is strict JSON.

This is the only module that loops over configurations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np

from ntkdyn import models
from ntkdyn._version import __version__
from ntkdyn.data import DATASETS, Dataset, load_dataset
from ntkdyn.dynamics import UnstableLearningRateWarning

__all__ = [
    "SweepGrid",
    "SweepOutcome",
    "RESULTS_FILE",
    "sweep",
    "run_point",
    "point_key",
    "load_results",
    "prepare_output",
]

RESULTS_FILE = "results.jsonl"
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


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


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """The configurations of a sweep (every field is validated by :meth:`validate`).

    Attributes:
      widths: hidden widths (≥ 1).
      samples: training-set sizes N (≥ 1).
      seeds: network-initialization seeds (≥ 0); the data are fixed by ``data_seed``.
      depths: numbers of hidden layers (≥ 1).
      learning_rates: η (> 0); multiples of the stability limit
        ``2(1+β)n/λ_max`` of each point's Θ₀ when ``lr_relative``.
      activations, parameterizations: see :mod:`ntkdyn.models`.
      dataset: ``"synthetic"`` or ``"digits"`` (:mod:`ntkdyn.data`).
      n_test: test-set size.
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
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {self.dataset!r}")
        for name in ("n_test", "steps", "num_records", "data_seed", "in_features", "out_features"):
            value = getattr(self, name)
            lo = {"steps": 1, "num_records": 2, "data_seed": 0}.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        if self.time not in ("discrete", "continuous"):
            raise ValueError(f"time: expected 'discrete' or 'continuous', got {self.time!r}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
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
        return dataclasses.replace(
            self, widths=widths, samples=samples, seeds=seeds, depths=depths, learning_rates=lrs,
            activations=activations, parameterizations=params, n_test=int(self.n_test), steps=int(self.steps),
            num_records=int(self.num_records), data_seed=int(self.data_seed), in_features=in_features,
            out_features=out_features, momentum=float(self.momentum), lr_relative=bool(self.lr_relative),
        )

    def points(self) -> list[dict]:
        """Every point's full configuration, in run order.

        Seeds vary slowest, then N, learning rate, architecture, width: an
        interrupted sweep has whole width series for the first seeds.
        """
        g = self.validate()
        out = []
        for seed, n, lr, depth, act, par, width in itertools.product(
            g.seeds, g.samples, g.learning_rates, g.depths, g.activations, g.parameterizations, g.widths
        ):
            out.append({
                "dataset": g.dataset,
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
            })
        return out


def _digits_count(num_classes: int) -> int:
    from sklearn.datasets import load_digits  # local file, read in a few ms

    return int(load_digits(n_class=num_classes).target.shape[0])


def point_key(config: dict) -> str:
    """Stable id of a configuration: sha256 of its canonical JSON, 16 hex digits."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- #
# results file
# --------------------------------------------------------------------------- #


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


def load_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Read ``results.jsonl`` (a folder or the file itself); one dict per finished point.

    Lines that do not parse (a write torn by ``kill -9``) and repeated keys
    are skipped. With ``repair=True`` the file is rewritten atomically
    without them, so later appends start on a clean line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, seen, dirty = [], set(), not raw.endswith(b"\n") and bool(raw)
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            dirty = True
            continue
        if not isinstance(rec, dict) or "key" not in rec or "config" not in rec or rec["key"] in seen:
            dirty = True
            continue
        seen.add(rec["key"])
        records.append(rec)
    if repair and dirty:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return [_decode(r) for r in records]


def _append(path: Path, record: dict) -> None:
    line = json.dumps(_encode(record), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def prepare_output(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check it is a writable folder (ValueError otherwise)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a folder, got the existing file {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"out: cannot write results to {str(out)!r} ({err.strerror or err})") from err
    results = out / RESULTS_FILE
    if results.exists() and not os.access(results, os.W_OK):
        raise ValueError(f"out: {str(results)!r} exists and is not writable")
    return out


# --------------------------------------------------------------------------- #
# one point
# --------------------------------------------------------------------------- #


class _Cache:
    """Per-sweep reuse: one apply_fn per architecture (so jit caches hit across
    seeds and sample counts) and one data set per (N, data settings)."""

    def __init__(self):
        self.apply_fns: dict[tuple, Any] = {}
        self.data: dict[tuple, Dataset] = {}

    def dataset(self, c: dict) -> Dataset:
        key = (c["dataset"], c["n_train"], c["n_test"], c["data_seed"], c["in_features"], c["out_features"], c["dtype"])
        if key not in self.data:
            options = (
                {"in_features": c["in_features"], "out_features": c["out_features"]}
                if c["dataset"] == "synthetic"
                else {"num_classes": c["out_features"]}
            )
            self.data[key] = load_dataset(
                c["dataset"], c["n_train"], c["n_test"], seed=c["data_seed"], dtype=c["dtype"], **options
            )
        return self.data[key]

    def model(self, c: dict, in_features: int, out_features: int):
        from flax import nnx

        arch = dict(
            width=c["width"], depth=c["depth"], activation=c["activation"],
            parameterization=c["parameterization"], sigma_w=c["sigma_w"], sigma_b=c["sigma_b"],
        )
        module = models.MLP(in_features, out_features, rngs=nnx.Rngs(c["seed"]), dtype=c["dtype"], **arch)
        apply_fn, params = models.as_apply_fn(module)
        key = (in_features, out_features, c["dtype"], *sorted(arch.items()))
        # every module of one architecture shares the graph: keep the first apply_fn
        return self.apply_fns.setdefault(key, apply_fn), params


def run_point(config: dict, cache: _Cache | None = None) -> dict:
    """Run :func:`ntkdyn.compare.compare` for one configuration; return its results record."""
    from ntkdyn.compare import compare
    from ntkdyn.train import default_record_steps

    cache = cache or _Cache()
    tic = time.perf_counter()
    data = cache.dataset(config)
    apply_fn, params0 = cache.model(config, data.in_features, data.num_outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableLearningRateWarning)
        result = compare(
            apply_fn, params0, data.x_train, data.y_train,
            steps=config["steps"], learning_rate=config["learning_rate"], lr_relative=config["lr_relative"],
            x_test=data.x_test, y_test=data.y_test,
            record_at=default_record_steps(config["steps"], config["num_records"]),
            time=config["time"], momentum=config["momentum"],
        )
    steps = np.asarray(result.steps)
    cons = np.asarray(result.lin_consistency_train)
    if result.lin_consistency_test is not None:
        cons = np.maximum(cons, np.asarray(result.lin_consistency_test))
    curves = {
        "steps": steps,
        "loss": np.asarray(result.loss)[steps],
        "loss_lin": np.asarray(result.loss_lin)[steps],
        "test_loss": result.test_loss,
        "test_loss_lin": result.test_loss_lin,
        "train_gap": result.train_gap,
        "test_gap": result.test_gap,
        "lin_consistency": cons,
        "eq8_train_gap": result.eq8_train_gap,
        "eq8_test_gap": result.eq8_test_gap,
        "weight_gap": result.weight_gap,
    }
    return {
        "key": point_key(config),
        "config": config,
        "version": __version__,
        "jax_version": jax.__version__,
        "metrics": result.summary(),
        "curves": {k: v for k, v in curves.items() if v is not None},
        "timings": dict(result.timings),
        "seconds": time.perf_counter() - tic,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- #
# the sweep
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class SweepOutcome:
    """What one call of :func:`sweep` did. ``records``: every finished point in the folder."""

    out: Path
    total: int
    skipped: int
    ran: int
    failed: list[tuple[dict, str]]
    records: list[dict]


def sweep(grid: SweepGrid, out: str | os.PathLike, *, progress: bool = False) -> SweepOutcome:
    """Run every point of ``grid`` not yet in ``<out>/results.jsonl``; append each as it finishes.

    The grid and the folder are checked before any work (ValueError for an
    empty or invalid grid, an unwritable folder). A point that raises is
    reported in ``failed`` and not written, so the next run retries it;
    Ctrl-C stops at once and loses only the running point.

    Args:
      grid: the configurations.
      out: results folder (created if needed).
      progress: show a tqdm bar that advances per point.
    """
    if not isinstance(grid, SweepGrid):
        raise TypeError(f"grid: expected a SweepGrid, got {type(grid).__name__}")
    points = grid.validate().points()
    out = prepare_output(out)
    path = out / RESULTS_FILE
    done = {r["key"] for r in load_results(path, repair=True)}
    todo = [c for c in points if point_key(c) not in done]
    skipped = len(points) - len(todo)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), initial=skipped, unit="point", dynamic_ncols=True)
    cache = _Cache()
    failed: list[tuple[dict, str]] = []
    try:
        for config in todo:
            if bar is not None:
                bar.set_postfix_str(
                    f"width={config['width']} N={config['n_train']} seed={config['seed']} "
                    f"lr={config['learning_rate']:g}{'×limit' if config['lr_relative'] else ''}"
                )
            try:
                record = run_point(config, cache)
            except Exception as err:  # noqa: BLE001 - one bad point must not end the sweep
                failed.append((config, f"{type(err).__name__}: {err}"))
            else:
                _append(path, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SweepOutcome(
        out=out, total=len(points), skipped=skipped, ran=len(todo) - len(failed), failed=failed,
        records=load_results(path),
    )
