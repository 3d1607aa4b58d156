"""Hidden states at block boundaries, stored in Zarr.

One array per boundary: ``h0`` is the input of block 0, ``h{l+1}`` the output of block l.
Shape (nsamples, seqlen, hidden), one chunk per sample, no compression (it gains nothing on
fp16 activations). Zarr has no bfloat16, so bf16 is stored as its uint16 bit pattern and
the array's ``ebft_dtype`` attribute says how to read it back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from store.usage import io_time

STORAGE = {torch.float16: ("float16", "float16"), torch.bfloat16: ("uint16", "bfloat16")}


def boundary_name(index: int) -> str:
    return f"h{index}"


def create(path: Path, n_boundaries: int, shape: tuple[int, int, int], dtype: torch.dtype,
           attrs: dict) -> zarr.Group:
    if dtype not in STORAGE:
        raise ValueError(f"activations are stored as float16 or bfloat16, not {dtype}")
    zarr_dtype, name = STORAGE[dtype]
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({**attrs, "ebft_dtype": name, "shape": list(shape),
                        "n_boundaries": n_boundaries})
    for i in range(n_boundaries):
        group.create_array(boundary_name(i), shape=shape, chunks=(1, *shape[1:]),
                           dtype=zarr_dtype, compressors=None, fill_value=0)
    return group


def write(group: zarr.Group, boundary: int, start: int, values: torch.Tensor) -> None:
    """Write samples [start, start + len(values)) of one boundary."""
    name = group.attrs["ebft_dtype"]
    values = values.detach().to("cpu", getattr(torch, name))
    raw = values.view(torch.uint16) if name == "bfloat16" else values
    with io_time():
        group[boundary_name(boundary)][start:start + len(values)] = raw.numpy()


def open_group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r")


def read(group: zarr.Group, boundary: int, start: int, stop: int) -> torch.Tensor:
    with io_time():
        return _as_tensor(group, np.asarray(group[boundary_name(boundary)][start:stop]))


def read_rows(group: zarr.Group, boundary: int, rows: list[int]) -> torch.Tensor:
    """Samples at arbitrary indices (a shuffled training batch), in the given order."""
    with io_time():
        array = group[boundary_name(boundary)]
        return _as_tensor(group, np.stack([np.asarray(array[i]) for i in rows]))


Source = tuple | torch.Tensor  # (zarr group, boundary index), or the boundary in memory


def rows(source: Source, start: int, stop: int) -> torch.Tensor:
    """Samples [start, stop) of a boundary, stored or already in memory (same values)."""
    if isinstance(source, torch.Tensor):
        return source[start:stop]
    return read(*source, start, stop)


def _as_tensor(group: zarr.Group, raw: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(raw)
    if group.attrs["ebft_dtype"] == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor
