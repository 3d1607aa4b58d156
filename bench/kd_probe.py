"""A probe of the distill stage on a finished run: does a short distillation of the whole
recovered model on the dense model's logits lower its perplexity further than the block
pass did? (How the stage was first measured, before it was wired into the flow.)

Issue 22's finding that made this worth asking: SparseGPT's and ``wanda+obs``'s blocks end
EBFT with 15-37% lower held-out block losses than Wanda's, yet their models have a higher
perplexity, so the block-wise MSE is no longer aligned with the model's loss. This takes
one finished ``ebft run --distill-epochs 0`` (its report; a default run's model is already
distilled), runs ``stages.recovery.distill.distill`` on it with
its own calibration windows, and measures perplexity before and after on the run's eval
data, outside the store.

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
from stages.recovery.distill import DistillSettings, captured_teacher, distill
from store import Artifact


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    """As the project's perplexity stage: the mean over windows of each window's mean
    next-token cross-entropy, exponentiated."""
    losses = []
    for w in windows:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, w[1:]).item())
    return math.exp(sum(losses) / len(losses))


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

    teacher, student = captured_teacher(Artifact(**report["activations"])), \
        load(report["model_folder"])
    reported = report["perplexity"]["finetuned"]["perplexity"]
    before = reported if args.skip_before else perplexity(student, windows)
    started = time.monotonic()
    record = distill(student, teacher, tokens, DistillSettings(args.epochs, args.lr),
                     torch.device("cpu"))
    seconds = time.monotonic() - started
    after = perplexity(student, windows)
    dense = report["perplexity"]["dense"]["perplexity"]
    result = {"report": args.report, "eval_data": eval_data, "windows": len(windows),
              "lr": args.lr, "epochs": args.epochs, "dense": dense, "reported": reported,
              "before": before, "after": after, "kd_seconds": round(seconds, 1),
              "kd_losses": record["train_losses"]}
    print(json.dumps(result, indent=1))
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
