"""The ``ntkdyn`` command.

::

    ntkdyn sweep   [--widths ..] [--samples ..] [--seeds ..] [--steps ..] [--lr ..] [--depth ..] [--out DIR]
    ntkdyn report  DIR
    ntkdyn compare [--width W] [--samples N] [--seed S] [--steps T] [--lr η] ...

``sweep`` runs (or resumes) a width × N × seed grid of real-vs-linearized
comparisons, appending each point to ``DIR/results.jsonl``, then writes
``summary.csv``, ``slopes.csv``, PNG figures and ``report.md``. Another sweep
on the same ``DIR`` waits for the first (``--no-wait``: refuse instead). The
points run in process (default), on ``--workers N`` local processes, on Ray
(``--executor ray [--address ADDR]``) or on Slurm (``--executor slurm``,
``--slurm-*``); this process alone writes ``DIR`` (docs/clusters.md).
``report`` re-renders those from ``results.jsonl`` alone. ``compare`` runs one
configuration and prints its step-by-step table.

Every user error (a bad option or value, an unusable folder, a disk that
fills up) is one line on stderr and exit status 2; failed points give 1,
Ctrl-C gives 130.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from typing import Sequence

from ntkdyn.experiments.executors import EXECUTORS, Executor, MissingExtra
from ntkdyn.experiments.sweep import ResultsLocked, SweepGrid

__all__ = ["main", "build_parser"]

_DEFAULTS = SweepGrid()


def _model_args(p: argparse.ArgumentParser, *, many: bool) -> None:
    nargs = "+" if many else None
    p.add_argument("--depth", "--depths", dest="depths", type=int, nargs=nargs,
                   default=list(_DEFAULTS.depths) if many else _DEFAULTS.depths[0], help="hidden layers")
    p.add_argument("--activation", "--activations", dest="activations", nargs=nargs,
                   default=list(_DEFAULTS.activations) if many else _DEFAULTS.activations[0],
                   help="erf relu tanh gelu sigmoid linear")
    p.add_argument("--parameterization", "--parameterizations", dest="parameterizations", nargs=nargs,
                   default=list(_DEFAULTS.parameterizations) if many else _DEFAULTS.parameterizations[0],
                   help="ntk or standard")
    p.add_argument("--lr", dest="learning_rates", type=float, nargs=nargs,
                   default=list(_DEFAULTS.learning_rates) if many else _DEFAULTS.learning_rates[0],
                   help="learning rate(s) η")
    p.add_argument("--lr-relative", action="store_true",
                   help="read --lr as multiples of each point's stability limit 2(1+β)n/λ_max")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="real gradient steps per point")
    p.add_argument("--records", type=int, default=_DEFAULTS.num_records, help="recorded (log-spaced) steps")
    p.add_argument("--data", "--dataset", dest="dataset", default=_DEFAULTS.dataset,
                   help="synthetic, digits, or PATH.npz with x_train, y_train, x_test, y_test (y: (N, K) targets "
                        "or (N,) integer labels -> one-hot); docs/own_models.md")
    p.add_argument("--subset", default=_DEFAULTS.subset, choices=("first", "random"),
                   help="which training rows of a .npz --samples takes: the first N, or N drawn with --data-seed")
    p.add_argument("--model", default=_DEFAULTS.model,
                   help="network family: mlp, cnn, resmlp, PATH.py:NAME or package.module:NAME, a function "
                        "family(width, *, seed, input_shape, out_features) (docs/own_models.md)")
    p.add_argument("--optimizer", default=_DEFAULTS.optimizer, choices=("sgd", "momentum", "adam"),
                   help="optimizer of the real and of the linearized training (momentum: heavy ball with --momentum)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="minibatch size (0: full batch); one shuffled order per seed, shared by both trainings")
    p.add_argument("--loss", default=_DEFAULTS.loss, choices=("mse", "cross_entropy"),
                   help="training loss; cross_entropy for class labels, compared with the linearized training only")
    p.add_argument("--n-test", type=int, default=_DEFAULTS.n_test, help="test-set size")
    p.add_argument("--in-features", type=int, default=_DEFAULTS.in_features, help="synthetic input dimension")
    p.add_argument("--out-features", type=int, default=_DEFAULTS.out_features,
                   help="synthetic outputs K (digits: number of classes, default 10)")
    p.add_argument("--data-seed", type=int, default=_DEFAULTS.data_seed, help="seed of the data set")
    p.add_argument("--time", default=_DEFAULTS.time, choices=("discrete", "continuous"),
                   help="prediction clock (discrete = exact counterpart of the real steps)")
    p.add_argument("--momentum", type=float, default=_DEFAULTS.momentum, help="heavy-ball β for both sides")
    p.add_argument("--x64", action="store_true", help="run in float64 (enables jax_enable_x64)")


def _executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the points run (docs/clusters.md; this process alone writes --out)")
    g.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: this process, or --workers local processes; ray: Ray tasks; slurm: a Slurm job "
                        "array (submitit); submitit-local: submitit's code path as local jobs. ray and submitit "
                        "come with pip install 'ntkdyn[cluster]'")
    g.add_argument("--workers", type=int, default=None,
                   help="points running at the same time (local default 1 = in process; submitit-local and a local "
                        "Ray: usable cores / --worker-threads; Slurm: the job array's parallelism)")
    g.add_argument("--worker-threads", type=int, default=None,
                   help="CPU threads per worker (local processes: cores / workers; Ray, Slurm: 1 = cpus-per-task)")
    g.add_argument("--seed-batch", type=int, default=None,
                   help="the most points differing only in their seed that run as one vmapped call, one task (1 = "
                        "one by one; default 4 for slurm and submitit-local, where every task is a fresh process "
                        "compiling its own program, else 1)")
    g.add_argument("--address", default=None, help="an existing Ray cluster (auto, host:6379, ray://host:10001)")
    g.add_argument("--jobs-folder", default=None, help="submitit's pickles and logs (default OUT/submitit)")
    g.add_argument("--slurm-time", type=int, default=60, help="job time limit in minutes (also the local job timeout)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-mem", type=float, default=None, help="memory per job in GB")
    g.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each job (repeat the option for more lines)")


# Executor fields -> the options that set them (error messages name what the user typed)
_EXECUTOR_FLAGS = {"executor": "--executor", "workers": "--workers", "threads": "--worker-threads",
                   "address": "--address", "time_min": "--slurm-time", "partition": "--slurm-partition",
                   "account": "--slurm-account", "qos": "--slurm-qos", "mem_gb": "--slurm-mem",
                   "gpus": "--slurm-gpus", "setup": "--slurm-setup", "seed_batch": "--seed-batch"}


def _executor(args) -> Executor:
    try:
        return Executor(
            kind=args.executor, workers=args.workers, threads=args.worker_threads, address=args.address,
            folder=args.jobs_folder, time_min=args.slurm_time, partition=args.slurm_partition,
            account=args.slurm_account, qos=args.slurm_qos, mem_gb=args.slurm_mem, gpus=args.slurm_gpus,
            setup=tuple(args.slurm_setup), seed_batch=args.seed_batch,
        ).resolve()
    except (ValueError, TypeError) as err:
        name, sep, rest = str(err).partition(": ")
        if sep and name in _EXECUTOR_FLAGS:
            raise type(err)(f"{_EXECUTOR_FLAGS[name]}: {rest}") from err
        raise


class _UsageError(Exception):
    """An argparse error, reported by :func:`main` as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we want one line and exit status 2
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ntkdyn",
        description="Predict neural-network training from the NTK and measure where the prediction breaks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sw = sub.add_parser("sweep", help="width × N × seed grid of real vs linearized training (resumable)")
    sw.add_argument("--widths", type=int, nargs="+", default=list(_DEFAULTS.widths))
    sw.add_argument("--samples", type=int, nargs="+", default=list(_DEFAULTS.samples), help="training-set sizes N")
    sw.add_argument("--seeds", type=int, nargs="+", default=list(_DEFAULTS.seeds), help="initialization seeds")
    _model_args(sw, many=True)
    sw.add_argument("--out", default="ntkdyn-results", help="results folder (resumes if it has results)")
    sw.add_argument("--no-report", action="store_true", help="only run points; skip summary.csv/figures/report.md")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.add_argument("--no-wait", action="store_true",
                    help="if another sweep is using --out, stop with an error instead of waiting for it")
    _executor_args(sw)

    rp = sub.add_parser("report", help="re-render summary.csv, figures and report.md from DIR/results.jsonl")
    rp.add_argument("dir")

    cp = sub.add_parser("compare", help="one configuration: real vs linearized, step by step")
    cp.add_argument("--width", type=int, default=512)
    cp.add_argument("--samples", type=int, default=_DEFAULTS.samples[-1], help="training-set size N")
    cp.add_argument("--seed", type=int, default=0)
    _model_args(cp, many=False)
    return parser


