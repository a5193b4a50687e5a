"""Predictions at large N: the matrix-free Krylov solver against the exact path and a float64 reference.

Usage (from the repository root)::

    python benchmarks/scale.py                         # the default grid (see CASES), float32
    python benchmarks/scale.py --cases k1_n10000 k10_n2000
    python benchmarks/scale.py --cases k1_n100000      # the N = 100,000 target (~15 min, no reference)
    python benchmarks/scale.py --json out.json         # also write the rows

Problem: synthetic regression (``ntkdyn.experiments.data.synthetic_regression``,
d = 8, inputs on the sphere of radius √d, 1,000 test points), MLP 2×256 erf
(NTK parameterization, σ_w = 1.5, σ_b = 0.05), K = 1 or 10 outputs (full
kernel), gradient flow with η = 1, t ∈ {10, 100, 1000}, float32 unless said.

Each (case, solver) runs in a fresh worker process and reports:

* ``total_s``: wall time of ``ntkdyn.predict``, compilation included;
  ``compile_s``: lowering + compiling its program (that of
  :func:`ntkdyn.krylov.prediction_program`) first, on its own, so that
  ``total_s − compile_s`` is the computation alone (eigh: not separated);
* ``peak_gib``: the worker's peak resident memory (``VmHWM``), everything included;
* ``cpu_s``: the worker's CPU time (user + system, whole process): on a shared
  machine the wall time grows with the load, this does not;
* ``iterations`` and the largest ``error_estimate`` over the times;
* true errors against a reference, per time then the worst one:
  ``err_train = ‖f_t(X) − f_ref‖ / ‖f₀(X) − Y‖`` (what ``est_out`` estimates) and
  ``err_test = ‖f_t(x*) − f_ref(x*)‖ / ‖f_ref(x*) − f₀(x*)‖`` (relative to how far
  the test outputs move). The reference is the float64 Krylov solve at
  ``tol = 1e-10`` of the same float32 network and data (cast to float64:
  "the solver's own error") and, where the kernel fits, the exact float32
  eigh path (which also freezes the modes below its cut-off at finite t:
  "the semantics' difference", see docs/scale.md);
* ``krylov64`` / ``eigh64``: the same problem cast to float64, Krylov at its
  default tol (1.5e-8) against the exact float64 path: the float64 accuracy;
* ``true/est``: the worst ratio over times of the true error to the error
  estimate (the target: never above 10).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

TIMES = (10.0, 100.0, 1000.0)
N_TEST = 1000
# name -> (N, K, solvers run on it). "krylov"/"eigh": float32 at the default tol; "krylov64"/"eigh64": the same
# in float64 (network and data cast); "f64": the float64 Krylov reference at tol = 1e-10
CASES = {
    "k1_n1000": (1000, 1, ("krylov", "eigh", "f64", "krylov64", "eigh64")),  # a smoke test
    "k1_n5000": (5000, 1, ("krylov", "eigh", "f64", "krylov64", "eigh64")),
    "k1_n10000": (10000, 1, ("krylov", "eigh", "f64")),
    "k1_n20000": (20000, 1, ("krylov", "f64")),
    "k1_n50000": (50000, 1, ("krylov", "f64")),
    "k1_n100000": (100000, 1, ("krylov",)),
    "k10_n1000": (1000, 10, ("krylov", "eigh", "f64", "krylov64", "eigh64")),
    "k10_n10000": (10000, 10, ("krylov", "f64")),
}
DEFAULT_CASES = ("k1_n1000", "k1_n5000", "k1_n10000", "k1_n20000", "k10_n1000", "k10_n10000")
# which reference each solver's error is measured against, in order of preference
REFERENCES = {"krylov": ("f64", "eigh"), "eigh": ("f64",), "krylov64": ("eigh64", "f64")}


def peak_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def problem(n: int, k: int):
    import jax.numpy as jnp

    from ntkdyn import models
    from ntkdyn.experiments.data import synthetic_regression

    data = synthetic_regression(n, N_TEST, in_features=8, out_features=k, seed=0, dtype=jnp.float32)
    f, p = models.mlp(8, k, width=256, depth=2, activation="erf", seed=0, dtype=jnp.float32)
    return f, p, data


def worker(case: str, solver: str, out: str) -> None:
    """One (case, solver) in this process: time it, save its outputs, print one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    wide = solver in ("f64", "krylov64", "eigh64")
    if wide:
        jax.config.update("jax_enable_x64", True)
    import ntkdyn
    from ntkdyn import krylov

    n, k, _ = CASES[case]
    f, p, data = problem(n, k)
    x, y, xt = data.x_train, data.y_train, data.x_test
    times = jnp.asarray(TIMES, jnp.float32)
    options = dict(solver="eigh" if solver.startswith("eigh") else "krylov")
    if wide:
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
        x, y, xt, times = (a.astype(jnp.float64) for a in (x, y, xt, times))
    if solver == "f64":
        options["tol"] = 1e-10
    compile_s = float("nan")
    if options["solver"] == "krylov":  # compile the program first; predict then finds it in JAX's in-memory cache
        program, args, static = krylov.prediction_program(
            f, p, x, y, times, x_test=xt, tol=options.get("tol"), precision="highest")
        start = time.perf_counter()
        program.lower(*args, **static).compile()
        compile_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = ntkdyn.predict(p, x, y, times, apply_fn=f, x_test=xt, **options)
    jax.block_until_ready(pred.fx_test)
    total = (0.0 if options["solver"] == "eigh" else compile_s) + time.perf_counter() - start
    np.savez(out, fx_train=np.asarray(pred.fx_train, np.float64), fx_test=np.asarray(pred.fx_test, np.float64),
             fx_train_0=np.asarray(pred.fx_train_0, np.float64), fx_test_0=np.asarray(pred.fx_test_0, np.float64),
             y=np.asarray(y, np.float64))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row = dict(case=case, solver=solver, n=n, k=k, total_s=total, compile_s=compile_s, peak_gib=peak_gib(),
               cpu_s=usage.ru_utime + usage.ru_stime,
               iterations=None if pred.iterations is None else int(pred.iterations),
               estimate=None if pred.error_estimate is None else float(np.max(pred.error_estimate)),
               estimates=None if pred.error_estimate is None else [float(e) for e in pred.error_estimate],
               devices=jax.device_count(), load=os.getloadavg()[0])
    print("ROW " + json.dumps(row), flush=True)


