"""A probe, not a stage: does a short distillation of the whole recovered model on the dense
model's logits lower its perplexity further than the block pass did?

Issue 22's finding that made this worth asking: SparseGPT's and ``wanda+obs``'s blocks end
EBFT with 15-37% lower held-out block losses than Wanda's, yet their models have a higher
perplexity, so the block-wise MSE is no longer aligned with the model's loss. This takes
one finished ``ebft run`` (its report), trains every kept weight of its blocks (the zeros
stay zero) on its own calibration windows against KL(dense ‖ sparse) of the next-token
distributions, and measures perplexity before and after on the run's eval data.

    EBFT_DATA_DIR=../shared/data python bench/kd_probe.py --report STORE/reports/KEY/report.json \
        [--lr 1e-4] [--epochs 1] [--eval-windows 32]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_file import write_results

from stages.evaluation.perplexity import token_windows
from stages.inputs import calibration, data
from stages.recovery.block_training import lr_factor
from store import Artifact


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    """As the project's perplexity stage: the mean over windows of each window's mean
    next-token cross-entropy, exponentiated."""
    losses = []
    for w in windows:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, w[1:]).item())
    return math.exp(sum(losses) / len(losses))


def distill(student, teacher, tokens: torch.Tensor, lr: float, epochs: int) -> list[float]:
    """Every block linear weight of ``student`` trained on KL(teacher ‖ student), batch 1,
    AdamW (0.9, 0.95), linear decay, gradient clipping at 1; pruned weights get no
    gradient, so they stay zero."""
    for p in student.parameters():
        p.requires_grad_(False)
    linears = [m for m in student.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    gates = [(m.weight != 0).float() for m in linears]
    params = [m.weight for m in linears]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    total = epochs * len(tokens)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, "linear", 0))
    gen, losses = torch.Generator().manual_seed(0), []
    student.train()
    for _ in range(epochs):
        for i in torch.randperm(len(tokens), generator=gen).tolist():
            ids = tokens[i:i + 1]
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                target = F.log_softmax(teacher(ids).logits.float(), -1)
            with torch.autocast("cpu", torch.bfloat16):
                out = F.log_softmax(student(ids).logits.float(), -1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean") / ids.shape[1]
            loss.backward()
            for p, g in zip(params, gates, strict=True):
                p.grad.mul_(g)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(loss.item())
    student.eval()
    assert all(not (p[g == 0]).any() for p, g in zip(params, gates, strict=True))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="an `ebft run` report.json")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--skip-before", action="store_true",
                        help="take the report's own recovered perplexity as the start")
    parser.add_argument("--out", default="bench/results/kd_probe.json")
    args = parser.parse_args(argv)

    report = json.loads(Path(args.report).read_text())
    eval_data = report["config"]["dense"]["eval_data"]
    corpus = data.eval_corpus(eval_data, data.data_dir(None))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(report["model_folder"])
    ids = tokenizer(corpus.texts[0], return_tensors="pt")["input_ids"]
    windows = token_windows(ids, 2048, args.eval_windows)
    tokens = calibration.load(Artifact(**report["calibration"]))
    torch.manual_seed(0)

    teacher, student = load(report["model"]["path"]), load(report["model_folder"])
    reported = report["perplexity"]["finetuned"]["perplexity"]
    before = reported if args.skip_before else perplexity(student, windows)
    started = time.monotonic()
    losses = distill(student, teacher, tokens, args.lr, args.epochs)
    seconds = time.monotonic() - started
    after = perplexity(student, windows)
    dense = report["perplexity"]["dense"]["perplexity"]
    result = {"report": args.report, "eval_data": eval_data, "windows": len(windows),
              "lr": args.lr, "epochs": args.epochs, "dense": dense, "reported": reported,
              "before": before, "after": after, "kd_seconds": round(seconds, 1),
              "kd_loss_first": losses[0], "kd_loss_last": losses[-1]}
    print(json.dumps(result, indent=1))
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
