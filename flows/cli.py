"""The `ebft` command line. Parsing happens in main(), never at import."""

from __future__ import annotations

import argparse
import os
import sys
import time

from stages.errors import UserError


def _positive_or_none(value: str) -> int | None:
    return None if value in ("all", "0") else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dense = sub.add_parser("dense", help="calibrate, capture dense activations, perplexity")
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
    dense.add_argument("--eval-windows", type=_positive_or_none, default=None,
                       help="evaluate only the first N windows (quick estimate); default all")
    dense.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    dense.add_argument("--dtype", default="auto",
                       help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    dense.add_argument("--batch-size", type=int, default=8, help="capture batch size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "dense":
            return _dense(args)
    except UserError as err:
        print(f"ebft: error: {err}", file=sys.stderr)
        return 2
    return 1


def _dense(args: argparse.Namespace) -> int:
    # Cached task results live in the store, so a shared store shares its cache.
    store_root = os.path.abspath(args.store)
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", os.path.join(store_root, "prefect",
                                                                      "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines
    from flows.dense import DenseConfig, dense_flow, prepare

    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size}: must be positive")
    if args.eval_windows is not None and args.eval_windows < 0:
        raise UserError(f"--eval-windows {args.eval_windows}: must be positive or 'all'")
    cfg = DenseConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    start = time.monotonic()
    prepare(cfg)  # bad input fails here, in one line, before Prefect starts
    state = dense_flow(cfg, return_state=True)
    if state.is_failed():
        err = _user_error(state)
        if err:
            raise err
        print(f"ebft: flow failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
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


def _user_error(state) -> UserError | None:
    """A UserError raised inside the flow, to print as one line instead of a traceback."""
    try:
        state.result()
    except UserError as err:
        return err
    except Exception:  # noqa: BLE001 - any other failure is reported as such
        return None
    return None


if __name__ == "__main__":
    sys.exit(main())
