"""The EBFT stage: fine-tune block l of the pruned model, one cached artifact per block.

Inputs of block l: the outputs of the already fine-tuned sparse blocks 0..l-1 on the
calibration set (block 0: the embeddings, from the dense capture). Target (paper Eq. 4):
the dense model's output of block l, read from the shared dense capture; or, with
``target="dense-block"`` (what the authors' released code does), the dense block l applied to
the sparse-path input, computed once per block into a scratch store.

Each block's key chains the key of the block before it, so it covers its input activations
(everything upstream), the mask, the target, the hyperparameters and the code. Artifacts:
- ``ebft-block/<key>``: the block's linear weights (``block.safetensors``) and its record;
- ``ebft-boundary/<key>``: the block's outputs on the calibration set, i.e. the next block's
  inputs. The next block's task in the same process takes them from memory
  (``handover.py``); the store's copy is written in the background, only as a resume point
  (``write_boundaries=False`` turns it off). Boundaries are scratch: each is deleted once the
  next one exists, and a missing one is rebuilt by running the cached fine-tuned blocks
  forward, so a run stopped at block k resumes at block k without recomputing anything
  before it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import stages.model.architecture as arch
import stages.recovery.block_training as training
import store.activations as acts
from stages import checks
from stages.errors import UserError
from stages.inputs.capture import ZARR_NAME
from stages.masks.mask_files import MaskFiles
from stages.model.devices import free_memory
from stages.model.model_source import ModelSource
from stages.model.streaming import BlockLoader
from stages.progress import logger
from stages.recovery.block_training import TrainConfig
from stages.recovery.handover import HANDOVER
from stages.stage import Spec, Stage
from store import Artifact, Store, digest_json, write_json

BLOCK_FILE, RECORD_FILE = "block.safetensors", "record.json"


@dataclass(frozen=True)
class BlockSpec(Spec):
    index: int
    previous: str  # key of block index-1's spec ("" for block 0): the inputs' provenance
    model_digest: str
    activations_key: str
    masks_key: str
    train: TrainConfig
    nm_m: int = 0  # M of an N:M pattern (mask tuning keeps it), 0 for unstructured
    dtype: str = "float32"
    io_batch_size: int = 8
    not_in_key = ("io_batch_size",)  # it changes nothing stored


def chain(n_blocks: int, **common) -> list[BlockSpec]:
    """The specs of every block, each naming the one before (whose outputs are its inputs):
    computable before any training. With dense block inputs no block names another."""
    sequential = common["train"].block_inputs == "sequential"
    specs: list[BlockSpec] = []
    for index in range(n_blocks):
        specs.append(BlockSpec(index, specs[-1].key() if specs and sequential else "",
                               **common))
    return specs


def blocks_key(specs: list[BlockSpec]) -> str:
    """What identifies the fine-tuned blocks together: the last key of a sequential chain
    (it covers every block before it), else a digest of every block's key."""
    if specs[-1].train.block_inputs == "sequential":
        return specs[-1].key()
    return digest_json([spec.key() for spec in specs])[:32]


