"""The `ebft` command line. Parsing happens in main(), never at import."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from stages.errors import UserError
from store import StoreFull, StoreLocationError


def _count_or_all(value: str) -> int | None:
    return None if value == "all" else int(value)


# The default run is sized to finish in about 15 minutes on a 2-core CPU; "paper" is the
# paper's setting (256 x 1024 C4 windows, up to 10 epochs at lr 2e-4, full Wikitext-2 test
# set). Our default lr is 1e-3: it reaches a much lower block loss (bench/vs_authors.py).
FROM_PRESET = object()  # marks a flag the user left to the preset
PRESETS = {
    "default": {"nsamples": 16, "epochs": 2, "train_batch_size": 2, "eval_windows": 4,
                "lr": 1e-3},
    "paper": {"nsamples": 256, "epochs": 10, "train_batch_size": 8, "eval_windows": None,
              "lr": 2e-4},
}


def add_dense_flags(dense: argparse.ArgumentParser) -> None:
    dense.add_argument("--model", default="smollm2-135m",
                       help="hub id, local Hugging Face folder, or smollm2-135m (built in)")
    dense.add_argument("--store", default=os.environ.get("EBFT_STORE", ".ebft-store"),
                       help="artifact store folder (env EBFT_STORE)")
    dense.add_argument("--data-dir", default=None,
                       help="data folder laid out like shared/data (env EBFT_DATA_DIR)")
    dense.add_argument("--nsamples", type=int, default=256, help="calibration windows")
    dense.add_argument("--seqlen", type=int, default=1024, help="calibration window length")
    dense.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    dense.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window")
    dense.add_argument("--eval-windows", type=_count_or_all, default=None,
                       help="evaluate only the first N windows (quick estimate); default all")
    dense.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    dense.add_argument("--dtype", default="auto",
                       help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    dense.add_argument("--batch-size", type=int, default=8,
                       help="batch size of inference passes (capture, masks, boundaries)")


def add_run_flags(run: argparse.ArgumentParser) -> None:
    prune = run.add_argument_group("pruning (the mask stage)")
    prune.add_argument("--method", default="wanda",
                       help="magnitude, wanda, sparsegpt, each optionally +dsnot (e.g. "
                            "wanda+dsnot); flap (structured: whole heads and MLP channels)")
    prune.add_argument("--sparsity", type=float, default=0.5,
                       help="fraction of weights pruned in every linear layer of every block "
                            "(flap: of all block weights together)")
    prune.add_argument("--pattern", default=None, help="N:M semi-structured, e.g. 2:4 or 4:8")
    prune.add_argument("--mask-inputs", default="sequential", choices=None,
                       help="sequential (pruned path, default) or dense (shared dense capture)")
    prune.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    prune.add_argument("--percdamp", type=float, default=0.01,
                       help="SparseGPT dampening, fraction of the mean Hessian diagonal")
    prune.add_argument("--dsnot-cycles", type=int, default=50, help="DSnoT max cycles")
    prune.add_argument("--dsnot-threshold", type=float, default=0.1,
                       help="DSnoT update threshold")
    prune.add_argument("--dsnot-var-power", type=float, default=1.0,
                       help="DSnoT power of the input variance in the regrowing score")
    prune.add_argument("--flap-structure", default="AL-AM",
                       help="FLAP: AL-AM (global ranking, per-layer widths) or UL-UM (the same "
                            "share in every layer)")
    prune.add_argument("--flap-bias", default="on", choices=("on", "off"),
                       help="FLAP bias compensation for the removed channels")
    tune = run.add_argument_group("fine-tuning (EBFT, one cached task per block)")
    tune.add_argument("--finetune", default="ebft",
                      help="ebft, lora (LoRA on the whole pruned model, the paper's baseline), "
                           "or none (pruned model only)")
    tune.add_argument("--tune", default="weights", help="weights (EBFT) or mask (Section 4.5)")
    tune.add_argument("--target", default="dense-output",
                      help="dense-output (Eq. 4, from the dense capture) or dense-block "
                           "(dense block on the sparse input, as the authors' code)")
    tune.add_argument("--lr", type=float, default=None,
                      help="AdamW learning rate of the weights (preset default: 1e-3; "
                           "paper: the paper's 2e-4)")
    tune.add_argument("--mask-lr", type=float, default=5e-3, help="learning rate of scores")
    tune.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    tune.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    tune.add_argument("--max-grad-norm", type=float, default=1.0,
                      help="clip each step's gradient norm to this (0: off)")
    tune.add_argument("--train-batch-size", type=int, default=None, help="samples per step")
    tune.add_argument("--epochs", type=int, default=None, help="maximum epochs per block")
    tune.add_argument("--tolerance", type=float, default=0.01,
                      help="early stop when an epoch improves the held-out loss by less "
                           "than this fraction")
    tune.add_argument("--holdout", type=float, default=0.0625,
                      help="fraction of calibration samples held out to judge convergence")
    tune.add_argument("--autocast", default="auto", help="auto, bfloat16 or none")
    tune.add_argument("--train-seed", type=int, default=0, help="shuffling seed")
    tune.add_argument("--train-norms", action="store_true",
                      help="also train each block's norm scales (as the authors' code does)")
    adapters = run.add_argument_group("LoRA baseline (--finetune lora, peft)")
    adapters.add_argument("--lora-rank", type=int, default=8, help="adapter rank")
    adapters.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha")
    adapters.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout")
    adapters.add_argument("--lora-lr", type=float, default=1e-4,
                          help="AdamW learning rate (the paper's: 1e-4)")
    adapters.add_argument("--lora-epochs", type=int, default=2, help="epochs over the data")
    adapters.add_argument("--lora-batch-size", type=int, default=2, help="sequences per step")
    evals = run.add_argument_group("zero-shot evaluation (lm-evaluation-harness)")
    evals.add_argument("--tasks", default="",
                       help="all, paper, or a comma list (piqa,arc_easy,arc_challenge,"
                            "hellaswag,winogrande,boolq,openbookqa,lambada_openai,storycloze);"
                            " default none")
    evals.add_argument("--zeroshot-limit", type=int, default=None,
                       help="evaluate only the first N documents of each task (quick runs)")
    evals.add_argument("--zeroshot-batch-size", type=int, default=16, help="harness batch size")
    run.add_argument("--form", default="masked",
                     help="saved model: masked (original shapes, zeros) or compact (flap only: "
                          "heads and channels physically removed)")
    run.add_argument("--save-dtype", default="auto",
                     help="dtype of the saved model: auto (compute dtype), float32, bfloat16")
    run.add_argument("--keep-boundaries", action="store_true",
                     help="keep every block's calibration outputs in the store")
    run.add_argument("--preset", default="default", choices=sorted(PRESETS),
                     help="default: ~15 min on a 2-core CPU; paper: the paper's settings")


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
    # Taken from the preset. Not a string, so argparse does not run it through the flag's type.
    run.set_defaults(nsamples=None, eval_windows=FROM_PRESET)
    sweep = sub.add_parser("sweep", allow_abbrev=False,
                           help="a grid of configurations sharing cached stages")
    add_dense_flags(sweep)
    add_run_flags(sweep)
    add_sweep_flags(sweep)
    sweep.set_defaults(nsamples=None, eval_windows=FROM_PRESET)
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


def add_sweep_flags(sweep: argparse.ArgumentParser) -> None:
    grid = sweep.add_argument_group("the grid (each a comma list; other flags set the base)")
    grid.add_argument("--models", default="", help="models (default: --model)")
    grid.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    grid.add_argument("--sparsities", default="0.5,0.6,0.7", help="ratios and/or N:M patterns")
    grid.add_argument("--finetunes", default="none,dsnot,ebft",
                      help="none, ebft, dsnot (the method + DSnoT), mask (EBFT mask tuning)")
    grid.add_argument("--nsamples-grid", default="",
                      help="calibration sizes, e.g. 8,16,32 (default: --nsamples)")
    grid.add_argument("--parallel", type=int, default=1,
                      help="configurations at once on the thread task runner")
    grid.add_argument("--task-runner", default="threads",
                      help="threads, dask (prefect-dask) or ray (prefect-ray)")
    grid.add_argument("--address", default=None,
                      help="address of an existing Dask scheduler or Ray cluster")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
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


def _dense_config(args: argparse.Namespace):
    from flows.dense import DenseConfig

    fields = DenseConfig.__dataclass_fields__
    return DenseConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _finish(state) -> dict | None:
    """The flow's result, or None after printing why it failed (one line for user errors)."""
    if not state.is_failed():
        return state.result()
    err = _user_error(state)
    if err:
        raise err
    print(f"ebft: flow failed: {state.message}", file=sys.stderr)
    return None


