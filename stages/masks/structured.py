"""Structured pruning (FLAP) over the whole model, and models that really are smaller.

The mask stage for ``--method flap``: every block is scored on the dense model's own inputs
(read from the shared dense capture, as FLAP scores the unpruned model), then one global
search picks the KV groups and MLP channels to keep (``stages.masks.methods.flap``). The artifact is
the same as every other method's — keep-masks, plus the compensation biases — so
perplexity, EBFT and assembly need nothing special.

``shrink`` turns a masked model into a narrower one that stock ``transformers`` loads:
Llama-style configs have one head count and one MLP width for every layer, so each layer is
cut to the widest layer's kept width, and a layer that kept less is padded with removed
(all-zero) units — exact, because a zero unit adds nothing. With ``--flap-structure UL-UM``
every layer keeps the same width and nothing is padded.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import stages.model.architecture as arch
import store.activations as acts
from stages.errors import UserError
from stages.inputs.capture import ZARR_NAME
from stages.masks.methods import flap
from stages.model.model_source import ModelSource, meta_model
from stages.model.streaming import BlockLoader
from stages.progress import Progress
from store import Artifact, write_json

ATTN_OUT, MLP_OUT = "self_attn.o_proj", "mlp.down_proj"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", ATTN_OUT,
               "mlp.gate_proj", "mlp.up_proj", MLP_OUT)


def layout_of(config) -> flap.Layout:
    """The block layout from a Llama-style config; a one-line error for anything else."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return flap.Layout(config.hidden_size, heads, kv_heads, head_dim, config.intermediate_size)


def check_model(model, with_bias: bool) -> flap.Layout:
    """FLAP needs Llama-style projections; bias compensation needs a config that can save
    biases on every projection (Llama's ``attention_bias`` and ``mlp_bias``)."""
    names = set(arch.linear_layers(arch.decoder_blocks(model)[0]))
    if not set(PROJECTIONS) <= names:
        raise UserError(f"--method flap needs Llama-style blocks with {', '.join(PROJECTIONS)}; "
                        f"this model's block has {', '.join(sorted(names))}")
    if with_bias and not all(hasattr(model.config, a) for a in ("attention_bias", "mlp_bias")):
        raise UserError(f"--method flap: {type(model.config).__name__} cannot save biases on "
                        "every projection, so bias compensation would be lost on saving; "
                        "pass --flap-bias off")
    return layout_of(model.config)


def build(spec, out: Path, source: ModelSource, activations: Artifact, device: str) -> None:
    """Score every block, search the structure, write masks + biases (see module doc);
    the mask stage's build for structured methods (``stages.masks.pruning.build``)."""
    from stages.masks.block_stats import collect_stats
    from stages.masks.mask_files import (
        BIASES_FILE,
        MASKS_FILE,
        REPORT_FILE,
        layer_rows,
        pack,
        save_packed,
        summarize,
    )
    from stages.model.devices import DTYPES, resolve_device

    started = time.monotonic()
    device = resolve_device(device)
    dtype = DTYPES[spec.dtype]
    loader = BlockLoader(source.path, dtype)
    (method,) = spec.methods()
    meta = meta_model(source)  # shapes and parameter counts, no weights
    layout = check_model(meta, method.bias)
    dense = acts.open_group(Path(activations.path) / ZARR_NAME)
    n, seqlen, _ = dense.attrs["shape"]
    kwargs = {}

    def kwargs_for(batch: int) -> dict:
        if batch not in kwargs:
            kwargs[batch] = loader.block_kwargs(batch, seqlen, device, dtype)
        return kwargs[batch]

    ranges = [(s, min(s + spec.batch_size, n)) for s in range(0, n, spec.batch_size)]
    attn, mlp, means = [], [], []
    progress = Progress("masks flap (scoring blocks)", loader.n_blocks)
    for index, block in enumerate(loader.blocks(device)):

        def batches(index=index):
            for start, stop in ranges:
                yield acts.read(dense, index, start, stop).to(device, dtype)

        linears = arch.linear_layers(block)
        outputs = {name: linears[name] for name in (ATTN_OUT, MLP_OUT)}
        stats = {name: s.as_kwargs() for name, s in
                 collect_stats(block, outputs, batches, kwargs_for, hessian=False).items()}
        # scores and means go to the CPU: the search and the biases work on CPU blocks
        attn.append(flap.fluctuation(outputs[ATTN_OUT].weight, stats[ATTN_OUT]["var"]).cpu())
        mlp.append(flap.fluctuation(outputs[MLP_OUT].weight, stats[MLP_OUT]["var"]).cpu())
        means.append({name: stats[name]["mean"].cpu() for name in outputs})
        progress.update(index + 1)

    groups, channels = flap.search(torch.stack(attn), torch.stack(mlp), layout, spec.sparsity,
                                   method.structure)
    packed, shapes, biases, rows = {}, {}, {}, []  # masks as bits (see stages.masks.pruning)
    pattern = spec.parsed_pattern()
    for index in range(loader.n_blocks):
        block_keep = flap.block_masks(groups[index], channels[index], layout)
        named = {f"{index}.{name}": keep for name, keep in block_keep.items()}
        rows += layer_rows(named, pattern)
        for name, keep in named.items():
            packed[name], shapes[name] = pack(keep), list(keep.shape)
        if method.bias:  # the removed channels' mean output, from the block's own weights
            linears = arch.linear_layers(loader.block(index))
            for name in (ATTN_OUT, MLP_OUT):
                kept_inputs = block_keep[name].any(0)
                biases[f"{index}.{name}"] = flap.compensation(
                    linears[name].weight, means[index][name], kept_inputs).contiguous()

    save_packed(out / MASKS_FILE, packed, shapes)
    if biases:
        save_file(biases, str(out / BIASES_FILE))
    report = summarize(rows, pattern)
    report.update(spec=asdict(spec), seconds=round(time.monotonic() - started, 1),
                  calibration_samples=n,
                  structure=structure_summary(groups, channels, layout),
                  parameters=parameter_counts(meta, report["pruned"], biases))
    write_json(out, REPORT_FILE, report)


