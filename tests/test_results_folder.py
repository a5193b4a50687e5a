"""The results folder never loses or double-counts a point (issue 13 items 9-10).

Most tests replace the computation of a point by a fabricated record (the
folder logic does not care how a record was made), so they run in
milliseconds; the concurrency test runs real sweeps in subprocesses.
"""

import fcntl
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ntkdyn.experiments import sweep as sweep_module
from ntkdyn.experiments.cli import main
from ntkdyn.experiments.sweep import (
    LOCK_FILE,
    REJECTED_FILE,
    RESULTS_FILE,
    ResultsLocked,
    ResultsWarning,
    SweepGrid,
    load_results,
    point_key,
    results_lock,
    sweep,
)

ROOT = Path(__file__).resolve().parents[1]
GRID = SweepGrid(widths=(8, 16), samples=(4,), seeds=(0, 1), steps=5, n_test=4, num_records=3)


def fake_record(config: dict, **metrics) -> dict:
    """A well-formed record for ``config`` (what run_point returns, with made-up numbers)."""
    values = {
        "train_gap": 0.01, "test_gap": 0.02, "eq8_test_gap": 0.03, "lin_consistency": 1e-7, "weight_gap": 0.1,
        "kernel_drift": 0.05, "loss_initial": 1.0, "loss_final": 0.1, "loss_lin_final": 0.1,
        "learning_rate": config["learning_rate"], "max_learning_rate": 2.0, "lr_ratio": config["learning_rate"] / 2,
        "linear_diverged": False, "real_diverged": False,
    }
    values.update(metrics)
    return {
        "key": point_key(config), "config": config, "version": "test", "metrics": values,
        "curves": {"steps": [0, 2, 5], "loss": [1.0, 0.5, 0.1], "loss_lin": [1.0, 0.5, 0.1],
                   "test_loss": [1.0, 0.7, 0.6], "test_loss_lin": [1.0, 0.7, 0.6]},
        "timings": {"setup": 0.0, "compile": 0.0, "run": 0.0}, "seconds": 0.0,
    }


def line(record: dict) -> str:
    """One strict-JSON line, non-finite numbers as strings (the results.jsonl convention)."""
    def enc(v):
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and abs(v) == float("inf"):
            return "inf" if v > 0 else "-inf"
        return v

    return json.dumps(enc(record), sort_keys=True) + "\n"


@pytest.fixture
def fake_points(monkeypatch):
    """Points computed instantly; ``calls`` lists the configs that were computed."""
    calls = []

    def run_point(config, data_cache=None):
        calls.append(config)
        return fake_record(config)

    monkeypatch.setattr(sweep_module, "run_point", run_point)
    return calls


def keys_in_file(path: Path) -> list[str]:
    """Keys of the well-formed records in the file, with repeats (a strict reader, independent of the library)."""
    keys = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("config"), dict) and rec.get("key") == point_key(rec["config"]):
            keys.append(rec["key"])
    return keys


def all_keys(grid=GRID) -> set[str]:
    return {point_key(c) for c in grid.points()}


# --------------------------------------------------------------------------- #
# appends and repair
# --------------------------------------------------------------------------- #


def test_a_torn_line_from_another_writer_never_swallows_the_next_record(tmp_path, monkeypatch):
    """Today a record appended after a torn fragment is glued to it and lost (11 of 12 points)."""
    out = tmp_path / "run"
    path = out / RESULTS_FILE

    def run_point(config, data_cache=None):
        with open(path, "ab") as fh:  # another writer dies mid-line while this point runs
            fh.write(b'{"key": "0123456789abcdef", "config": {"wid')
        return fake_record(config)

    monkeypatch.setattr(sweep_module, "run_point", run_point)
    with pytest.warns(ResultsWarning, match="4 torn"):
        outcome = sweep(GRID, out)
        assert len(load_results(out)) == 4
    assert outcome.ran == 4 and len(outcome.records) == 4 and outcome.left_out == {"torn": 4}
    assert sorted(keys_in_file(path)) == sorted(all_keys())


def test_repair_moves_bad_lines_aside_and_keeps_mode_and_symlink(tmp_path, fake_points):
    """Today the repair rewrites results.jsonl with mode 0600 and replaces a symlink by a regular file."""
    out, elsewhere = tmp_path / "run", tmp_path / "storage"
    out.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "real-results.jsonl"
    first, second = GRID.points()[:2]
    target.write_text(line(fake_record(first)) + '{"torn": tr\n' + line(fake_record(first)) + line(fake_record(second))[:40])
    os.chmod(target, 0o664)
    (out / RESULTS_FILE).symlink_to(target)

    outcome = sweep(GRID, out)
    assert outcome.skipped == 1 and outcome.ran == 3 and outcome.left_out == {}
    assert outcome.moved_aside == {"torn": 2, "duplicate": 1}
    assert (out / RESULTS_FILE).is_symlink() and os.path.realpath(out / RESULTS_FILE) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
    assert sorted(keys_in_file(target)) == sorted(all_keys())
    # nothing deleted: the torn lines and the duplicate are kept aside
    rejected = (out / REJECTED_FILE).read_text().splitlines()
    assert len(rejected) == 3 and rejected[0] == '{"torn": tr'


