import math

import pytest
import torch
from conftest import build_tiny_model

import stages.model.architecture as arch
import store.activations as acts
from stages.evaluation import perplexity
from stages.inputs import capture
from stages.model.model_source import load_model, resolve_model
from stages.model.streaming import BlockLoader
from store import Artifact


def direct_block_outputs(model, ids):
    """Every block's output from one ordinary full forward pass, via forward hooks."""
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple)
                                                                    else o))
             for b in arch.decoder_blocks(model)]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [embeds, *outputs]


def test_models_load_without_hub_kernels(tiny_model):
    """Transformers 5 turns on kernels downloaded from the Hub whenever the `kernels` package
    is installed; on a GPU the first .train() then fetches layers (offline, on an H200, the
    distill stage failed that way). Every model the stages load has them off."""
    model = load_model(resolve_model(str(tiny_model)), torch.float32)
    model.train()
    assert getattr(model, "use_kernels", False) is False


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_zarr_boundaries_equal_a_direct_forward_pass(tmp_path, tiny_model, storage):
    """The capture reads one block at a time from the files; its boundaries equal one
    ordinary forward pass of the whole model."""
    model = load_model(resolve_model(str(tiny_model)), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (5, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "acts.zarr"
    capture.capture_dense(BlockLoader(tiny_model, torch.float32), ids, out,
                          torch.device("cpu"), storage, batch_size=2, attrs={"test": True})
    group = acts.open_group(out)
    expected = direct_block_outputs(model, ids)
    assert group.attrs["n_boundaries"] == len(expected) == 4
    tol = 1e-2 if storage == torch.bfloat16 else 2e-3
    for i, want in enumerate(expected):
        got = acts.read(group, i, 0, 5).float()
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * want.abs().max(), f"boundary {i}"


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_blocks_run_one_at_a_time_match_the_model(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / kind, kind),
                                                 attn_implementation="sdpa").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        hidden, kwargs = arch.block_inputs(model, ids)
        for block in arch.decoder_blocks(model):
            hidden = arch.run_block(block, hidden, kwargs)
    assert torch.allclose(hidden, direct_block_outputs(model, ids)[-1], atol=1e-5)
    assert set(arch.linear_layers(arch.decoder_blocks(model)[0])) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("kind, shards", [("llama", 1), ("llama", 3), ("mistral", 1),
                                          ("qwen2", 2)])
def test_perplexity_block_by_block_equals_the_whole_model(tmp_path, kind, shards):
    """Perplexity streams the blocks from the files (sharded or not); it equals the whole
    model's own loss on every window, with or without masks applied."""
    from transformers import AutoModelForCausalLM

    from stages.masks.mask_files import MaskFiles, apply_masks, save_masks

    folder = build_tiny_model(tmp_path / kind, kind)
    if shards > 1:  # the same weights, saved as a sharded checkpoint with an index
        AutoModelForCausalLM.from_pretrained(folder).save_pretrained(
            folder, max_shard_size=_size(folder) // shards + 1)
        assert (folder / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    windows = perplexity.token_windows(ids, seqlen=30)
    assert windows.shape == (3, 30)  # the 10-token tail is dropped
    loader = BlockLoader(folder, torch.float32)
    result = perplexity.perplexity(loader, windows, torch.device("cpu"))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result["windows"] == 3
    assert math.isclose(result["perplexity"], math.exp(sum(losses) / 3), rel_tol=1e-6)
    # with masks: the same as the whole model with the masks put into it
    keep = {f"{i}.{name}": torch.rand(linear.weight.shape) > 0.5
            for i, block in enumerate(arch.decoder_blocks(model))
            for name, linear in arch.linear_layers(block).items()}
    (tmp_path / "masks").mkdir()
    save_masks(tmp_path / "masks" / "masks.safetensors", keep)
    artifact = Artifact("masks", "k", str(tmp_path / "masks"), "d")
    masked = perplexity.perplexity(loader, windows[:1], torch.device("cpu"), MaskFiles(artifact))
    apply_masks(model, artifact)
    with torch.no_grad():
        want = model(input_ids=windows[:1], labels=windows[:1]).loss.item()
    assert math.isclose(masked["perplexity"], math.exp(want), rel_tol=1e-6)


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_model_without_decoder_blocks_is_a_clear_error():
    from stages.errors import UserError

    class NotADecoder(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()

    with pytest.raises(UserError, match="no list of 2 decoder blocks"):
        arch.decoder_blocks(NotADecoder())
