"""Assembly: the pruned (and fine-tuned) model as a standard Hugging Face folder.

The dense model is loaded, each block's linear weights are replaced by the fine-tuned ones
(EBFT's blocks or LoRA's merged projections; else the mask stage's, with the zeros applied),
and the result is saved with ``save_pretrained``: safetensors, config and tokenizer, no mask
tensors, no custom code, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it
anywhere. FLAP's compensation biases are saved as the projections' biases (zeros on the
others), and ``form="compact"`` saves structured masks as a physically narrower model
(``stages.masks.structured.shrink``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import stages.model.architecture as arch
from stages.masks import Pattern, structured
from stages.masks.mask_files import (
    apply_masks,
    load_biases,
    load_masks,
    model_keep_masks,
    sparsity_report,
)
from stages.model.model_source import ModelSource, load_model, load_tokenizer
from stages.recovery import lora
from stages.recovery.ebft import load_block_weights
from stages.stage import Spec, Stage
from store import Artifact, write_json


@dataclass(frozen=True)
class AssemblySpec(Spec):
    model_digest: str
    masks_key: str
    last_block_key: str | None  # the final EBFT block's key; None: the pruned model as is
    dtype: str  # the dtype the weights are saved in
    lora_key: str | None  # LoRA's merged projections, instead of EBFT's blocks
    form: str  # masked, or compact: structured masks as a narrower model


def build(spec: AssemblySpec, out: Path, model: ModelSource, masks: Artifact,
          blocks: list[Artifact], pattern: Pattern, lora_artifact: Artifact | None = None) -> None:
    """Write the final model folder (plus ``sparsity.json``)."""
    from stages.model.devices import DTYPES

    dense = load_model(model, torch.float32)
    apply_masks(dense, masks)
    keep = load_masks(masks)
    if blocks:  # EBFT: one artifact per block, no fewer
        for block, artifact in zip(arch.decoder_blocks(dense), blocks, strict=True):
            load_block_weights(block, artifact)
    if lora_artifact is not None:
        lora.load_into(dense, lora_artifact)
    # Structured: the masks say which heads/channels went; the weights alone cannot (a kept
    # weight may be exactly zero, e.g. after 4-bit dequantization).
    report = sparsity_report(keep if pattern.structured else model_keep_masks(dense), pattern)
    if load_biases(masks):  # FLAP's compensation: every projection gets a bias
        structured.make_biases_loadable(dense)
    if spec.form == "compact":
        dense = structured.shrink(dense, keep)
    dense.to(DTYPES[spec.dtype])
    summary = {k: v for k, v in report.items() if k != "layers"}
    summary.update(form=spec.form, parameters=sum(p.numel() for p in dense.parameters()))
    dense.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    write_json(out, "sparsity.json", summary)


STAGE = Stage("models-sparse", build)


def as_model_source(artifact: Artifact, name: str) -> ModelSource:
    return ModelSource(name, artifact.path, artifact.digest)
