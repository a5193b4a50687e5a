"""The ntkdyn command: sweep → files, report re-renders from results alone, compare prints its table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ntkdyn.experiments.cli import main
from ntkdyn.experiments.sweep import LOCK_FILE, RESULTS_FILE, load_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--widths", "4", "16", "--samples", "4", "--seeds", "0", "--steps", "20", "--n-test", "4",
        "--records", "4", "--depth", "1", "--quiet"]


def test_sweep_then_report_rerenders_from_results(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["sweep", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ran 2, skipped 0" in printed and "slope" in printed
    assert "inf_kernel_error" in printed and "inf_real_test_gap" in printed  # an mlp sweep has the ∞-width slopes
    assert len(load_results(out)) == 2
    produced = {p.name for p in out.iterdir()}
    assert {RESULTS_FILE, "summary.csv", "slopes.csv", "report.md", "breakdown.png", "training_curves.png",
            "discrepancy_vs_width.png"} <= produced

    for name in produced - {RESULTS_FILE, LOCK_FILE}:
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= produced

    # the same command again finds everything done
    assert main(["sweep", *TINY, "--out", str(out), "--no-report"]) == 0
    assert "ran 0, skipped 2" in capsys.readouterr().out


def test_compare_prints_the_step_table(capsys):
    assert main(["compare", "--width", "8", "--samples", "4", "--steps", "10", "--records", "4",
                 "--n-test", "4", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(l for l in lines if l.strip().startswith("step"))
    assert "f_lin(θlin)-Eq9/10" in header and "test gap" in header
    rows = lines[lines.index(header) + 1:lines.index(header) + 5]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 3, 10]
    assert "kernel drift" in out and "per layer" in out


def test_compare_above_the_limit_says_so(capsys):
    assert main(["compare", "--width", "8", "--samples", "4", "--steps", "30", "--records", "3",
                 "--n-test", "4", "--depth", "1", "--lr", "1.5", "--lr-relative"]) == 0
    assert "linearized model diverges" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,match",
    [
        (["--widths", "0"], "widths"),
        (["--activation", "swish"], "activations"),
        (["--samples"], "--samples: expected at least one argument"),  # argparse's own errors too
        (["--lr", "-1"], "learning_rates"),
        (["--steps", "x"], "--steps: invalid int value"),
        (["--momentum", "1.5"], "momentum"),
        (["--dataset", "mnist"], "dataset"),
    ],
)
def test_bad_sweep_configuration_is_one_line_and_exits_2_before_work(tmp_path, capsys, args, match):
    out = tmp_path / "never"
    assert main(["sweep", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkdyn sweep: error: ") and match in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["report"], ["compare", "--width", "0"], ["compare", "--samples", "0"],
     ["report", "/nonexistent/folder"], ["report", ""]],
)
def test_every_user_error_is_one_line_without_traceback(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and "Traceback" not in err[0]


def test_unwritable_out_and_missing_results(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert main(["sweep", *TINY, "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ntkdyn sweep: error: out:")
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "ntkdyn", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "sweep" in done.stdout and "compare" in done.stdout
