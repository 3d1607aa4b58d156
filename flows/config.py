"""Every setting of a run and its default, in one place.

The dataclasses here (and the two they hold from ``stages``: ``TrainConfig`` and
``LoraSettings``) are the configuration; their field defaults are the defaults, sized to
finish in about 15 minutes on a 2-core CPU. A preset is a partial configuration: a few
``section.field`` values put over the defaults. The CLI's flags and ``--set
section.field=value`` are overrides applied last (``override``), and a deployment in
``prefect.yaml`` gives the same structure as YAML. Nothing else holds a default. A few
fields default to "auto" (OWL block sparsities, re-masking): ``settled`` decides them from
the rest of the configuration before any stage runs, and the report shows the decision.
"""

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from stages.errors import UserError
from stages.masks import METHODS, is_structured, methods_run
from stages.masks.methods.sparsegpt import BEFORE_EBFT_PERCDAMP, PAPER_PERCDAMP
from stages.recovery.block_training import TrainConfig
from stages.recovery.distill import DistillSettings
from stages.recovery.lora import LoraSettings
from store import digest_json


def default_store() -> str:
    """EBFT_STORE, else ./.ebft-store; read when a config is made, so a deployment's run uses
    the store of the worker that runs it."""
    return os.environ.get("EBFT_STORE", ".ebft-store")


@dataclass(frozen=True)
class DenseConfig:
    model: str = "smollm2-135m"  # hub id, local Hugging Face folder, or the built-in default
    store: str = field(default_factory=default_store)
    data_dir: str | None = None  # laid out like shared/data; None: EBFT_DATA_DIR
    nsamples: int = 16  # calibration windows (the paper: 256)
    seqlen: int = 1024  # calibration window length
    seed: int = 0  # calibration sampling seed
    calibration: str = "c4"  # c4 windows, or "generated": the dense model's own text
    eval_seqlen: int = 2048  # perplexity window
    eval_windows: int | None = 4  # the first N Wikitext-2 test windows; None: all
    # what perplexity is measured on: wikitext2 (the test split: reported numbers),
    # wikitext2-validation or c4-heldout (where recovery options are decided)
    eval_data: str = "wikitext2"
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16
    batch_size: int = 8  # batch of inference passes (capture, masks, boundaries)


def _prune_config() -> type:
    """The mask stage's settings: the common fields, then one field per registered method
    holding that method's parameters (``prune.sparsegpt.percdamp``). Made from the registry,
    so a new method brings its own settings without an edit here."""
    common = [("method", str, "wanda"), ("sparsity", float, 0.5),
              ("pattern", str | None, None), ("mask_inputs", str, "sequential"),
              # uniform, owl, or auto: OWL wherever it applies (``settled``)
              ("layer_sparsity", str, "auto"), ("owl_threshold", float, 5.0),
              ("owl_limit", float, 0.08)]
    methods = [(name, cls, field(default_factory=cls)) for name, cls in sorted(METHODS.items())]
    cls = dataclasses.make_dataclass("PruneConfig", common + methods, frozen=True)
    cls.__module__ = __name__  # pickled by reference (Dask, Ray)
    cls.__doc__ = _prune_config.__doc__
    return cls


PruneConfig = _prune_config()


@dataclass(frozen=True)
class ZeroShotConfig:
    tasks: tuple[str, ...] = ()  # empty: no zero-shot evaluation
    limit: int | None = None  # documents per task (quick runs); None: all
    batch_size: int = 16


@dataclass(frozen=True)
class RunnerConfig:
    """Where the flow's tasks run; changes no result, so no key holds it."""

    task_runner: str = "threads"  # threads, dask or ray (Prefect's integrations)
    address: str | None = None  # an existing Dask scheduler or Ray cluster; None: local
    workers: int = 1  # tasks at once on the thread runner (independent EBFT blocks)


