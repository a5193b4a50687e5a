"""Side-by-side NTK speed: ntkdyn vs neural-tangents 0.6.5, measured in one run.

    python benchmarks/peers/compare.py [--configs ...] [--nt-impls 3 1 2] [--repeats 5]

Needs the peers venv (``bash benchmarks/peers/setup_venv.sh``). For every
configuration of ``benchmarks/ntk_speed.py`` it: times ntkdyn's structured
method in a fresh worker process (and keeps its kernel); writes the network's
parameters, inputs and that kernel to ``benchmarks/peers/<config>.npz``;
times each requested neural-tangents implementation in a fresh process of
the venv on the same arrays (``nt_runner.py``), which also checks agreement
with ntkdyn's kernel; then prints one table of medians, compile times, peak
memory and the ratio ours / neural-tangents best. Configurations are run
back to back so both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ntk_speed  # noqa: E402

VENV_PYTHON = os.path.join(HERE, ".venv", "bin", "python")
NT_NAMES = {1: "jacobian contraction", 2: "NTK-vector products", 3: "structured derivatives"}


def run_nt(npz: str, impl: int, repeats: int, timeout: float) -> dict:
    cmd = [VENV_PYTHON, os.path.join(HERE, "nt_runner.py"), npz, str(impl), "--repeats", str(repeats)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(implementation=impl, error=f"timeout after {timeout:.0f} s")
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
        return dict(implementation=impl, error=tail)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=ntk_speed.DEFAULT_CONFIGS, choices=list(ntk_speed.CONFIGS))
    ap.add_argument("--nt-impls", nargs="+", type=int, default=[3, 1, 2], choices=[1, 2, 3])
    ap.add_argument("--ours", nargs="+", default=["structured"], choices=list(ntk_speed.METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args(argv)
    if not os.path.exists(VENV_PYTHON):
        sys.exit(f"no peers venv at {VENV_PYTHON}; run: bash benchmarks/peers/setup_venv.sh")

    results = []
    for name in args.configs:
        kernel_path = os.path.join(HERE, f"{name}_ours.npy")
        ours = {}
        for i, method in enumerate(args.ours):
            ours[method] = ntk_speed.run_worker(
                name, method, args.repeats, kernel_out=kernel_path if i == 0 else None, timeout=args.timeout
            )
            print(json.dumps(ours[method]), file=sys.stderr, flush=True)
        import numpy as np

        kernel = np.load(kernel_path) if os.path.exists(kernel_path) else None
        npz = os.path.join(HERE, f"{name}.npz")
        ntk_speed.export_npz(name, npz, kernel)
        nt = {}
        for impl in args.nt_impls:
            nt[impl] = run_nt(npz, impl, args.repeats, args.timeout)
            print(json.dumps(nt[impl]), file=sys.stderr, flush=True)
        results.append(dict(config=name, ours=ours, nt=nt))
        if os.path.exists(kernel_path):
            os.remove(kernel_path)

    head = "| configuration | " + " | ".join(f"ours {m} (s)" for m in args.ours)
    head += " | " + " | ".join(f"NT {NT_NAMES[i]} (s)" for i in args.nt_impls)
    head += " | ratio ours / NT best | peak MiB ours / NT SD | compile s ours / NT SD | max rel. diff ours vs NT |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        ours_t = [r["ours"][m].get("median_s") for m in args.ours]
        nt_t = [r["nt"][i].get("median_s") for i in args.nt_impls]
        valid_nt = [t for t in nt_t if t is not None]
        best_ours = min([t for t in ours_t if t is not None], default=None)
        ratio = best_ours / min(valid_nt) if valid_nt and best_ours else None
        sd = r["nt"].get(3, {})
        first = r["ours"][args.ours[0]]
        diffs = [r["nt"][i].get("rel_diff_to_ntkdyn") for i in args.nt_impls if r["nt"][i].get("rel_diff_to_ntkdyn") is not None]
        cells = [ntk_speed.describe(r["config"])]
        cells += [fmt(t) for t in ours_t] + [fmt(t) if t is not None else r["nt"][i].get("error", "—") for t, i in zip(nt_t, args.nt_impls)]
        cells += [
            fmt(ratio, ".2f"),
            f"{fmt(first.get('peak_mib'), '.0f')} / {fmt(sd.get('peak_mib'), '.0f')}",
            f"{fmt(first.get('compile_s'), '.2f')} / {fmt(sd.get('compile_s'), '.2f')}",
            fmt(max(diffs), ".1e") if diffs else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
