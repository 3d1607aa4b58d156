"""Zero-shot evaluation: local files → the harness's own tasks, offline, on a tiny Llama."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import build_tiny_model

from flows.cli import main
from flows.dense import DenseConfig
from flows.run import PruneConfig, RunConfig, ZeroShotConfig, run_flow
from stages.errors import UserError
from stages.evaluation import zeroshot

SHARED = Path(os.environ.get("EBFT_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (SHARED / "piqa").is_dir(),
                                reason="zero-shot task files not found (set EBFT_DATA_DIR)")

EXPECTED_DOCS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 1000,
                 "winogrande": 1267, "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Prove nothing is fetched: the Hub and the datasets library are forced offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_DOCS))
def test_every_local_file_converts_to_the_harness_schema(name):
    docs = zeroshot.TASKS[name].convert(SHARED)
    assert len(docs) == EXPECTED_DOCS[name]
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        assert all(d["answerKey"] in d["choices"]["label"] for d in docs)
    if name in ("piqa", "boolq"):
        assert {d["label"] for d in docs} == {0, 1}
    if name == "winogrande":
        assert {d["answer"] for d in docs} == {"1", "2"}


@needs_data
def test_hellaswag_docs_rebuild_the_same_queries_through_the_harness_preprocessing():
    import datasets
    import lm_eval.tasks

    utils = Path(lm_eval.tasks.__file__).parent / "hellaswag" / "utils.py"
    spec = importlib.util.spec_from_file_location("hellaswag_utils", utils)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.process_docs(datasets.Dataset.from_list(zeroshot._hellaswag(SHARED)))
    originals = {}
    path = SHARED / "hellaswag" / "olmes-hellaswag-rc_5shot-val1000.requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        for record in map(json.loads, f):
            if record["doc_id"] < 1_000_000:
                originals[record["doc_id"]] = record["doc"]
    for doc, original in zip(rebuilt, (originals[i] for i in sorted(originals)), strict=True):
        assert doc["query"] == original["query"]
        # OLMES keeps the leading space of each continuation; the harness adds it itself.
        assert doc["choices"] == [c.strip() for c in original["choices"]]
        assert doc["gold"] == original["gold"]


def test_task_names_are_checked_and_missing_data_is_skipped_with_a_reason(tmp_path):
    assert zeroshot.parse_tasks("paper") == zeroshot.PAPER_TASKS
    assert zeroshot.parse_tasks("piqa, boolq") == ("piqa", "boolq")
    with pytest.raises(UserError, match="unknown task mmlu; valid: all, paper"):
        zeroshot.parse_tasks("piqa,mmlu")
    (tmp_path / "piqa").mkdir()
    present, skipped = zeroshot.available(("piqa", "storycloze"), tmp_path)
    assert present == [] and set(skipped) == {"piqa", "storycloze"}
    assert "cloze_test_val__spring2016.csv" in skipped["storycloze"]


@needs_data
def test_local_task_configs_run_offline_on_a_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    names = ["piqa", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"]
    result = zeroshot.evaluate(model, AutoTokenizer.from_pretrained(folder), names, SHARED,
                               tmp_path / "tasks", limit=3, batch_size=4, device="cpu")
    assert list(result["tasks"]) == names
    for name, task in result["tasks"].items():
        assert task["n"] == 3, name
        assert 0.0 <= task["acc"] <= 1.0
    assert result["tasks"]["piqa"]["acc_norm"] is not None  # the harness defines it there
    assert result["tasks"]["winogrande"]["acc_norm"] is None
    assert result["mean_acc"] == pytest.approx(
        sum(t["acc"] for t in result["tasks"].values()) / len(names))


@needs_data
def test_run_flow_evaluates_dense_pruned_and_finetuned_and_caches_it(
        tmp_path, data_dir, prefect_server):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.copytree(SHARED / "piqa", data / "piqa")
    model = build_tiny_model(tmp_path / "model")
    dense = DenseConfig(model=str(model), store=str(tmp_path / "store"), data_dir=str(data),
                        nsamples=4, seqlen=64, eval_seqlen=64, eval_windows=1, batch_size=4)
    cfg = RunConfig(dense=dense, prune=PruneConfig("magnitude", 0.5),
                    zeroshot=ZeroShotConfig(("piqa", "storycloze"), limit=4, batch_size=4))
    cfg = replace(cfg, train=replace(cfg.train, max_epochs=1, batch_size=2, holdout=0.25))
    report = run_flow(cfg)
    zs = report["zeroshot"]
    assert set(zs) == {"dense", "pruned", "finetuned"}
    for result in zs.values():
        assert result["tasks"]["piqa"]["n"] == 4 and result["limit"] == 4
        assert "storycloze" in result["skipped"]
    assert {report["states"][f"zeroshot-{n}"] for n in zs} == {"Completed"}  # 3 models
    again = run_flow(cfg)
    assert {again["states"][f"zeroshot-{n}"] for n in zs} == {"Cached"}


def test_bad_zeroshot_flags_fail_in_one_line(tmp_path, capsys, tiny_model, data_dir):
    store = tmp_path / "store"
    for flags, message in ((["--tasks", "piqa,mmlu"], "unknown task mmlu"),
                           (["--tasks", "piqa", "--zeroshot-limit", "0"], "--zeroshot-limit")):
        code = main(["run", "--model", str(tiny_model), "--store", str(store),
                     "--data-dir", str(data_dir), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not store.exists() or not any(store.rglob("*.json"))
