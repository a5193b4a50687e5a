"""``ntkdyn report`` and the sweep's report step on damaged folders and failing disks (issue 13 items 11-12).

Records are fabricated (see test_results_folder.fake_record): the report reads
``results.jsonl`` alone, so no point needs computing.
"""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_results_folder import GRID, fake_record, line

from ntkdyn.experiments import report as report_module
from ntkdyn.experiments.cli import main
from ntkdyn.experiments.report import STALE_MARKER, width_n_rows, write_report
from ntkdyn.experiments.sweep import RESULTS_FILE, SweepGrid

REPORT_FILES = {"summary.csv", "slopes.csv", "report.md", "breakdown.png", "training_curves.png",
                "discrepancy_vs_width.png"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    (out / RESULTS_FILE).write_text("".join(line(fake_record(c, test_gap=0.1 / c["width"])) for c in GRID.points()))
    write_report(out)
    assert REPORT_FILES <= {p.name for p in out.iterdir()}
    return out


@pytest.fixture
def folder(rendered, tmp_path) -> Path:
    """A results folder with the 4 points of GRID (widths 8, 16; seeds 0, 1) and a rendered report."""
    out = tmp_path / "res"
    shutil.copytree(rendered, out)
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ntkdyn report: error: ")
    return err[0]


def test_malformed_lines_are_skipped_with_one_warning_counting_them(folder, capsys):
    with open(folder / RESULTS_FILE, "a") as fh:
        rec = fake_record(GRID.points()[0])
        fh.write(line({k: v for k, v in rec.items() if k != "metrics"}))  # KeyError: 'metrics' today
        fh.write(line({**rec, "metrics": None}))  # TypeError today
        fh.write(line({**rec, "config": [1, 2]}))  # AttributeError today
        fh.write("3\n")
        fh.write('{"key": "x"')
    assert main(["report", str(folder)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkdyn report: warning: ") and "left out 5 lines" in err[0]
    rows = (folder / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 4


def test_results_file_that_is_a_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / RESULTS_FILE).mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)


def test_read_only_summary_csv_is_one_error_line_and_nothing_changes(folder, capsys):
    before = snapshot(folder)
    os.chmod(folder / "summary.csv", 0o444)
    try:
        assert main(["report", str(folder)]) == 2
        msg = one_error_line(capsys)
    finally:
        os.chmod(folder / "summary.csv", 0o644)
    assert "read-only" in msg and "summary.csv" in msg
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no temporary folder left behind


def test_read_only_folder_is_one_error_line(folder, capsys):
    before = snapshot(folder)
    os.chmod(folder, 0o555)
    try:
        assert main(["report", str(folder)]) == 2
        msg = one_error_line(capsys)
    finally:
        os.chmod(folder, 0o755)
    assert "read-only" in msg or "Permission denied" in msg
    assert snapshot(folder) == before


def test_disk_full_is_one_error_line_and_leaves_the_old_report(folder, capsys, monkeypatch):
    before = snapshot(folder)

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report_module, "_save", full)  # the first figure fills the disk
    assert main(["report", str(folder)]) == 2
    assert os.strerror(errno.ENOSPC) in one_error_line(capsys)
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_the_sweeps_report_step_turns_os_errors_into_one_line(folder, capsys, monkeypatch):
    """The sweep command renders its report too: same handling, results intact."""
    from test_results_folder import fake_record as make

    from ntkdyn.experiments import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "run_point", lambda config, data_cache=None: make(config))
    before = (folder / RESULTS_FILE).read_bytes()
    os.chmod(folder / "report.md", 0o444)
    try:
        code = main(["sweep", "--widths", "8", "16", "--samples", "4", "--seeds", "0", "1", "--steps", "5",
                     "--n-test", "4", "--records", "3", "--quiet", "--out", str(folder)])
    finally:
        os.chmod(folder / "report.md", 0o644)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ntkdyn sweep: error: ") and "report.md" in err[-1]
    assert (folder / RESULTS_FILE).read_bytes() == before


def test_a_kill_while_rendering_leaves_the_old_report_and_one_while_moving_marks_it_stale(folder, monkeypatch):
    before = snapshot(folder)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(folder)
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    monkeypatch.undo()

    moved = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(report_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_report(folder)
    monkeypatch.undo()
    assert (folder / STALE_MARKER).exists() and "report.md" not in moved
    assert (folder / "report.md").read_bytes() == before["report.md"]  # the old report.md is moved in last
    write_report(folder)  # re-rendering clears the marker
    assert not (folder / STALE_MARKER).exists()


# --------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------- #


def diverged_records():
    grid = SweepGrid(widths=(8, 16), samples=(4, 8), seeds=(0,), steps=5)
    inf = float("inf")
    return [fake_record(c, test_gap=inf, train_gap=inf, linear_diverged=True, lr_ratio=2.0) for c in grid.points()]


def test_heat_map_of_all_diverged_cells_is_readable():
    """Today: 'lin. diverged' in white on the white of masked cells."""
    from matplotlib.colors import to_rgba

    fig = report_module._breakdown_figure(diverged_records(), "")
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() == "lin. diverged"]
    assert len(labels) == 4
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    box = ax.get_window_extent()
    h = pixels.shape[0]
    inside = pixels[int(h - box.y1) + 2:int(h - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    luminance = inside @ np.array([0.2126, 0.7152, 0.0722])
    background = np.median(luminance)
    text_luminance = np.mean(to_rgba(labels[0].get_color())[:3])
    assert abs(background - text_luminance) > 0.5  # the label contrasts with its cell
    assert (luminance < 0.3).mean() > 0.002  # and dark label pixels are really drawn


def test_a_large_finite_gap_is_not_labelled_inf():
    recs = [fake_record(c, test_gap=1.7e14) for c in SweepGrid(widths=(8,), samples=(4,), seeds=(0,)).points()]
    fig = report_module._breakdown_figure(recs, "")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1.7e+14"]


def test_seeds_column_counts_seeds_not_learning_rates(tmp_path):
    grid = SweepGrid(widths=(8,), samples=(4,), seeds=(0,), learning_rates=(0.5, 1.0, 1.5), steps=5)
    recs = [fake_record(c) for c in grid.points()]
    (row,) = width_n_rows(recs)
    assert row["seeds"] == 1 and row["points"] == 3
    (tmp_path / RESULTS_FILE).write_text("".join(line(r) for r in recs))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = md[md.index("| N | width | seeds"):].splitlines()
    assert table[2].startswith("| 4 | 8 | 1 | 3 |")
