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
        checkpoint_dir=None if args.checkpoint_dir == "" else Path(args.checkpoint_dir),
        device=_train_device(args.device),
        corpus=args.corpus,
    )
    stats = run_recipe(cfg)
    print(json.dumps(stats, indent=2))
    return 0


def _train_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _generate(args: argparse.Namespace) -> int:
    from specserve.cluster.local import generate_local, set_threads

    if args.server:
        from specserve.actors.engine.request import InvalidRequestError
        from specserve.cluster.commands import generate_remote

        for flag in ("fixed_k", "prompt_lookup"):
            if getattr(args, flag) is not None:
                raise InvalidRequestError(flag, "applies in-process only; a server drafts as its config's "
                                                "speculation section says")

        return generate_remote(args)

    set_threads(args.threads)
    return generate_local(args)


def _bench(args: argparse.Namespace) -> int:
    if args.kernels:  # GPU only, and imports nothing but torch and the kernels
        from specserve.cluster.bench_kernels import bench_kernels_main

        args.out = args.out or "runs/bench_kernels.json"
        return bench_kernels_main(args)
    if args.transport:  # no models: processes on loopback and small messages
        from specserve.cluster.bench_transport import bench_transport_main

        args.out = args.out or "runs/bench_transport.json"
        return bench_transport_main(args)
    from specserve.cluster.local import set_threads

    if args.overload:
        from specserve.cluster.bench_overload import bench_overload_main

        args.out = args.out or "runs/bench_overload.json"
        args.max_tokens = args.max_tokens or 32
        args.clients = args.clients or 64
        return bench_overload_main(args)
    args.clients = args.clients or 8
    if args.faults:
        from specserve.cluster.faults import bench_faults_main

        args.out = args.out or "runs/bench_faults.json"
        args.max_tokens = args.max_tokens or 16
        return bench_faults_main(args)
    if args.distill:
        from specserve.cluster.bench_distill import bench_distill_main

        args.out = args.out or "runs/bench_distill.json"
        args.max_tokens = args.max_tokens or 32
        return bench_distill_main(args)
    args.max_tokens = args.max_tokens or 128
    if args.serving:
        from specserve.cluster.bench_serving import bench_serving_main

        args.out = args.out or "runs/bench_serving.json"
        return bench_serving_main(args)
    set_threads(args.threads)
    if args.suffix:
        from specserve.cluster.bench_suffix import bench_suffix_main

        args.out = args.out or "runs/bench_suffix.json"
        return bench_suffix_main(args)
    if args.trees:
        from specserve.cluster.bench_trees import bench_trees_main

        args.out = args.out or "runs/bench_trees.json"
        return bench_trees_main(args)
    from specserve.cluster.bench_local import bench_main

    args.out = args.out or "runs/bench_local.json"
    return bench_main(args)


def _report(args: argparse.Namespace) -> int:
    from specserve.cluster.report import report_main

    return report_main(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with speculative decoding (in-process or --server)")
    p.add_argument("prompt", help="prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, rendered with the checkpoint's chat template")
    p.add_argument("--system", default=None, help="--chat: a system message before the user's")
    p.add_argument("--server", default=None, help="host:port of a running specserve server (default: in-process)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of a --server call, seconds")
    p.add_argument("--tls-ca", default=None, help="--server: PEM CA that signed the server's certificate (TLS)")
    p.add_argument("--tls-cert", default=None, help="--server: PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="--server: PEM key of the client certificate")
    p.add_argument("--tls-server-name", default=None,
                   help="--server: name the server certificate carries, if not the address's host")
    p.add_argument("--token-file", default=None,
                   help="--server: file holding the bearer token (default: $SPECSERVE_TOKEN, if set)")
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
    p.add_argument("--threshold", type=float, default=0.0, help="drafter confidence below which drafting stops")
    p.add_argument("--fixed-k", type=int, default=None,
                   help="draft exactly this many tokens every step instead of the cost model's choice (in-process)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="the model drafter drafts by suffix lookup where the last N tokens occurred before, "
                        "in the request or an earlier one (in-process; default 1, 0 = the model drafts everything)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one is fastest for the small demo models at batch 1)")
    p.set_defaults(func=_generate)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark plain vs speculative decoding (in-process and HF peer, or --serving)")
    p.add_argument("--prompts", type=int, default=8, help="number of held-out code prompts (--serving: per level)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per prompt (default 128; --distill: 32)")
    p.add_argument("--k-max", type=int, default=8, help="longest draft block")
    p.add_argument("--threshold", type=float, default=0.0, help="drafter confidence threshold")
    p.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one is fastest for the small demo models at batch 1)")
    p.add_argument("--out", default=None,
                   help="where to write the JSON report (default runs/bench_local.json or runs/bench_serving.json)")
    p.add_argument("--serving", action="store_true",
                   help="benchmark the deployed system through gRPC: plain vs synchronous vs pipelined drafting")
    p.add_argument("--concurrency", default="1,4,16,32", help="--serving: concurrency levels")
    p.add_argument("--rounds", type=int, default=3, help="--serving: rounds per level (variants interleaved)")
    p.add_argument("--port", type=int, default=50061,
                   help="--serving/--distill/--faults: gRPC port of the local benchmark cluster")
    p.add_argument("--drafter", default="model", choices=["model", "ngram"],
                   help="--serving: the speculative variants' drafter")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="--serving: speculation.prompt_lookup of every variant (default: the config default; "
                        "0 = no verifier-side lookup, every draft comes from the drafter replica)")
    p.add_argument("--trees", action="store_true",
                   help="token trees vs chains at the same verify budget (in-process, demo pair)")
    p.add_argument("--suffix", action="store_true",
                   help="the suffix drafter against prompt lookup alone on repeated traffic (in-process, demo pair)")
    p.add_argument("--functions", type=int, default=6, help="--suffix: functions requested in every round")
    p.add_argument("--repeats", type=int, default=3, help="--suffix: rounds (each function once per round)")
    p.add_argument("--budgets", default="4,8,16", help="--trees: draft positions verified per step")
    p.add_argument("--branching", type=int, default=3,
                   help="--trees: most children per tree node (default: what serving uses, TreeDrafter's)")
    p.add_argument("--temperature", type=float, default=0.0, help="--trees: 0 = greedy, > 0 = sampled requests")
    p.add_argument("--device", default="cpu", help="--trees: cpu or cuda")
    p.add_argument("--distill", action="store_true",
                   help="online distillation on a shifted workload (local cluster): acceptance and tok/s over time")
    p.add_argument("--requests", type=int, default=2000, help="--distill: requests served while training")
    p.add_argument("--window", type=int, default=100, help="--distill: requests per measurement window")
    p.add_argument("--clients", type=int, default=None,
                   help="--distill/--faults: concurrent requests (default 8); --overload: client threads (default 64)")
    p.add_argument("--after-rounds", type=int, default=4,
                   help="--distill: paused/training window pairs measured after the training phase")
    p.add_argument("--faults", action="store_true",
                   help="kill drafters, the registry, the distiller, the hub and a verifier under load (local "
                        "cluster): requests failed, outputs changed, recovery time")
    p.add_argument("--fault-list", default=None,
                   help="--faults: comma-separated subset of drafter,registry,registry-gone,distiller,hub,verifier")
    p.add_argument("--lead-s", type=float, default=2.0, help="--faults: seconds of load before each fault")
    p.add_argument("--tail-s", type=float, default=3.0, help="--faults: seconds of load after each recovery")
    p.add_argument("--overload", action="store_true",
                   help="drive a local cluster at several times its capacity: refusals, latency, memory growth")
    p.add_argument("--duration", type=float, default=300.0, help="--overload: seconds of overload")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="--overload: seconds of load before the memory baseline is taken")
    p.add_argument("--kernels", action="store_true",
                   help="kernel micro-benchmarks: Triton vs the torch reference (needs a CUDA GPU)")
    p.add_argument("--transport", action="store_true",
                   help="one verifier<->drafter round trip on loopback: raw TCP, a bare gRPC stream, the Drafting stream")
    p.add_argument("--round-trips", type=int, default=500, help="--transport: round trips per transport and gap")
    p.add_argument("--gaps", default="0,8",
                   help="--transport: idle milliseconds between round trips (a verify step), comma-separated")
    p.set_defaults(func=_bench)