def _grid(args, *, widths, samples, seeds, one: bool) -> SweepGrid:
    def many(v):
        return (v,) if one else tuple(v)

    return SweepGrid(
        widths=tuple(widths), samples=tuple(samples), seeds=tuple(seeds),
        depths=many(args.depths), learning_rates=many(args.learning_rates), lr_relative=args.lr_relative,
        activations=many(args.activations), parameterizations=many(args.parameterizations),
        dataset=args.dataset, n_test=args.n_test, steps=args.steps, num_records=args.records, time=args.time,
        momentum=args.momentum, data_seed=args.data_seed, in_features=args.in_features,
        out_features=args.out_features, dtype="float64" if args.x64 else "float32", model=args.model,
        optimizer=args.optimizer, batch_size=args.batch_size, loss=args.loss, subset=args.subset,
    )


def _num(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], out=None) -> None:
    out = out or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)), file=out)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=out)


def _print_slopes(records, out=None) -> None:
    out = out or sys.stdout
    from ntkdyn.experiments.report import slope_table

    # the infinite-width ones print only where they apply (mlp/cnn points with a closed form)
    metrics = ("test_gap", "train_gap", "lin_trained_test_gap", "kernel_drift", "inf_kernel_error",
               "inf_lin_test_gap", "inf_real_test_gap")
    rows = [s for s in slope_table(records, metrics=metrics) if s["seeds"]]  # no fit: e.g. no closed form
    if not rows:
        return
    print("\nlog-log slope vs width (mean ± std over seeds [min … max]):", file=out)
    table = []
    for s in rows:
        table.append([str(s["n_train"]), str(s["depth"]), s["activation"], _num(s["learning_rate"]), s["metric"],
                      f"{s['slope_mean']:+.2f} ± {s['slope_std']:.2f}",
                      f"[{s['slope_min']:+.2f} … {s['slope_max']:+.2f}]", str(s["seeds"]), s["widths"]])
    _print_table(["N", "depth", "act", "lr", "metric", "slope", "range", "seeds", "widths"], table, out)


