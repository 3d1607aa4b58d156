"""Calibration set: random token windows from C4 documents, as SparseGPT, Wanda and EBFT draw it.

The sampler picks a document longer than ``seqlen`` tokens uniformly at random, then a
window start uniformly at random inside it, ``nsamples`` times with replacement, from one
seeded generator. C4 windows are a pure function of (documents, tokenizer, parameters, seed);
generated ones also of the model's weights and the device type and dtype it samples in.

``source="generated"``: the dense model's own text instead ("Rethinking Pruning LLMs", Shin
et al., EMNLP 2024, find reconstruction over-fits C4 calibration windows and that text the
model generates itself calibrates better). Each window starts with the first
``GENERATED_PREFIX`` tokens of the C4 window the sampler drew (so the topics are C4's) and
the model samples the rest (temperature 1, nucleus 0.95), seeded (``generation.py``). It is
the one stage that holds the whole model (generation needs every block for every token); it
runs once and is cached like any calibration set.
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


@dataclass(frozen=True)
class CalibrationSpec(Spec):
    corpus_digest: str
    tokenizer_digest: str
    nsamples: int
    seqlen: int
    seed: int
    source: str = "c4"  # or "generated": the dense model's own text
    # generated only: the generating model's weights, and the device type and dtype it
    # samples in ("cpu/float32"): sampling differs between them
    model_digest: str = ""
    generator: str = ""

    def key_fields(self) -> dict:
        fields = super().key_fields()
        if self.source == "c4":  # C4 windows depend on the tokenizer, not the weights
            fields.pop("model_digest")
            fields.pop("generator")
        return fields

    def code_modules(self) -> list:
        """The sampler's code, and the generator's only for generated sets."""
        extra = [generation()] if self.source == "generated" else []
        return [*super().code_modules(), *extra]


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
        dtype = spec.generator.split("/")[1]
        windows = generation().generate_windows(model, windows[:, :GENERATED_PREFIX],
                                                spec.seqlen, spec.seed, device, dtype)
    save_file({"input_ids": windows}, str(out / TOKENS_FILE))
    write_json(out, "meta.json", {**asdict(spec), "shape": list(windows.shape)})


def generation():
    """``stages.inputs.generation``, imported by name: only generated sets depend on it."""
    import importlib

    return importlib.import_module("stages.inputs.generation")


STAGE = Stage("calibration", build)


def load(artifact: Artifact) -> torch.Tensor:
    return load_file(f"{artifact.path}/{TOKENS_FILE}")["input_ids"]


def meta(artifact: Artifact) -> dict:
    """What the calibration set is (its spec and shape)."""
    import json

    return json.loads((Path(artifact.path) / "meta.json").read_text())
