"""Tables and plots in the shape of the paper's, built from stored run reports only.

Every run of ``ebft run`` writes ``reports/<config key>/report.json``; this module turns a
list of those into one row per configuration and pivots the rows into the paper's tables:
Table 1/2 (perplexity per method and sparsity or N:M pattern, before and after
fine-tuning), Table 3 (zero-shot accuracy), Table 6 (weights vs. mask tuning) and Figure 2
(perplexity vs. number of calibration samples), and for structured pruning Tables 4/5
(parameters left, fine-tuning time, perplexity, zero-shot mean for none / LoRA / EBFT).
Nothing here recomputes anything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from stages.masks import is_structured, methods_run
from stages.recovery.recoveries import RECOVERIES, base_method, recovery_of
from stages.reporting.labels import recipe_column, with_recipe

FINETUNE_ORDER = list(RECOVERIES)
# what a table's rows and columns already say, and settings that change no number (form:
# a compact model holds the masked model's weights)
CELL = ("model", "method", "finetune", "sparsity", "nsamples")
NOT_RECIPE = {"prune.method", "prune.sparsity", "prune.pattern", "finetune", "train.tune",
              "dense.model", "dense.nsamples", "dense.store", "dense.data_dir",
              "dense.batch_size", "zeroshot.batch_size", "keep_boundaries",
              "write_boundaries", "form", "runner",
              # what was measured, not the model: the zero-shot table has a documents column
              "zeroshot.tasks", "zeroshot.limit"}


# settings of what follows the masks: they cannot change a run's pruned model
RECOVERY_SETTINGS = ("train.", "distill.", "lora.")
MASK_SETTINGS = "prune."


# settings added after reports were written, at the value that does what the code did
# before (a report that lacks one ran that way)
ADDED_LATER = {"train": {"start": "method"}, "prune": {"sparsegpt": {"group": "block"}}}


def _with_defaults(section: dict, defaults: dict) -> dict:
    """``section`` with what ``defaults`` names filled in where it is absent, at any depth
    (only under keys the section has: a method's parameters only where it ran)."""
    out = dict(section)
    for name, value in defaults.items():
        if isinstance(value, dict):
            if isinstance(out.get(name), dict):
                out[name] = _with_defaults(out[name], value)
        else:
            out.setdefault(name, value)
    return out


def computed(cfg: dict) -> dict:
    """A report's configuration less the settings that changed nothing it computed: the
    parameters of mask methods it did not run (reports name every registered method's, and
    older ones lack those registered later) and distillation when it was off (or absent);
    settings added later filled in (ADDED_LATER)."""
    out = {**cfg, "prune": methods_run(cfg["prune"])}
    for section, settings in ADDED_LATER.items():
        if section in out:
            out[section] = _with_defaults(out[section], settings)
    if not (cfg.get("distill") or {}).get("epochs"):
        out.pop("distill", None)
    return out


def flatten(report: dict) -> dict:
    """One configuration's run report as one flat row."""
    cfg = report["config"]
    base = base_method(cfg["prune"]["method"])
    refine = base != cfg["prune"]["method"]  # the mask stage's refiner is the recovery
    finetune = recovery_of(cfg["prune"]["method"], cfg["finetune"], cfg["train"]["tune"]).name
    ppl = report["perplexity"]
    final = ppl["finetuned"] or ppl["pruned"]
    seconds = report["seconds"]
    params = report["mask_report"].get("parameters") or {}
    lora = report.get("lora")
    row = {
        "model": report["model"]["name"], "method": base, "finetune": finetune,
        # the whole model distilled after the recovery (the default after EBFT and LoRA)
        "kd": " + KD" if report.get("distill") else "",
        "sparsity": cfg["prune"]["pattern"] or f"{cfg['prune']['sparsity']:.0%}",
        "structured": is_structured(base),
        "parameters": params.get("remaining"), "parameters_total": params.get("total"),
        "ratio": report["mask_report"]["overall_sparsity"],
        "nsamples": cfg["dense"]["nsamples"], "dense_ppl": ppl["dense"]["perplexity"],
        "pruned_ppl": ppl["pruned"]["perplexity"], "ppl": final["perplexity"],
        "eval_windows": f"{ppl['dense']['windows']}/{ppl['dense']['windows_total']}",
        "eval_data": cfg["dense"].get("eval_data", "wikitext2"),
        # the cost of recovering: EBFT's blocks, or the mask stage itself for DSnoT
        # (plus the distillation after it, when there was one)
        "finetune_seconds": seconds.get("ebft", seconds.get("lora", seconds.get("masks", 0.0)
                                                                if refine else 0.0))
        + seconds.get("distill", 0.0),
        "finetune_data": lora["data"] if lora else "",
        "wall_seconds": report["wall_seconds"], "report": report.get("report_path", ""),
        # reports from before issue 22 lack the first two
        "layer_sparsity": cfg["prune"].get("layer_sparsity"),
        "remask": cfg["train"].get("remask"), "seed": cfg["dense"].get("seed"),
        # without the parameters of methods the run did not use (reports name every
        # registered method's; one registered later is absent from older reports)
        "config": json.dumps(_settings(computed(cfg)), sort_keys=True, default=str),
    }
    zeroshot = report.get("zeroshot") or {}
    final_zs = zeroshot.get("finetuned") or zeroshot.get("pruned")
    # a recovery's run evaluates its pruned model too: the row its gain is measured from
    start_zs = zeroshot.get("pruned") if zeroshot.get("finetuned") else None
    for label, result in (("dense", zeroshot.get("dense")), ("pruned", start_zs),
                          ("", final_zs)):
        if result:
            prefix = f"{label}_acc" if label else "acc"
            for task, values in result["tasks"].items():
                row[f"{prefix}_{task}"] = values["acc"]
            row[f"{prefix}_mean"] = result["mean_acc"]
            row["zeroshot_limit"] = result["limit"]
    return row


def _settings(section: dict, prefix: str = "") -> dict:
    """A report's configuration as ``{"train.lr": 0.002, ...}``, less what ``NOT_RECIPE``
    names."""
    out = {}
    for name, value in section.items():
        key = f"{prefix}{name}"
        if key in NOT_RECIPE:
            continue
        if isinstance(value, dict):
            out |= _settings(value, f"{key}.")
        else:
            out[key] = value
    return out


def recipes(rows: pd.DataFrame) -> list[str]:
    """For each row, the settings that tell it from other rows of the same table cell
    (model, method, recovery, sparsity, calibration size), e.g. "prune.layer_sparsity=owl,
    train.remask=True"; all "" where no cell holds two recipes. The settings are those that
    differ inside any cell, and every row is labelled by all of them, so one recipe keeps
    one label across a table's columns. Without this a store that holds two recipes of one
    cell would show one of them as if it were the only one. Runs of one recipe (e.g. saved
    masked and compact) share a label: they measure the same thing."""
    rows = rows.reset_index(drop=True)
    settings = [json.loads(c) for c in rows["config"]]

    def differing(by: list[str], only: str = "") -> set[str]:
        out: set[str] = set()
        for positions in rows.groupby(by, sort=False, dropna=False).indices.values():
            if len(positions) > 1:
                out |= {k for k in set().union(*(settings[i] for i in positions))
                        if k.startswith(only) and len({json.dumps(settings[i].get(k),
                                                                  sort_keys=True)
                                                       for i in positions}) > 1}
        return out

    differ = differing(list(CELL))
    # the masks of one mask method's rows with and without recovery, where they differ
    # (SparseGPT's dampening is settled by the recovery): the pruned row is not the
    # recovery's start (a refiner, e.g. +dsnot, is a recovery column with its own masks)
    rows = rows.assign(_masks=[s.get("prune.method") for s in settings])
    differ |= differing([c for c in CELL if c != "finetune"] + ["_masks"], only=MASK_SETTINGS)
    keys = sorted(differ)
    # a setting a row does not have (a method it does not run) is left out of its label
    return [", ".join(f"{k}={s[k]}" for k in keys if k in s) for s in settings]


def load_reports(paths: list[Path]) -> pd.DataFrame:
    return table_of([json.loads(Path(p).read_text()) | {"report_path": str(p)}
                     for p in paths])


def table_of(reports: list[dict]) -> pd.DataFrame:
    """Run reports (each with its ``report_path``) as rows, sorted, each with its recipe."""
    rows = pd.DataFrame([flatten(report) for report in reports])
    return sort_rows(rows.assign(recipe=recipes(rows)) if not rows.empty else rows)


def _sparsity_order(label: str) -> tuple:
    """50% < 60% < 70% < 2:4 < 4:8: ratios first, then N:M patterns by density."""
    if label.endswith("%"):
        return (0, float(label[:-1]))
    n, m = (int(x) for x in label.split(":"))
    return (1, -n / m, m)


def sort_rows(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    order = rows.assign(_s=rows["sparsity"].map(_sparsity_order),
                        _f=rows["finetune"].map(FINETUNE_ORDER.index))
    order = order.sort_values(["model", "nsamples", "method", "_f", "_s"])
    return order.drop(columns=["_s", "_f"]).reset_index(drop=True)


def _row_label(method: str, finetune: str, recipe: str = "", kd: str = "") -> str:
    label = f"{method.capitalize()} {RECOVERIES[finetune].label}".strip() + kd
    return with_recipe(label, recipe)


def _kd_column(rows: pd.DataFrame) -> pd.Series:
    """" + KD" where the row's model was distilled ("" in rows from before the column)."""
    return rows["kd"].fillna("") if "kd" in rows else pd.Series("", index=rows.index)


def perplexity_table(rows: pd.DataFrame, structured: bool) -> pd.DataFrame:
    """Table 1 (unstructured ratios) or Table 2 (N:M): method × recovery, one column each."""
    mask = (rows["sparsity"].str.contains(":") == structured) & ~rows["structured"]
    part = rows[mask & (rows["nsamples"] == rows["nsamples"].max())]
    if part.empty:
        return pd.DataFrame()
    columns = sorted(part["sparsity"].unique(), key=_sparsity_order)
    table = {"Dense": {c: part["dense_ppl"].iloc[0] for c in columns}}
    part = part.assign(recipe=recipe_column(part), kd=_kd_column(part))
    for (method, finetune, recipe, kd), group in part.groupby(
            ["method", "finetune", "recipe", "kd"], sort=False):
        table[_row_label(method, finetune, recipe, kd)] = dict(zip(group["sparsity"],
                                                                   group["ppl"]))
    out = pd.DataFrame.from_dict(table, orient="index")[columns]
    out.index.name = "method"
    return out


def zeroshot_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 3: accuracy per task and the mean, one row per model: the dense model first
    (once per model, task set and number of documents), then each configuration's pruned
    model (when its run evaluated it) and its recovered one. ``documents``: the first N of
    each task, or all."""
    tasks = [c[4:] for c in rows.columns if c.startswith("acc_") and c != "acc_mean"]
    if not tasks:
        return pd.DataFrame()
    rows = rows.assign(recipe=recipe_column(rows), kd=_kd_column(rows))
    if "zeroshot_limit" not in rows:
        rows = rows.assign(zeroshot_limit=None)
    rows = rows.dropna(subset=["acc_mean"])
    several = {c: rows[c].nunique() > 1 for c in ("model", "nsamples")}

    def documents(row: pd.Series) -> str:
        return "all" if pd.isna(row["zeroshot_limit"]) else str(int(row["zeroshot_limit"]))

    def record(label: str, row: pd.Series, prefix: str) -> dict:
        return {"model": label, "documents": documents(row)} | {
            t: row.get(f"{prefix}_{t}") for t in tasks} | {"mean": row[f"{prefix}_mean"]}

    def described(label: str, row: pd.Series, recipe: str) -> str:
        parts = [row["sparsity"], *([row["model"]] if several["model"] else []),
                 *([f"{row['nsamples']} windows"] if several["nsamples"] else []),
                 *([recipe] if recipe else [])]
        return f"{label} ({', '.join(parts)})"

    dense, models, seen = [], [], set()
    for _, row in rows.iterrows():
        measured = tuple(t for t in tasks if pd.notna(row.get(f"dense_acc_{t}")))
        if measured and (row["model"], documents(row), measured) not in seen:
            seen.add((row["model"], documents(row), measured))
            label = f"Dense ({row['model']})" if several["model"] else "Dense"
            dense.append(record(label, row, "dense_acc"))
        if pd.notna(row.get("pruned_acc_mean")):  # the recovery's settings made no change here
            mask_recipe = ", ".join(part for part in re.split(r", (?=[\w.]+=)", row["recipe"])
                                    if part and not part.startswith(RECOVERY_SETTINGS))
            models.append(record(described(_row_label(row["method"], "none"), row,
                                           mask_recipe), row, "pruned_acc"))
        label = _row_label(row["method"], row["finetune"], kd=row["kd"])
        models.append(record(described(label, row, row["recipe"]), row, "acc"))
    return pd.DataFrame(dense + models).drop_duplicates().set_index("model")


def tuning_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 6: the pruned model, EBFT on weights and EBFT on the mask, side by side."""
    part = rows[rows["finetune"].isin(["none", "ebft", "mask"])]
    if not (part["finetune"] == "mask").any():
        return pd.DataFrame()
    part = part.assign(recipe=recipe_column(part))
    out = part.pivot_table(index=["method", "sparsity", "recipe"], columns="finetune",
                           values="ppl", aggfunc="first")
    if not out.index.get_level_values("recipe").any():
        out = out.droplevel("recipe")
    weights = "weights tuning" + ("".join(set(_kd_column(part[part["finetune"] == "ebft"])))
                                  if "ebft" in out.columns else "")
    out = out.rename(columns={"none": "pruned", "ebft": weights, "mask": "mask tuning"})
    return out[[c for c in ("pruned", weights, "mask tuning") if c in out.columns]]


def structured_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Tables 4/5: structured pruning with no recovery, LoRA and EBFT, with their costs."""
    part = rows[rows["structured"]]
    if part.empty:
        return pd.DataFrame()
    columns = {"sparsity": "sparsity", "parameters": "parameters (M)",
               "finetune_seconds": "fine-tuning s", "ppl": "perplexity"}
    out = part.assign(parameters=part["parameters"] / 1e6)[list(columns)].rename(columns=columns)
    if "acc_mean" in part:
        out["zero-shot mean"] = part["acc_mean"]
    out.index = [_row_label(m, f, r, kd) for m, f, r, kd in zip(
        part["method"], part["finetune"], recipe_column(part), _kd_column(part))]
    out.index.name = "method"
    first = part.iloc[0]
    dense = pd.DataFrame({"sparsity": "0%", "parameters (M)": first["parameters_total"] / 1e6,
                          "fine-tuning s": 0.0, "perplexity": first["dense_ppl"]},
                         index=pd.Index(["Dense"], name="method"))
    if "acc_mean" in part:  # from a run that evaluated the dense model
        measured = part["dense_acc_mean"].dropna() if "dense_acc_mean" in part else []
        dense["zero-shot mean"] = measured.iloc[0] if len(measured) else None
    return pd.concat([dense, out])


def calibration_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure 2's data: perplexity vs. number of calibration samples, per configuration."""
    if rows["nsamples"].nunique() < 2:
        return pd.DataFrame()
    labels = rows.assign(recipe=recipe_column(rows)).apply(
        lambda r: f"{_row_label(r['method'], r['finetune'], r['recipe'])} ({r['sparsity']})",
        axis=1)
    out = rows.assign(config=labels).pivot_table(index="nsamples", columns="config",
                                                 values="ppl", aggfunc="first")
    return out


# accuracies need more digits than perplexities to show a difference
DIGITS = {"table3_zeroshot": 4}


def section(name: str, table: pd.DataFrame) -> str:
    """One table as a Markdown section, with its own digits."""
    return f"### {name}\n\n{markdown(table, DIGITS.get(name, 2))}\n"


def markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub Markdown table (written here to keep tabulate out of the dependencies)."""
    if table.empty:
        return ""
    frame = table.reset_index()

    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([header, rule, *body])


TABLES = {
    "table1_perplexity_unstructured": lambda r: perplexity_table(r, structured=False),
    "table2_perplexity_nm": lambda r: perplexity_table(r, structured=True),
    "table3_zeroshot": zeroshot_table,
    "table6_weights_vs_mask": tuning_table,
    "table45_structured": structured_table,
    "figure2_calibration_size": calibration_table,
}


def build_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every table the rows can fill (empty ones are left out)."""
    tables = {name: make(rows) for name, make in TABLES.items()}
    return {name: t for name, t in tables.items() if not t.empty}


def write(rows: pd.DataFrame, out: Path, block_losses: dict[str, list[dict]]) -> dict:
    """Write rows and tables as CSV, Parquet and Markdown, and the plots as PNG."""
    from stages.reporting import plots

    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "runs.csv", index=False)
    rows.to_parquet(out / "runs.parquet", index=False)
    tables = build_tables(rows)
    sections = []
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv")
        table.reset_index().to_parquet(out / f"{name}.parquet", index=False)
        sections.append(section(name, table))
    written = plots.draw_all(rows, block_losses, out)
    (out / "tables.md").write_text("\n".join(sections))
    return {"tables": sorted(tables), "plots": written, "markdown": "\n".join(sections)}
