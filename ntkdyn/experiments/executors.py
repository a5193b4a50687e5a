"""Where the points of a sweep run: in process, local worker processes, Ray, Slurm (submitit).

:func:`ntkdyn.experiments.sweep.sweep` hands the points it still needs to
:func:`run_points` and appends what comes back; the driver (the process that
called :func:`sweep`) is the only writer of the results folder, so resume and
de-duplication work exactly as for the in-process sweep whatever runs the
points. An :class:`Executor` says where they run:

====================  =========================================================
``kind``              the points run ...
====================  =========================================================
``"local"``           in the driver, one seed group after another
                      (``workers=1``, the default), or in ``workers``
                      local processes
                      (``concurrent.futures.ProcessPoolExecutor``, ``spawn``
                      start method: JAX is not fork-safe)
``"ray"``             as Ray tasks: on the cluster at ``address``, or on a Ray
                      instance started on this machine for the sweep
``"slurm"``           as one Slurm job array (submitit), one array task per
                      point (or seed group), at most ``workers`` at a time
``"submitit-local"``  the same submitit code path with submitit's local
                      executor: one local job (process) per point (or seed
                      group), ``workers`` at a time; runs without Slurm
====================  =========================================================

Every worker runs :func:`run_task`: it receives one task — the points of
one seed group, see below — plus the driver's JAX options
(``jax_enable_x64`` and the other numerics-changing flags,
:data:`SHIPPED_JAX_OPTIONS`) and thread settings, runs them and returns each
point's record or its error with a traceback summary (a failing point never
ends the sweep).

Seeds in one call. Points that differ only in their seed form groups of at
most ``seed_batch`` (:func:`ntkdyn.experiments.sweep.seed_groups`); a group
is one task, run as one compiled, vmapped call
(:func:`ntkdyn.experiments.sweep.run_seed_group`: one compilation, one
dispatch and one set of eager checks for all its seeds), and point by point
when it cannot be batched (another graph per seed) or fails. It pays where
every point would otherwise compile its own program: ``"slurm"`` and
``"submitit-local"`` start a fresh process per task, so there the default
is 4 seeds per task. In one process (in process, a local worker, a Ray
worker) the seeds of a shape already share one compiled program, and the
batched program compiles 1.4–1.6× slower than a point's while a seed's
arithmetic costs the same batched or not on a CPU, so the default there is
1 (benchmarks/README.md, seed batching, has the measurements). A group's
records reach the driver together: an interrupted sweep loses the group
that was running.

Threads. Each worker gets ``threads`` CPU threads: ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` are set to ``threads`` and,
for one thread, ``XLA_FLAGS`` gets ``--xla_cpu_multi_thread_eigen=false``.
XLA has no flag for its own thread pool, whose size follows the CPU affinity
of the process, so local worker processes (``"local"`` with ``workers > 1``
and ``"submitit-local"``) are also pinned to ``threads`` cores each (Linux),
and ``workers × threads`` never exceeds the cores the driver may use unless
asked. Ray tasks reserve ``num_cpus=threads``; Slurm jobs get
``cpus_per_task=threads`` (Slurm's cgroup does the pinning).

``ray`` and ``submitit`` are optional (``pip install "ntkdyn[cluster]"``) and
imported only when their executor is chosen; :class:`MissingExtra` names the
extra otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import importlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
import warnings
from concurrent import futures as cf
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ntkdyn import _validate

__all__ = [
    "EXECUTORS",
    "SHIPPED_JAX_OPTIONS",
    "Executor",
    "MissingExtra",
    "PointResult",
    "run_points",
    "resolve_executor",
    "run_task",
    "failure_record",
    "worker_environment",
]

EXECUTORS = ("local", "ray", "slurm", "submitit-local")
# JAX options that change the numbers a point computes (or where compiled code is cached): workers use the driver's
SHIPPED_JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_debug_nans",
    "jax_debug_infs",
    "jax_disable_jit",
    "jax_compilation_cache_dir",
)
# the default seed group size where every task is a fresh process (Slurm, submitit-local); 1 elsewhere
FRESH_PROCESS_SEED_BATCH = 4
_EXTRA = {"ray": "ray", "slurm": "submitit", "submitit-local": "submitit"}
_TRACEBACK_LINES = 30  # a failure keeps the last lines of its traceback
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class MissingExtra(ImportError):
    """An executor's optional package (ray, submitit) is not installed."""


# --------------------------------------------------------------------------- #
# the executor description
# --------------------------------------------------------------------------- #


