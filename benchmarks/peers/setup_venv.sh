#!/usr/bin/env bash
# Build the separate virtual environment in which neural-tangents runs.
#
# neural-tangents 0.6.5 needs an old JAX: 0.4.25 is the newest release with
# which all three of its empirical-NTK implementations work (0.4.26 breaks
# "structured derivatives", later releases break its import). It pulls
# TensorFlow through tf2jax. None of this is a dependency of ntkdyn or of
# its test suite; the venv lives in benchmarks/peers/.venv (git-ignored).
#
# Usage: bash benchmarks/peers/setup_venv.sh [python-executable]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${1:-python3}"
venv="$here/.venv"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
# The pins go in as constraints so that pip cannot "upgrade" jax or numpy
# while resolving tf2jax / tensorflow.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
cat > "$constraints" <<PINS
jax==0.4.25
jaxlib==0.4.25
numpy==1.26.*
neural-tangents==0.6.5
PINS
"$venv/bin/python" -m pip install -c "$constraints" \
    "jax==0.4.25" "jaxlib==0.4.25" "numpy==1.26.*" "neural-tangents==0.6.5"
"$venv/bin/python" - <<'PY'
import jax, numpy, neural_tangents
print("peers venv ready: jax", jax.__version__, "numpy", numpy.__version__,
      "neural-tangents", getattr(neural_tangents, "__version__", "?"))
PY
