"""Shared fixtures: a tiny random Llama with its own tokenizer, and a tiny data directory."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "an", "were", "are", "which", "this", "be", "has", "had", "it", "not", "or", "first", "one", "their", "its", "new", "after", "who", "they", "two", "her", "she", "been", "other", "when", "there", "all", "during", "into", "school", "time", "may", "years", "more", "most", "only", "over", "city", "some", "world", "would", "where", "later", "up", "such", "used", "many", "can", "state", "about", "national", "out", "known", "university", "united", "then", "made"]


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder laid out like shared/data: C4-style gz JSON lines and a wiki.test.raw."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (root / "c4" / "en").mkdir(parents=True)
    with gzip.open(root / "c4" / "en" / "c4-sample.json.gz", "wt") as f:
        for i in range(40):
            n_words = 20 if i % 2 else 300  # half the documents are too short for seqlen 64
            f.write(json.dumps({"text": make_text(rng, n_words), "url": f"u{i}"}) + "\n")
    wiki = root / "wikitext-2-raw-v1"
    wiki.mkdir()
    lines = [""] + [f" = Title {i} = " if i % 5 == 0 else " " + make_text(rng, 60)
                    for i in range(60)]
    (wiki / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    rng = random.Random(1)
    valid = [""] + [" " + make_text(rng, 60) for _ in range(40)]
    (wiki / "wiki.valid.raw").write_text("\n".join(valid) + "\n")
    return root


def _tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build_tiny_model(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    """Save a randomly initialised decoder of the given family with a small tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    rng = random.Random(1)
    tokenizer = _tokenizer([make_text(rng, 50) for _ in range(200)])
    common = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 256, "tie_word_embeddings": False}
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data directory (CI: ../shared/data), skipped where it is absent."""
    import os

    path = Path(os.environ.get("EBFT_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
    if not (path / "wikitext-2-raw-v1" / "wiki.test.raw").is_file():
        pytest.skip(f"real data directory not found at {path}")
    return path
