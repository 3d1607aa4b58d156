"""The main job: calibration → dense capture → masks → EBFT per block (or LoRA) → assembly →
perplexity.

Thin on purpose: every step is a stage function from ``stages/`` wrapped in a cached task
(``flows.caching.run_stage``); this file only wires them in the order of the pipeline and
collects a run report.
"""

import functools
import time
from dataclasses import asdict

from prefect import flow

from flows.caching import StageLog, here, run_stage, submit_stage
from flows.config import DenseConfig, PruneConfig, RunConfig, ZeroShotConfig, settled
from flows.dense import Inputs, check_dense_flags, dense_stages, prepare_dense
from stages.errors import UserError
from stages.evaluation import perplexity as ppl
from stages.evaluation import zeroshot
from stages.inputs import data
from stages.masks import pruning
from stages.model import assembly
from stages.model.devices import DTYPES
from stages.model.model_source import ModelSource
from stages.recovery import distill, ebft, lora
from stages.recovery.block_training import TrainConfig
from stages.recovery.handover import HANDOVER
from stages.recovery.lora import LoraSettings
from store import Artifact, Store, digest_json, write_json

__all__ = ["DenseConfig", "LoraSettings", "PruneConfig", "RunConfig", "TrainConfig",
           "ZeroShotConfig", "prepare", "run_flow"]

FINETUNES = ("none", "ebft", "lora")
FORMS = ("masked", "compact")


# ---- checking the configuration before anything runs --------------------------------------

def prepare(cfg: RunConfig) -> Inputs:
    """Resolve and check every input; raises a one-line UserError before any stage runs.
    The flags first (cheap, and so that a bad flag is named, not what it breaks), then the
    model, data and resources (prepare_dense), then what needs the model's shapes."""
    cfg = settled(cfg)
    check_dense_flags(cfg.dense)
    if cfg.finetune not in FINETUNES:
        raise UserError(f"--finetune {cfg.finetune!r}: choose one of {', '.join(FINETUNES)}")
    if cfg.save_dtype not in ("auto", *DTYPES):
        raise UserError(f"--save-dtype {cfg.save_dtype!r}: choose auto, {', '.join(DTYPES)}")
    if cfg.form not in FORMS:
        raise UserError(f"--form {cfg.form!r}: choose {' or '.join(FORMS)}")
    if cfg.runner.workers < 1:
        raise UserError(f"--workers {cfg.runner.workers}: must be at least 1")
    if cfg.keep_boundaries and not cfg.write_boundaries:
        raise UserError("--keep-boundaries keeps what --no-boundary-writes does not write: "
                        "use one of the two")
    mask_spec = mask_spec_for(cfg, "model", "activations", "float32")
    pruning.validate(mask_spec)
    cfg.train.validate(cfg.dense.nsamples)
    cfg.lora.validate()
    cfg.distill.validate()
    if cfg.form == "compact" and not mask_spec.structured:
        raise UserError(f"--form compact needs whole heads and channels removed (--method "
                        f"flap); {cfg.prune.method} zeros single weights, so use --form masked")
    if mask_spec.structured and cfg.finetune == "ebft" and cfg.train.tune == "mask":
        raise UserError("--tune mask reselects single weights and would break whole-head "
                        "structure; use --tune weights with --method flap")
    if mask_spec.structured and cfg.finetune == "ebft" and cfg.train.remask:
        raise UserError(f"--remask chooses single weights block by block; --method "
                        f"{cfg.prune.method} removes whole heads and channels of the whole "
                        "model at once: drop --remask")
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
    # LoRA (peft), zero-shot (lm-eval) and the compact form hold the whole model at once
    whole = cfg.finetune == "lora" or bool(cfg.zeroshot.tasks) or cfg.form == "compact"
    distilled = cfg.distill.epochs > 0  # settled: 0 with --finetune none
    inputs = prepare_dense(cfg.dense, whole_model=whole or distilled,
                           distill=cfg.distill if distilled else None)
    pattern = mask_spec.parsed_pattern()
    if pattern.is_nm:
        check_layers_fit(inputs.model, pattern)
    if mask_spec.structured:
        check_structured(inputs.model, cfg.prune.flap.bias)
    if cfg.finetune == "ebft" and cfg.train.window == "sublayers":
        check_sublayers(inputs.model)
    return inputs


