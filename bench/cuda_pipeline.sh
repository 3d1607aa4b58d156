#!/usr/bin/env bash
# The CUDA path, measured for real on a GPU machine (issue 6).
#
#   bash bench/cuda_pipeline.sh OUT_DIR TOKENIZER_DIR [ebft run flags...]
#
# 1. Random-weight Llama models of published shapes (bench/random_model.py): the real
#    weights of a >= 1B model cannot be fetched on an offline GPU machine, and timings and
#    memory depend on shapes alone (losses and perplexities of these models mean nothing).
# 2. bench/throughput.py on CUDA: matmul peaks and the EBFT step on a Llama-2-7B block and a
#    TinyLlama-1.1B block, fp32 and bf16 autocast, at the paper's batch (8 x 1024).
# 3. `ebft run --device cuda` on the 1.1B model, end to end, with the flags given (default:
#    64 calibration windows, 2 epochs, batch 8); its report and log go to OUT_DIR.
# Needs the project's dependencies importable (PYTHONPATH or an install) and EBFT_DATA_DIR;
# EBFT_SKIP_THROUGHPUT=1 skips step 2, EBFT_RUN_TIMEOUT (s) bounds step 3.
set -u
out=${1:?usage: bash bench/cuda_pipeline.sh OUT_DIR TOKENIZER_DIR [ebft run flags]}
tokenizer=${2:?usage: bash bench/cuda_pipeline.sh OUT_DIR TOKENIZER_DIR [ebft run flags]}
shift 2
run_flags=("$@")
[ ${#run_flags[@]} -eq 0 ] && run_flags=(--nsamples 64 --epochs 2 --train-batch-size 8)
work=${EBFT_BENCH_WORK:-/tmp/ebft-cuda}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

[ -z "${EBFT_SKIP_THROUGHPUT:-}" ] && python3 bench/random_model.py --config llama-2-7b \
    --layers 2 --tokenizer "$tokenizer" --out "$work/llama-2-7b-2layers" --device cuda
python3 bench/random_model.py --config tinyllama-1.1b --tokenizer "$tokenizer" \
    --out "$work/tinyllama-1.1b" --device cuda

if [ -z "${EBFT_SKIP_THROUGHPUT:-}" ]; then
timeout 300 python3 bench/throughput.py --model "$work/llama-2-7b-2layers" --blocks 0 \
    --batch 8 --device cuda --matmul-size 8192 --steps 10 --store "$work/store" --profile \
    --out "$out/throughput_llama2_7b_block.json" 2>&1 | tee "$out/throughput_7b.log"
timeout 300 python3 bench/throughput.py --model "$work/tinyllama-1.1b" --blocks 0 \
    --batch 8 --device cuda --matmul-size 8192 --steps 10 --store "$work/store" \
    --out "$out/throughput_tinyllama.json" 2>&1 | tee "$out/throughput_1b.log"
fi

timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)  # peak RSS where available
"${timer[@]}" timeout "${EBFT_RUN_TIMEOUT:-3600}" python3 -m flows.cli run --model "$work/tinyllama-1.1b" --store "$work/store" \
    --device cuda "${run_flags[@]}" 2>&1 | grep -v "| INFO    |" | tee "$out/run.log"
cp "$(ls -t "$work"/store/reports/*/report.json | head -1)" "$out/run_report.json"
du -sh "$work/store"/* | tee "$out/store_size.txt"