def errors(result: str, reference: str):
    """Per time: (train error relative to ‖r₀‖, test error relative to the reference's test moves)."""
    import numpy as np

    a, b = np.load(result), np.load(reference)
    r0 = np.linalg.norm(b["fx_train_0"] - b["y"])
    train = np.linalg.norm((a["fx_train"] - b["fx_train"]).reshape(len(TIMES), -1), axis=1) / r0
    moves = np.linalg.norm((b["fx_test"] - b["fx_test_0"]).reshape(len(TIMES), -1), axis=1)
    test = np.linalg.norm((a["fx_test"] - b["fx_test"]).reshape(len(TIMES), -1), axis=1) / moves
    return train, test


def run_case(case: str, tmp: str) -> list[dict]:
    rows = {}
    for solver in CASES[case][2]:
        out = os.path.join(tmp, f"{case}_{solver}.npz")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case, solver, out],
                              cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            print(f"{case} {solver}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1][4:])
        row["file"] = out
        rows[solver] = row
        print(f"  {case} {solver}: {row['total_s']:.1f} s (cpu {row['cpu_s']:.0f} s, load {row['load']:.1f}), "
              f"peak {row['peak_gib']:.2f} GiB, "
              f"iterations {row['iterations']}, estimate {row['estimate']}", flush=True)
    for solver, refs in REFERENCES.items():
        row = rows.get(solver)
        present = [ref for ref in refs if ref in rows]
        if row is None or not present:
            continue
        for ref in present:
            train, test = errors(row["file"], rows[ref]["file"])
            row[f"err_train_vs_{ref}"], row[f"err_test_vs_{ref}"] = float(train.max()), float(test.max())
            if ref == present[0]:
                row["reference"] = ref
                row["err_train"], row["err_test"] = float(train.max()), float(test.max())
                if row["estimates"] is not None:  # how far the estimate falls short of the true error, worst time
                    worst = max(train.max(), test.max())
                    row["shortfall"] = float(max(max(e1, e2) / est for e1, e2, est in
                                                 zip(train, test, row["estimates"])))
                    row["err_max"] = float(worst)
    return list(rows.values())


def fmt(value, spec=".2g"):
    return "–" if value is None or value != value else format(value, spec)


def table(rows: list[dict]) -> str:
    """Markdown: one row per (case, solver); errors against the solver's first available reference.

    ``true/est`` is ``max_t max(err_train(t), err_test(t)) / estimate(t)``: above 1 the estimate was
    optimistic at some time (the target is at most 10).
    """
    head = ("| case | solver | total s | cpu s | compile s | peak GiB | iterations | estimate (max over t) | "
            "reference | err train | err test | true/est | err train vs eigh (f32) |")
    lines = [head, "| " + " | ".join(["---"] * 13) + " |"]
    for r in rows:
        what = f"N={r['n']:,}, K={r['k']}"
        lines.append(
            f"| {what} | {r['solver']} | {fmt(r['total_s'], '.1f')} | {fmt(r['cpu_s'], '.0f')} | "
            f"{fmt(r['compile_s'], '.1f')} | "
            f"{fmt(r['peak_gib'], '.2f')} | {fmt(r['iterations'], 'd') if r['iterations'] else '–'} | "
            f"{fmt(r['estimate'])} | {r.get('reference', '–')} | {fmt(r.get('err_train'))} | "
            f"{fmt(r.get('err_test'))} | {fmt(r.get('shortfall'))} | {fmt(r.get('err_train_vs_eigh'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=sorted(CASES))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "SOLVER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            print(f"{case} (load average {os.getloadavg()[0]:.1f})", flush=True)
            rows += run_case(case, tmp)
    for r in rows:
        r.pop("file", None)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
