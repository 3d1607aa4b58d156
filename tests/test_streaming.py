"""Blocks loaded one at a time from the safetensors files equal the whole model's blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

import stages.model.architecture as arch
from stages.model.streaming import BlockLoader


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True])
def test_a_streamed_block_equals_the_whole_models_block(tmp_path, kind, sharded):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / kind, kind)
    if sharded:
        model = AutoModelForCausalLM.from_pretrained(folder)
        (folder / "model.safetensors").unlink()
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("*.safetensors"))) > 2
    whole = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    loader = BlockLoader(folder, torch.float32)
    x = torch.randn(2, 16, whole.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    kwargs = arch.block_kwargs(whole, 2, 16, cpu, torch.float32)
    streamed_kwargs = loader.block_kwargs(2, 16, cpu, torch.float32)
    for index, expected_block in enumerate(arch.decoder_blocks(whole)):
        block = loader.block(index)
        for (name, a), (_, b) in zip(block.state_dict().items(),
                                     expected_block.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        with torch.no_grad():
            want = arch.run_block(expected_block, x, kwargs)
            got = arch.run_block(block, x, streamed_kwargs)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (kind, index)
