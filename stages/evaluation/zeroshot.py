"""Zero-shot accuracy through lm-evaluation-harness, offline from local files.

The harness's own task definitions (prompts, answer choices, metrics) are used unchanged;
only the documents' source changes. Each local file is converted once into the schema the
harness task reads from the Hub, and a generated task YAML ``include``s the harness's own
YAML with ``dataset_path: json`` pointed at the converted file. Without a data directory
the harness's tasks are used as they are (from the Hub).

Accuracy is the harness's ``acc`` (the paper: "the metric we used is accuracy");
``acc_norm`` is recorded too where the harness defines it.
"""

from __future__ import annotations

import gzip
import json
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.errors import UserError
from stages.masks.mask_files import load_masked_model
from stages.model.model_source import ModelSource, load_tokenizer
from stages.stage import Spec, Stage, result_json
from store import Artifact, digest_json, digest_path, write_json


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _piqa(d: Path) -> list[dict]:
    docs = list(_jsonl(d / "piqa/valid.jsonl"))
    labels = _labels(d / "piqa/valid-labels.lst")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels, strict=True)]


def _arc(d: Path, subset: str) -> list[dict]:
    docs = []
    for doc in _jsonl(d / f"arc/{subset}/{subset}-Test.jsonl"):
        choices = doc["question"]["choices"]
        docs.append({"id": doc["id"], "question": doc["question"]["stem"],
                     "choices": {"text": [c["text"] for c in choices],
                                 "label": [c["label"] for c in choices]},
                     "answerKey": doc["answerKey"]})
    return docs


def _hellaswag(d: Path) -> list[dict]:
    """OLMES request records hold 1000 already-preprocessed validation docs.

    They are rewritten into the raw schema so the harness's own ``process_docs`` rebuilds
    exactly the same query: the activity label, ": ", then the context (preprocessing is
    idempotent on already-preprocessed text).
    """
    docs: dict[int, dict] = {}
    for record in _jsonl(d / "hellaswag/olmes-hellaswag-rc_5shot-val1000.requests.jsonl.gz"):
        if record["doc_id"] >= 1_000_000:  # OLMES's unconditioned duplicates
            continue
        doc = record["doc"]
        activity, _, context = doc["query"].partition(": ")
        docs[record["doc_id"]] = {"ind": doc["ind"], "activity_label": activity,
                                  "ctx_a": context, "ctx_b": "", "endings": doc["choices"],
                                  "label": str(doc["gold"])}
    return [docs[i] for i in sorted(docs)]


def _winogrande(d: Path) -> list[dict]:
    folder = d / "winogrande/winogrande_1.1"
    docs = list(_jsonl(folder / "dev.jsonl"))
    labels = _labels(folder / "dev-labels.lst")
    return [{k: doc[k] for k in ("sentence", "option1", "option2")} | {"answer": label}
            for doc, label in zip(docs, labels, strict=True)]


def _boolq(d: Path) -> list[dict]:
    return [{"question": doc["question"], "passage": doc["passage"],
             "label": int(bool(doc["answer"]))} for doc in _jsonl(d / "boolq/dev.jsonl")]


def _openbookqa(d: Path) -> list[dict]:
    docs = []
    for i, doc in enumerate(_jsonl(d / "openbookqa/openbook_qa.llm-foundry.test.jsonl")):
        letters = list(string.ascii_uppercase[: len(doc["choices"])])
        docs.append({"id": str(i), "question_stem": doc["query"],
                     "choices": {"text": doc["choices"], "label": letters},
                     "answerKey": letters[doc["gold"]]})
    return docs


def _lambada(d: Path) -> list[dict]:
    path = d / "lambada/openai/lambada_openai.llm-foundry.test.jsonl"
    return [{"text": f"{doc['context']} {doc['continuation']}"} for doc in _jsonl(path)]


def _storycloze(d: Path) -> list[dict]:
    """The 2016 validation CSV as distributed by its authors (cloze_test_val__spring2016)."""
    import csv

    path = d / "storycloze/cloze_test_val__spring2016.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{**{f"input_sentence_{i}": row[f"InputSentence{i}"] for i in range(1, 5)},
             "sentence_quiz1": row["RandomFifthSentenceQuiz1"],
             "sentence_quiz2": row["RandomFifthSentenceQuiz2"],
             "answer_right_ending": int(row["AnswerRightEnding"])} for row in rows]


@dataclass(frozen=True)
class LocalTask:
    """Where a harness task's documents live in the data directory, and how to read them."""

    harness: str  # the harness task it reuses
    yaml: str  # that task's YAML, relative to lm_eval/tasks
    split: str  # which split the harness evaluates (the local file is that split)
    files: tuple[str, ...]
    convert: Callable[[Path], list[dict]]


TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa", "piqa/piqa.yaml", "validation",
                      ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "arc_easy": LocalTask("arc_easy", "arc/arc_easy.yaml", "test",
                          ("arc/ARC-Easy/ARC-Easy-Test.jsonl",),
                          lambda d: _arc(d, "ARC-Easy")),
    "arc_challenge": LocalTask("arc_challenge", "arc/arc_easy.yaml", "test",
                               ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",),
                               lambda d: _arc(d, "ARC-Challenge")),
    "hellaswag": LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation",
                           ("hellaswag/olmes-hellaswag-rc_5shot-val1000.requests.jsonl.gz",),
                           _hellaswag),
    "winogrande": LocalTask("winogrande", "winogrande/default.yaml", "validation",
                            ("winogrande/winogrande_1.1/dev.jsonl",
                             "winogrande/winogrande_1.1/dev-labels.lst"), _winogrande),
    "boolq": LocalTask("boolq", "super_glue/boolq/default.yaml", "validation",
                       ("boolq/dev.jsonl",), _boolq),
    "openbookqa": LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "test",
                            ("openbookqa/openbook_qa.llm-foundry.test.jsonl",), _openbookqa),
    "lambada_openai": LocalTask("lambada_openai", "lambada/lambada_openai.yaml", "test",
                                ("lambada/openai/lambada_openai.llm-foundry.test.jsonl",),
                                _lambada),
    "storycloze": LocalTask("storycloze_2016", "storycloze/storycloze_2016.yaml", "validation",
                            ("storycloze/cloze_test_val__spring2016.csv",), _storycloze),
}
PAPER_TASKS = ("piqa", "storycloze", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
               "boolq")
