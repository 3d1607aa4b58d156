"""Sweeps share cached stages; reports rebuild the same tables from disk."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import build_tiny_model

from flows.cli import main
from flows.dense import DenseConfig
from flows.run import RunConfig
from flows.sweep import SweepConfig, check, expand, sweep_flow
from stages.errors import UserError
from stages.reporting import reports


def base_config(store: Path, model: Path, data_dir: Path) -> RunConfig:
    dense = DenseConfig(model=str(model), store=str(store), data_dir=str(data_dir), nsamples=8,
                        seqlen=64, eval_seqlen=64, eval_windows=2, batch_size=4)
    # the paper's tables: every block at the same sparsity, EBFT alone (no distillation)
    cfg = RunConfig(dense=dense)
    return replace(cfg, prune=replace(cfg.prune, layer_sparsity="uniform"),
                   train=replace(cfg.train, batch_size=2, max_epochs=1, holdout=0.25, lr=1e-3,
                                 remask=False), distill=replace(cfg.distill, epochs=0))


def test_the_grid_expands_to_every_configuration():
    sweep = SweepConfig(methods=("magnitude", "wanda"), sparsities=("0.5", "2:4"),
                        finetunes=("none", "dsnot", "ebft", "mask"), nsamples=(8, 16))
    configs = expand(sweep)
    assert len(configs) == 2 * 2 * 4 * 2
    methods = {c.prune.method for c in configs}
    assert methods == {"magnitude", "wanda", "magnitude+dsnot", "wanda+dsnot"}
    assert {(c.finetune, c.train.tune) for c in configs if "+" not in c.prune.method} == {
        ("none", "weights"), ("ebft", "weights"), ("ebft", "mask")}
    assert {c.prune.pattern for c in configs} == {None, "2:4"}
    with pytest.raises(UserError, match="choose from none, dsnot, ebft, mask, lora"):
        expand(replace(sweep, finetunes=("qlora",)))
    lora = expand(replace(sweep, finetunes=("lora",)))
    assert {c.finetune for c in lora} == {"lora"}
    with pytest.raises(UserError, match="--sparsities 'half'"):
        expand(replace(sweep, sparsities=("half",)))
    with pytest.raises(UserError, match="choose threads, dask or ray"):
        check(replace(sweep, task_runner="celery"))
    with pytest.raises(UserError, match="--parallel 0"):
        check(replace(sweep, parallel=0))


@pytest.fixture(scope="module")
def sweep_result(prefect_server, tmp_path_factory, data_dir):
    model = build_tiny_model(tmp_path_factory.mktemp("sweep-model"))
    store = tmp_path_factory.mktemp("sweep-store")
    sweep = SweepConfig(base_config(store, model, data_dir), methods=("magnitude", "wanda"),
                        sparsities=("0.5", "0.7"), finetunes=("none", "ebft"), parallel=2)
    return sweep, sweep_flow(sweep)


def test_a_parallel_sweep_computes_the_shared_stages_once(sweep_result):
    _, result = sweep_result
    index = json.loads((Path(result["path"]) / "sweep.json").read_text())
    runs = [json.loads(Path(p).read_text()) for p in index["reports"]]
    assert len(runs) == result["configurations"] == 8
    for stage in ("calibration", "dense-capture", "perplexity"):
        states = [r["states"][stage] for r in runs]
        assert states.count("Completed") == 1 and states.count("Cached") == 7, (stage, states)
    # masks: once per (method, sparsity), shared by the none and ebft configurations
    by_mask: dict[str, list[str]] = {}
    for r in runs:
        by_mask.setdefault(r["masks"]["key"], []).append(r["states"]["masks"])
    assert len(by_mask) == 4
    assert all(sorted(s) == ["Cached", "Completed"] for s in by_mask.values())


def test_the_sweep_writes_tables_plots_and_data(sweep_result):
    _, result = sweep_result
    out = Path(result["path"])
    assert result["tables"] == ["table1_perplexity_unstructured"]
    assert set(result["plots"]) == {"perplexity_vs_sparsity.png", "block_losses.png"}
    for name in result["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(out / "table1_perplexity_unstructured.csv", index_col=0)
    assert list(table.index) == ["Dense", "Magnitude", "Magnitude w. EBFT", "Wanda",
                                 "Wanda w. EBFT"]
    assert list(table.columns) == ["50%", "70%"]
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 8 and (runs.loc[runs.finetune == "ebft", "finetune_seconds"] > 0).all()
    for method in ("Magnitude", "Wanda"):  # EBFT recovers on the tiny model too
        assert (table.loc[f"{method} w. EBFT"] < table.loc[method]).all()


def test_ebft_report_rebuilds_the_same_tables_from_disk(sweep_result, tmp_path, capsys):
    sweep, result = sweep_result
    code = main(["report", "--store", sweep.base.dense.store, "--sweep", sweep.key(),
                 "--out", str(tmp_path)])
    assert code == 0
    original = Path(result["path"])
    assert (tmp_path / "tables.md").read_text() == (original / "tables.md").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "runs.parquet"),
                                  pd.read_parquet(original / "runs.parquet"))
    assert "| Wanda w. EBFT |" in capsys.readouterr().out


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path)]) == 2
    assert "no run reports" in capsys.readouterr().err
    assert main(["report", "--store", str(tmp_path), "--sweep", "nope"]) == 2
    assert "--sweep nope: no sweep" in capsys.readouterr().err


def test_markdown_tables_are_well_formed():
    table = pd.DataFrame({"50%": [10.0, float("nan")]}, index=pd.Index(["a", "b"], name="m"))
    assert reports.markdown(table) == "| m | 50% |\n|---|---|\n| a | 10.00 |\n| b | – |"


def test_every_recovery_plots_tabulates_and_names_itself(tmp_path):
    """Rows of every registered recovery at two sparsities draw the plot and the table (a
    LoRA sweep used to crash there after all the compute), and each configuration the grid
    makes is named back as the recovery it came from (LoRA runs used to print as EBFT)."""
    from stages.recovery.recoveries import RECOVERIES, recovery_of
    from stages.reporting import plots

    rows = pd.DataFrame([{"model": "m", "method": "wanda", "finetune": f, "sparsity": s,
                          "ratio": r, "ppl": 10.0 + r, "dense_ppl": 9.0, "nsamples": 8,
                          "eval_windows": "2/2"}
                         for f in RECOVERIES for s, r in (("20%", 0.2), ("30%", 0.3))])
    assert plots.perplexity_vs_sparsity(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    sweep = SweepConfig(RunConfig(), methods=("wanda",), sparsities=("0.5",),
                        finetunes=tuple(RECOVERIES))
    for name, cfg in zip(RECOVERIES, expand(sweep), strict=True):
        assert recovery_of(cfg.prune.method, cfg.finetune, cfg.train.tune).name == name


def test_a_refiner_that_is_no_recovery_stays_part_of_the_method():
    """'wanda+dsnot' is Wanda recovered by DSnoT; 'wanda+obs' (SparseGPT's update on Wanda's
    mask) is a mask method of its own, whatever recovery follows (an EBFT run on it used
    to crash at its summary, after all the compute)."""
    from stages.recovery.recoveries import base_method, recovery_of

    assert (base_method("wanda+dsnot"), recovery_of("wanda+dsnot", "none", "weights").name) \
        == ("wanda", "dsnot")
    for finetune in ("none", "ebft", "lora"):
        assert recovery_of("wanda+obs", finetune, "weights").name == finetune
    assert base_method("wanda+obs") == "wanda+obs" and base_method("wanda") == "wanda"
    sweep = SweepConfig(RunConfig(), methods=("wanda+obs",), sparsities=("0.5",),
                        finetunes=("none", "dsnot"))
    with pytest.raises(UserError, match="wanda\\+obs has a refiner already and --finetunes "
                       "dsnot adds dsnot: drop dsnot"):
        expand(sweep)


def test_a_store_with_two_recipes_of_one_cell_shows_both():
    """`ebft report` over a store that holds the same method and sparsity at two recipes
    used to show one of them as the only one; each now gets a row named by what differs,
    the same name in every column."""
    def row(ppl: float, sparsity: str, layer_sparsity: str, remask: bool) -> dict:
        settings = {"prune.layer_sparsity": layer_sparsity, "train.remask": remask,
                    "train.lr": 2e-3, "dense.seed": 0}
        return {"model": "m", "method": "wanda", "finetune": "ebft", "sparsity": sparsity,
                "nsamples": 16, "structured": False, "ppl": ppl, "dense_ppl": 9.0,
                "config": json.dumps(settings, sort_keys=True), "report": f"r/{ppl}/report.json"}

    rows = pd.DataFrame([row(12.0, "50%", "owl", True), row(13.0, "50%", "uniform", False),
                         row(20.0, "70%", "owl", True)], index=[5, 7, 9])
    rows = rows.assign(recipe=reports.recipes(rows))
    owl, uniform = ("prune.layer_sparsity=owl, train.remask=True",
                    "prune.layer_sparsity=uniform, train.remask=False")
    assert list(rows["recipe"]) == [owl, uniform, owl]  # 70% alone, yet named alike
    table = reports.perplexity_table(rows, structured=False)
    assert list(table.index) == ["Dense", f"Wanda w. EBFT [{owl}]",
                                 f"Wanda w. EBFT [{uniform}]"]
    assert list(table.loc[f"Wanda w. EBFT [{owl}]"]) == [12.0, 20.0]
    assert table.loc[f"Wanda w. EBFT [{uniform}]", "50%"] == 13.0
    assert pd.isna(table.loc[f"Wanda w. EBFT [{uniform}]", "70%"])
    # a store of one recipe per cell keeps the plain labels
    single = rows.iloc[[0, 2]].reset_index(drop=True)
    assert reports.recipes(single) == ["", ""]
    # runs of one recipe (e.g. saved masked and compact) measure the same thing: one label
    twins = pd.concat([rows.iloc[[0]], rows.iloc[[0]].assign(report="r/b/report.json")])
    assert reports.recipes(twins) == ["", ""]


def test_sparsegpt_rows_name_their_dampening_where_the_recovery_settled_another():
    """--percdamp auto: SparseGPT without recovery at 0.01, before EBFT at 0.3. Table 1's
    pruned row is then not the EBFT row's start, and both rows say so; rows whose masks
    agree (Wanda, or a refiner's own method) keep plain labels."""
    def row(method: str, finetune: str, ppl: float, **prune) -> dict:
        settings = {"prune.method": method, "dense.seed": 0, "train.lr": 2e-3} | {
            f"prune.{k.replace('__', '.')}": v for k, v in prune.items()}
        return {"model": "m", "method": method.split("+")[0], "finetune": finetune,
                "sparsity": "50%", "nsamples": 16, "structured": False, "ppl": ppl,
                "dense_ppl": 9.0, "config": json.dumps(settings, sort_keys=True)}

    rows = pd.DataFrame([
        row("sparsegpt", "none", 40.0, sparsegpt__percdamp=0.01),
        row("sparsegpt", "ebft", 30.0, sparsegpt__percdamp=0.3),
        row("wanda", "none", 41.0), row("wanda+dsnot", "dsnot", 39.0, dsnot__cycles=50),
        row("wanda", "ebft", 29.0)])
    assert reports.recipes(rows) == ["prune.sparsegpt.percdamp=0.01",
                                     "prune.sparsegpt.percdamp=0.3", "", "", ""]
    table = reports.perplexity_table(rows.assign(recipe=reports.recipes(rows)), False)
    assert "Sparsegpt [prune.sparsegpt.percdamp=0.01]" in table.index
    assert table.loc["Sparsegpt w. EBFT [prune.sparsegpt.percdamp=0.3]", "50%"] == 30.0


def test_reports_from_before_the_recipe_settings_still_tabulate(sweep_result):
    """A report written before OWL and re-masking existed lacks their settings: one such
    report used to make `ebft report` fail for the whole store."""
    _sweep, result = sweep_result
    path = Path(json.loads((Path(result["path"]) / "sweep.json").read_text())["reports"][0])
    report = json.loads(path.read_text())
    del report["config"]["prune"]["layer_sparsity"], report["config"]["train"]["remask"]
    del report["config"]["train"]["start"]  # before --start: it ran as --start method does
    row = reports.flatten(report)
    assert row["layer_sparsity"] is None and row["remask"] is None
    assert json.loads(row["config"])["train.start"] == "method"


def test_the_zero_shot_table_shows_dense_pruned_and_recovered(sweep_result, tmp_path):
    """A recovery run with --tasks evaluates three models; `ebft report` used to show only
    the recovered one, and a blank dense row whenever the store's first report had no
    zero-shot (the dense row came from that report alone)."""
    _sweep, result = sweep_result
    paths = json.loads((Path(result["path"]) / "sweep.json").read_text())["reports"]
    report = next(r for r in map(json.loads, map(Path.read_text, map(Path, paths)))
                  if r["config"]["finetune"] == "ebft")

    def accuracies(arc: float, piqa: float) -> dict:
        return {"tasks": {"arc_easy": {"acc": arc}, "piqa": {"acc": piqa}},
                "mean_acc": (arc + piqa) / 2, "limit": 500}

    plain = reports.flatten(report)  # no zero-shot in this run
    report["zeroshot"] = {"dense": accuracies(0.5, 0.65), "pruned": accuracies(0.4, 0.61),
                          "finetuned": accuracies(0.45, 0.62)}
    report["config"]["zeroshot"] = {"tasks": ["arc_easy", "piqa"], "limit": 500}
    row = reports.flatten(report)
    assert (row["dense_acc_mean"], row["pruned_acc_mean"], row["acc_mean"]) == \
        (0.575, 0.505, 0.535)
    table = reports.zeroshot_table(pd.DataFrame([plain, row]))
    method = row["method"].capitalize()
    assert [label.split(" (")[0] for label in table.index] == \
        ["Dense", method, f"{method} w. EBFT{row['kd']}"]
    assert list(table["mean"]) == [0.575, 0.505, 0.535]
    assert list(table["documents"]) == ["500"] * 3
    # the zero-shot settings say what was measured, not which model: no recipe of their own
    assert reports.recipes(pd.DataFrame([plain, row])) == ["", ""]
    assert "0.5350" in reports.section("table3_zeroshot", table)  # four digits, printed too
    # a second recovery of the same pruned model (one pruned row, not one per recovery),
    # then that recovery on every document (a dense row per number of documents; a
    # documents column Parquet can hold)
    report["config"]["train"]["lr"] *= 2
    report["zeroshot"]["finetuned"] = accuracies(0.46, 0.63)
    second = reports.flatten(report)
    report["zeroshot"] = {k: v | {"limit": None} for k, v in report["zeroshot"].items()}
    rows = pd.DataFrame([plain, row, second, reports.flatten(report)])
    table = reports.zeroshot_table(rows.assign(recipe=reports.recipes(rows)))
    assert list(table["documents"]) == ["500", "all", "500", "500", "500", "all", "all"]
    assert [label.split(" (")[0] for label in table.index].count(method) == 2  # one a limit
    assert "train.lr" in table.index[3] and "train.lr" not in table.index[2]
    table.reset_index().to_parquet(tmp_path / "t.parquet")
