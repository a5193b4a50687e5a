"""Random-probe NTK sketch: error and time against the exact kernel, as k grows.

For an NTK-parameterized MLP and N inputs, prints one row per probe count k:

* ``rel_err``: mean (± std over seeds) of ``‖Θ̂_k − Θ‖_F / ‖Θ‖_F``;
* ``predicted``: ``sqrt((1 + (tr Θ)²/‖Θ‖²_F) / k)``, the exact RMS for Gaussian probes;
* ``err·√k``: constant when the error falls like 1/√k;
* ``sketch_s`` / ``exact_s``: wall-clock seconds of one kernel after compilation
  (median of repeats), for ``method="sketch"`` and ``method="jacobian"``;
* ``blackbox_s``: the forward-only central-difference path (2k eager forward calls).

Usage::

    python benchmarks/sketch_error.py                      # small, ~1 min on a laptop CPU
    python benchmarks/sketch_error.py --width 1024 --n 64 --ks 1,4,16,64,256,1024,4096 --x64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--n", type=int, default=16, help="number of inputs N")
    parser.add_argument("--d", type=int, default=8, help="input dimension")
    parser.add_argument("--outputs", type=int, default=1, help="number of outputs K")
    parser.add_argument("--ks", default="1,4,16,64,256,1024", help="comma-separated probe counts")
    parser.add_argument("--seeds", type=int, default=8, help="independent sketches per k for the error")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats")
    parser.add_argument("--probe-batch-size", type=int, default=32, help="probes vmapped together")
    parser.add_argument("--blackbox-max-k", type=int, default=64, help="time the black-box path up to this k")
    parser.add_argument("--x64", action="store_true", help="run in float64")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)

    try:
        import ntkdyn  # noqa: F401
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ntkdyn import kernels, models
    from ntkdyn.kernels import sketch

    apply_fn, params = models.mlp(args.d, args.outputs, width=args.width, depth=args.depth, seed=0)
    x = jax.random.normal(jax.random.key(1), (args.n, args.d))
    n_params = kernels.flat_param_count(params)

    exact = kernels.empirical_ntk(apply_fn, params, x, method="jacobian")
    exact_s = _median_time(lambda: kernels.empirical_ntk(apply_fn, params, x, method="jacobian"), args.repeats)
    theta = kernels.flatten_kernel(exact)
    norm = float(jnp.linalg.norm(theta))
    ratio = float(jnp.trace(theta) ** 2 / jnp.sum(theta**2))

    print(f"MLP width={args.width} depth={args.depth} P={n_params} N={args.n} K={args.outputs} "
          f"dtype={theta.dtype}  exact kernel (jacobian): {exact_s * 1e3:.1f} ms  (tr Θ)²/‖Θ‖²_F = {ratio:.2f}")
    header = f"{'k':>6} {'rel_err':>10} {'± std':>8} {'predicted':>10} {'err·√k':>8} {'sketch_ms':>10} {'blackbox_ms':>12}"
    print(header)
    print("-" * len(header))
    for k in (int(v) for v in args.ks.split(",")):
        errs = []
        for seed in range(args.seeds):
            est = kernels.flatten_kernel(sketch.sketched_ntk(apply_fn, params, x, n_probes=k, seed=seed))
            errs.append(float(jnp.linalg.norm(est - theta)) / norm)
        errs = np.asarray(errs)
        pbs = min(k, args.probe_batch_size)
        sketch_s = _median_time(
            lambda: sketch.sketched_ntk(apply_fn, params, x, n_probes=k, seed=0, probe_batch_size=pbs), args.repeats
        )
        box = "-"
        if k <= args.blackbox_max_k:
            box_s = _median_time(lambda: sketch.blackbox_ntk(apply_fn, params, x, n_probes=k, seed=0), 1)
            box = f"{box_s * 1e3:.1f}"
        predicted = np.sqrt((1.0 + ratio) / k)
        rms = float(np.sqrt(np.mean(errs**2)))
        print(f"{k:>6} {errs.mean():>10.4f} {errs.std():>8.4f} {predicted:>10.4f} {rms * np.sqrt(k):>8.3f} "
              f"{sketch_s * 1e3:>10.1f} {box:>12}")


if __name__ == "__main__":
    main()
