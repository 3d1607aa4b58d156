"""A stage's code version is read from the code it runs, never from a hand-kept list:
editing a helper changes the keys of exactly the stages that (transitively) import it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def versions(root: Path, script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_version_follows_imports_and_ignores_prose_and_neutral_modules(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b  # imported where it is used\n"
                "    return b.g()\n",
        "b.py": "from . import c\nfrom .log import note\n\n\ndef g():\n    return c.h()\n",
        "c.py": "def h():\n    return 1\n",
        "d.py": "def unrelated():\n    return 2\n",
        "log.py": "CACHE_NEUTRAL = 'messages only'\n\n\ndef note():\n    return 0\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    script = """
        import json, sys
        import pkg.a
        from store.hashing import code_closure, code_version
        print(json.dumps({"version": code_version(pkg.a),
                          "closure": sorted(code_closure("pkg.a"))}))
    """
    script = script.replace("import pkg.a", f"sys.path.insert(0, {str(ROOT)!r})\n"
                                            "        import pkg.a")
    first = versions(tmp_path, script)

    def after(name: str, text: str) -> str:
        (pkg / name).write_text(text)
        result = versions(tmp_path, script)
        (pkg / name).write_text(files[name])
        return result["version"]

    assert first["closure"] == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.log"]
    assert after("c.py", "def h():\n    return 2\n") != first["version"]  # two imports away
    assert after("d.py", "def unrelated():\n    return 3\n") == first["version"]
    assert after("c.py", '"""Docs."""\n\n\ndef h():  # one\n    """One."""\n    return 1\n') \
        == first["version"]  # prose and formatting do not count
    assert after("log.py", "CACHE_NEUTRAL = 'messages only'\n\n\ndef note():\n    return 5\n") \
        == first["version"]  # a module that declares it cannot change results


KEYS = """
import json
from stages.model import assembly
from stages.inputs import calibration, capture
from stages.recovery import distill, ebft, lora
from stages.evaluation import perplexity, zeroshot
from stages.masks import pruning
from stages.recovery.block_training import TrainConfig
from stages.recovery.lora import LoraSettings

specs = {
    "calibration": calibration.CalibrationSpec("c4", "tok", 4, 64, 0),
    "capture": capture.CaptureSpec("model", "calib", "float32", 2),
    "masks wanda": pruning.MaskSpec("model", "acts", "wanda"),
    "masks wanda+dsnot": pruning.MaskSpec("model", "acts", "wanda+dsnot"),
    "masks sparsegpt": pruning.MaskSpec("model", "acts", "sparsegpt"),
    "perplexity": perplexity.PerplexitySpec("model", "wiki", 64, 1, "float32"),
    "zeroshot": zeroshot.ZeroShotSpec("model", "data", ("piqa",), None, 4, "float32"),
    "ebft-block": ebft.BlockSpec(0, "", "model", "acts", "masks", TrainConfig()),
    "lora": lora.LoraSpec("model", "masks", "calib", LoraSettings(), "float32"),
    "assembly": assembly.AssemblySpec("model", "masks", None, "float32", None, "masked"),
    "distill": distill.DistillSpec("model", "assembled", "calib", distill.DistillSettings(1),
                                   "float32"),
}
print(json.dumps({name: spec.key() for name, spec in specs.items()}))
"""


def test_editing_a_helper_changes_the_keys_of_the_stages_that_call_it(tmp_path):
    """On a copy of the project: each edit below changes what some stages compute. Their
    keys change, and the keys of every other stage stay (their artifacts are still valid)."""
    for package in ("stages", "store"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    before = versions(tmp_path, KEYS)

    def changed_by(path: str, old: str, new: str) -> set[str]:
        file = tmp_path / path
        text = file.read_text()
        assert old in text, (path, old)
        file.write_text(text.replace(old, new, 1))
        try:
            after = versions(tmp_path, KEYS)
        finally:
            file.write_text(text)
        return {name for name in before if before[name] != after[name]}

    # how a model and its tokenizer are loaded (was in no stage's list): every stage reads
    # one or the other (the version is per module, not per function)
    assert changed_by("stages/model/model_source.py", "def load_model(source: ModelSource, dtype: "
                      "torch.dtype):", "def load_model(source: ModelSource, dtype: torch.dtype):"
                      "\n    dtype = dtype") == set(before)
    # how masks are put into a model (the pruned perplexity's loader was in no key)
    masks_applied = {"perplexity", "zeroshot", "ebft-block", "lora", "assembly", "masks wanda",
                     "masks wanda+dsnot", "masks sparsegpt", "distill"}
    assert changed_by("stages/masks/mask_files.py", "def apply_masks(model, artifact: Artifact) -> None:",
                      "def apply_masks(model, artifact: Artifact) -> None:\n    model = model"
                      ) == masks_applied
    # one mask method: only the masks that run it
    assert changed_by("stages/masks/methods/dsnot.py", "    w = weight.float()\n",
                      "    w = weight.float() * 1\n") == {"masks wanda+dsnot"}
    # EBFT's training loop: EBFT's blocks, and assembly (it imports stages.recovery.ebft to read the
    # blocks); no mask, capture or evaluation stage
    assert changed_by("stages/recovery/block_training.py", "MASK_MARGIN = 0.01",
                      "MASK_MARGIN = 0.02") == {"ebft-block", "assembly", "distill"}
    # the distillation's loss: only the distilled models
    assert changed_by("stages/recovery/distill.py", "RECORD_FILE = \"distill.json\"",
                      "RECORD_FILE = \"distill\" + \".json\"") == {"distill"}
    # the calibration sampler: the stages built on calibration data (their inputs' keys
    # change with it anyway), never the evaluations of a model
    assert changed_by("stages/inputs/calibration.py", "gen = torch.Generator().manual_seed(seed)",
                      "gen = torch.Generator().manual_seed(seed + 0)") == \
        set(before) - {"perplexity", "zeroshot"}
    # the input statistics the capture records and the masks score with: both keys change
    assert {"capture", "masks wanda", "masks sparsegpt"} <= changed_by(
        "stages/model/layer_stats.py", "self.count += len(x)", "self.count += len(x) + 0")
    # the mask methods' shared maths: never the dense capture (the costliest artifact)
    assert "capture" not in changed_by(
        "stages/masks/core.py", "def keep_from_scores(scores: torch.Tensor, pattern: Pattern, "
        "per_row: bool) -> torch.Tensor:", "def keep_from_scores(scores: torch.Tensor, "
        "pattern: Pattern, per_row: bool) -> torch.Tensor:\n    scores = scores")
