"""Wikitext-2 perplexity with the protocol of SparseGPT, Wanda and EBFT.

The raw test split, rows joined with "\\n\\n", is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped).
Each window's mean next-token loss is computed independently; perplexity is exp of the
mean over windows. ``windows`` limits the count for a quick estimate.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from stages.progress import Progress
from store import code_version, digest_json


@dataclass(frozen=True)
class PerplexitySpec:
    model_digest: str
    corpus_digest: str
    seqlen: int = 2048
    windows: int | None = None  # None: every window
    dtype: str = "float32"

    def key(self) -> str:
        me = sys.modules[__name__]
        return digest_json({**asdict(self), "code": code_version(me)})[:32]


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
def perplexity(model, windows: torch.Tensor, device: torch.device) -> dict:
    losses = []
    progress = Progress("perplexity (windows)", len(windows))
    for i, window in enumerate(windows):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, ids[0, 1:]).item())
        progress.update(i + 1, f"running ppl {math.exp(sum(losses) / len(losses)):.3f}")
    mean = sum(losses) / len(losses)
    return {"perplexity": math.exp(mean), "mean_loss": mean, "windows": len(losses)}


def evaluate(store, spec: PerplexitySpec, model_loader, text: str, tokenizer,
             device) -> dict:
    """Perplexity of a model on a corpus, stored as JSON under its content key."""
    import json

    from stages.devices import DTYPES

    key = spec.key()
    if store.get("perplexity", key):
        return json.loads((store.path("perplexity", key) / "result.json").read_text())
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    windows = token_windows(ids, spec.seqlen, spec.windows)
    model = model_loader(DTYPES[spec.dtype]).to(device)
    result = {**perplexity(model, windows, device),
              "windows_total": ids.numel() // spec.seqlen, "seqlen": spec.seqlen,
              "tokens": ids.numel(), "dtype": spec.dtype}
    with store.writing("perplexity", key) as tmp:
        store.write_json(tmp, "result.json", result)
    return result
