"""Seeds in one compiled call: a 4-seed sweep of the default MLP, batched vs point by point, and why.

The comparison is the sweep as a user runs it (:func:`ntkdyn.experiments.sweep.sweep`, what ``ntkdyn
sweep`` calls) on the grid ``--widths W --samples N --seeds 0 1 2 3`` of the default point (erf MLP, 2
hidden layers, NTK parameterization, synthetic data with 8 inputs and 1 output, 32 test points, 500
full-batch GD steps, 16 recorded steps, float32), once per way of running the seeds:

* ``separate``: ``Executor(seed_batch=1)``, every point its own call (the sweep before seed batching:
  one compiled program per shape, reused by every seed);
* ``batched``: ``Executor(seed_batch=S)``, the S seeds as one vmapped call (``run_seed_group``).

Each (cell, way) runs in a fresh Python process: the first sweep there is **cold** (its wall time includes
JAX tracing and XLA compilation, which is also reported apart: the records' ``timings["compile"]``), then
``--repeats`` sweeps of the same grid into fresh folders are **warm** (median reported). ``ratio`` =
separate / batched wall time (> 1: batching wins), for warm and for cold. The ways alternate and the whole
table is repeated ``--rounds`` times, so load on a shared machine shows as spread. Every batched record is
checked against its separate record (largest relative difference over :data:`CHECKED`).

``--workers K`` adds the whole grid (every width and N, S seeds) on K workers of ``--worker-kind``
(``submitit-local``: a fresh process per task, as Slurm runs it; ``local``: K persistent worker processes),
cold only (every sweep starts its workers): ``separate`` sends one point per task, ``batched`` one seed
group per task.

``--profile`` first prints where a point's time goes, single vs vmapped over S seeds, warm (min of
repeats): the empirical NTK on X ∪ X*, the eigendecomposition, the real and the linearized 500-step
trainings, the whole compiled comparison, and the host work around it in ``run_point`` (model building,
eager checks, result transfer, record).

Usage::

    python benchmarks/seed_batching.py [--widths 64 256 1024] [--samples 8 32] [--seeds 4] [--repeats 3]
                                       [--rounds 2] [--workers 2 [--worker-kind local] [--workers-only]]
                                       [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the headline metrics; round-off-sized ones (lin_consistency, the weight gap at the first steps, the final
# loss of a run that converged to ~1e-6) are left out
CHECKED = ("test_gap", "train_gap", "lin_trained_test_gap", "lin_trained_train_gap", "kernel_drift", "loss_initial",
           "test_loss_final", "max_learning_rate")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--samples", type=int, nargs="+", default=[8, 32], help="training-set sizes N")
    p.add_argument("--seeds", type=int, default=4, help="S, the seeds of the grid (batched together)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="warm sweeps per process; the median is reported")
    p.add_argument("--rounds", type=int, default=2, help="times the whole table is measured")
    p.add_argument("--workers", type=int, default=0, help="also measure the whole grid on K workers (cold)")
    p.add_argument("--worker-kind", default="submitit-local", choices=("submitit-local", "local"))
    p.add_argument("--workers-only", action="store_true", help="skip the in-process cells")
    p.add_argument("--profile", action="store_true", help="print the per-component profile first")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one (cell, way) in this process
    return p.parse_args(argv)


def _grid(width, samples, seeds: int, steps: int):
    from ntkdyn.experiments.sweep import SweepGrid

    widths, samples = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (width, samples))
    return SweepGrid(widths=widths, samples=samples, seeds=tuple(range(seeds)), steps=steps)


# --------------------------------------------------------------------------- #
# one (cell, way) in a fresh process
# --------------------------------------------------------------------------- #


def child(spec: dict) -> dict:
    """Cold sweep, then warm sweeps of one grid on one executor; wall times, compile time, the records."""
    from ntkdyn.experiments.executors import Executor
    from ntkdyn.experiments.sweep import sweep

    grid = _grid(spec["width"], spec["samples"], spec["seeds"], spec["steps"])
    if spec["workers"]:
        executor = Executor(spec["kind"], workers=spec["workers"], seed_batch=spec["seed_batch"])
    else:
        executor = Executor(seed_batch=spec["seed_batch"])

    def once():
        with tempfile.TemporaryDirectory() as out:
            tic = time.perf_counter()
            outcome = sweep(grid, out, executor=executor)
            wall = time.perf_counter() - tic
        assert outcome.ran == len(grid.points()) and not outcome.failed, outcome.failed
        return wall, outcome.records

    cold, records = once()
    warm = [once()[0] for _ in range(spec["repeats"])] if not spec["workers"] else []
    return {"cold_s": cold, "warm_s": warm, "compile_s": sum(r["timings"]["compile"] for r in records),
            "metrics": {r["key"]: {k: r["metrics"][k] for k in CHECKED} for r in records}}


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worst_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for seed, metrics in a.items():
        for name, value in metrics.items():
            other = b[seed][name]
            if math.isfinite(value) and math.isfinite(other):
                worst = max(worst, abs(value - other) / max(abs(value), 1e-30))
    return worst


def compare_cell(width, samples, args, workers: int = 0) -> dict:
    spec = dict(width=width, samples=samples, seeds=args.seeds, steps=args.steps, repeats=args.repeats,
                workers=workers, kind=args.worker_kind)
    sep = run_child(dict(spec, seed_batch=1))
    bat = run_child(dict(spec, seed_batch=args.seeds))
    row = {"width": width, "samples": samples, "seeds": args.seeds, "workers": workers,
           "separate_cold_s": sep["cold_s"], "batched_cold_s": bat["cold_s"],
           "cold_ratio": sep["cold_s"] / bat["cold_s"],
           "separate_compile_s": sep["compile_s"], "batched_compile_s": bat["compile_s"],
           "max_rel_diff": _worst_difference(sep["metrics"], bat["metrics"])}
    if sep["warm_s"]:
        row.update(separate_warm_s=statistics.median(sep["warm_s"]), batched_warm_s=statistics.median(bat["warm_s"]))
        row["warm_ratio"] = row["separate_warm_s"] / row["batched_warm_s"]
    return row


# --------------------------------------------------------------------------- #
# the profile: where a point's time goes, one seed vs S vmapped
# --------------------------------------------------------------------------- #


def profile(width: int, samples: int, args) -> list[tuple[str, float, float]]:
    """``(component, one seed (s), S seeds vmapped (s))``, warm, min of ``args.repeats`` (at least 3)."""
    import jax
    import jax.numpy as jnp

    from ntkdyn.experiments import compare as C
    from ntkdyn.experiments import train as T
    from ntkdyn.experiments.sweep import _compare_options, _dataset, _network, run_point, run_seed_group
    from ntkdyn.kernels import empirical_ntk
    from ntkdyn.linearization import linearize

    s = args.seeds
    configs = _grid(width, samples, 2 * s, args.steps).points()
    cache: dict = {}
    data = _dataset(configs[0], cache)
    members = [_network(c, data) for c in configs[:s]]
    options = _compare_options(configs[0])
    arrays, inputs, beta, recorded = C._prepare(
        members[0][0], members[0][1], data.x_train, data.y_train, x_test=data.x_test, y_test=data.y_test,
        seed=0, diag_reg=0.0, steps=options["steps"], learning_rate=options["learning_rate"],
        record_at=options["record_at"], time="discrete", momentum=0.0, batch_size=None, optimizer="sgd", loss="mse")
    static = C._static(inputs, recorded, beta, lr_relative=False, time="discrete", diag_reg_absolute=False,
                       trace_outputs=False, ntk_method="auto", ntk_tile_size="auto", optimizer="sgd", loss="mse")
    model, params0, x, y, x_test, _, _, slots, key, lr, _ = arrays
    models, params, keys = C._stack_members(members, list(range(s)), model, params0, key)
    x_all = jnp.concatenate([x, x_test])
    n = x.shape[0]
    reps = max(3, args.repeats)

    def best(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(reps):
            tic = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - tic)
        return min(times)

    def pair(fn, one_args, many_args, axes):
        return best(jax.jit(fn), *one_args), best(jax.jit(jax.vmap(fn, in_axes=axes)), *many_args)

    def ntk(m, p):
        return empirical_ntk(m, p, x_all)

    def eigh(m, p):
        return jnp.linalg.eigh(empirical_ntk(m, p, x)[:n, :n])

    def real(m, p, k):
        return T.run(m, p, x, y, x_test, slots, k, lr, optimizer=T.make_optimizer("sgd", lr), steps=args.steps,
                     batch_size=None, num_records=int(recorded.size))

    def lin(m, p, k):
        return T.run(linearize(m, p), p, x, y, x_test, slots, k, lr, optimizer=T.make_optimizer("sgd", lr),
                     steps=args.steps, batch_size=None, num_records=int(recorded.size))

    rows = []
    ntk_one, ntk_many = pair(ntk, (model, params0), (models, params), (0, 0))
    rows.append(("empirical NTK on X ∪ X*", ntk_one, ntk_many))
    eigh_one, eigh_many = pair(eigh, (model, params0), (models, params), (0, 0))
    rows.append(("eigh (+ NTK on X)", eigh_one, eigh_many))
    rows.append(("real training", *pair(real, (model, params0, key), (models, params, keys), (0, 0, 0))))
    rows.append(("linearized training", *pair(lin, (model, params0, key), (models, params, keys), (0, 0, 0))))
    whole_one = best(lambda: C._compare(*arrays, **static))
    whole_many = best(lambda: C._compare_many(models, params, *arrays[2:8], keys, *arrays[9:], **static))
    rows.append(("whole compiled comparison", whole_one, whole_many))
    run_point(configs[s], cache)  # compile the host side's small programs too
    run_seed_group(configs[s:], cache)
    point = min(_timed(lambda c=c: run_point(c, cache)) for c in configs[s:])
    group = min(_timed(lambda: run_seed_group(configs[s:], cache)) for _ in range(reps))
    rows.append(("host work around it (run_point − compiled)", point - whole_one, group - whole_many))
    rows.append(("run_point / run_seed_group", point, group))
    return rows


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import jax

    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); S = {args.seeds} "
          f"seeds, {args.steps} steps, warm = median of {args.repeats}, {args.rounds} round(s)", flush=True)
    rows: list[dict] = []
    if args.profile:
        print("\nprofile (warm, min of repeats): component | one seed (ms) | S × one (ms) | S vmapped (ms) | ratio")
        for width in args.widths:
            for samples in args.samples:
                for name, one, many in profile(width, samples, args):
                    print(f"w={width} N={samples} | {name} | {one * 1e3:.2f} | {args.seeds * one * 1e3:.2f} | "
                          f"{many * 1e3:.2f} | {args.seeds * one / many:.2f}", flush=True)
                    rows.append({"profile": name, "width": width, "samples": samples, "one_s": one, "many_s": many})
    print("\nsweep: round | width | N | workers | separate warm (s) | batched warm (s) | warm ratio | "
          "separate cold (s) | batched cold (s) | cold ratio | compile separate (s) | compile batched (s) | "
          "max rel diff", flush=True)
    cells = [] if args.workers_only else [(w, n, 0) for w in args.widths for n in args.samples]
    if args.workers:
        cells.append((args.widths, args.samples, args.workers))
    for rnd in range(args.rounds):
        for width, samples, workers in cells:
            row = dict(compare_cell(width, samples, args, workers), round=rnd)
            rows.append(row)
            warm = (f"{row['separate_warm_s']:.3f} | {row['batched_warm_s']:.3f} | {row['warm_ratio']:.2f}"
                    if "warm_ratio" in row else "– | – | –")
            where = f"{workers} × {args.worker_kind}" if workers else "in process"
            print(f"{rnd} | {width} | {samples} | {where} | {warm} | "
                  f"{row['separate_cold_s']:.2f} | {row['batched_cold_s']:.2f} | {row['cold_ratio']:.2f} | "
                  f"{row['separate_compile_s']:.2f} | {row['batched_compile_s']:.2f} | "
                  f"{row['max_rel_diff']:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