class Context:
    """Everything a block needs besides its spec: its weights, one block at a time from the
    model's files (never the whole model), the stores, the device, and the autocast that
    every forward pass of the stage runs in (the training's: bf16 over fp32 weights where
    the hardware has fast bf16, ``--autocast none``: none)."""

    def __init__(self, store: Store, loader: BlockLoader, activations: Artifact,
                 masks: Artifact, device: torch.device, dtype: torch.dtype,
                 train: TrainConfig):
        self.store, self.loader, self.device, self.dtype = store, loader, device, dtype
        # the boundaries and the re-masking statistics in the training's precision (issue
        # 22: in fp32 these passes cost a CPU with bf16 more than the training's autocast)
        self.amp = lambda: training.autocast_for(train, device, dtype)
        self.activations_key = activations.key
        self.dense = acts.open_group(Path(activations.path) / ZARR_NAME)
        self.n, self.seqlen, self.hidden = self.dense.attrs["shape"]
        self.masks = MaskFiles(masks)
        self._kwargs: dict[tuple, dict] = {}

    def kwargs_for(self, batch: int, dtype: torch.dtype | None = None) -> dict:
        dtype = dtype or self.dtype
        if (batch, dtype) not in self._kwargs:
            self._kwargs[batch, dtype] = self.loader.block_kwargs(batch, self.seqlen,
                                                                 self.device, dtype)
        return self._kwargs[batch, dtype]

    def keep(self, index: int) -> dict[str, torch.Tensor]:
        names = arch.linear_layers(self.loader.template)  # every block has the same layers
        return {name: self.masks.keep(f"{index}.{name}") for name in names}

    def dense_block(self, index: int):
        """Block ``index`` as the dense model has it."""
        return self.loader.block(index).to(self.device)

    def sparse_block(self, index: int):
        """Block ``index`` as the mask stage left it: new weights and biases, zeros applied."""
        block = self.loader.block(index)
        self.masks.apply(block, index)
        return block.to(self.device)

    def restore_dense_weights(self, block, index: int, keep: dict[str, torch.Tensor]) -> None:
        """Put the dense model's kept weights back into ``block``, the pruned ones zero (a
        method's update of the kept weights undone; anything else it left, such as FLAP's
        biases, stays). Training multiplies only gradients by the mask, so the weights must
        start masked."""
        dense = dict(self.loader.block(index).named_modules())
        for name, module in arch.linear_layers(block).items():
            weight = module.weight.data
            weight.copy_(dense[name].weight.data.to(weight.device)
                         * keep[name].to(weight.device, weight.dtype))

    def remasked_block(self, index: int, source: acts.Source, batch: int):
        """Block ``index`` pruned now, by the mask stage's method to its pattern (OWL's
        sparsity for this block included), on ``source``: the fine-tuned path's inputs.
        Returns the block and its keep-masks."""
        # by name: the mask stage's code is in this block's key through its masks key
        pruning = importlib.import_module("stages.masks.pruning")
        report = self.masks.report()
        spec = pruning.MaskSpec(**report["spec"])
        pattern = spec.parsed_pattern()
        sparsities = report.get("layer_sparsity", {}).get("block_sparsity")
        if sparsities:
            pattern = replace(pattern, sparsity=sparsities[index])
        block = self.dense_block(index)

        def batches():
            for start, stop in self.ranges(batch):
                yield acts.rows(source, start, stop).to(self.device, self.dtype)
        pruned = pruning.prune_block(block, batches, self.kwargs_for, spec, pattern,
                                     self.amp())
        return block, {name: keep for name, (keep, _weight) in pruned.items()}

    def ranges(self, batch: int) -> list[tuple[int, int]]:
        return [(s, min(s + batch, self.n)) for s in range(0, self.n, batch)]

    @torch.no_grad()
    def forward(self, block, source: acts.Source, batch: int, stop_at=None,
                resident: int = 2) -> torch.Tensor:
        """The block's outputs on every calibration sample, in the 16-bit storage dtype (the
        values a boundary in the store holds), on the device when ``resident`` such tensors
        fit, else the host. With ``stop_at``: that submodule's input instead (the residual
        stream after attention)."""
        from stages.model.devices import storage_dtype

        home = self.device if fits(self, resident) else torch.device("cpu")
        out = torch.empty(self.n, self.seqlen, self.hidden, dtype=storage_dtype(self.dtype),
                          device=home)
        for start, stop in self.ranges(batch):
            x = acts.rows(source, start, stop).to(self.device, self.dtype)
            def run(x=x):
                return arch.run_block(block, x, self.kwargs_for(len(x)))
            with self.amp():
                y = run() if stop_at is None else training.stopped_at(stop_at, run)
            out[start:stop] = y.to(home)
        return out

    def save_boundary(self, key: str, outputs: torch.Tensor) -> None:
        """Publish ``outputs`` as the boundary artifact of the block whose spec key this is."""
        with self.store.writing("ebft-boundary", key) as tmp:
            group = acts.create(tmp / ZARR_NAME, 1, tuple(outputs.shape), outputs.dtype, {})
            acts.write(group, 0, 0, outputs.cpu())