ALL_TASKS = tuple(TASKS)
NOTES = {"hellaswag": "1000-doc validation subset (OLMES, seed 1234), not the full 10042"}


def parse_tasks(value: str) -> tuple[str, ...]:
    """``all``, ``paper`` or a comma list of names from TASKS; raises UserError otherwise."""
    if value in ("all", "paper"):
        return ALL_TASKS if value == "all" else PAPER_TASKS
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"--tasks: unknown task {', '.join(unknown) or repr(value)}; valid: "
                        f"all, paper, or a comma list of {', '.join(TASKS)}")
    return names


def available(names: tuple[str, ...], directory: Path | None) -> tuple[list[str], dict]:
    """Split tasks into those with data and those skipped, with the reason for each skip."""
    if directory is None:
        return list(names), {}
    present, skipped = [], {}
    for name in names:
        missing = [f for f in TASKS[name].files if not (directory / f).is_file()]
        if missing:
            skipped[name] = f"no data: put {missing[0]} into {directory}"
        else:
            present.append(name)
    return present, skipped


def data_digest(names: list[str], directory: Path | None) -> str:
    """Content digest of the local task files (or 'hub' when reading from the Hub)."""
    if directory is None:
        return "hub"
    return digest_json({f: digest_path(directory / f) for n in names for f in TASKS[n].files})


def write_task_configs(names: list[str], directory: Path, out: Path) -> dict[str, str]:
    """Convert each task's local files and write a YAML that reuses the harness's task.

    Returns {our name: generated harness task name}.
    """
    import lm_eval.tasks

    harness_tasks = Path(lm_eval.tasks.__file__).parent
    out.mkdir(parents=True, exist_ok=True)
    generated = {}
    for name in names:
        task = TASKS[name]
        docs_file = out / f"{name}.jsonl"
        with open(docs_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(doc) + "\n" for doc in task.convert(directory))
        local_name = f"ebft_{name}"
        splits = {"training_split": None, "validation_split": None, "test_split": None,
                  "fewshot_split": None, f"{task.split}_split": task.split}
        config = {"include": str(harness_tasks / task.yaml), "task": local_name,
                  "tag": [], "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {task.split: str(docs_file)}}, **splits}
        # JSON is valid YAML; the harness reads this file with its own YAML loader.
        (out / f"{local_name}.yaml").write_text(json.dumps(config, indent=1) + "\n")
        generated[name] = local_name
    return generated


@dataclass(frozen=True)
class ZeroShotSpec(Spec):
    model_digest: str
    data_digest: str
    tasks: tuple[str, ...]
    limit: int | None  # documents per task; None: all
    batch_size: int
    dtype: str


def summarize(results: dict, names: dict[str, str]) -> dict:
    """Per-task acc (and acc_norm where defined) with stderr and count, plus the mean acc."""
    tasks = {}
    for name, harness_name in names.items():
        r = results["results"][harness_name]
        tasks[name] = {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"),
                       "acc_norm": r.get("acc_norm,none"),
                       "n": results.get("n-samples", {}).get(harness_name, {}).get("effective")}
        if name in NOTES:
            tasks[name]["note"] = NOTES[name]
    accs = [t["acc"] for t in tasks.values()]
    return {"tasks": tasks, "mean_acc": sum(accs) / len(accs) if accs else None}


def evaluate(model, tokenizer, names: list[str], directory: Path | None, workdir: Path,
             limit: int | None, batch_size: int, device) -> dict:
    """Run the harness on an in-memory model; returns summarize()'s dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if directory is None:
        harness_names = {n: TASKS[n].harness for n in names}
        manager = TaskManager()
    else:
        harness_names = write_task_configs(names, directory, workdir)
        manager = TaskManager(include_path=str(workdir), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results = simple_evaluate(model=lm, tasks=list(harness_names.values()), task_manager=manager,
                              limit=limit, log_samples=False, bootstrap_iters=1000)
    return summarize(results, harness_names)


def build(spec: ZeroShotSpec, out: Path, model: ModelSource, data_dir: str | None,
          device: str, masks: Artifact | None = None) -> None:
    """Zero-shot accuracies (lm-eval) of a model folder, or of the dense model with masks."""
    import tempfile

    from stages.inputs.data import data_dir as resolve_data_dir
    from stages.model.devices import DTYPES, resolve_device

    directory = resolve_data_dir(data_dir)
    device = resolve_device(device)
    names, skipped = available(spec.tasks, directory)
    loaded = load_masked_model(model, DTYPES[spec.dtype], masks).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="ebft-tasks-") as workdir:
        result = evaluate(loaded, load_tokenizer(model), names, directory, Path(workdir),
                          spec.limit, spec.batch_size, device) if names else \
            {"tasks": {}, "mean_acc": None}
    result |= {"skipped": skipped, "limit": spec.limit, "metric": "acc",
               "source": "hub" if directory is None else str(directory)}
    write_json(out, "result.json", result)


STAGE = Stage("zeroshot", build, result_json)
