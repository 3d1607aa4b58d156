"""Dense activation capture: every block boundary's hidden states, streamed into Zarr.

Blocks run one at a time: boundary l is read back from the store in batches, pushed
through block l on the device, and written as boundary l+1. Peak memory is one block plus
one batch of activations, whatever the model's depth. Every sparsity configuration of the
same model and calibration set reuses this store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import stages.model.architecture as arch
import store.activations as acts
from stages.model.model_source import ModelSource, load_model
from stages.progress import Progress
from stages.stage import Spec, Stage
from store import Artifact

ZARR_NAME = "activations.zarr"


@dataclass(frozen=True)
class CaptureSpec(Spec):
    model_digest: str
    calibration_key: str
    dtype: str  # compute precision
    batch_size: int
    not_in_key = ("batch_size",)  # it changes nothing stored


@torch.inference_mode()
def capture_dense(model, tokens: torch.Tensor, out: Path, device: torch.device,
                  dtype: torch.dtype, storage: torch.dtype, batch_size: int,
                  attrs: dict) -> None:
    blocks = arch.decoder_blocks(model)
    n = len(tokens)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    group = acts.create(out, len(blocks) + 1, (n, tokens.shape[1], model.config.hidden_size),
                        storage, attrs)
    progress = Progress("dense capture (blocks)", len(blocks))
    kwargs_for: dict[int, dict] = {}  # block kwargs depend only on the batch shape
    for start, stop in batches:
        hidden, kwargs = arch.block_inputs(model, tokens[start:stop])
        acts.write(group, 0, start, hidden)
        kwargs_for.setdefault(stop - start, arch.to_device(kwargs, device, dtype))
    for index, block in enumerate(blocks):
        block.to(device)
        for start, stop in batches:
            x = acts.read(group, index, start, stop).to(device, dtype)
            acts.write(group, index + 1, start, arch.run_block(block, x, kwargs_for[stop - start]))
        block.to("cpu")
        progress.update(index + 1)


def build(spec: CaptureSpec, out: Path, model: ModelSource, calibration: Artifact,
          device: str) -> None:
    """Capture the dense activations of every block boundary for a calibration set."""
    from stages.inputs import calibration as calib
    from stages.model.devices import DTYPES, resolve_device, storage_dtype

    dtype = DTYPES[spec.dtype]
    loaded = load_model(model, dtype)
    storage = storage_dtype(dtype)
    attrs = {**asdict(spec), "model_type": loaded.config.model_type,
             "storage_dtype": str(storage).removeprefix("torch.")}
    capture_dense(loaded, calib.load(calibration), out / ZARR_NAME, resolve_device(device),
                  dtype, storage, spec.batch_size, attrs)


STAGE = Stage("activations", build)
