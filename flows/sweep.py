"""A grid of configurations as one Prefect flow, sharing every stage they have in common.

Each configuration is one task that runs the main job (``run_flow``, itself a flow of
cached stages). Stages two configurations share have the same content key, so the first
to reach one computes it and the others find it ``Cached`` — calibration and the dense
capture once per model and calibration set, masks once per method and sparsity. Under a
parallel task runner the store's file locks make a second configuration wait for a stage
in progress instead of computing it again. The sweep then rebuilds the paper's tables and
plots from the run reports and publishes them as Prefect artifacts.
"""

import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.run import RunConfig, prepare, run_flow
from flows.runners import task_runner_for
from stages.errors import UserError
from stages.recovery.recoveries import RECOVERIES, base_method, recovery_of
from stages.reporting import reports
from stages.reporting.labels import with_recipe
from store import Store, digest_json, write_json


@dataclass(frozen=True)
class SweepConfig:
    base: RunConfig = field(default_factory=RunConfig)  # everything the grid does not vary
    models: tuple[str, ...] = ()  # empty: the base config's model
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    sparsities: tuple[str, ...] = ("0.5", "0.6", "0.7")  # ratios or N:M patterns
    finetunes: tuple[str, ...] = ("none", "dsnot", "ebft")  # recoveries (stages.recovery.recoveries)
    nsamples: tuple[int, ...] = ()  # empty: the base config's
    parallel: int = 1  # configurations at once on the thread task runner
    task_runner: str = "threads"  # threads, dask or ray (Prefect's integrations)
    address: str | None = None  # an existing Dask scheduler or Ray cluster; None: local


    def key(self) -> str:
        return digest_json(asdict(self))[:16]


def expand(sweep: SweepConfig) -> list[RunConfig]:
    """Every configuration of the grid as a RunConfig, in a stable order."""
    for name in sweep.finetunes:
        if name not in RECOVERIES:
            raise UserError(f"--finetunes {name!r}: choose from {', '.join(RECOVERIES)}")
    models = sweep.models or (sweep.base.dense.model,)
    nsamples = sweep.nsamples or (sweep.base.dense.nsamples,)
    configs = []
    for model, n, method, sparsity, name in itertools.product(
            models, nsamples, sweep.methods, sweep.sparsities, sweep.finetunes):
        recovery = RECOVERIES[name]
        if recovery.refiner and "+" in method:
            raise UserError(f"--methods {method} has a refiner already and --finetunes {name} "
                            f"adds {recovery.refiner}: drop {name} from --finetunes")
        refined = f"{method}+{recovery.refiner}" if recovery.refiner else method
        prune = replace(sweep.base.prune, method=refined, **_sparsity_fields(sparsity))
        train = replace(sweep.base.train, tune=recovery.tune) if recovery.tune else \
            sweep.base.train
        dense = replace(sweep.base.dense, model=model, nsamples=n)
        configs.append(replace(sweep.base, dense=dense, prune=prune, train=train,
                               finetune=recovery.finetune))
    return configs


def _sparsity_fields(value: str) -> dict:
    if ":" in value:
        return {"pattern": value, "sparsity": 0.5}
    try:
        return {"pattern": None, "sparsity": float(value)}
    except ValueError:
        raise UserError(f"--sparsities {value!r}: give ratios like 0.5 or N:M patterns like "
                        "2:4, comma separated") from None


def task_runner_of(sweep: SweepConfig):
    return task_runner_for(sweep.task_runner, sweep.address, sweep.parallel)


def check(sweep: SweepConfig) -> list[RunConfig]:
    """Expand the grid and check every configuration before anything runs."""
    if sweep.parallel <= 0:
        raise UserError(f"--parallel {sweep.parallel}: must be at least 1")
    task_runner_of(sweep)
    configs = expand(sweep)
    if not configs:
        raise UserError("the sweep is empty: give at least one method, sparsity and finetune")
    for cfg in configs:
        prepare(cfg)
    return configs


@task(name="configuration", task_run_name="{label}", cache_policy=NO_CACHE)
def configuration_task(cfg: RunConfig, label: str) -> str:
    """Run one configuration of the grid; returns its run report's key (the worker's path
    to it may not exist where the sweep's flow runs)."""
    run_flow(cfg)
    return cfg.key()


def label_of(cfg: RunConfig) -> str:
    recovery = recovery_of(cfg.prune.method, cfg.finetune, cfg.train.tune).name
    sparsity = cfg.prune.pattern or f"{cfg.prune.sparsity:g}"
    base = base_method(cfg.prune.method)
    return f"{Path(cfg.dense.model).name}/{base}/{sparsity}/{recovery}/n{cfg.dense.nsamples}"


def block_losses(paths: list[str]) -> dict[str, list[dict]]:
    """Per-block records of the EBFT configurations, for the per-block loss plot."""
    out = {}
    loaded = {str(p): json.loads(Path(p).read_text()) | {"report_path": str(p)}
              for p in paths}
    rows = reports.table_of(list(loaded.values()))
    for _, row in rows.iterrows():
        blocks = loaded[row["report"]]["blocks"]
        if blocks:
            label = f"{row['method']} {row['sparsity']} {row['finetune']}"
            out[with_recipe(label, row["recipe"])] = blocks
    return out


def write_sweep_report(store: Store, key: str, paths: list[str], extra: dict) -> dict:
    """Tables, plots and an index of the run reports, written atomically under sweeps/<key>."""
    rows = reports.load_reports([Path(p) for p in paths])
    with store.writing("sweeps", key, replace=True) as tmp:
        written = reports.write(rows, tmp, block_losses(paths))
        write_json(tmp, "sweep.json", {"reports": paths, **extra, **written})
    return {"path": str(store.path("sweeps", key)), **written}


def publish(result: dict, rows_csv: Path) -> None:
    """Show the tables in the Prefect UI (markdown and table artifacts)."""
    import pandas as pd
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown=result["markdown"] or "(no tables)", key="ebft-tables",
                             description="EBFT sweep: the paper's tables")
    runs = pd.read_csv(rows_csv)
    create_table_artifact(table=json.loads(runs.to_json(orient="records")), key="ebft-runs",
                          description="EBFT sweep: one row per configuration")


@flow(name="ebft-sweep")
def sweep_flow(sweep: SweepConfig) -> dict:
    started = time.monotonic()
    configs = check(sweep)
    keys = sweep_configurations.with_options(task_runner=task_runner_of(sweep))(configs)
    store = Store(sweep.base.dense.store)
    paths = [str(Path(store.get("reports", key).path) / "report.json") for key in keys]
    result = write_sweep_report(store, sweep.key(), paths,
                                {"sweep": asdict(sweep), "report_keys": keys,
                                 "wall_seconds": round(time.monotonic() - started, 1)})
    publish(result, Path(result["path"]) / "runs.csv")
    return result | {"wall_seconds": round(time.monotonic() - started, 1),
                     "configurations": len(configs)}


@flow(name="ebft-sweep-configurations")
def sweep_configurations(configs: list[RunConfig]) -> list[str]:
    """All configurations as tasks on this flow's task runner (threads, Dask, Ray…)."""
    futures = [configuration_task.submit(cfg, label_of(cfg)) for cfg in configs]
    return [f.result() for f in futures]
