"""Calibration set: random token windows from C4 documents, as SparseGPT, Wanda and EBFT draw it.

The sampler picks a document longer than ``seqlen`` tokens uniformly at random, then a
window start uniformly at random inside it, ``nsamples`` times with replacement, from one
seeded generator. Everything is a pure function of (documents, tokenizer, parameters, seed).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

from stages.errors import UserError
from store import Artifact, Store, code_version, digest_json

TOKENS_FILE = "tokens.safetensors"


@dataclass(frozen=True)
class CalibrationSpec:
    corpus_digest: str
    tokenizer_digest: str
    nsamples: int = 256
    seqlen: int = 1024
    seed: int = 0

    def key(self) -> str:
        me = sys.modules[__name__]
        return digest_json({**asdict(self), "code": code_version(me)})[:32]


def validate(nsamples: int, seqlen: int, max_context: int | None,
             seqlen_flag: str = "--seqlen") -> None:
    if nsamples <= 0:
        raise UserError(f"--nsamples {nsamples}: must be a positive number of calibration windows")
    if seqlen <= 1:
        raise UserError(f"{seqlen_flag} {seqlen}: must be at least 2 tokens")
    if max_context is not None and seqlen > max_context:
        raise UserError(f"{seqlen_flag} {seqlen} exceeds the model's context of {max_context} "
                        f"tokens; choose {seqlen_flag} <= {max_context}")


def check_corpus(texts: list[str], tokenizer, seqlen: int) -> None:
    """At least one document longer than ``seqlen`` tokens (checked before any stage)."""
    longest = max((len(ids) for ids in tokenizer(texts)["input_ids"]), default=0)
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


def build(store: Store, spec: CalibrationSpec, texts: list[str], tokenizer) -> Artifact:
    """Sample the calibration windows and store them, unless already stored."""
    key = spec.key()
    if found := store.get("calibration", key):
        return found
    token_lists = tokenizer(texts)["input_ids"]
    windows = sample_windows(token_lists, spec.nsamples, spec.seqlen, spec.seed)
    with store.writing("calibration", key) as tmp:
        save_file({"input_ids": windows}, str(tmp / TOKENS_FILE))
        store.write_json(tmp, "meta.json", {**asdict(spec), "shape": list(windows.shape)})
    return store.get("calibration", key)


def load(artifact: Artifact) -> torch.Tensor:
    return load_file(f"{artifact.path}/{TOKENS_FILE}")["input_ids"]
