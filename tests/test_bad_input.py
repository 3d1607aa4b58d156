"""Bad input of every kind: one line naming what is wrong and how to fix it, exit status 2,
nothing written to the store, before any stage runs (the README's bad-input table)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main

RUN = ["--nsamples", "4", "--seqlen", "64", "--eval-seqlen", "64", "--eval-windows", "1",
       "--batch-size", "2"]


def run_fails(capsys, model, data_dir, store: Path, *flags: str) -> str:
    capsys.readouterr()  # what building the probe printed
    code = main(["run", "--model", str(model), "--store", str(store), "--data-dir",
                 str(data_dir), *RUN, *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("ebft: error:") and "\n" not in err, err
    written = [p for p in store.rglob("*") if p.is_file()] if store.is_dir() else []
    assert written == [], written  # nothing written, not even bookkeeping
    return err


@pytest.mark.parametrize("flags, message", [
    (["--pattern", "2:4", "--sparsity", "0.7"], "--pattern and --sparsity both"),
    (["--finetune", "none", "--tune", "mask", "--lr", "5", "--epochs", "99"],
     "--epochs, --lr, --tune would be ignored: --finetune none trains nothing"),
    (["--finetune", "lora", "--epochs", "3"], "--epochs would be ignored"),
    (["--lora-rank", "4"], "--lora-rank would be ignored"),
    (["--tune", "mask", "--lr", "1e-3"], "--lr would be ignored: --tune mask"),
    (["--mask-lr", "1e-2"], "--mask-lr would be ignored"),
    (["--blocksize", "64"], ("--blocksize would be ignored: they set SparseGPT, and --method wanda "
                                  "does not run it")),
    (["--dsnot-cycles", "5"], "--dsnot-cycles would be ignored"),
    (["--flap-structure", "UL-UM"], "--flap-structure would be ignored"),
    (["--method", "flap", "--sparsity", "0.2", "--mask-inputs", "dense"],
     "--mask-inputs would be ignored"),
    (["--eval-windows", "0"], "--eval-windows 0: must be positive"),
    (["--batch-size", "0"], "--batch-size 0: must be positive"),
    (["--method", "wanda+dsnot", "--dsnot-cycles", "-5"], "--dsnot-cycles -5: must be >= 0"),
    (["--method", "sparsegpt", "--percdamp", "-1"], "--percdamp -1.0: must be in (0, 1]"),
    (["--method", "sparsegpt", "--blocksize", "0"], "--blocksize 0: must be at least 1"),
    (["--method", "sparsegpt", "--sparsegpt-group", "col"],
     "--sparsegpt-group 'col': choose block or row"),
    (["--nsamples", "-3"], "--nsamples -3: must be a positive"),
    (["--nsamples", "-3", "--holdout", "0.5"], "--nsamples -3"),  # the flag, not --holdout
    (["--train-seed", "-1"], "--train-seed -1: must be >= 0"),
    (["--finetune", "lora", "--lora-alpha", "0"], "--lora-alpha 0.0: must be positive"),
    (["--nsamples", "1000000000"], "needs about"),
    (["--tasks", "storycloze"], "--tasks storycloze: no data for any of them"),
    (["--store", "nosuch://bucket/x"], "--store nosuch://bucket/x: Protocol not known"),
    (["--block-inputs", "parallel"], "--block-inputs 'parallel': choose sequential or dense"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--address", "tcp://127.0.0.1:1"], "--address would be ignored"),
    (["--keep-boundaries", "--no-boundary-writes"], "--keep-boundaries keeps what"),
    (["--distill-epochs", "-1"], "--distill-epochs -1: must be >= 0 (0: off)"),
    (["--distill-epochs", "1", "--distill-lr", "0"], "--distill-lr 0.0: must be positive"),
    (["--distill-top", "0"], "--distill-top 0.0: must be in (0, 1]"),
    (["--distill-top", "1.5"], "--distill-top 1.5: must be in (0, 1]"),
    (["--distill-epochs", "0", "--distill-top", "0.5"],
     "--distill-top would be ignored: --distill-epochs is 0"),
    (["--finetune", "none", "--distill-epochs", "1"],
     "--distill-epochs would be ignored: --finetune none trains nothing"),
    (["--distill-epochs", "0", "--distill-lr", "1e-3"],
     "--distill-lr would be ignored: --distill-epochs is 0"),
    (["--tune", "mask", "--distill-epochs", "1"],
     "--distill-epochs would be ignored: --tune mask keeps the weights"),
    (["--eval-data", "lambada"], "--eval-data 'lambada': choose one of wikitext2, "),
    (["--loss", "l1"], "--loss 'l1': choose mse, nmse, capped"),
    (["--schedule", "step"], "--schedule 'step': choose linear, cosine, constant"),
    (["--warmup", "1.5"], "--warmup 1.5: must be in [0, 1)"),
    (["--calibration", "wiki"], "--calibration 'wiki': choose c4 or generated"),
    (["--window", "heads"], "--window 'heads': choose block or sublayers"),
    (["--start", "pruned"], "--start 'pruned': choose method or dense"),
    (["--remask", "--block-inputs", "dense"], "--remask chooses each mask on the fine-tuned"),
    (["--method", "flap", "--sparsity", "0.2", "--remask"], "--remask chooses single weights"),
    (["--layer-sparsity", "owl", "--pattern", "2:4"], "--layer-sparsity owl varies"),
    (["--owl-limit", "0.1", "--layer-sparsity", "uniform"],
     "--owl-limit would be ignored: they set OWL"),
    (["--owl-threshold", "3", "--pattern", "2:4"], "--owl-threshold would be ignored"),
    (["--remask", "maybe"], "--remask 'maybe': not on, off or auto"),
    (["--layer-sparsity", "owl", "--owl-limit", "0.6"], "--owl-limit 0.6: must be >= 0"),
    (["--layer-sparsity", "bimodal"], "--layer-sparsity 'bimodal': choose auto, uniform or owl"),
])
def test_bad_flags(tmp_path, tiny_model, data_dir, capsys, flags, message):
    err = run_fails(capsys, tiny_model, data_dir, tmp_path / "store", *flags)
    assert message in err, err


def test_a_store_that_is_a_file(tmp_path, tiny_model, data_dir, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    code = main(["run", "--model", str(tiny_model), "--store", str(target), "--data-dir",
                 str(data_dir), *RUN])
    assert code == 2 and "is a file; pass a folder" in capsys.readouterr().err


# ---- models --------------------------------------------------------------------------------

def _tokenizer_of(folder: Path, tiny_model: Path) -> None:
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)


def gpt2(folder: Path, tiny_model: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256)).save_pretrained(
        folder)
    _tokenizer_of(folder, tiny_model)


def bert(folder: Path, tiny_model: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=256)).save_pretrained(folder)
    _tokenizer_of(folder, tiny_model)


def corrupt_config(folder: Path, tiny_model: Path) -> None:
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama", ')


def remote_code(folder: Path, tiny_model: Path) -> None:
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("make, message", [
    (gpt2, "model_type 'gpt2' is not supported"),
    (bert, "model_type 'bert' is not supported"),
    (corrupt_config, "is not a readable JSON config"),
    (remote_code, "needs its own remote code"),
])
def test_unsupported_or_broken_models(tmp_path, tiny_model, data_dir, capsys, make, message):
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder, tiny_model)
    err = run_fails(capsys, folder, data_dir, tmp_path / "store", "--finetune", "none")
    assert message in err, err


def test_the_default_model_is_not_converted_for_a_seqlen_it_cannot_take(tmp_path, data_dir,
                                                                        capsys):
    pytest.importorskip("gguf")
    capsys.readouterr()
    code = main(["run", "--store", str(tmp_path / "store"), "--data-dir", str(data_dir),
                 "--seqlen", "99999"])
    err = capsys.readouterr().err
    assert code == 2 and "--seqlen 99999 exceeds the model's context of 8192" in err, err
    assert not (tmp_path / "store").exists()  # no 517 MB conversion first


# ---- data files ------------------------------------------------------------------------------

def _data_copy(data_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def empty_wiki(d: Path) -> None:
    (d / "wikitext-2-raw-v1" / "wiki.test.raw").write_text("")


def one_line_wiki(d: Path) -> None:
    (d / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(" = Title = \n")


def binary_wiki(d: Path) -> None:
    (d / "wikitext-2-raw-v1" / "wiki.test.raw").write_bytes(bytes(range(256)) * 4)


def truncated_c4(d: Path) -> None:
    path = next((d / "c4").rglob("*.json.gz"))
    path.write_bytes(path.read_bytes()[:200])


def c4_without_text(d: Path) -> None:
    path = next((d / "c4").rglob("*.json.gz"))
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"content": "no text field"}) + "\n")


@pytest.mark.parametrize("damage, message", [
    (empty_wiki, "wiki.test.raw (the Wikitext-2 test split) is empty"),
    (binary_wiki, "is not UTF-8 text"),
    (one_line_wiki, "fewer than --eval-seqlen 64 tokens"),
    (truncated_c4, "is damaged at line"),
    (c4_without_text, 'line 1: not a JSON object with a "text" field'),
])
def test_damaged_data_files(tmp_path, tiny_model, data_dir, capsys, damage, message):
    broken = _data_copy(data_dir, tmp_path)
    damage(broken)
    err = run_fails(capsys, tiny_model, broken, tmp_path / "store")
    assert message in err, err
