"""In-process generation for the CLI: load the pair, run one request, report it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from specserve.actors.demo import demo_path
from specserve.actors.engine.build import DRAFTER_KINDS, EngineSpec, build_engine
from specserve.actors.engine.chat import render_chat
from specserve.actors.engine.draft_length import FIXED_K_MAX, PROMPT_LOOKUP
from specserve.actors.engine.request import GenerationResult, InvalidRequestError, make_params


def engine_spec(target: str | None, drafter: str, k_max: int = 8, threshold: float = 0.0,
                max_num_seqs: int = 8, max_seq_len: int = 2048, fixed_k: int | None = None,
                prompt_lookup: int = PROMPT_LOOKUP) -> EngineSpec:
    """EngineSpec from CLI flags: `drafter` is a kind (model/ngram/none) or a checkpoint path."""
    if prompt_lookup < 0:
        raise InvalidRequestError("prompt_lookup", f"must be >= 0 (0 = off), got {prompt_lookup}")
    target_path = Path(target) if target else demo_path("target")
    if drafter in DRAFTER_KINDS:
        drafter_path = demo_path("drafter") if drafter == "model" else None
        kind = drafter
    else:
        drafter_path, kind = Path(drafter), "model"
        if not (drafter_path / "config.json").exists():
            raise InvalidRequestError("drafter", f"expected one of {DRAFTER_KINDS} or a checkpoint directory, got {drafter!r}")
    return EngineSpec(target_path, kind, drafter_path, max_num_seqs=max_num_seqs, max_seq_len=max_seq_len,
                      k_max=k_max, confidence_threshold=threshold, fixed_k=fixed_k, prompt_lookup=prompt_lookup)


def result_json(result: GenerationResult) -> dict:
    """The `--json` shape scripts rely on."""
    s = result.stats
    tokens_per_s = len(result.token_ids) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    return {
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "elapsed_s": round(result.elapsed_s, 6),
        "tokens_per_s": round(tokens_per_s, 2),
        "drafted": s.drafted,
        "accepted": s.accepted,
        "steps": s.steps,
        "acceptance_rate": round(s.acceptance_rate, 4),
        "mean_accepted_length": round(s.mean_accepted_length, 4),
    }


def stats_line(r: dict) -> str:
    """One human-readable line of speculation statistics."""
    return (f"[{r['finish_reason']}] {len(r['token_ids'])} tokens in {r['elapsed_s']:.2f}s "
            f"({r['tokens_per_s']:.1f} tok/s)  drafted {r['drafted']}  accepted {r['accepted']}  "
            f"acceptance {r['acceptance_rate']:.2f}  mean accepted length {r['mean_accepted_length']:.2f}")


def generate_local(args) -> int:
    """`specserve generate` without --server: run the request in this process."""
    params = make_params(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop=args.stop or [])
    if args.fixed_k is not None and not 1 <= args.fixed_k <= FIXED_K_MAX:
        raise InvalidRequestError("fixed_k", f"must be in [1, {FIXED_K_MAX}], got {args.fixed_k}")
    engine = build_engine(engine_spec(args.target, args.drafter, args.k_max, args.threshold, fixed_k=args.fixed_k,
                                     prompt_lookup=PROMPT_LOOKUP if args.prompt_lookup is None else args.prompt_lookup))
    messages = chat_messages(args)
    prompt_ids = render_chat(engine.tokenizer, messages) if messages else engine.tokenizer(args.prompt)["input_ids"]
    engine.generate([prompt_ids[:8]], make_params(max_tokens=4))  # warm-up, excluded from timing
    start = time.perf_counter()
    [result] = engine.generate([prompt_ids], params)
    result.elapsed_s = time.perf_counter() - start
    out = result_json(result)
    if args.json:
        print(json.dumps(out))
    else:
        print(result.text if messages else args.prompt + result.text)
        print(stats_line(out))
    return 0


def chat_messages(args) -> list[dict] | None:
    """The chat of `generate --chat [--system TEXT] PROMPT`, or None without --chat."""
    if not args.chat:
        if args.system is not None:
            raise InvalidRequestError("system", "goes with --chat")
        return None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return system + [{"role": "user", "content": args.prompt}]


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process."""
    torch.set_num_threads(max(1, threads))

