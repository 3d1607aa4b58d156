"""The real default model, end to end (slow: converts the GGUF once, ~1-2 minutes)."""

import pytest

from flows.dense import DenseConfig, dense_flow


@pytest.mark.slow
def test_smollm2_dense_pipeline_runs_and_caches(prefect_server, tmp_path, shared_data):
    cfg = DenseConfig(store=str(tmp_path / "store"), data_dir=str(shared_data), nsamples=2,
                      seqlen=128, eval_windows=1, batch_size=2)
    first = dense_flow(cfg)
    assert set(first["states"].values()) == {"Completed"}
    # SmolLM2-135M(-Instruct, Q4_1): a sane language model, far from a random one (~49k)
    assert 5 < first["perplexity"]["perplexity"] < 40
    assert first["perplexity"]["windows_total"] > 100
    again = dense_flow(cfg)
    assert set(again["states"].values()) == {"Cached"}


@pytest.mark.slow
def test_a_corrupted_conversion_of_the_default_model_is_redone_not_used(prefect_server, tmp_path,
                                                                        shared_data, monkeypatch):
    from pathlib import Path

    # this test damages the conversion: give it its own machine cache, never the user's
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-cache"))
    cfg = DenseConfig(store=str(tmp_path / "store"), data_dir=str(shared_data), nsamples=2,
                      seqlen=128, eval_windows=1, batch_size=2)
    first = dense_flow(cfg)
    weights = Path(first["model"]["path"]) / "model.safetensors"  # in this machine's cache
    with open(weights, "r+b") as f:  # flip bytes in the middle of the tensors
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(4096)
        f.seek(weights.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    again = dense_flow(cfg)
    assert again["perplexity"]["perplexity"] == first["perplexity"]["perplexity"]
    assert set(again["states"].values()) == {"Cached"}  # same weights, same keys
    assert Path(again["model"]["path"]) == weights.parent
