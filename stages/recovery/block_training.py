"""One block's EBFT fine-tuning loop (paper Eq. 4, Algorithm 1), on tensors only.

Minimise the MSE between the sparse block's output and the target (the dense model's
output for this block), by AdamW on the block's linear weights (``tune="weights"``) or on
scores that choose which weights are kept (``tune="mask"``, paper Section 4.5). Either way
the pruned weights are exactly zero after every step and in the result.

Mask tuning: each weight gets a score; the kept set is the top-k scores of each row (or of
each N:M group), with k fixed by the starting mask, so the sparsity never changes. Scores
start at +m + (m/2)·r (kept) or -m + (m/2)·r (pruned), r = |W| / max |W| of the row,
m = MASK_MARGIN: every kept score is above every pruned one, so the starting mask is
reproduced, with magnitude breaking ties, and the gap (at least 1.5·m) is small enough that
a weight the loss keeps pushing swaps in after two or three steps at the default --mask-lr.
(Starting at r and r - 1 made the gap at least 1: about 100 Adam steps, so short runs never
changed the mask.) Scores learn through a straight-through estimator:
W_eff = W · (hard + s - s.detach()), whose gradient w.r.t. s is W · ∂L/∂W_eff.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from stages.errors import UserError

Batches = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
MASK_MARGIN = 0.01  # half the score gap between kept and pruned weights at the start


@dataclass(frozen=True)
class TrainConfig:
    tune: str = "weights"  # "weights" (EBFT) or "mask"
    target: str = "dense-output"  # Eq. 4; "dense-block": dense block l on the sparse input
    # 10x the paper's 2e-4. On SmolLM2 blocks (bench/vs_authors.py) 1e-3 ends 19-43% lower in
    # held-out MSE than 2e-4 after the same epochs; with batch 1, OWL and re-masking, 2e-3
    # gives a lower validation perplexity than 1e-3 or 4e-3 (issue 22, docs/results.md)
    lr: float = 2e-3
    mask_lr: float = 5e-3  # scores are O(1): they need a larger step than the weights
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip each step's gradient norm, as the authors' code (0: off)
    # the paper: 8 (--preset paper). 1: at this budget (16 windows, 2 epochs) more steps win
    # (issue 22: lower held-out perplexity on two calibration seeds, docs/results.md)
    batch_size: int = 1
    # the paper: up to 10 (--preset paper). 1: with distillation after the block pass the
    # second epoch's gain is better spent there (issue 22: the same wall time as 2 epochs
    # without it, a lower validation perplexity, docs/results.md)
    max_epochs: int = 1
    tolerance: float = 0.01  # stop when an epoch improves the held-out loss by less than 1%
    holdout: float = 0.0625  # fraction of calibration samples held out to judge convergence
    autocast: str = "auto"  # "auto" (bf16 where it is faster than fp32), "bfloat16", "none"
    seed: int = 0
    train_norms: bool = False  # also train the norm scales (and any biases), as the authors' code
    # the block loss: "mse" (Eq. 4); "nmse", each token's squared error over its target's
    # squared norm; or "capped": MSE, but a token whose target is larger than its window's
    # typical token counts as if it were typical, so the first token's massive activation
    # (an attention sink: up to 77% of a middle block's error on SmolLM2) does not dominate.
    # Neither alternative beat mse beyond the seed noise (issue 22, docs/results.md)
    loss: str = "mse"
    schedule: str = "linear"  # learning-rate decay to 0 over the steps: linear, cosine, constant
    warmup: float = 0.0  # fraction of the steps over which the rate rises linearly first
    # a block's inputs: "sequential" (the fine-tuned blocks before it: the paper) or "dense"
    # (the dense model's, from the capture: the blocks no longer depend on each other, so
    # they can train in parallel)
    block_inputs: str = "sequential"
    # choose each block's mask again, with the mask stage's method and pattern, on the
    # outputs of the fine-tuned blocks before it, just before training it: pruning and
    # reconstruction alternate block by block (the mask stage's masks stay the "pruned"
    # model). None (auto): on wherever it applies (flows.config.settled decides)
    remask: bool | None = None
    # what one reconstruction window is: the whole "block" (Eq. 4), or "sublayers": first
    # the attention's weights against the dense residual stream after attention, then the
    # MLP's against the dense block output (each with its own epochs and early stop)
    window: str = "block"
    # the weights a block trains from: "method" (what the mask method left: SparseGPT's and
    # `+obs`'s least-squares updates on the calibration inputs) or "dense" (the dense
    # weights under the same mask: the update dropped, the mask kept). Same for methods
    # that only choose a mask (Wanda, magnitude)
    start: str = "method"

    def validate(self, nsamples: int) -> None:
        checks = [
            (self.tune in ("weights", "mask"), f"--tune {self.tune!r}: choose weights or mask"),
            (self.target in ("dense-output", "dense-block"),
             f"--target {self.target!r}: choose dense-output or dense-block"),
            (self.lr > 0 and self.mask_lr > 0, "--lr and --mask-lr must be positive"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--betas must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)"),
            (self.batch_size > 0, f"--train-batch-size {self.batch_size}: must be positive"),
            (self.max_epochs > 0, f"--epochs {self.max_epochs}: must be positive"),
            (self.tolerance >= 0, "--tolerance must be >= 0"),
            (self.seed >= 0, f"--train-seed {self.seed}: must be >= 0"),
            (0 <= self.holdout < 1, f"--holdout {self.holdout}: must be in [0, 1)"),
            (self.autocast in ("auto", "bfloat16", "none"),
             f"--autocast {self.autocast!r}: choose auto, bfloat16 or none"),
            (nsamples - self.holdout_count(nsamples) >= 1,
             f"--holdout {self.holdout} leaves no training samples out of {nsamples}"),
            (self.block_inputs in ("sequential", "dense"),
             f"--block-inputs {self.block_inputs!r}: choose sequential or dense"),
            (not (self.train_norms and self.tune == "mask"),
             "--train-norms trains parameters, --tune mask freezes them: use one of the two"),
            (not (self.remask and self.block_inputs == "dense"),
             ("--remask chooses each mask on the fine-tuned blocks' outputs; --block-inputs "
             "dense trains on the dense model's: use one of the two")),
            (self.window in WINDOWS, f"--window {self.window!r}: choose block or sublayers"),
            (not (self.target == "dense-block" and self.window == "sublayers"),
             ("--window sublayers reconstructs the dense model's own outputs (the dense "
              "attention output, then --target dense-output): drop --target dense-block")),
            (not (self.train_norms and self.window == "sublayers"),
             ("--train-norms trains the whole block's norms; --window sublayers trains "
             "attention and MLP apart: use one of the two")),
            (self.loss in LOSSES, f"--loss {self.loss!r}: choose {', '.join(LOSSES)}"),
            (self.schedule in SCHEDULES,
             f"--schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, f"--warmup {self.warmup}: must be in [0, 1)"),
            (self.start in ("method", "dense"), f"--start {self.start!r}: choose method or dense"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def holdout_count(self, nsamples: int) -> int:
        return 0 if self.holdout == 0 else max(1, round(nsamples * self.holdout))


class NonFiniteLoss(UserError):
    pass


LOSSES = ("mse", "nmse", "capped")
WINDOWS = ("block", "sublayers")
SCHEDULES = ("linear", "cosine", "constant")


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean loss of a batch of block outputs (batch, tokens, hidden) against targets.
    "mse": over every element. "nmse": each token's ||out - target||² / ||target||², a
    relative error, averaged over tokens. "capped": the MSE with each token's squared error
    divided by max(1, ||target||² / its window's median ||target||²)."""
    out, target = out.float(), target.float()
    if kind == "mse":
        return F.mse_loss(out, target)
    error = (out - target).pow(2).sum(-1)
    size = target.pow(2).sum(-1)
    if kind == "capped":
        typical = size.median(dim=-1, keepdim=True).values.clamp_min(1e-12)  # per window
        weight = 1 / (size / typical).clamp_min(1.0)
        return (weight * error).mean() / target.shape[-1]
    return (error / size.clamp_min(1e-12)).mean()


