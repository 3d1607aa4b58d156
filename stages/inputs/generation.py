"""Calibration windows the dense model writes itself (``--calibration generated``).

See ``stages.inputs.calibration``: each window starts with the first tokens of a C4 window
and the model samples the rest. Imported by name, so only generated sets depend on it.
"""

from __future__ import annotations

import torch

from stages.model.model_source import ModelSource

GENERATE_BATCH = 8


@torch.inference_mode()
def generate_windows(model: ModelSource, prompts: torch.Tensor, seqlen: int, seed: int,
                     device: str, dtype: str) -> torch.Tensor:
    """(n, seqlen) windows the model samples on from each prompt row: exactly seqlen tokens
    (end-of-text suppressed), the same on every run of a machine for a seed."""
    from transformers import AutoModelForCausalLM

    from stages.model.devices import DTYPES, resolve_device
    from stages.model.model_source import NO_HUB_KERNELS

    target = resolve_device(device)
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=DTYPES[dtype], **NO_HUB_KERNELS)
    lm.to(target).eval()
    new = seqlen - prompts.shape[1]
    rows = []
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in prompts.split(GENERATE_BATCH):
            ids = lm.generate(chunk.to(target), attention_mask=torch.ones_like(chunk).to(target),
                              do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                              max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=_first(lm.generation_config.eos_token_id))
            rows.append(ids[:, :seqlen].cpu())
    del lm  # free the device for the stages after this one, in the same process
    if target.type == "cuda":
        torch.cuda.empty_cache()
    return torch.cat(rows)


def _first(token: int | list[int] | None) -> int:
    return (token[0] if token else 0) if isinstance(token, list) else (token or 0)
