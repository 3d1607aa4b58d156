"""The `ebft` command line. Parsing happens in main(), never at import."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import Counter
from collections.abc import Callable

from stages.errors import UserError
from store import StoreFull, StoreLocationError

FROM_CONFIG = argparse.SUPPRESS  # a flag left out takes the configuration's value


@functools.cache
def defaults() -> dict[str, object]:
    """Each configuration path's default (for --help), from the config, the one source."""
    from flows.config import RunConfig, config_paths

    cfg = RunConfig()
    values = {}
    for path in config_paths(cfg):
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        values[path] = value
    return values


def option(group, flag: str, path: str, help: str, none: str = "none", **kwargs) -> None:
    """A flag that sets the configuration field ``path``. It has no default of its own:
    left out, the field keeps the config's value (or the preset's), shown in --help
    (a None default as ``none``)."""
    default = defaults()[path]
    shown = ("all" if path.endswith("windows") else none) if default is None else default
    if "action" not in kwargs:
        kwargs.setdefault("metavar", path.rsplit(".", 1)[-1].upper())
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    if isinstance(shown, tuple):
        shown = ",".join(shown) or "none"
    FLAG_OF[path] = flag
    group.add_argument(flag, dest=f"{SET}{path}", default=FROM_CONFIG,
                       help=f"{help} (default: {shown})", **kwargs)


SET = "set:"  # argparse dest prefix of the flags that set a configuration field
FLAG_OF: dict[str, str] = {}  # configuration path -> its flag, filled as the parser is built


def add_dense_flags(parser: argparse.ArgumentParser) -> None:
    dense = parser.add_argument_group("model, data and the dense stages")
    option(dense, "--model", "dense.model",
           "hub id, local Hugging Face folder, or smollm2-135m (built in)")
    option(dense, "--store", "dense.store", "artifact store folder (env EBFT_STORE)")
    option(dense, "--data-dir", "dense.data_dir",
           "data folder laid out like shared/data (env EBFT_DATA_DIR)")
    option(dense, "--nsamples", "dense.nsamples", "calibration windows")
    option(dense, "--seqlen", "dense.seqlen", "calibration window length")
    option(dense, "--seed", "dense.seed", "calibration sampling seed")
    option(dense, "--calibration", "dense.calibration",
           "c4 (windows of C4 documents) or generated (the dense model writes each window "
           "on from its first 8 C4 tokens; holds the whole model once)")
    option(dense, "--eval-seqlen", "dense.eval_seqlen", "perplexity window")
    option(dense, "--eval-windows", "dense.eval_windows",
           "evaluate the first N windows of --eval-data, or all")
    option(dense, "--eval-data", "dense.eval_data",
           "perplexity on wikitext2 (test split), wikitext2-validation or c4-heldout")
    option(dense, "--device", "dense.device", "auto, cpu, cuda or cuda:N")
    option(dense, "--dtype", "dense.dtype",
           "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    option(dense, "--batch-size", "dense.batch_size",
           "batch size of inference passes (capture, masks, boundaries)")
    config = parser.add_argument_group("configuration")
    config.add_argument("--preset", default="default",
                        help="default (~15 min on a 2-core CPU) or paper (the paper's "
                             "settings): a partial configuration the flags override")
    config.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="set any configuration field, e.g. --set train.tolerance=0.02 "
                             "(repeatable; the sections are dense, prune, train, lora, "
                             "zeroshot; see flows/config.py)")


def add_method_flags(prune) -> None:
    """One flag per parameter of every registered mask method, from its dataclass."""
    from dataclasses import fields

    from stages.masks import METHODS

    for name, cls in sorted(METHODS.items()):
        for f in fields(cls):
            option(prune, cls.flag(f.name), f"prune.{name}.{f.name}",
                   f"{cls.__name__}: {f.metadata.get('help', f.name)}", none="auto")


