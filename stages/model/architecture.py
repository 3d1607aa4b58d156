"""Find the parts of any Llama-style decoder generically, and run its blocks one at a time.

Nothing here names one model's sizes or module names: the decoder blocks are the
ModuleList with ``config.num_hidden_layers`` identical children, and a block is called with
exactly the keyword arguments the model itself passes to its first block (captured with a
pre-hook), so rotary embeddings, masks and GQA are whatever the model's own code makes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.errors import UserError


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(c) for c in m}) == 1]
    for modules in candidates:
        if len(modules) == n_layers:
            return modules
    raise UserError(f"{type(model).__name__} has no list of {n_layers} decoder blocks; "
                    "only decoder-only (Llama-style) causal language models are supported")


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear layers of a block, by their name inside the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


class _ReachedFirstBlock(Exception):
    pass


def block_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model's embedding up to block 0; return block 0's hidden input and kwargs."""
    first = decoder_blocks(model)[0]
    captured: dict[str, Any] = {}

    def stop(_module, args, kwargs):
        if args:
            captured["hidden"], captured["kwargs"] = args[0], kwargs
        else:
            captured["hidden"] = kwargs.pop("hidden_states")
            captured["kwargs"] = kwargs
        raise _ReachedFirstBlock

    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _ReachedFirstBlock:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def block_kwargs(model: nn.Module, batch: int, seqlen: int, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """The keyword arguments every block gets for a (batch, seqlen) input (rotary, mask...)."""
    dummy = torch.zeros(batch, seqlen, dtype=torch.long)
    return to_device(block_inputs(model, dummy)[1], device, dtype)


def to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to a device; floats to dtype."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def attention_end(block: nn.Module) -> nn.Module:
    """The norm before the MLP: its input is the residual stream after attention (Llama,
    Mistral, Qwen2 and the like name it ``post_attention_layernorm``). Blocks that also
    have a ``pre_feedforward_layernorm`` (Gemma 2, OLMo 2) normalise the attention's output
    there before the residual add, so they have no such point here."""
    norm = getattr(block, "post_attention_layernorm", None)
    if norm is None or hasattr(block, "pre_feedforward_layernorm"):
        raise UserError(f"{type(block).__name__} has no norm whose input is the residual "
                        "stream after attention, so its attention cannot be reconstructed "
                        "alone; use --window block")
    return norm
