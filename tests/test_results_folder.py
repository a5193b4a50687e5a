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
    RECORD_VERSION,
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


def test_records_of_another_record_version_are_another_schema(tmp_path, fake_points):
    """Today a record with every field but record_version 1 (or a later 3) counts: 8 points for a 4-point grid."""
    out = tmp_path / "run"
    out.mkdir()
    other = []
    for config, version in zip(GRID.points(), (RECORD_VERSION - 1, RECORD_VERSION + 1) * 2):
        older = {**config, "record_version": version}
        other.append(line(fake_record(older)))
    (out / RESULTS_FILE).write_text("".join(other))
    outcome = sweep(GRID, out)
    assert outcome.ran == 4 and len(outcome.records) == 4 and outcome.left_out == {"schema": 4}
    assert all(r["config"]["record_version"] == RECORD_VERSION for r in outcome.records)
    with pytest.warns(ResultsWarning, match="4 of another schema"):
        assert len(load_results(out)) == 4


def unusable_records() -> list[dict]:
    """Records whose key matches their config, but that no sweep writes (each broke or misled the report)."""
    first = GRID.points()[0]
    bad_configs = [("width", 10**400), ("width", 0), ("width", -3), ("n_train", 0), ("learning_rate", float("nan")),
                   ("learning_rate", -1.0), ("learning_rate", float("inf")), ("momentum", 2.0), ("seed", -1),
                   ("steps", 0), ("num_records", 1), ("batch_size", 99), ("dtype", "float16"), ("time", "x"),
                   ("activation", "swish"), ("sigma_w", float("inf"))]
    records = [fake_record({**first, field: value}) for field, value in bad_configs]
    changes = [
        lambda r: r["metrics"].update(kernel_drift=10**400),  # OverflowError: int too large to convert to float
        lambda r: r["metrics"].update(closed_form=1.5),
        lambda r: r.pop("curves"),  # KeyError: 'curves'
        lambda r: r.update(curves={}),  # KeyError: 'steps'
        lambda r: r["curves"].update(steps=[0, 1.5, 5]),
        lambda r: r.update(version=["0.1"]),  # unhashable type: 'list'
        lambda r: r.update(infinite_note={"why": 1}),
        lambda r: r.update(timings={"run": "fast"}),
        lambda r: r.update(seconds=10**400),
    ]
    for change in changes:
        rec = fake_record(first)
        change(rec)
        records.append(rec)
    return records


def test_records_no_sweep_writes_are_left_out_and_a_huge_integer_is_unparseable(tmp_path):
    """Today these records count as finished points, and one integer of 5000 digits fails the whole read."""
    out = tmp_path / "run"
    out.mkdir()
    bad = unusable_records()
    good = fake_record(GRID.points()[1])
    huge = '{"key": "0123456789abcdef", "seconds": ' + "9" * 5000 + "}\n"  # ValueError (4300-digit limit) today
    (out / RESULTS_FILE).write_text("".join(line(r) for r in bad) + huge + line(good))
    with pytest.warns(ResultsWarning) as caught:
        records = load_results(out)
    assert [r["key"] for r in records] == [good["key"]]
    assert len(caught) == 1
    assert f"left out {len(bad) + 1} lines: 1 torn or unparseable, {len(bad)} malformed" in str(caught[0].message)


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


def test_repair_never_replaces_a_file_another_writer_appended_to(tmp_path, fake_points, monkeypatch):
    """Today a line appended between the repair's read and its rename is lost."""
    out = tmp_path / "run"
    out.mkdir()
    path = out / RESULTS_FILE
    path.write_text(line(fake_record(GRID.points()[0])) + '{"torn\n')
    foreign = fake_record(SweepGrid(widths=(32,), samples=(4,), seeds=(0,), steps=5, n_test=4,
                                    num_records=3).points()[0])
    real_scan = sweep_module._scan
    scans = []

    def scan_then_foreign_append(where):
        scan = real_scan(where)
        if not scans:  # a writer that ignores the lock appends right after the start-up read
            with open(where, "a") as fh:
                fh.write(line(foreign))
        scans.append(scan)
        return scan

    monkeypatch.setattr(sweep_module, "_scan", scan_then_foreign_append)
    outcome = sweep(GRID, out)
    assert outcome.moved_aside == {} and outcome.left_out == {"torn": 1}
    assert foreign["key"] in keys_in_file(path) and len(outcome.records) == 5
    assert sorted(keys_in_file(path)) == sorted(all_keys() | {foreign["key"]})


