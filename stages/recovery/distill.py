"""Distillation of the whole recovered model on the dense model's logits, after the block pass.

Why (issue 22): past a point the block-wise objective stops tracking the model's loss.
SparseGPT's and ``wanda+obs``'s blocks end EBFT with 15-37% lower held-out block losses than
Wanda's, and their models still have the higher perplexity. This step trains every kept
weight of the blocks together (the zeros stay zero: their gradients are masked, so Adam
never moves them) on the calibration windows against the dense model's next-token
distributions, KL(dense ‖ sparse), so the blocks' remaining errors are traded against each
other where the output sees them. One epoch over the 16 default windows at lr 1e-4 took
SmolLM2-135M from 35.02 to 32.81 validation perplexity (docs/results.md).

It holds the whole model, the dense one and AdamW's two moments (about 18 bytes per
parameter in fp32, before activations), unlike the block pass: on a 7B model it needs a
large accelerator, and it is off unless ``--distill-epochs`` is given.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import stages.model.architecture as arch
from stages.errors import UserError
from stages.stage import Spec, Stage
from store import Artifact, write_json

RECORD_FILE = "distill.json"


@dataclass(frozen=True)
class DistillSettings:
    epochs: int = 0  # passes over the calibration windows; 0: no distillation
    # 1e-4: one epoch at batch 1 (16 steps) lowered SmolLM2-135M's validation perplexity
    # by 2.2 after EBFT (issue 22)
    lr: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        checks = [(self.epochs >= 0, f"--distill-epochs {self.epochs}: must be >= 0 (0: off)"),
                  (self.lr > 0, f"--distill-lr {self.lr}: must be positive"),
                  (self.seed >= 0, f"distill.seed {self.seed}: must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class DistillSpec(Spec):
    model_digest: str  # the dense model: the teacher
    student_key: str  # the assembled model folder (EBFT's or LoRA's blocks in it)
    calibration_key: str  # the training windows
    settings: DistillSettings
    dtype: str  # the dtype the result is saved in (the assembled folder's)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, the mean over tokens."""
    student = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def trainable(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The blocks' linear weights, each with its 0/1 gate (1 where it is not pruned);
    everything else (embeddings, norms, head) frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [linear.weight for block in arch.decoder_blocks(model)
               for linear in arch.linear_layers(block).values()]
    gates = [(w != 0).to(w.dtype) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    return weights, gates


def distill(student, teacher, tokens: torch.Tensor, settings: DistillSettings,
            device: torch.device, log=print) -> dict:
    """Train ``student`` in place on KL(teacher ‖ student), one window per step, AdamW
    (0.9, 0.95), linear decay, gradient norm clipped at 1; returns the record."""
    from stages.recovery.block_training import bf16_is_fast, lr_factor

    weights, gates = trainable(student)
    optimizer = torch.optim.AdamW(weights, lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    total = settings.epochs * len(tokens)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, "linear", 0))
    amp = torch.autocast(device.type, torch.bfloat16, enabled=bf16_is_fast(device.type))
    gen = torch.Generator().manual_seed(settings.seed)
    started, epoch_losses, step = time.monotonic(), [], 0
    student.train()
    for epoch in range(settings.epochs):
        total_loss = 0.0
        for row in torch.randperm(len(tokens), generator=gen).tolist():
            ids = tokens[row:row + 1].to(device)
            with torch.no_grad(), amp:
                target = teacher(input_ids=ids).logits
            with amp:
                loss = kd_loss(student(input_ids=ids).logits, target)
            if not torch.isfinite(loss):
                raise UserError(f"distillation: loss is {loss.item()} at step {step + 1}; "
                                "lower --distill-lr")
            loss.backward()
            for w, gate in zip(weights, gates, strict=True):
                w.grad.mul_(gate)
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            total_loss += loss.item()
        epoch_losses.append(total_loss / len(tokens))
        log(f"distill epoch {epoch + 1}: KL {epoch_losses[-1]:.4f}")
    student.eval()
    for w, gate in zip(weights, gates, strict=True):
        w.requires_grad_(False)
        if (w * (1 - gate)).any():  # never expected: masked gradients keep zeros zero
            raise RuntimeError("distillation moved a pruned weight")
    return {"train_losses": epoch_losses, "steps": step,
            "seconds": round(time.monotonic() - started, 2),
            "trainable_parameters": int(sum(g.sum().item() for g in gates))}


def build(spec: DistillSpec, out: Path, model, student: Artifact, calibration: Artifact,
          device: str) -> None:
    """The assembled folder, its blocks' weights distilled: same files, new weights."""
    from stages.inputs import calibration as calib
    from stages.model.assembly import as_model_source
    from stages.model.devices import DTYPES, resolve_device
    from stages.model.model_source import load_model
    from stages.progress import logger

    where = resolve_device(device)
    teacher = load_model(model, torch.float32).to(where)
    tuned = load_model(as_model_source(student, "student"), torch.float32).to(where)
    record = distill(tuned, teacher, calib.load(calibration), spec.settings, where,
                     logger().info)
    del teacher
    for item in Path(student.path).iterdir():  # config, tokenizer, sparsity.json
        if item.is_file() and not item.name.startswith("model") and item.name not in (
                "DIGEST", "STAMP"):
            shutil.copy(item, out / item.name)
    tuned.to(DTYPES[spec.dtype]).save_pretrained(out, max_shard_size="1GB")
    shutil.copy(Path(student.path) / "config.json", out / "config.json")  # as assembled
    write_json(out, RECORD_FILE, {**record, "spec": asdict(spec), "key": spec.key()})


STAGE = Stage("distill", build)


def read_record(artifact: Artifact) -> dict:
    import json

    return json.loads((Path(artifact.path) / RECORD_FILE).read_text())
