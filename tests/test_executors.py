"""Sweep points on worker processes, Ray and submitit: the same records as in process, each point once.

The engines run for real on this machine (2 worker processes, a local Ray
instance, submitit's local executor). Kept fast: every grid here
has one shape (one width, other seeds), so a worker compiles one program,
and the workers share a persistent JAX compilation cache (a temporary
folder, set through the environment they inherit), so only the first worker
to meet that shape compiles it and the others load it. The driver (this
process) is not affected: its JAX read the environment before the fixture ran.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ntkdyn.experiments import executors
from ntkdyn.experiments.cli import main
from ntkdyn.experiments.executors import Executor, MissingExtra, worker_environment
from ntkdyn.experiments.sweep import FAILURES_FILE, RESULTS_FILE, SweepGrid, load_results, point_key, sweep

ROOT = Path(__file__).resolve().parents[1]
# float64 (the suite runs with x64): a worker without the driver's x64 would compute in float32 and miss rtol=1e-9
GRID = SweepGrid(widths=(8,), samples=(4,), seeds=(0, 1, 2), steps=5, n_test=4, num_records=3, depths=(1,),
                 dtype="float64")
TOTAL = len(GRID.widths) * len(GRID.seeds)  # no GRID.points() here: workers import this file without x64
# one point per task (submitit-local would send the three seeds as one task by default: nothing to kill between);
# Ray and submitit-local with one worker at a time, so a kill always finds a point running. One thread each: the
# same XLA flags everywhere, so the program the first job (submitit-local) compiles into the shared cache is the
# one every later worker loads
ENGINES = {
    "submitit-local": Executor("submitit-local", workers=1, threads=1, seed_batch=1),
    "ray": Executor("ray", workers=1, threads=1),
    "processes": Executor("local", workers=2, threads=1),
}


@pytest.fixture(scope="module", autouse=True)
def worker_compilation_cache(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run in process: {key: record}."""
    outcome = sweep(GRID, tmp_path_factory.mktemp("in-process"))
    assert outcome.ran == TOTAL and outcome.failed == []
    return {r["key"]: r for r in outcome.records}


