"""The mask stage: prune every block's linear layers with a registered method.

Sequential (default), as SparseGPT and Wanda do it: block l's statistics come from the
outputs of the already-pruned blocks 0..l-1 on the calibration set, so each block sees the
errors of the pruning before it. ``mask_inputs="dense"`` reads block l's inputs from the
shared dense capture instead: blocks become independent (and could run in parallel), but
no block sees the upstream pruning error.

Structured methods (FLAP) choose whole heads and channels for the whole model at once and
live in ``stages.structured``; they store the same artifact.

Stored per artifact: ``masks.safetensors`` (bit-packed keep-masks), ``weights.safetensors``
(SparseGPT's updated weights, only when a method changes weights), ``biases.safetensors``
(FLAP's bias compensation, only when a method adds biases), ``report.json`` (per-layer and
overall sparsity, pattern check, timings).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

import stages.architecture as arch
import stages.masks.core
import stages.masks.dsnot
import stages.masks.flap
import stages.masks.magnitude
import stages.masks.sparsegpt
import stages.masks.stats
import stages.masks.wanda
import store.activations as acts
from stages.capture import ZARR_NAME
from stages.masks import METHODS, LayerStats, Pattern, parse_pattern, sparsify, split_method
from stages.masks.core import STRUCTURED
from stages.masks.flap import STRUCTURES
from stages.progress import Progress
from store import Artifact, Store, code_version, digest_json

MASKS_FILE, WEIGHTS_FILE, REPORT_FILE = "masks.safetensors", "weights.safetensors", "report.json"
BIASES_FILE = "biases.safetensors"


@dataclass(frozen=True)
class MaskSpec:
    model_digest: str
    activations_key: str  # the dense capture: its calibration set, and its block inputs
    method: str = "wanda"  # a registered method, optionally "+dsnot"
    sparsity: float = 0.5
    pattern: str | None = None  # "N:M", or None for unstructured
    mask_inputs: str = "sequential"  # or "dense"
    blocksize: int = 128  # SparseGPT
    percdamp: float = 0.01  # SparseGPT
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_var_power: float = 1.0
    flap_structure: str = "AL-AM"  # FLAP: global ranking (AL-AM) or the same share per layer
    flap_bias: bool = True  # FLAP: bias compensation for the removed channels
    dtype: str = "float32"
    batch_size: int = 8

    def key(self) -> str:
        from stages import structured

        modules = [sys.modules[__name__], arch, acts, stages.masks.core, stages.masks.dsnot,
                   stages.masks.magnitude, stages.masks.sparsegpt, stages.masks.stats,
                   stages.masks.wanda, stages.masks.flap, structured]
        unused = {"batch_size", *self.unused_parameters()}  # they change nothing stored
        params = {k: v for k, v in asdict(self).items() if k not in unused}
        return digest_json({**params, "code": code_version(*modules)})[:32]

    def unused_parameters(self) -> dict[str, str]:
        """Fields this method never reads, each with why: a change to them must not
        recompute its masks, and the CLI refuses them as flags that would be ignored."""
        base, _, refine = self.method.partition("+")
        unused = {}
        if base != "sparsegpt":
            unused |= dict.fromkeys(("blocksize", "percdamp"),
                                    f"they are SparseGPT's, not {base}'s")
        if refine != "dsnot":
            unused |= dict.fromkeys(("dsnot_cycles", "dsnot_threshold", "dsnot_var_power"),
                                    f"they are DSnoT's, and --method {self.method} has no "
                                    "+dsnot")
        if base != "flap":
            unused |= dict.fromkeys(("flap_structure", "flap_bias"),
                                    f"they are FLAP's, and --method is {self.method}")
        else:
            unused["mask_inputs"] = "FLAP scores every block on the dense capture"
        return unused

    @property
    def structured(self) -> bool:
        return self.method in STRUCTURED

    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.sparsity, self.pattern, self.structured)

    def method_params(self) -> dict:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp,
                "max_cycles": self.dsnot_cycles, "threshold": self.dsnot_threshold,
                "var_power": self.dsnot_var_power}


def validate(spec: MaskSpec) -> None:
    """Raise a one-line UserError for a bad method, ratio, pattern or input mode."""
    from stages.errors import UserError

    split_method(spec.method)
    spec.parsed_pattern()
    if spec.mask_inputs not in ("sequential", "dense"):
        raise UserError(f"--mask-inputs {spec.mask_inputs!r}: choose sequential or dense")
    if spec.structured and spec.pattern:
        raise UserError(f"--method {spec.method} removes whole heads and channels: give "
                        f"--sparsity (the fraction of block weights), not --pattern")
    checks = [(spec.blocksize >= 1, f"--blocksize {spec.blocksize}: must be at least 1"),
              (0 < spec.percdamp <= 1,
               (f"--percdamp {spec.percdamp}: must be in (0, 1], a fraction of the mean Hessian "
               f"diagonal (SparseGPT uses 0.01)")),
              (spec.dsnot_cycles >= 0, f"--dsnot-cycles {spec.dsnot_cycles}: must be >= 0"),
              (spec.dsnot_threshold >= 0,
               f"--dsnot-threshold {spec.dsnot_threshold}: must be >= 0"),
              (spec.dsnot_var_power >= 0,
               f"--dsnot-var-power {spec.dsnot_var_power}: must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if spec.flap_structure not in STRUCTURES:
        raise UserError(f"--flap-structure {spec.flap_structure!r}: choose "
                        f"{' or '.join(STRUCTURES)}")


# ---- statistics -------------------------------------------------------------------------

def collect_stats(block, linears: dict, batches, kwargs_for, hessian: bool) -> dict:
    """Input statistics of every linear layer of a block over all calibration batches.

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so the
    Hessian of a shared input is computed once.
    """
    stats: dict[str, LayerStats] = {}
    this_batch: list[tuple[torch.Tensor, LayerStats]] = []

    def hook(name):
        def record(_module, args):
            x = args[0]
            for seen, acc in this_batch:
                if seen is x:
                    stats.setdefault(name, acc)
                    return
            acc = stats.setdefault(name, LayerStats(x.shape[-1], hessian, x.device))
            acc.add(x)
            this_batch.append((x, acc))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for x in batches():
                this_batch.clear()
                arch.run_block(block, x, kwargs_for(len(x)))
    finally:
        for handle in handles:
            handle.remove()
        this_batch.clear()
    return stats


# ---- one block ---------------------------------------------------------------------------

def prune_block(block, batches, kwargs_for, spec: MaskSpec) -> dict[str, tuple]:
    """Prune a block's linear layers in place; returns {name: (keep, new weight or None)}."""
    base, with_dsnot = split_method(spec.method)
    pattern = spec.parsed_pattern()
    linears = arch.linear_layers(block)
    stats = collect_stats(block, linears, batches, kwargs_for, METHODS[base].needs_hessian)
    params = spec.method_params()
    result = {}
    for name, linear in linears.items():
        dense = linear.weight.data
        layer_stats = stats[name].as_kwargs()
        pruned = sparsify(base, dense, pattern, **layer_stats, **params)
        weight = pruned.weight
        if with_dsnot:  # reselect on the current values; pruned weights regrow their value
            current = dense if weight is None else torch.where(pruned.keep, weight, dense)
            reselected = sparsify("dsnot", current, pattern, keep=pruned.keep, **layer_stats,
                                  **params)
            weight = None if pruned.weight is None else current
            pruned = reselected
        final = (dense if weight is None else weight.to(dense.dtype)) * pruned.keep
        linear.weight.data.copy_(final)
        result[name] = (pruned.keep.cpu(), None if weight is None else final.cpu())
    return result