def structure_summary(groups: torch.Tensor, channels: torch.Tensor, layout: flap.Layout) -> dict:
    """Kept KV groups, query heads and MLP channels per layer."""
    kept_groups = groups.sum(1).tolist()
    return {"kv_groups": layout.kv_heads, "heads_per_group": layout.heads_per_group,
            "intermediate": layout.intermediate,
            "kept_kv_groups": kept_groups,
            "kept_heads": [g * layout.heads_per_group for g in kept_groups],
            "kept_channels": channels.sum(1).tolist()}


def parameter_counts(model, removed: int, biases: dict) -> dict:
    """Parameters of the whole model before, and those left (kept weights + added biases)."""
    total = sum(p.numel() for p in model.parameters())
    added = sum(b.numel() for b in biases.values())
    return {"total": total, "remaining": total - removed + added, "removed": removed,
            "bias_added": added}


# ---- saving: biases a stock config can load, and physically smaller models ---------------

def give_biases(block) -> None:
    """A bias on every projection of the block (zeros where there was none)."""
    for linear in arch.linear_layers(block).values():
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device))


def make_biases_loadable(model) -> None:
    """Give every block projection a bias (zeros where there was none) and say so in the
    config, so ``save_pretrained`` writes a folder stock transformers loads with the biases."""
    for block in arch.decoder_blocks(model):
        give_biases(block)
    model.config.attention_bias = True
    model.config.mlp_bias = True


def kept_units(keep: dict[str, torch.Tensor], index: int,
               layout: flap.Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's kept KV groups and MLP channels, read back from its keep-masks."""
    kv_rows = keep[f"{index}.self_attn.k_proj"].any(1)
    return kv_rows.reshape(layout.kv_heads, layout.head_dim).any(1), \
        keep[f"{index}.mlp.gate_proj"].any(1)


def _padded(kept: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the kept units, filled up to ``width`` with removed ones, in order."""
    order = torch.cat([kept.nonzero().flatten(), (~kept).nonzero().flatten()])
    return order[:width].sort().values


def shrink(model, keep: dict[str, torch.Tensor]):
    """A narrower copy of a structurally masked model (see the module doc)."""
    from transformers import AutoModelForCausalLM

    layout = layout_of(model.config)
    blocks = arch.decoder_blocks(model)
    units = [kept_units(keep, i, layout) for i in range(len(blocks))]
    n_groups = loadable_groups(max(1, max(int(g.sum()) for g, _ in units)), layout)
    n_channels = max(1, max(int(c.sum()) for _, c in units))
    config = type(model.config).from_dict(model.config.to_dict())
    config.num_key_value_heads = n_groups
    config.num_attention_heads = n_groups * layout.heads_per_group
    config.head_dim = layout.head_dim
    config.intermediate_size = n_channels
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    state = model.state_dict()
    # Same names (the biases were made loadable before): copy everything, then cut the
    # projections of every block to the kept (and padding) units.
    small_state = {name: state[name] for name in small.state_dict()}
    prefix = _blocks_prefix(model)
    for index, (groups, channels) in enumerate(units):
        g = _padded(groups, n_groups)
        q = _rows(g, layout.heads_per_group * layout.head_dim)
        kv = _rows(g, layout.head_dim)
        c = _padded(channels, n_channels)
        p = f"{prefix}{index}."
        cut = {"self_attn.q_proj": (q, None), "self_attn.k_proj": (kv, None),
               "self_attn.v_proj": (kv, None), ATTN_OUT: (None, q),
               "mlp.gate_proj": (c, None), "mlp.up_proj": (c, None), MLP_OUT: (None, c)}
        for name, (rows, cols) in cut.items():
            weight = state[f"{p}{name}.weight"]
            weight = weight[rows] if rows is not None else weight[:, cols]
            small_state[f"{p}{name}.weight"] = weight
            if f"{p}{name}.bias" in small_state:
                bias = state[f"{p}{name}.bias"]
                small_state[f"{p}{name}.bias"] = bias[rows] if rows is not None else bias
    small.load_state_dict(small_state)
    return small


def loadable_groups(widest: int, layout: flap.Layout) -> int:
    """The fewest KV groups, at least ``widest``, that transformers accepts: its configs
    require the hidden size to be a multiple of the query head count (even with an explicit
    head_dim), so e.g. 3 groups of 8 heads (24) cannot be saved for hidden 2048; the
    extra groups are removed (all-zero) ones, which is exact."""
    groups = widest
    while layout.hidden % (groups * layout.heads_per_group):
        groups += 1
    return groups


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the chosen units, each ``width`` consecutive rows."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _blocks_prefix(model) -> str:
    blocks = arch.decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}."
    raise UserError("could not find the decoder blocks' names")
