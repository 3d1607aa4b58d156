"""The main job: calibration → dense capture → masks → EBFT per block (or LoRA) → assembly →
perplexity.

Thin on purpose: every step is a stage function from ``stages/`` wrapped in a cached task
(``flows.caching.run_stage``); this file only wires them in the order of the pipeline and
collects a run report.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from prefect import flow, task

from flows.caching import StageLog, cached_stage, run_stage
from flows.dense import (
    DenseConfig,
    Inputs,
    check_dense_flags,
    dense_stages,
    perplexity_task,
    prepare_dense,
    zeroshot_task,
)
from stages import assembly, data, ebft, lora, pruning, zeroshot
from stages.block_training import TrainConfig
from stages.devices import DTYPES, resolve_device
from stages.errors import UserError
from stages.lora import LoraSettings
from stages.model_source import ModelSource, load_model
from stages.streaming import BlockLoader
from store import Artifact, Store, digest_json

FINETUNES = ("none", "ebft", "lora")
FORMS = ("masked", "compact")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    mask_inputs: str = "sequential"
    blocksize: int = 128
    percdamp: float = 0.01
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_var_power: float = 1.0
    flap_structure: str = "AL-AM"
    flap_bias: bool = True


@dataclass(frozen=True)
class ZeroShotConfig:
    tasks: tuple[str, ...] = ()  # empty: no zero-shot evaluation
    limit: int | None = None  # documents per task (quick runs); None: all
    batch_size: int = 16


@dataclass(frozen=True)
class RunConfig:
    dense: DenseConfig = field(default_factory=DenseConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: str = "ebft"  # "none": the pruned model as the mask stage left it; or "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    form: str = "masked"  # the saved model: masked, or compact (structured masks: narrower)
    save_dtype: str = "auto"  # dtype of the saved model; auto: the compute dtype
    keep_boundaries: bool = False  # keep every block's outputs (debugging; costs disk)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def key(self) -> str:
        return digest_json(asdict(self))[:16]


# ---- tasks: thin wrappers that rebuild what they need from paths and digests -------------

@task(name="masks")
@cached_stage("masks")
def masks_task(spec: pruning.MaskSpec, store_root: str, model: ModelSource, activations: dict,
               device: str) -> dict:
    return pruning.build(Store(store_root), spec, partial(load_model, model),
                         Artifact(**activations), resolve_device(device)).to_dict()


@task(name="ebft-block", task_run_name="ebft-block-{spec.index}")
@cached_stage("ebft-block")
def block_task(spec: ebft.BlockSpec, store_root: str, model: ModelSource, activations: dict,
               masks: dict, device: str, chain: list, keep_boundaries: bool) -> dict:
    dtype = DTYPES[spec.dtype]
    ctx = ebft.Context(Store(store_root), BlockLoader(model.path, dtype), Artifact(**activations),
                       Artifact(**masks), resolve_device(device), dtype)
    return ebft.build_block(ctx, chain, spec.index, keep_boundaries).to_dict()


@task(name="lora")
@cached_stage("lora")
def lora_task(spec: lora.LoraSpec, store_root: str, model: ModelSource, masks: dict,
              calib: dict, device: str) -> dict:
    return lora.build(Store(store_root), spec, partial(load_model, model), Artifact(**masks),
                      Artifact(**calib), resolve_device(device)).to_dict()


@task(name="assembly")
@cached_stage("models-sparse")
def assembly_task(spec: assembly.AssemblySpec, store_root: str, model: ModelSource,
                  masks: dict, blocks: list[dict], pattern_spec: pruning.MaskSpec,
                  lora_artifact: dict | None = None) -> dict:
    return assembly.build(Store(store_root), spec, model, Artifact(**masks),
                          [Artifact(**b) for b in blocks], pattern_spec.parsed_pattern(),
                          Artifact(**lora_artifact) if lora_artifact else None).to_dict()


# ---- checking the configuration before anything runs --------------------------------------

def prepare(cfg: RunConfig) -> Inputs:
    """Resolve and check every input; raises a one-line UserError before any stage runs.
    The flags first (cheap, and so that a bad flag is named, not what it breaks), then the
    model, data and resources (prepare_dense), then what needs the model's shapes."""
    check_dense_flags(cfg.dense)
    if cfg.finetune not in FINETUNES:
        raise UserError(f"--finetune {cfg.finetune!r}: choose one of {', '.join(FINETUNES)}")
    if cfg.save_dtype not in ("auto", *DTYPES):
        raise UserError(f"--save-dtype {cfg.save_dtype!r}: choose auto, {', '.join(DTYPES)}")
    if cfg.form not in FORMS:
        raise UserError(f"--form {cfg.form!r}: choose {' or '.join(FORMS)}")
    mask_spec = mask_spec_for(cfg, "model", "activations", "float32")
    pruning.validate(mask_spec)
    cfg.train.validate(cfg.dense.nsamples)
    cfg.lora.validate()
    if cfg.form == "compact" and not mask_spec.structured:
        raise UserError(f"--form compact needs whole heads and channels removed (--method "
                        f"flap); {cfg.prune.method} zeros single weights, so use --form masked")
    if mask_spec.structured and cfg.finetune == "ebft" and cfg.train.tune == "mask":
        raise UserError("--tune mask reselects single weights and would break whole-head "
                        "structure; use --tune weights with --method flap")
    if cfg.zeroshot.limit is not None and cfg.zeroshot.limit <= 0:
        raise UserError(f"--zeroshot-limit {cfg.zeroshot.limit}: must be positive")
    if cfg.zeroshot.batch_size <= 0:
        raise UserError(f"--zeroshot-batch-size {cfg.zeroshot.batch_size}: must be positive")
    zeroshot.parse_tasks(",".join(cfg.zeroshot.tasks) or "all")
    if cfg.zeroshot.tasks:
        present, skipped = zeroshot.available(cfg.zeroshot.tasks,
                                              data.data_dir(cfg.dense.data_dir))
        if not present:
            raise UserError(f"--tasks {','.join(cfg.zeroshot.tasks)}: no data for any of them ("
                            f"{'; '.join(skipped.values())})")
    inputs = prepare_dense(cfg.dense)
    pattern = mask_spec.parsed_pattern()
    if pattern.is_nm:
        check_layers_fit(inputs.model, pattern)
    if mask_spec.structured:
        check_structured(inputs.model, cfg.prune.flap_bias)
    return inputs


