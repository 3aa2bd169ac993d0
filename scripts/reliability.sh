#!/usr/bin/env bash
# The reliability suite (tests/reliability, marker `reliability`) against a real server.
#   bash scripts/reliability.sh          the short run CI does; report in build/reliability/
#   bash scripts/reliability.sh --long   the full counts (hours: 200 kill -9 restarts, a
#                                        30-minute soak ...); writes docs/reliability.md
# Extra arguments go to pytest (e.g. -k f6).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=short
if [[ "${1:-}" == "--long" ]]; then mode=long; shift; fi
out="build/reliability/$mode"
mkdir -p "$out"
rm -f "$out/figures.jsonl"
report="$out/report.md"
[[ $mode == long ]] && report=docs/reliability.md
flag=""
[[ $mode == long ]] && flag=" --long"
command="bash scripts/reliability.sh$flag $*"
started=$(date +%s)
status=0
LORAPLEX_RELIABILITY=$mode LORAPLEX_RELIABILITY_OUT="$out/figures.jsonl" \
  .venv/bin/pytest -m reliability tests/reliability -q -rA "$@" 2>&1 | tee "$out/pytest.log" \
  || status=$?
.venv/bin/python scripts/reliability_report.py "$out/figures.jsonl" --log "$out/pytest.log" \
  --mode "$mode" --seconds $(( $(date +%s) - started )) --command "$command" --out "$report"
echo "[reliability] report: $report"
exit $status