def _cores() -> list[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Executor:
    """Where the points of a sweep run (checked and completed by :meth:`resolve`).

    Attributes:
      kind: ``"local"``, ``"ray"``, ``"slurm"`` or ``"submitit-local"`` (see the module docstring).
      workers: points running at the same time. Default: 1 for ``"local"``
        (in process); the number of usable cores ÷ ``threads`` for
        ``"submitit-local"`` and a Ray instance started here; no limit of
        ours for an existing Ray cluster (Ray schedules by ``num_cpus``) and
        for Slurm (submitit's default array parallelism applies).
      threads: CPU threads per worker. Default: usable cores ÷ ``workers``
        for local processes, 1 for Ray and Slurm (``cpus_per_task``).
      address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``,
        ``"host:6379"``); ``None`` starts a Ray instance on this machine.
      folder: submitit's job folder (pickles and logs); default
        ``<out>/submitit`` (for Slurm it must be on a filesystem the nodes share).
      time_min: submitit job time limit in minutes (Slurm ``--time``, and the
        local job timeout).
      partition, account, qos: Slurm ``--partition``, ``--account``, ``--qos``.
      mem_gb: memory per job (Slurm ``--mem``), None = the cluster default.
      gpus: GPUs per job (Slurm ``--gpus-per-node``).
      setup: shell lines run before each Slurm job (``module load …``,
        ``source venv/bin/activate``).
      seed_batch: the most points that differ only in their seed run as one
        vmapped call (one task); 1 runs every point on its own. Default: 4
        for ``"slurm"`` and ``"submitit-local"`` (a fresh process per task),
        1 otherwise (see the module docstring).
    """

    kind: str = "local"
    workers: int | None = None
    threads: int | None = None
    address: str | None = None
    folder: str | os.PathLike | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem_gb: float | None = None
    gpus: int = 0
    setup: tuple[str, ...] = ()
    seed_batch: int | None = None

    def resolve(self) -> "Executor":
        """Check every field and fill in the defaults; raises ValueError/TypeError, or MissingExtra.

        The optional package of the chosen kind is imported here, so a missing
        extra is reported before any work.
        """
        kind = _validate.choice("executor", self.kind, EXECUTORS)
        workers = None if self.workers is None else _validate.count("workers", self.workers)
        threads = None if self.threads is None else _validate.count("threads", self.threads)
        time_min = _validate.count("time_min", self.time_min)
        gpus = _validate.count("gpus", self.gpus, minimum=0)
        seed_batch = None if self.seed_batch is None else _validate.count("seed_batch", self.seed_batch)
        mem_gb = self.mem_gb
        if mem_gb is not None:
            mem_gb = float(_validate.positive_scalar("mem_gb", mem_gb))
        if isinstance(self.setup, str) or not all(isinstance(line, str) for line in self.setup):
            raise TypeError(f"setup: expected a sequence of shell lines (strings), got {self.setup!r}")
        if self.address is not None and (kind != "ray" or not isinstance(self.address, str) or not self.address):
            raise ValueError(f"address: only an existing Ray cluster has an address (executor 'ray'), "
                             f"got address={self.address!r} with executor {kind!r}")
        slurm_only = {"partition": self.partition, "account": self.account, "qos": self.qos, "mem_gb": mem_gb,
                      "setup": tuple(self.setup) or None, "gpus": gpus or None}
        for name, value in slurm_only.items():
            if value is not None and kind != "slurm":
                raise ValueError(f"{name}: a Slurm option, got {value!r} with executor {kind!r}")
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if kind in _EXTRA:
            _require(_EXTRA[kind], kind)
        missing = [c for c in ("sbatch", "srun") if kind == "slurm" and shutil.which(c) is None]
        if missing:
            raise ValueError(f"executor: 'slurm' needs the Slurm commands on PATH, {' and '.join(missing)} "
                             "not found; run the driver on a Slurm login node, or try the same code path here "
                             "with 'submitit-local'")
        cores = len(_cores())
        if kind == "local":
            workers = workers or 1
            if workers == 1 and threads is not None:
                raise ValueError("threads: the in-process executor (local, workers=1) runs in the driver with its "
                                 "threads; ask for workers >= 2 to set threads per worker")
            if workers > 1:
                threads = threads or max(1, cores // workers)
        elif kind == "submitit-local" or (kind == "ray" and self.address is None):
            if workers is None:
                threads = threads or 1
                workers = max(1, cores // threads)
            else:
                threads = threads or max(1, cores // workers)
        else:  # an existing Ray cluster, Slurm
            threads = threads or 1
        if seed_batch is None:
            seed_batch = FRESH_PROCESS_SEED_BATCH if kind in ("slurm", "submitit-local") else 1
        return dataclasses.replace(self, kind=kind, workers=workers, threads=threads, time_min=time_min,
                                   gpus=gpus, mem_gb=mem_gb, setup=tuple(self.setup), seed_batch=seed_batch)

    @property
    def in_process(self) -> bool:
        return self.kind == "local" and (self.workers or 1) == 1

    def describe(self) -> str:
        """One line for the command line, e.g. ``"ray (a local instance, 2 points at a time, 1 thread each)"``."""
        ex = self.resolve()
        seeds = f", up to {ex.seed_batch} seeds per call" if ex.seed_batch > 1 else ""
        if ex.in_process:
            return f"local (in process{seeds})"
        threads = f"{ex.threads} thread{'s' if ex.threads != 1 else ''} each"
        unit = "tasks" if ex.seed_batch > 1 else "points"
        at_once = (f"as many {unit} at a time as it schedules" if ex.workers is None
                   else f"{ex.workers} {unit} at a time")
        where = {"local": "worker processes", "submitit-local": "submitit local jobs",
                 "ray": f"the cluster at {ex.address}" if ex.address else "a local instance",
                 "slurm": "a job array" + (f" on partition {ex.partition}" if ex.partition else "")}[ex.kind]
        return f"{ex.kind} ({where}, {at_once}, {threads}{seeds})"


def _require(module: str, kind: str):
    """Import an optional package or raise :class:`MissingExtra` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(
            f"executor: {kind!r} needs the optional package {module!r}, which cannot be imported ({err}); "
            f"install the cluster extra: pip install \"ntkdyn[cluster]\" (or pip install {module})"
        ) from err


# --------------------------------------------------------------------------- #
# the worker side
# --------------------------------------------------------------------------- #


def worker_environment(threads: int, environ: dict | None = None) -> dict[str, str]:
    """The environment variables that give a worker ``threads`` CPU threads.

    ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` =
    ``threads``; for one thread ``XLA_FLAGS`` (from ``environ``, default
    ``os.environ``) gains ``--xla_cpu_multi_thread_eigen=false`` unless it
    already sets that flag.
    """
    threads = _validate.count("threads", threads)
    environ = os.environ if environ is None else environ
    env = {name: str(threads) for name in _THREAD_VARIABLES}
    flags = environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return env


def _jax_options(configs: Sequence[dict]) -> dict[str, Any]:
    """The driver's values of :data:`SHIPPED_JAX_OPTIONS` (x64 forced on for a float64 point)."""
    import jax

    options = {}
    for name in SHIPPED_JAX_OPTIONS:
        try:
            value = getattr(jax.config, name)
        except AttributeError:  # an option this JAX version does not have
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        if name == "jax_compilation_cache_dir" and value is None:
            continue
        options[name] = value
    if any(c.get("dtype") == "float64" for c in configs):
        options["jax_enable_x64"] = True
    return options


def _configure_worker(task: dict) -> None:
    """Apply a task's thread environment, core pinning and JAX options in this worker process.

    Environment variables the process already has (set by the executor at
    start-up, or by the user) are kept; pinning and the environment act on
    XLA only before its CPU client exists, i.e. before the first computation.
    """
    for name, value in task.get("env", {}).items():
        if name == "XLA_FLAGS":
            if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
                os.environ["XLA_FLAGS"] = value
        else:
            os.environ.setdefault(name, value)
    cores = task.get("cores")
    if cores and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cores)
    import jax

    for name, value in task.get("jax", {}).items():
        with contextlib.suppress(AttributeError):
            if getattr(jax.config, name) != value:
                jax.config.update(name, value)


def _worker_info(kind: str) -> dict:
    return {"executor": kind, "host": socket.gethostname(), "pid": os.getpid()}


def _traceback_summary(err: BaseException) -> str:
    """The traceback's first line and its last :data:`_TRACEBACK_LINES` lines (the innermost frames, the error)."""
    lines = "".join(traceback.format_exception(err)).splitlines()
    if len(lines) > _TRACEBACK_LINES + 1:
        lines = [lines[0], f"  ... ({len(lines) - _TRACEBACK_LINES - 1} lines left out)"] + lines[-_TRACEBACK_LINES:]
    return "\n".join(lines)


def _error_text(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_task(task: dict) -> list[dict]:
    """Run one task on a worker: configure the process, run its points, never raise for the points' own errors.

    ``task``: ``configs`` (the points: one, or a seed group), ``keys`` (their
    keys, as the driver computed them), ``jax`` (JAX options), ``env`` (thread
    variables), ``cores`` (CPU cores to pin to, or None), ``executor`` (its
    kind); see :func:`_task`. Returns one ``{"key", "record", "error",
    "traceback", "worker"}`` per point, in the task's order: the record as
    plain JSON-ready Python values and ``error = None``, or ``record = None``
    and the error with the last lines of its traceback. A top-level function,
    so every engine can pickle it by reference.
    """
    from ntkdyn.experiments.sweep import _encode

    worker = _worker_info(task.get("executor", "?"))
    try:
        _configure_worker(task)
        import jax

        if any(c.get("dtype") == "float64" for c in task["configs"]) and not jax.config.jax_enable_x64:
            raise RuntimeError("dtype: a float64 point on a worker without jax_enable_x64")  # would run in float32
    except Exception as err:  # noqa: BLE001 - every point of the task failed; the sweep goes on
        return [_failed(key, err, worker) for key in task["keys"]]
    return [dict(outcome, record=None if outcome["record"] is None else _encode(outcome["record"]))
            for outcome in _run_group(task["configs"], task["keys"], worker, {})]


def _failed(key: str, err: BaseException, worker: dict) -> dict:
    return {"key": key, "record": None, "error": _error_text(err), "traceback": _traceback_summary(err),
            "worker": worker}


def _run_group(configs: list[dict], keys: list[str], worker: dict, data_cache: dict) -> Iterator[dict]:
    """The outcomes of a task's points (a seed group runs as one call, or one by one when it cannot), in order."""
    from ntkdyn.experiments.sweep import run_points_batched

    done = {}
    for config, record, err in run_points_batched(configs, data_cache, max_seeds=len(configs)):
        done[id(config)] = (record, err)
    for config, key in zip(configs, keys):
        record, err = done[id(config)]
        if record is None:
            yield _failed(key, err, worker)
        else:
            record["worker"] = worker
            yield {"key": key, "record": record, "error": None, "traceback": None, "worker": worker}


def _init_process(slots, env: dict[str, str], driver: int) -> None:
    """Initializer of a local worker process.

    Ignores Ctrl-C (the driver stops its workers), exits when the driver is
    gone (a killed driver must not leave idle workers behind), takes a group
    of cores and sets the thread environment.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="ntkdyn-driver-watch", daemon=True).start()
    cores = None
    with contextlib.suppress(Exception):
        cores = slots.get(timeout=5)
    _configure_worker({"env": env, "cores": cores})


# --------------------------------------------------------------------------- #
# the driver side
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PointResult:
    """One point back from an executor: its ``record`` (None when it failed) or its ``error``.

    ``traceback``: the last lines of the worker's traceback (or the
    executor's report of a lost worker); ``worker``: executor kind, host, pid.
    """

    config: dict
    record: dict | None
    error: str | None = None
    traceback: str | None = None
    worker: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.record is not None


def failure_record(result: PointResult) -> dict:
    """The line the driver writes to ``failures.jsonl`` for a failed point (never counted as finished)."""
    from ntkdyn._version import __version__
    from ntkdyn.experiments.sweep import point_key

    return {"key": point_key(result.config), "config": result.config, "error": result.error,
            "traceback": result.traceback, "worker": result.worker, "version": __version__,
            "failed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _slots(cores: list[int], workers: int, threads: int) -> list[list[int]]:
    """``workers`` groups of ``threads`` cores each (wrapping around when there are too few)."""
    return [[cores[(w * threads + j) % len(cores)] for j in range(threads)] for w in range(workers)]


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block (processes started inside inherit it), then restore."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _task(configs: list[dict], keys: list[str], options: dict[str, Any], kind: str) -> dict:
    """What a worker receives for one task (:func:`run_task`); plain Python values, picklable everywhere."""
    return {"configs": configs, "keys": keys, "jax": options, "env": {}, "cores": None, "executor": kind}


def _lost(task: dict, err: BaseException, kind: str, what: str) -> list[dict]:
    """The outcomes of a task whose worker did not return (crashed, killed, timed out, cancelled)."""
    return [{"key": key, "record": None, "error": f"{what}: {_error_text(err)}",
             "traceback": _traceback_summary(err), "worker": {"executor": kind}} for key in task["keys"]]


def _in_process(ex: Executor, tasks: list[dict]) -> Iterator[dict]:
    data_cache: dict = {}  # the points of one sweep share their data sets
    worker = _worker_info("local")
    for task in tasks:
        yield from _run_group(task["configs"], task["keys"], worker, data_cache)


def _processes(ex: Executor, tasks: list[dict]) -> Iterator[dict]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    slots = ctx.Queue()
    for group in _slots(_cores(), ex.workers, ex.threads):
        slots.put(group)
    env = worker_environment(ex.threads)
    with _environment(env):  # the spawned interpreters start with the worker's thread settings
        pool = cf.ProcessPoolExecutor(max_workers=ex.workers, mp_context=ctx, initializer=_init_process,
                                      initargs=(slots, env, os.getpid()))
        submitted = {pool.submit(run_task, task): task for task in tasks}
        try:
            for future in cf.as_completed(submitted):
                try:
                    outcomes = future.result()
                except Exception as err:  # noqa: BLE001 - the worker process died (killed, out of memory)
                    outcomes = _lost(submitted[future], err, "local", "the worker process died before returning")
                yield from outcomes
        finally:
            _stop_pool(pool, submitted)
            slots.close()


def _stop_pool(pool: cf.ProcessPoolExecutor, submitted: dict) -> None:
    """Shut the pool down; when points are still running (Ctrl-C, an error), terminate its processes."""
    if all(f.done() for f in submitted):
        pool.shutdown(wait=True)
        return
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before 3.14 there is no public way
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=10)


def _ray(ex: Executor, tasks: list[dict]) -> Iterator[dict]:
    ray = _require("ray", "ray")
    env = worker_environment(ex.threads)
    started = False
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        with warnings.catch_warnings():
            # Ray starts its processes by fork + exec, which JAX's fork warning cannot tell from a bare fork
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            if ex.address is not None:
                ray.init(address=ex.address, **options)
            else:
                with _environment(env):  # the local Ray processes inherit the worker's thread settings
                    ray.init(num_cpus=ex.workers * ex.threads, **options)
        started = True
    remote = ray.remote(run_task).options(num_cpus=ex.threads, runtime_env={"env_vars": env})
    queue = collections.deque(tasks)
    window = len(tasks) if ex.workers is None else ex.workers
    pending: dict = {}

    def submit() -> None:
        if queue:
            task = queue.popleft()
            pending[remote.remote(task)] = task

    try:
        for _ in range(window):
            submit()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                outcomes = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - worker or node died, task cancelled
                outcomes = _lost(task, err, "ray", "the Ray task did not return")
            submit()
            yield from outcomes
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _submitit_executor(ex: Executor, folder: Path):
    """submitit's AutoExecutor for ``ex`` (Slurm, or local jobs), with the job parameters set."""
    submitit = _require("submitit", ex.kind)
    slurm = ex.kind == "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if slurm else "local")
    params: dict[str, Any] = {"name": "ntkdyn-sweep", "timeout_min": ex.time_min, "cpus_per_task": ex.threads}
    if slurm:
        extra = {"slurm_partition": ex.partition, "slurm_account": ex.account, "slurm_qos": ex.qos,
                 "mem_gb": ex.mem_gb, "gpus_per_node": ex.gpus or None,
                 "slurm_array_parallelism": ex.workers, "slurm_setup": list(ex.setup) or None}
        params.update({k: v for k, v in extra.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def _submitit(ex: Executor, tasks: list[dict], folder: Path) -> Iterator[dict]:
    slurm = ex.kind == "slurm"
    executor = _submitit_executor(ex, folder)
    env = worker_environment(ex.threads)
    # Slurm: every point at once, as one job array (Slurm runs `workers` at a time);
    # locally: `workers` jobs at a time, each pinned to its own cores
    free = collections.deque(range(len(tasks) if slurm else ex.workers))
    slots = None if slurm else _slots(_cores(), ex.workers, ex.threads)
    queue = collections.deque(tasks)
    pending: dict = {}  # job -> (task, slot)
    poll = 2.0 if slurm else 0.05

    def submit() -> None:
        batch = []
        while queue and free:
            slot = free.popleft()
            task = dict(queue.popleft(), env=env, cores=None if slots is None else slots[slot])
            batch.append((task, slot))
        if batch:
            with _environment(env):  # local jobs and sbatch (--export=ALL) inherit it
                jobs = executor.map_array(run_task, [task for task, _ in batch])
            pending.update(zip(jobs, batch))

    try:
        submit()
        while pending:
            finished = [job for job in pending if job.done()]
            if not finished:
                time.sleep(poll)
                continue
            for job in finished:
                task, slot = pending.pop(job)
                free.append(slot)
                try:
                    outcomes = job.result()
                except Exception as err:  # noqa: BLE001 - job killed, timed out, node failure
                    outcomes = _lost(task, err, ex.kind, f"the submitit job {job.job_id} did not return "
                                                         f"(logs: {job.paths.stderr})")
                else:
                    _remove_job_files(job)
                submit()
                yield from outcomes
    finally:
        for job in pending:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: every job finished and was cleaned up


def _remove_job_files(job) -> None:
    """Delete a finished job's pickles and logs (a failed job keeps them for inspection)."""
    paths = job.paths
    for path in (paths.submitted_pickle, paths.result_pickle, paths.stdout, paths.stderr):
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


def resolve_executor(executor: Executor | str | None) -> Executor:
    """An :class:`Executor` (a kind name or None = in process), checked and completed by :meth:`Executor.resolve`."""
    if executor is None:
        executor = Executor()
    elif isinstance(executor, str):
        executor = Executor(kind=executor)
    elif not isinstance(executor, Executor):
        raise TypeError(f"executor: expected an Executor, a kind name or None, got {type(executor).__name__}")
    return executor.resolve()


def run_points(configs: Iterable[dict], executor: Executor | str | None = None, *,
               out: str | os.PathLike | None = None) -> Iterator[PointResult]:
    """Run every configuration with ``executor``; yield a :class:`PointResult` per point as it finishes.

    Points that differ only in their seed run together, at most
    ``executor.seed_batch`` at a time (module docstring). Order: in process,
    the configurations' order with each seed group at the place of its first
    point; finishing order elsewhere. Every configuration comes back exactly once (recorded or failed), unless
    the caller stops early; closing the generator (Ctrl-C, an error in the
    caller) cancels the points still queued or running and stops what the
    executor started (worker processes, a local Ray instance, submitit jobs).
    A worker's record is accepted only if its key is the hash of the
    configuration sent and (for workers outside this process) its ntkdyn
    version is the driver's: a worker with other code is reported as a
    failure, never written as a finished point.

    Args:
      configs: point configurations (JSON-ready dicts, as :meth:`SweepGrid.points`).
      executor: an :class:`Executor`, a kind name, or None (in process).
      out: the results folder; submitit's default job folder is ``<out>/submitit``.
    """
    from ntkdyn._version import __version__
    from ntkdyn.experiments.sweep import _decode, _encode, point_key, seed_groups

    ex = resolve_executor(executor)
    configs = list(configs)
    if not configs:
        return
    by_key = {point_key(c): c for c in configs}
    options = _jax_options(configs)
    groups = [[c] for c in by_key.values()] if ex.seed_batch == 1 else seed_groups(by_key.values(), ex.seed_batch)
    tasks = [_task(group, [point_key(c) for c in group], options, ex.kind) for group in groups]
    if ex.in_process:
        engine = _in_process(ex, tasks)
    elif ex.kind == "local":
        engine = _processes(ex, tasks)
    elif ex.kind == "ray":
        engine = _ray(ex, tasks)
    else:
        folder = ex.folder if ex.folder is not None else (Path(out) if out is not None else Path.cwd()) / "submitit"
        engine = _submitit(ex, tasks, Path(folder))
    with contextlib.closing(engine):
        for outcome in engine:
            key = outcome.get("key")
            config = by_key.pop(key, None)
            if config is None:  # pragma: no cover - a worker answered for a point not (or no longer) pending
                continue
            record = outcome.get("record")
            error, trace = outcome.get("error"), outcome.get("traceback")
            if record is not None and (record.get("key") != key or not isinstance(record.get("config"), dict)
                                       or point_key(record["config"]) != key):
                record, error = None, "the worker returned a record for another configuration"
            elif record is not None and not ex.in_process and record.get("version") != __version__:
                record, error = None, (f"the worker runs ntkdyn {record.get('version')}, the driver {__version__}: "
                                       "install the same version everywhere")
            if record is None and error is None:  # pragma: no cover - defensive
                error = "the worker returned neither a record nor an error"
            if record is not None:
                record = _decode(_encode(record))  # plain Python values, whichever engine ran the point
            yield PointResult(config=config, record=record, error=error, traceback=trace,
                              worker=outcome.get("worker") or {})