@dataclass(frozen=True)
class RunConfig:
    dense: DenseConfig = field(default_factory=DenseConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: str = "ebft"  # a recovery's run: ebft, lora, or none (the pruned model as is)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # the whole recovered model distilled on the dense model's logits after the block
    # pass (stages.recovery.distill); epochs 0: off
    distill: DistillSettings = field(default_factory=DistillSettings)
    form: str = "masked"  # the saved model: masked, or compact (structured masks: narrower)
    save_dtype: str = "auto"  # dtype of the saved model; auto: the compute dtype
    keep_boundaries: bool = False  # keep every block's outputs (debugging; costs disk)
    # write each block's outputs to the store in the background, as a resume point (off: a
    # killed run recomputes the inputs of its next block from the cached blocks before it)
    write_boundaries: bool = True
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def key(self) -> str:
        """The run's identity: what it computes, so "auto" and its explicit choice agree,
        and the parameters of mask methods it does not run are not part of it (a method
        added to the registry leaves every other run's key as it was)."""
        values = {k: v for k, v in asdict(settled(self)).items() if k != "runner"}
        values["prune"] = methods_run(values["prune"])
        if not values["distill"]["epochs"]:  # off: its settings change nothing
            del values["distill"]
        return digest_json(values)[:16]


# "default" is the dataclasses' own defaults. "paper" is the paper's setting: 256 x 1024 C4
# windows, up to 10 epochs at lr 2e-4 with batch 8, the full Wikitext-2 test set, every
# block at the same sparsity, masks chosen once, no distillation. Our default lr is 2e-3
# (batch 1): it reaches a much lower block loss (bench/vs_authors.py) and perplexity
# (bench/recovery.py).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"dense.nsamples": 256, "dense.eval_windows": None, "train.max_epochs": 10,
              "train.batch_size": 8, "train.lr": 2e-4, "prune.layer_sparsity": "uniform",
              "train.remask": False, "distill.epochs": 0,
              "prune.sparsegpt.percdamp": PAPER_PERCDAMP},
}


def build_config(preset: str = "default", values: dict[str, Any] | None = None) -> RunConfig:
    """The defaults, then the preset, then ``values`` (``section.field`` -> value)."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose {', '.join(PRESETS)}")
    return override(override(RunConfig(), PRESETS[preset]), values or {})


def settled(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its "auto" choices made, from the rest of it (issue 22 measured both as
    gains on held-out data): OWL block sparsities wherever one unstructured sparsity is asked
    for and OWL's spread fits inside it, and re-masking wherever EBFT trains the blocks one
    after another on masks of single weights. SparseGPT's dampening: heavier where EBFT
    trains the weights after it, the paper's otherwise. Distillation is off where no
    recovery trains the weights. A choice given explicitly is kept, so that ``prepare``
    refuses one that does not apply."""
    prune, train = cfg.prune, cfg.train
    if prune.layer_sparsity == "auto":
        owl = why_no_owl(replace(prune, layer_sparsity="owl")) is None
        prune = replace(prune, layer_sparsity="owl" if owl else "uniform")
    if train.remask is None:  # EBFT on sequential block inputs, masks chosen on them too
        train = replace(train, remask=cfg.finetune == "ebft"
                        and train.block_inputs == "sequential"
                        and prune.mask_inputs == "sequential"
                        and not is_structured(prune.method))
    # distillation trains the weights: after a recovery that trains them too (not after
    # --finetune none, nor after --tune mask, whose recovered weights are the dense ones)
    ebft_trains_weights = cfg.finetune == "ebft" and cfg.train.tune == "weights"
    trains_weights = cfg.finetune == "lora" or ebft_trains_weights
    distill = cfg.distill if trains_weights else DistillSettings(epochs=0)
    if prune.sparsegpt.percdamp is None:
        percdamp = BEFORE_EBFT_PERCDAMP if ebft_trains_weights else PAPER_PERCDAMP
        prune = replace(prune, sparsegpt=replace(prune.sparsegpt, percdamp=percdamp))
    return replace(cfg, prune=prune, train=train, distill=distill)