def check_sublayers(model: ModelSource) -> None:
    """--window sublayers needs the residual stream after attention and linear layers on
    both sides of it; checked on a meta model before anything runs."""
    import stages.model.architecture as arch
    from stages.model.model_source import meta_model

    block = arch.decoder_blocks(meta_model(model))[0]
    arch.attention_end(block)
    names = list(arch.linear_layers(block))
    if not any(n.startswith("self_attn.") for n in names) or all(
            n.startswith("self_attn.") for n in names):
        raise UserError(f"--window sublayers: {type(block).__name__} has no linear layers on "
                        "one side of its attention; use --window block")


def check_structured(model: ModelSource, with_bias: bool) -> None:
    """FLAP's layout needs, checked on a meta model before anything runs."""
    from stages.masks.structured import check_model
    from stages.model.model_source import meta_model

    check_model(meta_model(model), with_bias)


def check_layers_fit(model: ModelSource, pattern) -> None:
    """N:M needs every pruned layer's input size divisible by M; checked on a meta model."""
    import stages.model.architecture as arch
    from stages.masks.core import check_nm_fits
    from stages.model.model_source import meta_model

    for linear in arch.linear_layers(arch.decoder_blocks(meta_model(model))[0]).values():
        check_nm_fits(linear.in_features, pattern)


def mask_spec_for(cfg: RunConfig, model_digest: str, activations_key: str,
                  dtype: str) -> pruning.MaskSpec:
    """The mask stage's spec: the configuration's method, with every registered method's
    parameters (the spec's key keeps only those of the methods it runs)."""
    prune = cfg.prune
    params = {name: asdict(getattr(prune, name)) for name in prune.method.split("+")
              if hasattr(prune, name)}
    return pruning.MaskSpec(model_digest, activations_key, prune.method, prune.sparsity,
                            prune.pattern, prune.mask_inputs, params, prune.layer_sparsity,
                            prune.owl_threshold, prune.owl_limit, dtype,
                            cfg.dense.batch_size)


# ---- the flow ---------------------------------------------------------------------------

