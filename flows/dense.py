"""Dense pipeline: calibration → dense activation capture → Wikitext-2 perplexity."""

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from prefect import flow

from flows.caching import StageLog, run_stage
from flows.config import DenseConfig
from stages import checks
from stages.errors import UserError
from stages.evaluation import perplexity as ppl
from stages.inputs import calibration, capture, data
from stages.model.devices import resolve_device, resolve_dtype
from stages.model.model_source import (
    ModelSource,
    declared_context,
    load_tokenizer,
    meta_model,
    resolve_model,
    tokenizer_digest,
)
from stages.recovery.distill import DistillSettings
from store import Store
from store.remote import is_url


class Inputs(NamedTuple):
    store: Store
    directory: Path | None
    device: torch.device
    dtype: str
    model: ModelSource


def prepare_dense(cfg: DenseConfig, whole_model: bool = False,
                  distill: DistillSettings | None = None) -> Inputs:
    """Resolve and check every input, cheapest first; raises a one-line UserError before
    any stage runs, and writes nothing to the store (the default model's one-time
    conversion goes to this machine's cache)."""
    check_dense_flags(cfg)
    whole_model = whole_model or cfg.calibration == "generated"  # generation holds it all
    store = Store(cfg.store)
    directory = data.data_dir(cfg.data_dir)
    c4, wiki = data.c4_documents(directory), data.eval_corpus(cfg.eval_data, directory)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    context = declared_context(cfg.model)  # before the default model is converted
    calibration.validate(cfg.nsamples, cfg.seqlen, context)
    calibration.validate(1, cfg.eval_seqlen, context, "--eval-seqlen")
    model = resolve_model(cfg.model)
    config = checks.model_config(Path(model.path))
    context = config.get("max_position_embeddings")
    calibration.validate(cfg.nsamples, cfg.seqlen, context)
    calibration.validate(1, cfg.eval_seqlen, context, "--eval-seqlen")
    meta = meta_model(model)
    checks.check_blocks(meta)
    tokenizer = load_tokenizer(model)
    if ppl.window_count(wiki, tokenizer, cfg.eval_seqlen) < 1:
        raise UserError(f"{wiki.source} has fewer than --eval-seqlen {cfg.eval_seqlen} tokens: "
                        "not one perplexity window; lower --eval-seqlen or restore the file")
    calib_spec = calibration_spec(cfg, c4.digest, model, device, dtype)
    if store.get("calibration", calib_spec.key()) is None:
        calibration.check_corpus(c4.texts, c4.digest, tokenizer, cfg.seqlen)
    capture_spec = capture.CaptureSpec(model.digest, calib_spec.key(), dtype, cfg.batch_size)
    check_resources(cfg, store, meta, dtype,
                    capture_stored=store.get("activations", capture_spec.key()) is not None,
                    whole_model=whole_model)
    if distill:
        check_distill_memory(cfg, meta, device, distill.top)
    return Inputs(store, directory, device, dtype, model)


def calibration_spec(cfg: DenseConfig, c4_digest: str, model, device,
                     dtype: str) -> calibration.CalibrationSpec:
    generated = cfg.calibration == "generated"
    return calibration.CalibrationSpec(c4_digest, tokenizer_digest(model), cfg.nsamples,
                                       cfg.seqlen, cfg.seed, cfg.calibration,
                                       model.digest if generated else "",
                                       f"{device.type}/{dtype}" if generated else "")


def check_dense_flags(cfg: DenseConfig) -> None:
    """The numbers and the store's location: checks that need nothing loaded."""
    if cfg.calibration not in calibration.SOURCES:
        raise UserError(f"--calibration {cfg.calibration!r}: choose "
                        f"{' or '.join(calibration.SOURCES)}")
    if cfg.calibration == "generated" and cfg.seqlen <= calibration.GENERATED_PREFIX:
        raise UserError(f"--seqlen {cfg.seqlen}: a generated window starts with "
                        f"{calibration.GENERATED_PREFIX} C4 tokens, so it must be longer")
    if cfg.eval_data not in data.EVAL_CORPORA:
        raise UserError(f"--eval-data {cfg.eval_data!r}: choose one of "
                        f"{', '.join(data.EVAL_CORPORA)}")
    for flag, value in (("--batch-size", cfg.batch_size), ("--eval-windows", cfg.eval_windows)):
        checks.positive(flag, value)
    checks.positive("--seed", cfg.seed, allow_zero=True)
    calibration.validate(cfg.nsamples, cfg.seqlen, None)
    calibration.validate(1, cfg.eval_seqlen, None, "--eval-seqlen")
    if is_url(cfg.store):  # reachable, credentials accepted, bucket there: one probe object
        Store(cfg.store).remote.check()
        return
    checks.store_location(Path(cfg.store).expanduser())
    if not Path(cfg.store).expanduser().is_absolute() and deployment_run():
        raise UserError(f"store {cfg.store!r} is relative, and a worker runs each flow in a "
                        "temporary folder: set EBFT_STORE on the worker to an absolute folder "
                        "every worker of the pool sees")


def deployment_run() -> bool:
    """Whether this flow run was started from a deployment (by a worker)."""
    try:
        from prefect.runtime import deployment

        return deployment.id is not None
    except Exception:  # noqa: BLE001 - outside Prefect: not a deployment run
        return False


