"""Tables, figures and ``report.md`` from a sweep's ``results.jsonl`` alone.

* ``summary.csv`` — one row per point: its configuration and every metric.
* ``slopes.csv`` — for every series (all settings but width and seed fixed) and
  metric, the least-squares slope of ``log(metric)`` against ``log(width)``
  fitted per seed, then its mean, standard deviation, min and max over seeds,
  and the slope of the mean over seeds.
  Points whose linearized model diverged (infinite gaps) are left out of fits.
* PNG figures (matplotlib's Agg canvas; no global backend is touched):
  ``discrepancy_vs_width*.png`` (log-log, fitted slopes in the legend),
  ``breakdown*.png`` (width × N heat map of the test discrepancy),
  ``training_curves.png`` (real vs predicted loss), and
  ``learning_rate.png`` when the sweep has several learning rates (final
  losses and discrepancy against ``η / η_max``, ``η_max = 2(1+β)n/λ_max``),
  ``infinite_width*.png`` where points hold the infinite-width metrics
  (:mod:`ntkdyn.experiments.infinite_gaps`: the three test gaps real vs eNTK,
  eNTK vs ∞, real vs ∞ and the kernel error against width).
* ``report.md`` embedding them.

The files are rendered into a temporary folder inside ``out`` and then moved
into place, ``report.md`` last. While they are moved, ``report.stale`` marks
the folder (a kill in between leaves that marker: re-run ``ntkdyn report``)
and ``.ntkdyn-report.lock`` is held, so two reports rendered at once are moved
in one after the other, never mixed; an error while rendering (disk full, a
read-only file) leaves the previous report untouched, and ``results.jsonl``
is only ever read. The temporary folder (``.report-<host>-<pid>-*``) of a
report killed while rendering is removed by the next report on that host.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import shutil
import socket
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ntkdyn.experiments.sweep import RESULTS_FILE, _read_only, load_results

__all__ = [
    "SLOPE_METRICS",
    "summary_rows",
    "slope_table",
    "write_report",
    "breakdown_threshold",
    "STALE_MARKER",
    "REPORT_LOCK",
    "width_n_rows",
    "comparisons_text",
    "infinite_rows",
    "infinite_text",
    "INFINITE_SLOPE_METRICS",
]

SLOPE_METRICS = ("test_gap", "train_gap", "lin_trained_test_gap", "lin_trained_train_gap", "kernel_drift",
                 "weight_gap", "eq8_test_gap", "inf_kernel_error", "inf_lin_test_gap", "inf_real_test_gap",
                 "inf_lin_train_gap", "inf_real_train_gap")
# the infinite-width metrics (ntkdyn.experiments.infinite_gaps); NaN or absent where not available
INFINITE_SLOPE_METRICS = ("inf_kernel_error", "inf_lin_test_gap", "inf_real_test_gap", "inf_lin_train_gap",
                          "inf_real_train_gap")
_LABELS = {
    "test_gap": "test discrepancy  max_t ‖f_t − f^lin_t‖ / ‖f_0 − Y‖ (test)",
    "train_gap": "train discrepancy  max_t ‖f_t − f^lin_t‖ / ‖f_0 − Y‖",
    "lin_trained_test_gap": "vs trained f_lin  max_t ‖f_t − f_lin(θ^lt_t)‖ / ‖f_0 − Y‖ (test)",
    "lin_trained_train_gap": "vs trained f_lin  max_t ‖f_t − f_lin(θ^lt_t)‖ / ‖f_0 − Y‖",
    "kernel_drift": "kernel drift  ‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F",
    "weight_gap": "weight gap  max_t ‖θ_t − θ^lin_t‖ / ‖θ_t − θ_0‖",
    "eq8_test_gap": "f(θ^lin_t) vs Eq. 10 (test)",
    "inf_kernel_error": "kernel error  ‖Θ_emp(θ_0) − Θ_∞ ⊗ I‖_F / ‖Θ_∞ ⊗ I‖_F",
    "inf_lin_test_gap": "eNTK vs infinite width  max_t ‖f^lin_t − f^∞_t‖ / ‖f_0 − Y‖ (test)",
    "inf_real_test_gap": "real vs infinite width  max_t ‖f_t − f^∞_t‖ / ‖f_0 − Y‖ (test)",
    "inf_lin_train_gap": "eNTK vs infinite width  max_t ‖f^lin_t − f^∞_t‖ / ‖f_0 − Y‖",
    "inf_real_train_gap": "real vs infinite width  max_t ‖f_t − f^∞_t‖ / ‖f_0 − Y‖",
}
_SERIES_EXCLUDE = ("width", "seed")
# the settings a slope row and a figure title name (besides N), in this order
_SETTINGS = ("dataset", "n_train", "model", "depth", "activation", "parameterization", "optimizer", "batch_size",
             "loss", "learning_rate", "lr_relative", "momentum", "time")
# a test discrepancy above this is where we call the linear prediction broken
breakdown_threshold = 0.1
STALE_MARKER = "report.stale"
REPORT_LOCK = ".ntkdyn-report.lock"


# --------------------------------------------------------------------------- #
# tables
# --------------------------------------------------------------------------- #


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return str(v)


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """One flat dict per point: config fields, metrics, seconds and the library version."""
    rows = []
    for rec in records:
        row = {"key": rec["key"], "version": rec.get("version", "")}
        row.update(rec["config"])
        row.update(rec.get("metrics", {}))
        row["seconds"] = rec.get("seconds", float("nan"))
        row["infinite_note"] = rec.get("infinite_note", _NOT_RECORDED)
        rows.append(row)
    return rows


def _series_key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items() if k not in _SERIES_EXCLUDE))


def _fit_slope(widths: np.ndarray, values: np.ndarray) -> float:
    ok = np.isfinite(values) & (values > 0)
    if ok.sum() < 2 or len(np.unique(widths[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(widths[ok]), np.log(values[ok]), 1)[0])


def slope_table(records: Sequence[dict], metrics: Iterable[str] = SLOPE_METRICS) -> list[dict]:
    """Per series and metric: slope of log(metric) vs log(width), per seed then over seeds.

    Returns rows with the series' settings plus ``metric``, ``slope_mean``,
    ``slope_std`` (ddof 1; 0 for one seed), ``slope_min``, ``slope_max``
    (over the per-seed fits), ``slope_of_mean`` (one fit of the mean over
    seeds at each width, finite values only), ``seeds`` (seeds with a fit),
    ``widths`` (``"64-1024"``). Points whose linearized model diverged (η
    above the limit, discrete time) are skipped; a metric a record lacks
    (e.g. ``inf_*`` where not available) reads as NaN.
    """
    series: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        if rec.get("metrics", {}).get("linear_diverged", False):
            continue  # above η_max the "gap" measures the blow-up, not the nonlinearity
        series[_series_key(rec["config"])].append(rec)
    rows = []
    for key, recs in sorted(series.items(), key=lambda kv: _sort_key(kv[0])):
        settings = dict(key)
        widths_all = sorted({r["config"]["width"] for r in recs})
        if len(widths_all) < 2:
            continue
        for metric in metrics:
            by_seed: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for r in recs:
                by_seed[r["config"]["seed"]].append((r["config"]["width"], float(r["metrics"].get(metric, np.nan))))
            slopes = []
            for pairs in by_seed.values():
                w, v = np.array(pairs, dtype=float).T
                s = _fit_slope(w, v)
                if np.isfinite(s):
                    slopes.append(s)
            arr = np.array(slopes)
            means = _seed_means([(w, v) for pairs in by_seed.values() for w, v in pairs])
            rows.append({
                **{k: settings[k] for k in _SETTINGS if k in settings},
                "metric": metric,
                "slope_mean": float(arr.mean()) if arr.size else float("nan"),
                "slope_std": float(arr.std(ddof=1)) if arr.size > 1 else (0.0 if arr.size else float("nan")),
                "slope_min": float(arr.min()) if arr.size else float("nan"),
                "slope_max": float(arr.max()) if arr.size else float("nan"),
                "slope_of_mean": _fit_slope(*means) if arr.size else float("nan"),
                "seeds": int(arr.size),
                "widths": f"{widths_all[0]}-{widths_all[-1]}",
            })
    return rows


def _seed_means(pairs: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(widths, mean over seeds of the finite values at each width)``."""
    table: dict[int, list[float]] = defaultdict(list)
    for w, v in pairs:
        if np.isfinite(v):
            table[w].append(v)
    widths = np.array(sorted(table), dtype=float)
    return widths, np.array([np.mean(table[w]) for w in sorted(table)], dtype=float)


