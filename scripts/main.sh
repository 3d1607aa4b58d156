#!/usr/bin/env bash
# Set up, then run the dense pipeline on the built-in SmolLM2-135M with local data.
# Extra arguments go to `ebft dense` (e.g. --nsamples 256 --eval-windows all for paper scale).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export EBFT_DATA_DIR=${EBFT_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec ebft dense --nsamples 64 --eval-windows 20 "$@"
