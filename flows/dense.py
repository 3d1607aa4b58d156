"""Dense pipeline: calibration → dense activation capture → Wikitext-2 perplexity."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from prefect import flow, task

from flows.caching import run_stage
from stages import calibration, capture, data
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
def calibration_task(spec: calibration.CalibrationSpec, store_root: str, model: ModelSource,
                     data_dir: str | None) -> dict:
    texts = data.c4_documents(data.data_dir(data_dir)).texts
    return calibration.build(Store(store_root), spec, texts, load_tokenizer(model)).to_dict()


@task(name="dense-capture")
def capture_task(spec: capture.CaptureSpec, store_root: str, model: ModelSource,
                 calib: dict, device: str) -> dict:
    return capture.build(Store(store_root), spec, partial(load_model, model), Artifact(**calib),
                         resolve_device(device)).to_dict()


@task(name="perplexity")
def perplexity_task(spec: ppl.PerplexitySpec, store_root: str, model: ModelSource,
                    data_dir: str | None, device: str) -> dict:
    text = data.wikitext2_test(data.data_dir(data_dir)).texts[0]
    return ppl.evaluate(Store(store_root), spec, partial(load_model, model), text,
                        load_tokenizer(model), resolve_device(device))


class Inputs(NamedTuple):
    store: Store
    directory: Path | None
    device: torch.device
    dtype: str
    model: ModelSource


def prepare(cfg: DenseConfig) -> Inputs:
    """Resolve and check every input; raises UserError before any stage runs."""
    store = Store(cfg.store)
    directory = data.data_dir(cfg.data_dir)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    model = resolve_model(cfg.model, store)
    context = load_model_config(model).get("max_position_embeddings")
    calibration.validate(cfg.nsamples, cfg.seqlen, context)
    calibration.validate(1, cfg.eval_seqlen, context, "--eval-seqlen")
    return Inputs(store, directory, device, dtype, model)


@flow(name="ebft-dense")
def dense_flow(cfg: DenseConfig) -> dict:
    store, directory, device, dtype, model = prepare(cfg)
    c4_digest = data.c4_documents(directory).digest
    wiki_digest = data.wikitext2_test(directory).digest

    calib_spec = calibration.CalibrationSpec(c4_digest, tokenizer_digest(model), cfg.nsamples,
                                             cfg.seqlen, cfg.seed)
    calib_state = run_stage(calibration_task, "calibration", store, calib_spec, model=model,
                            data_dir=cfg.data_dir)
    calib = Artifact(**calib_state.result())

    capture_spec = capture.CaptureSpec(model.digest, calib.key, dtype, cfg.batch_size)
    capture_state = run_stage(capture_task, "activations", store, capture_spec, model=model,
                              calib=calib.to_dict(), device=str(device))
    ppl_spec = ppl.PerplexitySpec(model.digest, wiki_digest, cfg.eval_seqlen, cfg.eval_windows,
                                  dtype)
    ppl_state = run_stage(perplexity_task, "perplexity", store, ppl_spec, model=model,
                          data_dir=cfg.data_dir, device=str(device))
    return {
        "config": asdict(cfg), "model": asdict(model), "device": str(device), "dtype": dtype,
        "calibration": calib.to_dict(), "activations": capture_state.result(),
        "perplexity": ppl_state.result(),
        "states": {"calibration": calib_state.name, "dense-capture": capture_state.name,
                   "perplexity": ppl_state.name},
    }


def load_model_config(model: ModelSource) -> dict:
    import json

    return json.loads((Path(model.path) / "config.json").read_text())
