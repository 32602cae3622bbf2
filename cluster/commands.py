"""CLI commands that talk to a cluster: serve, generate --server, status, scale, distill, demo."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import grpc

from specserve.actors.engine.request import GenerationResult, SpecStats
from specserve.actors.security import SecurityError, TlsFiles
from specserve.cluster.client import Client, Reply
from specserve.cluster.config import ConfigError, load_config
from specserve.cluster.local import chat_messages, result_json, stats_line

DEMO_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):",
                "def read_json(path):"]


def reply_json(reply: Reply) -> dict:
    """The same `--json` shape as in-process generation."""
    result = GenerationResult(reply.prompt_token_ids, reply.token_ids, reply.text, reply.finish_reason,
                              SpecStats(reply.drafted, reply.accepted, reply.steps), reply.elapsed_s)
    out = result_json(result)
    out["drafter_version"] = reply.drafter_version
    out["ttft_s"] = round(reply.ttft_s, 6)
    return out


def _credentials(args) -> tuple[TlsFiles | None, str | None]:
    """TLS files and bearer token of `generate --server` (the token from a file or $SPECSERVE_TOKEN)."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)
    token = os.environ.get("SPECSERVE_TOKEN") or None
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file: cannot read {args.token_file}: {e.strerror}") from None
    return tls, token


def generate_remote(args) -> int:
    """`specserve generate --server host:port`: stream from a running server."""
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, stop=args.stop or [])
    tls, token = _credentials(args)
    try:
        client = Client(args.server, timeout_s=args.timeout, tls=tls, token=token)
    except SecurityError as e:
        raise ConfigError(str(e).replace("tls.", "--tls-").replace("_file", "")) from None
    messages = chat_messages(args)
    if messages:
        params["messages"] = messages
    prompt = None if messages else args.prompt
    with client:
        try:
            if args.json:
                print(json.dumps(reply_json(client.generate(prompt, **params))))
                return 0
            reply = _stream_to_stdout(client, prompt, params)
        except grpc.RpcError as e:
            print(f"specserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    print()
    print(stats_line(reply_json(reply)))
    return 0


def _stream_to_stdout(client: Client, prompt: str | None, params: dict, echo_prompt: bool = True) -> Reply:
    if echo_prompt and prompt:
        print(prompt, end="", flush=True)
    return client.collect(client.stream(prompt, **params), lambda msg: print(msg.text, end="", flush=True))


def serve_cmd(args) -> int:
    """`specserve serve [config.yaml]`: deploy; with a local cluster, serve until interrupted."""
    from specserve.cluster import serving

    cfg = load_config(args.config)
    if args.port:
        cfg.server.grpc_port = args.port
    serving.connect(args.address)
    serving.deploy(cfg, progress=serving.log)
    serving.log(f"specserve is serving specserve.v1.Generation on port {cfg.server.grpc_port}")
    if args.address:
        return 0  # the application lives on in the cluster
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serving.log("shutting down")
    finally:
        serving.shutdown()
    return 0


def status_cmd(args) -> int:
    """`specserve status`: pools, replicas, drafters and their load."""
    from specserve.cluster import serving

    serving.connect(args.address)
    info = serving.status()
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"application: {info['application']}")
    for name, pool in info["pools"].items():
        print(f"  {name}: {pool['status']}  replicas {pool['replicas']}")
    v = info["verifier"]
    print(f"verifier {v['replica_id']} ({v['device']}): running {v['running']}  waiting {v['waiting']}  "
          f"steps {v['steps']}  drafted {v['drafted']}  accepted {v['accepted']}  "
          f"acceptance {v['acceptance_rate'] if v['acceptance_rate'] is not None else '-'}  "
          f"draft overhead p50 {v['draft_overhead_p50_ms']} ms")
    print(f"drafters registered: {len(info['drafters'])}")
    for d in info["drafters"]:
        print(f"  {d['replica_id']}  {d['address']}  {d['device']}  sequences {d['load']}  version {d['weight_version']}")
    return 0


def scale_cmd(args) -> int:
    """`specserve scale drafters N`: resize the drafter pool; verifiers are not touched."""
    from specserve.cluster import serving

    if args.pool != "drafters":
        raise ConfigError("only the drafter pool scales independently; change verifier.replicas in the config")
    serving.connect(args.address)
    serving.scale_drafters(args.replicas, progress=serving.log)
    serving.log(f"drafter pool at {args.replicas} replicas")
    return 0


