"""The main job on a tiny Llama: masks, EBFT per block, resume, assembly, one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open

import stages.recovery.block_training as training
from flows.cli import main
from flows.dense import DenseConfig
from flows.run import PruneConfig, RunConfig, run_flow
from stages.model import architecture as arch
from stages.recovery import ebft
from stages.recovery.block_training import NonFiniteLoss, TrainConfig


def config(store: Path, model: Path, data_dir: Path, **overrides) -> RunConfig:
    dense = DenseConfig(model=str(model), store=str(store), data_dir=str(data_dir), nsamples=8,
                        seqlen=64, eval_seqlen=64, eval_windows=2, batch_size=4)
    # plain EBFT on the mask stage's masks (re-masking, a default, has its own tests)
    train = TrainConfig(lr=1e-3, batch_size=2, max_epochs=3, tolerance=0.0, holdout=0.25,
                        remask=False)
    prune = PruneConfig("wanda", 0.5, layer_sparsity="uniform")  # every layer at 0.5
    return replace(RunConfig(dense=dense, prune=prune, train=train),
                   **overrides)


def linear_weights(folder: str) -> dict[str, torch.Tensor]:
    """Every decoder linear weight of a saved model, read straight from its safetensors."""
    out = {}
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if "layers." in k  # noqa: SIM118
                        and k.endswith("proj.weight")})
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("run-model"))


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, tmp_path_factory, model, data_dir) -> dict:
    return run_flow(config(tmp_path_factory.mktemp("store-a"), model, data_dir))


def test_ebft_lowers_every_block_loss_and_keeps_the_mask(uninterrupted):
    report = uninterrupted
    assert len(report["blocks"]) == 3
    for record in report["blocks"]:
        assert record["end_loss"] < record["start_loss"], record
        assert record["epochs"] >= 1 and record["tokens_per_s"] > 0
        assert set(record["sparsity"].values()) == {0.5}
    ppl = report["perplexity"]
    assert ppl["finetuned"]["perplexity"] < ppl["pruned"]["perplexity"]


def test_assembled_folder_loads_with_stock_transformers_at_the_requested_sparsity(
        uninterrupted):
    from transformers import AutoModelForCausalLM

    folder = uninterrupted["model_folder"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # no custom code, no mask tensors
    assert not any("mask" in name for name in linear_weights(folder))
    for block in arch.decoder_blocks(loaded):
        for name, linear in arch.linear_layers(block).items():
            w = linear.weight
            assert (w == 0).sum(dim=1).tolist() == [w.shape[1] // 2] * w.shape[0], name
    report = json.loads(Path(uninterrupted["report_path"]).read_text())
    assert report["config"]["prune"]["method"] == "wanda"
    assert len(report["blocks"]) == 3 and report["masks"]["digest"]


def test_train_norms_changes_the_norms_in_the_saved_model_and_keeps_the_mask(
        prefect_server, tmp_path, model, data_dir, uninterrupted):
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path / "store", model, data_dir)
    report = run_flow(replace(cfg, train=replace(cfg.train, train_norms=True)))
    tuned = AutoModelForCausalLM.from_pretrained(report["model_folder"])
    dense = AutoModelForCausalLM.from_pretrained(model)
    plain = AutoModelForCausalLM.from_pretrained(uninterrupted["model_folder"])
    for index, block in enumerate(arch.decoder_blocks(tuned)):
        norm = block.input_layernorm.weight
        assert not torch.equal(norm, arch.decoder_blocks(dense)[index].input_layernorm.weight)
        assert torch.equal(arch.decoder_blocks(plain)[index].input_layernorm.weight,
                           arch.decoder_blocks(dense)[index].input_layernorm.weight)
        for name, linear in arch.linear_layers(block).items():
            w = linear.weight
            assert (w == 0).sum(dim=1).tolist() == [w.shape[1] // 2] * w.shape[0], name
    for record in report["blocks"]:
        assert record["end_loss"] < record["start_loss"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_weights_are_zero_after_every_step(monkeypatch, tmp_path, model, data_dir,
                                                  prefect_server, weight_decay):
    """Without decay nothing re-masks the weights (zero gradients keep Adam's update at
    exactly zero); with decay the zeros are put back after each step."""
    checked = []
    original = training.BlockTuner.after_step

    def after_step_then_check(self):
        original(self)
        for name, w in self.weights.items():
            assert not w[~self.keep[name]].any(), name
        checked.append(1)

    monkeypatch.setattr(training.BlockTuner, "after_step", after_step_then_check)
    cfg = config(tmp_path / "store", model, data_dir,
                 prune=PruneConfig("sparsegpt", 0.6, layer_sparsity="uniform"),
                 finetune="ebft")
    run_flow(replace(cfg, train=replace(cfg.train, weight_decay=weight_decay)))
    assert len(checked) >= 3 * 3  # 3 blocks, 3 steps per epoch at least one epoch each


def test_preloaded_rows_equal_streamed_rows(tmp_path):
    """Training batches sliced from memory hold exactly the stored values."""
    import store.activations as acts

    group = acts.create(tmp_path / "a.zarr", 2, (6, 4, 8), torch.bfloat16, {})
    for boundary in range(2):
        acts.write(group, boundary, 0, torch.randn(6, 4, 8))
    ctx = type("Ctx", (), {"n": 6, "seqlen": 4, "hidden": 8, "device": torch.device("cpu")})
    rows = [4, 0, 3]
    memory = ebft.preload(ctx, (group, 0), (group, 1))(rows)
    streamed = ebft.preload(ctx, (group, 0), (group, 1), share=0.0)(rows)
    handed_over = acts.read(group, 0, 0, 6)  # block inputs handed over in memory
    for share in (0.25, 0.0):
        from_memory = ebft.preload(ctx, handed_over, (group, 1), share=share)(rows)
        for a, b in zip(from_memory, streamed, strict=True):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    for a, b in zip(memory, streamed, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_resume_after_failure_at_block_k_recomputes_nothing_before_it(
        monkeypatch, tmp_path, model, data_dir, uninterrupted):
    cfg = config(tmp_path / "store", model, data_dir)
    crash_at_block_2(monkeypatch, cfg)
    resumed = resume_without_boundaries(cfg, tmp_path / "store")
    assert resumed["states"]["masks"] == "Cached"
    assert resumed["states"]["dense-capture"] == "Cached"
    assert_same_weights(resumed, uninterrupted)


def crash_at_block_2(monkeypatch, cfg: RunConfig) -> None:
    """Run ``cfg`` until block 2's training raises, as a crash there would."""
    real = training.train_block

    def failing_at_block_2(*args, **kwargs):
        if kwargs.get("index", args[9] if len(args) > 9 else 0) == 2:
            raise RuntimeError("simulated crash in block 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(ebft.training, "train_block", failing_at_block_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_flow(cfg)
    monkeypatch.setattr(ebft.training, "train_block", real)


def resume_without_boundaries(cfg: RunConfig, store: Path) -> dict:
    """Rerun as a new process would after a crash at block 2, with the saved boundary lost
    too: block 2's inputs are rebuilt from the cached blocks, not retrained."""
    ebft.HANDOVER.clear()  # nothing handed over in memory
    for boundary in (store / "ebft-boundary").iterdir():
        __import__("shutil").rmtree(boundary)
    resumed = run_flow(cfg)
    assert resumed["states"]["ebft"] == "2 Cached, 1 Completed"
    return resumed


def assert_same_weights(a: dict, b: dict) -> None:
    mine, theirs = (linear_weights(r["model_folder"]) for r in (a, b))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("deleted", ["before the read", "during the read"])
def test_a_boundary_deleted_while_it_is_read_is_looked_for_again(
        monkeypatch, tmp_path, model, data_dir, uninterrupted, deleted):
    """Two runs on one store: the other run, having trained the next block, deletes the
    boundary this one is reading (before the read: an error; during it, once the array is
    open: its chunks read as zeros, so the folder is checked once read). The read is tried
    again on the store's new state (here: nothing stored any more, so the inputs are
    rebuilt from the cached blocks), and the weights are those of a run that never
    stopped."""
    import shutil

    import numpy as np

    import store.activations as acts

    cfg = config(tmp_path / "store", model, data_dir)
    crash_at_block_2(monkeypatch, cfg)
    ebft.HANDOVER.clear()  # a new process: nothing handed over in memory
    real_read, vanished = acts.read, []

    def deleted_by_another_run(group, boundary, start, stop):
        folder = Path(str(group.store.root)).parent
        if "ebft-boundary" not in str(folder) or vanished:
            return real_read(group, boundary, start, stop)
        vanished.append(folder.name)
        if deleted == "before the read":
            shutil.rmtree(folder)
            return real_read(group, boundary, start, stop)
        array = group[acts.boundary_name(boundary)]  # open, then its chunks deleted
        shutil.rmtree(folder)
        return acts._as_tensor(group, np.asarray(array[start:stop]))

    monkeypatch.setattr(acts, "read", deleted_by_another_run)
    resumed = run_flow(cfg)
    assert vanished, "the stored boundary of block 1 was read"
    assert resumed["states"]["ebft"] == "2 Cached, 1 Completed"
    assert_same_weights(resumed, uninterrupted)


def test_in_bf16_autocast_with_remasking_a_resumed_run_equals_an_uninterrupted_one(
        monkeypatch, tmp_path, model, data_dir, prefect_server):
    """Every forward pass of the EBFT stage (boundaries handed over, boundaries rebuilt on
    resume, re-masking statistics) runs in the training's autocast: a run resumed at block
    2 with its inputs rebuilt gets the same masks and weights as one that never stopped.
    Forced bf16, so the path is tested on CPUs where 'auto' means fp32 too."""
    cfg = config(tmp_path / "whole", model, data_dir)
    cfg = replace(cfg, train=replace(cfg.train, autocast="bfloat16", remask=True, max_epochs=1))
    whole = run_flow(cfg)
    assert {r["autocast"] for r in whole["blocks"]} == {"bfloat16"}
    fp32 = run_flow(replace(cfg, train=replace(cfg.train, autocast="none")))
    assert any(not torch.equal(a, b) for a, b in zip(
        linear_weights(whole["model_folder"]).values(),
        linear_weights(fp32["model_folder"]).values(), strict=True))

    cfg = replace(cfg, dense=replace(cfg.dense, store=str(tmp_path / "store")))
    crash_at_block_2(monkeypatch, cfg)
    assert_same_weights(resume_without_boundaries(cfg, tmp_path / "store"), whole)


def test_boundaries_handed_over_in_memory_without_writes_give_the_same_weights(
        monkeypatch, tmp_path, model, data_dir, uninterrupted):
    """--no-boundary-writes: each block's outputs reach the next block in memory only (one
    forward pass per block but the last, none rebuilt), the store holds no boundary, and
    the weights equal a run that wrote them."""
    forwards = []
    real = ebft.Context.forward
    monkeypatch.setattr(ebft.Context, "forward",
                        lambda self, *a, **k: forwards.append(1) or real(self, *a, **k))
    cfg = replace(config(tmp_path / "store", model, data_dir), write_boundaries=False)
    result = run_flow(cfg)
    assert len(forwards) == 2  # blocks 0 and 1 hand over; the last block's outputs: unused
    assert not list((tmp_path / "store").glob("ebft-boundary/*"))
    mine, theirs = (linear_weights(r["model_folder"]) for r in (result, uninterrupted))
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


def test_new_learning_rate_retrains_only_the_blocks(tmp_path, model, data_dir, uninterrupted,
                                                    prefect_server):
    store = Path(uninterrupted["report_path"]).parents[2]
    cfg = config(store, model, data_dir)
    again = run_flow(replace(cfg, train=replace(cfg.train, lr=5e-4)))
    assert again["states"]["calibration"] == again["states"]["dense-capture"] == "Cached"
    assert again["states"]["masks"] == again["states"]["perplexity-pruned"] == "Cached"
    assert again["states"]["ebft"] == "3 Completed"
    # The store is the cache: Prefect keeps no result records or files of its own there
    # (nothing that could point at a deleted artifact, nothing pickled).
    assert not (store / "prefect").exists()


def test_nonfinite_loss_names_block_and_step_and_keeps_earlier_blocks(
        monkeypatch, tmp_path, model, data_dir, prefect_server):
    cfg = config(tmp_path / "store", model, data_dir)
    real = training.train_block

    def huge_lr_at_block_1(block, keep, batches, train_rows, holdout_rows, kwargs_for,
                           train_cfg, *args, **kwargs):
        if kwargs.get("index", args[2] if len(args) > 2 else 0) == 1:
            train_cfg = replace(train_cfg, lr=1e30)
        return real(block, keep, batches, train_rows, holdout_rows, kwargs_for, train_cfg,
                    *args, **kwargs)

    monkeypatch.setattr(ebft.training, "train_block", huge_lr_at_block_1)
    with pytest.raises(NonFiniteLoss, match=r"block 1: loss is (nan|inf) at step \d+"):
        run_flow(cfg)
    assert len(list((tmp_path / "store" / "ebft-block").iterdir())) == 1  # block 0 kept


def test_mask_tuning_keeps_weights_and_exact_nm_pattern(tmp_path, model, data_dir,
                                                        prefect_server):
    cfg = config(tmp_path / "store", model, data_dir, prune=PruneConfig("wanda", 0.5, "2:4"))
    cfg = replace(cfg, train=replace(cfg.train, tune="mask", mask_lr=5e-2))
    report = run_flow(cfg)
    dense = linear_weights(str(model))
    for name, w in linear_weights(report["model_folder"]).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name  # exactly 2 of every 4 inputs, as before tuning
        kept = w != 0
        assert torch.equal(w[kept], dense[name][kept]), name  # weights frozen, only chosen
    for r in report["blocks"]:  # each block keeps its best held-out loss (start or an epoch)
        assert r["end_loss"] == min([r["start_loss"], *r["eval_losses"]]), r


def test_sequential_and_dense_mask_inputs_differ_after_block_0(tmp_path, model, data_dir,
                                                               prefect_server):
    reports = {}
    for inputs in ("sequential", "dense"):
        cfg = config(tmp_path / "store", model, data_dir, finetune="none",
                     prune=PruneConfig("wanda", 0.5, mask_inputs=inputs,
                                       layer_sparsity="uniform"))
        reports[inputs] = run_flow(cfg)
    a, b = (linear_weights(r["model_folder"]) for r in reports.values())
    first = [n for n in a if ".layers.0." in n]
    later = [n for n in a if ".layers.0." not in n]
    assert all(torch.equal(a[n], b[n]) for n in first)  # same inputs: the embeddings
    assert not all(torch.equal(a[n], b[n]) for n in later)
    assert reports["dense"]["states"]["dense-capture"] == "Cached"  # shared capture


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "1.5"], "--sparsity 1.5"),
    (["--sparsity", "-0.1"], "--sparsity -0.1"),
    (["--pattern", "5:4"], "--pattern"),
    (["--pattern", "2-4"], "--pattern"),
    (["--method", "bogus"], "magnitude"),
    (["--tune", "both"], "--tune"),
    (["--epochs", "0"], "--epochs"),
    (["--tune", "mask", "--train-norms"], "--train-norms"),
])
def test_bad_run_inputs_fail_in_one_line_and_leave_the_store_empty(
        tmp_path, model, data_dir, capsys, flags, message):
    store = tmp_path / "store"
    code = main(["run", "--model", str(model), "--store", str(store), "--data-dir",
                 str(data_dir), "--nsamples", "4", "--seqlen", "64", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ebft: error:") and "\n" not in err and message in err, err
    assert not store.exists() or not any(p for p in store.rglob("*") if p.is_file())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "wanda+dsnot",
                                    "sparsegpt+dsnot", "wanda+obs"])
