"""Assembly: the pruned (and fine-tuned) model as a standard Hugging Face folder.

The model is rebuilt one block at a time from its files: each block's linear weights are
replaced by the fine-tuned ones (EBFT's blocks or LoRA's merged projections; else the mask
stage's, with the zeros applied) and written to safetensors shards named and indexed as
``save_pretrained`` names them, with the config and tokenizer: no mask tensors, no custom
code, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it
anywhere. FLAP's compensation biases are saved as the projections' biases (zeros on the
others), and ``form="compact"`` saves structured masks as a physically narrower model
(``stages.masks.structured.shrink``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

import stages.model.architecture as arch
from stages.masks import Pattern, structured
from stages.masks.mask_files import (
    MaskFiles,
    apply_masks,
    layer_rows,
    load_biases,
    load_masks,
    sparsity_report,
    summarize,
)
from stages.model.model_source import ModelSource, load_model, load_tokenizer
from stages.model.streaming import BlockLoader
from stages.recovery import lora
from stages.recovery.ebft import load_block_weights
from stages.stage import Spec, Stage
from store import Artifact, write_json


@dataclass(frozen=True)
class AssemblySpec(Spec):
    model_digest: str
    masks_key: str
    blocks_key: str | None  # the fine-tuned blocks (ebft.blocks_key); None: the pruned model
    dtype: str  # the dtype the weights are saved in
    lora_key: str | None  # LoRA's merged projections, instead of EBFT's blocks
    form: str  # masked, or compact: structured masks as a narrower model


SHARD_BYTES = 1 << 30  # output shards of at most about 1 GiB, named as transformers names them


def build(spec: AssemblySpec, out: Path, model: ModelSource, masks: Artifact,
          blocks: list[Artifact], pattern: Pattern, lora_artifact: Artifact | None = None) -> None:
    """Write the final model folder (plus ``sparsity.json``) one block at a time: each block
    is read from the model's files, given its masks (new weights, biases, zeros), then its
    fine-tuned weights (EBFT's block, or LoRA's merged projections), and written to the
    output shards. Only ``--form compact`` loads the whole model: it narrows every layer to
    the widest kept one, which is known after all blocks."""
    from stages.model.devices import DTYPES

    if spec.form == "compact":
        return build_compact(spec, out, model, masks, blocks, pattern, lora_artifact)
    loader = BlockLoader(model.path, torch.float32)
    if blocks and len(blocks) != loader.n_blocks:  # EBFT: one artifact per block, no fewer
        raise ValueError(f"{len(blocks)} EBFT block artifacts for {loader.n_blocks} blocks")
    mask_files, dtype = MaskFiles(masks), DTYPES[spec.dtype]
    with_biases = mask_files.has_biases  # FLAP's compensation: every projection gets one
    writer = ShardWriter(out)
    blocks_prefix = loader.prefix.removesuffix("0.")
    writer.add({name: tensor for name, tensor in loader.outside_blocks(dtype).items()
                if not (name == "lm_head.weight"
                        and getattr(loader.config, "tie_word_embeddings", False))})
    rows = []
    # each block's own sparsity (OWL varies it), for the check of its layers
    sparsities = mask_files.report().get("layer_sparsity", {}).get("block_sparsity")
    for index in range(loader.n_blocks):
        block = loader.block(index)
        mask_files.apply(block, index)
        if blocks:
            load_block_weights(block, blocks[index])
        if lora_artifact is not None:
            lora.load_block(block, index, lora_artifact)
        linears = arch.linear_layers(block)
        # Structured: the masks say which heads/channels went; the weights alone cannot (a
        # kept weight may be exactly zero, e.g. after 4-bit dequantization).
        keep = {f"{index}.{name}": mask_files.keep(f"{index}.{name}") if pattern.structured
                else linear.weight.detach() != 0 for name, linear in linears.items()}
        block_pattern = replace(pattern, sparsity=sparsities[index]) if sparsities else pattern
        rows += layer_rows(keep, block_pattern)
        if with_biases:
            structured.give_biases(block)
        writer.add({f"{blocks_prefix}{index}.{name}": tensor.to(dtype)
                    for name, tensor in block.state_dict().items()})
    parameters = writer.finish()
    config = loader.config
    config.dtype = dtype
    if with_biases:
        config.attention_bias = config.mlp_bias = True
    config.save_pretrained(out)
    if (Path(model.path) / "generation_config.json").is_file():
        shutil.copy(Path(model.path) / "generation_config.json", out)
    load_tokenizer(model).save_pretrained(out)
    summary = {k: v for k, v in summarize(rows, pattern).items() if k != "layers"}
    write_json(out, "sparsity.json", {**summary, "form": spec.form, "parameters": parameters})


class ShardWriter:
    """Tensors written to safetensors shards of at most ``SHARD_BYTES`` as they come, then
    named and indexed as ``save_pretrained`` does (one file: ``model.safetensors``)."""

    def __init__(self, out: Path) -> None:
        self.out, self.pending, self.files, self.where = out, {}, [], {}
        self.total = self.parameters = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor.contiguous()
            self.total += tensor.numel() * tensor.element_size()
            self.parameters += tensor.numel()
            if sum(t.numel() * t.element_size() for t in self.pending.values()) >= SHARD_BYTES:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            path = self.out / f"shard-{len(self.files)}.safetensors"
            save_file(self.pending, str(path), metadata={"format": "pt"})
            self.files.append((path, list(self.pending)))
            self.pending = {}

    def finish(self) -> int:
        """Name the shards, write the index when there are several; returns the parameters."""
        self._flush()
        count = len(self.files)
        for number, (path, names) in enumerate(self.files, 1):
            name = "model.safetensors" if count == 1 else \
                f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.out / name)
            self.where |= dict.fromkeys(names, name)
        if count > 1:
            write_json(self.out, "model.safetensors.index.json",
                       {"metadata": {"total_size": self.total}, "weight_map": self.where})
        return self.parameters


def build_compact(spec: AssemblySpec, out: Path, model: ModelSource, masks: Artifact,
                  blocks: list[Artifact], pattern: Pattern,
                  lora_artifact: Artifact | None) -> None:
    """The whole model, narrowed (``structured.shrink``) and saved."""
    from stages.model.devices import DTYPES

    dense = load_model(model, torch.float32)
    apply_masks(dense, masks)
    keep = load_masks(masks)
    if blocks:
        for block, artifact in zip(arch.decoder_blocks(dense), blocks, strict=True):
            load_block_weights(block, artifact)
    if lora_artifact is not None:
        lora.load_into(dense, lora_artifact)
    report = sparsity_report(keep, pattern)
    if load_biases(masks):
        structured.make_biases_loadable(dense)
    dense = structured.shrink(dense, keep)
    dense.to(DTYPES[spec.dtype])
    summary = {k: v for k, v in report.items() if k != "layers"}
    summary.update(form=spec.form, parameters=sum(p.numel() for p in dense.parameters()))
    dense.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    write_json(out, "sparsity.json", summary)


STAGE = Stage("models-sparse", build)


def as_model_source(artifact: Artifact, name: str) -> ModelSource:
    return ModelSource(name, artifact.path, artifact.digest)
