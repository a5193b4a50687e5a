"""Empirical-NTK speed and memory: every method of ours on the reference configurations.

Usage (from the repository root)::

    python benchmarks/ntk_speed.py                      # all configs, all methods
    python benchmarks/ntk_speed.py --configs mlp512_n512 cnn_full_n32 --methods structured auto
    python benchmarks/ntk_speed.py --json out.json      # also write the rows

Each (configuration, method) runs in a fresh worker process, so its peak
memory is its own: ``peak_mib`` is the growth of the resident set's high-water
mark (``VmHWM``) from just before the first kernel call to the end, compilation
included. (``ru_maxrss`` would not do: Linux carries it across ``exec`` from the
parent, which may just have computed a large reference kernel.)
Times are wall-clock, float32, jitted: ``compile_s`` = first call minus the
median of the ``--repeats`` warm calls (``median_s``). ``rel_diff`` is
``max|Θ − Θ_ref| / max|Θ_ref|`` against the explicit Jacobian kernel
(``method="jacobian"``, tiled to fit memory), where that is affordable.

The networks are the ones of the neural-tangents comparison
(benchmarks/peers/): NTK parameterization, σ_w = 1.5, σ_b = 0.05, N(0, 1)
weights, float32; :func:`export_npz` writes exactly these parameters for the
peers runner.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

# name -> configuration; "reference": whether the explicit Jacobian kernel is affordable
CONFIGS = {
    "mlp512_n512": dict(kind="mlp", width=512, depth=3, d=16, k=1, n=512, trace=False, reference=True),
    "mlp512_n1024": dict(kind="mlp", width=512, depth=3, d=16, k=1, n=1024, trace=False, reference=True),
    "mlp2048_n256": dict(kind="mlp", width=2048, depth=3, d=16, k=1, n=256, trace=False, reference=False),
    "cnn_traced_n64": dict(kind="cnn", channels=(32, 32), hw=16, c=3, k=10, n=64, trace=True, reference=True),
    "cnn_full_n32": dict(kind="cnn", channels=(32, 32), hw=16, c=3, k=10, n=32, trace=False, reference=True),
    "mlp512_n20000": dict(kind="mlp", width=512, depth=3, d=16, k=1, n=20000, trace=False, reference=False),
}
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "mlp512_n20000"]
METHODS = ("structured", "auto", "jacobian", "ntvp")
SIGMA_W, SIGMA_B = 1.5, 0.05


def describe(name: str) -> str:
    c = CONFIGS[name]
    if c["kind"] == "mlp":
        return f"MLP {c['depth']}×{c['width']} erf, d={c['d']}, K={c['k']}, N={c['n']}"
    tr = "traced" if c["trace"] else "full K×K"
    return f"CNN conv{c['channels'][0]}-conv{c['channels'][1]} 3×3 relu + Dense({c['k']}), {c['hw']}×{c['hw']}×{c['c']}, {tr}, N={c['n']}"


def build(name: str):
    """``(apply_fn, params, x, module)`` of a configuration, float32, seed 0 (inputs: seed 1)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ntkdyn import models

    c = CONFIGS[name]
    kw = dict(parameterization="ntk", sigma_w=SIGMA_W, sigma_b=SIGMA_B, rngs=nnx.Rngs(0), dtype=jnp.float32)
    if c["kind"] == "mlp":
        module = models.MLP(c["d"], c["k"], width=c["width"], depth=c["depth"], activation="erf", **kw)
        x = jax.random.normal(jax.random.key(1), (c["n"], c["d"]), jnp.float32)
    else:
        shape = (c["hw"], c["hw"], c["c"])
        module = models.CNN(shape, c["k"], channels=c["channels"], kernel_size=3, activation="relu", **kw)
        x = jax.random.normal(jax.random.key(1), (c["n"], *shape), jnp.float32)
    apply_fn, params = models.as_apply_fn(module)
    return apply_fn, params, x, module