def add_run_flags(run: argparse.ArgumentParser) -> None:
    from stages.masks import method_names

    prune = run.add_argument_group("pruning (the mask stage)")
    option(prune, "--method", "prune.method",
           f"{', '.join(method_names())} (+dsnot: DSnoT reselection on top; +obs: "
           "SparseGPT's weight update on the mask; flap: whole heads and MLP channels)")
    option(prune, "--sparsity", "prune.sparsity",
           "fraction of weights pruned in every linear layer of every block (flap: of all "
           "block weights together)")
    option(prune, "--pattern", "prune.pattern", "N:M semi-structured, e.g. 2:4 or 4:8")
    option(prune, "--mask-inputs", "prune.mask_inputs",
           "sequential (pruned path) or dense (shared dense capture)")
    option(prune, "--layer-sparsity", "prune.layer_sparsity",
           "uniform (every block at --sparsity), owl (OWL: blocks with more outlier "
           "weights pruned less, the mean kept), or auto (owl for unstructured sparsity "
           "where its spread fits, else uniform)")
    option(prune, "--owl-threshold", "prune.owl_threshold",
           "OWL's M: a score above M times its block's mean is an outlier")
    option(prune, "--owl-limit", "prune.owl_limit",
           "OWL's lambda: block sparsities spread over twice this, their mean --sparsity")
    add_method_flags(prune)
    tune = run.add_argument_group("fine-tuning (EBFT, one cached task per block)")
    option(tune, "--finetune", "finetune",
           "ebft, lora (LoRA on the whole pruned model, the paper's baseline), or none")
    option(tune, "--tune", "train.tune", "weights (EBFT) or mask (Section 4.5)")
    option(tune, "--target", "train.target",
           "dense-output (Eq. 4, from the dense capture) or dense-block (dense block on the "
           "sparse input, as the authors' code)")
    option(tune, "--lr", "train.lr", "AdamW learning rate of the weights (paper: 2e-4)")
    option(tune, "--mask-lr", "train.mask_lr", "learning rate of the scores (--tune mask)")
    tune.add_argument("--betas", nargs=2, default=FROM_CONFIG, metavar=("BETA1", "BETA2"),
                      help="AdamW betas (default: 0.9 0.95)")
    option(tune, "--weight-decay", "train.weight_decay", "AdamW weight decay")
    option(tune, "--loss", "train.loss",
           "mse (Eq. 4), nmse (each token's squared error over its target's squared norm) "
           "or capped (mse, tokens with outsized targets such as attention sinks weighed "
           "as typical ones)")
    option(tune, "--schedule", "train.schedule", "learning-rate decay: linear, cosine, constant")
    option(tune, "--warmup", "train.warmup", "fraction of the steps spent warming the rate up")
    option(tune, "--max-grad-norm", "train.max_grad_norm",
           "clip each step's gradient norm to this (0: off)")
    option(tune, "--train-batch-size", "train.batch_size", "samples per step")
    option(tune, "--epochs", "train.max_epochs", "maximum epochs per block")
    option(tune, "--tolerance", "train.tolerance",
           "early stop when an epoch improves the held-out loss by less than this fraction")
    option(tune, "--holdout", "train.holdout",
           "fraction of calibration samples held out to judge convergence")
    option(tune, "--autocast", "train.autocast", "auto, bfloat16 or none")
    option(tune, "--train-seed", "train.seed", "shuffling seed")
    option(tune, "--train-norms", "train.train_norms",
           "also train each block's norm scales (as the authors' code does)",
           action="store_const", const="on")
    option(tune, "--window", "train.window",
           "block (Eq. 4) or sublayers (attention against the dense attention output, then "
           "the MLP against the dense block output)")
    option(tune, "--remask", "train.remask",
           "on: choose each block's mask again on the fine-tuned blocks' outputs just before "
           "training it (pruning and reconstruction alternate block by block); off: train "
           "on the mask stage's masks; auto: on for EBFT with sequential block and mask "
           "inputs and masks of single weights", none="auto", nargs="?", const="on",
           metavar="on|off|auto")
    option(tune, "--start", "train.start",
           "the weights each block trains from: method (what the mask method left, e.g. "
           "SparseGPT's updated weights) or dense (the dense weights under the same mask)",
           metavar="method|dense")
    option(tune, "--block-inputs", "train.block_inputs",
           "sequential (each block on the outputs of the fine-tuned blocks before it, as "
           "the paper) or dense (on the dense model's, from the capture: the blocks are "
           "independent and run at once on the task runner)")
    distilled = run.add_argument_group(
        "distillation of the whole recovered model on the dense model's logits (from the "
        "capture), after EBFT or LoRA; it holds the whole model and AdamW's moments")
    option(distilled, "--distill-epochs", "distill.epochs", "epochs over the calibration "
           "windows; 0: off")
    option(distilled, "--distill-lr", "distill.lr", "AdamW learning rate")
    option(distilled, "--distill-top", "distill.top", "share of the blocks, counted from the "
           "last, whose weights it trains (the rest need no backward pass: faster, less "
           "memory)")
    adapters = run.add_argument_group("LoRA baseline (--finetune lora, peft)")
    option(adapters, "--lora-rank", "lora.rank", "adapter rank")
    option(adapters, "--lora-alpha", "lora.alpha", "adapter scale alpha")
    option(adapters, "--lora-dropout", "lora.dropout", "adapter dropout")
    option(adapters, "--lora-lr", "lora.lr", "AdamW learning rate (the paper's: 1e-4)")
    option(adapters, "--lora-epochs", "lora.epochs", "epochs over the data")
    option(adapters, "--lora-batch-size", "lora.batch_size", "sequences per step")
    evals = run.add_argument_group("zero-shot evaluation (lm-evaluation-harness)")
    option(evals, "--tasks", "zeroshot.tasks",
           "all, paper, or a comma list (piqa,arc_easy,arc_challenge,hellaswag,winogrande,"
           "boolq,openbookqa,lambada_openai,storycloze)")
    option(evals, "--zeroshot-limit", "zeroshot.limit",
           "evaluate only the first N documents of each task (quick runs)")
    option(evals, "--zeroshot-batch-size", "zeroshot.batch_size", "harness batch size")
    saved = run.add_argument_group("the saved model")
    option(saved, "--form", "form",
           "masked (original shapes, zeros) or compact (flap only: heads and channels "
           "physically removed)")
    option(saved, "--save-dtype", "save_dtype",
           "dtype of the saved model: auto (compute dtype), float32, bfloat16")
    option(saved, "--keep-boundaries", "keep_boundaries",
           "keep every block's calibration outputs in the store",
           action="store_const", const="on")
    option(saved, "--no-boundary-writes", "write_boundaries",
           "hand each block's outputs to the next in memory only; a killed run then "
           "recomputes its next block's inputs from the cached blocks",
           action="store_const", const="off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebft", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    dense = sub.add_parser("dense", allow_abbrev=False,
                           help="calibrate, capture dense activations, perplexity")
    add_dense_flags(dense)
    run = sub.add_parser("run", allow_abbrev=False,
                         help="the whole pipeline: prune, fine-tune, assemble, evaluate")
    add_dense_flags(run)
    add_run_flags(run)
    add_runner_flags(run)
    sweep = sub.add_parser("sweep", allow_abbrev=False,
                           help="a grid of configurations sharing cached stages")
    add_dense_flags(sweep)
    add_run_flags(sweep)
    add_sweep_flags(sweep)
    verify = sub.add_parser("verify", allow_abbrev=False,
                            help="re-hash every artifact in the store against its digest")
    verify.add_argument("--store", default=os.environ.get("EBFT_STORE", ".ebft-store"))
    report = sub.add_parser("report", allow_abbrev=False,
                            help="rebuild a sweep's tables from stored run reports")
    report.add_argument("--store", default=os.environ.get("EBFT_STORE", ".ebft-store"))
    report.add_argument("--sweep", default=None,
                        help="a sweep key (sweeps/<key>/); default: every run report in the store")
    report.add_argument("--out", default=None, help="folder for tables and plots")
    return parser


def add_runner_flags(run: argparse.ArgumentParser) -> None:
    where = run.add_argument_group("where tasks run (independent EBFT blocks: --block-inputs "
                                   "dense)")
    option(where, "--task-runner", "runner.task_runner",
           "threads, dask (prefect-dask) or ray (prefect-ray)")
    option(where, "--address", "runner.address",
           "address of an existing Dask scheduler or Ray cluster (default: a local one)")
    option(where, "--workers", "runner.workers", "tasks at once on the thread runner")


def add_sweep_flags(sweep: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from flows.sweep import SweepConfig

    shown = {f.name: f.default for f in fields(SweepConfig) if f.name != "base"}

    def grid_flag(flag: str, name: str, help: str) -> None:
        value = shown[name]
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        grid.add_argument(flag, dest=f"grid:{name}", default=FROM_CONFIG,
                          help=f"{help} (default: {value if value not in ('', None) else '-'})")

    grid = sweep.add_argument_group("the grid (each a comma list; other flags set the base)")
    grid_flag("--models", "models", "models (empty: --model)")
    grid_flag("--methods", "methods", "mask methods")
    grid_flag("--sparsities", "sparsities", "ratios and/or N:M patterns")
    grid_flag("--finetunes", "finetunes",
              "recoveries: none, ebft, dsnot (the method + DSnoT), mask (EBFT mask tuning), lora")
    grid_flag("--nsamples-grid", "nsamples", "calibration sizes, e.g. 8,16,32 (empty: --nsamples)")
    grid_flag("--parallel", "parallel", "configurations at once on the thread task runner")
    grid_flag("--task-runner", "task_runner", "threads, dask (prefect-dask) or ray (prefect-ray)")
    grid_flag("--address", "address", "address of an existing Dask scheduler or Ray cluster")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        if args.command == "verify":
            return _verify(args)
        prefect_env()
        return {"dense": _dense, "run": _run, "sweep": _sweep}[args.command](args)
    except UserError as err:
        print(f"ebft: error: {err}", file=sys.stderr)
        return 2
    except StoreFull as err:
        print(f"ebft: error: {err.strerror}", file=sys.stderr)
        return 2
    except StoreLocationError as err:
        print(f"ebft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from stages.recovery.handover import HANDOVER

        HANDOVER.stop()  # so that no background thread keeps the process from exiting
        print(f"\nebft: interrupted. {_finished_so_far()} Run the same command again to resume "
              "from there.", file=sys.stderr)
        return 130


def _finished_so_far() -> str:
    """What an interrupted run leaves in the store, in one sentence."""
    from flows.caching import FINISHED

    if not FINISHED:
        return "No stage had finished."
    done = ", ".join(k if n == 1 else f"{n} {k}" for k, n in Counter(FINISHED).items())
    return f"Finished stages are kept in the store: {done}."


def prefect_env() -> None:
    """Settings Prefect reads when it is first imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep the log readable
    # The first start of a local server migrates its SQLite database; on a busy 2-core
    # machine that can outlast Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def settings(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """What the command line sets: config path -> (how it was given, value). Flags come
    as strings, converted here to the field's type, so a bad value names its flag."""
    from flows.config import config_paths, convert

    hints = config_paths()
    given: dict[str, tuple[str, object]] = {}
    for dest, raw in vars(args).items():
        if dest.startswith(SET):
            path = dest.removeprefix(SET)
            flag = FLAG_OF[path]
            given[path] = (flag, convert_flag(flag, raw, hints[path], convert))
    if getattr(args, "betas", FROM_CONFIG) is not FROM_CONFIG:
        for path, raw in zip(("train.beta1", "train.beta2"), args.betas, strict=True):
            given[path] = ("--betas", convert(raw, float, "--betas"))
    for assignment in args.set:
        path, sep, raw = assignment.partition("=")
        if not sep or not path:
            raise UserError(f"--set {assignment!r}: write SECTION.FIELD=VALUE, e.g. "
                            "--set train.tolerance=0.02")
        if path not in hints:
            near = [p for p in hints if p.split(".")[-1] == path.split(".")[-1]]
            raise UserError(f"--set {path}: no such setting" +
                            (f"; did you mean {' or '.join(near)}?" if near else
                             "; the settings are the fields of flows/config.py"))
        given[path] = (f"--set {path}", convert_flag(f"--set {path}", raw, hints[path], convert))
    return given


def convert_flag(flag: str, raw: str, hint, convert):
    if flag == "--tasks":
        from stages.evaluation.zeroshot import parse_tasks

        return parse_tasks(raw) if raw else ()
    return convert(raw, hint, flag)


def config_of(args: argparse.Namespace, given: dict | None = None):
    """The RunConfig a command line means: defaults, then its --preset, then its flags
    (``given``: the command line's ``settings``, when the caller already has them)."""
    from flows.config import build_config

    given = settings(args) if given is None else given
    return build_config(args.preset, {path: value for path, (_, value) in given.items()})


def _finish(state, stored: Callable[[], dict] | None = None) -> dict | None:
    """The flow's result, or None after printing why it failed (one line for user errors).

    A completed flow's result lives in memory; when Prefect had to read the final state
    back from its API (a slow server under load), the state has no data. The flow wrote its
    report to the store before returning, so ``stored`` reads it from there instead.
    """
    from prefect.exceptions import MissingResult

    if not state.is_failed():
        try:
            return state.result()
        except MissingResult:
            if stored is None:
                raise
            return stored()
    err = _user_error(state)
    if err:
        raise err
    print(f"ebft: flow failed: {state.message}", file=sys.stderr)
    return None


def stored_report(cfg) -> dict:
    """The run report the flow wrote to the store (``flows.run.write_report``)."""
    import json

    from store import Store

    path = Store(cfg.dense.store).path("reports", cfg.key()) / "report.json"
    return {**json.loads(path.read_text()), "report_path": str(path)}


def stored_sweep(sweep, configurations: int) -> dict:
    """The sweep's index and tables as the flow wrote them (``flows.sweep``)."""
    import json

    from store import Store

    folder = Store(sweep.base.dense.store).path("sweeps", sweep.key())
    return {**json.loads((folder / "sweep.json").read_text()), "path": str(folder),
            "configurations": configurations}


# how the summaries name what perplexity was measured on (--eval-data)
EVAL_LABELS = {"wikitext2": "wikitext-2", "wikitext2-validation": "wiki-valid",
               "c4-heldout": "c4-heldout"}


def _dense(args: argparse.Namespace) -> int:
    from flows.dense import dense_flow, prepare
    from flows.server import prefect_api

    cfg = config_of(args).dense
    start = time.monotonic()
    prepare(cfg)  # bad input fails here, in one line, before Prefect starts
    with prefect_api():
        result = _finish(dense_flow(cfg, return_state=True))
    if result is None:
        return 1
    ppl = result["perplexity"]
    print(f"\nmodel        {result['model']['name']} ({result['model']['path']})")
    print(f"device/dtype {result['device']} / {result['dtype']}")
    for stage, name in result["states"].items():
        print(f"stage        {stage:<14} {name}")
    print(f"calibration  {result['calibration']['path']}")
    print(f"activations  {result['activations']['path']}")
    print(f"{EVAL_LABELS[ppl.get('eval_data', 'wikitext2')]:<12} perplexity "
          f"{ppl['perplexity']:.3f} over {ppl['windows']} of {ppl['windows_total']} windows "
          f"of {ppl['seqlen']} tokens")
    print(f"wall time    {time.monotonic() - start:.1f}s")
    return 0


def refuse_ignored(cfg, given: dict[str, tuple[str, object]]) -> None:
    """A setting the configuration would silently ignore is an error naming it."""
    from flows.config import settled, why_no_owl
    from stages.masks import METHODS, is_structured

    # an explicit "no distillation" (--distill-epochs 0) agrees with every recipe: a sweep
    # script may pass it to every run, mask tuning and --finetune none included
    given = {p: v for p, v in given.items()
             if not (p == "distill.epochs" and cfg.distill.epochs == 0)}

    def refuse(paths, why: str) -> None:
        ignored = sorted(given[p][0] for p in given if any(
            p == x or p.startswith(x + ".") for x in paths))
        if ignored:
            raise UserError(f"{', '.join(ignored)} would be ignored: {why}; drop "
                            f"{'it' if len(ignored) == 1 else 'them'}")

    if {"prune.pattern", "prune.sparsity"} <= given.keys():
        raise UserError("--pattern and --sparsity both set the sparsity (N:M prunes N/M); "
                        "give one of them")
    if cfg.distill.epochs == 0:
        refuse(("distill.lr", "distill.top", "distill.seed"),
               "--distill-epochs is 0: nothing is distilled")
    if cfg.finetune == "none":
        refuse(("train", "lora", "distill"), "--finetune none trains nothing")
    elif cfg.finetune == "lora":
        refuse(("train",), "they set EBFT, and --finetune lora trains LoRA adapters")
    else:
        refuse(("lora",), "they set the LoRA baseline (--finetune lora)")
        if cfg.train.tune == "mask":
            refuse(("train.lr", "train.weight_decay", "train.train_norms"),
                   "--tune mask trains scores at --mask-lr, the weights stay frozen")
            refuse(("distill",), "--tune mask keeps the weights, and distillation trains "
                   "them (it is off after mask tuning)")
        else:
            refuse(("train.mask_lr",), "it is the score learning rate of --tune mask")
    running = cfg.prune.method.split("+")
    for name, cls in METHODS.items():
        if name not in running:
            refuse((f"prune.{name}",), f"they set {cls.__name__}, and --method "
                                       f"{cfg.prune.method} does not run it")
    if settled(cfg).prune.layer_sparsity != "owl":
        refuse(("prune.owl_threshold", "prune.owl_limit"),
               f"they set OWL, and OWL does not run: {why_no_owl(cfg.prune)}")
    if is_structured(cfg.prune.method):
        refuse(("prune.mask_inputs",), f"--method {cfg.prune.method} scores every block on "
                                       "the dense capture")
    if cfg.prune.pattern:
        refuse(("prune.sparsegpt.group",), f"--pattern {cfg.prune.pattern} prunes within "
                                           "each row's groups of M already")
    if cfg.runner.task_runner != "threads":
        refuse(("runner.workers",), "it is the thread runner's width; the cluster decides")
    else:
        refuse(("runner.address",), "it names a Dask or Ray cluster (--task-runner dask|ray)")


def _run(args: argparse.Namespace) -> int:
    from flows.run import prepare, run_flow
    from flows.runners import task_runner_for
    from flows.server import prefect_api

    given = settings(args)
    cfg = config_of(args, given)
    refuse_ignored(cfg, given)
    prepare(cfg)  # bad input fails here, in one line, before Prefect starts
    print(f"ebft run: preset {args.preset}: {cfg.dense.nsamples} calibration windows of "
          f"{cfg.dense.seqlen} tokens, up to {cfg.train.max_epochs} epochs per block at lr "
          f"{cfg.train.lr:g}, "
          f"perplexity on {cfg.dense.eval_windows or 'all'} windows of {cfg.dense.eval_seqlen}"
          f" ({cfg.dense.eval_data})", flush=True)
    runner = task_runner_for(cfg.runner.task_runner, cfg.runner.address, cfg.runner.workers)
    with prefect_api():
        report = _finish(run_flow.with_options(task_runner=runner)(cfg, return_state=True),
                         lambda: stored_report(cfg))
    if report is None:
        return 1
    print_summary(report)
    return 0


def grid_of(args: argparse.Namespace) -> dict:
    """The SweepConfig fields the command line gives (the rest keep their defaults)."""
    import typing

    from flows.config import convert
    from flows.sweep import SweepConfig

    hints = typing.get_type_hints(SweepConfig)
    flags = {"nsamples": "--nsamples-grid", "task_runner": "--task-runner"}
    return {name: convert(raw, hints[name], flags.get(name, f"--{name}"))
            for dest, raw in vars(args).items() if dest.startswith("grid:")
            for name in [dest.removeprefix("grid:")]}


def _sweep(args: argparse.Namespace) -> int:
    from flows.server import prefect_api
    from flows.sweep import SweepConfig, check, sweep_flow

    sweep = SweepConfig(config_of(args), **grid_of(args))
    configs = check(sweep)  # bad input fails here, in one line, before Prefect starts
    print(f"ebft sweep: {len(configs)} configurations, preset {args.preset}", flush=True)
    with prefect_api():
        result = _finish(sweep_flow(sweep, return_state=True),
                         lambda: stored_sweep(sweep, len(configs)))
    if result is None:
        return 1
    print("\n" + result["markdown"])
    print(f"tables/plots {result['path']}  ({', '.join(result['plots'])})")
    print(f"wall time    {result['wall_seconds']:.1f}s for {result['configurations']} "
          "configurations")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Every artifact's files hashed again (runs only compare stamps); exit 1 if any differ."""
    from store import Store

    store = Store(args.store)  # (a bucket: every artifact is downloaded and hashed)
    if not store.remote and not store.root.is_dir():
        raise UserError(f"--store {store.root}: no such store")
    bad, count = [], 0
    for artifact in store.artifacts():
        count += 1
        if not store.verify(artifact, full=True):
            bad.append(f"{artifact.kind}/{artifact.key}")
            print(f"corrupted    {artifact.kind}/{artifact.key}")
    print(f"verified     {count} artifacts in {store.root}: "
          f"{len(bad) or 'none'} corrupted" + (" (the next run recomputes them)" if bad else ""))
    return 1 if bad else 0


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from stages.reporting import reports
    from store import Store

    store = Store(args.store)

    def report_path(key: str) -> Path:
        return Path(store.get("reports", key).path) / "report.json"

    if args.sweep:
        found = store.get("sweeps", args.sweep)
        if found is None:
            raise UserError(f"--sweep {args.sweep}: no sweep with that key in "
                            f"{store.location}; see its sweeps/ folder")
        index = json.loads((Path(found.path) / "sweep.json").read_text())
        paths = [report_path(k) for k in index["report_keys"]] if "report_keys" in index \
            else [Path(p) for p in index["reports"]]
    else:
        paths = [report_path(key) for key in store.keys("reports")]
    if not paths:
        raise UserError(f"no run reports in {store.location}; run `ebft run` or `ebft sweep` "
                        "first")
    from flows.sweep import block_losses

    rows = reports.load_reports(paths)
    out = Path(args.out) if args.out else None
    if out is None:
        print("\n".join(reports.section(name, t)
                        for name, t in reports.build_tables(rows).items()))
        return 0
    written = reports.write(rows, out, block_losses([str(p) for p in paths]))
    print(written["markdown"])
    print(f"tables/plots {out}  ({', '.join(written['plots'])})")
    return 0


def print_summary(report: dict) -> None:
    dense, sparse = report["perplexity"]["dense"], report["perplexity"]["finetuned"]
    cfg, masks = report["config"], report["mask_report"]
    label = f"{cfg['prune']['method']} {masks['pattern']}"
    from stages.recovery.recoveries import recovery_of

    tuned = recovery_of(cfg["prune"]["method"], cfg["finetune"], cfg["train"]["tune"]).summary
    if report.get("distill"):
        tuned += " + KD"
    print(f"\nmodel        {report['model']['name']} on {report['device']} / {report['dtype']}")
    print(f"{'':<13}{'stage':<20} {'state':<20} {'seconds':>9} {'I/O s':>7} {'read GB':>8} "
          f"{'written GB':>10} {'peak RSS GB':>11}")
    for stage, name in report["states"].items():
        use = report["usage"].get(stage, {})
        print(f"stage        {stage:<20} {name:<20} {report['seconds'].get(stage, 0):>8.1f}s "
              f"{use.get('io_seconds', 0):>7.1f} {use.get('read_bytes', 0) / 1e9:>8.2f} "
              f"{use.get('written_bytes', 0) / 1e9:>10.2f} "
              f"{use.get('peak_rss_bytes', 0) / 2**30:>11.2f}")
    if report.get("ebft_time"):
        t = report["ebft_time"]
        print(f"ebft         {t['blocks']} blocks trained for {t['training_seconds']:.1f}s of the "
              f"stage's {t['stage_seconds']:.1f}s: {t['non_training_share']:.0%} outside "
              "training (loading, boundary I/O, forward passes)")
    print(f"sparsity     {masks['overall_sparsity']:.4f} overall, pattern "
          f"{'ok' if masks['pattern_ok'] else 'VIOLATED'} in every layer")
    windows = f"{dense['windows']} of {dense['windows_total']} windows of {dense['seqlen']}"
    data = EVAL_LABELS[dense.get("eval_data", "wikitext2")]
    print(f"{data:<12} {'dense':<26} {dense['perplexity']:.3f}   ({windows})")
    print(f"{data:<12} {label:<26} {report['perplexity']['pruned']['perplexity']:.3f}")
    if sparse is not None:
        print(f"{data:<12} {label + tuned:<26} {sparse['perplexity']:.3f}")
    if report.get("zeroshot"):
        print_zeroshot(report["zeroshot"], {"dense": "dense", "pruned": label,
                                            "finetuned": label + tuned})
    print(f"model        {report['model_folder']}")
    print(f"report       {report['report_path']}")
    print(f"wall time    {report['wall_seconds']:.1f}s")


def print_zeroshot(results: dict, labels: dict[str, str]) -> None:
    """Accuracy per task (the harness's acc) for each evaluated model, and the mean."""
    first = next(r for r in results.values() if r is not None)
    tasks = list(first["tasks"])
    limit = f", first {first['limit']} docs per task" if first["limit"] else ""
    print(f"zero-shot    acc (lm-eval{limit}): " + " ".join(f"{t[:10]:>10}" for t in tasks)
          + "       mean")
    for name, result in results.items():
        if result is not None:
            accs = " ".join(f"{result['tasks'][t]['acc']:>10.4f}" for t in tasks)
            print(f"zero-shot    {labels[name]:<26} {accs} {result['mean_acc']:>10.4f}")
    for task, why in first["skipped"].items():
        print(f"zero-shot    skipped {task}: {why}")


def _user_error(state) -> UserError | StoreFull | None:
    """A UserError (or a full disk) raised inside the flow, to print as one line."""
    try:
        state.result()
    except (UserError, StoreFull) as err:
        return err
    except Exception:  # noqa: BLE001 - any other failure is reported as such
        return None
    return None


if __name__ == "__main__":
    sys.exit(main())
