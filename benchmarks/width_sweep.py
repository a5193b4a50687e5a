"""The big width sweep: real vs linearized training from narrow to wide networks.

Runs (or resumes) a width × N × seed grid through :func:`ntkdyn.experiments.sweep.sweep`
into ``--out`` (default ``benchmarks/out/width_sweep``), writes the usual
report there, and prints

* the log-log slope of each discrepancy against width per N, mean ± std
  (min … max) over seeds;
* median seconds per point and phase, per width and N: ``setup`` (data and
  model), ``compile`` (JAX tracing and XLA compilation of the one jitted
  comparison: paid once per width and N, 0 for the other seeds) and ``run``
  (the comparison itself: both NTKs, eigendecomposition, training, Eq. 8/9/10).
  The comparison is one compiled program, so its inner phases are not timed
  separately; ``compile`` is read from ``jax.monitoring`` events.

Defaults (erf MLP, 2 hidden layers, NTK parameterization, η = 1, 300 steps,
widths 64 … 4096, N ∈ {16, 32, 64}, 3 seeds: 63 points) took 18.5 minutes on
2 CPU cores shared with other jobs (load average ≈ 7); width 4096 is 60 % of
it (training cost grows as width² · N · steps), so ``--widths 64 ... 2048``
takes about 8 minutes. Results are resumable: rerunning with more widths only
runs the new points. Usage::

    python benchmarks/width_sweep.py [--widths ...] [--samples ...] [--seeds ...] [--steps T] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntkdyn.experiments.report import slope_table, write_report  # noqa: E402
from ntkdyn.experiments.sweep import SweepGrid, sweep  # noqa: E402

PHASES = ("setup", "compile", "run")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--activation", default="erf")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "width_sweep"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    grid = SweepGrid(
        widths=tuple(args.widths), samples=tuple(args.samples), seeds=tuple(args.seeds), steps=args.steps,
        depths=(args.depth,), activations=(args.activation,), learning_rates=(args.lr,), n_test=args.n_test,
    )
    tic = time.perf_counter()
    outcome = sweep(grid, args.out, progress=True)
    wall = time.perf_counter() - tic
    records = outcome.records
    print(f"\n{outcome.ran} points run, {outcome.skipped} resumed, {len(outcome.failed)} failed, "
          f"wall {wall:.0f} s; results in {args.out}")
    for config, err in outcome.failed:
        print(f"  failed {config['width']} N={config['n_train']} seed={config['seed']}: {err}")
    if not records:
        return 1
    write_report(args.out, records)

    print("\nslope of log(metric) vs log(width): mean ± std over seeds (min … max)")
    print(f"{'N':>4}  {'metric':<14} {'slope':>14}  {'range':>16}  seeds  widths")
    for s in slope_table(records, metrics=("test_gap", "train_gap", "kernel_drift", "weight_gap", "eq8_test_gap")):
        print(f"{s['n_train']:>4}  {s['metric']:<14} {s['slope_mean']:+7.3f} ± {s['slope_std']:.3f}  "
              f"[{s['slope_min']:+.2f} … {s['slope_max']:+.2f}]  {s['seeds']:>5}  {s['widths']}")

    cells = defaultdict(list)
    for r in records:
        cells[(r["config"]["width"], r["config"]["n_train"])].append(r)
    print("\nmedian over seeds: test gap, kernel drift, f_lin(θ^lin) vs Eq. 9/10, seconds per phase")
    print(f"{'width':>6} {'N':>4}  {'test gap':>9} {'drift':>9} {'lin check':>9}  "
          + "  ".join(f"{p:>8}" for p in PHASES) + f"  {'total':>8}")
    for (w, n), rs in sorted(cells.items()):
        med = lambda name: float(np.median([r["metrics"][name] for r in rs]))  # noqa: E731
        phase = {p: float(np.median([r["timings"].get(p, np.nan) for r in rs])) for p in PHASES}
        total = float(np.median([r["seconds"] for r in rs]))
        print(f"{w:>6} {n:>4}  {med('test_gap'):9.3g} {med('kernel_drift'):9.3g} {med('lin_consistency'):9.2g}  "
              + "  ".join(f"{phase[p]:8.2f}" for p in PHASES) + f"  {total:8.2f}")
    print("\n(compile is paid by the first seed of each width/N; the median over 3 seeds is a warm run)")
    return 0 if not outcome.failed else 1


if __name__ == "__main__":
    sys.exit(main())
