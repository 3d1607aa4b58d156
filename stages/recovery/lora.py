"""The LoRA recovery baseline (paper §4.4): low-rank adapters on the whole pruned model.

LoRA adapters (``peft``) on every projection of every block are trained by next-token
loss over the whole model, merged into the weights, and the masks are applied again, so the
merged model has exactly the pruned model's zeros (a merged B·A update is dense). The paper
trains on Alpaca-GPT4 (2 epochs, lr 1e-4, batch 64, as LLM-Pruner); with no instruction data
in the data directory this stage trains on the calibration windows themselves (C4 text):
the same data EBFT sees, a plain-text stand-in that every report labels as such.

Artifact ``lora/<key>``: the merged block projections (``weights.safetensors``, named like
the mask artifact) and ``record.json`` (losses, time, trainable parameters, data).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import stages.model.architecture as arch
from stages.errors import UserError
from stages.model.model_source import ModelSource
from stages.progress import logger
from stages.stage import Spec, Stage
from store import Artifact, write_json

WEIGHTS_FILE, RECORD_FILE = "weights.safetensors", "record.json"
DATA_LABEL = "calibration windows (C4 plain text; stand-in for Alpaca-GPT4)"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4  # the paper's (and LLM-Pruner's) LoRA learning rate
    epochs: int = 2
    batch_size: int = 2
    seed: int = 0

    def validate(self) -> None:
        checks = [(self.rank > 0, f"--lora-rank {self.rank}: must be positive"),
                  (self.lr > 0, f"--lora-lr {self.lr}: must be positive"),
                  (self.alpha > 0, f"--lora-alpha {self.alpha}: must be positive"),
                  (self.epochs > 0, f"--lora-epochs {self.epochs}: must be positive"),
                  (self.batch_size > 0, f"--lora-batch-size {self.batch_size}: must be positive"),
                  (0 <= self.dropout < 1, f"--lora-dropout {self.dropout}: must be in [0, 1)")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class LoraSpec(Spec):
    model_digest: str
    masks_key: str
    calibration_key: str  # the training text
    settings: LoraSettings
    dtype: str


def train(model, ids: torch.Tensor, settings: LoraSettings, log=print) -> dict:
    """Train LoRA adapters on ``model`` (in place), merge them; returns the training record."""
    import peft

    targets = sorted({name.rsplit(".", 1)[-1]
                      for name in arch.linear_layers(arch.decoder_blocks(model)[0])})
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)
    wrapped = peft.get_peft_model(model, config)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    steps = math.ceil(len(ids) / settings.batch_size) * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(settings.seed)
    started, losses, step = time.monotonic(), [], 0
    for epoch in range(settings.epochs):
        total = 0.0
        order = torch.randperm(len(ids), generator=gen)
        for start in range(0, len(ids), settings.batch_size):
            batch = ids[order[start:start + settings.batch_size]]
            batch = batch.to(next(wrapped.parameters()).device)
            loss = wrapped(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise UserError(f"LoRA: loss is {loss.item()} at step {step + 1}; lower --lora-lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            total += loss.item() * len(batch)
        losses.append(total / len(ids))
        log(f"lora epoch {epoch + 1}: train loss {losses[-1]:.4f}")
    wrapped.eval()
    merged = wrapped.merge_and_unload()
    return {"model": merged, "train_losses": losses, "steps": step,
            "seconds": round(time.monotonic() - started, 2),
            "trainable_parameters": sum(p.numel() for p in params),
            "targets": targets, "data": DATA_LABEL}


def build(spec: LoraSpec, out: Path, model: ModelSource, masks: Artifact,
          calibration: Artifact, device: str) -> None:
    """Train LoRA adapters on the pruned model, merge them, store the projections."""
    from stages.inputs import calibration as calib
    from stages.masks.mask_files import MaskFiles, apply_block, load_masked_model
    from stages.model.devices import DTYPES, resolve_device

    pruned = load_masked_model(model, DTYPES[spec.dtype], masks).to(resolve_device(device))
    record = train(pruned, calib.load(calibration), spec.settings, logger().info)
    if calib.meta(calibration).get("source") == "generated":
        record["data"] = DATA_LABEL.replace("C4 plain text", "the dense model's own text")
    merged = record.pop("model")
    files = MaskFiles(masks)
    for index, block in enumerate(arch.decoder_blocks(merged)):  # the merged B·A is dense:
        keep = files.block(index, arch.linear_layers(block))[0]  # put the zeros back
        apply_block(block, index, keep, {}, {})
    weights = {f"{index}.{name}": linear.weight.detach().cpu().contiguous()
               for index, block in enumerate(arch.decoder_blocks(merged))
               for name, linear in arch.linear_layers(block).items()}
    save_file(weights, str(out / WEIGHTS_FILE))
    write_json(out, RECORD_FILE, {**record, "spec": asdict(spec), "key": spec.key()})


STAGE = Stage("lora", build)


@torch.no_grad()
def load_into(model, artifact: Artifact) -> None:
    """Put the stored merged projections into a (masked) model."""
    for index, block in enumerate(arch.decoder_blocks(model)):
        load_block(block, index, artifact)


@torch.no_grad()
def load_block(block, index: int, artifact: Artifact) -> None:
    """Put one block's stored merged projections into it (read alone from the file)."""
    from safetensors import safe_open

    with safe_open(f"{artifact.path}/{WEIGHTS_FILE}", "pt") as f:
        for name, linear in arch.linear_layers(block).items():
            linear.weight.copy_(f.get_tensor(f"{index}.{name}"))


def read_record(artifact: Artifact) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(artifact.path) / RECORD_FILE).read_text())
