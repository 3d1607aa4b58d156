"""Distillation of the whole recovered model on the dense model's logits, after the block pass.

Why (issue 22): past a point the block-wise objective stops tracking the model's loss.
SparseGPT's and ``wanda+obs``'s blocks end EBFT with 15-37% lower held-out block losses than
Wanda's, and their models still have the higher perplexity. This step trains every kept
weight of the blocks (``top``: of the last blocks only) together (the zeros stay zero: their
gradients are masked, so Adam never moves them) on the calibration windows against the
dense model's next-token distributions, KL(dense ‖ sparse), so the blocks' remaining
errors are traded against each other where the output sees them. On SmolLM2-135M it is the
step that closes half of the gap pruning opens (docs/results.md), and by default it takes
the place of the block pass's second epoch, at the same wall time.

The teacher is not a second model: the dense capture already holds the dense model's last
block output for every calibration window, and the student's own final norm and head (never
trained) turn it into the dense logits. The stage holds the student, its gradients, AdamW's
two moments and the 0/1 gates (about 20 bytes a block weight in fp32, before
activations), unlike the block pass: a 7B model needs a large accelerator, and a run it
does not fit is refused before any stage runs, naming ``--distill-epochs 0``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
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
    epochs: int = 1  # passes over the calibration windows; 0: no distillation
    # after one block epoch, 2e-4 beat 1e-4 and 4e-4 on SmolLM2-135M's validation split
    # (issue 22, docs/results.md)
    lr: float = 2e-4
    # the share of the blocks, counted from the last, whose weights it trains: the blocks
    # below keep the block pass's weights and need no backward pass, gradients or moments
    top: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        checks = [(self.epochs >= 0, f"--distill-epochs {self.epochs}: must be >= 0 (0: off)"),
                  (self.lr > 0, f"--distill-lr {self.lr}: must be positive"),
                  (0 < self.top <= 1, (f"--distill-top {self.top}: must be in (0, 1] (the "
                                       "share of the blocks, from the last, it trains)")),
                  (self.seed >= 0, f"distill.seed {self.seed}: must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class DistillSpec(Spec):
    activations_key: str  # the dense capture: its last boundary is the teacher
    student_key: str  # the assembled model folder (EBFT's or LoRA's blocks in it)
    calibration_key: str  # the training windows
    settings: DistillSettings
    dtype: str  # the dtype the result is saved in (the assembled folder's)


class _KLToTeacher(torch.autograd.Function):
    """KL(teacher ‖ student) with its gradient, ``(softmax(s) - softmax(t)) / tokens``,
    computed in the same pass, a few rows at a time. Why: the vocabulary is wide (49k for
    SmolLM2), and the plain form (two fp32 log-softmaxes, ``kl_div`` and autograd through
    them) spent 2 of a step's 10 s on one 1024-token window; rows that fit in cache take
    0.3 s and keep nothing but the gradient for the backward pass."""

    @staticmethod
    def forward(ctx, student, teacher, rows: int):
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = s.shape[0]
        grad = torch.empty_like(s)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, rows):
            log_q = F.log_softmax(s[i:i + rows].float(), dim=-1)
            log_p = F.log_softmax(t[i:i + rows].float(), dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum().double()
            grad[i:i + rows] = log_q.exp_().sub_(p).div_(n)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return (total / n).float()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return (grad * upstream).reshape(ctx.shape), None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            rows: int = 16) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, the mean over tokens (fp32
    maths whatever the logits' dtype); differentiable in ``student_logits`` only."""
    return _KLToTeacher.apply(student_logits, teacher_logits.detach(), rows)


def output_head(model) -> torch.nn.Module:
    """The last block's output to logits: the final norm, then the output embedding."""
    return torch.nn.Sequential(model.get_decoder().norm, model.get_output_embeddings())


def last_block_outputs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The dense model's last block output (before the final norm), as the capture stores
    it as its last boundary: what tests and probes without a capture use as the teacher."""
    seen = []
    handle = arch.decoder_blocks(model)[-1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def trained_blocks(blocks, top: float) -> list:
    """The last ``ceil(top * len(blocks))`` blocks (at least one)."""
    count = math.ceil(round(top * len(blocks), 6))  # 0.28 * 25 is 7.000000000000001
    return list(blocks)[len(blocks) - max(1, count):]


def trainable(model, top: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The linear weights of the top blocks, each with its 0/1 gate (1 where it is not
    pruned; a float multiply is far faster on a CPU than a boolean fill); everything else
    (the blocks below, embeddings, norms, head) frozen, so autograd records nothing below
    the first trained block."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [linear.weight for block in trained_blocks(arch.decoder_blocks(model), top)
               for linear in arch.linear_layers(block).values()]
    gates = [(w != 0).to(w.dtype) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    return weights, gates


def distill(student, teacher_hidden: Callable[[int], torch.Tensor], tokens: torch.Tensor,
            settings: DistillSettings, device: torch.device, log=print) -> dict:
    """Train ``student`` in place on KL(teacher ‖ student), one window per step, AdamW
    (0.9, 0.95), linear decay, gradient norm clipped at 1; returns the record.

    ``teacher_hidden(row)`` is the dense model's last block output on window ``row`` (the
    capture's last boundary): the teacher's logits are the student's own final norm and
    head on it (the two are not trained, so they are the dense model's), so no dense model
    is loaded or run."""
    from stages.recovery.block_training import bf16_is_fast, lr_factor

    to_logits = output_head(student)
    weights, gates = trainable(student, settings.top)
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
                target = to_logits(teacher_hidden(row).to(device, torch.float32))
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


def captured_teacher(activations: Artifact) -> Callable[[int], torch.Tensor]:
    """Window ``row``'s dense last block output, read from the capture's last boundary."""
    import store.activations as acts
    from stages.inputs.capture import ZARR_NAME

    group = acts.open_group(Path(activations.path) / ZARR_NAME)
    last = group.attrs["n_boundaries"] - 1  # boundaries 0..n_blocks
    return lambda row: acts.read(group, last, row, row + 1)


def build(spec: DistillSpec, out: Path, activations: Artifact, student: Artifact,
          calibration: Artifact, device: str) -> None:
    """The assembled folder, its blocks' weights distilled: same files, new weights."""
    from stages.inputs import calibration as calib
    from stages.model.assembly import as_model_source
    from stages.model.devices import DTYPES, resolve_device
    from stages.model.model_source import load_model
    from stages.progress import logger

    where = resolve_device(device)
    tuned = load_model(as_model_source(student, "student"), torch.float32).to(where)
    record = distill(tuned, captured_teacher(activations), calib.load(calibration),
                     spec.settings, where, logger().info)
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
