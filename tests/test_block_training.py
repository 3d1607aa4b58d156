"""The block training step on a tiny random Llama block, without Prefect or a store."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stages.model.architecture as arch
from stages.recovery import block_training as training
from stages.recovery.block_training import BlockTuner, TrainConfig


def tiny_llama() -> LlamaForCausalLM:
    """A random two-block Llama (hidden 64, GQA), seeded."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100))


def tiny_block():
    """Block 0 of a random Llama, half its weights pruned, with an input and a target."""
    model = tiny_llama()
    block = arch.decoder_blocks(model)[0]
    keep = {name: torch.rand_like(linear.weight) < 0.5
            for name, linear in arch.linear_layers(block).items()}
    with torch.no_grad():
        for name, linear in arch.linear_layers(block).items():
            linear.weight.mul_(keep[name])
    x, y = torch.randn(2, 16, 64), torch.randn(2, 16, 64) * 3
    kwargs = arch.block_kwargs(model, 2, 16, torch.device("cpu"), torch.float32)
    return block, keep, x, y, kwargs


def gradient_norm_seen_by_the_optimizer(tuner: BlockTuner, x, y, kwargs) -> float:
    seen = []
    original = tuner.optimizer.step

    def record_then_step(*args, **kw):
        seen.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in tuner.params if p.grad is not None])))
        for name, w in tuner.weights.items():  # clipping scales; pruned gradients stay 0
            assert not w.grad[~tuner.keep[name]].any(), name
        return original(*args, **kw)

    tuner.optimizer.step = record_then_step
    tuner.step(x, y, kwargs, training.autocast_for(tuner.cfg, x.device, x.dtype))
    return seen[0]


@pytest.mark.parametrize("train_norms", [False, True])
def test_max_grad_norm_clips_the_update_and_keeps_pruned_gradients_zero(train_norms):
    block, keep, x, y, kwargs = tiny_block()
    free = BlockTuner(block, keep, TrainConfig(train_norms=train_norms), 0)
    unclipped = gradient_norm_seen_by_the_optimizer(free, x, y, kwargs)

    block, keep, x, y, kwargs = tiny_block()
    limit = unclipped / 10
    clipped_tuner = BlockTuner(block, keep, TrainConfig(max_grad_norm=limit,
                                                        train_norms=train_norms), 0)
    clipped = gradient_norm_seen_by_the_optimizer(clipped_tuner, x, y, kwargs)
    assert unclipped > limit
    assert clipped == pytest.approx(limit, rel=1e-4)


def test_negative_max_grad_norm_is_refused():
    with pytest.raises(training.UserError, match="--max-grad-norm"):
        TrainConfig(max_grad_norm=-1.0).validate(16)


