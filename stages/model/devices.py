"""Device and precision choices."""

from __future__ import annotations

import torch

from stages.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from err


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (fastest and exact there) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is unknown; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def free_memory(device: torch.device) -> int:
    """Bytes free on a device now (host: the kernel's available pages)."""
    import os

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def storage_dtype(compute: torch.dtype) -> torch.dtype:
    """Activations are stored in 16 bits: bf16 when computing in bf16, else fp16."""
    return torch.bfloat16 if compute == torch.bfloat16 else torch.float16