def distill_cmd(args) -> int:
    """`specserve distill status | versions | rollback VERSION | pause | resume`."""
    import ray

    from specserve.actors.distill.hub import get_hub
    from specserve.cluster import serving

    serving.connect(args.address)
    try:
        hub = get_hub()
    except ValueError:
        raise ConfigError("distillation is not running on this cluster (distill.enabled in the config)") from None
    if args.action == "rollback":
        if not args.version:
            raise ConfigError("distill rollback needs the VERSION to make live again")
        try:
            info = ray.get(hub.rollback_to.remote(args.version, "operator"), timeout=30)
        except (KeyError, ValueError) as e:
            raise ConfigError(str(e.args[0] if isinstance(e, KeyError) else e)) from None
        print(f"live drafter version: {info['stable']}")
        return 0
    if args.action in ("pause", "resume"):
        ray.get(hub.set_paused.remote(args.action == "pause"), timeout=30)
        print(f"distillation {args.action}d")
        return 0
    info = ray.get(getattr(hub, args.action).remote(), timeout=30)
    if args.json:
        print(json.dumps(info, default=str))
    elif args.action == "versions":
        _print_versions(info)
    else:
        _print_distill_status(info)
    return 0


def _print_versions(versions: list[dict]) -> None:
    for v in versions:
        state = "base" if v.get("base") else "rolled back" if v.get("rolled_back") else \
            "live/promoted" if v.get("promoted") else "canary or superseded"
        score = f"  gate {v['candidate_score']:.4f} vs {v['live_score']:.4f}" if "candidate_score" in v else ""
        reason = f"  ({v['rollback_reason']})" if v.get("rollback_reason") else ""
        print(f"{v['version']:<16} {state:<22}{score}{reason}")


def _print_distill_status(info: dict) -> None:
    t = info["trainer"]
    print(f"live version {info['stable']}  canary {info['canary'] or '-'}  {'PAUSED' if info['paused'] else ''}")
    print(f"traffic: received {info['received']}  trained-on {info['pulled']}  waiting {info['inbox']}  "
          f"dropped {info['tap_dropped'] + info['inbox_dropped']}")
    print(f"trainer: starts {t['starts']}  steps {t['steps']}  loss {t['loss']}  buffer {t['buffer_records']} "
          f"({100 * t['buffer_fill']:.1f}%)  gate {t['candidate_score']} vs live {t['live_score']}  "
          f"rejected {t['rejected']}")
    print(f"publishes {info['publishes']}  promotions {info['promotions']}  rollbacks {info['rollbacks']}")
    for version, a in info["acceptance"].items():
        print(f"  {version or '(no drafter)':<16} drafted {a['drafted']:>8}  accepted {a['accepted']:>8}  "
              f"acceptance {a['alpha']}")
    for replica, version in info["replicas"].items():
        print(f"  drafter {replica}: {version}")


def demo_cmd(args) -> int:
    """The main job: a local cluster with the demo pair, a few streamed generations, clean shutdown."""
    from specserve.cluster import serving

    cfg = load_config(args.config)
    cfg.server.grpc_port = args.port
    if cfg.security.tls or cfg.security.auth_token_file:
        raise ConfigError("the demo's client speaks plaintext without a token: run `specserve serve CONFIG` and "
                          "call it with `specserve generate --server HOST:PORT --tls-ca CA --token-file FILE`")
    serving.log("starting a local Ray cluster and deploying the demo pair (verifier + drafter)...")
    serving.connect(None)
    try:
        serving.deploy(cfg, progress=serving.log)
        with Client(f"127.0.0.1:{args.port}") as client:
            for prompt in DEMO_PROMPTS[: args.prompts]:
                print(f"\n--- {prompt!r}")
                reply = _stream_to_stdout(client, prompt, {"max_tokens": args.max_tokens})
                print("\n" + stats_line(reply_json(reply)) + f"  drafter {reply.drafter_version or '-'}")
    finally:
        serving.log("shutting down")
        serving.shutdown()
    return 0