@pytest.mark.parametrize("sparsity, pattern", [(0.6, None), (0.0, "2:4")])
def test_mask_stage_on_a_tiny_llama(prefect_server, tmp_path_factory, model, data_dir, method,
                                    sparsity, pattern):
    from stages.masks.core import parse_pattern
    from stages.masks.mask_files import REPORT_FILE, load_masks, pattern_holds
    from store import Artifact

    store = tmp_path_factory.getbasetemp() / "mask-stage-store"  # shared: one capture
    cfg = config(store, model, data_dir, finetune="none",
                 prune=PruneConfig(method, sparsity, pattern, layer_sparsity="uniform"))
    report = run_flow(cfg)
    masks = Artifact(**report["masks"])
    stored = json.loads((Path(masks.path) / REPORT_FILE).read_text())
    assert stored["pattern_ok"] and len(stored["layers"]) == 3 * 7
    parsed = parse_pattern(sparsity, pattern)
    for name, keep in load_masks(masks).items():
        assert pattern_holds(keep, parsed), name
        if pattern:
            assert ((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
        elif method.startswith("wanda"):  # compared within each output row
            assert (~keep).sum(1).tolist() == [int(keep.shape[1] * 0.6)] * len(keep), name
        else:
            assert int((~keep).sum()) == int(keep.numel() * 0.6), name  # exact per layer
    # the pruned model (no fine-tuning) is a model folder whose zeros are the masks
    zeros = {n: (w == 0) for n, w in linear_weights(report["model_folder"]).items()}
    assert sum(int(z.sum()) for z in zeros.values()) == stored["pruned"]
    assert report["perplexity"]["pruned"]["perplexity"] > 0
    # new weights, besides the masks, where SparseGPT's update ran (obs: on Wanda's mask)
    assert bool(list(Path(masks.path).glob("weights-*.safetensors"))) == \
        (method.startswith("sparsegpt") or method.endswith("+obs"))


def test_prefect_yaml_deployment_parameters_are_valid_configs(monkeypatch):
    import yaml

    from flows.dense import dense_flow

    monkeypatch.setenv("EBFT_STORE", "/shared/store")  # the worker's environment decides
    deployments = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())["deployments"]
    flows = {"flows.run:run_flow": run_flow, "flows.dense:dense_flow": dense_flow}
    run = next(d for d in deployments if d["entrypoint"] == "flows.run:run_flow")
    cfg = run_flow.validate_parameters(run["parameters"])["cfg"]
    assert isinstance(cfg, RunConfig) and cfg.prune.method == "wanda"
    assert cfg.train.max_epochs == 1 and cfg.dense.eval_windows is None
    assert cfg.dense.store == "/shared/store" and cfg.dense.data_dir is None
    from flows.sweep import SweepConfig, expand, sweep_flow

    flows["flows.sweep:sweep_flow"] = sweep_flow
    for d in deployments:  # every entrypoint is a module path of the installed package
        assert d["entrypoint"] in flows and d["concurrency_limit"] == 1, d["name"]
    sweeps = {d["name"]: d for d in deployments if d["entrypoint"] == "flows.sweep:sweep_flow"}
    assert set(sweeps) == {"smollm2-table1-nightly", "llama2-7b-paper"}
    nightly = sweep_flow.validate_parameters(sweeps["smollm2-table1-nightly"]["parameters"])
    assert isinstance(nightly["sweep"], SweepConfig)
    assert len(expand(nightly["sweep"])) == 27  # 3 methods x 3 sparsities x 3 recoveries
    assert nightly["sweep"].base.dense.eval_windows == 16  # sized for a night (README)
    assert nightly["sweep"].base.zeroshot.tasks == ()
    paper = sweep_flow.validate_parameters(sweeps["llama2-7b-paper"]["parameters"])["sweep"]
    from flows.config import build_config

    preset = build_config("paper")  # the paper deployment is the paper preset on a GPU
    assert paper.base.train == preset.train and paper.base.dense.eval_windows is None
    assert paper.base.distill == preset.distill and preset.distill.epochs == 0
    assert paper.base.dense.nsamples == preset.dense.nsamples == 256
    assert paper.base.prune.sparsegpt == preset.prune.sparsegpt  # the paper's dampening
    # the nightly rows are the paper's method: one SparseGPT mask with and without EBFT
    assert nightly["sweep"].base.prune.sparsegpt.percdamp == 0.01
    # the nightly main job is the default preset
    assert (cfg.train, cfg.distill) == (build_config().train, build_config().distill)
    assert nightly["sweep"].base.distill.epochs == 0  # the paper's rows: EBFT alone


def test_no_block_task_loads_the_whole_model(prefect_server, tmp_path, model, data_dir,
                                             monkeypatch):
    """Whole-model loads in a run: one, the distillation's student. Capture, masks, EBFT's
    blocks, the three perplexities and assembly read one block at a time (only
    distillation, LoRA, zero-shot and --form compact load the whole model)."""
    from transformers import AutoModelForCausalLM

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    cfg = config(tmp_path / "store", model, data_dir)
    report = run_flow(replace(cfg, distill=replace(cfg.distill, epochs=0)))
    assert report["states"]["ebft"] == "3 Completed"
    assert loads == []
    report = run_flow(cfg)  # the same blocks, distilled
    assert report["states"]["ebft"] == "3 Cached" and cfg.distill.epochs == 1
    assert [Path(p).parent.name for p in loads] == ["models-sparse"]


def test_remask_alternates_pruning_and_reconstruction_at_owl_sparsities(
        tmp_path, model, data_dir, prefect_server):
    """--remask (the default, auto, turns it on here): each block's mask is chosen again on
    the fine-tuned blocks' outputs, at the block's own (OWL) sparsity; block 0 sees the
    embeddings either way, so its mask is the mask stage's; later blocks' masks move."""
    prune = PruneConfig("wanda", 0.5, layer_sparsity="owl", owl_threshold=2.0, owl_limit=0.1)
    cfg = config(tmp_path / "store", model, data_dir, prune=prune)
    stage_only = run_flow(replace(cfg, finetune="none"))
    # in fp32, as the mask stage chose block 0's mask (in bf16 autocast the statistics of
    # the layers after attention differ slightly, and a near-tie may swap)
    remasked = run_flow(replace(cfg, train=replace(cfg.train, remask=None, autocast="none")))
    assert remasked["states"]["masks"] == "Cached"  # the mask stage is shared
    report = json.loads(Path(remasked["report_path"]).read_text())
    assert report["config"]["train"]["remask"] is True  # auto, settled before any stage
    blocks = remasked["mask_report"]["layer_sparsity"]["block_sparsity"]
    assert len(set(blocks)) > 1 and sum(blocks) / len(blocks) == pytest.approx(0.5, abs=1e-5)
    a = linear_weights(stage_only["model_folder"])
    b = linear_weights(remasked["model_folder"])
    for name, weight in b.items():
        block = int(name.split(".layers.")[1].split(".")[0])
        cols = weight.shape[1]
        assert (weight == 0).sum(dim=1).tolist() == [int(cols * blocks[block])] * len(weight)
        if block == 0:
            assert torch.equal(weight == 0, a[name] == 0), name
    later = [n for n in b if ".layers.0." not in n]
    assert not all(torch.equal(b[n] == 0, a[n] == 0) for n in later)
    for record in remasked["blocks"]:
        assert record["end_loss"] < record["start_loss"]


def test_sublayer_windows_train_attention_then_mlp_and_keep_the_mask(
        tmp_path, model, data_dir, prefect_server):
    cfg = config(tmp_path / "store", model, data_dir)
    report = run_flow(replace(cfg, train=replace(cfg.train, window="sublayers")))
    for record in report["blocks"]:
        attention = record["attention"]
        assert attention["end_loss"] < attention["start_loss"], attention
        assert record["end_loss"] < record["start_loss"], record
        # both windows' layers are in the record, at the mask's sparsity
        assert {n.split(".")[0] for n in record["sparsity"]} == {"self_attn", "mlp"}
        assert set(record["sparsity"].values()) == {0.5}
    ppl = report["perplexity"]
    assert ppl["finetuned"]["perplexity"] < ppl["pruned"]["perplexity"]


def test_the_attention_window_stops_at_the_norm_before_the_mlp(model):
    """The first window's output is the residual stream after attention: the block's input
    plus its attention's output, with the MLP never run."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model)
    block = arch.decoder_blocks(dense)[0]
    x = torch.randn(1, 8, dense.config.hidden_size)
    kwargs = arch.block_kwargs(dense, 1, 8, torch.device("cpu"), torch.float32)
    ran = []
    block.mlp.register_forward_pre_hook(lambda *_: ran.append("mlp"))
    h = training.stopped_at(arch.attention_end(block),
                            lambda: arch.run_block(block, x, kwargs))
    attention = block.self_attn(hidden_states=block.input_layernorm(x), **kwargs)[0]
    assert ran == [] and torch.allclose(h, x + attention, atol=1e-6)


def test_start_dense_trains_from_the_dense_weights_under_the_method_mask(
        tmp_path, model, data_dir, prefect_server):
    """--start dense: a block trains from the dense weights under SparseGPT's mask, not
    from SparseGPT's updated weights (--start method, the default). With a learning rate
    too small to move a weight, the saved blocks are exactly where training started; at a
    real rate, a method that only chooses masks (Wanda) trains the same either way (the
    pruned weights must start at zero: training masks only the gradients)."""
    prune = PruneConfig("sparsegpt", 0.5, layer_sparsity="uniform")  # one dampening for both
    prune = replace(prune, sparsegpt=replace(prune.sparsegpt, percdamp=0.01))
    cfg = config(tmp_path / "store", model, data_dir, prune=prune)
    cfg = replace(cfg, train=replace(cfg.train, lr=1e-12, max_epochs=1, autocast="none"),
                  distill=replace(cfg.distill, epochs=0))
    pruned = linear_weights(run_flow(replace(cfg, finetune="none"))["model_folder"])
    dense = linear_weights(str(model))
    from_method = linear_weights(run_flow(cfg)["model_folder"])
    from_dense = linear_weights(run_flow(
        replace(cfg, train=replace(cfg.train, start="dense")))["model_folder"])
    for name, weight in pruned.items():
        keep = weight != 0
        assert not torch.allclose(weight, dense[name] * keep)  # SparseGPT moved the kept ones
        torch.testing.assert_close(from_method[name], weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_dense[name], dense[name] * keep, atol=1e-6, rtol=0)
    wanda = replace(cfg, prune=PruneConfig("wanda", 0.5, layer_sparsity="uniform"),
                    train=replace(cfg.train, lr=1e-3))
    method = run_flow(wanda)
    start_dense = run_flow(replace(wanda, train=replace(wanda.train, start="dense")))
    assert [b["start_loss"] for b in start_dense["blocks"]] == \
        [b["start_loss"] for b in method["blocks"]]
    a, b = linear_weights(method["model_folder"]), linear_weights(start_dense["model_folder"])
    assert all(torch.equal(a[name], b[name]) for name in a)