@flow(name="ebft-run")
def run_flow(cfg: RunConfig) -> dict:
    started = time.monotonic()
    cfg = settled(cfg)  # the "auto" choices made, so the report shows what ran
    inputs = prepare(cfg)
    run = Run(cfg, inputs, StageLog(inputs.store))
    dense = dense_stages(cfg.dense, inputs, run.log)
    masks = run.masks(dense["activations"])
    pruned_ppl = run.perplexity("perplexity-pruned", inputs.model, masks)
    zeroshot = {"dense": run.zero_shot("dense", inputs.model),
                "pruned": run.zero_shot("pruned", inputs.model, masks)}
    blocks, lora_artifact = [], None
    if cfg.finetune == "ebft":
        blocks = run.ebft_blocks(dense["activations"], masks)
    elif cfg.finetune == "lora":
        lora_artifact = run.lora(masks, dense["calibration"])
    final = run.assembly(masks, blocks, lora_artifact)
    distilled = None
    if cfg.distill.epochs > 0:  # settled: 0 with --finetune none
        final = distilled = run.distill(final, dense)
    tuned_ppl = None
    if cfg.finetune != "none":
        final_model = assembly.as_model_source(final, f"{inputs.model.name} {cfg.finetune}")
        tuned_ppl = run.perplexity("perplexity-finetuned", final_model)
        zeroshot["finetuned"] = run.zero_shot("finetuned", final_model)

    report = {
        "config": asdict(cfg), "model": asdict(inputs.model), "device": str(inputs.device),
        "dtype": inputs.dtype, "calibration": dense["calibration"].to_dict(),
        "activations": dense["activations"].to_dict(), "masks": masks.to_dict(),
        "mask_report": mask_summary(masks), "model_folder": final.path,
        "blocks": [ebft.read_record(b) for b in blocks],
        "lora": lora.read_record(lora_artifact) if lora_artifact else None,
        "distill": distill.read_record(distilled) if distilled else None,
        "perplexity": {"dense": dense["perplexity"], "pruned": pruned_ppl,
                       "finetuned": tuned_ppl},
        "zeroshot": zeroshot if cfg.zeroshot.tasks else None,
        "states": run.log.states, "seconds": run.log.seconds, "usage": run.log.usage,
        "ebft_time": run.ebft_time,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    report["report_path"] = write_report(inputs.store, cfg, report)
    return report


class Run:
    """The stages of one configuration after the dense ones, each a named step that
    builds its spec from the configuration and runs it as a cached stage."""

    def __init__(self, cfg: RunConfig, inputs: Inputs, log: StageLog) -> None:
        self.cfg, self.inputs, self.log = cfg, inputs, log
        self.store, self.model, self.dtype = inputs.store, inputs.model, inputs.dtype
        self.device = str(inputs.device)
        self.mask_spec: pruning.MaskSpec | None = None
        self.blocks_key: str | None = None
        self.ebft_time: dict | None = None

    def masks(self, activations: Artifact) -> Artifact:
        self.mask_spec = mask_spec_for(self.cfg, self.model.digest, activations.key, self.dtype)
        return self.log.run("masks", lambda: run_stage(
            pruning.STAGE, self.mask_spec, self.store, model=self.model,
            activations=activations, device=self.device))

    def perplexity(self, name: str, model: ModelSource, masks: Artifact | None = None) -> dict:
        """Wikitext-2 perplexity of a model folder, or of the dense model with masks."""
        spec = self.perplexity_spec(model, masks)
        return self.log.run(name, lambda: run_stage(
            ppl.STAGE, spec, self.store, model=model, data_dir=self.cfg.dense.data_dir,
            device=self.device, masks=masks, eval_data=self.cfg.dense.eval_data))

    def perplexity_spec(self, model: ModelSource, masks: Artifact | None) -> ppl.PerplexitySpec:
        dense = self.cfg.dense
        return ppl.PerplexitySpec(model_digest(model, masks), self.wikitext_digest,
                                  dense.eval_seqlen, dense.eval_windows, self.dtype)

    @functools.cached_property
    def wikitext_digest(self) -> str:
        dense = self.cfg.dense
        return data.eval_corpus(dense.eval_data, data.data_dir(dense.data_dir)).digest

    @functools.cached_property
    def zeroshot_digest(self) -> str:
        """The digest of the task files present (read once for the three models)."""
        directory = data.data_dir(self.cfg.dense.data_dir)
        present = zeroshot.available(self.cfg.zeroshot.tasks, directory)[0]
        return zeroshot.data_digest(present, directory)

    def zero_shot(self, name: str, model: ModelSource, masks: Artifact | None = None):
        """Zero-shot accuracies of one model, or None when no tasks were asked for."""
        settings = self.cfg.zeroshot
        if not settings.tasks:
            return None
        spec = zeroshot.ZeroShotSpec(model_digest(model, masks), self.zeroshot_digest,
                                     settings.tasks, settings.limit, settings.batch_size,
                                     self.dtype)
        return self.log.run(f"zeroshot-{name}", lambda: run_stage(
            zeroshot.STAGE, spec, self.store, model=model, data_dir=self.cfg.dense.data_dir,
            device=self.device, masks=masks))

    def ebft_blocks(self, activations: Artifact, masks: Artifact) -> list[Artifact]:
        """One cached task per block. Sequential inputs: in order, block l training on block
        l-1's outputs. Dense inputs: every block at once on the flow's task runner
        (threads, Dask, Ray), each on the dense model's inputs from the capture."""
        specs = ebft.chain(load_config_layers(self.model), model_digest=self.model.digest,
                           activations_key=activations.key, masks_key=masks.key,
                           train=self.cfg.train, nm_m=self.mask_spec.parsed_pattern().m,
                           dtype=self.dtype, io_batch_size=self.cfg.dense.batch_size)
        inputs = {"store_location": self.store.location, "model": self.model,
                  "activations": activations, "masks": masks, "device": self.device,
                  "chain": specs, "keep_boundaries": self.cfg.keep_boundaries,
                  "write_boundaries": self.cfg.write_boundaries}
        started = time.monotonic()
        if self.cfg.train.block_inputs == "dense":
            states = self.submitted_together(specs, inputs)
        else:
            try:
                states = [run_stage(ebft.STAGE, spec, self.store, **inputs) for spec in specs]
            finally:  # wait for the background boundary writes; free the hand-over
                HANDOVER.clear(ebft.blocks_key(specs))
        self.log.record("ebft", states, time.monotonic() - started)
        blocks = [here(self.store, state.result()) for state in states]
        self.ebft_time = training_share([ebft.read_record(b) for b in blocks], states,
                                        self.log.seconds["ebft"])
        self.blocks_key = ebft.blocks_key(specs)
        if not self.cfg.keep_boundaries:
            self.store.delete("ebft-boundary", specs[-1].key())
        return blocks

    def submitted_together(self, specs: list, inputs: dict) -> list:
        """Independent blocks on the flow's task runner: all at once on Dask or Ray (the
        cluster schedules them), at most ``runner.workers`` at once on threads."""
        from prefect.context import FlowRunContext
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = FlowRunContext.get().task_runner
        width = self.cfg.runner.workers if isinstance(runner, ThreadPoolTaskRunner) \
            else len(specs)
        futures, states = [], []
        for spec in specs:
            if len(futures) - len(states) >= width:  # wait for the oldest in flight
                futures[len(states)].wait()
                states.append(futures[len(states)].state)
            futures.append(submit_stage(ebft.STAGE, spec, self.store, **inputs))
        for future in futures[len(states):]:
            future.wait()
            states.append(future.state)
        return states

    def lora(self, masks: Artifact, calib: Artifact) -> Artifact:
        spec = lora.LoraSpec(self.model.digest, masks.key, calib.key, self.cfg.lora, self.dtype)
        return self.log.run("lora", lambda: run_stage(
            lora.STAGE, spec, self.store, model=self.model, masks=masks, calibration=calib,
            device=self.device))

    @property
    def save_dtype(self) -> str:
        """The dtype the model folders are saved in: --save-dtype, or the compute dtype."""
        return self.dtype if self.cfg.save_dtype == "auto" else self.cfg.save_dtype

    def distill(self, assembled: Artifact, dense: dict) -> Artifact:
        """The assembled model distilled on the dense model's logits (a new folder)."""
        spec = distill.DistillSpec(dense["activations"].key, assembled.key,
                                   dense["calibration"].key, self.cfg.distill, self.save_dtype)
        return self.log.run("distill", lambda: run_stage(
            distill.STAGE, spec, self.store, activations=dense["activations"],
            student=assembled, calibration=dense["calibration"], device=self.device))

    def assembly(self, masks: Artifact, blocks: list[Artifact],
                 lora_artifact: Artifact | None) -> Artifact:
        spec = assembly.AssemblySpec(self.model.digest, masks.key, self.blocks_key,
                                     self.save_dtype, lora_artifact.key if lora_artifact else None,
                                     self.cfg.form)
        return self.log.run("assembly", lambda: run_stage(
            assembly.STAGE, spec, self.store, model=self.model, masks=masks, blocks=blocks,
            pattern=self.mask_spec.parsed_pattern(), lora_artifact=lora_artifact))


def model_digest(model: ModelSource, masks: Artifact | None) -> str:
    """What identifies the evaluated model: its files, or the dense files and the masks."""
    return model.digest if masks is None else digest_json([model.digest, masks.key])


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

    from stages.masks.mask_files import REPORT_FILE

    report = json.loads((Path(masks.path) / REPORT_FILE).read_text())
    return {k: v for k, v in report.items() if k != "layers"}


def write_report(store: Store, cfg: RunConfig, report: dict) -> str:
    """The machine-readable run report, replaced atomically on every run of this config."""
    with store.writing("reports", cfg.key(), replace=True) as tmp:
        write_json(tmp, "report.json", report)
    return str(store.path("reports", cfg.key()) / "report.json")


def load_config_layers(model: ModelSource) -> int:
    from stages.model.model_source import load_model_config

    return int(load_model_config(model)["num_hidden_layers"])
