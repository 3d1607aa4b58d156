#!/usr/bin/env bash
# Set up, then run the main job on the built-in SmolLM2-135M with local data:
# calibration → dense capture → Wanda 50% masks → EBFT per block → assembly → distillation
# → perplexity.
# Extra arguments go to `ebft run` (e.g. --preset paper, --method sparsegpt --pattern 2:4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export EBFT_DATA_DIR=${EBFT_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec ebft run "$@"
