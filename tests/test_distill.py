"""Distillation of the whole recovered model on the dense model's logits (issue 22): the
loss on toy tensors, the training loop on a tiny Llama, and the stage in the main job."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_model
from test_run import config, linear_weights

import stages.model.architecture as arch
from flows.run import run_flow
from stages.recovery.distill import (
    DistillSettings,
    distill,
    kd_loss,
    last_block_outputs,
    output_head,
    trained_blocks,
)


def test_kd_loss_is_the_mean_kl_over_tokens():
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]]])
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(student, teacher).item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_gradient_is_autograds_through_the_plain_form(dtype):
    """The fused loss (rows at a time, its gradient computed in the forward pass) against
    autograd through log_softmax and kl_div, on more rows than one chunk."""
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 37, 50, generator=gen)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(2, 37, 50, generator=gen)).to(dtype)
    plain = torch.nn.functional.kl_div(
        student.float().log_softmax(-1).flatten(0, 1), teacher.float().log_softmax(-1)
        .flatten(0, 1), log_target=True, reduction="batchmean")
    expected, = torch.autograd.grad(2.5 * plain, student)
    loss = kd_loss(student, teacher, rows=16)
    (2.5 * loss).backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert student.grad.dtype == dtype
    torch.testing.assert_close(student.grad.float(), expected.float(),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_the_teacher_is_the_head_on_the_last_block_output(tmp_path):
    """What the stage reads from the capture (the last boundary), through the final norm
    and head, gives the dense model's own logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = output_head(model)(last_block_outputs(model, ids))
        torch.testing.assert_close(logits, model(ids).logits)


def test_distillation_moves_the_student_towards_the_teacher_and_keeps_its_zeros(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m")
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    student = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # half of every block weight pruned at random
        for block in arch.decoder_blocks(student):
            for linear in arch.linear_layers(block).values():
                linear.weight.mul_(torch.rand(linear.weight.shape, generator=gen) > 0.5)
    zeros = {n: w == 0 for n, w in student.state_dict().items() if "proj" in n}
    tokens = torch.randint(0, teacher.config.vocab_size, (8, 32), generator=gen)

    def gap() -> float:
        with torch.no_grad():
            return kd_loss(student(tokens).logits, teacher(tokens).logits).item()

    before = gap()
    record = distill(student, lambda row: last_block_outputs(teacher, tokens[row:row + 1]),
                     tokens, DistillSettings(epochs=3, lr=3e-3), torch.device("cpu"),
                     log=lambda _: None)
    assert gap() < 0.8 * before
    assert record["steps"] == 24 and len(record["train_losses"]) == 3
    for name, zero in zeros.items():
        assert torch.equal(student.state_dict()[name] == 0, zero), name
    assert not any(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("top, n", [(1.0, 30), (0.5, 15), (0.34, 11), (0.01, 1)])
def test_distill_top_trains_the_last_blocks(top, n):
    blocks = list(range(30))
    assert trained_blocks(blocks, top) == blocks[30 - n:]


def test_distillation_of_the_top_block_leaves_the_blocks_below_as_they_were(tmp_path):
    """--distill-top 0.3 of a 3-block model trains the last block only: the two below keep
    the block pass's weights exactly, and the top one still moves towards the teacher."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m")
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    student = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    before = {n: w.clone() for n, w in student.state_dict().items()}
    tokens = torch.randint(0, teacher.config.vocab_size, (4, 32), generator=gen)
    distill(student, lambda row: last_block_outputs(teacher, tokens[row:row + 1]), tokens,
            DistillSettings(epochs=2, lr=3e-3, top=0.3), torch.device("cpu"),
            log=lambda _: None)
    after = student.state_dict()
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    top_linears = {f"model.layers.2.{name}.weight" for name in
                   arch.linear_layers(arch.decoder_blocks(student)[2])}
    assert moved == top_linears


def test_the_main_job_distils_the_recovered_model_once(prefect_server, tmp_path, data_dir):
    """`--distill-epochs 1`: the evaluated and saved model is the distilled one, a stock
    Hugging Face folder with the masks' zeros; a second run finds every stage cached."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tmp_path / "model")
    cfg = config(tmp_path / "store", model, data_dir)
    plain = run_flow(cfg)
    cfg = replace(cfg, distill=DistillSettings(epochs=1, lr=1e-3))
    report = run_flow(cfg)
    assert report["states"]["distill"] == "Completed"
    assert report["distill"]["steps"] == cfg.dense.nsamples
    assert "/distill/" in report["model_folder"] and report["model_folder"] != \
        plain["model_folder"]
    tuned, before = linear_weights(report["model_folder"]), linear_weights(plain["model_folder"])
    assert tuned.keys() == before.keys()
    assert all(torch.equal(tuned[n] == 0, before[n] == 0) for n in tuned)
    assert any(not torch.equal(tuned[n], before[n]) for n in tuned)
    AutoModelForCausalLM.from_pretrained(report["model_folder"])
    ppl = report["perplexity"]["finetuned"]["perplexity"]
    assert math.isfinite(ppl) and ppl != plain["perplexity"]["finetuned"]["perplexity"]
    again = run_flow(cfg)
    assert again["states"]["distill"].startswith("Cached")
    assert again["perplexity"]["finetuned"] == report["perplexity"]["finetuned"]


def test_distillation_that_does_not_fit_the_accelerator_is_refused_before_any_stage(
        tmp_path, monkeypatch):
    """The one stage that holds the whole model in training: on a GPU without room for it
    the run stops at the checks, naming --distill-epochs 0, instead of failing after the
    block pass."""
    from flows import dense
    from flows.config import DenseConfig
    from stages.errors import UserError
    from stages.model.model_source import ModelSource, meta_model

    folder = build_tiny_model(tmp_path / "m")
    meta = meta_model(ModelSource("tiny", str(folder), "digest"))
    need = dense.distill_bytes(DenseConfig(), meta)
    blocks = sum(p.numel() for p in arch.decoder_blocks(meta).parameters())
    assert need > 4 * sum(p.numel() for p in meta.parameters()) + 16 * blocks - 1
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need + 1, 2 * need))
    dense.check_distill_memory(DenseConfig(), meta, cuda)  # fits: no error
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 2 * need))
    with pytest.raises(UserError, match="pass --distill-epochs 0 to skip it"):
        dense.check_distill_memory(DenseConfig(), meta, cuda)
    # the GPU has room, the host not for the fp32 copy the load makes before moving it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need + 1, 2 * need))
    host = 4 * sum(p.numel() for p in meta.parameters())
    monkeypatch.setattr(dense.checks, "available_memory", lambda: host - 1)
    with pytest.raises(UserError, match="on the host and .* pass --distill-epochs 0"):
        dense.check_distill_memory(DenseConfig(), meta, cuda)
    monkeypatch.setattr(dense.checks, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match="on cpu and .* pass --distill-epochs 0.*--distill-top"):
        dense.check_distill_memory(DenseConfig(), meta, torch.device("cpu"))
    # training the top block alone needs less: gradients, moments and saved activations of
    # one block of three
    top = dense.distill_bytes(DenseConfig(), meta, 0.3)
    assert top < need
    monkeypatch.setattr(dense.checks, "available_memory", lambda: top + 1)
    dense.check_distill_memory(DenseConfig(), meta, torch.device("cpu"), 0.3)
