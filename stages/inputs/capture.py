"""Dense activation capture: every block boundary's hidden states, streamed into Zarr.

Blocks run one at a time: boundary l is read back from the store in batches, pushed
through block l on the device, and written as boundary l+1. Peak memory is one block plus
one batch of activations, whatever the model's depth. Every sparsity configuration of the
same model and calibration set reuses this store.

The same pass also sums every linear layer's inputs (Σx, Σx² per feature, the dense model's
own statistics) into ``input_stats.safetensors``: what OWL's layer sparsities need, so they
cost no pass of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import stages.model.architecture as arch
import store.activations as acts
from stages.model.layer_stats import LayerStats, StatsRecorder
from stages.model.model_source import ModelSource
from stages.model.streaming import BlockLoader
from stages.progress import Progress
from stages.stage import Spec, Stage
from store import Artifact

ZARR_NAME = "activations.zarr"
STATS_NAME = "input_stats.safetensors"


@dataclass(frozen=True)
class CaptureSpec(Spec):
    model_digest: str
    calibration_key: str
    dtype: str  # compute precision
    batch_size: int
    not_in_key = ("batch_size",)  # it changes nothing stored


@torch.inference_mode()
def capture_dense(loader: BlockLoader, tokens: torch.Tensor, out: Path, device: torch.device,
                  storage: torch.dtype, batch_size: int, attrs: dict) -> None:
    """Boundary 0 from the model's embeddings, then block by block, each read from the
    model's files when its turn comes (one block's weights in memory at a time)."""
    n = len(tokens)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    group = acts.create(out, loader.n_blocks + 1,
                        (n, tokens.shape[1], loader.config.hidden_size), storage, attrs)
    progress = Progress("dense capture (blocks)", loader.n_blocks)
    kwargs_for: dict[int, dict] = {}  # block kwargs depend only on the batch shape
    for start, stop in batches:
        hidden, kwargs = loader.first_inputs(tokens[start:stop])
        acts.write(group, 0, start, hidden)
        kwargs_for.setdefault(stop - start, arch.to_device(kwargs, device, loader.dtype))
    stats: dict[str, torch.Tensor] = {}
    for index, block in enumerate(loader.blocks(device)):
        with StatsRecorder(arch.linear_layers(block), hessian=False) as recorder:
            for start, stop in batches:
                x = acts.read(group, index, start, stop).to(device, loader.dtype)
                recorder.next_batch()
                outputs = arch.run_block(block, x, kwargs_for[stop - start])
                acts.write(group, index + 1, start, outputs)
        for name, layer in recorder.stats.items():
            stats.update(layer.to_tensors(f"{index}.{name}"))
        progress.update(index + 1)
    save_file(stats, str(out.parent / STATS_NAME))


def input_stats(activations: Artifact, block: int,
                names: Iterable[str]) -> dict[str, LayerStats]:
    """The dense model's input statistics of block ``block``'s linear layers ``names``, as
    the capture recorded them: the dense block on the dense inputs, with no pass of its own."""
    with safe_open(str(Path(activations.path) / STATS_NAME), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()  # noqa: SIM118 (not a dict)
                   if key.startswith(f"{block}.")}
    return {name: LayerStats.from_tensors(tensors, f"{block}.{name}") for name in names}


def build(spec: CaptureSpec, out: Path, model: ModelSource, calibration: Artifact,
          device: str) -> None:
    """Capture the dense activations of every block boundary for a calibration set."""
    from stages.inputs import calibration as calib
    from stages.model.devices import DTYPES, resolve_device, storage_dtype

    loader = BlockLoader(model.path, DTYPES[spec.dtype])
    storage = storage_dtype(loader.dtype)
    attrs = {**asdict(spec), "model_type": loader.config.model_type,
             "storage_dtype": str(storage).removeprefix("torch.")}
    capture_dense(loader, calib.load(calibration), out / ZARR_NAME, resolve_device(device),
                  storage, spec.batch_size, attrs)


STAGE = Stage("activations", build)