def lr_factor(step: int, total: int, schedule: str, warmup_steps: int) -> float:
    """The learning rate's multiplier at ``step`` of ``total``: a linear warm-up over
    ``warmup_steps``, then linear or cosine decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if warmup_steps == 0:  # written as before the warm-up existed: the same floats
        progress = step / total
    else:
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1 - progress)


@functools.cache
def bf16_is_fast(device_type: str) -> bool:
    """Whether the hardware has native bf16 matmuls: bf16-capable GPUs, AVX512-BF16/AMX CPUs.

    A hardware fact, not a timing, so 'auto' makes the same choice on every run of a
    machine (a timing probe flipped under load and broke bit-reproducibility). CPUs without
    native bf16 (AVX2 only, like our 2-core CI machines) run bf16 matmuls hundreds of times
    slower than fp32, so there 'auto' means fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_for(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    """bf16 autocast over fp32 weights when asked, or with 'auto' where bf16 is faster."""
    wanted = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and bf16_is_fast(device.type))
    if wanted and dtype == torch.float32:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _hard_mask(scores: torch.Tensor, counts: torch.Tensor, m: int) -> torch.Tensor:
    """Keep the top ``counts`` scores per row, or per group of m inputs when m > 0."""
    rows, cols = scores.shape
    s = scores.reshape(rows, cols // m, m) if m else scores
    ranks = s.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (ranks < counts.unsqueeze(-1)).reshape(rows, cols)


class _Reached(Exception):
    pass


class BlockTuner:
    """The trainable view of a block: its linear weights (and, if asked, its other
    parameters: norm scales, biases), or scores over the linear weights. ``keep`` names the
    linear layers trained (the others stay frozen); with ``stop_at``, the output is the
    input of that submodule (the residual stream after attention), not the block's."""

    def __init__(self, block, keep: dict[str, torch.Tensor], cfg: TrainConfig, nm_m: int,
                 stop_at: torch.nn.Module | None = None):
        self.block, self.cfg, self.m, self.stop_at = block, cfg, nm_m, stop_at
        self.names = {name: f"{name}.weight" for name in keep}
        modules = dict(block.named_modules())
        self.weights = {name: modules[name].weight for name in keep}
        self.keep = {name: keep[name].to(w.device) for name, w in self.weights.items()}
        # the masks as 0/1 in the weights' dtype: multiplied in every step, no conversion
        # (a multiply by a bool mask, or masked_fill, is ~10x slower on a CPU)
        self.gates = {name: k.to(self.weights[name].dtype) for name, k in self.keep.items()}
        for p in block.parameters():
            p.requires_grad_(False)
        linear_names = set(self.names.values())
        self.others = {name: p for name, p in block.named_parameters()
                       if name not in linear_names} if cfg.train_norms else {}
        if cfg.tune == "weights":
            for w in [*self.weights.values(), *self.others.values()]:
                w.requires_grad_(True)
            self.params = [*self.weights.values(), *self.others.values()]
            lr, decay = cfg.lr, cfg.weight_decay
        else:
            self.scores, self.counts = {}, {}
            for name, w in self.weights.items():
                r = w.detach().abs().float()
                r = r / r.amax(dim=1, keepdim=True).clamp_min(1e-12)
                side = torch.where(self.keep[name], MASK_MARGIN, -MASK_MARGIN)
                self.scores[name] = (side + MASK_MARGIN / 2 * r).requires_grad_(True)
                k = self.keep[name]
                groups = k.reshape(len(k), -1, nm_m) if nm_m else k
                self.counts[name] = groups.sum(-1)
            self.params = list(self.scores.values())
            lr, decay = cfg.mask_lr, 0.0
        # One fused kernel updates every tensor: on an H100 the unfused update took ~20% of
        # a Llama-2-7B block's step; on a 2-core CPU 1.6 s against 0.11 s per step, and it
        # made ~0.5 GB of temporaries (sqrt and division of the largest weight's moments).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=decay, fused=fused or None)

    def forward(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self.stop_at is None:
            return self._forward(x, kwargs)
        return stopped_at(self.stop_at, lambda: self._forward(x, kwargs))

    def _forward(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if self.cfg.tune == "weights":
            out = self.block(x, **kwargs)
        else:
            effective = {}
            for name, s in self.scores.items():
                hard = _hard_mask(s.detach(), self.counts[name], self.m)
                self.keep[name] = hard
                effective[self.names[name]] = self.weights[name] * (hard + s - s.detach())
            out = functional_call(self.block, effective, (x,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def step(self, x: torch.Tensor, y: torch.Tensor, kwargs: dict, amp) -> float:
        """Forward, MSE, backward and the masked update on one batch; returns the loss
        (read once: on a GPU each read waits for the device). A non-finite loss is
        returned without touching the weights."""
        with amp:
            out = self.forward(x, kwargs)
        loss = block_loss(out, y, self.cfg.loss)
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        self.after_backward()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step()
        return value

    def after_backward(self) -> None:
        if self.cfg.tune == "weights":  # pruned weights get no gradient, so Adam leaves them
            for name, w in self.weights.items():
                w.grad.mul_(self.gates[name])

    def after_step(self) -> None:
        """Only weight decay can move a pruned weight: with zero gradients Adam's moments,
        and so its update, stay exactly zero. With decay, put the zeros back."""
        if self.cfg.tune == "weights" and self.cfg.weight_decay > 0:
            with torch.no_grad():
                for name, w in self.weights.items():
                    w.mul_(self.gates[name])

    def trained(self) -> dict[str, torch.Tensor]:
        """What the optimiser changes: linear weights (by module name) and other
        parameters (by parameter name), or the mask scores."""
        return {**self.weights, **self.others} if self.cfg.tune == "weights" else self.scores

    def state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A copy of what is trained, in ``dtype`` when given (the dtype the result is
        stored in: keeping the best epoch's weights wider than that buys nothing)."""
        return {name: t.detach().to(dtype or t.dtype, copy=True)
                for name, t in self.trained().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        target = self.trained()
        with torch.no_grad():
            for name, t in state.items():
                target[name].copy_(t)

    def finish(self) -> dict[str, torch.Tensor]:
        """Write the final sparse weights into the block; returns the final keep-masks."""
        if self.cfg.tune == "mask":
            self.keep = {name: _hard_mask(s.detach(), self.counts[name], self.m)
                         for name, s in self.scores.items()}
        with torch.no_grad():
            for name, w in self.weights.items():
                w.requires_grad_(False)
                w.mul_(self.keep[name].to(w.dtype))
        for p in self.others.values():
            p.requires_grad_(False)
        return self.keep


def stopped_at(module: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """What ``module`` is called with while ``run`` runs, the rest of ``run`` skipped: the
    residual stream after attention is the input of the norm before the MLP."""
    seen = {}

    def grab(_module, args, kwargs):
        seen["input"] = args[0] if args else next(iter(kwargs.values()))
        raise _Reached

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen["input"]


def train_block(block, keep: dict[str, torch.Tensor], batches: Batches, train_rows: list[int],
                holdout_rows: list[int], kwargs_for: Callable[[int], dict], cfg: TrainConfig,
                device: torch.device, dtype: torch.dtype, index: int = 0,
                nm_m: int = 0, log: Callable[[str], None] = print,
                state_dtype: torch.dtype | None = None,
                stop_at: torch.nn.Module | None = None) -> dict:
    """Fine-tune one block in place; returns its record (losses, epochs, time, tokens/s).
    ``state_dtype``: the dtype the block is stored in afterwards (the best epoch's weights
    are kept in it; mask scores always at full width). ``keep`` names the layers trained;
    ``stop_at``: train against that submodule's input instead of the block's output."""
    keep_as = state_dtype if cfg.tune == "weights" else None
    tuner = BlockTuner(block, keep, cfg, nm_m, stop_at)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs
    warmup_steps = round(cfg.warmup * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        tuner.optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, warmup_steps))
    amp = autocast_for(cfg, device, dtype)
    gen = torch.Generator().manual_seed(cfg.seed + index)
    judge_rows = holdout_rows or train_rows

    def loss_on(rows: list[int]) -> float:
        """The mean loss over ``rows`` (a sum over batches, so batch size does not weigh)."""
        total = 0.0
        with torch.no_grad(), amp:
            for start in range(0, len(rows), cfg.batch_size):
                chunk = rows[start:start + cfg.batch_size]
                x, y = batches(chunk)
                out = tuner.forward(x, kwargs_for(len(chunk)))
                if cfg.loss == "mse":
                    total += F.mse_loss(out.float(), y.float(), reduction="sum").item()
                else:
                    total += block_loss(out, y, cfg.loss).item() * len(chunk)
        return total / (len(rows) * (y[0].numel() if cfg.loss == "mse" else 1))

    started, step, tokens = time.monotonic(), 0, 0
    first = best = loss_on(judge_rows)
    best_state, epochs, train_losses, eval_losses = tuner.state(keep_as), 0, [], []
    for epoch in range(cfg.max_epochs):
        order = [train_rows[i] for i in torch.randperm(len(train_rows), generator=gen)]
        epoch_loss = 0.0
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            x, y = batches(chunk)
            loss = tuner.step(x, y, kwargs_for(len(chunk)), amp)
            step += 1
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"block {index}: loss is {loss} at step {step} "
                                    f"(epoch {epoch + 1}); lower --lr or use --autocast none")
            schedule.step()
            epoch_loss += loss * len(chunk)
            tokens += x.shape[0] * x.shape[1]
        epochs = epoch + 1
        train_losses.append(epoch_loss / len(order))
        current = loss_on(judge_rows)
        eval_losses.append(current)
        log(f"block {index} epoch {epochs}: train {train_losses[-1]:.5g} "
            f"{'held-out' if holdout_rows else 'train'} {current:.5g}")
        improved = (best - current) / max(best, 1e-30)
        if current < best:
            best_state = None  # free the old copy before making the new one
            best, best_state = current, tuner.state(keep_as)
        if improved < cfg.tolerance:
            break
    tuner.load_state(best_state)
    final_keep = tuner.finish()
    seconds = time.monotonic() - started
    return {"block": index, "start_loss": first, "end_loss": best, "epochs": epochs,
            "steps": step, "train_losses": train_losses,
            "eval_losses": eval_losses, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "loss_measured_on": "held-out" if holdout_rows else "train",
            "early_stopped": epochs < cfg.max_epochs,
            "autocast": "none" if isinstance(amp, contextlib.nullcontext) else "bfloat16",
            "kept": {name: int(k.sum()) for name, k in final_keep.items()},
            "_keep": final_keep}
