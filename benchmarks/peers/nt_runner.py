"""neural-tangents 0.6.5 side of the NTK speed comparison. Runs INSIDE benchmarks/peers/.venv.

    .venv/bin/python nt_runner.py CONFIG.npz IMPLEMENTATION [--repeats 5]

Rebuilds the network of ``CONFIG.npz`` (written by ``benchmarks/ntk_speed.py``:
same layers, same parameter arrays, same inputs) as a plain JAX
``f(params, x)``, computes its empirical NTK with neural-tangents'
``empirical_ntk_fn`` (``implementation`` 1 = Jacobian contraction, 2 =
NTK-vector products, 3 = structured derivatives; ``vmap_axes=0``, i.e. the
batch-independent fast path), jitted, float32, and prints one JSON row:
compile time, median of warm calls, peak RSS growth, and the largest
relative difference to the kernel ntkdyn stored in the file.
"""

import argparse
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import neural_tangents as nt
from jax.scipy.special import erf


def load(path):
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    layers = [
        dict(W=jnp.asarray(data[f"W{i}"]), b=jnp.asarray(data[f"b{i}"]), wm=float(data[f"wm{i}"]), bm=float(data[f"bm{i}"]))
        for i in range(meta["layers"])
    ]
    kernel = data["kernel"] if "kernel" in data.files else None
    return meta, layers, jnp.asarray(data["x"]), kernel


def make_apply(meta, layers):
    mults = [(l["wm"], l["bm"]) for l in layers]

    if meta["kind"] == "mlp":

        def f(params, x):
            for i, (p, (wm, bm)) in enumerate(zip(params, mults)):
                x = wm * (x @ p["W"]) + bm * p["b"]
                if i < len(params) - 1:
                    x = erf(x)
            return x

    else:

        def f(params, x):
            for p, (wm, bm) in zip(params[:-1], mults[:-1]):
                x = jax.lax.conv_general_dilated(
                    x, p["W"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                x = jax.nn.relu(wm * x + bm * p["b"])
            x = x.reshape(x.shape[0], -1)
            wm, bm = mults[-1]
            return wm * (x @ params[-1]["W"]) + bm * params[-1]["b"]

    params = [dict(W=l["W"], b=l["b"]) for l in layers]
    return f, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("implementation", type=int, choices=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    meta, layers, x, ours = load(args.npz)
    f, params = make_apply(meta, layers)
    trace = meta["trace"]
    kernel_fn = jax.jit(
        nt.empirical_ntk_fn(f, trace_axes=(-1,) if trace else (), vmap_axes=0, implementation=args.implementation)
    )

    def run():
        return jax.block_until_ready(kernel_fn(x, None, params))

    with open("/proc/self/statm") as fh:
        base = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    k = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    median = statistics.median(times) if times else first
    k = np.asarray(k)
    rel = None
    if ours is not None:
        if trace:
            # ntkdyn's traced kernel is the mean of the K diagonal blocks; report which convention NT matched
            rel_mean = float(np.max(np.abs(k - ours)) / np.max(np.abs(ours)))
            rel_sum = float(np.max(np.abs(k / meta["k"] - ours)) / np.max(np.abs(ours)))
            rel = min(rel_mean, rel_sum)
            convention = "mean" if rel_mean <= rel_sum else "sum"
        else:
            rel = float(np.max(np.abs(k - ours)) / np.max(np.abs(ours)))
            convention = "full"
    print(
        json.dumps(
            dict(
                config=meta["name"],
                implementation=args.implementation,
                compile_s=max(first - median, 0.0) if times else None,
                median_s=median,
                times=times,
                peak_mib=peak / 2**20,
                rel_diff_to_ntkdyn=rel,
                trace_convention=convention if ours is not None else None,
                jax=jax.__version__,
                neural_tangents=getattr(nt, "__version__", "0.6.5"),
            )
        )
    )


if __name__ == "__main__":
    main()
