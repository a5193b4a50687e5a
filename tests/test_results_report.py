"""``ntkdyn report`` and the sweep's report step on damaged folders and failing disks (issue 13 items 11-12).

Records are fabricated (see test_results_folder.fake_record): the report reads
``results.jsonl`` alone, so no point needs computing.
"""

import errno
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_results_folder import GRID, fake_record, line, unusable_records

from ntkdyn.experiments import report as report_module
from ntkdyn.experiments.cli import main
from ntkdyn.experiments.report import REPORT_LOCK, STALE_MARKER, width_n_rows, write_report
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


def test_records_that_broke_the_rendering_are_skipped_with_one_warning(folder, capsys):
    """Today: OverflowError / KeyError tracebacks, or one error line for the whole report."""
    first, *rest = (folder / RESULTS_FILE).read_text().splitlines(keepends=True)
    short = fake_record(GRID.points()[0])
    short["curves"]["loss"] = [1.0]  # a curve with fewer values than steps: not drawn (x and y must ... today)
    assert first.startswith('{"config"') and short["key"] in first
    bad = unusable_records()
    (folder / RESULTS_FILE).write_text("".join(line(r) for r in bad) + line(short) + "".join(rest))
    assert main(["report", str(folder)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ntkdyn report: warning: ")
    assert f"left out {len(bad)} lines: {len(bad)} malformed" in err[0]
    assert len((folder / "summary.csv").read_text().splitlines()) == 1 + 4


def test_results_file_that_is_a_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / RESULTS_FILE).mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)


def test_results_file_that_is_a_fifo_is_one_error_line_not_a_hang(tmp_path, capsys):
    """Today `ntkdyn report` waits forever for a writer to open the FIFO."""
    fifo = tmp_path / RESULTS_FILE
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # if the report blocks on the FIFO, open it for writing after a while so the test ends
        if not done.wait(5.0):
            fd = os.open(fifo, os.O_WRONLY)
            os.close(fd)

    helper = threading.Thread(target=unblock)
    helper.start()
    tic = time.monotonic()
    try:
        code = main(["report", str(tmp_path)])
    finally:
        done.set()
        helper.join()
    assert time.monotonic() - tic < 5.0 and code == 2
    assert "is not a regular file" in one_error_line(capsys)


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


def test_two_reports_rendered_at_once_are_moved_in_one_after_the_other(tmp_path, monkeypatch):
    """Today their files are moved in interleaved (a folder mixing both) and the second to finish fails
    on the marker the first removed (FileNotFoundError: report.stale)."""
    (tmp_path / RESULTS_FILE).write_text(line(fake_record(GRID.points()[0])))
    both_rendered = threading.Barrier(2, timeout=60)
    real_render, real_replace = report_module._render, os.replace
    moves, failures = [], []

    one_at_a_time = threading.Lock()  # matplotlib's text parser is not thread-safe; processes would not share it

    def render_then_meet(stage, records):
        with one_at_a_time:
            names = real_render(stage, records)
        both_rendered.wait()  # both reports start moving their files at the same moment
        return names

    def slow_replace(src, dst):
        moves.append(threading.current_thread().name)
        time.sleep(0.02)
        real_replace(src, dst)

    def run():
        try:
            write_report(tmp_path)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            failures.append(err)

    monkeypatch.setattr(report_module, "_render", render_then_meet)
    monkeypatch.setattr(report_module.os, "replace", slow_replace)
    threads = [threading.Thread(target=run, name=name) for name in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert moves == sorted(moves) or moves == sorted(moves, reverse=True)  # AAAA BBBB, never interleaved
    assert not (tmp_path / STALE_MARKER).exists() and (tmp_path / REPORT_LOCK).exists()


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


def test_the_rendering_folder_of_a_killed_report_is_removed_by_the_next_one(folder):
    """A SIGKILL while rendering used to leave its hidden .report-* folder behind for good."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = folder / (report_module._stage_prefix(dead.pid) + "abc")
        running = folder / (report_module._stage_prefix(alive.pid) + "def")
        other_host = folder / f".report-elsewhere-{dead.pid}-ghi"
        for stage in (orphan, running, other_host):
            stage.mkdir()
            (stage / "summary.csv").write_text("half")
        write_report(folder)
        assert not orphan.exists()
        assert running.is_dir() and other_host.is_dir()  # a report still rendering; another host's
        assert {p.name for p in folder.iterdir() if p.name.startswith(".report-")} == {running.name, other_host.name}
    finally:
        alive.kill()
        alive.wait()


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


def test_heat_map_says_which_side_diverged_and_never_calls_a_missing_gap_a_divergence():
    """Today every cell without a finite gap reads 'lin. diverged': a real network that blew up while the
    linearized one converged, and a point whose gap does not apply (NaN)."""
    grid = SweepGrid(widths=(8, 16, 32, 64), samples=(4,), seeds=(0, 1), steps=5)
    inf, nan = float("inf"), float("nan")
    cells = {8: [dict(test_gap=inf, linear_diverged=True)] * 2,
             16: [dict(test_gap=inf, real_diverged=True)] * 2,
             32: [dict(test_gap=nan)] * 2,
             64: [dict(test_gap=nan), dict(test_gap=0.03)]}
    recs = [fake_record(c, **cells[c["width"]][c["seed"]]) for c in grid.points()]
    fig = report_module._breakdown_figure(recs, "")
    texts = {round(t.get_position()[0]): t.get_text() for t in fig.axes[0].texts}
    assert texts == {0: "lin. diverged", 1: "real diverged", 2: "n/a", 3: "0.03"}


def test_width_n_table_shows_a_gap_that_does_not_apply_as_nan_not_inf():
    """Today a point without a closed form (test_gap NaN) reads as an infinite gap in the table, and the
    consistency column depends on where a NaN sits."""
    grid = SweepGrid(widths=(8,), samples=(4,), seeds=(0, 1), steps=5)
    recs = [fake_record(c, test_gap=nan_or, lin_consistency=cons)
            for c, nan_or, cons in zip(grid.points(), (float("nan"), float("nan")), (float("nan"), 1e-7))]
    for order in (recs, recs[::-1]):
        (row,) = width_n_rows(order)
        assert math.isnan(row["test gap"]) and row["f_lin(θ^lin) vs Eq.9/10"] == 1e-7
    mixed = [fake_record(c, test_gap=g) for c, g in zip(grid.points(), (float("nan"), 0.5))]
    assert width_n_rows(mixed)[0]["test gap"] == 0.5


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