def test_resume_recomputes_a_record_whose_key_does_not_match_its_config(tmp_path, fake_points):
    """Today resume trusts the key, so the real point is never computed."""
    out = tmp_path / "run"
    out.mkdir()
    a, b = GRID.points()[:2]
    lying = {**fake_record(b), "key": point_key(a)}  # claims to be point a
    (out / RESULTS_FILE).write_text(line(lying))
    outcome = sweep(GRID, out)
    assert outcome.skipped == 0 and outcome.ran == 4
    assert a in fake_points
    by_key = {r["key"]: r for r in outcome.records}
    assert by_key[point_key(a)]["config"] == a and len(by_key) == 4


def test_records_of_another_schema_are_reported_separately_never_double_counted(tmp_path, fake_points):
    """Today a folder of an older schema is merged: 2 × the grid's points."""
    out = tmp_path / "run"
    out.mkdir()
    old = []
    for config in GRID.points():
        older = {k: v for k, v in config.items() if k != "momentum"}  # a config field added later
        old.append(line({**fake_record(config), "config": older, "key": point_key(older)}))
    (out / RESULTS_FILE).write_text("".join(old))
    outcome = sweep(GRID, out)
    assert outcome.ran == 4 and len(outcome.records) == 4 and outcome.left_out == {"schema": 4}
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 8  # the old records stay in the file
    with pytest.warns(ResultsWarning, match="4 of another schema"):
        assert len(load_results(out)) == 4


def test_malformed_records_are_left_out_with_one_warning(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    good = [fake_record(c) for c in GRID.points()[:2]]
    no_metrics = {k: v for k, v in good[0].items() if k != "metrics"}
    bad_metrics = {**good[1], "metrics": 5}
    wrong_type = {**good[1], "metrics": {**good[1]["metrics"], "test_gap": "big"}}
    lines = [line(good[0]), line(no_metrics), line(bad_metrics), "[1, 2]\n", "{not json\n", line(wrong_type),
             line(good[1]), line(good[1])]
    (out / RESULTS_FILE).write_text("".join(lines))
    with pytest.warns(ResultsWarning) as caught:
        records = load_results(out)
    assert len(records) == 2 and len(caught) == 1
    assert "left out 6 lines" in str(caught[0].message)


# --------------------------------------------------------------------------- #
# the lock
# --------------------------------------------------------------------------- #


def hold_lock(out: Path):
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_no_wait_refuses_a_locked_folder_without_touching_it(tmp_path, fake_points, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torn = line(fake_record(GRID.points()[0])) + '{"half'
    (out / RESULTS_FILE).write_text(torn)
    fd = hold_lock(out)
    try:
        with pytest.raises(ResultsLocked, match="^out: .* is in use by another sweep"):
            sweep(GRID, out, wait=False)
        args = ["sweep", "--widths", "8", "--samples", "4", "--seeds", "0", "--steps", "5", "--quiet", "--no-wait",
                "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ntkdyn sweep: error: out:") and "in use by another sweep" in err[-1]
    finally:
        os.close(fd)
    assert (out / RESULTS_FILE).read_text() == torn  # the repair waits for the lock too
    assert fake_points == []


def test_a_second_sweep_waits_for_the_first_with_a_message(tmp_path, fake_points):
    out = tmp_path / "run"
    out.mkdir()
    fd = hold_lock(out)
    released = []

    def release():
        time.sleep(0.3)
        released.append(time.monotonic())
        os.close(fd)

    messages = []
    thread = threading.Thread(target=release)
    thread.start()
    with results_lock(out, on_wait=messages.append):
        acquired = time.monotonic()
    thread.join()
    assert released and acquired >= released[0]
    assert len(messages) == 1 and "in use by another sweep; waiting" in messages[0]
    with results_lock(out, wait=False):  # free again
        pass


def test_empty_out_is_an_error(tmp_path, capsys):
    assert main(["sweep", "--widths", "8", "--out", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkdyn sweep: error: out: expected a folder path")


# --------------------------------------------------------------------------- #
# real processes
# --------------------------------------------------------------------------- #


def test_two_sweeps_and_a_torn_line_writer_on_one_folder_give_every_point_exactly_once(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    path = out / RESULTS_FILE
    args = ["--widths", "8", "--samples", "4", "--seeds", *map(str, range(6)), "--steps", "5", "--n-test", "4",
            "--records", "3", "--depth", "1", "--quiet", "--no-report", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "ntkdyn", "sweep", *args]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    stop = threading.Event()
    fragments = []

    def tear():  # a foreign writer that dies mid-line, again and again, while the sweeps run
        while not stop.is_set():
            if path.exists() and path.stat().st_size:
                with open(path, "ab") as fh:
                    fh.write(b'{"key": "torn-%d", "metr' % len(fragments))
                fragments.append(1)
            time.sleep(0.005)

    writer = threading.Thread(target=tear)
    writer.start()
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        stop.set()
        writer.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    ran = sorted(int(o.split("ran ")[1].split(",")[0]) for o, _ in results)
    assert ran == [0, 6]
    assert sum("waiting for it to finish" in err for _, err in results) == 1
    assert fragments
    grid = SweepGrid(widths=(8,), samples=(4,), seeds=tuple(range(6)), steps=5, n_test=4, num_records=3, depths=(1,))
    keys = keys_in_file(path)
    assert sorted(keys) == sorted(all_keys(grid))  # every point exactly once
