"""Assemble an engine from checkpoint paths and a drafter choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.actors.engine.draft_length import PROMPT_LOOKUP, DraftLengthConfig
from specserve.actors.engine.drafters import BaseDrafter, ModelDrafter, NgramDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.runner import ModelRunner, RunnerConfig
from specserve.actors.engine.suffix import SuffixConfig
from specserve.actors.engine.tree_drafting import TreeDrafter
from specserve.kernels.dispatch import Backend

DRAFTER_KINDS = ("model", "ngram", "none")


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build an in-process engine."""

    target: Path
    drafter: str = "model"  # "model" | "ngram" | "none"
    drafter_path: Path | None = None  # checkpoint of the model drafter
    max_num_seqs: int = 8
    max_seq_len: int = 2048
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    k_max: int = 8
    confidence_threshold: float = 0.0
    tree_nodes: int = 0  # > 0: the model drafter drafts token trees of up to this many tokens
    tree_lookup: int = 8  # longest prompt-lookup branch merged into greedy trees (0: none)
    kernels: Backend = "auto"  # torch reference or Triton kernels (kernels/dispatch.py)
    lean: bool = True  # forwards of Llama-family models through LeanForward (actors/engine/lean.py)
    fixed_k: int | None = None  # draft exactly this many tokens every step (no cost model)
    prompt_lookup: int = PROMPT_LOOKUP  # > 0: the model drafter drafts by prompt lookup where the last this many tokens repeat (0: never)
    ahead_lookup: int = 0  # > 0: the verifier looks up where this many tokens repeat: no drafting ahead there
    suffix: SuffixConfig = SuffixConfig()  # the suffix index of lookup drafts (min_match: prompt_lookup)


def load_tokenizer(path: Path):
    """The tokenizer stored in a checkpoint directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_drafter(spec: EngineSpec, target_vocab: int) -> BaseDrafter | None:
    """The drafter `spec` asks for, checked to share the target's vocabulary."""
    if spec.drafter not in DRAFTER_KINDS:
        raise ValueError(f"drafter must be one of {DRAFTER_KINDS}, not {spec.drafter!r}")
    if spec.drafter == "none":
        return None
    if spec.drafter == "ngram":
        return NgramDrafter(spec.suffix)
    if spec.drafter_path is None:
        raise ValueError("the model drafter needs a checkpoint path")
    cfg = RunnerConfig(spec.max_num_seqs, spec.max_seq_len, None, spec.dtype, spec.device, spec.kernels, spec.lean)
    runner = ModelRunner.from_pretrained(spec.drafter_path, cfg)
    if runner.vocab_size != target_vocab:
        raise ValueError(f"drafter vocabulary ({runner.vocab_size}) differs from the target's ({target_vocab})")
    if spec.tree_nodes > 0:
        return TreeDrafter(runner, confidence_threshold=spec.confidence_threshold, lookup=spec.tree_lookup)
    return ModelDrafter(runner, confidence_threshold=spec.confidence_threshold, lookup_min_n=spec.prompt_lookup,
                        ahead_lookup=spec.ahead_lookup, suffix=spec.suffix)


def build_engine(spec: EngineSpec) -> SpeculativeEngine:
    """Load the target (and drafter) and return a ready engine."""
    cfg = RunnerConfig(spec.max_num_seqs, spec.max_seq_len, None, spec.dtype, spec.device, spec.kernels, spec.lean)
    target = ModelRunner.from_pretrained(spec.target, cfg)
    drafter = build_drafter(spec, target.vocab_size)
    policy = DraftLengthConfig(k_max=spec.k_max, tree_nodes=spec.tree_nodes if spec.drafter == "model" else 0,
                               fixed_k=spec.fixed_k)
    return SpeculativeEngine(target, load_tokenizer(spec.target), drafter, policy, kernels=spec.kernels)
