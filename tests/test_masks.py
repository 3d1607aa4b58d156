import pytest
import torch

from stages.errors import UserError
from stages.masks import LayerStats, parse_pattern, sparsify, split_method
from stages.masks.methods.dsnot import expected_error


def stats_of(x: torch.Tensor) -> dict:
    acc = LayerStats(x.shape[-1], hessian=True)
    acc.add(x)
    return acc.as_kwargs()


def correlated_inputs(tokens=512, features=64, seed=1) -> torch.Tensor:
    """Inputs with a nonzero mean and correlated features, like real hidden states."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features**0.5
    return torch.randn(tokens, features, generator=gen) @ mix + torch.randn(features, generator=gen)


def weight(rows=16, cols=32, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_magnitude_equals_a_direct_topk_with_exact_sparsity(sparsity):
    w = weight()
    keep = sparsify("magnitude", w, parse_pattern(sparsity)).keep
    n_keep = w.numel() - int(w.numel() * sparsity)
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[w.abs().flatten().topk(n_keep).indices] = True
    assert torch.equal(keep.flatten(), expected)


def test_wanda_is_exact_per_row_and_follows_activation_norms():
    w = weight()
    norms = torch.ones(32)
    keep = sparsify("wanda", w, parse_pattern(0.5), input_norms=norms).keep
    assert (keep.sum(dim=1) == 16).all()
    norms_changed = norms.clone()
    norms_changed[:8] = 100.0  # inputs 0..7 carry large activations: their weights survive
    keep2 = sparsify("wanda", w, parse_pattern(0.5), input_norms=norms_changed).keep
    assert not torch.equal(keep, keep2)
    assert keep2[:, :8].all()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:3"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_holds_in_every_input_group(nm, method):
    n, m = map(int, nm.split(":"))
    w = weight(8, 24)
    x = torch.randn(200, 24)
    keep = sparsify(method, w, parse_pattern(0.0, nm), **stats_of(x)).keep
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
    with pytest.raises(UserError, match="choose one of magnitude, ria, sparsegpt, wanda, "
                       "magnitude\\+dsnot, ria\\+dsnot, sparsegpt\\+dsnot, wanda\\+dsnot, "
                       "magnitude\\+obs, ria\\+obs, sparsegpt\\+obs, wanda\\+obs, flap"):
        split_method("nope")
    with pytest.raises(UserError, match="is unknown"):
        sparsify("nope", weight(), parse_pattern(0.5))


def reconstruction_error(w, w_hat, x):
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


@pytest.mark.parametrize("pattern", [parse_pattern(0.5), parse_pattern(0.7), parse_pattern(0, "2:4")])
def test_sparsegpt_reconstructs_better_than_wanda_and_keeps_exact_sparsity(pattern):
    x, w = correlated_inputs(), weight(32, 64)
    stats = stats_of(x)
    wanda_keep = sparsify("wanda", w, pattern, **stats).keep
    sgpt = sparsify("sparsegpt", w, pattern, **stats)
    assert torch.equal(sgpt.weight != 0, sgpt.keep)  # the update never revives a pruned weight
    assert int((~sgpt.keep).sum()) == int(w.numel() * pattern.sparsity)
    assert reconstruction_error(w, sgpt.weight, x) < reconstruction_error(w, w * wanda_keep, x)


@pytest.mark.parametrize("sparsity", [0.5, 0.47])
def test_sparsegpt_row_group_prunes_each_rows_share_and_still_reconstructs_better(sparsity):
    """``--sparsegpt-group row``: every output row keeps the same number of inputs (as
    Wanda's), where the paper's block group lets rows of large weights keep more."""
    x = correlated_inputs(features=200)
    w = weight(32, 200) * torch.linspace(0.2, 3, 32).unsqueeze(1)  # rows of unequal scale
    stats = stats_of(x)
    pattern = parse_pattern(sparsity)
    by_row = sparsify("sparsegpt", w, pattern, group="row", blocksize=64, **stats)
    by_block = sparsify("sparsegpt", w, pattern, blocksize=64, **stats)
    assert ((~by_row.keep).sum(dim=1) == int(200 * sparsity)).all()
    assert len(set((~by_block.keep).sum(dim=1).tolist())) > 1  # the paper's group is uneven
    assert torch.equal(by_row.weight != 0, by_row.keep)
    wanda_keep = sparsify("wanda", w, pattern, **stats).keep
    assert reconstruction_error(w, by_row.weight, x) < reconstruction_error(w, w * wanda_keep, x)


@pytest.mark.parametrize("pattern", [parse_pattern(0.5), parse_pattern(0, "2:4")])
def test_obs_update_keeps_the_given_mask_and_lowers_its_error(pattern):
    """``wanda+obs``: Wanda's mask exactly, with SparseGPT's update of the kept weights."""
    x, w = correlated_inputs(seed=5), weight(32, 64, seed=6)
    stats = stats_of(x)
    keep = sparsify("wanda", w, pattern, **stats).keep
    updated = sparsify("obs", w, pattern, keep=keep, **stats)
    assert torch.equal(updated.keep, keep)
    assert not updated.weight[~keep].any()  # pruned weights stay zero
    assert reconstruction_error(w, updated.weight, x) < 0.9 * reconstruction_error(w, w * keep, x)


def test_obs_after_sparsegpt_is_sparsegpt():
    """obs solves the kept weights from the dense ones: in the mask stage's loop, after
    SparseGPT (whose own update is already that) it changes nothing, where correcting
    SparseGPT's weights a second time made the error worse than no update at all."""
    from stages.masks.pruning import MaskSpec, prune_block

    x = correlated_inputs(seed=7).reshape(4, 128, 64)
    pruned = {}
    for method in ("sparsegpt", "sparsegpt+obs"):
        block = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
        block[0].weight.data.copy_(weight(32, 64, seed=8))
        pruned[method] = prune_block(block, lambda: iter([x]), lambda n: {},
                                     MaskSpec("model", "acts", method=method))["0"]
    (keep, w), (keep_again, w_again) = pruned.values()
    assert torch.equal(keep, keep_again)
    assert torch.allclose(w, w_again, atol=1e-4)


@pytest.mark.parametrize("pattern", [parse_pattern(0.5), parse_pattern(0.6), parse_pattern(0, "2:4")])
def test_dsnot_never_increases_its_error_and_keeps_sparsity_exact(pattern):
    x, w = correlated_inputs(seed=3), weight(32, 64, seed=4)
    stats = stats_of(x)
    start = sparsify("wanda", w, pattern, **stats).keep
    after = sparsify("dsnot", w, pattern, keep=start, **stats, threshold=0.0).keep
    before_err = expected_error(w, start, stats["mean"]).abs()
    after_err = expected_error(w, after, stats["mean"]).abs()
    assert (after_err <= before_err + 1e-6).all()
    assert after_err.sum() < before_err.sum()  # and it did change something
    assert torch.equal(after.sum(dim=1), start.sum(dim=1))  # exact per row
    if pattern.is_nm:
        groups = (~after).reshape(32, -1, pattern.m).sum(-1)
        assert (groups == pattern.n).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_sums_match_float64_over_many_slices(dtype):
    """Sums of fp32 slices of rows, joined in fp64: as exact as summing in fp64 to ~1e-7,
    over more rows than one slice, and the count right."""
    x = (torch.randn(3, 700, 24, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    acc = LayerStats(24)
    acc.add(x[:2])
    acc.add(x[2:])
    ref = x.double().reshape(-1, 24)
    assert acc.count == 2100
    torch.testing.assert_close(acc.sum, ref.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.sumsq, (ref * ref).sum(0), rtol=1e-6, atol=0)


def test_statistics_stay_on_the_inputs_device():
    """Sums live where the block runs (a GPU in practice; 'meta' stands in here), so the
    masks computed from them need no copies between devices."""
    acc = LayerStats(8, hessian=True, device="meta")
    acc.add(torch.empty(2, 5, 8, device="meta"))
    assert all(t.device.type == "meta" for t in acc.as_kwargs().values())


def test_the_mask_key_holds_only_the_parameters_the_method_reads():
    from dataclasses import replace

    from stages.masks.pruning import MaskSpec

    every = {"sparsegpt": {"percdamp": 0.02, "blocksize": 64}, "dsnot": {"cycles": 5},
             "flap": {"structure": "UL-UM"}, "ria": {"power": 1.0}}
    wanda = MaskSpec("model", "acts", method="wanda")
    assert replace(wanda, params=every).key() == wanda.key()
    assert replace(wanda, sparsity=0.6).key() != wanda.key()
    sparsegpt = MaskSpec("model", "acts", method="sparsegpt")
    assert replace(sparsegpt, params={"sparsegpt": {"percdamp": 0.02}}).key() != sparsegpt.key()
    assert replace(sparsegpt, params={"dsnot": {"cycles": 5}}).key() == sparsegpt.key()
    # a parameter given at its default is the same masks
    assert replace(sparsegpt, params={"sparsegpt": {"blocksize": 128}}).key() == sparsegpt.key()
    # unsettled ("auto") SparseGPT computes with the paper's dampening: the same key
    assert replace(sparsegpt, params={"sparsegpt": {"percdamp": 0.01}}).key() == sparsegpt.key()
    dsnot = MaskSpec("model", "acts", method="sparsegpt+dsnot")
    assert replace(dsnot, params={"dsnot": {"cycles": 5}}).key() != dsnot.key()
    flap = MaskSpec("model", "acts", method="flap", sparsity=0.2)
    assert replace(flap, params={"flap": {"bias": False}}).key() != flap.key()
    assert replace(flap, mask_inputs="dense").key() == flap.key()
    assert replace(wanda, batch_size=2).key() == wanda.key()  # batching changes nothing stored


def test_ria_scores_weights_relative_to_their_row_and_column():
    """RIA (Zhang et al., 2024): |W| over its row's and its column's sums, times the input
    norm to the power a. A weight that is small in absolute terms but large within a
    quiet column survives where Wanda or magnitude would drop it."""
    from stages.masks.methods.ria import ria_scores

    w = torch.tensor([[4.0, 0.1], [4.0, 0.2]])
    norms = torch.ones(2)
    scores = ria_scores(w, norms, 0.5)
    expected = w / w.sum(1, keepdim=True) + w / w.sum(0, keepdim=True)
    assert torch.allclose(scores, expected)
    keep = sparsify("ria", w, parse_pattern(0.5), input_norms=norms).keep
    assert keep.tolist() == [[True, False], [True, False]]  # per row, like Wanda
    # the input norm enters as a power: a = 0 ignores it, a = 1 is Wanda's weighting
    loud = torch.tensor([1.0, 100.0])
    assert sparsify("ria", w, parse_pattern(0.5), input_norms=loud, power=1.0).keep[:, 1].all()
    assert not sparsify("ria", w, parse_pattern(0.5), input_norms=loud,
                        power=0.0).keep[:, 1].any()


def test_a_method_is_one_class_whose_fields_are_its_flags_and_checks():
    from stages.masks import METHODS, method_names

    ria = METHODS["ria"]
    assert ria.kind == "scorer" and "ria+dsnot" in method_names()
    assert ria.flag("power") == "--ria-power"
    assert METHODS["sparsegpt"].flag("percdamp") == "--percdamp"  # its published name
    assert METHODS["dsnot"].flag("var_power") == "--dsnot-var-power"
    assert ria(power=-1.0).problems() == ["--ria-power -1.0: must be >= 0"]
    assert METHODS["flap"]().problems() == []


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruned_path_in_memory_or_on_disk_gives_the_same_masks(tmp_path, tiny_model, method,
                                                               monkeypatch):
    """--mask-inputs sequential hands each pruned block's outputs to the next in memory when
    they fit, else through a Zarr scratch: the artifacts are identical, and SparseGPT's new
    weights are written one file per block."""
    from safetensors.torch import load_file

    from stages.inputs import capture
    from stages.masks import pruning
    from stages.model.model_source import resolve_model
    from stages.model.streaming import BlockLoader
    from store import Artifact

    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    activations = tmp_path / "acts"
    capture.capture_dense(BlockLoader(tiny_model, torch.float32), ids,
                          activations / capture.ZARR_NAME, torch.device("cpu"),
                          torch.float16, batch_size=4, attrs={})
    spec = pruning.MaskSpec("m", "a", method=method, batch_size=4)
    built = {}
    for where in ("memory", "disk"):
        if where == "disk":  # no memory to spare: the pruned path goes through Zarr
            monkeypatch.setattr(pruning, "free_memory", lambda device: 0)
        out = tmp_path / where
        out.mkdir()
        pruning.build(spec, out, resolve_model(str(tiny_model)),
                      Artifact("activations", "a", str(activations), "d"), "cpu")
        built[where] = {p.name: load_file(str(p)) for p in out.glob("*.safetensors")}
        assert not (out / "scratch.zarr").exists()
    assert built["memory"].keys() == built["disk"].keys()
    for name, tensors in built["memory"].items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, built["disk"][name][key]), (name, key)
    weight_files = sorted(n for n in built["memory"] if n.startswith("weights"))
    n_blocks = BlockLoader(tiny_model, torch.float32).n_blocks
    assert weight_files == ([f"weights-{i:05d}.safetensors" for i in range(n_blocks)]
                            if method == "sparsegpt" else [])


def test_owl_outlier_ratio_counts_scores_far_above_the_block_mean():
    from stages.masks import owl

    calm = [torch.ones(4, 4), torch.ones(2, 8)]  # no score above 5 x the mean
    assert owl.outlier_ratio(calm, 5.0) == 0.0
    spiky = [torch.ones(4, 4), torch.ones(2, 8)]
    spiky[1][0, 0] = 100.0  # mean (31 + 100) / 32 ~ 4.1: only the spike is above 5 x it
    assert owl.outlier_ratio(spiky, 5.0) == pytest.approx(1 / 32)
    assert owl.outlier_ratio(spiky, 30.0) == 0.0


def test_owl_sparsities_prune_outlier_blocks_less_and_keep_the_mean():
    from stages.masks import owl

    ratios = [0.01, 0.05, 0.02, 0.03]
    sparsities = owl.owl_sparsities(ratios, 0.7, 0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.7)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # 2 x limit
    assert sparsities[1] == min(sparsities) and sparsities[0] == max(sparsities)
    assert owl.owl_sparsities([0.02] * 3, 0.5, 0.08) == [0.5] * 3  # nothing stands out


def test_owl_masks_vary_by_block_around_the_target(tmp_path, tiny_model):
    import json

    from stages.inputs import capture
    from stages.masks import pruning
    from stages.model.model_source import resolve_model
    from stages.model.streaming import BlockLoader
    from store import Artifact

    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    activations = tmp_path / "acts"
    capture.capture_dense(BlockLoader(tiny_model, torch.float32), ids,
                          activations / capture.ZARR_NAME, torch.device("cpu"),
                          torch.float16, batch_size=4, attrs={})
    spec = pruning.MaskSpec("m", "a", sparsity=0.6, layer_sparsity="owl", owl_threshold=2.0,
                            owl_limit=0.1, batch_size=4)
    pruning.validate(spec)
    pruning.build(spec, tmp_path, resolve_model(str(tiny_model)),
                  Artifact("activations", "a", str(activations), "d"), "cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    blocks = report["layer_sparsity"]["block_sparsity"]
    assert sum(blocks) / len(blocks) == pytest.approx(0.6, abs=1e-5)
    assert max(blocks) - min(blocks) == pytest.approx(0.2, abs=1e-5)
    assert report["pattern_ok"]
    for row in report["layers"]:  # every layer pruned to its own block's sparsity
        block = int(row["layer"].split(".")[0])
        cols = row["shape"][1]  # Wanda prunes floor(cols x sparsity) in every row
        assert row["sparsity"] == pytest.approx(int(cols * blocks[block]) / cols, abs=1e-6)
    uniform = pruning.MaskSpec("m", "a", sparsity=0.6)
    assert uniform.key() != spec.key()
    # OWL's own settings are in the key only when OWL runs
    assert uniform.key() == pruning.MaskSpec("m", "a", sparsity=0.6, owl_limit=0.2).key()


def test_capture_records_the_input_statistics_a_mask_pass_would_collect(tmp_path, tiny_model):
    """OWL reads the input norms the capture recorded on its own pass: they equal those of
    a separate pass of the dense block over the captured inputs."""
    import stages.model.architecture as arch
    import store.activations as acts
    from stages.inputs import capture
    from stages.masks.block_stats import collect_stats
    from stages.model.streaming import BlockLoader
    from store import Artifact

    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    activations = tmp_path / "acts"
    loader = BlockLoader(tiny_model, torch.float32)
    capture.capture_dense(loader, ids, activations / capture.ZARR_NAME, torch.device("cpu"),
                          torch.float16, batch_size=4, attrs={})
    group = acts.open_group(activations / capture.ZARR_NAME)
    kwargs = {n: loader.block_kwargs(n, 16, torch.device("cpu"), torch.float32) for n in (2, 4)}
    for index in range(loader.n_blocks):
        block = loader.block(index)
        linears = arch.linear_layers(block)

        def batches(index=index):
            for start in (0, 4):
                yield acts.read(group, index, start, min(start + 4, 6)).float()

        direct = collect_stats(block, linears, batches, kwargs.__getitem__, hessian=False)
        recorded = capture.input_stats(Artifact("activations", "a", str(activations), "d"),
                                       index, linears)
        assert recorded.keys() == direct.keys() == linears.keys()
        for name in linears:
            for stat, value in direct[name].as_kwargs().items():
                torch.testing.assert_close(recorded[name].as_kwargs()[stat], value)
