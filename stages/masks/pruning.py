"""The mask stage: prune every block's linear layers with a registered method.

Sequential (default), as SparseGPT and Wanda do it: block l's statistics come from the
outputs of the already-pruned blocks 0..l-1 on the calibration set, so each block sees the
errors of the pruning before it. ``mask_inputs="dense"`` reads block l's inputs from the
shared dense capture instead: blocks become independent (and could run in parallel), but
no block sees the upstream pruning error.

Structured methods (FLAP) choose whole heads and channels for the whole model at once and
live in ``stages.masks.structured``; they store the same artifact.

Stored per artifact: ``masks.safetensors`` (bit-packed keep-masks), ``weights.safetensors``
(SparseGPT's updated weights, only when a method changes weights), ``biases.safetensors``
(FLAP's bias compensation, only when a method adds biases), ``report.json`` (per-layer and
overall sparsity, pattern check, timings).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import stages.model.architecture as arch
import store.activations as acts
from stages.inputs.capture import ZARR_NAME, input_stats
from stages.masks import (
    MaskMethod,
    Pattern,
    is_structured,
    parse_pattern,
    split_method,
)
from stages.masks.block_stats import collect_stats
from stages.masks.mask_files import (
    MASKS_FILE,
    REPORT_FILE,
    layer_rows,
    pack,
    save_packed,
    summarize,
    weights_file,
)
from stages.model.devices import free_memory
from stages.model.model_source import ModelSource
from stages.model.streaming import BlockLoader
from stages.progress import Progress
from stages.stage import Spec, Stage
from store import Artifact, write_json


@dataclass(frozen=True)
class MaskSpec(Spec):
    model_digest: str
    activations_key: str  # the dense capture: its calibration set, and its block inputs
    method: str = "wanda"  # a registered scorer, optionally "+refiner"; or a structured one
    sparsity: float = 0.5
    pattern: str | None = None  # "N:M", or None for unstructured
    mask_inputs: str = "sequential"  # or "dense"
    params: dict = field(default_factory=dict)  # {method name: {parameter: value}}
    layer_sparsity: str = "uniform"  # or "owl": per-block sparsities (stages.masks.owl)
    owl_threshold: float = 5.0  # OWL's M: a score above M x the block's mean is an outlier
    owl_limit: float = 0.08  # OWL's lambda: block sparsities spread over 2 x this
    dtype: str = "float32"
    batch_size: int = 8
    not_in_key = ("batch_size", "params")

    def methods(self) -> list[MaskMethod]:
        """The methods named in ``method``, each with its parameters (defaults if absent)."""
        return [cls(**self.params.get(cls.name, {})) for cls in split_method(self.method)]

    def key_fields(self) -> dict:
        """Only what changes the stored masks: the named methods' own parameters, not those
        of other methods (``params`` may hold every registered method's)."""
        fields = super().key_fields()
        if self.structured:  # structured methods score every block on the dense capture
            fields.pop("mask_inputs")
        if self.layer_sparsity == "uniform":
            fields.pop("owl_threshold")
            fields.pop("owl_limit")
        return {**fields, "params": {m.name: asdict(m.resolved()) for m in self.methods()}}

    def code_modules(self) -> list:
        """This stage's code and that of the methods it runs (found by name, not imported),
        and OWL's when it chooses the block sparsities."""
        owl = [owl_module()] if self.layer_sparsity == "owl" else []
        return [*super().code_modules(), *(sys.modules[type(m).__module__]
                                           for m in self.methods()), *owl]

    @property
    def structured(self) -> bool:
        return is_structured(self.method)

    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.sparsity, self.pattern, self.structured)