def check_resources(cfg: DenseConfig, store: Store, meta, dtype: str, capture_stored: bool,
                    whole_model: bool = False) -> None:
    """Disk for the capture (unless stored), boundaries, masks and the saved model. Memory
    for what is held at once: the stages read one block at a time, so one block in training
    (fp32 weights, gradients and AdamW's two moments) and the embeddings and head; the whole
    model instead when a stage needs it (``whole_model``: LoRA, zero-shot, compact form); plus the calibration tokens and a batch of
    activations."""
    import stages.model.architecture as arch

    config = meta.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    window = cfg.nsamples * cfg.seqlen * hidden * 2  # one boundary, 16-bit
    params = sum(p.numel() for p in meta.parameters())
    weight_bytes = params * (4 if dtype == "float32" else 2)
    block = sum(p.numel() for p in arch.decoder_blocks(meta)[0].parameters())
    held = weight_bytes if whole_model else \
        4 * block * 4 + (params - layers * block) * (4 if dtype == "float32" else 2)
    disk = (0 if capture_stored else (layers + 1) * window) + 4 * window + 2 * weight_bytes
    memory = held + cfg.nsamples * cfg.seqlen * 8 + \
        8 * cfg.batch_size * cfg.seqlen * max(hidden, config.intermediate_size) * 4
    checks.resources(store.root, disk, memory)


def distill_bytes(cfg: DenseConfig, meta, top: float = 1.0) -> int:
    """What distillation holds at once: the student in fp32; its trained blocks' gradients,
    AdamW's two moments and 0/1 gates (16 bytes a weight more); what the backward pass keeps
    of one window (per trained block about ten hidden-sized and four MLP-sized values a
    token, in fp32 at most); and the window's logits in fp32 (the student's, the teacher's,
    their gradient and a copy)."""
    import stages.model.architecture as arch
    from stages.recovery.distill import trained_blocks

    config = meta.config
    params = sum(p.numel() for p in meta.parameters())
    trained = trained_blocks(arch.decoder_blocks(meta), top)
    blocks = sum(p.numel() for block in trained for p in block.parameters())
    saved = 4 * len(trained) * cfg.seqlen * (
        10 * config.hidden_size + 4 * config.intermediate_size)
    return 4 * params + 16 * blocks + saved + 4 * 4 * cfg.seqlen * config.vocab_size


def check_distill_memory(cfg: DenseConfig, meta, device: torch.device,
                         top: float = 1.0) -> None:
    """Distillation holds the whole model and trains its top ``top`` share of the blocks
    at once, unlike every other stage: refuse a model the device cannot hold before any
    stage runs, naming the ways out (the block pass alone needs one block at a time)."""
    need = distill_bytes(cfg, meta, top)
    if device.type == "cuda":  # what PyTorch's allocator holds unused is free for it too
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        # the checkpoint is read into host memory in fp32, then moved to the device
        host = 4 * sum(p.numel() for p in meta.parameters())
        places = [(device, need, free), ("the host", host, checks.available_memory())]
    elif device.type == "cpu":
        places = [(device, need, checks.available_memory())]
    else:
        return  # no way to ask (mps shares the host's memory)
    for where, needed, free in places:
        # fewer trained blocks need less on the device; the load needs the whole model
        smaller = "" if where == "the host" else ", or a smaller --distill-top"
        if needed > free:
            raise UserError(f"distillation (--distill-epochs) needs about {checks.gib(needed)} "
                            f"on {where} and {checks.gib(free)} is free; pass "
                            "--distill-epochs 0 to skip it (the block pass needs one block "
                            f"at a time){smaller}")


prepare = prepare_dense


def dense_stages(cfg: DenseConfig, inputs: Inputs, log: StageLog) -> dict:
    """The stages every configuration of one model and calibration set shares."""
    store, directory, device, dtype, model = inputs
    store.remove_abandoned()  # half-written artifacts of killed runs
    timed = log.run

    c4_digest = data.c4_documents(directory).digest
    wiki_digest = data.eval_corpus(cfg.eval_data, directory).digest
    calib_spec = calibration_spec(cfg, c4_digest, model, device, dtype)
    calib = timed("calibration", lambda: run_stage(
        calibration.STAGE, calib_spec, store, model=model, data_dir=cfg.data_dir,
        device=str(device)))
    capture_spec = capture.CaptureSpec(model.digest, calib.key, dtype, cfg.batch_size)
    activations = timed("dense-capture", lambda: run_stage(
        capture.STAGE, capture_spec, store, model=model, calibration=calib,
        device=str(device)))
    ppl_spec = ppl.PerplexitySpec(model.digest, wiki_digest, cfg.eval_seqlen, cfg.eval_windows,
                                  dtype)
    dense_ppl = timed("perplexity", lambda: run_stage(
        ppl.STAGE, ppl_spec, store, model=model, data_dir=cfg.data_dir, device=str(device),
        eval_data=cfg.eval_data))
    return {"calibration": calib, "activations": activations, "perplexity": dense_ppl}


@flow(name="ebft-dense")
def dense_flow(cfg: DenseConfig) -> dict:
    inputs = prepare_dense(cfg)
    log = StageLog(inputs.store)
    result = dense_stages(cfg, inputs, log)
    return {
        "config": asdict(cfg), "model": asdict(inputs.model), "device": str(inputs.device),
        "dtype": inputs.dtype, "calibration": result["calibration"].to_dict(),
        "activations": result["activations"].to_dict(), "perplexity": result["perplexity"],
        "states": log.states, "seconds": log.seconds, "usage": log.usage,
    }