def load_block_weights(block, artifact: Artifact) -> None:
    """Every tensor the block artifact holds (linear weights; norms too with --train-norms)."""
    state = load_file(str(Path(artifact.path) / BLOCK_FILE))
    with torch.no_grad():
        for name, tensor in state.items():
            block.get_parameter(name).copy_(tensor)


# A stored boundary can vanish while this process reads it: another run on the same store
# that trained the next block deletes it (renamed away first, then removed). The read is then
# tried again, from the store's newer state, a few times.
READ_ATTEMPTS = 3


class BoundaryVanished(Exception):
    """A stored boundary was deleted while it was read."""


def input_source(ctx: Context, specs: list[BlockSpec], index: int) -> acts.Source:
    """Block ``index``'s inputs: handed over in memory by the previous block's task, or the
    stored boundary, or rebuilt from the newest stored one if it was deleted."""
    if index == 0:
        return ctx.dense, 0
    kept = HANDOVER.take(blocks_key(specs), specs[index - 1].key())
    if kept is not None:
        return kept
    HANDOVER.flush()  # this process's pending boundary writes and deletes land first
    for _attempt in range(READ_ATTEMPTS):
        try:
            return stored_inputs(ctx, specs, index)
        except BoundaryVanished as err:
            vanished = err
            logger().info(f"block {index}: {err} (another run on this store deletes the "
                          "boundaries it has used); reading again")
    raise UserError(f"block {index}: its stored inputs vanished {READ_ATTEMPTS} times while "
                    "they were read (other runs on this store deleting boundaries); "
                    "rerun") from vanished


def read_boundary(ctx: Context, folder: Path) -> acts.Source:
    """A stored boundary, read whole into host memory when it fits in a quarter of what is
    free, so that no later read can find it deleted; checked to be still there after the
    read, as a deleted boundary's chunks read as zeros. One too large is read lazily, batch
    by batch, and a concurrent delete then fails the block (rerun it)."""
    try:
        source = acts.open_group(folder / ZARR_NAME), 0
        if not fits(ctx, 1, free=checks.available_memory()):  # (of the host)
            return source
        rows = acts.rows(source, 0, ctx.n)
    except (KeyError, FileNotFoundError) as err:
        if folder.exists():
            raise
        raise BoundaryVanished(f"boundary {folder.name} deleted while it was read") from err
    if not folder.exists():
        raise BoundaryVanished(f"boundary {folder.name} deleted while it was read")
    return rows


def stored_inputs(ctx: Context, specs: list[BlockSpec], index: int) -> acts.Source:
    """Block ``index``'s inputs from the store: block ``index - 1``'s boundary, else rebuilt
    from the newest boundary still stored (or the embeddings) through the stored blocks."""
    if index == 0:
        return ctx.dense, 0
    found = ctx.store.get("ebft-boundary", specs[index - 1].key())
    if found:
        return read_boundary(ctx, Path(found.path))
    start = index - 1  # walk back to the newest boundary still stored (or the embeddings)
    while start > 0 and not ctx.store.get("ebft-boundary", specs[start - 1].key()):
        start -= 1
    source = stored_inputs(ctx, specs, start)
    for j in range(start, index):
        block_artifact = ctx.store.get("ebft-block", specs[j].key())
        if block_artifact is None:
            raise UserError(f"block {j} has no stored result; rerun the flow from block {j}")
        block = ctx.sparse_block(j)  # its biases (FLAP) are not in the block artifact
        load_block_weights(block, block_artifact)
        source = ctx.forward(block, source, specs[j].io_batch_size)
        block.to("cpu")
    return source


def dense_target(ctx: Context, chain: str, index: int) -> acts.Source:
    """Block ``index``'s target under Eq. 4: the dense model's output of that block (read in
    the background while the block before trained, when it fits)."""
    prefetched = HANDOVER.prefetched(f"{chain}/{ctx.activations_key}/{index + 1}")
    return prefetched if prefetched is not None else (ctx.dense, index + 1)


def prefetch_dense_target(ctx: Context, chain: str, index: int) -> None:
    if index < ctx.loader.n_blocks and fits(ctx, 4):
        HANDOVER.prefetch(f"{chain}/{ctx.activations_key}/{index + 1}",
                          lambda: acts.read(ctx.dense, index + 1, 0, ctx.n))