def validate(spec: MaskSpec) -> None:
    """Raise a one-line UserError for a bad method, parameter, ratio, pattern or input mode."""
    from stages.errors import UserError

    methods = spec.methods()
    spec.parsed_pattern()
    if spec.mask_inputs not in ("sequential", "dense"):
        raise UserError(f"--mask-inputs {spec.mask_inputs!r}: choose sequential or dense")
    if spec.structured and spec.pattern:
        raise UserError(f"--method {spec.method} removes whole heads and channels: give "
                        f"--sparsity (the fraction of block weights), not --pattern")
    if spec.layer_sparsity not in ("uniform", "owl"):
        raise UserError(f"--layer-sparsity {spec.layer_sparsity!r}: choose auto, uniform or owl")
    if spec.layer_sparsity == "owl":
        if spec.pattern or spec.structured:
            raise UserError("--layer-sparsity owl varies the unstructured sparsity of each "
                            f"block; --{'pattern' if spec.pattern else 'method'} "
                            f"{spec.pattern or spec.method} fixes it: use one of the two")
        if spec.owl_threshold <= 0:
            raise UserError(f"--owl-threshold {spec.owl_threshold}: must be positive")
        if not owl_module().fits(spec.sparsity, spec.owl_limit):
            raise UserError(f"--owl-limit {spec.owl_limit}: must be >= 0 and under half the "
                            f"distance from --sparsity {spec.sparsity} to 0 and to 1, so every "
                            "block's sparsity stays inside (0, 1)")
    for method in methods:
        for problem in method.problems():
            raise UserError(problem)


# ---- one block ---------------------------------------------------------------------------

def prune_block(block, batches, kwargs_for, spec: MaskSpec,
                pattern: Pattern | None = None, amp=None) -> dict[str, tuple]:
    """Prune a block's linear layers in place, to ``pattern`` (default: the spec's);
    returns {name: (keep, new weight or None)}. ``amp``: an autocast context for the
    statistics pass only (the methods' own maths stays in the weights' dtype)."""
    scorer, *refiners = spec.methods()
    pattern = pattern or spec.parsed_pattern()
    linears = arch.linear_layers(block)
    hessian = any(m.needs_hessian for m in (scorer, *refiners))
    stats = collect_stats(block, linears, batches, kwargs_for, hessian, amp)
    result = {}
    for name, linear in linears.items():
        dense = linear.weight.data
        layer_stats = stats[name].as_kwargs()
        pruned = scorer(dense, pattern, **layer_stats)
        weight = pruned.weight
        for refiner in refiners:  # on the current values (DSnoT: pruned weights regrow)
            current = dense if weight is None or refiner.from_dense else \
                torch.where(pruned.keep, weight, dense)
            reselected = refiner(current, pattern, keep=pruned.keep, **layer_stats)
            # a refiner's own new weights (obs) win; else the scorer's, where it made any
            weight = reselected.weight if reselected.weight is not None else (
                None if pruned.weight is None else current)
            pruned = reselected
        final = (dense if weight is None else weight.to(dense.dtype)) * pruned.keep
        linear.weight.data.copy_(final)
        result[name] = (pruned.keep.cpu(), None if weight is None else final.cpu())
    return result


# ---- the whole model ----------------------------------------------------------------------

