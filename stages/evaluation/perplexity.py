"""Perplexity with the protocol of SparseGPT, Wanda and EBFT.

The raw Wikitext-2 test split (or, with ``eval_data``, its validation split or the held-out
C4 documents), rows joined with "\\n\\n", is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped).
Each window's mean next-token loss is computed independently; perplexity is exp of the
mean over windows. ``windows`` limits the count for a quick estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import stages.model.architecture as arch
from stages.inputs import data
from stages.masks.mask_files import MaskFiles
from stages.model.model_source import ModelSource, load_tokenizer
from stages.model.streaming import BlockLoader
from stages.progress import Progress
from stages.stage import Spec, Stage, result_json
from store import Artifact, write_json


@dataclass(frozen=True)
class PerplexitySpec(Spec):
    model_digest: str  # the model's, or for a pruned model the model's and its masks'
    corpus_digest: str
    seqlen: int
    windows: int | None  # None: every window
    dtype: str


_TOKEN_COUNTS: dict[tuple[str, str], int] = {}  # (corpus digest, tokenizer) -> tokens


def window_count(corpus, tokenizer, seqlen: int) -> int:
    """How many windows of ``seqlen`` tokens the corpus holds (tokenized once per process)."""
    key = (corpus.digest, tokenizer.name_or_path)
    if key not in _TOKEN_COUNTS:
        _TOKEN_COUNTS[key] = len(tokenizer(corpus.texts[0])["input_ids"])
    return _TOKEN_COUNTS[key] // seqlen


def token_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    total = ids.numel() // seqlen
    count = total if limit is None else min(limit, total)
    return ids.reshape(-1)[: count * seqlen].reshape(count, seqlen)


@torch.inference_mode()
def perplexity(loader: BlockLoader, windows: torch.Tensor, device: torch.device,
               masks: MaskFiles | None = None) -> dict:
    """Every window through block l before block l+1 is read (as SparseGPT evaluates), so
    one block's weights are in memory at a time; the windows' hidden states stay on the
    device between blocks. Each window's loss is the mean next-token cross-entropy."""
    hidden, kwargs = [], None
    for window in windows:
        first, block_kwargs = loader.first_inputs(window.unsqueeze(0))
        hidden.append(first.to(device))
        kwargs = kwargs or arch.to_device(block_kwargs, device, loader.dtype)
    progress = Progress("perplexity (blocks)", loader.n_blocks)
    for index, block in enumerate(loader.blocks(device, masks.apply if masks else None)):
        hidden = [arch.run_block(block, h, kwargs) for h in hidden]
        progress.update(index + 1)
    head = loader.head().to(device)
    losses = [F.cross_entropy(head(h)[0, :-1].float(), w[1:].to(device)).item()
              for h, w in zip(hidden, windows, strict=True)]
    mean = sum(losses) / len(losses)
    return {"perplexity": math.exp(mean), "mean_loss": mean, "windows": len(losses)}


def build(spec: PerplexitySpec, out: Path, model: ModelSource, data_dir: str | None,
          device: str, masks: Artifact | None = None, eval_data: str = "wikitext2") -> None:
    """Perplexity of a model folder, or of the dense model with a mask artifact applied."""
    from stages.model.devices import DTYPES, resolve_device

    corpus = data.eval_corpus(eval_data, data.data_dir(data_dir))
    if corpus.digest != spec.corpus_digest:  # the key names the text: never measure another
        raise RuntimeError(f"{eval_data} changed since the run was planned; run it again")
    text = corpus.texts[0]
    ids = load_tokenizer(model)(text, return_tensors="pt")["input_ids"]
    windows = token_windows(ids, spec.seqlen, spec.windows)
    loader = BlockLoader(model.path, DTYPES[spec.dtype])
    result = {**perplexity(loader, windows, resolve_device(device),
                           MaskFiles(masks) if masks is not None else None),
              "windows_total": ids.numel() // spec.seqlen, "seqlen": spec.seqlen,
              "tokens": ids.numel(), "dtype": spec.dtype, "eval_data": eval_data}
    write_json(out, "result.json", result)


STAGE = Stage("perplexity", build, result_json)