def keys_in_file(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


def assert_same_records(records, reference):
    """Same points, metrics and curves equal to float64 round-off."""
    assert {r["key"] for r in records} == set(reference)
    for rec in records:
        ref = reference[rec["key"]]
        assert rec["config"] == ref["config"]
        assert set(rec["metrics"]) == set(ref["metrics"])
        for name, value in rec["metrics"].items():
            np.testing.assert_allclose(value, ref["metrics"][name], rtol=1e-9, atol=1e-12, err_msg=name)
        assert set(rec["curves"]) == set(ref["curves"])
        for name, curve in rec["curves"].items():
            np.testing.assert_allclose(curve, ref["curves"][name], rtol=1e-9, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------- #
# every engine: the in-process records, each point once, resumed after a kill
# --------------------------------------------------------------------------- #


def cli_args(out: Path, executor: Executor) -> list[str]:
    """The command line of GRID (same configurations, same keys) on ``executor``."""
    return ["--widths", "8", "--samples", "4", "--seeds", "0", "1", "2", "--steps", "5", "--n-test", "4",
            "--records", "3", "--depth", "1", "--x64", "--quiet", "--no-report", "--out", str(out),
            "--executor", executor.kind, "--workers", str(executor.workers), "--worker-threads", str(executor.threads),
            "--seed-batch", str(executor.resolve().seed_batch)]


def start_and_kill(out: Path, executor: Executor) -> int:
    """Run the CLI driver in its own session, SIGKILL it once a point is written; return the points written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "ntkdyn", "sweep", *cli_args(out, executor)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    path = out / RESULTS_FILE
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the sweep ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
        with contextlib.suppress(ProcessLookupError):  # its session: workers never write, but must not
            os.killpg(proc.pid, signal.SIGKILL)        # outlive the test
    assert proc.returncode == -signal.SIGKILL
    return len(load_results(out))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_resumes_a_killed_sweep_with_the_in_process_records_each_point_once(tmp_path, reference, engine):
    executor = ENGINES[engine]
    out = tmp_path / engine
    done_before = start_and_kill(out, executor)
    assert 1 <= done_before < TOTAL

    tic = time.perf_counter()
    rerun = sweep(GRID, out, executor=executor)
    wall = time.perf_counter() - tic
    assert (rerun.total, rerun.skipped, rerun.ran, rerun.failed) == (TOTAL, done_before, TOTAL - done_before, [])
    keys = keys_in_file(out / RESULTS_FILE)
    assert sorted(keys) == sorted(reference) and len(set(keys)) == len(keys)
    assert_same_records(rerun.records, reference)
    assert {r["worker"]["executor"] for r in rerun.records} == {executor.kind}
    assert os.getpid() not in {r["worker"]["pid"] for r in rerun.records}
    print(f"{engine}: {wall:.1f} s for the last {rerun.ran} points")  # -s shows it

    again = sweep(GRID, out, executor=executor)  # nothing left: no worker is started
    assert (again.ran, again.skipped) == (0, TOTAL)


# --------------------------------------------------------------------------- #
# failures on a worker: recorded, not counted, retried
# --------------------------------------------------------------------------- #


PAIR = SweepGrid(widths=(8,), samples=(4,), seeds=(0, 1), steps=5, n_test=4, num_records=3, depths=(1,),
                 dtype="float64")


def test_a_point_that_raises_on_a_worker_is_recorded_failed_and_retried(tmp_path, monkeypatch, capsys):
    """The worker receives a task of two points, one of them broken (as if its code raised there)."""
    victim = PAIR.points()[1]
    make_task = executors._task

    def broken_task(configs, keys, options, kind):
        broken = [{**c, "activation": "no-such-activation"} if k == point_key(victim) else c
                  for c, k in zip(configs, keys)]
        return make_task(broken, keys, options, kind)

    monkeypatch.setattr(executors, "_task", broken_task)
    out = tmp_path / "failing"
    args = ["--widths", "8", "--samples", "4", "--seeds", "0", "1", "--steps", "5", "--n-test", "4",
            "--records", "3", "--depth", "1", "--x64", "--quiet", "--no-report", "--out", str(out), "--workers", "2",
            "--worker-threads", "1",
            "--seed-batch", "2"]  # both points in one task: each still gets its own record or error
    assert main(["sweep", *args]) == 1
    captured = capsys.readouterr()
    assert "ran 1, skipped 0 already finished, failed 1" in captured.out
    assert "width=8 N=4 seed=1" in captured.err and "failures.jsonl" in captured.err
    assert keys_in_file(out / RESULTS_FILE) == [point_key(PAIR.points()[0])]
    (failure,) = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert failure["key"] == point_key(victim) and failure["config"] == victim
    assert "no-such-activation" in failure["error"] and "Traceback" in failure["traceback"]
    assert failure["worker"]["executor"] == "local" and failure["worker"]["pid"] != os.getpid()
    assert len(load_results(out)) == 1  # a failure never counts as finished

    monkeypatch.setattr(executors, "_task", make_task)  # the worker's code is fixed: the next run retries
    assert main(["sweep", *args]) == 0
    assert "ran 1, skipped 1 already finished, failed 0" in capsys.readouterr().out
    keys = keys_in_file(out / RESULTS_FILE)
    assert len(keys) == len(set(keys)) == 2
    assert len((out / FAILURES_FILE).read_text().splitlines()) == 1  # the log of the old attempt stays


_run_task = executors.run_task


def die_on_seed_1(task):
    """A worker whose process dies (as when killed by the OOM killer) on the seed-1 points."""
    if any(c["seed"] == 1 for c in task["configs"]):
        os._exit(3)
    return _run_task(task)


def test_a_worker_that_dies_fails_its_point_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """submitit-local: one job per point, so only the point whose job died fails (retried next time, as above)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(executors, "run_task", die_on_seed_1)
    out = tmp_path / "dying"
    first = sweep(PAIR, out, executor=Executor("submitit-local", workers=2, threads=1, seed_batch=1))
    assert first.ran == 1 and [c["seed"] for c, _ in first.failed] == [1]
    (error,) = [e for _, e in first.failed]
    assert "did not return" in error and "logs:" in error
    (failure,) = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert failure["config"]["seed"] == 1 and failure["traceback"]
    assert keys_in_file(out / RESULTS_FILE) == [point_key(PAIR.points()[0])]
    # the finished job's files are gone, the dead job's logs stay for inspection
    jobs = out / "submitit"
    assert not list(jobs.rglob("*_result.pkl")) and len(list(jobs.rglob("*_log.err"))) == 1



# --------------------------------------------------------------------------- #
# seed groups: one task each, every point still its own outcome
# --------------------------------------------------------------------------- #


def test_seed_groups_are_one_task_and_every_point_comes_back_once(monkeypatch):
    """In process, without computing: groups of seed_batch, a failing group rerun point by point."""
    from ntkdyn.experiments import sweep as sweep_module

    configs = SweepGrid(widths=(8, 16), samples=(4,), seeds=(0, 1, 2), steps=5, n_test=4, num_records=3,
                        depths=(1,), dtype="float64").points()  # seeds vary slowest: 0/8, 0/16, 1/8, 1/16, ...
    groups, singles = [], []

    def group(batch, data_cache=None):
        groups.append([(c["width"], c["seed"]) for c in batch])
        if batch[0]["width"] == 16:
            raise RuntimeError("this group cannot be batched")
        return [{"key": point_key(c), "config": c, "seed_batch": len(batch)} for c in batch]

    def one(config, data_cache=None):
        singles.append((config["width"], config["seed"]))
        if config["seed"] == 2:
            raise ValueError("seed 2 fails")
        return {"key": point_key(config), "config": config}

    monkeypatch.setattr(sweep_module, "run_seed_group", group)
    monkeypatch.setattr(sweep_module, "run_point", one)
    results = list(executors.run_points(configs, Executor(seed_batch=2)))
    assert groups == [[(8, 0), (8, 1)], [(16, 0), (16, 1)]]  # the third seed of each width is a group of one
    assert singles == [(8, 2), (16, 0), (16, 1), (16, 2)]
    assert [(r.config["width"], r.config["seed"]) for r in results] == [(8, 0), (8, 1), (8, 2), (16, 0), (16, 1),
                                                                      (16, 2)]
    assert [r.ok for r in results] == [True, True, False, True, True, False]
    assert results[0].record["seed_batch"] == 2 and "seed 2 fails" in results[2].error
    assert {r.worker["executor"] for r in results} == {"local"} and results[2].traceback.startswith("Traceback")
    # one point per call (the in-process default): the grid's order, no group
    groups.clear(), singles.clear()
    assert [r.config for r in executors.run_points(configs, Executor())] == configs and groups == []


# --------------------------------------------------------------------------- #
# options, extras, environment
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("module,kind", [("ray", "ray"), ("submitit", "slurm"), ("submitit", "submitit-local")])
def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, capsys, module, kind):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MissingExtra, match=rf"executor: '{kind}' needs the optional package '{module}'.*ntkdyn\[cluster\]"):
        Executor(kind).resolve()
    with pytest.raises(MissingExtra, match="ntkdyn\\[cluster\\]"):
        sweep(GRID, tmp_path / "never", executor=kind)
    assert not (tmp_path / "never").exists()
    assert main(["sweep", "--widths", "8", "--out", str(tmp_path / "cli"), "--executor", kind]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install \"ntkdyn[cluster]\"" in err[0] and not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="dask"), "executor"),
        (dict(workers=0), "workers"),
        (dict(workers=2.5), "workers"),
        (dict(workers=2, threads=0), "threads"),
        (dict(threads=2), "threads"),  # in process: the driver's own threads
        (dict(address="auto"), "address"),
        (dict(kind="slurm", time_min=0), "time_min"),
        (dict(kind="slurm", mem_gb=-1.0), "mem_gb"),
        (dict(kind="submitit-local", partition="gpu"), "partition"),
        (dict(kind="slurm", partition=" "), "partition"),
        (dict(kind="slurm", setup="module load x"), "setup"),
        (dict(seed_batch=0), "seed_batch"),
        (dict(kind="ray", seed_batch=1.5), "seed_batch"),
    ],
)
def test_bad_executor_options_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=rf"^{match}:"):
        Executor(**kwargs).resolve()


