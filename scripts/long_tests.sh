#!/usr/bin/env bash
# The long forms left out of the default test run (marker `long`): the same checks on more
# cases (NF4 on the embedded model, the unfused Triton path on Qwen2, the merge's correction
# through Triton, Ray Serve with adapter affinity off as the control of the affinity test, the
# Triton engine test on two layers at full length). About fifteen minutes on two cores. Extra
# arguments go to pytest. The reliability suite's long form is
# scripts/reliability.sh --long.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pytest -m long -q "$@"
