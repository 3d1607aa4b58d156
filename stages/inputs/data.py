"""Text corpora: a local data directory laid out like ``shared/data``, else the Hub.

Local layout (see the data directory's SOURCES.md):
  wikitext-2-raw-v1/wiki.test.raw   the raw Wikitext-2 test file (reported numbers)
  wikitext-2-raw-v1/wiki.valid.raw  the raw Wikitext-2 validation file (decisions)
  c4/**/*.json.gz, c4/**/*.jsonl.gz C4 documents, one JSON object with "text" per line

C4 is split once, by a digest of each document's text: one document in ``HELDOUT_EVERY``
is held out for evaluation (``c4-heldout``) and never calibrates; the rest calibrate. The
split depends on nothing but the text, so it is the same on every machine, for every seed
and for any set of C4 files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stages.errors import UserError
from store.hashing import digest_bytes, digest_path

ENV_VAR = "EBFT_DATA_DIR"
_FIX = (f"pass --data-dir DIR (or set {ENV_VAR}) to a folder laid out like shared/data, "
        "or go online so the Hub's datasets can be downloaded")


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    digest: str  # identifies the content, for cache keys
    source: str  # where it came from, for reports


def data_dir(flag: str | None = None) -> Path | None:
    """The data directory from the flag, else the environment, else None (use the Hub)."""
    value = flag or os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist; {_FIX}")
    return path


def wikitext_rows(raw: str) -> list[str]:
    """Rows as the Hub's wikitext-2-raw-v1 has them: a line plus newline, or '' for blanks."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


HELDOUT_EVERY = 8  # one C4 document in 8 is evaluation data, never calibration


def wikitext2_test(directory: Path | None) -> Corpus:
    """The Wikitext-2 raw test split as one string joined with blank lines (the ppl protocol)."""
    return _wikitext2(directory, "test")


def wikitext2_validation(directory: Path | None) -> Corpus:
    """The validation split, joined the same way: where recovery options are decided."""
    return _wikitext2(directory, "validation")


def _wikitext2(directory: Path | None, split: str) -> Corpus:
    if directory is not None:
        name = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}[split]
        path = directory / "wikitext-2-raw-v1" / name
        if not path.is_file():
            raise UserError(f"{path} is missing; {_FIX}")
        from stages.checks import text_file

        rows = wikitext_rows(text_file(path, f"the Wikitext-2 {split} split"))
        source = str(path)
    else:
        rows = _from_hub(lambda ds: ds.load_dataset("wikitext", "wikitext-2-raw-v1",
                                                    split=split)["text"], "wikitext")
        source = f"hub:wikitext/wikitext-2-raw-v1/{split}"
    text = "\n\n".join(rows)
    return Corpus([text], digest_bytes(text.encode()), source)


def c4_heldout(directory: Path | None) -> Corpus:
    """The held-out C4 documents (never calibration data) as one string joined with blank
    lines, in file order: windows of it measure perplexity on the calibration distribution."""
    every = _all_c4(directory)
    text = "\n\n".join(t for t in every.texts if is_heldout(t))
    return Corpus([text], digest_bytes(text.encode()), f"held-out documents of {every.source}")


def is_heldout(text: str) -> bool:
    """Whether a C4 document is evaluation data: a fixed 1-in-HELDOUT_EVERY digest split."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


# the corpora perplexity is measured on (--eval-data), by name
EVAL_CORPORA = {"wikitext2": wikitext2_test, "wikitext2-validation": wikitext2_validation,
                "c4-heldout": c4_heldout}


def eval_corpus(name: str, directory: Path | None) -> Corpus:
    if name not in EVAL_CORPORA:
        raise UserError(f"--eval-data {name!r}: choose one of {', '.join(EVAL_CORPORA)}")
    return EVAL_CORPORA[name](directory)


def c4_documents(directory: Path | None) -> Corpus:
    """C4 English documents for calibration: every C4 file under the data dir, sorted by
    path, less the held-out documents (``is_heldout``)."""
    every = _all_c4(directory)
    texts = [t for t in every.texts if not is_heldout(t)]
    digest = digest_bytes(f"calibration part of {every.digest}".encode())
    return Corpus(texts, digest, every.source)


def _all_c4(directory: Path | None) -> Corpus:
    if directory is not None:
        files = sorted([*(directory / "c4").rglob("*.json.gz"),
                        *(directory / "c4").rglob("*.jsonl.gz")])
        if not files:
            raise UserError(f"no C4 files (*.json.gz) under {directory / 'c4'}; {_FIX}")
        return _local_c4(tuple((f, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    shard = "en/c4-train.00000-of-01024.json.gz"
    texts = _from_hub(lambda ds: ds.load_dataset("allenai/c4", data_files={"train": shard},
                                                 split="train")["text"], "allenai/c4")
    return Corpus(texts, digest_bytes("\n".join(texts).encode()), f"hub:allenai/c4/{shard}")


@functools.lru_cache(maxsize=4)
def _local_c4(files: tuple[tuple[Path, int, int], ...]) -> Corpus:
    """Every document of the local C4 files (read once per process and file version); a
    damaged file is a one-line error naming it and the line."""
    texts = []
    for f, _size, _mtime in files:
        line_no = 0
        try:
            with gzip.open(f, "rt", encoding="utf-8") as lines:
                for line_no, line in enumerate(lines, 1):
                    if line.strip():
                        texts.append(_c4_text(line, f, line_no))
        except (OSError, EOFError, UnicodeDecodeError) as err:  # reading line line_no + 1
            raise UserError(f"C4 file {f} is damaged at line {line_no + 1} "
                            f"({type(err).__name__}: {err}); replace or remove it") from err
    if not texts:
        raise UserError(f"the C4 files ({', '.join(str(f) for f, *_ in files)}) hold no "
                        f"documents; {_FIX}")
    digest = digest_bytes("".join(digest_path(f) for f, *_ in files).encode())
    return Corpus(texts, digest, ", ".join(str(f) for f, *_ in files))


def _c4_text(line: str, f: Path, line_no: int) -> str:
    try:
        text = json.loads(line)["text"]
    except ValueError as err:
        raise UserError(f"C4 file {f} line {line_no} is not JSON ({err}); replace or remove "
                        "the file") from err
    except (KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise UserError(f"C4 file {f} line {line_no}: not a JSON object with a \"text\" "
                        "field; replace or remove the file")
    return text


def _from_hub(load, name: str) -> list[str]:
    import datasets

    try:
        return list(load(datasets))
    except Exception as err:  # offline, or the Hub refused
        raise UserError(f"no data directory given and the Hub dataset {name} could not be "
                        f"loaded ({type(err).__name__}); {_FIX}") from err
