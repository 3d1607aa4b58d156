"""A mask artifact's files, and putting them into a model.

Kept apart from the mask methods so the stages that only read masks (perplexity of the
pruned model, EBFT, LoRA, assembly) depend on this code, not on how masks are chosen.

Files: ``masks.safetensors`` (bit-packed keep-masks), ``weights-<block>.safetensors``
(SparseGPT's updated weights, one file per block, only when a method changes weights),
``biases.safetensors`` (FLAP's bias compensation, only when a method adds biases),
``report.json`` (sparsity per layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import stages.model.architecture as arch
from stages.masks import Pattern
from stages.model.model_source import ModelSource, load_model
from store import Artifact

MASKS_FILE, REPORT_FILE = "masks.safetensors", "report.json"
BIASES_FILE = "biases.safetensors"


class MaskFiles:
    """A mask artifact read one layer at a time: a 7B model's keep-masks are 6.5 GB as
    booleans and 0.8 GB as bits, so a layer's bits are read and unpacked when asked for."""

    def __init__(self, artifact: Artifact) -> None:
        from safetensors import safe_open

        folder = Path(artifact.path)
        self.masks_file = folder / MASKS_FILE
        with safe_open(str(self.masks_file), "np") as f:
            self.shapes = json.loads(f.metadata()["shapes"])
        # {kind: {tensor name: the file holding it}}
        self.where = {kind: {name: path for path in sorted(folder.glob(pattern))
                             for name in _tensor_names(path)}
                      for kind, pattern in (("weights", "weights*.safetensors"),
                                            ("biases", BIASES_FILE))}

    def report(self) -> dict:
        """The mask stage's report: its spec, per-layer sparsity, each block's sparsity
        (empty for a folder of masks alone, as tests and hand-made masks have)."""
        path = self.masks_file.parent / REPORT_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def has_biases(self) -> bool:
        return bool(self.where["biases"])

    def keep(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.masks_file), "np") as f:
            bits = f.get_tensor(name)  # 1 bit per weight
        return unpack(bits, self.shapes[name])

    def tensor(self, kind: str, name: str) -> torch.Tensor | None:
        """The layer's new weight (``weights``) or bias (``biases``), if the method made one."""
        path = self.where[kind].get(name)
        if path is None:
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name)

    def block(self, index: int, names) -> tuple[dict, dict, dict]:
        """(keep-masks, new weights, biases) of one block's layers, by full layer name."""
        full = [f"{index}.{name}" for name in names]
        weights = {n: t for n in full if (t := self.tensor("weights", n)) is not None}
        biases = {n: t for n in full if (t := self.tensor("biases", n)) is not None}
        return {n: self.keep(n) for n in full}, weights, biases

    def apply(self, block, index: int) -> None:
        apply_block(block, index, *self.block(index, arch.linear_layers(block)))


def _tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return set(f.keys())


def pack(keep: torch.Tensor) -> np.ndarray:
    """A keep-mask as bits, 8 per byte (what the artifact stores)."""
    return np.packbits(keep.cpu().numpy().reshape(-1))


def unpack(bits: np.ndarray, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits, count=int(np.prod(shape))).astype(bool)
                            .reshape(shape))


def load_masked_model(source: ModelSource, dtype: torch.dtype, masks: Artifact | None = None):
    """The dense model, with a mask artifact applied when one is given."""
    model = load_model(source, dtype)
    if masks is not None:
        apply_masks(model, masks)
    return model


def save_masks(path: Path, masks: dict[str, torch.Tensor]) -> None:
    """Keep-masks bit-packed (8 per byte) with their shapes in the metadata."""
    save_packed(path, {name: pack(keep) for name, keep in masks.items()},
                {name: list(keep.shape) for name, keep in masks.items()})


def save_packed(path: Path, packed: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> None:
    save_numpy(packed, str(path), metadata={"shapes": json.dumps(shapes)})


def load_masks(artifact: Artifact) -> dict[str, torch.Tensor]:
    """Every keep-mask, unpacked (small models and tests; stages use ``MaskFiles``)."""
    files = MaskFiles(artifact)
    return {name: files.keep(name) for name in files.shapes}


def weights_file(index: int) -> str:
    """The file of block ``index``'s new weights (methods that change weights)."""
    return f"weights-{index:05d}.safetensors"


def load_weights(artifact: Artifact) -> dict[str, torch.Tensor]:
    """Every new weight of a mask artifact (the whole model's: small models and LoRA)."""
    weights = {}
    for path in sorted(Path(artifact.path).glob("weights*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


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