def fits(ctx: Context, count: int, share: float = 0.25, free: int | None = None) -> bool:
    """Whether ``count`` calibration boundaries (16-bit) fit in ``share`` of ``free`` bytes
    (default: the free memory of the training device)."""
    free = free_memory(ctx.device) if free is None else free
    return count * ctx.n * ctx.seqlen * ctx.hidden * 2 <= share * free


def preload(ctx: Context, source: acts.Source, target: acts.Source, share: float = 0.25):
    """A function giving the (input, target) rows of a training batch.

    Every epoch reads every row again, so when both boundaries fit in a quarter of the
    free memory of the training device they are held there in their 16-bit storage form,
    and batches are sliced from memory (on a GPU the per-batch Zarr reads took ~90% of a
    block's training time). Otherwise rows are streamed from the store (or sliced from the
    host when already in memory). The values are the same either way.
    """
    if not fits(ctx, 2, share):
        def sliced(source: acts.Source, rows: list[int]) -> torch.Tensor:
            if isinstance(source, torch.Tensor):
                return source[torch.tensor(rows, device=source.device)]
            return acts.read_rows(*source, rows)
        return lambda rows: (sliced(source, rows), sliced(target, rows))
    xs = acts.rows(source, 0, ctx.n).to(ctx.device)
    ys = acts.rows(target, 0, ctx.n).to(ctx.device)

    def rows_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(rows, device=ctx.device)
        return xs[index], ys[index]
    return rows_of


def build(spec: BlockSpec, out: Path, store_location: str, model: ModelSource,
          activations: Artifact, masks: Artifact, device: str, chain: list[BlockSpec],
          keep_boundaries: bool = False, write_boundaries: bool = True) -> None:
    """Fine-tune block ``spec.index``: its weights and record go to ``out``; its outputs on
    the calibration set (the next block's inputs) are handed over in memory and, in the
    background, written as an ``ebft-boundary`` artifact."""
    from stages.model.devices import DTYPES, resolve_device

    dtype = DTYPES[spec.dtype]
    ctx = Context(Store(store_location), loader_for(model.path, model.digest, dtype), activations,
                  masks, resolve_device(device), dtype, spec.train)
    train_block(ctx, chain, spec.index, out, keep_boundaries, write_boundaries)


STAGE = Stage("ebft-block", build)


@functools.lru_cache(maxsize=2)
def loader_for(path: str, digest: str, dtype: torch.dtype) -> BlockLoader:
    """One loader per model (by its files' digest) for all of a process's block tasks: the
    files' headers are read and the skeleton built once, not per block."""
    return BlockLoader(path, dtype)