def _cluster_command(name: str):
    def run(args: argparse.Namespace) -> int:
        from specserve.cluster import commands

        return getattr(commands, name)(args)

    return run


def _add_cluster(sub) -> None:
    address_help = "Ray cluster address (default: start a local cluster)"
    p = sub.add_parser("serve", help="deploy specserve on a Ray cluster (local by default)")
    p.add_argument("config", nargs="?", default=None, help="specserve YAML config (default: the demo pair)")
    p.add_argument("--address", default=None, help=address_help + "; with it, deploy and return")
    p.add_argument("--port", type=int, default=None, help="gRPC port (overrides server.grpc_port)")
    p.set_defaults(func=_cluster_command("serve_cmd"))

    p = sub.add_parser("status", help="pools, replicas and drafters of a running deployment")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cluster_command("status_cmd"))

    p = sub.add_parser("scale", help="resize the drafter pool of a running deployment")
    p.add_argument("pool", choices=["drafters"], help="the pool to scale")
    p.add_argument("replicas", type=int, help="number of replicas")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.set_defaults(func=_cluster_command("scale_cmd"))

    p = sub.add_parser("distill", help="online distillation: status, versions, rollback, pause, resume")
    p.add_argument("action", choices=["status", "versions", "rollback", "pause", "resume"],
                   help="status | versions | rollback VERSION (make that version live again) | pause | resume")
    p.add_argument("version", nargs="?", default=None, help="rollback: the version to go back to")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cluster_command("distill_cmd"))

    p = sub.add_parser("demo", help="local cluster with the demo pair: stream a few generations, shut down")
    p.add_argument("config", nargs="?", default=None, help="specserve YAML config (default: the demo pair)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--prompts", type=int, default=4, help="how many demo prompts")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.set_defaults(func=_cluster_command("demo_cmd"))


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their flags."""
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    _add_cluster(sub)
    p = sub.add_parser("report", help="markdown report with plots from the benchmarks' JSON files in runs/")
    p.add_argument("--runs", default="runs", help="where the benchmarks wrote their JSON")
    p.add_argument("--out", default="runs/report", help="directory for REPORT.md and its plots")
    p.set_defaults(func=_report)
    p = sub.add_parser("train-demo", help="train the demo tokenizer, target and drafter from stdlib sources")
    p.add_argument("--out", required=True, help="output directory (gets target/ and drafter/)")
    p.add_argument("--target-minutes", type=float, default=60.0, help="wall-clock budget for the target")
    p.add_argument("--drafter-minutes", type=float, default=15.0, help="wall-clock budget for the drafter")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--checkpoint-dir", default="runs/train-demo",
                   help="checkpoints of each stage, every 5 minutes and at its end; a run with the same "
                        "directory resumes there (raise a budget to train a finished stage further); '' = none")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--corpus", choices=["stdlib", "code"], default="stdlib",
                   help="stdlib: the standard library; code: it and every installed package's sources "
                        "(one file in ten held out of each)")
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
    from specserve.cluster.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.func(args)
    except (InvalidRequestError, ConfigError, FileNotFoundError) as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
