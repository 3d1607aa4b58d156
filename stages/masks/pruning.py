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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import stages.model.architecture as arch
import store.activations as acts
from stages.inputs.capture import ZARR_NAME
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
    WEIGHTS_FILE,
    layer_rows,
    pack,
    save_packed,
    summarize,
)
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
        return {**fields, "params": {m.name: asdict(m) for m in self.methods()}}

    def code_modules(self) -> list:
        """This stage's code and that of the methods it runs (found by name, not imported)."""
        return [*super().code_modules(), *(sys.modules[type(m).__module__]
                                           for m in self.methods())]

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
    for method in methods:
        for problem in method.problems():
            raise UserError(problem)


# ---- one block ---------------------------------------------------------------------------

def prune_block(block, batches, kwargs_for, spec: MaskSpec) -> dict[str, tuple]:
    """Prune a block's linear layers in place; returns {name: (keep, new weight or None)}."""
    scorer, *refiners = spec.methods()
    pattern = spec.parsed_pattern()
    linears = arch.linear_layers(block)
    hessian = any(m.needs_hessian for m in (scorer, *refiners))
    stats = collect_stats(block, linears, batches, kwargs_for, hessian)
    result = {}
    for name, linear in linears.items():
        dense = linear.weight.data
        layer_stats = stats[name].as_kwargs()
        pruned = scorer(dense, pattern, **layer_stats)
        weight = pruned.weight
        for refiner in refiners:  # reselect on the current values; pruned weights regrow
            current = dense if weight is None else torch.where(pruned.keep, weight, dense)
            reselected = refiner(current, pattern, keep=pruned.keep, **layer_stats)
            weight = None if pruned.weight is None else current
            pruned = reselected
        final = (dense if weight is None else weight.to(dense.dtype)) * pruned.keep
        linear.weight.data.copy_(final)
        result[name] = (pruned.keep.cpu(), None if weight is None else final.cpu())
    return result


# ---- the whole model ----------------------------------------------------------------------

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
    # Masks are kept as bits (a 7B model's are 6.5 GB as booleans, 0.8 GB packed), and the
    # sparsity report is made block by block. SparseGPT's new weights are kept until the end
    # (a model's worth in the compute dtype: not yet written block by block).
    packed, shapes, weights, rows = {}, {}, {}, []
    pattern = spec.parsed_pattern()
    progress = Progress(f"masks {spec.method} (blocks)", loader.n_blocks)
    scratch = None
    if spec.mask_inputs == "sequential":
        scratch = acts.create(out / "scratch.zarr", 2, (n, seqlen, hidden),
                              storage_dtype(dtype), {})

    def inputs_of(index: int):
        """Where block ``index`` reads its inputs: dense capture, or the pruned path."""
        if scratch is None or index == 0:
            return dense, index
        return scratch, index % 2

    for index, block in enumerate(loader.blocks(device)):
        group, boundary = inputs_of(index)

        def batches(group=group, boundary=boundary):
            for start, stop in ranges:
                yield acts.read(group, boundary, start, stop).to(device, dtype)

        block_keep = {}
        for name, (keep, weight) in prune_block(block, batches, kwargs_for, spec).items():
            full = f"{index}.{name}"
            packed[full], shapes[full], block_keep[full] = pack(keep), list(keep.shape), keep
            if weight is not None:
                weights[full] = weight
        rows += layer_rows(block_keep, pattern)
        if scratch is not None and index + 1 < loader.n_blocks:
            with torch.inference_mode():
                for (start, stop), x in zip(ranges, batches(), strict=True):
                    y = arch.run_block(block, x, kwargs_for(stop - start))
                    acts.write(scratch, (index + 1) % 2, start, y)
        progress.update(index + 1)
    if scratch is not None:
        shutil.rmtree(out / "scratch.zarr")
    save_packed(out / MASKS_FILE, packed, shapes)
    if weights:
        save_file(weights, str(out / WEIGHTS_FILE))
    report = summarize(rows, pattern)
    report.update(spec=asdict(spec), seconds=round(time.monotonic() - started, 1),
                  calibration_samples=n)
    write_json(out, REPORT_FILE, report)


STAGE = Stage("masks", build)