def _dense(args: argparse.Namespace) -> int:
    from flows.dense import dense_flow, prepare
    from flows.server import prefect_api

    cfg = _dense_config(args)
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
    print(f"wikitext-2   perplexity {ppl['perplexity']:.3f} over {ppl['windows']} of "
          f"{ppl['windows_total']} windows of {ppl['seqlen']} tokens")
    print(f"wall time    {time.monotonic() - start:.1f}s")
    return 0


EBFT_FLAGS = ("--tune", "--target", "--lr", "--mask-lr", "--betas", "--weight-decay",
              "--max-grad-norm", "--train-batch-size", "--epochs", "--tolerance", "--holdout",
              "--autocast", "--train-seed", "--train-norms")
LORA_FLAGS = ("--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-lr", "--lora-epochs",
              "--lora-batch-size")


def given_flags(argv: list[str]) -> set[str]:
    """The long options written on the command line (abbreviations are off)."""
    return {token.split("=", 1)[0] for token in argv if token.startswith("--")}


def refuse_ignored_flags(args: argparse.Namespace, given: set[str]) -> None:
    """A flag the configuration would silently ignore is an error naming it."""
    def refuse(flags, why: str) -> None:
        ignored = sorted(given & set(flags))
        if ignored:
            raise UserError(f"{', '.join(ignored)} would be ignored: {why}; drop "
                            f"{'it' if len(ignored) == 1 else 'them'}")

    if {"--pattern", "--sparsity"} <= given:
        raise UserError("--pattern and --sparsity both set the sparsity (N:M prunes N/M); "
                        "give one of them")
    if args.finetune == "none":
        refuse(EBFT_FLAGS + LORA_FLAGS, "--finetune none trains nothing")
    elif args.finetune == "lora":
        refuse(EBFT_FLAGS, "they set EBFT, and --finetune lora trains LoRA adapters")
    else:
        refuse(LORA_FLAGS, "they set the LoRA baseline (--finetune lora)")
        if args.tune == "mask":
            refuse(("--lr", "--weight-decay", "--train-norms"),
                   "--tune mask trains scores at --mask-lr, the weights stay frozen")
        else:
            refuse(("--mask-lr",), "it is the score learning rate of --tune mask")
    from stages.pruning import MaskSpec

    by_reason: dict[str, list[str]] = {}  # the mask key's own list of what a method ignores
    for name, why in MaskSpec("", "", method=args.method).unused_parameters().items():
        by_reason.setdefault(why, []).append("--" + name.replace("_", "-"))
    for why, flags in by_reason.items():
        refuse(flags, why)


