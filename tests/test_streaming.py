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


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000])
def test_assembly_block_by_block_equals_the_whole_model_saved(tmp_path, monkeypatch, kind,
                                                              shard_bytes):
    """Assembly writes the model one block at a time (masks, new weights, compensation
    biases, EBFT blocks put in), in one file or in indexed shards; stock transformers loads
    exactly the tensors the whole-model path would have saved."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from stages.masks import parse_pattern, structured
    from stages.masks.mask_files import BIASES_FILE, apply_masks, save_masks, weights_file
    from stages.model import assembly
    from stages.model.model_source import resolve_model
    from stages.recovery.ebft import BLOCK_FILE, load_block_weights
    from store import Artifact

    monkeypatch.setattr(assembly, "SHARD_BYTES", shard_bytes)
    folder = build_tiny_model(tmp_path / kind, kind)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    linears = {f"{i}.{name}": linear for i, block in enumerate(arch.decoder_blocks(dense))
               for name, linear in arch.linear_layers(block).items()}
    masks = tmp_path / "masks"
    masks.mkdir()
    save_masks(masks / "masks.safetensors",
               {k: torch.rand(v.weight.shape, generator=gen) > 0.5 for k, v in linears.items()})
    first = next(iter(linears))  # one layer with new weights (SparseGPT)
    save_file({first: torch.randn(linears[first].weight.shape, generator=gen)},
              str(masks / weights_file(0)))
    if kind == "llama":  # FLAP's compensation biases (Qwen2's config cannot save them all)
        save_file({k: torch.randn(v.out_features, generator=gen) for k, v in linears.items()
                   if k.endswith("o_proj")}, str(masks / BIASES_FILE))
    mask_artifact = Artifact("masks", "m", str(masks), "d")
    blocks = []
    for index, block in enumerate(arch.decoder_blocks(dense)):  # EBFT: tuned q_proj weights
        path = tmp_path / f"block{index}"
        path.mkdir()
        q = block.self_attn.q_proj.weight
        save_file({"self_attn.q_proj.weight": torch.randn(q.shape, generator=gen)},
                  str(path / BLOCK_FILE))
        blocks.append(Artifact("ebft-block", str(index), str(path), "d"))
    out = tmp_path / "out"
    out.mkdir()
    spec = assembly.AssemblySpec("m", "m", "b", "bfloat16", None, "masked")
    assembly.build(spec, out, resolve_model(str(folder)), mask_artifact, blocks,
                   parse_pattern(0.5))
    assert (out / "model.safetensors.index.json").is_file() == (shard_bytes < 1 << 30)
    apply_masks(dense, mask_artifact)
    for block, artifact in zip(arch.decoder_blocks(dense), blocks, strict=True):
        load_block_weights(block, artifact)
    if kind == "llama":
        structured.make_biases_loadable(dense)
    want = dense.to(torch.bfloat16).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.dtype == torch.bfloat16
    assert (kind == "llama") == bool(getattr(saved.config, "mlp_bias", False))
    got = saved.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