def test_sweep_honours_read_only_mode_bits_and_refuses_odd_results_files(tmp_path, fake_points, capsys):
    """Today, as root, a sweep appends to a read-only results.jsonl (and writes into a read-only folder); a broken
    symlink fails only at the first append, after a point was computed."""
    args = ["sweep", "--widths", "8", "--samples", "4", "--seeds", "0", "--steps", "5", "--n-test", "4",
            "--records", "3", "--quiet", "--no-report", "--out"]
    ro_file = tmp_path / "ro-file"
    ro_file.mkdir()
    (ro_file / RESULTS_FILE).write_text(line(fake_record(GRID.points()[1])))
    os.chmod(ro_file / RESULTS_FILE, 0o444)
    ro_dir = tmp_path / "ro-dir"
    ro_dir.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RESULTS_FILE).symlink_to(tmp_path / "missing-folder" / RESULTS_FILE)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / RESULTS_FILE)
    os.chmod(ro_dir, 0o555)
    try:
        for out, what in ((ro_file, "read-only"), (ro_dir, "read-only"), (broken, "does not exist"),
                          (fifo, "not a regular file")):
            before = sorted(os.listdir(out))
            assert main([*args, str(out)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("ntkdyn sweep: error: out: ") and what in err[0], err
            assert sorted(os.listdir(out)) == before
    finally:
        os.chmod(ro_dir, 0o755)
        os.chmod(ro_file / RESULTS_FILE, 0o644)
    assert fake_points == []
    with pytest.raises(OSError, match="not a regular file"):  # reading a FIFO would wait for a writer forever
        load_results(fifo)


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


def torn_at_end(path: Path) -> bool:
    """Whether ``path`` ends inside a line (a fragment with no newline yet)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


# a real `ntkdyn sweep` process whose points are fabricated; each point is handed back only while a foreign
# writer's torn fragment sits at the end of results.jsonl, so every append meets the case that lost records
SWEEP_PROCESS = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_results_folder import fake_record, torn_at_end
from ntkdyn.experiments import sweep
from ntkdyn.experiments.cli import main

def run_point(config, data_cache=None):
    deadline = time.monotonic() + 60
    while not torn_at_end(Path({path!r})):
        if time.monotonic() > deadline:
            raise RuntimeError("no torn fragment from the other writer")
        time.sleep(0.002)
    return fake_record(config)

sweep.run_point = run_point
sys.exit(main(sys.argv[1:]))
"""


def test_two_sweeps_and_a_torn_line_writer_on_one_folder_give_every_point_exactly_once(tmp_path):
    """Two real sweep processes queue on one folder while a third writer keeps leaving torn lines.

    The overlap is forced, not left to timing: the test holds the folder's
    lock until both sweeps are waiting for it, and the points are handed back
    only right after a torn fragment. Each point must be computed once and be
    in results.jsonl exactly once.
    """
    out = tmp_path / "shared"
    out.mkdir()
    path = out / RESULTS_FILE
    seeds = range(8)
    grid = SweepGrid(widths=(8,), samples=(4,), seeds=tuple(seeds), steps=5, n_test=4, num_records=3, depths=(1,))
    args = ["sweep", "--widths", "8", "--samples", "4", "--seeds", *map(str, seeds), "--steps", "5", "--n-test", "4",
            "--records", "3", "--depth", "1", "--quiet", "--no-report", "--out", str(out)]
    code = SWEEP_PROCESS.format(tests=str(ROOT / "tests"), path=str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lock = hold_lock(out)
    logs = [tmp_path / f"sweep{i}.err" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=err, text=True))
    stop = threading.Event()
    fragments = []

    def tear():  # a foreign writer that dies mid-line, again and again
        while not stop.is_set():
            with open(path, "ab") as fh:
                fh.write(b'{"key": "torn-%d", "metr' % len(fragments))
            fragments.append(1)
            time.sleep(0.003)

    writer = threading.Thread(target=tear)
    try:
        deadline = time.monotonic() + 90
        while not all("waiting for it to finish" in log.read_text() for log in logs):  # both queue on the lock
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
            time.sleep(0.05)
        writer.start()
        os.close(lock)
        lock = None
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        if lock is not None:
            os.close(lock)
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(outputs) == [f"ran 0, skipped {len(seeds)} already finished, failed 0\n",
                               f"ran {len(seeds)}, skipped 0 already finished, failed 0\n"], errors
    assert all(e.count("waiting for it to finish") == 1 for e in errors)
    assert len(fragments) > len(seeds)
    keys = keys_in_file(path)
    assert sorted(keys) == sorted(all_keys(grid))  # every point exactly once
