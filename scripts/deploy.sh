#!/usr/bin/env bash
# Register every deployment of prefect.yaml on the Prefect server in PREFECT_API_URL:
# create the work pools it names (process pools, one flow run at a time), then deploy.
# Idempotent: run it again after changing prefect.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prefect ] && . .venv/bin/activate
for pool in ebft-process ebft-gpu; do
  prefect work-pool inspect "$pool" >/dev/null 2>&1 \
    || prefect work-pool create "$pool" --type process >/dev/null
  prefect work-pool set-concurrency-limit "$pool" 1 >/dev/null
done
prefect --no-prompt deploy --all
