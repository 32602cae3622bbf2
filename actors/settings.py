"""What the verifier and drafter replicas are built from (plain values; cluster/ fills them in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.actors.demo import demo_path
from specserve.actors.engine.draft_length import PROMPT_LOOKUP
from specserve.actors.engine.build import DRAFTER_KINDS
from specserve.actors.engine.suffix import SuffixConfig
from specserve.actors.engine.tap import TapConfig
from specserve.actors.security import TlsFiles

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelChoice:
    """Target checkpoint and drafter choice; unset target = the demo pair."""

    target: str | None = None
    drafter: str = "model"  # model | ngram | none | a checkpoint directory
    dtype: str = "float32"
    lean: bool = True  # forwards through LeanForward where the model allows (actors/engine/lean.py)

    @property
    def target_path(self) -> Path:
        return Path(self.target) if self.target else demo_path("target")

    @property
    def drafter_kind(self) -> str:
        return self.drafter if self.drafter in DRAFTER_KINDS else "model"

    @property
    def base_version(self) -> str:
        """Weight version name of the drafter checkpoint the replicas load."""
        return "demo-v0" if self.drafter == "model" and self.target is None else "base"

    @property
    def drafter_path(self) -> Path | None:
        if self.drafter == "model":
            return demo_path("drafter") if self.target is None else None
        return None if self.drafter in DRAFTER_KINDS else Path(self.drafter)


@dataclass(frozen=True)
class VerifierSettings:
    """A verifier replica."""

    models: ModelChoice
    max_num_seqs: int = 16
    max_seq_len: int = 2048
    max_queue: int = 64
    k_max: int = 8
    draft_deadline_ms: float = 50.0
    threads: int = 1  # torch CPU threads (the pool's num_cpus)
    tree_nodes: int = 0  # > 0: ask drafters for token trees of up to this many tokens
    prompt_lookup: int = PROMPT_LOOKUP  # draft by suffix lookup here where the last this many tokens repeat (0: never)
    suffix: SuffixConfig = SuffixConfig()  # the suffix index's knobs (its min_match: prompt_lookup)
    kernels: str = "auto"  # kernels/dispatch.py backend
    tap: TapConfig = TapConfig()  # traffic recording for distillation (enabled: ship records to the hub)
    fixed_k: int | None = None  # draft exactly this many every step (no cost model)
    front: ClientFrontSettings | None = None  # serve the client port here, with TLS (security.tls)
    auth_token_file: str | None = None  # bearer tokens accepted on Generate (security.auth_token_file)
    internal_tls: TlsFiles | None = None  # mutual TLS towards the drafters' draft servers
    model_name: str = "specserve-demo"  # the `model` of the OpenAI API (server.model_name)
    speculation_cache: bool = True  # drafters push drafts made ahead into the pool's cache (speculation.speculation_cache)
    speculation_outcomes: int = 3  # ... for at most this many verdict outcomes per draft (speculation.speculation_outcomes)


@dataclass(frozen=True)
class ClientFrontSettings:
    """The client port when a verifier replica serves it itself (Serve's gRPC proxy has no TLS)."""

    host: str
    port: int
    tls: TlsFiles


@dataclass(frozen=True)
class DrafterSettings:
    """A drafter replica."""

    models: ModelChoice
    max_num_seqs: int = 64
    max_seq_len: int = 2048
    confidence_threshold: float = 0.0
    pipelined: bool = True
    host: str | None = None
    weight_version: str = "demo-v0"
    threads: int = 1  # torch CPU threads (the pool's num_cpus)
    tree_nodes: int = 0  # > 0: answer tree requests with token trees (the model drafter)
    tree_lookup: int = 8  # longest prompt-lookup branch merged into greedy trees (0: none)
    prompt_lookup: int = PROMPT_LOOKUP  # the verifiers draft by prompt lookup where this many tokens repeat (no drafting ahead there)
    kernels: str = "auto"  # kernels/dispatch.py backend
    hot_swap: bool = False  # follow the distill hub's assigned weight version
    internal_tls: TlsFiles | None = None  # mutual TLS on the draft server


def use_threads(threads: int) -> None:
    """torch's CPU threads in this replica: as many as the CPUs Ray reserved for it."""
    torch.set_num_threads(max(1, threads))


def assigned_device() -> str:
    """CUDA when Ray gave this actor a GPU (and one is usable), else the CPU."""
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
