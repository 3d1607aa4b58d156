"""The Prefect flow: content-keyed caching, and one-line errors from the CLI."""

import pytest
from conftest import build_tiny_model

from flows.cli import main
from flows.dense import DenseConfig, dense_flow


def run(store, model, data_dir, **overrides):
    cfg = DenseConfig(model=str(model), store=str(store), data_dir=str(data_dir), nsamples=4,
                      seqlen=64, eval_seqlen=64, eval_windows=2, batch_size=2, **overrides)
    return dense_flow(cfg)


def test_cache_hits_and_misses_follow_content(prefect_server, tmp_path, data_dir):
    model = build_tiny_model(tmp_path / "model")
    store = tmp_path / "store"
    first = run(store, model, data_dir)
    assert set(first["states"].values()) == {"Completed"}

    again = run(store, model, data_dir)
    assert set(again["states"].values()) == {"Cached"}
    assert again["activations"] == first["activations"]

    reseeded = run(store, model, data_dir, seed=1)
    assert reseeded["states"] == {"calibration": "Completed", "dense-capture": "Completed",
                                  "perplexity": "Cached"}

    build_tiny_model(tmp_path / "model", seed=7)  # same tokenizer, new weights file
    reweighted = run(store, model, data_dir)
    assert reweighted["states"] == {"calibration": "Cached", "dense-capture": "Completed",
                                    "perplexity": "Completed"}
    assert reweighted["perplexity"]["perplexity"] != first["perplexity"]["perplexity"]


def test_deleted_artifact_is_recomputed_not_trusted(prefect_server, tmp_path, data_dir):
    import shutil

    model = build_tiny_model(tmp_path / "model")
    first = run(tmp_path / "store", model, data_dir)
    shutil.rmtree(first["activations"]["path"])
    again = run(tmp_path / "store", model, data_dir)
    assert again["states"]["dense-capture"] == "Completed"
    assert again["activations"]["digest"] == first["activations"]["digest"]


@pytest.mark.parametrize("args,match", [
    (["--model", "/no/such/model"], "no such folder and not a hub id"),
    (["--data-dir", "/no/such/dir"], "does not exist; pass --data-dir"),
    (["--nsamples", "-3"], "--nsamples -3: must be a positive"),
    (["--seqlen", "100000"], "--seqlen 100000 exceeds the model's context"),
    (["--eval-seqlen", "100000"], "--eval-seqlen 100000 exceeds the model's context"),
    (["--dtype", "float8"], "--dtype 'float8' is unknown"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(prefect_server, tmp_path, data_dir,
                                                        tiny_model, capsys, args, match):
    store = tmp_path / "store"
    base = ["dense", "--model", str(tiny_model), "--data-dir", str(data_dir), "--store",
            str(store), "--seqlen", "64", "--nsamples", "2", "--eval-seqlen", "64"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and err[0].startswith("ebft: error:")
    written = [p for p in store.rglob("*") if p.is_file()] if store.exists() else []
    assert written == []


def test_two_concurrent_runs_compute_each_stage_once(prefect_server, tmp_path, data_dir,
                                                     monkeypatch):
    import threading

    from stages.inputs import calibration, capture

    calls = {"calibration": 0, "capture": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(calibration, "sample_windows",
                        counted("calibration", calibration.sample_windows))
    monkeypatch.setattr(capture, "capture_dense", counted("capture", capture.capture_dense))
    model = build_tiny_model(tmp_path / "model")
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(tmp_path / "store", model,
                                                                  data_dir)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert calls == {"calibration": 1, "capture": 1}
    assert results[0]["activations"] == results[1]["activations"]


def test_a_stage_lock_is_released_when_the_stage_ends_not_the_run(prefect_server, tmp_path,
                                                                  data_dir, monkeypatch):
    """While the capture runs, the calibration it follows holds no lock any more (a sweep's
    other configurations wait for a stage, never for a whole configuration)."""
    from stages.inputs import capture

    held_during_capture = []
    real = capture.capture_dense

    def capture_and_look(*args, **kwargs):
        held_during_capture.extend(p.parent.name for p in
                                   (tmp_path / "store" / "locks").rglob("*.lock"))
        return real(*args, **kwargs)

    monkeypatch.setattr(capture, "capture_dense", capture_and_look)
    run(tmp_path / "store", build_tiny_model(tmp_path / "model"), data_dir)
    assert held_during_capture == ["activations"]  # its own lock only
    assert not list((tmp_path / "store" / "locks").rglob("*.lock"))