def check_structured(model: ModelSource, with_bias: bool) -> None:
    """FLAP's layout needs, checked on a meta model before anything runs."""
    from flows.dense import meta_model
    from stages.structured import check_model

    check_model(meta_model(model), with_bias)


def check_layers_fit(model: ModelSource, pattern) -> None:
    """N:M needs every pruned layer's input size divisible by M; checked on a meta model."""
    import stages.architecture as arch
    from flows.dense import meta_model
    from stages.masks.core import check_nm_fits

    for linear in arch.linear_layers(arch.decoder_blocks(meta_model(model))[0]).values():
        check_nm_fits(linear.in_features, pattern)


def mask_spec_for(cfg: RunConfig, model_digest: str, activations_key: str,
                  dtype: str) -> pruning.MaskSpec:
    return pruning.MaskSpec(model_digest, activations_key, dtype=dtype,
                            batch_size=cfg.dense.batch_size, **asdict(cfg.prune))


# ---- the flow ---------------------------------------------------------------------------

@flow(name="ebft-run")
def run_flow(cfg: RunConfig) -> dict:
    started = time.monotonic()
    inputs = prepare(cfg)
    store, model, dtype = inputs.store, inputs.model, inputs.dtype
    log = StageLog()
    dense = dense_stages(cfg.dense, inputs, log)
    timed = log.run

    zs_directory = data.data_dir(cfg.dense.data_dir)
    zs_tasks = zeroshot.available(cfg.zeroshot.tasks, zs_directory)[0]
    zs_digest = zeroshot.data_digest(zs_tasks, zs_directory)

    def zero_shot(name: str, source: ModelSource, model_digest: str, masks=None):
        """Zero-shot accuracies of one model, or None when no tasks were asked for."""
        if not cfg.zeroshot.tasks:
            return None
        spec = zeroshot.ZeroShotSpec(model_digest, zs_digest, cfg.zeroshot.tasks,
                                     cfg.zeroshot.limit, cfg.zeroshot.batch_size, dtype)
        return timed(f"zeroshot-{name}", lambda: run_stage(
            zeroshot_task, spec, store, model=source,
            data_dir=cfg.dense.data_dir, device=str(inputs.device), masks=masks))

    zs = {"dense": zero_shot("dense", model, model.digest)}
    activations = dense["activations"]
    mask_spec = mask_spec_for(cfg, model.digest, activations["key"], dtype)
    masks = timed("masks", lambda: run_stage(
        masks_task, mask_spec, store, model=model, activations=activations,
        device=str(inputs.device)))

    pruned_spec = replace(dense["perplexity_spec"],
                          model_digest=digest_json([model.digest, masks["key"]]))
    pruned_ppl = timed("perplexity-pruned", lambda: run_stage(
        perplexity_task, pruned_spec, store, model=model,
        data_dir=cfg.dense.data_dir, device=str(inputs.device), masks=masks))
    zs["pruned"] = zero_shot("pruned", model, pruned_spec.model_digest, masks)

    blocks: list[dict] = []
    last_key = None
    records, ebft_time = [], None
    if cfg.finetune == "ebft":
        n_blocks = load_config_layers(model)
        pattern = mask_spec.parsed_pattern()
        specs = ebft.chain(n_blocks, model_digest=model.digest, activations_key=activations["key"],
                           masks_key=masks["key"], train=cfg.train, nm_m=pattern.m, dtype=dtype,
                           io_batch_size=cfg.dense.batch_size)
        t0 = time.monotonic()
        block_states = []
        for spec in specs:
            state = run_stage(block_task, spec, store, model=model, activations=activations,
                              masks=masks, device=str(inputs.device), chain=specs,
                              keep_boundaries=cfg.keep_boundaries)
            block_states.append(state)
            blocks.append(state.result())
        log.record("ebft", block_states, time.monotonic() - t0)
        last_key = specs[-1].key()
        records = [ebft.read_record(Artifact(**b)) for b in blocks]
        ebft_time = training_share(records, block_states, log.seconds["ebft"])
        if not cfg.keep_boundaries:
            store.delete("ebft-boundary", last_key)

    lora_artifact, lora_record = None, None
    if cfg.finetune == "lora":
        lora_spec = lora.LoraSpec(model.digest, masks["key"], dense["calibration"]["key"],
                                  cfg.lora, dtype)
        lora_artifact = timed("lora", lambda: run_stage(
            lora_task, lora_spec, store, model=model, masks=masks,
            calib=dense["calibration"], device=str(inputs.device)))
        lora_record = lora.read_record(Artifact(**lora_artifact))

    save_dtype = dtype if cfg.save_dtype == "auto" else cfg.save_dtype
    assembly_spec = assembly.AssemblySpec(model.digest, masks["key"], last_key, save_dtype,
                                          lora_artifact["key"] if lora_artifact else None,
                                          cfg.form)
    final = timed("assembly", lambda: run_stage(
        assembly_task, assembly_spec, store, model=model, masks=masks,
        blocks=blocks, pattern_spec=mask_spec, lora_artifact=lora_artifact))
    tuned_ppl = None
    if cfg.finetune != "none":
        final_source = assembly.as_model_source(Artifact(**final), f"{model.name} {cfg.finetune}")
        ppl_spec = replace(dense["perplexity_spec"], model_digest=final["digest"])
        tuned_ppl = timed("perplexity-finetuned", lambda: run_stage(
            perplexity_task, ppl_spec, store, model=final_source,
            data_dir=cfg.dense.data_dir, device=str(inputs.device)))
        zs["finetuned"] = zero_shot("finetuned", final_source, final["digest"])

    report = {
        "config": asdict(cfg), "model": asdict(model), "device": str(inputs.device),
        "dtype": dtype, "calibration": dense["calibration"], "activations": activations,
        "masks": masks, "mask_report": mask_summary(Artifact(**masks)),
        "model_folder": final["path"], "blocks": records, "lora": lora_record,
        "perplexity": {"dense": dense["perplexity"], "pruned": pruned_ppl,
                       "finetuned": tuned_ppl},
        "zeroshot": zs if cfg.zeroshot.tasks else None,
        "states": log.states, "seconds": log.seconds, "usage": log.usage,
        "ebft_time": ebft_time,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    report["report_path"] = write_report(store, cfg, report)
    return report


def training_share(records: list[dict], states: list, stage_seconds: float) -> dict | None:
    """How much of the EBFT stage the blocks computed in this run spent training (their
    loops), and the rest: loading, boundary I/O, forward passes for the next inputs."""
    trained = [r["seconds"] for r, s in zip(records, states, strict=True)
               if s.name == "Completed"]
    if not trained:
        return None
    training = sum(trained)
    return {"blocks": len(trained), "stage_seconds": stage_seconds,
            "training_seconds": round(training, 1),
            "non_training_share": round(max(0.0, 1 - training / max(stage_seconds, 1e-9)), 3)}


def mask_summary(masks: Artifact) -> dict:
    import json
    from pathlib import Path

    report = json.loads((Path(masks.path) / pruning.REPORT_FILE).read_text())
    return {k: v for k, v in report.items() if k != "layers"}


def write_report(store: Store, cfg: RunConfig, report: dict) -> str:
    """The machine-readable run report, replaced atomically on every run of this config."""
    with store.writing("reports", cfg.key(), replace=True) as tmp:
        store.write_json(tmp, "report.json", report)
    return str(store.path("reports", cfg.key()) / "report.json")


def load_config_layers(model: ModelSource) -> int:
    from flows.dense import load_model_config

    return int(load_model_config(model)["num_hidden_layers"])
