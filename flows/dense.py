"""Dense pipeline: calibration → dense activation capture → Wikitext-2 perplexity."""

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from prefect import flow, task

from flows.caching import cached_stage, read_result, run_stage
from stages import architecture as arch
from stages import calibration, capture, data, zeroshot
from stages import perplexity as ppl
from stages.devices import resolve_device, resolve_dtype
from stages.model_source import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_model,
    tokenizer_digest,
)
from store import Artifact, Store


@dataclass(frozen=True)
class DenseConfig:
    model: str = "smollm2-135m"
    store: str = ".ebft-store"
    data_dir: str | None = None
    nsamples: int = 256
    seqlen: int = 1024
    seed: int = 0
    eval_seqlen: int = 2048
    eval_windows: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8


@task(name="calibration")
@cached_stage("calibration")
def calibration_task(spec: calibration.CalibrationSpec, store_root: str, model: ModelSource,
                     data_dir: str | None) -> dict:
    texts = data.c4_documents(data.data_dir(data_dir)).texts
    return calibration.build(Store(store_root), spec, texts, load_tokenizer(model)).to_dict()


@task(name="dense-capture")
@cached_stage("activations")
def capture_task(spec: capture.CaptureSpec, store_root: str, model: ModelSource,
                 calib: dict, device: str) -> dict:
    return capture.build(Store(store_root), spec, partial(load_model, model), Artifact(**calib),
                         resolve_device(device)).to_dict()


@task(name="perplexity")
@cached_stage("perplexity", read_result)
def perplexity_task(spec: ppl.PerplexitySpec, store_root: str, model: ModelSource,
                    data_dir: str | None, device: str, masks: dict | None = None) -> dict:
    """Perplexity of a model folder, or of the dense model with a mask artifact applied."""
    text = data.wikitext2_test(data.data_dir(data_dir)).texts[0]
    loader = partial(load_model, model)
    if masks is not None:
        loader = partial(_masked_model, model, Artifact(**masks))
    return ppl.evaluate(Store(store_root), spec, loader, text, load_tokenizer(model),
                        resolve_device(device))


@task(name="zeroshot")
@cached_stage("zeroshot", read_result)
def zeroshot_task(spec: zeroshot.ZeroShotSpec, store_root: str, model: ModelSource,
                  data_dir: str | None, device: str, masks: dict | None = None) -> dict:
    """Zero-shot accuracies (lm-eval) of a model folder, or of the dense model with masks."""
    loader = partial(load_model, model)
    if masks is not None:
        loader = partial(_masked_model, model, Artifact(**masks))
    return zeroshot.build(Store(store_root), spec, loader, load_tokenizer(model),
                          data.data_dir(data_dir), resolve_device(device))


def _masked_model(model: ModelSource, masks: Artifact, dtype: torch.dtype):
    from stages.pruning import apply_masks

    loaded = load_model(model, dtype)
    apply_masks(loaded, masks)
    return loaded


class Inputs(NamedTuple):
    store: Store
    directory: Path | None
    device: torch.device
    dtype: str
    model: ModelSource


def prepare_dense(cfg: DenseConfig) -> Inputs:
    """Resolve and check every input; raises UserError before any stage runs."""
    store = Store(cfg.store)
    directory = data.data_dir(cfg.data_dir)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    model = resolve_model(cfg.model, store)
    context = load_model_config(model).get("max_position_embeddings")
    calibration.validate(cfg.nsamples, cfg.seqlen, context)
    calibration.validate(1, cfg.eval_seqlen, context, "--eval-seqlen")
    arch.decoder_blocks(meta_model(model))  # a model without decoder blocks fails here
    return Inputs(store, directory, device, dtype, model)


def meta_model(model: ModelSource):
    """The model's modules without weights (meta device): its shapes, for checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model.path))


prepare = prepare_dense


def dense_stages(cfg: DenseConfig, inputs: Inputs) -> dict:
    """The stages every configuration of one model and calibration set shares."""
    store, directory, device, dtype, model = inputs
    timings: dict[str, float] = {}
    states: dict[str, str] = {}

    def timed(name: str, state_fn) -> dict:
        t0 = time.monotonic()
        state = state_fn()
        timings[name], states[name] = round(time.monotonic() - t0, 1), state.name
        return state.result()

    c4_digest = data.c4_documents(directory).digest
    wiki_digest = data.wikitext2_test(directory).digest
    calib_spec = calibration.CalibrationSpec(c4_digest, tokenizer_digest(model), cfg.nsamples,
                                             cfg.seqlen, cfg.seed)
    calib = timed("calibration", lambda: run_stage(
        calibration_task, calib_spec, store, model=model, data_dir=cfg.data_dir))
    capture_spec = capture.CaptureSpec(model.digest, calib["key"], dtype, cfg.batch_size)
    activations = timed("dense-capture", lambda: run_stage(
        capture_task, capture_spec, store, model=model, calib=calib,
        device=str(device)))
    ppl_spec = ppl.PerplexitySpec(model.digest, wiki_digest, cfg.eval_seqlen, cfg.eval_windows,
                                  dtype)
    dense_ppl = timed("perplexity", lambda: run_stage(
        perplexity_task, ppl_spec, store, model=model, data_dir=cfg.data_dir,
        device=str(device)))
    return {"calibration": calib, "activations": activations, "perplexity": dense_ppl,
            "perplexity_spec": ppl_spec, "states": states, "seconds": timings}


@flow(name="ebft-dense")
def dense_flow(cfg: DenseConfig) -> dict:
    inputs = prepare_dense(cfg)
    result = dense_stages(cfg, inputs)
    return {
        "config": asdict(cfg), "model": asdict(inputs.model), "device": str(inputs.device),
        "dtype": inputs.dtype, "calibration": result["calibration"],
        "activations": result["activations"], "perplexity": result["perplexity"],
        "states": result["states"],
    }


def load_model_config(model: ModelSource) -> dict:
    import json

    return json.loads((Path(model.path) / "config.json").read_text())
