"""PNG plots of a sweep: perplexity vs. sparsity, per-block loss, calibration-size curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd

from stages.recovery.recoveries import RECOVERIES
from stages.reporting.labels import recipe_column, with_recipe


def _label(method: str, finetune: str, recipe: str = "") -> str:
    return with_recipe(f"{method} {RECOVERIES[finetune].label}".strip(), recipe)


def save(fig, ax, path: Path, columns: int = 1) -> bool:
    """Every plot's finish: grid, legend, written as PNG, figure closed."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def perplexity_vs_sparsity(rows: pd.DataFrame, path: Path) -> bool:
    part = rows[~rows["sparsity"].str.contains(":")]
    part = part[part["nsamples"] == part["nsamples"].max()]
    if part["sparsity"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(sorted(part["method"].unique()))}
    part = part.assign(recipe=recipe_column(part))
    for (method, finetune, recipe), group in part.groupby(["method", "finetune", "recipe"]):
        group = group.sort_values("ratio")
        style = RECOVERIES[finetune]
        ax.plot(group["ratio"] * 100, group["ppl"], style.line, marker=style.marker,
                color=colors[method], label=_label(method, finetune, recipe))
    ax.axhline(part["dense_ppl"].iloc[0], color="black", linestyle="--", linewidth=1,
               label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("Wikitext-2 perplexity (log scale)")
    model = part["model"].iloc[0]
    ax.set_title(f"{model}: perplexity vs. sparsity ({part['eval_windows'].iloc[0]} windows)")
    return save(fig, ax, path, columns=2)


def block_losses(losses: dict[str, list[dict]], path: Path) -> bool:
    """Reconstruction loss of every block before (dashed) and after (solid) EBFT."""
    if not losses:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(losses.items()):
        blocks = [r["block"] for r in records]
        ax.plot(blocks, [r["start_loss"] for r in records], "--", color=f"C{i}", alpha=0.7)
        ax.plot(blocks, [r["end_loss"] for r in records], "-", color=f"C{i}", label=label)
    ax.plot([], [], "--", color="gray", label="before fine-tuning (dashed)")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("block output MSE vs. dense (log scale)")
    ax.set_title("per-block reconstruction loss, before and after EBFT")
    return save(fig, ax, path)


def calibration_size(rows: pd.DataFrame, path: Path) -> bool:
    if rows["nsamples"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = rows.assign(recipe=recipe_column(rows))
    for (method, finetune, sparsity, recipe), group in rows.groupby(
            ["method", "finetune", "sparsity", "recipe"]):
        group = group.sort_values("nsamples")
        style = RECOVERIES[finetune]
        ax.plot(group["nsamples"], group["ppl"], style.line, marker=style.marker,
                label=f"{_label(method, finetune, recipe)} {sparsity}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration samples")
    ax.set_ylabel("Wikitext-2 perplexity")
    ax.set_title("perplexity vs. number of calibration samples (Figure 2)")
    return save(fig, ax, path)


def draw_all(rows: pd.DataFrame, losses: dict[str, list[dict]], out: Path) -> list[str]:
    drawn = []
    for name, draw in (("perplexity_vs_sparsity.png", lambda p: perplexity_vs_sparsity(rows, p)),
                       ("block_losses.png", lambda p: block_losses(losses, p)),
                       ("calibration_size.png", lambda p: calibration_size(rows, p))):
        if draw(out / name):
            drawn.append(name)
    return drawn
