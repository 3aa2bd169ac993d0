#!/usr/bin/env bash
# Random keys for deploy/compose.yaml in deploy/secrets/ (git-ignored); existing ones are kept.
set -euo pipefail
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
for name in admin_key metrics_key grafana_admin_password; do
  [[ -s "$dir/$name" ]] || { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/$name"; echo "made $dir/$name"; }
done