def train_block(ctx: Context, specs: list[BlockSpec], index: int, out: Path,
                keep_boundaries: bool, write_boundaries: bool = True) -> None:
    spec, cfg, log = specs[index], specs[index].train, logger().info
    key, last, chain = spec.key(), index == len(specs) - 1, blocks_key(specs)
    independent = cfg.block_inputs == "dense"  # the dense model's inputs, from the capture
    source = (ctx.dense, index) if independent else input_source(ctx, specs, index)
    if cfg.target == "dense-block":  # dense block l on the sparse-path inputs, once
        target = ctx.forward(ctx.dense_block(index), source, spec.io_batch_size)
    else:
        target = dense_target(ctx, chain, index)
        if not independent:  # (independent blocks may run at once, in any order)
            prefetch_dense_target(ctx, chain, index + 1)  # read while this block trains
    if cfg.remask:
        block, keep = ctx.remasked_block(index, source, spec.io_batch_size)
    else:
        block, keep = ctx.sparse_block(index), ctx.keep(index)
    if cfg.start == "dense":  # the mask alone, on the dense weights
        ctx.restore_dense_weights(block, index, keep)
    n_holdout = cfg.holdout_count(ctx.n)
    train_rows, holdout_rows = list(range(ctx.n - n_holdout)), list(range(ctx.n - n_holdout, ctx.n))

    # The block trains in fp32 (master weights) even when the model runs in 16 bits:
    # AdamW's small late updates would round away in bf16 weights. Speed comes from
    # bf16 autocast where the hardware has it (TrainConfig.autocast).
    block.float()
    def in_fp32(rows_of):
        def batches(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = rows_of(rows)
            return x.to(ctx.device, torch.float32), y.to(ctx.device, torch.float32)
        return batches

    batches = in_fp32(preload(ctx, source, target))

    def train(keep, batches, stop_at=None) -> dict:
        return training.train_block(block, keep, batches, train_rows, holdout_rows,
                                    lambda b: ctx.kwargs_for(b, torch.float32), cfg,
                                    ctx.device, torch.float32, index, spec.nm_m, log,
                                    state_dtype=ctx.dtype, stop_at=stop_at)

    if cfg.window == "sublayers":  # attention against the dense attention output, then MLP
        point = arch.attention_end(block)
        first = attention_layers(ctx, block, point)
        attention_batches = in_fp32(preload(ctx, source, attention_target(ctx, index, spec)))
        attention = train({n: k for n, k in keep.items() if n in first}, attention_batches,
                          point)
        record = train({n: k for n, k in keep.items() if n not in first}, batches)
        record["_keep"] |= attention.pop("_keep")
        record["seconds"] = round(record["seconds"] + attention["seconds"], 2)
        record["attention"] = attention
    else:
        record = train(keep, batches)
    block.to(ctx.dtype)
    keep = record.pop("_keep")
    trained = [f"{name}.weight" for name in arch.linear_layers(block)]
    if cfg.train_norms:
        trained = [name for name, _ in block.named_parameters()]
    state = {name: block.get_parameter(name).detach().to("cpu").contiguous()
             for name in trained}
    save_file(state, str(out / BLOCK_FILE))
    record["sparsity"] = {name: round(1 - float(k.float().mean()), 6)
                          for name, k in keep.items()}
    write_json(out, RECORD_FILE, {**record, "spec": asdict(spec), "key": key})

    previous = specs[index - 1].key() \
        if index > 0 and not (keep_boundaries or independent) else None
    if independent or (last and not keep_boundaries):  # nothing reads these outputs
        if previous:  # (after this process's pending write of it)
            HANDOVER.write_later(lambda: ctx.store.delete("ebft-boundary", previous),
                                 f"deleting block {index - 1}'s boundary")
        return
    outputs = ctx.forward(block, source, spec.io_batch_size)
    block.to("cpu")
    HANDOVER.keep(chain, key, outputs)

    def save() -> None:  # then the previous boundary is no longer the newest resume point
        ctx.save_boundary(key, outputs)
        if previous:
            ctx.store.delete("ebft-boundary", previous)
    if write_boundaries:
        HANDOVER.write_later(save, f"block {index}'s boundary")
    elif previous:
        ctx.store.delete("ebft-boundary", previous)


def attention_layers(ctx: Context, block, point) -> set[str]:
    """The linear layers a block runs before ``point`` (its attention's), found by running
    it once on zeros: no module names assumed."""
    called: list[str] = []
    handles = [linear.register_forward_pre_hook(lambda _m, _a, name=name: called.append(name))
               for name, linear in arch.linear_layers(block).items()]
    x = torch.zeros(1, ctx.seqlen, ctx.hidden, device=ctx.device, dtype=torch.float32)
    try:
        with torch.no_grad():
            training.stopped_at(point, lambda: arch.run_block(
                block, x, ctx.kwargs_for(1, torch.float32)))
    finally:
        for handle in handles:
            handle.remove()
    return set(called)


def attention_target(ctx: Context, index: int, spec: BlockSpec) -> torch.Tensor:
    """The dense model's residual stream after block ``index``'s attention, on the dense
    inputs: the first window's target (the dense block output is the second's)."""
    dense = ctx.dense_block(index)
    out = ctx.forward(dense, (ctx.dense, index), spec.io_batch_size,
                      stop_at=arch.attention_end(dense), resident=3)
    dense.to("cpu")
    return out


def read_record(artifact: Artifact) -> dict:
    import json

    return json.loads((Path(artifact.path) / RECORD_FILE).read_text())
