"""Seeds in one compiled call: S initializations of the default MLP as one vmapped comparison vs S points.

For each width, the S points (seeds 0 … S−1) of the default sweep configuration
(erf MLP, 2 hidden layers, NTK parameterization, synthetic data, N = 32,
500 full-batch GD steps, 16 recorded steps) run

* separately: :func:`ntkdyn.experiments.sweep.run_point` once per seed, as a
  sweep runs them today (one compiled program per width, reused by every seed);
* batched: :func:`ntkdyn.experiments.sweep.run_seed_group`, one vmapped
  program for all S (real and linearized training, kernels and solves
  batched over the initializations).

Compile time is reported apart: each side is first run once on other seeds
(S … 2S−1), which compiles its program (``compile``: JAX tracing and XLA
compilation, from the records' timings); the measured runs are then warm.
``ratio`` = separate wall time / batched wall time (both warm, in one
process; > 1: batching wins). ``ratio, one task per point`` = (S × compile +
separate) / (batched compile + batched): the S points sent as S tasks to
workers (each process compiles its own program, as ``--workers``, Ray or
Slurm do) against the group sent as one task. Every batched record is checked against its separate record (largest
relative difference over the headline metrics :data:`CHECKED`, float32).

Usage::

    python benchmarks/seed_batching.py [--widths 64 256 1024] [--seeds 4] [--repeats 3] [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from ntkdyn.experiments.sweep import SweepGrid, run_point, run_seed_group  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--seeds", type=int, default=4, help="S, the seeds batched together")
    p.add_argument("--samples", type=int, default=32, help="training-set size N")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="warm repeats; the median is reported")
    p.add_argument("--json", default=None, help="also write the table to this file")
    return p.parse_args(argv)


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _timed(fn):
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


# the headline metrics; round-off-sized ones (lin_consistency, the weight gap at the first steps, the final
# loss of a run that converged to ~1e-6) are left out
CHECKED = ("test_gap", "train_gap", "lin_trained_test_gap", "lin_trained_train_gap", "kernel_drift", "loss_initial",
           "test_loss_final", "max_learning_rate")


def _worst_difference(separate: list[dict], batched: list[dict]) -> tuple[float, str]:
    worst, which = 0.0, ""
    for a, b in zip(separate, batched):
        for name in CHECKED:
            value, other = a["metrics"][name], b["metrics"][name]
            if not (math.isfinite(value) and math.isfinite(other)):
                continue
            diff = abs(value - other) / max(abs(value), 1e-30)
            if diff > worst:
                worst, which = diff, name
    return worst, which


def measure(width: int, args) -> dict:
    s = args.seeds
    configs = SweepGrid(widths=(width,), samples=(args.samples,), seeds=tuple(range(2 * s)),
                        steps=args.steps).points()
    warm, measured = configs[s:], configs[:s]
    _, first = _timed(lambda: run_point(warm[0]))
    _, group = _timed(lambda: run_seed_group(warm))
    separate_times, batched_times = [], []
    for _ in range(args.repeats):
        t, separate = _timed(lambda: [run_point(c) for c in measured])
        separate_times.append(t)
        t, batched = _timed(lambda: run_seed_group(measured))
        batched_times.append(t)
    sep, bat = _median(separate_times), _median(batched_times)
    compile_sep = first["timings"]["compile"]  # once per width in one process, shared by every seed
    compile_bat = group[0]["timings"]["compile"] * s  # records carry the group's time / S
    worst, which = _worst_difference(separate, batched)
    return {
        "width": width, "seeds": s, "samples": args.samples, "steps": args.steps,
        "separate_s": sep, "batched_s": bat, "ratio": sep / bat,
        "compile_separate_s": compile_sep, "compile_batched_s": compile_bat,
        # S points as S tasks on workers (each compiles) against one task for the group
        "ratio_one_task_per_point": (s * compile_sep + sep) / (compile_bat + bat),
        "max_rel_diff": worst, "max_rel_diff_metric": which,
    }


def main(argv=None) -> int:
    args = parse(argv)
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); "
          f"S = {args.seeds} seeds, N = {args.samples}, {args.steps} steps, median of {args.repeats}", flush=True)
    header = ("width", "separate (s)", "batched (s)", "ratio", "compile separate (s)", "compile batched (s)",
              "ratio, one task per point", "max rel diff")
    print(" | ".join(header), flush=True)
    rows = []
    for width in args.widths:
        row = measure(width, args)
        rows.append(row)
        print(f"{width} | {row['separate_s']:.3f} | {row['batched_s']:.3f} | {row['ratio']:.2f} | "
              f"{row['compile_separate_s']:.2f} | {row['compile_batched_s']:.2f} | "
              f"{row['ratio_one_task_per_point']:.2f} | {row['max_rel_diff']:.1e} ({row['max_rel_diff_metric']})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
