"""The `specserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _train_demo(args: argparse.Namespace) -> int:
    from specserve.actors.demo.recipe import RecipeConfig, run_recipe

    cfg = RecipeConfig(
        out_dir=Path(args.out),
        target_minutes=args.target_minutes,
        drafter_minutes=args.drafter_minutes,
        threads=args.threads,
    )
    stats = run_recipe(cfg)
    print(json.dumps(stats, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from specserve.cluster.local import generate_local, set_threads

    set_threads(args.threads)
    return generate_local(args)


def _bench(args: argparse.Namespace) -> int:
    from specserve.cluster.bench_local import bench_main
    from specserve.cluster.local import set_threads

    set_threads(args.threads)
    return bench_main(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with speculative decoding (in-process)")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--drafter", default="model",
                   help="model | ngram | none (plain decoding) | path to a drafter checkpoint")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: the demo target)")
    p.add_argument("--k-max", type=int, default=8, help="longest draft block")
    p.add_argument("--threshold", type=float, default=0.4, help="drafter confidence below which drafting stops")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one is fastest for the small demo models at batch 1)")
    p.set_defaults(func=_generate)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark plain vs speculative decoding (in-process) and the HF peer")
    p.add_argument("--prompts", type=int, default=8, help="number of held-out code prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--k-max", type=int, default=8, help="longest draft block")
    p.add_argument("--threshold", type=float, default=0.4, help="drafter confidence threshold")
    p.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one is fastest for the small demo models at batch 1)")
    p.add_argument("--out", default="runs/bench_local.json", help="where to write the JSON report")
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their flags."""
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    p = sub.add_parser("train-demo", help="train the demo tokenizer, target and drafter from stdlib sources")
    p.add_argument("--out", required=True, help="output directory (gets target/ and drafter/)")
    p.add_argument("--target-minutes", type=float, default=60.0, help="wall-clock budget for the target")
    p.add_argument("--drafter-minutes", type=float, default=15.0, help="wall-clock budget for the drafter")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=_train_demo)
    return parser


def _quiet_transformers() -> None:
    """Everything is local: no hub look-ups, no per-file loading bars in the CLI's output."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `specserve` script. Bad input is an error message, not a traceback."""
    from specserve.actors.engine.request import InvalidRequestError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.func(args)
    except (InvalidRequestError, FileNotFoundError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
