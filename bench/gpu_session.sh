#!/usr/bin/env bash
# One short lease of an offline GPU machine, as one prepared script (issue 22 and the CUDA
# path of today's defaults):
#
#   bash bench/gpu_session.sh PAYLOAD_GLOB        # e.g. '/tmp/pieces/part*'
#
# PAYLOAD_GLOB names the pieces of a gzipped tar made by bench/gpu_payload.sh (on a machine
# with registry access, cut to fit the transfer limit). On the device tool, send one piece per
# call (carry .dev/partN) and move it out of the checkout (mv .dev/partN /tmp/pieces/): the
# next call's carry replaces the folder. The tar holds wheels, the default model and the
# data (see gpu_payload.sh). Steps, each bounded so the
# whole stays inside EBFT_GPU_BUDGET_S (default 560 s):
#   1. install the wheels into /tmp/site, convert the default model;
#   2. bench/targets.py wanda-50 on the full Wikitext-2 test split, with zero-shot accuracy
#      (first 500 documents of each task) of the dense, pruned and recovered models;
#   3. bench/targets.py for sparsegpt-50, wanda-2:4 and wanda-70 in the same store;
#   4. `ebft run` at the defaults (distillation included) on a random-weight TinyLlama-1.1B
#      (bench/random_model.py): the CUDA path and its times; its losses mean nothing.
# Logs, JSON results and run reports go to $OUT (default /tmp/gpu-out), eight files at most.
set -u
pieces=${1:?usage: bash bench/gpu_session.sh PAYLOAD_GLOB}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
began=$(date +%s)
deadline=$((began + ${EBFT_GPU_BUDGET_S:-560}))
left() { echo $((deadline - $(date +%s))); }
bounded() { local cap=$1 l; l=$(left); l=$((l < cap ? l : cap)); echo $((l > 1 ? l : 1)); }
step() { echo "[$(($(date +%s) - began)) s] $*" | tee -a "$out/gpu.txt"; }
quiet() { grep --line-buffered -v -E "\| (INFO|DEBUG) +\|" ; }
# at most 8 files come back: every run report of the targets in one archive, after each step
keep_reports() { tar -czf "$out/targets_reports.tgz" -C /tmp/targets/store reports 2>/dev/null; }

step "1. environment"
# shellcheck disable=SC2086
ls -l $pieces
if [ -f .dev/payload.sha256 ]; then  # the pieces of earlier calls are all there, and whole
    # shellcheck disable=SC2086
    [ "$(cat $pieces | sha256sum | cut -d' ' -f1)" = "$(cat .dev/payload.sha256)" ] || {
        step "payload pieces missing or damaged"; exit 1; }
fi
# shellcheck disable=SC2086
cat $pieces | tar -xzf - -C /tmp || { step "payload broken"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/payload/whl/*.whl 2>&1 | tail -3
if ! python3 -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"
then
    step "pyarrow < 24: datasets 4.x instead"
    rm -rf /tmp/site/datasets /tmp/site/datasets-*.dist-info
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-fallback \
        /tmp/payload/fallback/*.whl
    cp -r /tmp/site-fallback/* /tmp/site/
fi
export PYTHONPATH=/tmp/site:$PWD EBFT_DATA_DIR=/tmp/payload/data PYTHONUNBUFFERED=1
export PREFECT_HOME=/tmp/prefect-home EBFT_BENCH_ECHO=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt"
python3 - <<'EOF' 2>&1 | tee -a "$out/gpu.txt"
import sys, torch, transformers, prefect, zarr, pyarrow, datasets, lm_eval
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "prefect", prefect.__version__,
      "zarr", zarr.__version__, "pyarrow", pyarrow.__version__, "datasets", datasets.__version__)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10):
    a @ a
e.record(); torch.cuda.synchronize()
print(f"bf16 8192^3 matmul: {10 * 2 * 8192**3 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
from stages.model.model_source import resolve_model
print("default model", resolve_model("smollm2-135m").path)
EOF
tokenizer=$(python3 -c "from stages.model.model_source import resolve_model as r; \
print(r('smollm2-135m').path)") || { step "environment failed"; exit 1; }

tasks=piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa
step "2. targets wanda-50 + zero-shot ($(left) s left)"
timeout -k 15 "$(bounded 260)" python3 bench/targets.py --work /tmp/targets --cases wanda-50 \
    --eval-windows all --tasks "$tasks" --zeroshot-limit 500 \
    --out "$out/targets_wanda50.json" 2>&1 | tee "$out/targets_wanda50.log" | quiet | tail -20
echo "  exit status ${PIPESTATUS[0]} (124: stopped at its time bound)" | tee -a "$out/gpu.txt"
keep_reports

step "3. targets sparsegpt-50, wanda-2:4, wanda-70 ($(left) s left)"
timeout -k 15 "$(bounded 200)" python3 bench/targets.py --work /tmp/targets \
    --cases sparsegpt-50,wanda-2:4,wanda-70 --eval-windows all \
    --out "$out/targets_rest.json" 2>&1 | tee "$out/targets_rest.log" | quiet | tail -12
echo "  exit status ${PIPESTATUS[0]} (124: stopped at its time bound)" | tee -a "$out/gpu.txt"
keep_reports
step "4. TinyLlama-1.1B random weights, ebft run at the defaults ($(left) s left)"
timeout -k 15 "$(bounded 60)" python3 bench/random_model.py --config tinyllama-1.1b \
    --tokenizer "$tokenizer" --out /tmp/tinyllama --device cuda 2>&1 | tail -2
echo "  exit status ${PIPESTATUS[0]} (124: stopped at its time bound)" | tee -a "$out/gpu.txt"
timeout -k 15 "$(bounded 170)" python3 -m flows.cli run --model /tmp/tinyllama --store /tmp/tiny-store \
    --eval-windows 16 2>&1 | tee "$out/tinyllama_run.log" | quiet | tail -25
echo "  exit status ${PIPESTATUS[0]} (124: stopped at its time bound)" | tee -a "$out/gpu.txt"
cp "$(ls -t /tmp/tiny-store/reports/*/report.json 2>/dev/null | head -1)" \
    "$out/tinyllama_report.json" 2>/dev/null

step "done ($(left) s left)"