# ---- the whole model ----------------------------------------------------------------------

def build(store: Store, spec: MaskSpec, model_loader, activations: Artifact,
          device: torch.device) -> Artifact:
    """Compute and store the masks for every block, unless already stored."""
    from stages.devices import DTYPES, storage_dtype

    key = spec.key()
    if found := store.get("masks", key):
        return found
    if spec.structured:
        from stages import structured

        return structured.build(store, spec, model_loader, activations, device)
    started = time.monotonic()
    dtype = DTYPES[spec.dtype]
    model = model_loader(dtype)
    blocks = arch.decoder_blocks(model)
    dense = acts.open_group(Path(activations.path) / ZARR_NAME)
    n, seqlen, hidden = dense.attrs["shape"]
    kwargs_cache: dict[int, dict] = {}

    def kwargs_for(batch: int) -> dict:
        if batch not in kwargs_cache:
            kwargs_cache[batch] = arch.block_kwargs(model, batch, seqlen, device, dtype)
        return kwargs_cache[batch]

    ranges = [(s, min(s + spec.batch_size, n)) for s in range(0, n, spec.batch_size)]
    masks, weights = {}, {}
    progress = Progress(f"masks {spec.method} (blocks)", len(blocks))
    with store.writing("masks", key) as tmp:
        scratch = None
        if spec.mask_inputs == "sequential":
            scratch = acts.create(tmp / "scratch.zarr", 2, (n, seqlen, hidden),
                                  storage_dtype(dtype), {})

        def source(index: int):
            """Where block ``index`` reads its inputs: dense capture, or the pruned path."""
            if scratch is None or index == 0:
                return dense, index
            return scratch, index % 2

        for index, block in enumerate(blocks):
            block.to(device)
            group, boundary = source(index)

            def batches(group=group, boundary=boundary):
                for start, stop in ranges:
                    yield acts.read(group, boundary, start, stop).to(device, dtype)

            for name, (keep, weight) in prune_block(block, batches, kwargs_for, spec).items():
                masks[f"{index}.{name}"] = keep
                if weight is not None:
                    weights[f"{index}.{name}"] = weight
            if scratch is not None and index + 1 < len(blocks):
                with torch.inference_mode():
                    for (start, stop), x in zip(ranges, batches(), strict=True):
                        out = arch.run_block(block, x, kwargs_for(stop - start))
                        acts.write(scratch, (index + 1) % 2, start, out)
            block.to("cpu")
            progress.update(index + 1)
        if scratch is not None:
            shutil.rmtree(tmp / "scratch.zarr")
        save_masks(tmp / MASKS_FILE, masks)
        if weights:
            save_file(weights, str(tmp / WEIGHTS_FILE))
        report = sparsity_report(masks, spec.parsed_pattern())
        report.update(spec=asdict(spec), seconds=round(time.monotonic() - started, 1),
                      calibration_samples=n)
        store.write_json(tmp, REPORT_FILE, report)
    return store.get("masks", key)


# ---- storage and reports ----------------------------------------------------------------

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
    layers = [{"layer": name, "shape": list(keep.shape), "pruned": int((~keep).sum()),
               "total": keep.numel(), "sparsity": round(float((~keep).float().mean()), 6),
               "pattern_ok": pattern_holds(keep, pattern)} for name, keep in masks.items()]
    pruned, total = sum(r["pruned"] for r in layers), sum(r["total"] for r in layers)
    return {"pattern": pattern.label(), "target_sparsity": pattern.sparsity,
            "overall_sparsity": pruned / max(total, 1), "pruned": pruned, "total": total,
            "pattern_ok": all(r["pattern_ok"] for r in layers), "layers": layers}


def model_keep_masks(model) -> dict[str, torch.Tensor]:
    """The nonzero pattern of a model's block linear layers, named like the mask artifact."""
    return {f"{index}.{name}": linear.weight.detach() != 0
            for index, block in enumerate(arch.decoder_blocks(model))
            for name, linear in arch.linear_layers(block).items()}