def _sort_key(key: tuple):
    # numbers sort as numbers (N=8 before N=32), everything else as text
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)))
                 for k, v in key)


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        for k in row:
            if k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)


def _groups(records: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by every setting except width, N and seed (one figure each)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        c = rec["config"]
        groups[tuple(sorted((k, v) for k, v in c.items() if k not in ("width", "n_train", "seed")))].append(rec)
    return dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[0])))


def _group_title(key: tuple, varying: set[str]) -> str:
    d = dict(key)
    parts = [f"{k}={d[k]}" for k in _SETTINGS if k != "n_train" and k in varying and k in d]
    if d.get("lr_relative") and "learning_rate" in varying:
        parts = [p.replace("learning_rate=", "η/η_max=") for p in parts]
    return ", ".join(parts)


def _varying(records: Sequence[dict]) -> set[str]:
    values: dict[str, set] = defaultdict(set)
    for rec in records:
        for k, v in rec["config"].items():
            values[k].add(v if not isinstance(v, list) else tuple(v))
    return {k for k, v in values.items() if len(v) > 1}


def _by_width(recs: list[dict], n: int, metric: str):
    table: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        if r["config"]["n_train"] == n:
            table[r["config"]["width"]].append(float(r["metrics"].get(metric, np.nan)))
    widths = np.array(sorted(table))
    vals = [np.array(table[w]) for w in widths]
    return widths, vals


def _geo_stats(vals: list[np.ndarray]):
    centre, lo, hi = [], [], []
    for v in vals:
        ok = v[np.isfinite(v) & (v > 0)]
        if ok.size:
            centre.append(float(np.exp(np.log(ok).mean())))
            lo.append(float(ok.min()))
            hi.append(float(ok.max()))
        else:
            centre.append(np.nan)
            lo.append(np.nan)
            hi.append(np.nan)
    return np.array(centre), np.array(lo), np.array(hi)


def _draw_vs_width(ax, recs, slopes, n: int, metric: str, label: str, color, marker: str = "o",
                   alpha: float = 1.0) -> None:
    """One metric at one N against width: geometric mean over seeds with min–max bars, the log-log
    fit as a dashed line, and the per-seed slope (mean ± std) in the legend label."""
    widths, vals = _by_width(recs, n, metric)
    centre, lo, hi = _geo_stats(vals)
    ok = np.isfinite(centre)
    if not ok.any():
        return
    slope = next((s for s in slopes if s["n_train"] == n and s["metric"] == metric), None)
    if slope is not None and np.isfinite(slope["slope_mean"]):
        label += f": slope {slope['slope_mean']:.2f} ± {slope['slope_std']:.2f}"
    # geometric means can land a rounding error outside [min, max]
    yerr = np.maximum([centre[ok] - lo[ok], hi[ok] - centre[ok]], 0.0)
    ax.errorbar(widths[ok], centre[ok], yerr=yerr, fmt=marker, color=color, capsize=3, label=label, alpha=alpha)
    if ok.sum() >= 2:
        coef = np.polyfit(np.log(widths[ok]), np.log(centre[ok]), 1)
        xs = np.geomspace(widths[ok].min(), widths[ok].max(), 20)
        ax.plot(xs, np.exp(np.polyval(coef, np.log(xs))), "--", color=color, lw=1)


