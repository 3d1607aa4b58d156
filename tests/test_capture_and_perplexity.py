import math

import pytest
import torch
from conftest import build_tiny_model

import stages.model.architecture as arch
import store.activations as acts
from stages.evaluation import perplexity
from stages.inputs import capture
from stages.model.model_source import load_model, resolve_model


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


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_zarr_boundaries_equal_a_direct_forward_pass(tmp_path, tiny_model, storage):
    model = load_model(resolve_model(str(tiny_model)), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (5, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "acts.zarr"
    capture.capture_dense(model, ids, out, torch.device("cpu"), torch.float32, storage,
                          batch_size=2, attrs={"test": True})
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


def test_perplexity_matches_a_direct_computation(tmp_path, tiny_model):
    model = load_model(resolve_model(str(tiny_model)), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    windows = perplexity.token_windows(ids, seqlen=30)
    assert windows.shape == (3, 30)  # the 10-token tail is dropped
    result = perplexity.perplexity(model, windows, torch.device("cpu"))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result["windows"] == 3
    assert math.isclose(result["perplexity"], math.exp(sum(losses) / 3), rel_tol=1e-5)
    limited = perplexity.perplexity(model, perplexity.token_windows(ids, 30, limit=1),
                                    torch.device("cpu"))
    assert math.isclose(limited["perplexity"], math.exp(losses[0]), rel_tol=1e-5)


def test_model_without_decoder_blocks_is_a_clear_error():
    from stages.errors import UserError

    class NotADecoder(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()

    with pytest.raises(UserError, match="no list of 2 decoder blocks"):
        arch.decoder_blocks(NotADecoder())
