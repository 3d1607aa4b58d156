"""A randomly initialised Llama of a published shape, saved as a Hugging Face folder.

    python bench/random_model.py --config tinyllama-1.1b --tokenizer FOLDER --out FOLDER
                                 [--layers N] [--dtype bfloat16] [--device cpu]

For timing and memory measurements of large shapes where the real weights cannot be had
(no Hub access from the benchmark machines): the compute of a block depends on its shapes,
not its values. Tensors are drawn and written one at a time into ~1 GiB shards (indexed as
``save_pretrained`` does), so a 7B or 70B shape never has to fit in memory. Losses and perplexities of such a model mean nothing; its timings do.
``--layers`` keeps the block shape and cuts the depth (e.g. Llama-2-7B blocks in a 2-layer
model, to time one block). The vocabulary is the tokenizer's, so the calibration and
evaluation stages run unchanged on it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from scale_projection import CONFIGS

from stages.model.assembly import ShardWriter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--tokenizer", required=True,
                        help="a folder with tokenizer.json / tokenizer_config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=None, help="override the depth")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is faster)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.config not in CONFIGS:
        sys.exit(f"--config {args.config!r}: choose one of {', '.join(sorted(CONFIGS))}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = {**CONFIGS[args.config], "vocab_size": len(tokenizer)}
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype=dtype)
    with torch.device("meta"):
        shapes = dict(LlamaForCausalLM(config).named_parameters())
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    writer = ShardWriter(tmp)
    for name, meta in shapes.items():  # norms at 1, the rest N(0, 0.02) as Llama initialises
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=dtype)
        else:
            tensor = torch.empty(meta.shape, device=args.device).normal_(
                0.0, 0.02, generator=generator).to("cpu", dtype)
        writer.add({name: tensor})
    params = writer.finish()
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"{args.config}{f' ({args.layers} layers)' if args.layers else ''}: "
          f"{params / 1e9:.3f} B parameters, random weights, {args.dtype} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
