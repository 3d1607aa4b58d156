"""Calibration set: random token windows from C4 documents, as SparseGPT, Wanda and EBFT draw it.

The sampler picks a document longer than ``seqlen`` tokens uniformly at random, then a
window start uniformly at random inside it, ``nsamples`` times with replacement, from one
seeded generator. Everything is a pure function of (documents, tokenizer, parameters, seed).

``source="generated"``: the dense model's own text instead ("Rethinking Pruning LLMs", Shin
et al., EMNLP 2024, find reconstruction over-fits C4 calibration windows and that text the
model generates itself calibrates better). Each window starts with the first
``GENERATED_PREFIX`` tokens of the C4 window the sampler drew (so the topics are C4's) and
the model samples the rest (temperature 1, nucleus 0.95), seeded. It is the one stage that
holds the whole model (generation needs every block for every token); it runs once and is
cached like any calibration set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stages.errors import UserError
from stages.inputs import data
from stages.model.model_source import ModelSource, load_tokenizer
from stages.stage import Spec, Stage
from store import Artifact, write_json

TOKENS_FILE = "tokens.safetensors"
SOURCES = ("c4", "generated")
GENERATED_PREFIX = 8  # tokens of the C4 window a generated window starts with
GENERATE_BATCH = 8


@dataclass(frozen=True)
class CalibrationSpec(Spec):
    corpus_digest: str
    tokenizer_digest: str
    nsamples: int
    seqlen: int
    seed: int
    source: str = "c4"  # or "generated": the dense model's own text
    model_digest: str = ""  # the generating model's weights (generated only)

    def key_fields(self) -> dict:
        fields = super().key_fields()
        if self.source == "c4":  # C4 windows depend on the tokenizer, not the weights
            fields.pop("model_digest")
        return fields


def validate(nsamples: int, seqlen: int, max_context: int | None,
             seqlen_flag: str = "--seqlen") -> None:
    if nsamples <= 0:
        raise UserError(f"--nsamples {nsamples}: must be a positive number of calibration windows")
    if seqlen <= 1:
        raise UserError(f"{seqlen_flag} {seqlen}: must be at least 2 tokens")
    if max_context is not None and seqlen > max_context:
        raise UserError(f"{seqlen_flag} {seqlen} exceeds the model's context of {max_context} "
                        f"tokens; choose {seqlen_flag} <= {max_context}")


_LONGEST: dict[tuple, int] = {}  # (corpus digest, tokenizer, seqlen) -> tokens seen


def check_corpus(texts: list[str], digest: str, tokenizer, seqlen: int) -> None:
    """At least one document longer than ``seqlen`` tokens (checked before any stage).
    Documents are tried longest first and the search stops at the first that is long
    enough, so this is one tokenizer call on a real corpus (remembered per process)."""
    key = (digest, tokenizer.name_or_path, seqlen)
    if key not in _LONGEST:
        longest = 0
        for text in sorted(texts, key=len, reverse=True):
            longest = max(longest, len(tokenizer(text)["input_ids"]))
            if longest > seqlen or 4 * len(text) + 8 <= seqlen:  # none left can get there
                break  # (a character is at most 4 byte tokens, plus a few special ones)
        _LONGEST[key] = longest
    longest = _LONGEST[key]
    if longest <= seqlen:
        raise UserError(f"no calibration document is longer than --seqlen {seqlen} tokens "
                        f"(longest: {longest}); lower --seqlen or provide longer documents")


def sample_windows(token_lists: list[list[int]], nsamples: int, seqlen: int,
                   seed: int) -> torch.Tensor:
    """(nsamples, seqlen) int64 windows drawn from documents longer than seqlen."""
    eligible = [ids for ids in token_lists if len(ids) > seqlen]
    if not eligible:
        longest = max((len(ids) for ids in token_lists), default=0)
        raise UserError(f"no calibration document is longer than --seqlen {seqlen} tokens "
                        f"(longest: {longest}); lower --seqlen or provide longer documents")
    gen = torch.Generator().manual_seed(seed)
    windows = torch.empty(nsamples, seqlen, dtype=torch.long)
    for i in range(nsamples):
        doc = eligible[int(torch.randint(len(eligible), (1,), generator=gen))]
        start = int(torch.randint(len(doc) - seqlen, (1,), generator=gen))
        windows[i] = torch.tensor(doc[start:start + seqlen])
    return windows


def build(spec: CalibrationSpec, out: Path, model: ModelSource, data_dir: str | None,
          device: str = "cpu") -> None:
    """Sample the calibration windows from the C4 documents with the model's tokenizer (and,
    for generated text, let the model write each window on from its first tokens)."""
    texts = data.c4_documents(data.data_dir(data_dir)).texts
    token_lists = load_tokenizer(model)(texts)["input_ids"]
    windows = sample_windows(token_lists, spec.nsamples, spec.seqlen, spec.seed)
    if spec.source == "generated":
        windows = generate_windows(model, windows[:, :GENERATED_PREFIX], spec.seqlen,
                                   spec.seed, device)
    save_file({"input_ids": windows}, str(out / TOKENS_FILE))
    write_json(out, "meta.json", {**asdict(spec), "shape": list(windows.shape)})


@torch.inference_mode()
def generate_windows(model: ModelSource, prompts: torch.Tensor, seqlen: int, seed: int,
                     device: str) -> torch.Tensor:
    """(n, seqlen) windows the model samples on from each prompt row: exactly seqlen tokens
    (end-of-text suppressed), the same on every run of a machine for a seed."""
    from transformers import AutoModelForCausalLM

    from stages.model.devices import resolve_device, resolve_dtype

    target = resolve_device(device)
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=resolve_dtype("auto", target))
    lm.to(target).eval()
    new = seqlen - prompts.shape[1]
    rows = []
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in prompts.split(GENERATE_BATCH):
            ids = lm.generate(chunk.to(target), attention_mask=torch.ones_like(chunk).to(target),
                              do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                              max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=_first(lm.generation_config.eos_token_id))
            rows.append(ids[:, :seqlen].cpu())
    return torch.cat(rows)


def _first(token: int | list[int] | None) -> int:
    return (token[0] if token else 0) if isinstance(token, list) else (token or 0)


STAGE = Stage("calibration", build)


def load(artifact: Artifact) -> torch.Tensor:
    return load_file(f"{artifact.path}/{TOKENS_FILE}")["input_ids"]