def _enable_x64(args) -> None:
    if getattr(args, "x64", False):
        import jax

        jax.config.update("jax_enable_x64", True)


def _warnings_to_stderr(command: str):
    """Report warnings raised inside the block as one line each on stderr."""

    @contextlib.contextmanager
    def block():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    print(f"ntkdyn {command}: warning: {_one_line(str(w.message))}", file=sys.stderr)

    return block()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cmd_sweep(args) -> int:
    from ntkdyn.experiments.report import write_report
    from ntkdyn.experiments.sweep import prepare_output, sweep

    _enable_x64(args)
    grid = _grid(args, widths=args.widths, samples=args.samples, seeds=args.seeds, one=False).validate()
    executor = _executor(args)  # a missing extra or a bad option: one line, before any work
    prepare_output(args.out)  # fail before any work on an unwritable folder
    total = len(grid.points())
    print(f"ntkdyn sweep: {total} points -> {args.out}/results.jsonl, on {executor.describe()}", file=sys.stderr)
    outcome = sweep(grid, args.out, progress=not args.quiet, wait=not args.no_wait, executor=executor)
    print(f"ran {outcome.ran}, skipped {outcome.skipped} already finished, failed {len(outcome.failed)}")
    for config, error in outcome.failed:
        print(f"  failed: width={config['width']} N={config['n_train']} seed={config['seed']}: {_one_line(error)}",
              file=sys.stderr)
    if outcome.failed:
        print(f"ntkdyn sweep: tracebacks in {args.out}/failures.jsonl; run the same command again to retry the "
              "failed points", file=sys.stderr)
    if outcome.moved_aside:
        parts = ", ".join(f"{n} {kind}" for kind, n in outcome.moved_aside.items())
        print(f"ntkdyn sweep: warning: moved unusable lines of {args.out}/results.jsonl ({parts}) "
              "to results.rejected.jsonl", file=sys.stderr)
    if outcome.left_out:
        parts = ", ".join(f"{n} {kind}" for kind, n in outcome.left_out.items())
        print(f"ntkdyn sweep: warning: {args.out}/results.jsonl has lines that were not counted ({parts}); "
              "see `ntkdyn report`", file=sys.stderr)
    if not args.no_report and outcome.records:
        written = write_report(args.out, outcome.records)
        _print_slopes(outcome.records)
        print(f"\nwrote {', '.join(sorted(p.name for p in written.values()))} in {args.out}")
    return 1 if outcome.failed else 0