def test_cli_names_its_own_options(tmp_path, capsys):
    for option, flag in ((["--workers", "0"], "--workers"), (["--worker-threads", "2"], "--worker-threads"),
                         (["--address", "auto"], "--address"), (["--slurm-partition", "p"], "--slurm-partition"),
                         (["--seed-batch", "0"], "--seed-batch")):
        assert main(["sweep", "--widths", "8", "--out", str(tmp_path / "x"), *option]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ntkdyn sweep: error: {flag}:") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_defaults_do_not_oversubscribe_the_cores():
    cores = len(executors._cores())
    local = Executor("local", workers=2).resolve()
    assert local.threads == max(1, cores // 2)
    sub = Executor("submitit-local").resolve()
    assert sub.threads == 1 and sub.workers == cores
    ray_here = Executor("ray", threads=cores).resolve()
    assert ray_here.workers == 1
    ray_there = Executor("ray", address="auto").resolve()
    assert ray_there.workers is None and ray_there.threads == 1
    assert Executor().resolve().in_process and Executor("local", workers=1).resolve().in_process
    # seed groups by default only where every task is a fresh process that compiles its own program
    assert [Executor(kind).resolve().seed_batch for kind in ("local", "ray", "submitit-local")] == [1, 1, 4]
    assert Executor(workers=2, seed_batch=8).resolve().seed_batch == 8
    # every worker gets its own group of cores while there are enough
    slots = executors._slots(list(range(8)), 4, 2)
    assert slots == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert executors._slots([0, 1], 3, 1) == [[0], [1], [0]]


def test_slurm_needs_its_commands_and_gets_the_job_options(tmp_path, monkeypatch):
    """No Slurm here: its absence is a clear error; with stand-in commands, submitit takes every option."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="^executor: 'slurm' needs the Slurm commands on PATH, sbatch and srun"):
        Executor("slurm").resolve()
    for command in ("sbatch", "srun"):
        (tmp_path / command).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / command).chmod(0o755)
    ex = Executor("slurm", workers=32, threads=4, time_min=120, partition="cpu", account="lab", qos="normal",
                  mem_gb=8, gpus=1, setup=("source venv/bin/activate",)).resolve()
    assert ex.describe() == ("slurm (a job array on partition cpu, 32 tasks at a time, 4 threads each, up to 4 seeds "
                             "per call)")
    params = executors._submitit_executor(ex, tmp_path / "jobs")._executor.parameters  # what sbatch will get
    assert params == {"job_name": "ntkdyn-sweep", "time": 120, "cpus_per_task": 4, "partition": "cpu",
                      "account": "lab", "qos": "normal", "mem": "8GB", "gpus_per_node": 1, "array_parallelism": 32,
                      "setup": ["source venv/bin/activate"]}


def test_the_extras_are_imported_only_when_chosen():
    check = ("import sys, ntkdyn.experiments.cli, ntkdyn.experiments.executors as ex\n"
             "ex.Executor('local', workers=2).resolve()\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'submitit')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_describe_says_where_the_points_run():
    assert Executor().describe() == "local (in process)"
    assert Executor("local", workers=2, threads=1).describe() == "local (worker processes, 2 points at a time, 1 thread each)"
    assert Executor("ray", address="auto", threads=2).describe() == (
        "ray (the cluster at auto, as many points at a time as it schedules, 2 threads each)")
    assert Executor(seed_batch=4).describe() == "local (in process, up to 4 seeds per call)"
    assert Executor("submitit-local", workers=2, threads=1).describe() == (
        "submitit-local (submitit local jobs, 2 tasks at a time, 1 thread each, up to 4 seeds per call)")


def test_worker_environment_sets_threads_and_keeps_user_xla_flags():
    env = worker_environment(1, {"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_cpu_multi_thread_eigen=false"
    assert "XLA_FLAGS" not in worker_environment(4, {})
    assert "XLA_FLAGS" not in worker_environment(1, {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"})
    with pytest.raises(ValueError, match="^threads:"):
        worker_environment(0)


def test_workers_get_the_drivers_jax_options():
    import jax

    options = executors._jax_options(GRID.points())
    assert options["jax_enable_x64"] is jax.config.jax_enable_x64 is True
    json.dumps(options)  # plain values: they travel to any worker
    # a float64 point asks for x64 even from a driver that has not enabled it
    assert executors._jax_options([{**GRID.points()[0], "dtype": "float64"}])["jax_enable_x64"] is True