def run_config(args: argparse.Namespace):
    """Turn parsed flags into a RunConfig: explicit flags win over the preset's values."""
    from flows.run import PruneConfig, RunConfig, ZeroShotConfig
    from stages.block_training import TrainConfig
    from stages.lora import LoraSettings
    from stages.zeroshot import parse_tasks

    preset = PRESETS[args.preset]
    for name in ("nsamples", "epochs", "train_batch_size", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.eval_windows is FROM_PRESET:
        args.eval_windows = preset["eval_windows"]
    prune = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        mask_inputs=args.mask_inputs, blocksize=args.blocksize, percdamp=args.percdamp,
        dsnot_cycles=args.dsnot_cycles, dsnot_threshold=args.dsnot_threshold,
        dsnot_var_power=args.dsnot_var_power, flap_structure=args.flap_structure,
        flap_bias=args.flap_bias == "on")
    train = TrainConfig(
        tune=args.tune, target=args.target, lr=args.lr, mask_lr=args.mask_lr,
        beta1=args.betas[0], beta2=args.betas[1], weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, batch_size=args.train_batch_size,
        max_epochs=args.epochs, tolerance=args.tolerance,
        holdout=args.holdout, autocast=args.autocast, seed=args.train_seed,
        train_norms=args.train_norms)
    evals = ZeroShotConfig(parse_tasks(args.tasks) if args.tasks else (),
                           args.zeroshot_limit, args.zeroshot_batch_size)
    adapters = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha,
                            dropout=args.lora_dropout, lr=args.lora_lr, epochs=args.lora_epochs,
                            batch_size=args.lora_batch_size)
    return RunConfig(_dense_config(args), prune, train, args.finetune, adapters, args.form,
                     args.save_dtype, args.keep_boundaries, evals)


