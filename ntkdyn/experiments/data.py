"""Small regression data sets for experiments, built locally (no network access).

* ``"synthetic"`` (default): inputs on the sphere ``‖x‖² = d`` (the input scale
  the NTK literature assumes), targets from a fixed random sum of sinusoids,
  standardized with the training statistics.
* ``"digits"``: scikit-learn's 8×8 handwritten digits (1797 images, shipped
  inside the scikit-learn package and read from disk), pixels standardized
  with the training statistics, targets the centered one-hot code
  ``e_c − 1/K`` (Lee et al. 2019 regress on centered one-hot labels too).

Every loader returns a :class:`Dataset` with a train/test split chosen by
``seed``; the same arguments always give the same arrays. A new data source is
one function ``loader(n_train, n_test, *, seed, dtype, **options) -> Dataset``
added to :data:`DATASETS`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ntkdyn import _validate

__all__ = ["Dataset", "synthetic_regression", "digits", "load_dataset", "DATASETS"]


@struct.dataclass
class Dataset:
    """A train/test split. ``x_*`` (N, d), ``y_*`` (N, K); ``name`` says which loader built it."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_outputs(self) -> int:
        return int(self.y_train.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])


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
) -> Dataset:
    """scikit-learn's 8×8 digits as a regression task (read from the installed package).

    Images of the first ``num_classes`` digits are shuffled with ``seed``;
    the first ``n_test`` form the test set (the same for every ``n_train``),
    the next ``n_train`` the training set; each of the 64 pixels is standardized with the training mean and
    standard deviation (pixels constant on the training set are only
    centered). Targets are centered one-hot codes ``e_c − 1/K``, K =
    ``num_classes``, so ``y`` rows sum to 0.

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
    y = np.eye(num_classes)[labels[order]] - 1.0 / num_classes
    dt = _dtype(dtype)
    return Dataset(
        x_train=jnp.asarray(x[train], dt),
        y_train=jnp.asarray(y[train], dt),
        x_test=jnp.asarray(x[:n_test], dt),
        y_test=jnp.asarray(y[:n_test], dt),
        name="digits",
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": synthetic_regression,
    "digits": digits,
}


def load_dataset(name: str, n_train: int, n_test: int, *, seed: int = 0, dtype=None, **options) -> Dataset:
    """Build the data set ``name`` (one of :data:`DATASETS`) with the given split sizes."""
    _validate.choice("dataset", name, DATASETS)
    return DATASETS[name](n_train, n_test, seed=seed, dtype=dtype, **options)
