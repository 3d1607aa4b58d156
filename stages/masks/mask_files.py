"""A mask artifact's files, and putting them into a model.

Kept apart from the mask methods so the stages that only read masks (perplexity of the
pruned model, EBFT, LoRA, assembly) depend on this code, not on how masks are chosen.

Files: ``masks.safetensors`` (bit-packed keep-masks), ``weights.safetensors`` (SparseGPT's
updated weights, only when a method changes weights), ``biases.safetensors`` (FLAP's bias
compensation, only when a method adds biases), ``report.json`` (sparsity per layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import stages.model.architecture as arch
from stages.masks import Pattern
from stages.model.model_source import ModelSource, load_model
from store import Artifact

MASKS_FILE, WEIGHTS_FILE, REPORT_FILE = "masks.safetensors", "weights.safetensors", "report.json"
BIASES_FILE = "biases.safetensors"


class MaskFiles:
    """A mask artifact's tensors, read once, applied to one block at a time."""

    def __init__(self, artifact: Artifact) -> None:
        self.masks, self.weights = load_masks(artifact), load_weights(artifact)
        self.biases = load_biases(artifact)

    def apply(self, block, index: int) -> None:
        apply_block(block, index, self.masks, self.weights, self.biases)


def load_masked_model(source: ModelSource, dtype: torch.dtype, masks: Artifact | None = None):
    """The dense model, with a mask artifact applied when one is given."""
    model = load_model(source, dtype)
    if masks is not None:
        apply_masks(model, masks)
    return model


def save_masks(path: Path, masks: dict[str, torch.Tensor]) -> None:
    """Keep-masks bit-packed (8 per byte) with their shapes in the metadata."""
    packed = {name: np.packbits(keep.numpy().reshape(-1)) for name, keep in masks.items()}
    shapes = {name: list(keep.shape) for name, keep in masks.items()}
    save_numpy(packed, str(path), metadata={"shapes": json.dumps(shapes)})


def load_masks(artifact: Artifact) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    path = str(Path(artifact.path) / MASKS_FILE)
    with safe_open(path, "np") as f:
        shapes = json.loads(f.metadata()["shapes"])
    packed = load_numpy(path)
    return {name: torch.from_numpy(
        np.unpackbits(bits, count=int(np.prod(shapes[name]))).astype(bool).reshape(shapes[name]))
        for name, bits in packed.items()}


def load_weights(artifact: Artifact) -> dict[str, torch.Tensor]:
    path = Path(artifact.path) / WEIGHTS_FILE
    return load_file(str(path)) if path.exists() else {}


def load_biases(artifact: Artifact) -> dict[str, torch.Tensor]:
    path = Path(artifact.path) / BIASES_FILE
    return load_file(str(path)) if path.exists() else {}


def apply_masks(model, artifact: Artifact) -> None:
    """Put a mask artifact into a dense model in memory: new weights if any, then the zeros."""
    masks, weights, biases = load_masks(artifact), load_weights(artifact), load_biases(artifact)
    for index, block in enumerate(arch.decoder_blocks(model)):
        apply_block(block, index, masks, weights, biases)


@torch.no_grad()
def apply_block(block, index: int, masks: dict, weights: dict, biases: dict) -> None:
    """One block as the mask stage left it: new weights and biases if any, zeros applied."""
    for name, linear in arch.linear_layers(block).items():
        key = f"{index}.{name}"
        if key in weights:
            linear.weight.copy_(weights[key])
        linear.weight.mul_(masks[key].to(linear.weight.device))
        if key in biases:
            bias = biases[key].to(linear.weight.device, linear.weight.dtype)
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(bias, requires_grad=False)
            else:
                linear.bias.copy_(bias)


# ---- what the masks are: the report stored with them ------------------------------------

def pattern_holds(keep: torch.Tensor, pattern: Pattern) -> bool:
    rows, cols = keep.shape
    if pattern.structured:  # kept weights form a rectangle: whole rows and columns removed
        return bool(torch.equal(keep, torch.outer(keep.any(1), keep.any(0))))
    if pattern.is_nm:
        if cols % pattern.m:
            return False
        pruned = (~keep).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        return bool((pruned >= pattern.n).all())
    # Per-row methods (Wanda) prune floor(cols * s) in every row, a hair under numel * s.
    return int((~keep).sum()) >= rows * int(cols * pattern.sparsity)


def sparsity_report(masks: dict[str, torch.Tensor], pattern: Pattern) -> dict:
    """Per-layer and overall sparsity, and whether every layer meets the requested pattern."""
    return summarize(layer_rows(masks, pattern), pattern)


def layer_rows(masks: dict[str, torch.Tensor], pattern: Pattern) -> list[dict]:
    return [{"layer": name, "shape": list(keep.shape), "pruned": int((~keep).sum()),
             "total": keep.numel(), "sparsity": round(float((~keep).float().mean()), 6),
             "pattern_ok": pattern_holds(keep, pattern)} for name, keep in masks.items()]


def summarize(layers: list[dict], pattern: Pattern) -> dict:
    pruned, total = sum(r["pruned"] for r in layers), sum(r["total"] for r in layers)
    return {"pattern": pattern.label(), "target_sparsity": pattern.sparsity,
            "overall_sparsity": pruned / max(total, 1), "pruned": pruned, "total": total,
            "pattern_ok": all(r["pattern_ok"] for r in layers), "layers": layers}


def model_keep_masks(model) -> dict[str, torch.Tensor]:
    """The nonzero pattern of a model's block linear layers, named like the mask artifact."""
    return {f"{index}.{name}": linear.weight.detach() != 0
            for index, block in enumerate(arch.decoder_blocks(model))
            for name, linear in arch.linear_layers(block).items()}