def _run(args: argparse.Namespace) -> int:
    from flows.run import prepare, run_flow
    from flows.server import prefect_api

    refuse_ignored_flags(args, args.given)
    cfg = run_config(args)
    prepare(cfg)  # bad input fails here, in one line, before Prefect starts
    print(f"ebft run: preset {args.preset}: {cfg.dense.nsamples} calibration windows of "
          f"{cfg.dense.seqlen} tokens, up to {cfg.train.max_epochs} epochs per block at lr "
          f"{cfg.train.lr:g}, "
          f"perplexity on {cfg.dense.eval_windows or 'all'} windows of {cfg.dense.eval_seqlen}",
          flush=True)
    with prefect_api():
        report = _finish(run_flow(cfg, return_state=True))
    if report is None:
        return 1
    print_summary(report)
    return 0


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _sweep(args: argparse.Namespace) -> int:
    from flows.server import prefect_api
    from flows.sweep import SweepConfig, check, sweep_flow

    try:
        nsamples = tuple(int(n) for n in _csv(args.nsamples_grid))
    except ValueError:
        raise UserError(f"--nsamples-grid {args.nsamples_grid!r}: give integers, e.g. 8,16,32")
    sweep = SweepConfig(run_config(args), _csv(args.models), _csv(args.methods),
                        _csv(args.sparsities), _csv(args.finetunes), nsamples, args.parallel,
                        args.task_runner, args.address)
    configs = check(sweep)  # bad input fails here, in one line, before Prefect starts
    print(f"ebft sweep: {len(configs)} configurations, preset {args.preset}", flush=True)
    with prefect_api():
        result = _finish(sweep_flow(sweep, return_state=True))
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

    store = Store(args.store)
    if not store.root.is_dir():
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

    from stages import reports
    from store import Store

    store = Store(args.store)
    if args.sweep:
        index = store.path("sweeps", args.sweep) / "sweep.json"
        if not index.is_file():
            raise UserError(f"--sweep {args.sweep}: no sweep with that key in {store.root}; "
                            f"see {store.root / 'sweeps'}")
        paths = [Path(p) for p in json.loads(index.read_text())["reports"]]
    else:
        paths = sorted(store.root.glob("reports/*/report.json"))
    if not paths:
        raise UserError(f"no run reports in {store.root}; run `ebft run` or `ebft sweep` first")
    from flows.sweep import block_losses

    rows = reports.load_reports(paths)
    out = Path(args.out) if args.out else None
    if out is None:
        print("\n".join(f"### {name}\n\n{reports.markdown(t)}\n"
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
    tuned = {"none": "", "lora": " + LoRA",
             "ebft": f" + EBFT ({cfg['train']['tune']})"}[cfg["finetune"]]
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
    print(f"wikitext-2   {'dense':<26} {dense['perplexity']:.3f}   ({windows})")
    print(f"wikitext-2   {label:<26} {report['perplexity']['pruned']['perplexity']:.3f}")
    if sparse is not None:
        print(f"wikitext-2   {label + tuned:<26} {sparse['perplexity']:.3f}")
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
