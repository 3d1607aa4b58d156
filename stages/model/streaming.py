"""One decoder block at a time, straight from a model folder's safetensors files.

A stage that works on block l needs block l's weights and the keyword arguments every
block gets (rotary embeddings, mask), not the whole model: loading a 7B model in fp32 for
each of its 32 block tasks reads it 32 times and does not fit a 24 GiB machine.
``BlockLoader`` reads the config, finds which file holds each tensor (sharded checkpoints
with ``model.safetensors.index.json`` included: every file's header is read), and builds
block l from the model's own layer class with exactly its stored tensors. The keyword
arguments come from a skeleton of the same model with one block and a tiny vocabulary, so
they are whatever the model's own code makes them.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import stages.model.architecture as arch
from stages.errors import UserError
from store.usage import io_time


def tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file that holds it}, from the files' headers."""
    where = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[name] = file
    return where


def skeleton(config, vocab_size: int | None = 8, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with one block and (by default) an 8-token vocabulary, for the blocks'
    keyword arguments. Its block stays on the meta device (no memory: a 7B block is 0.8 GB
    in fp32, and it is never run, only copied as the template that stored tensors are
    assigned into); everything else is allocated uninitialised, and the rotary embedding is
    rebuilt on the CPU so the positions are real. ``vocab_size=None`` keeps the model's
    vocabulary (the shell that embeds tokens and computes logits)."""
    from transformers import AutoModelForCausalLM

    small = config.to_dict()
    small.update(num_hidden_layers=1, vocab_size=vocab_size or config.vocab_size)
    if isinstance(small.get("layer_types"), list):
        small["layer_types"] = small["layer_types"][:1]
    small_config = type(config).from_dict(small)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small_config, attn_implementation="sdpa",
                                                 dtype=dtype or torch.float32)
    blocks = arch.decoder_blocks(model)
    owner, _, attr = next(name for name, module in model.named_modules()
                          if module is blocks).rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    setattr(parent, attr, nn.ModuleList())  # materialise all but the block...
    model.to_empty(device="cpu")
    setattr(parent, attr, blocks)  # ...which stays on the meta device
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    type(module)(config=small_config))
    model.eval()
    model.config.use_cache = False
    return model


class BlockLoader:
    """Blocks of one model folder, one at a time (see the module doc)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype) -> None:
        from transformers import AutoConfig

        self.folder, self.dtype = Path(folder), dtype
        self.config = AutoConfig.from_pretrained(self.folder)
        self.files = tensor_files(self.folder)
        self.skeleton = skeleton(self.config)
        template = arch.decoder_blocks(self.skeleton)[0]
        self.template = template
        self.prefix = next(f"{name}." for name, module in self.skeleton.named_modules()
                           if module is arch.decoder_blocks(self.skeleton)) + "0."
        self.n_blocks = int(self.config.num_hidden_layers)
        self._hooks = threading.Lock()  # loaders are shared by a process's block tasks

    def block(self, index: int) -> nn.Module:
        """Block ``index`` with its stored weights, in the loader's dtype, on the CPU."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} of {self.n_blocks}")
        prefix = self.prefix.removesuffix("0.") + f"{index}."
        names = [n for n, _ in self.template.named_parameters()] + \
            [n for n, _ in self.template.named_buffers() if f"{prefix}{n}" in self.files]
        state = {}
        with io_time():
            for name in names:
                path = self.files.get(prefix + name)
                if path is None:
                    raise UserError(f"{self.folder}: no tensor {prefix + name} in its "
                                    "safetensors files; the checkpoint is incomplete")
                with safe_open(str(path), "pt") as f:
                    state[name] = f.get_tensor(prefix + name).to(self.dtype)
        block = copy.deepcopy(self.template)  # on the meta device: costs nothing
        block.load_state_dict(state, strict=False, assign=True)
        unset = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if unset:
            raise UserError(f"{self.folder}: block {index} has state its checkpoint does not "
                            f"store ({', '.join(unset)}); this architecture cannot be streamed")
        for module in block.modules():  # the layer's own index (attention caches use it)
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        return block.to(self.dtype).eval()

    def block_kwargs(self, batch: int, seqlen: int, device: torch.device,
                     dtype: torch.dtype) -> dict:
        with self._hooks:  # a hook on the shared skeleton: one caller at a time
            return arch.block_kwargs(self.skeleton, batch, seqlen, device, dtype)

    @functools.cached_property
    def shell(self) -> nn.Module:
        """The model around its blocks: embeddings, final norm and head with their stored
        weights (tied heads tied), and one block that is never run (left on the meta device)."""
        model = skeleton(self.config, vocab_size=None, dtype=self.dtype)
        blocks = f"{self.prefix.removesuffix('0.')}"
        names = [n for n, _ in model.named_parameters() if not n.startswith(blocks)]
        state = {}
        with io_time():
            for name in names:
                if name not in self.files and name == "lm_head.weight" and \
                        getattr(self.config, "tie_word_embeddings", False):
                    continue  # tied to the embeddings below
                if name not in self.files:
                    raise UserError(f"{self.folder}: no tensor {name} in its safetensors "
                                    "files; the checkpoint is incomplete")
                with safe_open(str(self.files[name]), "pt") as f:
                    state[name] = f.get_tensor(name).to(self.dtype)
        model.load_state_dict(state, strict=False, assign=True)
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        return model.to(self.dtype).eval()

    def outside_blocks(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every stored tensor that is not in a block (embeddings, final norm, head), read
        straight from the files in ``dtype``: what an output folder writes besides its
        blocks, without building the shell in the loader's (maybe wider) dtype."""
        blocks = self.prefix.removesuffix("0.")
        out = {}
        with io_time():
            for name, path in self.files.items():
                if not name.startswith(blocks):
                    with safe_open(str(path), "pt") as f:
                        out[name] = f.get_tensor(name).to(dtype)
        return out

    def first_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Block 0's input (the embedded tokens) and the blocks' keyword arguments."""
        with torch.inference_mode(), self._hooks:
            return arch.block_inputs(self.shell, input_ids)

    def head(self) -> nn.Module:
        """The last block's output to logits: the final norm, then the output embedding."""
        return nn.Sequential(self.shell.get_decoder().norm, self.shell.get_output_embeddings())

    def blocks(self, device: torch.device,
               edit: Callable[[nn.Module, int], None] | None = None) -> Iterator[nn.Module]:
        """Every block in order, on ``device``, each changed by ``edit(block, index)`` first
        when given (e.g. a mask artifact's ``MaskFiles.apply``), freed when the next is asked
        for."""
        for index in range(self.n_blocks):
            block = self.block(index)
            if edit is not None:
                edit(block, index)
            yield block.to(device)
            block.to("cpu")
            del block
