"""Small regression data sets for experiments, built locally (no network access).

* ``"synthetic"`` (default): inputs on the sphere ``‖x‖² = d`` (the input scale
  the NTK literature assumes), targets from a fixed random sum of sinusoids,
  standardized with the training statistics.
* ``"digits"``: scikit-learn's 8×8 handwritten digits (1797 images, shipped
  inside the scikit-learn package and read from disk), pixels standardized
  with the training statistics, targets the centered one-hot code
  ``e_c − 1/K`` (Lee et al. 2019 regress on centered one-hot labels too).
* a ``.npz`` file of your own (:func:`npz`): arrays ``x_train``, ``y_train``,
  ``x_test``, ``y_test``; inputs of any shape ``(N, ...)``, targets either
  ``(N, K)`` floats (used as they are) or ``(N,)`` integer class labels
  ``c ∈ {0 … K−1}``, which become one-hot rows ``e_c`` (K = the largest label
  in the file + 1; plain one-hot, not centered, so they are also valid
  cross-entropy targets). Nothing is rescaled.

Every loader returns a :class:`Dataset` with a train/test split chosen by
``seed``; the same arguments always give the same arrays. A new data source is
one function ``loader(n_train, n_test, *, seed, dtype, **options) -> Dataset``
added to :data:`DATASETS`.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate

__all__ = [
    "Dataset",
    "synthetic_regression",
    "digits",
    "npz",
    "read_npz",
    "is_npz",
    "file_hash",
    "load_dataset",
    "DATASETS",
    "SUBSETS",
    "NPZ_ARRAYS",
]


@struct.dataclass
class Dataset:
    """A train/test split. ``x_*`` (N, ...), ``y_*`` (N, K); ``name`` says which loader built it."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_outputs(self) -> int:
        return int(self.y_train.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``x_train.shape[1:]``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def in_features(self) -> int:
        """Numbers per input, ``prod(input_shape)`` (d for flat inputs)."""
        return int(math.prod(self.input_shape))


def _dtype(dtype):
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)


def synthetic_regression(
    n_train: int,
    n_test: int = 64,
    *,
    in_features: int = 8,
    out_features: int = 1,
    num_terms: int = 16,
    noise: float = 0.0,
    seed: int = 0,
    dtype=None,
) -> Dataset:
    """Random smooth regression task.

    ``x ~ Uniform(sphere of radius √d)``, and for ``k < K``::

        y_k(x) = Σ_j a_jk · sin(w_j · x / √d + b_j) + noise · ε,

    with ``w_j ~ N(0, I_d)``, ``b_j ~ U(0, 2π)``, ``a_jk ~ N(0, 1/J)`` drawn
    once from ``seed`` (J = ``num_terms``), ``ε ~ N(0, 1)``. Targets are
    shifted and scaled per output to mean 0 and variance 1 over the input
    distribution (estimated once on 4096 reference inputs), so the task does
    not depend on ``n_train``: the test set is the same for every
    ``n_train`` and smaller training sets are prefixes of larger ones.

    Returns:
      :class:`Dataset` with ``x_train`` (n_train, d), ``y_train`` (n_train, K),
      ``x_test`` (n_test, d), ``y_test`` (n_test, K), in ``dtype`` (default:
      JAX's default float).
    """
    n_train = _validate.count("n_train", n_train, 1)
    n_test = _validate.count("n_test", n_test, 1)
    d = _validate.count("in_features", in_features, 1)
    k = _validate.count("out_features", out_features, 1)
    terms = _validate.count("num_terms", num_terms, 1)
    noise = float(_validate.nonnegative_scalar("noise", noise))
    seed = _validate.count("seed", seed, 0)
    # separate streams: the task (teacher, test set, target scale) is the same
    # for every n_train, and training sets are nested prefixes of each other
    teacher = np.random.default_rng([seed, 0])
    w = teacher.standard_normal((d, terms))
    b = teacher.uniform(0.0, 2.0 * math.pi, terms)
    a = teacher.standard_normal((terms, k)) / math.sqrt(terms)

    def inputs(stream: int, count: int) -> np.ndarray:
        x = np.random.default_rng([seed, stream]).standard_normal((count, d))
        return x * (math.sqrt(d) / np.linalg.norm(x, axis=1, keepdims=True))

    def target(x: np.ndarray, stream: int) -> np.ndarray:
        clean = np.sin(x @ w / math.sqrt(d) + b) @ a
        return clean + noise * np.random.default_rng([seed, stream]).standard_normal(clean.shape)

    reference = np.sin(inputs(3, 4096) @ w / math.sqrt(d) + b) @ a
    mean = reference.mean(axis=0)
    std = np.sqrt(reference.var(axis=0) + noise**2)
    std = np.where(std > 0, std, 1.0)
    x_test, x_train = inputs(1, n_test), inputs(2, n_train)
    y_test = (target(x_test, 4) - mean) / std
    y_train = (target(x_train, 5) - mean) / std
    dt = _dtype(dtype)
    return Dataset(
        x_train=jnp.asarray(x_train, dt),
        y_train=jnp.asarray(y_train, dt),
        x_test=jnp.asarray(x_test, dt),
        y_test=jnp.asarray(y_test, dt),
        name="synthetic",
    )


def digits(
    n_train: int,
    n_test: int = 256,
    *,
    num_classes: int = 10,
    seed: int = 0,
    dtype=None,
    centered: bool = True,
) -> Dataset:
    """scikit-learn's 8×8 digits as a regression task (read from the installed package).

    Images of the first ``num_classes`` digits are shuffled with ``seed``;
    the first ``n_test`` form the test set (the same for every ``n_train``),
    the next ``n_train`` the training set; each of the 64 pixels is standardized with the training mean and
    standard deviation (pixels constant on the training set are only
    centered). Targets are centered one-hot codes ``e_c − 1/K``, K =
    ``num_classes``, so ``y`` rows sum to 0 (``centered=False``: plain one-hot
    ``e_c``, the class probabilities cross-entropy trains on).

    Returns:
      :class:`Dataset`: ``x_*`` (n, 64), ``y_*`` (n, num_classes).
    """
    n_train = _validate.count("n_train", n_train, 1)
    n_test = _validate.count("n_test", n_test, 1)
    num_classes = _validate.count("num_classes", num_classes, 2)
    if num_classes > 10:
        raise ValueError(f"num_classes: expected an integer in [2, 10], got {num_classes}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a test extra
        raise ImportError("digits: needs scikit-learn (pip install scikit-learn); it ships the data locally") from err
    # load_digits reads the csv bundled in sklearn/datasets/data: never the network
    x_all, labels = load_digits(n_class=num_classes, return_X_y=True)
    if n_train + n_test > x_all.shape[0]:
        raise ValueError(
            f"n_train + n_test: the {num_classes}-class digits set has {x_all.shape[0]} images, "
            f"asked for {n_train} + {n_test} = {n_train + n_test}"
        )
    # test images first, so the test set is the same for every n_train and
    # training sets are nested
    order = np.random.default_rng(_validate.count("seed", seed, 0)).permutation(x_all.shape[0])[: n_test + n_train]
    x = x_all[order].astype(np.float64)
    train = slice(n_test, n_test + n_train)
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    y = np.eye(num_classes)[labels[order]] - (1.0 / num_classes if centered else 0.0)
    dt = _dtype(dtype)
    return Dataset(
        x_train=jnp.asarray(x[train], dt),
        y_train=jnp.asarray(y[train], dt),
        x_test=jnp.asarray(x[:n_test], dt),
        y_test=jnp.asarray(y[:n_test], dt),
        name="digits",
    )


# --------------------------------------------------------------------------- #
# your own arrays: a .npz file
# --------------------------------------------------------------------------- #

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# how --samples picks the training rows of a file: its first N, or N drawn by a permutation from the data seed
SUBSETS = ("first", "random")


def is_npz(name) -> bool:
    """Whether the data-set name ``name`` is a path to a ``.npz`` file."""
    return isinstance(name, (str, os.PathLike)) and str(name).endswith(".npz")


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes, 16 hex digits: the identity of a data file in a sweep's configs."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The four arrays of a ``.npz`` data file, checked, targets as float (N, K) rows.

    Checks (ValueError naming the array and the file): the file exists and
    is a ``.npz``; it holds ``x_train, y_train, x_test, y_test``; inputs are
    numeric ``(N, ...)`` with at least one feature axis and the same trailing
    shape for train and test; targets are ``(N, K)`` numbers or ``(N,)``
    integer labels ``≥ 0`` (both splits the same kind and K); row counts match
    their inputs; no NaN or inf; no empty split. Integer labels become one-hot
    rows ``e_c``, K = largest label + 1 (at least 2).
    """
    where = str(path)
    if not Path(path).is_file():
        raise ValueError(f"data: no such file {where!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"data: {where!r} is not a readable .npz file ({' '.join(str(err).split())})") from err
    if not hasattr(archive, "files"):
        raise ValueError(f"data: {where!r} holds one array (a .npy); expected a .npz with {', '.join(NPZ_ARRAYS)}")
    with archive:
        found = list(archive.files)
        missing = [name for name in NPZ_ARRAYS if name not in found]
        if missing:
            raise ValueError(
                f"data: {where!r} has no array {', '.join(repr(m) for m in missing)} "
                f"(expected {', '.join(NPZ_ARRAYS)}; found {', '.join(found) or 'none'})"
            )
        arrays = {}
        for name in NPZ_ARRAYS:
            try:
                arrays[name] = np.asarray(archive[name])
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                raise ValueError(f"{name}: cannot read it from {where!r} ({' '.join(str(err).split())})") from err
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "biuf" or x.dtype.kind == "b":
            raise ValueError(f"x_{split}: expected numeric inputs, got dtype {x.dtype} in {where!r}")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"x_{split}: expected a non-empty batch (N, ...) with at least one feature axis, "
                f"got shape {x.shape} in {where!r}"
            )
        if y.ndim not in (1, 2) or y.dtype.kind not in "iuf" or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y_{split}: expected {x.shape[0]} rows (as x_{split}) of targets (N, K) or integer labels (N,), "
                f"got shape {y.shape}, dtype {y.dtype} in {where!r}"
            )
        if y.ndim == 1 and y.dtype.kind == "f":
            raise ValueError(
                f"y_{split}: 1-D targets must be integer class labels, got dtype {y.dtype} in {where!r}; "
                "give regression targets as an (N, K) array"
            )
        for name, arr in ((f"x_{split}", x), (f"y_{split}", y)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ValueError(f"{name}: {bad} non-finite values (NaN or inf) in {where!r}")
    x_train, x_test, y_train, y_test = (arrays[k] for k in ("x_train", "x_test", "y_train", "y_test"))
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"x_test: expected inputs of shape {x_train.shape[1:]} as in x_train, got {x_test.shape[1:]} in {where!r}"
        )
    if y_train.ndim != y_test.ndim:
        raise ValueError(
            f"y_test: expected the same kind of targets as y_train (labels (N,) or rows (N, K)), "
            f"got shapes {y_train.shape} and {y_test.shape} in {where!r}"
        )
    if y_train.ndim == 2:
        if y_test.shape[1] != y_train.shape[1] or y_train.shape[1] == 0:
            raise ValueError(
                f"y_test: expected {y_train.shape[1]} columns as in y_train, got {y_test.shape[1]} in {where!r}"
            )
        return {"x_train": x_train, "y_train": y_train.astype(np.float64), "x_test": x_test,
                "y_test": y_test.astype(np.float64)}
    for name, labels in (("y_train", y_train), ("y_test", y_test)):
        if labels.min() < 0:
            raise ValueError(f"{name}: class labels must be >= 0, got {labels.min()} in {where!r}")
    k = int(max(y_train.max(), y_test.max())) + 1
    if k < 2:
        raise ValueError(f"y_train: integer labels need at least two classes, got only label 0 in {where!r}")
    eye = np.eye(k)
    return {"x_train": x_train, "y_train": eye[y_train], "x_test": x_test, "y_test": eye[y_test]}


def npz(
    path: str | os.PathLike,
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    dtype=None,
    subset: str = "first",
    arrays: dict[str, np.ndarray] | None = None,
) -> Dataset:
    """Your own data from a ``.npz`` file (arrays and target convention in :func:`read_npz`).

    The training set is the first ``n_train`` rows of ``x_train``/``y_train``
    (``subset="first"``) or ``n_train`` rows drawn without replacement by a
    permutation from ``seed`` (``subset="random"``; smaller sets are prefixes
    of larger ones). The test set is the first ``n_test`` test rows, or
    ``n_test`` drawn by a permutation from another stream of ``seed``.
    Inputs and targets are cast to ``dtype`` and otherwise used as stored.
    ``arrays`` passes the result of :func:`read_npz` to skip reading the file.

    Returns:
      :class:`Dataset`: ``x_*`` (n, ...), ``y_*`` (n, K).
    """
    n_train = _validate.count("n_train", n_train, 1)
    n_test = _validate.count("n_test", n_test, 1)
    seed = _validate.count("seed", seed, 0)
    _validate.choice("subset", subset, SUBSETS)
    arrays = read_npz(path) if arrays is None else arrays
    picked = {}
    for split, count, stream in (("train", n_train, 0), ("test", n_test, 1)):
        available = arrays[f"x_{split}"].shape[0]
        if count > available:
            raise ValueError(
                f"n_{split}: {str(path)!r} has {available} rows in x_{split}, asked for {count}"
            )
        rows = (np.arange(count) if subset == "first"
                else np.random.default_rng([seed, stream]).permutation(available)[:count])
        picked[split] = rows
    dt = _dtype(dtype)
    return Dataset(
        x_train=jnp.asarray(arrays["x_train"][picked["train"]], dt),
        y_train=jnp.asarray(arrays["y_train"][picked["train"]], dt),
        x_test=jnp.asarray(arrays["x_test"][picked["test"]], dt),
        y_test=jnp.asarray(arrays["y_test"][picked["test"]], dt),
        name=f"npz:{Path(path).name}",
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": synthetic_regression,
    "digits": digits,
}


def load_dataset(name: str, n_train: int, n_test: int, *, seed: int = 0, dtype=None, **options) -> Dataset:
    """Build the data set ``name`` (one of :data:`DATASETS`, or a path to a ``.npz``) with the given split sizes."""
    if is_npz(name):
        return npz(name, n_train, n_test, seed=seed, dtype=dtype, **options)
    _validate.choice("dataset", name, DATASETS)
    return DATASETS[name](n_train, n_test, seed=seed, dtype=dtype, **options)