def export_npz(name: str, path: str, kernel=None) -> None:
    """Write the configuration's parameters, inputs and multipliers for the peers runner."""
    import numpy as np

    _, _, x, module = build(name)
    c = CONFIGS[name]
    arrays = {"x": np.asarray(x)}
    layers = list(module.hidden) + [module.readout] if c["kind"] == "mlp" else list(module.convs) + [module.readout]
    for i, layer in enumerate(layers):
        arrays[f"W{i}"] = np.asarray(layer.kernel[...])
        arrays[f"b{i}"] = np.asarray(layer.bias[...])
        arrays[f"wm{i}"] = np.float32(layer.w_mult)
        arrays[f"bm{i}"] = np.float32(layer.b_mult)
    if kernel is not None:
        arrays["kernel"] = np.asarray(kernel)
    meta = dict(c, name=name, layers=len(layers))
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (``VmHWM``; per address space, reset by ``exec``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def worker(name: str, method: str, repeats: int, reference_path: str | None, kernel_out: str | None) -> dict:
    """Time one method on one configuration in this (fresh) process."""
    import jax
    import numpy as np

    from ntkdyn import kernels

    apply_fn, params, x, _ = build(name)
    c = CONFIGS[name]
    big = c["n"] > 4096
    kwargs = dict(trace_outputs=c["trace"])
    if method != "auto":
        kwargs["method"] = method
    # explicit methods in one tile (as neural-tangents does); memory-bounded tiles when N is large or with "auto"
    kwargs["tile_size"] = "auto" if (big or method in ("auto", "jacobian", "ntvp")) else None

    def run():
        return jax.block_until_ready(kernels.empirical_ntk(apply_fn, params, x, **kwargs))

    base = _rss_bytes()
    t0 = time.perf_counter()
    kernel = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_bytes() - base
    median = statistics.median(times) if times else first
    row = dict(
        config=name,
        method=method,
        chosen=kernels.plan_ntk(apply_fn, params, x, **{k: v for k, v in kwargs.items()}),
        n=c["n"],
        compile_s=max(first - median, 0.0) if times else float("nan"),
        median_s=median,
        times=times,
        peak_mib=peak / 2**20,
        params=kernels.flat_param_count(params),
        rel_diff=None,
    )
    if reference_path and os.path.exists(reference_path):
        ref = np.load(reference_path)
        row["rel_diff"] = float(np.max(np.abs(np.asarray(kernel) - ref)) / np.max(np.abs(ref)))
    if kernel_out:
        np.save(kernel_out, np.asarray(kernel))
    return row


def run_worker(name, method, repeats, reference_path=None, kernel_out=None, timeout=3600) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, method, "--repeats", str(repeats)]
    if reference_path:
        cmd += ["--reference", reference_path]
    if kernel_out:
        cmd += ["--kernel-out", kernel_out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(config=name, method=method, error=f"timeout after {timeout} s")
    if out.returncode != 0:
        return dict(config=name, method=method, error=out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_kernel(name: str, path: str) -> None:
    """The explicit Jacobian kernel ``J Jᵀ`` (method="jacobian", memory-bounded tiles), saved as .npy."""
    import numpy as np

    from ntkdyn import kernels

    apply_fn, params, x, _ = build(name)
    k = kernels.empirical_ntk(apply_fn, params, x, method="jacobian", trace_outputs=CONFIGS[name]["trace"])
    np.save(path, np.asarray(k))


def fmt(v, spec=".3g"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows) -> str:
    lines = [
        "| configuration | method | chosen (method, tile) | median (s) | compile (s) | peak (MiB) | rel. diff to J Jᵀ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['method']} | error: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {describe(r['config'])} | {r['method']} | {tuple(r['chosen'])} | {fmt(r['median_s'])} | "
            f"{fmt(r['compile_s'])} | {fmt(r['peak_mib'], '.0f')} | {fmt(r['rel_diff'], '.1e')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the result rows here")
    ap.add_argument("--no-reference", action="store_true", help="skip the explicit-Jacobian comparison")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out"))
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--kernel-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.reference, args.kernel_out)))
        return

    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for name in args.configs:
        ref = None
        if CONFIGS[name]["reference"] and not args.no_reference:
            ref = os.path.join(args.workdir, f"{name}_jjt.npy")
            if not os.path.exists(ref):
                reference_kernel(name, ref)
        for method in args.methods:
            repeats = 1 if CONFIGS[name]["n"] > 4096 else args.repeats
            row = run_worker(name, method, repeats, ref)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
