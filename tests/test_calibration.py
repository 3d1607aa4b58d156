from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from stages.errors import UserError
from stages.inputs import calibration, data
from stages.model.model_source import resolve_model, tokenizer_digest
from stages.stage import produce
from store import Store


def docs():
    return [list(range(i, i + n)) for i, n in enumerate([10, 200, 5, 150, 300])]


def test_sampler_shapes_and_windows_come_from_long_documents():
    windows = calibration.sample_windows(docs(), nsamples=16, seqlen=100, seed=0)
    assert windows.shape == (16, 100) and windows.dtype == torch.long
    for w in windows:  # consecutive tokens of one document longer than seqlen
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 100))
        assert int(w[0]) >= 1  # documents 0 and 2 (too short) are never used


def test_sampler_is_deterministic_and_seed_sensitive():
    a = calibration.sample_windows(docs(), 8, 100, seed=3)
    b = calibration.sample_windows(docs(), 8, 100, seed=3)
    c = calibration.sample_windows(docs(), 8, 100, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_reports_when_no_document_is_long_enough():
    with pytest.raises(UserError, match="longer than --seqlen 400"):
        calibration.sample_windows(docs(), 4, 400, seed=0)


@pytest.mark.parametrize("nsamples,seqlen,match", [(-1, 64, "--nsamples"), (0, 64, "--nsamples"),
                                                   (4, 1000, "exceeds the model's context")])
def test_nonsense_parameters_are_rejected(nsamples, seqlen, match):
    with pytest.raises(UserError, match=match):
        calibration.validate(nsamples, seqlen, max_context=256)


def test_build_stores_tokens_under_content_key(tmp_path, tiny_model, data_dir):
    store = Store(tmp_path)
    model = resolve_model(str(tiny_model))
    corpus = data.c4_documents(data_dir)
    spec = calibration.CalibrationSpec(corpus.digest, tokenizer_digest(model), 6, 64, 0)
    art, built, _ = produce(calibration.STAGE, spec, store, {"model": model,
                                                           "data_dir": str(data_dir)})
    tokens = calibration.load(art)
    assert built and tokens.shape == (6, 64)
    assert art.key == spec.key() and store.verify(art)
    again, built, _ = produce(calibration.STAGE, spec, store, {"model": model,
                                                             "data_dir": str(data_dir)})
    assert not built and again == art  # found under its key, not computed again
    other = calibration.CalibrationSpec(corpus.digest, tokenizer_digest(model), 6, 64, 1)
    assert other.key() != spec.key()


def test_local_wikitext_matches_hub_rows(data_dir):
    text = data.wikitext2_test(data_dir).texts[0]
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()
    rows = data.wikitext_rows(raw)
    assert text == "\n\n".join(rows) and rows[0] == "" and rows[2].endswith("\n")


def test_real_wikitext_file_gives_the_published_text(shared_data):
    # SOURCES.md: the paper's metric text has this sha256 and length.
    import hashlib

    text = data.wikitext2_test(shared_data).texts[0]
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode()).hexdigest().startswith("696cca6b65a171b0")


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass --data-dir"):
        data.data_dir(str(tmp_path / "nope"))


def test_held_out_c4_never_calibrates_and_the_split_is_fixed(shared_data):
    calibrating = data.c4_documents(shared_data).texts
    heldout = data.c4_heldout(shared_data).texts[0]
    every = data._all_c4(shared_data).texts
    held = [t for t in every if data.is_heldout(t)]
    assert set(calibrating).isdisjoint(held) and len(calibrating) + len(held) == len(every)
    assert 0.08 < len(held) / len(every) < 0.17  # about one document in HELDOUT_EVERY = 8
    assert heldout == "\n\n".join(held)
    # the split depends only on a document's text: a sample of the calibration documents
    # split alone is split the same way
    assert not any(data.is_heldout(t) for t in calibrating[:50])


def test_every_eval_corpus_is_its_own_text(shared_data):
    texts = {name: data.eval_corpus(name, shared_data) for name in data.EVAL_CORPORA}
    assert len({c.digest for c in texts.values()}) == len(texts)
    assert texts["wikitext2"].texts[0] == data.wikitext2_test(shared_data).texts[0]
    valid = texts["wikitext2-validation"].texts[0]
    assert valid.startswith("\n\n = Homarus gammarus = ") and len(valid) > 1_000_000
    with pytest.raises(UserError, match="--eval-data 'ptb': choose one of"):
        data.eval_corpus("ptb", shared_data)


def test_generated_calibration_starts_from_c4_and_is_seeded(tmp_path, tiny_model, data_dir):
    model = resolve_model(str(tiny_model))
    corpus = data.c4_documents(data_dir)
    c4 = calibration.CalibrationSpec(corpus.digest, tokenizer_digest(model), 4, 32, 0)
    made = {}
    generated = replace(c4, source="generated", model_digest=model.digest,
                        generator="cpu/float32")
    for name, spec in {"c4": c4, "generated": generated, "again": generated,
                       "seed 1": replace(generated, seed=1)}.items():
        out = tmp_path / name
        out.mkdir()
        calibration.build(spec, out, model, str(data_dir))
        made[name] = load_file(str(out / calibration.TOKENS_FILE))["input_ids"]
    prefix = calibration.GENERATED_PREFIX
    assert made["generated"].shape == (4, 32)
    assert torch.equal(made["generated"][:, :prefix], made["c4"][:, :prefix])
    assert not torch.equal(made["generated"], made["c4"])  # the rest is the model's
    assert torch.equal(made["generated"], made["again"])  # seeded
    assert not torch.equal(made["generated"], made["seed 1"])
    # the weights, device type and dtype are in a generated set's key, never in a C4 one's
    assert replace(c4, model_digest="other", generator="cuda/bfloat16").key() == c4.key()
    assert replace(generated, model_digest="other").key() != generated.key()
    assert replace(generated, generator="cuda/bfloat16").key() != generated.key()