def why_no_owl(prune) -> str | None:
    """Why OWL does not run for these mask settings, or None where it can. It varies one
    unstructured sparsity by block: not N:M, not whole heads and channels, and only where
    its spread keeps every block's sparsity inside (0, 1)."""
    from stages.masks import owl

    if prune.layer_sparsity == "uniform":
        return "--layer-sparsity uniform"
    if prune.pattern:
        return f"--pattern {prune.pattern} fixes every block's sparsity"
    if is_structured(prune.method):
        return f"--method {prune.method} removes whole heads and channels"
    if not owl.fits(prune.sparsity, prune.owl_limit):
        return (f"its spread, 2 x --owl-limit {prune.owl_limit:g}, does not fit inside "
                f"--sparsity {prune.sparsity:g} and 1 - it, so auto keeps every block at "
                "--sparsity")
    return None


def override(cfg: Any, values: dict[str, Any]) -> Any:
    """``cfg`` with each ``a.b.c`` path set; a string value is converted to the field's type
    (what ``--set`` gives). An unknown path is a one-line error listing the valid ones."""
    for path, value in values.items():
        cfg = _set(cfg, path.split("."), value, path)
    return cfg


def _set(obj: Any, parts: list[str], value: Any, path: str) -> Any:
    names = {f.name: f for f in fields(obj)}
    if parts[0] not in names:
        raise UserError(f"--set {path}: {type(obj).__name__} has no field {parts[0]!r}; "
                        f"choose one of {', '.join(names)}")
    current = getattr(obj, parts[0])
    if len(parts) > 1:
        if not is_dataclass(current):
            raise UserError(f"--set {path}: {parts[0]} is a value, not a section")
        return replace(obj, **{parts[0]: _set(current, parts[1:], value, path)})
    if is_dataclass(current):
        raise UserError(f"--set {path}: {parts[0]} is a section; name one of its fields, "
                        f"e.g. {path}.{fields(current)[0].name}")
    hint = typing.get_type_hints(type(obj))[parts[0]]
    if isinstance(value, str):
        value = convert(value, hint, path)
    return replace(obj, **{parts[0]: value})


# numeric settings whose None is "auto", decided by ``settled`` (and given as the word)
SETTLED_FLOATS = ("prune.sparsegpt.percdamp", METHODS["sparsegpt"].flag("percdamp"))


def convert(raw: str, hint: Any, name: str) -> Any:
    """A command-line string as a value of the field's type (bool: on/off, true/false)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and raw.lower() in ("none", "null", "all"):
        return None
    settled_here = name.split()[-1] in SETTLED_FLOATS  # a flag, "--set path" or a path
    if settled_here and raw.lower() == "auto":
        return None  # decided from the rest of the configuration (``settled``)
    if options == (bool, type(None)) and raw.lower() == "auto":  # on, off, or decided
        return None
    target = next(t for t in options if t is not type(None))
    try:
        if target is bool:
            return {"on": True, "true": True, "1": True, "yes": True,
                    "off": False, "false": False, "0": False, "no": False}[raw.lower()]
        if typing.get_origin(target) is tuple:
            item = typing.get_args(target)[0]
            return tuple(item(v.strip()) for v in raw.split(",") if v.strip())
        return target(raw)
    except (KeyError, ValueError):
        kind = "on, off or auto" if target is bool and type(None) in options else _kind(target)
        kind += " or auto" if settled_here else ""
        raise UserError(f"{name} {raw!r}: not {kind}") from None


def _kind(target: Any) -> str:
    if target is bool:
        return "on or off"
    if typing.get_origin(target) is tuple:
        return f"a comma list of {_kind(typing.get_args(target)[0]).split()[-1]}s"
    name = getattr(target, "__name__", str(target))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {'integer' if target is int else name}"


def config_paths(cfg: Any = None, prefix: str = "") -> dict[str, Any]:
    """Every settable ``section.field`` path with its type hint (for --help and checks)."""
    cfg = RunConfig() if cfg is None else cfg
    hints = typing.get_type_hints(type(cfg))
    paths = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            paths |= config_paths(value, f"{prefix}{f.name}.")
        else:
            paths[f"{prefix}{f.name}"] = hints[f.name]
    return paths