class PrunedPath:
    """The pruned blocks' outputs, block after block (``--mask-inputs sequential``): in
    memory (on the device when two boundaries fit in a quarter of its free memory, else the
    host) or, when they do not fit, in a two-slot Zarr scratch inside the artifact's folder.
    Same 16-bit values either way."""

    def __init__(self, out: Path, n: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape, self.dtype, self.out = (n, seqlen, hidden), dtype, out
        size = 2 * n * seqlen * hidden * 2
        self.home = next((d for d in (device, torch.device("cpu"))
                          if size <= 0.25 * free_memory(d)), None)
        self.scratch = None if self.home else acts.create(out / "scratch.zarr", 2,
                                                          self.shape, dtype, {})
        self.inputs: acts.Source | None = None
        self.slot = 0

    def next(self) -> PrunedPath:
        """Start the next boundary; it becomes ``inputs`` at once (written before read)."""
        self.slot = 1 - self.slot
        self.inputs = (torch.empty(self.shape, dtype=self.dtype, device=self.home)
                       if self.home else (self.scratch, self.slot))
        return self

    def write(self, start: int, values: torch.Tensor) -> None:
        if self.home:
            self.inputs[start:start + len(values)] = values.to(self.home, self.dtype)
        else:
            acts.write(self.scratch, self.slot, start, values)

    def close(self) -> None:
        self.inputs = None
        if self.scratch is not None:
            shutil.rmtree(self.out / "scratch.zarr")


def build(spec: MaskSpec, out: Path, model: ModelSource, activations: Artifact,
          device: str) -> None:
    """The masks of every block (a structured method: of the whole model at once)."""
    from stages.model.devices import DTYPES, resolve_device, storage_dtype

    if spec.structured:
        from stages.masks import structured

        return structured.build(spec, out, model, activations, device)
    device = resolve_device(device)
    started = time.monotonic()
    dtype = DTYPES[spec.dtype]
    loader = BlockLoader(model.path, dtype)
    dense = acts.open_group(Path(activations.path) / ZARR_NAME)
    n, seqlen, hidden = dense.attrs["shape"]
    kwargs_cache: dict[int, dict] = {}

    def kwargs_for(batch: int) -> dict:
        if batch not in kwargs_cache:
            kwargs_cache[batch] = loader.block_kwargs(batch, seqlen, device, dtype)
        return kwargs_cache[batch]

    ranges = [(s, min(s + spec.batch_size, n)) for s in range(0, n, spec.batch_size)]
    # Masks are kept as bits (a 7B model's are 6.5 GB as booleans, 0.8 GB packed), the
    # sparsity report is made block by block, and SparseGPT's new weights are written block
    # by block: nothing here grows with the depth.
    packed, shapes, rows = {}, {}, []
    pattern = spec.parsed_pattern()
    progress = Progress(f"masks {spec.method} (blocks)", loader.n_blocks)
    pruned_path = PrunedPath(out, n, seqlen, hidden, storage_dtype(dtype), device) \
        if spec.mask_inputs == "sequential" else None
    layers = layer_sparsities(spec, loader, activations)
    patterns = [replace(pattern, sparsity=s) for s in layers["block_sparsity"]]

    for index, block in enumerate(loader.blocks(device)):
        # block 0, and every block with --mask-inputs dense, reads the dense capture
        source = pruned_path.inputs if pruned_path and index > 0 else (dense, index)

        def batches(source=source):
            for start, stop in ranges:
                yield acts.rows(source, start, stop).to(device, dtype)

        block_keep, weights = {}, {}
        pruned = prune_block(block, batches, kwargs_for, spec, patterns[index])
        for name, (keep, weight) in pruned.items():
            full = f"{index}.{name}"
            packed[full], shapes[full], block_keep[full] = pack(keep), list(keep.shape), keep
            if weight is not None:
                weights[full] = weight
        rows += layer_rows(block_keep, patterns[index])
        if weights:
            save_file(weights, str(out / weights_file(index)))
        if pruned_path and index + 1 < loader.n_blocks:
            with torch.inference_mode():
                outputs = pruned_path.next()
                for (start, stop), x in zip(ranges, batches(), strict=True):
                    outputs.write(start, arch.run_block(block, x, kwargs_for(stop - start)))
        progress.update(index + 1)
    if pruned_path:
        pruned_path.close()
    save_packed(out / MASKS_FILE, packed, shapes)
    report = summarize(rows, pattern)
    report.update(spec=asdict(spec), seconds=round(time.monotonic() - started, 1),
                  calibration_samples=n, layer_sparsity=layers)
    write_json(out, REPORT_FILE, report)


def layer_sparsities(spec: MaskSpec, loader: BlockLoader, activations: Artifact) -> dict:
    """Each block's sparsity: the target everywhere, or OWL's (from the dense model's input
    statistics, which the capture recorded)."""
    target = spec.parsed_pattern().sparsity
    if spec.layer_sparsity == "uniform":
        return {"rule": "uniform", "block_sparsity": [target] * loader.n_blocks}
    owl = owl_module()
    ratios = []
    for index in range(loader.n_blocks):
        linears = arch.linear_layers(loader.block(index))
        ratios.append(owl.block_outlier_ratio(linears, input_stats(activations, index, linears),
                                              spec.owl_threshold))
    sparsities = owl.owl_sparsities(ratios, target, spec.owl_limit)
    return {"rule": "owl", "threshold": spec.owl_threshold, "limit": spec.owl_limit,
            "outlier_ratios": [round(r, 6) for r in ratios],
            "block_sparsity": [round(s, 6) for s in sparsities]}


def owl_module():
    """``stages.masks.owl``, imported by name: only OWL's masks depend on its code."""
    import importlib

    return importlib.import_module("stages.masks.owl")


STAGE = Stage("masks", build)
