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


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their flags."""
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-demo", help="train the demo tokenizer, target and drafter from stdlib sources")
    p.add_argument("--out", required=True, help="output directory (gets target/ and drafter/)")
    p.add_argument("--target-minutes", type=float, default=38.0, help="wall-clock budget for the target")
    p.add_argument("--drafter-minutes", type=float, default=12.0, help="wall-clock budget for the drafter")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=_train_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `specserve` script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
