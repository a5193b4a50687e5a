"""Your own data: a .npz with x_train, y_train, x_test, y_test (issue 12 item 2).

Oracles: the arrays written to the file (rows picked, labels one-hot by hand); every bad file is a
ValueError naming the array or the file; the file's content hash is part of a point's identity.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ntkdyn.experiments.cli import main
from ntkdyn.experiments.data import file_hash, load_dataset, npz, read_npz
from ntkdyn.experiments.sweep import SweepGrid, point_key, run_point


def write(path, **arrays):
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.standard_normal((10, 4, 3, 2)).astype(np.float32),
        "y_train": rng.integers(0, 3, 10),
        "x_test": rng.standard_normal((6, 4, 3, 2)).astype(np.float32),
        "y_test": rng.integers(0, 3, 6),
    }
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_labels_become_one_hot_rows_and_inputs_keep_their_shape(tmp_path):
    path = write(tmp_path / "d.npz", y_train=np.array([0, 2, 1, 0, 0, 2, 1, 1, 0, 2]),
                 y_test=np.array([3, 0, 0, 1, 2, 2]))
    raw = np.load(path)
    data = npz(path, 7, 5, dtype="float64")
    assert data.input_shape == (4, 3, 2) and data.in_features == 24 and data.num_outputs == 4  # K = max label + 1
    np.testing.assert_array_equal(data.x_train, raw["x_train"][:7])
    np.testing.assert_array_equal(data.y_train, np.eye(4)[raw["y_train"][:7]])
    np.testing.assert_array_equal(data.y_test, np.eye(4)[raw["y_test"][:5]])
    assert data.y_train.dtype == jnp.float64 and data.name == "npz:d.npz"
    assert load_dataset(str(path), 7, 5, dtype="float64").x_test.shape == (5, 4, 3, 2)


def test_regression_rows_are_used_as_stored(tmp_path):
    y = np.random.default_rng(1).standard_normal((10, 2))
    path = write(tmp_path / "r.npz", x_train=np.arange(30.0).reshape(10, 3), x_test=np.ones((6, 3)), y_train=y,
                 y_test=np.zeros((6, 2)))
    data = npz(path, 10, 6, dtype="float64")
    np.testing.assert_array_equal(data.y_train, y)
    assert data.input_shape == (3,)


def test_random_subset_is_seeded_nested_and_not_the_first_rows(tmp_path):
    path = write(tmp_path / "d.npz", x_train=np.arange(40.0).reshape(20, 2), y_train=np.zeros((20, 1)),
                 x_test=np.arange(12.0).reshape(6, 2), y_test=np.zeros((6, 1)))
    first = npz(path, 5, 3)
    np.testing.assert_array_equal(first.x_train[:, 0], [0, 2, 4, 6, 8])
    small, large = npz(path, 5, 3, subset="random", seed=4), npz(path, 9, 3, subset="random", seed=4)
    np.testing.assert_array_equal(small.x_train, large.x_train[:5])
    assert not np.array_equal(small.x_train, first.x_train)
    assert not np.array_equal(small.x_train, npz(path, 5, 3, subset="random", seed=5).x_train)
    assert len(np.unique(np.asarray(large.x_train[:, 0]))) == 9  # without replacement


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(y_test=None), r"data: .*d\.npz' has no array 'y_test'"),
        (dict(x_test=np.zeros((6, 4, 3, 1))), r"x_test: expected inputs of shape \(4, 3, 2\)"),
        (dict(y_train=np.zeros(9, dtype=int)), r"y_train: expected 10 rows"),
        (dict(y_train=np.zeros(10)), r"y_train: 1-D targets must be integer class labels"),
        (dict(y_train=np.full(10, -1)), r"y_train: class labels must be >= 0"),
        (dict(y_test=np.zeros((6, 3))), r"y_test: expected the same kind of targets"),
        (dict(y_train=np.zeros((10, 2)), y_test=np.zeros((6, 3))), r"y_test: expected 2 columns"),
        (dict(x_train=np.full((10, 4, 3, 2), np.nan)), r"x_train: 240 non-finite values"),
        (dict(y_train=np.r_[np.zeros((9, 2)), [[np.inf, 0]]], y_test=np.zeros((6, 2))), "y_train: 1 non-finite"),
        (dict(x_train=np.zeros(10)), r"x_train: expected a non-empty batch \(N, \.\.\.\) with at least one feature"),
        (dict(x_train=np.array(["a"] * 10)), "x_train: expected numeric inputs"),
    ],
)
def test_bad_files_name_the_array_and_the_file(tmp_path, arrays, match):
    path = write(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match) as err:
        read_npz(path)
    assert "d.npz" in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="data: no such file"):
        read_npz(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="data: .*bad.npz' is not a readable .npz"):
        read_npz(bad)


def test_more_rows_than_the_file_holds(tmp_path):
    path = write(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"n_train: .* has 10 rows in x_train, asked for 11"):
        npz(path, 11, 2)
    with pytest.raises(ValueError, match=r"n_test: .* has 6 rows in x_test, asked for 7"):
        npz(path, 2, 7)
    with pytest.raises(ValueError, match=r"samples: .* has 10 rows in x_train, asked for 12"):
        SweepGrid(dataset=str(path), samples=(4, 12), n_test=2).validate()
    with pytest.raises(ValueError, match=r"n_test: .* has 6 rows in x_test"):
        SweepGrid(dataset=str(path), samples=(4,), n_test=8).validate()


def test_sweep_grid_checks_against_the_file(tmp_path):
    path = write(tmp_path / "d.npz", y_train=np.zeros((10, 2)), y_test=np.zeros((6, 2)))
    with pytest.raises(ValueError, match="out_features: .* has 2 outputs"):
        SweepGrid(dataset=str(path), samples=(4,), n_test=2, out_features=3).validate()
    with pytest.raises(ValueError, match="y_train: loss='cross_entropy' needs rows of class probabilities"):
        SweepGrid(dataset=str(path), samples=(4,), n_test=2, loss="cross_entropy").validate()
    with pytest.raises(ValueError, match="subset: 'random' is for .npz data"):
        SweepGrid(samples=(4,), subset="random").validate()
    with pytest.raises(ValueError, match="dataset: expected one of .* or the path of a .npz"):
        SweepGrid(dataset="mnist").validate()


def test_config_records_path_and_content_hash_and_a_changed_file_is_a_new_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "d.npz", x_train=np.random.default_rng(2).standard_normal((10, 3)),
                 x_test=np.random.default_rng(3).standard_normal((6, 3)))
    grid = SweepGrid(dataset="d.npz", widths=(4,), samples=(6,), seeds=(0,), steps=5, n_test=4, num_records=3,
                     dtype="float64", depths=(1,))
    (config,) = grid.points()
    assert config["dataset"] == str(path.resolve()) and config["data_hash"] == file_hash(path)
    assert (config["in_features"], config["out_features"]) == (3, read_npz(path)["y_train"].shape[1])
    assert json.loads(json.dumps(config)) == config  # the point runs from this alone (test_families)

    write(path, x_train=np.random.default_rng(4).standard_normal((10, 3)),
          x_test=np.random.default_rng(3).standard_normal((6, 3)))
    (changed,) = grid.points()
    assert point_key(changed) != point_key(config)
    with pytest.raises(ValueError, match="data: .*d.npz' changed since this point was configured"):
        run_point(config)


def test_cli_bad_data_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["sweep", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data: no such file" in err[0] and "missing.npz" in err[0]
    assert not (tmp_path / "o").exists()