def _cmd_report(args) -> int:
    from ntkdyn.experiments.report import write_report

    written = write_report(args.dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # write_report has reported the left-out lines once
        from ntkdyn.experiments.sweep import load_results

        _print_slopes(load_results(args.dir))
    print(f"\nwrote {', '.join(sorted(p.name for p in written.values()))} in {args.dir}")
    return 0


def _cmd_compare(args) -> int:
    from ntkdyn.experiments.sweep import run_point

    _enable_x64(args)
    grid = _grid(args, widths=(args.width,), samples=(args.samples,), seeds=(args.seed,), one=True)
    (config,) = grid.validate().points()
    rec = run_point(config)
    m, c = rec["metrics"], rec["curves"]
    batch = f"batch {config['batch_size']}" if config["batch_size"] else "full batch"
    print(f"{config['model']} width={config['width']} depth={config['depth']} {config['activation']} "
          f"{config['parameterization']}, {config['dataset']} N={config['n_train']} (test {config['n_test']}), "
          f"seed {config['seed']}, {config['optimizer']} {batch} on {config['loss']}, "
          f"η={m['learning_rate']:.4g} (η/η_max={m['lr_ratio']:.3g}), {config['steps']} {config['time']} steps, "
          f"{config['dtype']}")
    header = ["step", "loss", "loss lin", "test loss", "test lin", "train gap", "test gap",
              "f(θlin) gap", "f_lin(θlin)-Eq9/10", "weight gap", "lin-trained gap (test)"]
    rows = []
    for i, step in enumerate(c["steps"]):
        def at(name):
            return _num(c[name][i]) if name in c else "-"

        rows.append([str(int(step)), at("loss"), at("loss_lin"), at("test_loss"), at("test_loss_lin"),
                     at("train_gap"), at("test_gap"), at("eq8_test_gap"), at("lin_consistency"), at("weight_gap"),
                     at("lin_trained_test_gap")])
    print()
    _print_table(header, rows)
    print()
    print("gaps are relative: ‖f_t − f^lin_t‖ / ‖f_0 − Y‖; weight gap ‖θ_t − θ^lin_t‖ / ‖θ_t − θ_0‖; "
          "lin-trained: f_lin trained with the same optimizer, minibatches and steps")
    print(f"max lin-trained gap: test {_num(m['lin_trained_test_gap'])}, train {_num(m['lin_trained_train_gap'])}")
    if m["closed_form"]:
        print(f"max test gap {_num(m['test_gap'])}, max train gap {_num(m['train_gap'])}, "
              f"kernel drift {_num(m['kernel_drift'])}, max weight gap {_num(m['weight_gap'])}, "
              f"f_lin(θlin) vs Eq. 9/10 {_num(m['lin_consistency'])}"
              + ("" if m["linear_diverged"] else " (round-off)"))
    else:
        print(f"no closed form for {config['optimizer']} on {config['loss']}: the Eq. 8/9/10 columns are '-'; "
              f"kernel drift {_num(m['kernel_drift'])}")
    layers = {k[len("weight_change["):-1]: v for k, v in m.items() if k.startswith("weight_change[")}
    print("relative weight change per layer ‖θ_T − θ_0‖/‖θ_0‖: "
          + ", ".join(f"{k} {_num(v)}" for k, v in layers.items()))
    if m["linear_diverged"]:
        print(f"η is above the stability limit 2(1+β)n/λ_max = {m['max_learning_rate']:.4g}: "
              f"the linearized model diverges; real network {'diverged' if m['real_diverged'] else 'did not diverge'}")
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in rec["timings"].items()))
    return 0


def _error_text(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return _one_line(str(err)) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntkdyn`` console script (and ``python -m ntkdyn``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    commands = {"sweep": _cmd_sweep, "report": _cmd_report, "compare": _cmd_compare}
    try:
        with _warnings_to_stderr(args.command):
            return commands[args.command](args)
    except (ValueError, TypeError, ResultsLocked, OSError, MissingExtra) as err:
        print(f"ntkdyn {args.command}: error: {_error_text(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "out", None)
        if args.command == "sweep" and where:
            print(f"\ninterrupted: finished points are in {where}/results.jsonl; "
                  "run the same command again to resume", file=sys.stderr)
        return 130
