#!/usr/bin/env bash
# Everything a lent GPU must tell us, in one command of under 9 minutes on an H200:
#   bash scripts/gpu_check.sh [--commit SHA] [--out DIR]     on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                      the same stages on the CPU, tiny
# On the GPU machine, wheels its image lacks (bitsandbytes ...; ../shared/gpu/wheels.sh puts
# them in .whl/, carried along) are installed first, then this package, without an index.
# The stages, their budgets and the results files: scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu-check] installing $(ls .whl | wc -l) carried wheels" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/loraplex-site .whl/*.whl && export PYTHONPATH=/tmp/loraplex-site
fi
if ! "$PY" -c 'import loraplex.server' 2>/dev/null; then
  echo "[gpu-check] installing loraplex (editable, no index)" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >&2
fi
exec "$PY" scripts/gpu_check.py "$@"
