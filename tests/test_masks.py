import pytest
import torch

from stages.errors import UserError
from stages.masks import parse_pattern, sparsify


def weight(rows=16, cols=32, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_magnitude_equals_a_direct_topk_with_exact_sparsity(sparsity):
    w = weight()
    keep = sparsify("magnitude", w, parse_pattern(sparsity))
    n_keep = w.numel() - int(w.numel() * sparsity)
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[w.abs().flatten().topk(n_keep).indices] = True
    assert torch.equal(keep.flatten(), expected)


def test_wanda_is_exact_per_row_and_follows_activation_norms():
    w = weight()
    norms = torch.ones(32)
    keep = sparsify("wanda", w, parse_pattern(0.5), input_norms=norms)
    assert (keep.sum(dim=1) == 16).all()
    norms_changed = norms.clone()
    norms_changed[:8] = 100.0  # inputs 0..7 carry large activations: their weights survive
    keep2 = sparsify("wanda", w, parse_pattern(0.5), input_norms=norms_changed)
    assert not torch.equal(keep, keep2)
    assert keep2[:, :8].all()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:3"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_holds_in_every_input_group(nm, method):
    n, m = map(int, nm.split(":"))
    w = weight(8, 24)
    keep = sparsify(method, w, parse_pattern(0.0, nm), input_norms=torch.rand(24))
    groups = keep.reshape(8, 24 // m, m)
    assert ((~groups).sum(-1) == n).all()


@pytest.mark.parametrize("sparsity,nm,match", [
    (1.5, None, "must be in \\[0, 1\\)"), (-0.1, None, "must be in \\[0, 1\\)"),
    (1.0, None, "must be in \\[0, 1\\)"), (0.5, "5:4", "0 < N < M"), (0.5, "2-4", "is not N:M"),
])
def test_bad_patterns_are_clear_errors(sparsity, nm, match):
    with pytest.raises(UserError, match=match):
        parse_pattern(sparsity, nm)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="choose one of magnitude, wanda"):
        sparsify("nope", weight(), parse_pattern(0.5))