def test_mask_tuning_swaps_weights_within_a_few_steps():
    """Kept and pruned scores start a small margin apart, so nine steps already change
    the choice (from a gap of 1 they could not) and lower the loss, 2:4 kept exact."""
    model = tiny_llama()
    blocks = arch.decoder_blocks(model)
    keep = {}
    for name, linear in arch.linear_layers(blocks[0]).items():
        w = linear.weight.data
        top = w.abs().reshape(len(w), -1, 4).topk(2, dim=-1).indices
        keep[name] = torch.zeros(len(w), w.shape[1] // 4, 4, dtype=torch.bool) \
            .scatter_(-1, top, True).reshape(w.shape)
        w.mul_(keep[name])
    x = torch.randn(8, 32, 64)
    kwargs = {n: arch.block_kwargs(model, n, 32, torch.device("cpu"), torch.float32)
              for n in (2, 8)}
    with torch.no_grad():
        y = arch.run_block(blocks[1], x, kwargs[8])  # a target the block must move towards
    cfg = TrainConfig(tune="mask", mask_lr=5e-2, batch_size=2, max_epochs=3, tolerance=0.0)
    record = training.train_block(blocks[0], keep, lambda rows: (x[rows], y[rows]),
                                  list(range(6)), [6, 7], kwargs.__getitem__, cfg,
                                  torch.device("cpu"), torch.float32, nm_m=4,
                                  log=lambda _m: None)
    chosen = record["_keep"]
    assert sum(int((chosen[n] != keep[n]).sum()) for n in keep) > 0
    assert record["end_loss"] < record["start_loss"]
    for k in chosen.values():
        assert (k.reshape(len(k), -1, 4).sum(-1) == 2).all()


def test_nmse_weighs_every_token_alike_and_mse_is_the_elementwise_mean():
    target = torch.ones(1, 2, 4)
    target[0, 0] *= 100  # a token with a massive activation, as the deep blocks have
    out = target * 1.1  # 10% error on both tokens
    assert training.block_loss(out, target, "mse") == pytest.approx(
        ((out - target) ** 2).mean().item())
    assert training.block_loss(out, target, "nmse").item() == pytest.approx(0.01)
    only_small = target.clone()
    only_small[0, 1] *= 1.1  # the same 10% error on the small token only
    assert training.block_loss(only_small, target, "nmse").item() == pytest.approx(0.005)
    only_big = target.clone()
    only_big[0, 0] *= 1.1
    # MSE weighs the same relative error 10 000 times more on the massive token
    assert training.block_loss(only_big, target, "mse").item() == pytest.approx(
        1e4 * training.block_loss(only_small, target, "mse").item(), rel=1e-3)
    assert training.block_loss(only_big, target, "nmse").item() == pytest.approx(0.005)


def test_capped_mse_weighs_an_outsized_token_as_a_typical_one():
    target = torch.ones(1, 3, 4)
    target[0, 0] *= 100  # the first token's massive activation (an attention sink)
    small = target.clone()
    small[0, 1, 0] += 0.5  # an error of 0.5 on one element of an ordinary token
    assert training.block_loss(small, target, "capped").item() == pytest.approx(
        training.block_loss(small, target, "mse").item())  # ordinary tokens: plain MSE
    big = target.clone()
    big[0, 0, 0] += 50.0  # the same relative error on the sink: 100x the absolute error
    # MSE weighs it 10 000 times more; capped weighs it as the ordinary token's error
    assert training.block_loss(big, target, "mse").item() == pytest.approx(
        1e4 * training.block_loss(small, target, "mse").item())
    assert training.block_loss(big, target, "capped").item() == pytest.approx(
        training.block_loss(small, target, "capped").item())


@pytest.mark.parametrize("schedule", training.SCHEDULES)
def test_learning_rate_schedules_warm_up_then_decay(schedule):
    factors = [training.lr_factor(step, 100, schedule, 10) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(factors) == 1.0
    if schedule == "constant":
        assert factors[-1] == 1.0
    else:
        assert factors[-1] < 0.05 and all(a >= b for a, b in itertools.pairwise(factors[9:]))
    # without warm-up, linear is the decay the loop always had: 1 - step / total
    assert [training.lr_factor(s, 7, "linear", 0) for s in range(7)] == [1 - s / 7
                                                                         for s in range(7)]


@pytest.mark.parametrize("loss", training.LOSSES)
def test_training_lowers_each_loss_it_is_given(loss):
    block, keep, x, y, kwargs = tiny_block()
    cfg = TrainConfig(loss=loss, max_epochs=3, batch_size=1, tolerance=0.0, lr=1e-2,
                      schedule="cosine", warmup=0.2)
    record = training.train_block(block, keep, lambda rows: (x[rows], y[rows]), [0, 1], [],
                                  lambda n: kwargs, cfg, torch.device("cpu"), torch.float32,
                                  log=lambda _: None)
    assert record["end_loss"] < record["start_loss"]
    assert record["end_loss"] == pytest.approx(
        training.block_loss(block(x, **kwargs)[0] if isinstance(block(x, **kwargs), tuple)
                            else block(x, **kwargs), y, loss).item(), rel=1e-4)
