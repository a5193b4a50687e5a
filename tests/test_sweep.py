"""Sweeps: validation before work, resumable JSON lines (kill -9 included), the report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ntkdyn
from ntkdyn.experiments.report import slope_table, write_report
from ntkdyn.experiments.sweep import (
    RESULTS_FILE,
    ResultsWarning,
    SweepGrid,
    load_results,
    point_key,
    prepare_output,
    sweep,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(widths=(4, 8), samples=(4,), seeds=(0,), steps=5, n_test=4, num_records=3)


def strict_lines(path: Path) -> list[dict]:
    """Every line must be strict JSON (no NaN/Infinity tokens)."""
    def reject(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(widths=()), "widths"),
        (dict(widths=(0, 8)), "widths"),
        (dict(widths=(8, 8)), "widths"),
        (dict(samples=()), "samples"),
        (dict(seeds=(-1,)), "seeds"),
        (dict(activations=("swish",)), "activations"),
        (dict(parameterizations=("mup",)), "parameterizations"),
        (dict(learning_rates=(0.0,)), "learning_rates"),
        (dict(depths=(0,)), "depths"),
        (dict(dataset="mnist"), "dataset"),
        (dict(steps=0), "steps"),
        (dict(momentum=1.0), "momentum"),
        (dict(time="sometimes"), "time"),
        (dict(dtype="float16"), "dtype"),
        (dict(dataset="digits", samples=(1700,), n_test=200), "samples"),
    ],
)
def test_bad_grid_fails_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep(SweepGrid(**{**TINY, **kwargs}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out"):
        prepare_output(blocker)
    with pytest.raises(ValueError, match="out"):
        sweep(SweepGrid(**TINY), blocker / "inside")


def test_points_carry_full_config_and_distinct_keys():
    points = SweepGrid(widths=(8, 16), samples=(4, 8), seeds=(0, 1), learning_rates=(0.5, 1.0)).points()
    assert len(points) == 16
    keys = {point_key(p) for p in points}
    assert len(keys) == 16
    assert point_key(dict(reversed(list(points[0].items())))) == point_key(points[0])
    assert {"width", "n_train", "seed", "depth", "activation", "learning_rate", "steps", "dtype"} <= set(points[0])


def test_sweep_resumes_skips_finished_and_repairs_a_torn_line(tmp_path):
    out = tmp_path / "run"
    grid = SweepGrid(**{**TINY, "widths": (4,), "seeds": (0, 1, 2, 3)})
    first = sweep(grid, out)
    assert (first.total, first.ran, first.skipped, first.failed) == (4, 4, 0, [])
    lines = strict_lines(out / RESULTS_FILE)
    assert len(lines) == 4
    rec = lines[0]
    assert rec["version"] == ntkdyn.__version__ and rec["config"]["width"] == 4
    assert {"test_gap", "kernel_drift", "lin_consistency", "weight_gap"} <= set(rec["metrics"])
    assert np.isfinite(rec["metrics"]["inf_kernel_error"]) and rec["infinite_note"] == ""  # vs the ∞-width limit
    assert set(rec["timings"]) == {"setup", "compile", "run"}
    assert rec["timings"]["compile"] > 0 and abs(sum(rec["timings"].values()) - rec["seconds"]) < 1e-6

    again = sweep(grid, out)
    assert (again.ran, again.skipped) == (0, 4)
    # drop one finished point and tear the last line as kill -9 mid-write would
    text = (out / RESULTS_FILE).read_text().splitlines()
    (out / RESULTS_FILE).write_text("\n".join(text[:2] + text[3:]) + "\n" + text[2][: len(text[2]) // 2])
    with pytest.warns(ResultsWarning, match="1 torn"):
        assert len(load_results(out)) == 3
    third = sweep(grid, out)
    assert (third.ran, third.skipped) == (1, 3)
    lines = strict_lines(out / RESULTS_FILE)
    assert sorted(r["key"] for r in lines) == sorted(point_key(p) for p in grid.points())


def test_kill_9_mid_sweep_then_rerun_loses_nothing_and_duplicates_nothing(tmp_path):
    out = tmp_path / "killed"
    args = ["--widths", "4", "--samples", "4", "--seeds", *map(str, range(20)), "--steps", "200",
            "--n-test", "4", "--records", "4"]
    cmd = [sys.executable, "-m", "ntkdyn", "sweep", *args, "--out", str(out), "--quiet", "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = out / RESULTS_FILE
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(load_results(out))
    grid = SweepGrid(widths=(4,), samples=(4,), seeds=tuple(range(20)), steps=200, n_test=4, num_records=4)
    total = len(grid.points())
    assert 3 <= done_before < total

    rerun = sweep(grid, out)
    assert rerun.failed == [] and rerun.skipped == done_before and rerun.ran == total - done_before
    lines = strict_lines(path)
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {point_key(p) for p in grid.points()}


def test_report_from_results_alone_with_a_diverging_learning_rate(tmp_path):
    out = tmp_path / "lr"
    grid = SweepGrid(widths=(8, 32), samples=(6,), seeds=(0, 1), steps=40, n_test=4, num_records=4,
                     learning_rates=(0.5, 1.5), lr_relative=True, depths=(1,))
    outcome = sweep(grid, out)
    assert outcome.failed == [] and outcome.ran == 8
    metrics = [r["metrics"] for r in outcome.records]
    assert any(m["linear_diverged"] for m in metrics) and not all(m["linear_diverged"] for m in metrics)

    written = write_report(out)  # reads results.jsonl only
    for name in ("summary.csv", "slopes.csv", "report.md", "training_curves.png", "learning_rate.png"):
        assert (out / name).stat().st_size > 0, name
    assert any(n.startswith("breakdown") for n in written) and any(n.startswith("discrepancy_vs_width") for n in written)
    md = (out / "report.md").read_text()
    for name in written:
        if name.endswith(".png"):
            assert f"]({name})" in md
    assert "η_max" in md and "Numerics check" in md
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and "test_gap" in rows[0]

    # slopes: diverged points stay out of the fits, so only η = 0.5 η_max series remain
    slopes = slope_table(outcome.records, metrics=("test_gap",))
    assert {s["learning_rate"] for s in slopes} == {0.5}
    assert all(np.isfinite(s["slope_mean"]) for s in slopes)


def test_slope_table_recovers_a_known_power_law():
    recs = []
    for seed, amp in ((0, 1.0), (1, 2.0), (2, 0.5)):
        for w in (16, 64, 256):
            cfg = {"width": w, "seed": seed, "n_train": 8, "depth": 2, "activation": "erf", "learning_rate": 1.0}
            recs.append({"key": f"{seed}-{w}", "config": cfg, "metrics": {"test_gap": amp * w ** -0.75}})
    (row,) = slope_table(recs, metrics=("test_gap",))
    assert row["slope_mean"] == pytest.approx(-0.75) and row["slope_std"] == pytest.approx(0.0, abs=1e-12)
    assert row["seeds"] == 3 and row["widths"] == "16-256"


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="results.jsonl"):
        write_report(tmp_path)
