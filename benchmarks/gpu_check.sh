#!/usr/bin/env bash
# GPU check for the matrix-free predictions (issue 10), at most ~8 minutes of wall time.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with an NVIDIA GPU
#
# On a bare machine it installs what it needs into a virtual environment
# (.venv-gpu: jax[cuda12] and this package with its test extras), then prints:
#   1. the devices JAX sees;
#   2. kernel accuracy on the GPU: the float32 empirical NTK of an MLP at the default
#      precision ("highest": no TF32) and at precision="default" (TF32), each against a
#      float64 reference computed on the same GPU — the first must stay near 1e-6;
#   3. the Krylov prediction (MLP 2×256 erf, d = 8, K = 1, t ∈ {10, 100, 1000}, float32,
#      1,000 test points) at N = 10^5 and 10^6: compile and run times, iterations, the
#      error estimate, and the float32 error against a float64 Krylov reference at N = 10^5;
#   4. one 10-output case (N = 10^5, K = 10, full kernel).
# Every step has its own time limit so that the whole script stays under ~8 minutes;
# a step that runs out prints "TIMEOUT" and the script goes on.
# Record what it prints in benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no nvidia-smi: this script needs an NVIDIA GPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

PY=${PYTHON:-python3}
if ! "$PY" -c 'import jax, sys; sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)' 2>/dev/null; then
  echo "== installing jax[cuda12] and ntkdyn into .venv-gpu"
  "$PY" -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  timeout 60 "$PY" -m pip install -q --upgrade pip
  timeout 180 "$PY" -m pip install -q "jax[cuda12]" || { echo "pip install jax[cuda12] failed" >&2; exit 1; }
  timeout 90 "$PY" -m pip install -q -e . || { echo "pip install -e . failed" >&2; exit 1; }
fi
echo "== setup took $(( $(date +%s) - START )) s"

BUDGET=${BUDGET:-470}  # seconds for the whole script
step() {  # step NAME SECONDS PYTHON-CODE [ARGS...]: runs with min(SECONDS, what is left of BUDGET)
  local name=$1 limit=$2 code=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: SKIPPED (time budget spent)"; return; fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$PY" -c "$code" "$@" || echo "TIMEOUT or failure in: $name"
}

step "devices" 30 '
import jax
print(jax.__version__, jax.devices())
'

step "kernel accuracy (float32 on the GPU vs a float64 reference)" 60 '
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import ntkdyn
from ntkdyn import models
f, p = models.mlp(16, 4, width=256, depth=3, dtype=jnp.float32)
x = jax.random.normal(jax.random.key(0), (256, 16), jnp.float32)
p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
ref = np.asarray(ntkdyn.empirical_ntk(f, p64, x.astype(jnp.float64), method="jacobian"))
for precision in ("highest", "default"):
    for method in ("jacobian", "structured"):
        k = np.asarray(ntkdyn.empirical_ntk(f, p, x, method=method, precision=precision), np.float64)
        print(f"precision={precision:8s} method={method:10s} max rel diff vs float64: "
              f"{np.abs(k - ref).max() / np.abs(ref).max():.2e}")
'

KRYLOV='
import sys, time, json
import jax, jax.numpy as jnp, numpy as np
n, k, reference = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if reference:
    jax.config.update("jax_enable_x64", True)
import ntkdyn
from ntkdyn import krylov, models
from ntkdyn.experiments.data import synthetic_regression
data = synthetic_regression(n, 1000, in_features=8, out_features=k, dtype=jnp.float32)
f, p = models.mlp(8, k, width=256, depth=2, dtype=jnp.float32)
ts = jnp.asarray([10.0, 100.0, 1000.0], jnp.float32)
def run(p, x, y, xt, ts, tol=None):
    program, args, static = krylov.prediction_program(f, p, x, y, ts, x_test=xt, tol=tol, precision="highest")
    t0 = time.perf_counter(); program.lower(*args, **static).compile(); compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = ntkdyn.predict(p, x, y, ts, apply_fn=f, x_test=xt, solver="krylov", tol=tol)
    jax.block_until_ready(pred.fx_test)
    return pred, compile_s, time.perf_counter() - t0
pred, c, r = run(p, data.x_train, data.y_train, data.x_test, ts)
print(f"N={n} K={k} float32: compile {c:.1f} s, run {r:.1f} s, iterations {int(pred.iterations)}, "
      f"estimate {np.asarray(pred.error_estimate).max():.2e}, test MSE at t=1000 "
      f"{float(jnp.mean((pred.fx_test[-1] - data.y_test) ** 2)):.4f}", flush=True)
if reference:
    c64 = lambda a: a.astype(jnp.float64)
    ref, c, r = run(jax.tree_util.tree_map(c64, p), c64(data.x_train), c64(data.y_train), c64(data.x_test),
                    c64(ts), tol=1e-10)
    moves = np.linalg.norm(np.asarray(ref.fx_test - ref.fx_test_0).reshape(3, -1), axis=1)
    err = np.linalg.norm(np.asarray(pred.fx_test - ref.fx_test).reshape(3, -1), axis=1) / moves
    print(f"  float64 reference: compile {c:.1f} s, run {r:.1f} s, iterations {int(ref.iterations)}; "
          f"float32 test error vs float64 (per t): {np.array2string(err, precision=2)}", flush=True)
'
step "Krylov N=100,000, K=1 (+ float64 reference)" 120 "$KRYLOV" 100000 1 1
step "Krylov N=1,000,000, K=1" 120 "$KRYLOV" 1000000 1 0
step "Krylov N=100,000, K=10 (full kernel)" 60 "$KRYLOV" 100000 10 0
echo "== total $(( $(date +%s) - START )) s"