def _plot_vs_width(recs: list[dict], slopes: list[dict], path: Path, title: str) -> None:
    metrics = ("test_gap", "train_gap", "kernel_drift", "lin_trained_test_gap", "lin_trained_train_gap", "weight_gap")
    fig = _figure(15, 8)
    samples = sorted({r["config"]["n_train"] for r in recs})
    colors = _colors(len(samples))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(2, 3, i + 1)
        for n, color in zip(samples, colors):
            _draw_vs_width(ax, recs, slopes, n, metric, f"N={n}", color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(_LABELS[metric], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, 7)
    fig.suptitle("real vs linearized training: discrepancy against width"
                 + (f"\n{title}" if title else "") + "\n(markers: geometric mean over seeds, bars: min–max)",
                 fontsize=10)
    _save(fig, path)


_THREE_GAPS = (("test_gap", "real vs eNTK", "tab:blue", "o"),
               ("inf_lin_test_gap", "eNTK vs ∞", "tab:orange", "s"),
               ("inf_real_test_gap", "real vs ∞", "tab:green", "^"))


def _has_infinite(recs: Sequence[dict]) -> bool:
    """Whether any point holds a finite infinite-width kernel error."""
    return any(np.isfinite(float(r["metrics"].get("inf_kernel_error", np.nan))) for r in recs)


def _plot_infinite(recs: list[dict], slopes: list[dict], path: Path, title: str) -> None:
    """The three test gaps against width (one panel per N) and the kernel error (last panel), log-log."""
    samples = sorted({r["config"]["n_train"] for r in recs})
    fig = _figure(4.6 * (len(samples) + 1), 4.4)

    def draw(ax, n, metric, label, color, marker="o"):
        _draw_vs_width(ax, recs, slopes, n, metric, label, color, marker=marker, alpha=0.85)

    axes = [fig.add_subplot(1, len(samples) + 1, i + 1) for i in range(len(samples) + 1)]
    for ax, n in zip(axes, samples):
        for metric, label, color, marker in _THREE_GAPS:
            draw(ax, n, metric, label, color, marker)
        ax.set_title(f"test gaps, N={n}  (max over t, relative to ‖f_0 − Y‖)", fontsize=9)
    for n, color in zip(samples, _colors(len(samples))):
        draw(axes[-1], n, "inf_kernel_error", f"N={n}", color)
    axes[-1].set_title(_LABELS["inf_kernel_error"] + "\nat θ_0 on the training inputs (expected slope −½)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, 7)
    fig.suptitle("real network f_t, empirical-NTK prediction f^lin_t (Eq. 9/10 with Θ_emp) and infinite-width "
                 "prediction f^∞_t (with Θ_∞, same f_0) against width\nreal vs eNTK: the nonlinearity; eNTK vs ∞: the "
                 "finite-width kernel" + (f"\n{title}" if title else "")
                 + "\n(markers: geometric mean over seeds, bars: min–max, legend: per-seed slope mean ± std)",
                 fontsize=9)
    _save(fig, path)


_DIVERGED_FACE = (0.85, 0.85, 0.85, 1.0)  # light grey cells: the linearized model diverged
_EMPTY_FACE = (1.0, 1.0, 1.0, 1.0)  # masked cells show the white axes


def _luminance(rgba) -> float:
    """WCAG relative luminance of an sRGB colour."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _text_color(face) -> str:
    """Black or white, whichever contrasts more with ``face`` (WCAG contrast ratio)."""
    lum = _luminance(face)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def _gap_metric(recs: Sequence[dict]) -> str:
    """The test discrepancy a map shows: against the closed form where it exists, else the trained f_lin."""
    if any(r["metrics"].get("closed_form", True) for r in recs):
        return "test_gap"
    return "lin_trained_test_gap"


def _cell(recs: list[dict], metric: str) -> tuple[float, str | None]:
    """The value and the label (None: the value) of one heat-map cell from its points.

    NaN means the metric does not apply to a point (no closed form, no test
    set); such points are left out. Infinite gaps (a side diverged) count as
    the largest value in the median; a cell whose every gap is infinite says
    which side diverged, from the points' ``linear_diverged`` / ``real_diverged``.
    """
    pairs = [(float(r["metrics"].get(metric, np.nan)), r["metrics"]) for r in recs]
    known = [(v, m) for v, m in pairs if not math.isnan(v)]
    if not known:
        return float("nan"), "n/a"
    values = np.array([v for v, _ in known])
    if np.isfinite(values).any():
        return float(np.median(values)), None
    if all(m.get("linear_diverged", False) for _, m in known):
        return float("inf"), "lin. diverged"
    if all(m.get("real_diverged", False) for _, m in known):
        return float("inf"), "real diverged"
    return float("inf"), "diverged"


def _breakdown_grid(recs: list[dict]):
    """``(widths, samples, median test gap (N × width), labels)``: NaN where no point, a label (object array,
    None where the value is shown) for cells whose points all diverged or lack the metric."""
    metric = _gap_metric(recs)
    widths = sorted({r["config"]["width"] for r in recs})
    samples = sorted({r["config"]["n_train"] for r in recs})
    grid = np.full((len(samples), len(widths)), np.nan)
    labels = np.full(grid.shape, None, dtype=object)
    for i, n in enumerate(samples):
        for j, w in enumerate(widths):
            cell = [r for r in recs if r["config"]["n_train"] == n and r["config"]["width"] == w]
            if cell:
                grid[i, j], labels[i, j] = _cell(cell, metric)
    return widths, samples, grid, labels


def _diverged(labels: np.ndarray) -> np.ndarray:
    """The cells drawn grey: every point's gap infinite."""
    return np.vectorize(lambda t: t is not None and t != "n/a", otypes=[bool])(labels)


def _color_range(grid: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(log10 of the positive finite cells, NaN elsewhere; vmin; vmax)``, the threshold always inside."""
    shown = np.full(grid.shape, np.nan)
    ok = np.isfinite(grid) & (grid > 0)
    shown[ok] = np.log10(grid[ok])
    finite = shown[np.isfinite(shown)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (-3, 0)
    vmin, vmax = min(vmin, math.log10(breakdown_threshold) - 1), max(vmax, math.log10(breakdown_threshold))
    return shown, float(vmin), float(vmax)


def _cell_styles(grid: np.ndarray, labels: np.ndarray, cmap) -> list[dict]:
    """Label, weight, face colour and a contrasting text colour of every labelled heat-map cell."""
    shown, vmin, vmax = _color_range(grid)
    diverged = _diverged(labels)
    cells = []
    for (i, j), value in np.ndenumerate(grid):
        if diverged[i, j]:
            text, weight, face = labels[i, j], "bold", _DIVERGED_FACE
        elif labels[i, j] is not None:
            text, weight, face = labels[i, j], "normal", _EMPTY_FACE
        elif np.isnan(value):
            continue
        else:
            text = "inf" if np.isinf(value) else f"{value:.2g}"
            weight = "bold" if value >= breakdown_threshold else "normal"
            face = (tuple(cmap((shown[i, j] - vmin) / max(vmax - vmin, 1e-12))) if np.isfinite(shown[i, j])
                    else _EMPTY_FACE)
        cells.append({"row": i, "col": j, "text": text, "weight": weight, "face": face, "color": _text_color(face)})
    return cells


def _breakdown_figure(recs: list[dict], title: str):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    widths, samples, grid, labels = _breakdown_grid(recs)
    diverged = _diverged(labels)
    shown, vmin, vmax = _color_range(grid)
    cmap = colormaps["magma_r"]
    fig = _figure(2.4 + 1.1 * len(widths), 1.8 + 0.7 * len(samples))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
    if diverged.any():
        ax.imshow(np.ma.masked_where(~diverged, np.ones(grid.shape)), cmap=ListedColormap([_DIVERGED_FACE]),
                  vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for cell in _cell_styles(grid, labels, cmap):
        ax.text(cell["col"], cell["row"], cell["text"], ha="center", va="center", fontsize=8,
                weight=cell["weight"], color=cell["color"])
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    ax.set_yticks(range(len(samples)), [str(n) for n in samples])
    ax.set_xlabel("width")
    ax.set_ylabel("training-set size N")
    cbar = fig.colorbar(im, ax=ax)
    what = "vs the closed form" if _gap_metric(recs) == "test_gap" else "vs the trained f_lin"
    cbar.set_label(f"log10 test discrepancy {what}\n(median over seeds)", fontsize=8)
    ax.set_title(f"where linearization breaks (bold: ≥ {breakdown_threshold:g}; grey: diverged, the cell says which "
                 "side)"
                 + (f"\n{title}" if title else ""), fontsize=9)
    return fig


def _plot_breakdown(recs: list[dict], path: Path, title: str) -> None:
    _save(_breakdown_figure(recs, title), path)


def _plot_curves(records: Sequence[dict], path: Path) -> dict | None:
    """Real vs predicted loss for the narrowest and widest net at the largest N (first group, first seed)."""
    groups = _groups(records)
    if not groups:
        return None
    recs = next(iter(groups.values()))
    n = max(r["config"]["n_train"] for r in recs)
    seed = min(r["config"]["seed"] for r in recs)
    chosen = sorted((r for r in recs if r["config"]["n_train"] == n and r["config"]["seed"] == seed),
                    key=lambda r: r["config"]["width"])
    if not chosen:
        return None
    picks = [chosen[0]] if len(chosen) == 1 else [chosen[0], chosen[-1]]
    fig = _figure(11, 4)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    colors = _colors(len(picks))
    for rec, color in zip(picks, colors):
        steps = np.maximum(np.asarray(rec["curves"]["steps"], dtype=float), 0.5)  # step 0 on a log axis
        c = {k: v for k, v in rec["curves"].items() if len(v) == len(steps)}  # one value per step, or not drawn
        w = rec["config"]["width"]
        for ax, real, lin in ((axes[0], "loss", "loss_lin"), (axes[1], "test_loss", "test_loss_lin")):
            if real in c:
                ax.plot(steps, _positive(c[real]), "-o", ms=3, color=color, label=f"real, width {w}")
                if lin in c:
                    ax.plot(steps, _positive(c[lin]), "--", color=color, label=f"closed form, width {w}")
                if f"{lin}_trained" in c:
                    ax.plot(steps, _positive(c[f"{lin}_trained"]), ":", color=color, label=f"trained f_lin, width {w}")
    for ax, name in zip(axes, ("train loss", "test loss")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step (0 drawn at 0.5)")
        ax.set_title(f"{name}: real (solid), closed form (dashed), trained f_lin (dotted), N={n}, seed {seed}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, 7)
    _save(fig, path)
    return {"n_train": n, "seed": seed, "widths": [r["config"]["width"] for r in picks]}


def _positive(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def _plot_learning_rate(records: Sequence[dict], path: Path) -> list[dict]:
    """Final loss, test discrepancy and kernel drift against η/η_max; returns the table rows it drew."""
    rows = []
    for rec in records:
        m, c = rec["metrics"], rec["config"]
        rows.append({
            "width": c["width"], "n_train": c["n_train"], "seed": c["seed"],
            "lr_ratio": float(m["lr_ratio"]), "loss_initial": float(m["loss_initial"]),
            "loss_final": float(m["loss_final"]), "loss_lin_final": float(m["loss_lin_final"]),
            "test_gap": float(m["test_gap"]), "kernel_drift": float(m["kernel_drift"]),
            "linear_diverged": bool(m["linear_diverged"]), "real_diverged": bool(m["real_diverged"]),
        })
    fig = _figure(14, 4)
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    widths = sorted({r["width"] for r in rows})
    colors = _colors(len(widths))
    floor, top = 1e-12, 1e4  # "converged" and "diverged" rows of the loss panel
    for w, color in zip(widths, colors):
        rs = sorted((r for r in rows if r["width"] == w), key=lambda r: r["lr_ratio"])
        x = np.array([r["lr_ratio"] for r in rs])
        init = np.array([r["loss_initial"] for r in rs])
        for key, marker, fill, label in (("loss_final", "o", None, "real"), ("loss_lin_final", "s", "none", "linearized")):
            ratio = np.array([r[key] for r in rs]) / init
            shown = np.where(np.isfinite(ratio), np.clip(ratio, floor, top), top)
            ax1.plot(x, shown, marker, color=color, mfc=fill, ms=7 if fill else 6, label=f"{label}, width {w}")
        gap = np.array([r["test_gap"] for r in rs])
        ok = np.isfinite(gap) & (gap > 0) & ~np.array([r["linear_diverged"] for r in rs])
        ax2.plot(x[ok], gap[ok], "o", color=color, label=f"width {w}")
        drift = np.array([r["kernel_drift"] for r in rs])
        okd = np.isfinite(drift) & (drift > 0)
        ax3.plot(x[okd], drift[okd], "o", color=color, label=f"width {w}")
    ax1.axhline(1.0, color="grey", lw=1, ls="--")
    ax1.set_ylim(floor / 10, top * 10)
    ax1.set_title(f"final / initial train loss (clipped to [{floor:g}, {top:g}]:\n"
                  "bottom = converged, top = diverged)", fontsize=9)
    ax2.set_title("test discrepancy (where the linearized model converges)", fontsize=9)
    ax3.set_title("kernel drift of the real network ‖Θ_T − Θ_0‖/‖Θ_0‖", fontsize=9)
    for ax in (ax1, ax2, ax3):
        ax.axvline(1.0, color="k", lw=1, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("η / η_max   (η_max = 2(1+β)n/λ_max of Θ₀)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, 6)
    _save(fig, path)
    return rows


def _legend(ax, fontsize) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.0, 0.85, k) if k > 1 else [0.3])]


# --------------------------------------------------------------------------- #
# report.md
# --------------------------------------------------------------------------- #


def _md_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_report(out: str | os.PathLike, records: Sequence[dict] | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``slopes.csv``, the figures and ``report.md`` into ``out``.

    ``records`` default to ``<out>/results.jsonl`` (so ``ntkdyn report DIR``
    needs nothing else; unusable lines are left out with one
    :class:`~ntkdyn.experiments.sweep.ResultsWarning`). The files are rendered
    in a temporary folder and moved in (module docstring). Returns the written
    paths by name.

    Raises:
      ValueError: no results, or ``results.jsonl`` is not a regular file.
      OSError: the folder or an existing report file is read-only (its write
        bits are off), the disk is full, ...; the old report and
        ``results.jsonl`` are left as they were.
    """
    if str(out).strip() == "":
        raise ValueError(f"out: expected a folder path, got {str(out)!r}")
    out = Path(out)
    if records is None:
        path = out / RESULTS_FILE
        if path.is_dir():
            raise ValueError(f"out: {str(path)!r} is a folder, expected the results file")
        if not path.exists():
            raise ValueError(f"out: no {RESULTS_FILE} in {str(out)!r}; run `ntkdyn sweep --out {out}` first")
        if not path.is_file():  # a FIFO or a device: reading it would block or never end
            raise ValueError(f"out: {str(path)!r} is not a regular file")
        records = load_results(out)
    records = list(records)
    if not records:
        raise ValueError(f"out: {str(out / RESULTS_FILE)!r} holds no finished points")
    for path in (out, out / "summary.csv", out / "slopes.csv", out / "report.md"):
        _check_writable(path)  # fail before rendering; the figures are checked once their names are known
    stage = Path(tempfile.mkdtemp(dir=out, prefix=_stage_prefix()))
    try:
        names = _render(stage, records)
        for name in names:
            _check_writable(out / name)
        with _install_lock(out):
            _remove_orphan_stages(out)
            _install(stage, out, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {name: out / name for name in names}


def _check_writable(path: Path) -> None:
    """PermissionError when an existing ``path`` is read-only: no write permission, or all write bits off.

    The mode bits are honoured even for root, so a report file or folder a
    user marked read-only is never replaced.
    """
    if not path.exists():
        return
    if _read_only(path):
        what = "folder" if path.is_dir() else "report file"
        raise PermissionError(errno.EACCES, f"the {what} is read-only; not replacing the report", str(path))


def _stage_prefix(pid: int | None = None) -> str:
    """Name prefix of a rendering folder: host and pid, so a later report can tell whether its owner is gone."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f".report-{host}-{os.getpid() if pid is None else pid}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove_orphan_stages(out: Path) -> None:
    """Delete rendering folders left by killed reports of this host (their pid is gone).

    Folders of live processes (a report rendering right now) and of other
    hosts (a shared filesystem) are left alone.
    """
    host_prefix = _stage_prefix(0)[: -len("0-")]
    for stage in out.glob(host_prefix + "*"):
        pid = stage.name[len(host_prefix):].split("-", 1)[0]
        if stage.is_dir() and not stage.is_symlink() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _install_lock(out: Path):
    """Hold the exclusive ``flock`` on ``out/.ntkdyn-report.lock`` (released when the process dies)."""
    import fcntl  # POSIX; imported here so the package imports everywhere

    fd = os.open(out / REPORT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _install(stage: Path, out: Path, names: list[str]) -> None:
    """Move the staged files into ``out`` (``report.md`` last) under a ``report.stale`` marker.

    Call with :func:`_install_lock` held.
    """
    marker = out / STALE_MARKER
    marker.write_text(
        "The report in this folder is being replaced. If this file is still here, that was interrupted and\n"
        f"the files may mix two versions: run `ntkdyn report {out}` to render it again.\n"
    )
    for name in sorted(names, key=lambda n: n == "report.md"):
        os.replace(stage / name, out / name)
    with contextlib.suppress(OSError):
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    marker.unlink(missing_ok=True)


def _render(out: Path, records: list[dict]) -> list[str]:
    """Write every report file into ``out``; returns their names."""
    written: dict[str, Path] = {}

    rows = summary_rows(records)
    _write_csv(out / "summary.csv", rows)
    written["summary.csv"] = out / "summary.csv"
    slopes = slope_table(records)
    _write_csv(out / "slopes.csv", slopes) if slopes else (out / "slopes.csv").write_text("")
    written["slopes.csv"] = out / "slopes.csv"

    varying = _varying(records)
    groups = _groups(records)
    figures: list[tuple[str, str, str]] = []  # (kind, file, title)
    for idx, (key, recs) in enumerate(groups.items()):
        suffix = "" if len(groups) == 1 else f"_{idx}"
        title = _group_title(key, varying)
        group_slopes = [s for s in slopes if all(s.get(k) == dict(key).get(k) for k in _SETTINGS if k != "n_train")]
        converging = [r for r in recs if not r["metrics"].get("linear_diverged", False)]
        if len({r["config"]["width"] for r in converging}) >= 2:
            name = f"discrepancy_vs_width{suffix}.png"
            _plot_vs_width(converging, group_slopes, out / name, title)
            figures.append(("width", name, title))
        name = f"breakdown{suffix}.png"
        _plot_breakdown(recs, out / name, title)
        figures.append(("breakdown", name, title))
        if _has_infinite(converging) and len({r["config"]["width"] for r in converging}) >= 2:
            name = f"infinite_width{suffix}.png"
            _plot_infinite(converging, group_slopes, out / name, title)
            figures.append(("infinite", name, title))
    curves = _plot_curves(records, out / "training_curves.png")
    if curves is not None:
        figures.append(("curves", "training_curves.png", ""))
    lr_rows = []
    if len({(r["config"]["learning_rate"], r["config"]["lr_relative"]) for r in records}) > 1:
        lr_rows = _plot_learning_rate(records, out / "learning_rate.png")
        figures.append(("lr", "learning_rate.png", ""))
    for _, name, _ in figures:
        written[name] = out / name

    versions = sorted({r.get("version", "?") for r in records})
    md = [
        "# ntkdyn sweep report",
        "",
        f"{len(records)} finished points, ntkdyn {', '.join(versions)}. "
        "Generated from `results.jsonl` alone (`ntkdyn report DIR` re-renders it).",
        "",
        "## Setup",
        "",
        _setup_text(records, varying),
        "",
        "Definitions (per point, max over the recorded steps t):",
        "",
        "- **test/train discrepancy** (`test_gap`, `train_gap`): `‖f(θ_t) − f^lin_t‖ / ‖f(θ_0) − Y‖` on the "
        "test/train inputs, `f^lin_t` from Eq. 9/10 (closed form from the empirical NTK at θ₀).",
        "- **vs trained f_lin** (`lin_trained_test_gap`, `lin_trained_train_gap`): the same with `f^lin_t` "
        "replaced by the linearized network `f_lin(θ) = f(θ_0) + J(θ − θ_0)` trained with the real network's "
        "optimizer, loss, minibatch order and steps — the network's nonlinearity alone, for every optimizer.",
        "- **kernel drift**: `‖Θ(θ_T) − Θ(θ_0)‖_F / ‖Θ(θ_0)‖_F` on the training inputs.",
        "- **weight gap**: `‖θ_t − θ^lin_t‖ / ‖θ_t − θ_0‖`, `θ^lin_t` the Eq. 8 weights.",
        "- **f_lin(θ^lin) vs Eq. 9/10**: the linearized network at the Eq. 8 weights against the "
        "function-space prediction — round-off by construction, the proof that the other gaps are the "
        "network's nonlinearity and not our numerics.",
        "",
        "## Which comparison each number is",
        "",
        comparisons_text(records),
        "",
        "## Slopes against width",
        "",
        "Least-squares slope of log(metric) on log(width), fitted per seed; mean ± std (min … max) over seeds. "
        "Lee et al. (2019) bound the output gap by O(width^-1/2); finer analyses (Dyer & Gur-Ari 2019) "
        "predict O(width^-1), i.e. slope −1.",
        "",
    ]
    shown = [s for s in slopes if s["seeds"] or s["metric"] not in INFINITE_SLOPE_METRICS]
    if shown:
        slope_rows = [{**s, "slope": f"{s['slope_mean']:.2f} ± {s['slope_std']:.2f} "
                                     f"({s['slope_min']:.2f} … {s['slope_max']:.2f})",
                       "slope of seed mean": f"{s['slope_of_mean']:.2f}"} for s in shown]
        cols = [c for c in _SETTINGS if c in varying or c == "n_train"]
        md += ["The last column fits the mean over seeds at each width instead.", "",
               _md_table(slope_rows, cols + ["metric", "slope", "slope of seed mean", "seeds", "widths"]), ""]
    else:
        md += ["(fewer than two widths: no slopes)", ""]
    for kind, name, title in figures:
        if kind == "width":
            md += [f"### Discrepancy vs width{(' — ' + title) if title else ''}", "", f"![discrepancy vs width]({name})", ""]
    md += ["## Where linearization breaks", "",
           f"Median test discrepancy over seeds (against the closed form where it exists, else against the "
           f"trained f_lin; the colour bar says which); bold cells are ≥ {breakdown_threshold:g}. "
           "It falls with width and grows with N at fixed width.", ""]
    for kind, name, title in figures:
        if kind == "breakdown":
            md += [f"![breakdown map{(' — ' + title) if title else ''}]({name})", ""]
    md += _width_n_table(records)
    md += ["## Infinite width: real network, eNTK prediction and the limit", "",
           infinite_text(records, slopes, varying), ""]
    for kind, name, title in figures:
        if kind == "infinite":
            md += [f"![three gaps against width{(' — ' + title) if title else ''}]({name})", ""]
    inf_rows = infinite_rows(records)
    if inf_rows:
        md += ["Medians over the points of each cell that have the infinite-width metrics "
               "(test gaps; band: fraction of the real test outputs inside ±2σ at the last step):", "",
               _md_table(inf_rows, list(inf_rows[0].keys())), ""]
    if curves is not None:
        md += ["## Training curves", "",
               f"Real (solid) vs predicted (dashed) loss, N={curves['n_train']}, seed {curves['seed']}, "
               f"widths {', '.join(map(str, curves['widths']))}.", "", "![training curves](training_curves.png)", ""]
    if lr_rows:
        md += ["## Learning rate: the regime change around η_max = 2(1+β)n/λ_max", "",
               "Above η_max every discrete linearized step multiplies the top kernel mode by |1 − ηλ/n| > 1, "
               "so the linearized model diverges; the real network may still converge (its kernel moves, "
               "'catapult' dynamics) or diverge too.", "", "![learning rate](learning_rate.png)", ""]
        lr_table = sorted(lr_rows, key=lambda r: (r["width"], r["n_train"], r["lr_ratio"], r["seed"]))
        md += [_md_table(lr_table, ["width", "n_train", "seed", "lr_ratio", "loss_final", "loss_lin_final",
                                    "test_gap", "kernel_drift", "linear_diverged", "real_diverged"]), ""]
    cons = np.array([float(r["metrics"].get("lin_consistency", np.nan)) for r in records
                     if not r["metrics"].get("linear_diverged", False)])
    cons = cons[np.isfinite(cons)]
    dtypes = sorted({r["config"].get("dtype", "?") for r in records})
    md += ["## Numerics check", "",
           (f"`f_lin(θ^lin_t)` against Eq. 9/10, worst over all {cons.size} converging points: "
            f"**{cons.max():.2g}** (relative; dtype {', '.join(dtypes)}). Round-off, at every width."
            if cons.size else "No converging points to check." if any(
                r["metrics"].get("closed_form", True) for r in records)
            else "No point has a closed form (Eq. 8/9/10), so there is nothing to check here; the `lin_trained_*` "
                 "comparisons need none."), ""]
    (out / "report.md").write_text("\n".join(md))
    written["report.md"] = out / "report.md"
    return list(written)


def comparisons_text(records: Sequence[dict]) -> str:
    """Which comparisons the points of this report hold (closed form, trained f_lin), in words."""
    kinds = defaultdict(int)
    for r in records:
        c = r["config"]
        kinds[(c.get("optimizer", "sgd"), int(c.get("batch_size", 0) or 0), c.get("loss", "mse"),
               bool(r["metrics"].get("closed_form", True)))] += 1
    lines = ["Every point compares the real network with the linearized network `f_lin` trained the same way "
             "(`lin_trained_*`)."]
    for (optimizer, batch, loss, closed), count in sorted(kinds.items()):
        minibatch = f"batch {batch}" if batch else "full batch"
        how = f"{count} point{'s' if count != 1 else ''}: {optimizer}, {minibatch}, {loss} loss"
        if closed and batch:
            how += (" — also against the closed form for full-batch "
                    + ("heavy ball" if optimizer == "momentum" else "GD")
                    + " (`test_gap`, …), so the minibatch noise counts in those numbers, not in `lin_trained_*`.")
        elif closed:
            how += (" — also against the closed form (`test_gap`, `eq8_*`, `weight_gap`), the exact linearized "
                    + ("heavy-ball" if optimizer == "momentum" else "gradient-descent") + " dynamics.")
        elif loss != "mse":
            how += (" — softmax cross-entropy has no closed form: only the linearized-training comparison "
                    "exists; the closed-form columns are NaN.")
        else:
            how += f" — {optimizer} has no closed form: only the linearized-training comparison exists; " \
                   "the closed-form columns are NaN."
        lines.append("- " + how)
    return "\n".join(lines)


def _setup_text(records: Sequence[dict], varying: set[str]) -> str:
    first = records[0]["config"]
    fixed = {k: v for k, v in first.items() if k not in varying and not _unused_option(k, v)}
    grid = defaultdict(set)
    for r in records:
        for k in varying:
            grid[k].add(r["config"][k])
    varying = varying - {"record_version"}
    lines = ["Varied: " + "; ".join(f"{k} ∈ {{{', '.join(_fmt(v) for v in sorted(grid[k], key=_value_key))}}}"
                                    for k in sorted(grid)) if grid else "Varied: nothing (one point)."]
    lines.append("Fixed: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(fixed.items())) + ".")
    if first.get("lr_relative"):
        lines.append("Learning rates are multiples of each point's stability limit η_max.")
    return "  \n".join(lines)


def _unused_option(name: str, value) -> bool:
    """An empty field (no hash for built-ins), a keyword the family does not take (recorded as 0 or ""), or
    the results-format version."""
    return value == "" or (name in ("depth", "sigma_w", "sigma_b") and value == 0) or name == "record_version"


def _value_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def width_n_rows(records: Sequence[dict]) -> list[dict]:
    """One row per (N, width): medians over its points (every seed and setting), ``seeds`` = distinct seeds.

    A NaN metric (it does not apply to the point: no closed form, no test set)
    is left out, NaN if no point has it; an infinite gap (diverged) counts.
    """
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["config"]["n_train"], r["config"]["width"])].append(r)
    rows = []
    for (n, w), recs in sorted(cells.items()):
        ms = [r["metrics"] for r in recs]

        def med(name):
            return _median_known([float(m.get(name, np.nan)) for m in ms])

        rows.append({
            "N": n, "width": w, "seeds": len({r["config"]["seed"] for r in recs}), "points": len(recs),
            "test gap": med("test_gap"), "train gap": med("train_gap"),
            "kernel drift": med("kernel_drift"), "weight gap": med("weight_gap"),
            "vs trained f_lin": med("lin_trained_test_gap"),
            "f(θ^lin) gap": med("eq8_test_gap"),
            "f_lin(θ^lin) vs Eq.9/10": _max_known([float(m.get("lin_consistency", np.nan)) for m in ms]),
        })
    return rows


def _median_known(values: Sequence[float]) -> float:
    """Median over the values that are not NaN (NaN: the metric does not apply; inf: diverged, counted); NaN if
    none."""
    v = np.array(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(np.median(v)) if v.size else float("nan")


def _max_known(values: Sequence[float]) -> float:
    """Largest value that is not NaN; NaN if none (Python's max depends on where a NaN sits)."""
    v = np.array(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.max()) if v.size else float("nan")


def _width_n_table(records: Sequence[dict]) -> list[str]:
    rows = width_n_rows(records)
    return ["Medians over all points of each cell (every seed and learning rate):", "",
            _md_table(rows, list(rows[0].keys())) if rows else "", ""]


# --------------------------------------------------------------------------- #
# the infinite-width section
# --------------------------------------------------------------------------- #

_NOT_RECORDED = "not recorded (a record without the infinite-width metrics)"
_GAUSSIAN_INSIDE = math.erf(2.0 / math.sqrt(2.0))  # P(|z| ≤ 2) = 0.954…
_BAND_OK = 0.9  # the coverage the report counts as "inside the band"


def _inf_value(rec: dict, name: str) -> float:
    return float(rec["metrics"].get(name, np.nan))


def infinite_rows(records: Sequence[dict]) -> list[dict]:
    """One row per (N, width) over the points with a finite kernel error: medians of the three test gaps,
    the kernel error and the ±2σ test coverage at the last step."""
    cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in records:
        if np.isfinite(_inf_value(r, "inf_kernel_error")):
            cells[(r["config"]["n_train"], r["config"]["width"])].append(r)
    rows = []
    for (n, w), recs in sorted(cells.items()):
        def med(name):
            return _median_known([_inf_value(r, name) for r in recs])

        def band():
            v = np.array([_inf_value(r, "inf_band_test") for r in recs])
            v = v[np.isfinite(v)]
            return float(np.median(v)) if v.size else float("nan")

        rows.append({"N": n, "width": w, "points": len(recs), "kernel error": med("inf_kernel_error"),
                     "real vs eNTK": med("test_gap"), "eNTK vs ∞": med("inf_lin_test_gap"),
                     "real vs ∞": med("inf_real_test_gap"), "±2σ coverage": band()})
    return rows


def _availability(records: Sequence[dict]) -> list[str]:
    """Lines saying which points lack which infinite-width metrics, and why (grouped by reason)."""
    reasons: dict[str, int] = defaultdict(int)
    for r in records:
        note = r.get("infinite_note")
        if note is None or "inf_kernel_error" not in r["metrics"]:
            note = _NOT_RECORDED
        if note:
            reasons[note] += 1
    return [f"- {count} point{'s' if count != 1 else ''}: {note}" for note, count in sorted(reasons.items())]


def _slope_cell(slopes: Sequence[dict], settings: dict, metric: str) -> str:
    row = next((s for s in slopes if s["metric"] == metric and all(s.get(k) == v for k, v in settings.items())),
               None)
    if row is None or not row["seeds"]:
        return "–"
    return f"{row['slope_mean']:.2f} ± {row['slope_std']:.2f} / {row['slope_of_mean']:.2f}"


def infinite_text(records: Sequence[dict], slopes: Sequence[dict] | None = None,
                  varying: set[str] | None = None) -> str:
    """The infinite-width section in words: availability, slopes against width, ±2σ band coverage."""
    slopes = slope_table(records) if slopes is None else slopes
    varying = _varying(records) if varying is None else varying
    have = [r for r in records if np.isfinite(_inf_value(r, "inf_kernel_error"))]
    lines = [
        "Each point of a network the analytic kernels cover (`ntkdyn.models.MLP` and `CNN`: the `mlp` and `cnn` "
        "families) is also measured against the infinite-width limit (`ntkdyn.infinite`; "
        "`ntkdyn.experiments.infinite_gaps`):",
        "",
        "- **kernel error** (`inf_kernel_error`): `‖Θ_emp(θ_0) − Θ_∞ ⊗ I_K‖_F / ‖Θ_∞ ⊗ I_K‖_F` on the training "
        "inputs, `Θ_emp` the kernel of the eNTK prediction;",
        "- **eNTK vs infinite width** (`inf_lin_test_gap`, `inf_lin_train_gap`): `‖f^lin_t − f^∞_t‖ / ‖f_0 − Y‖`, "
        "`f^∞_t` the same closed form (Eq. 9/10, same f_0, η, clock, steps) with `Θ_∞` — the finite-width kernel "
        "fluctuation;",
        "- **real vs infinite width** (`inf_real_test_gap`, `inf_real_train_gap`): `‖f_t − f^∞_t‖ / ‖f_0 − Y‖`; "
        "with `test_gap` (real vs eNTK: the nonlinearity) the three sides of the breakdown;",
        "- **±2σ band** (`inf_band_test`, `inf_band_train`): the fraction of the real outputs at the last step "
        "inside the infinite-width ensemble's mean ± 2σ (over initializations; a Gaussian puts "
        f"{100 * _GAUSSIAN_INSIDE:.1f} % inside).",
        "",
    ]
    if not have:
        return "\n".join(lines + ["Not available for any point of this report:", *_availability(records)])
    lines.append(f"Available for {len(have)} of {len(records)} points"
                 + (":" if len(have) < len(records) else " (kernel error; the gaps where the closed form exists, "
                    "the band for plain gradient descent)."))
    missing = _availability(records)
    if missing:
        lines += ["", *missing, ""]
    keys = sorted({tuple((k, r["config"][k]) for k in _SETTINGS if k in r["config"] and (k in varying or
                                                                                        k == "n_train"))
                   for r in have}, key=_sort_key)
    rows = []
    for key in keys:
        settings = dict(key)
        row = {k: v for k, v in settings.items()}
        for metric, name in (("inf_kernel_error", "kernel error"), ("test_gap", "real vs eNTK"),
                             ("inf_lin_test_gap", "eNTK vs ∞"), ("inf_real_test_gap", "real vs ∞")):
            row[name] = _slope_cell(slopes, settings, metric)
        rows.append(row)
    if any(cell != "–" for row in rows for cell in list(row.values())[len(keys[0]):]):
        lines += ["", "Slopes against width (log-log; test gaps): per-seed mean ± std / slope of the seed mean. "
                  "Expected ≈ −½ per seed for the kernel error (the empirical NTK fluctuates around Θ_∞ by "
                  "O(width^−½)), which the eNTK-vs-∞ gap inherits.", "",
                  _md_table(rows, list(rows[0].keys()))]
    lines += ["", _band_sentence(have)]
    return "\n".join(lines)


def _band_sentence(have: Sequence[dict]) -> str:
    test = [(r["config"]["width"], _inf_value(r, "inf_band_test")) for r in have]
    test = [(w, v) for w, v in test if np.isfinite(v)]
    if not test:
        return ("±2σ band: not computed for these points (the infinite-width ensemble needs plain gradient "
                "descent on the MSE loss and test inputs).")
    values = np.array([v for _, v in test])
    widest = max(w for w, _ in test)
    at_widest = np.array([v for w, v in test if w == widest])
    train = np.array([_inf_value(r, "inf_band_train") for r in have])
    train = train[np.isfinite(train)]
    text = (f"±2σ band: at the last step a median {100 * np.median(values):.0f} % of the real test outputs "
            f"(range {100 * values.min():.0f}–{100 * values.max():.0f} % over {values.size} points) lie inside "
            f"the infinite-width ensemble's mean ± 2σ ({100 * np.median(at_widest):.0f} % at width {widest}; a "
            f"Gaussian: {100 * _GAUSSIAN_INSIDE:.1f} %); {int(np.sum(values >= _BAND_OK))} of {values.size} "
            f"points have at least {100 * _BAND_OK:.0f} % inside.")
    if train.size:
        text += (f" On the training inputs the median is {100 * np.median(train):.0f} % — there the band "
                 "shrinks as training converges, so it tests the fit, not the prior.")
    return text
