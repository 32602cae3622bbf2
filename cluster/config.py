"""The one YAML file that describes a deployment: models, pools, resources, speculation.

Validated by pydantic with `extra="forbid"`, so a typo is an error rather than a silent
default. `to_serve_config` turns it into a Ray Serve config (ServeDeploySchema shape): the
application is built by `specserve.cluster.app:build_app` from this config, and pool sizes go
into the per-deployment overrides so that scaling drafters changes one number without
redeploying the verifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from specserve.actors.engine.draft_length import FIXED_K_MAX, PROMPT_LOOKUP
from specserve.actors.engine.suffix import SuffixConfig

APP_NAME = "specserve"
VERIFIER = "Verifier"
DRAFTER = "Drafter"
DEFAULT_GRPC_PORT = 50051
SERVICER_FUNCTIONS = [
    # Generation and the health check on Serve's gRPC proxy, routed to this application when a
    # call names none (cluster/grpc_ingress.py); bytes that do not parse as a GenerateRequest
    # are INVALID_ARGUMENT naming the field instead of gRPC's UNKNOWN
    "specserve.cluster.grpc_ingress.add_generation_to_proxy",
    "specserve.cluster.grpc_ingress.add_health_to_proxy",
]


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message names the field."""

SUFFIX = SuffixConfig()  # the suffix index's defaults


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsConfig(Strict):
    """Which checkpoints to serve."""

    target: str | None = Field(None, description="Target checkpoint directory; unset = the demo target.")
    drafter: str = Field("model", description="'model' (the demo drafter), 'ngram', 'none' or a checkpoint directory.")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field(
        "float32", description="Weights dtype on the device (float64: bit-stable batching, for tests).")
    lean: bool = Field(True, description=(
        "Run forwards of Llama, Qwen2 and Mistral models through specserve's lean forward (the same "
        "weights, fused and pre-transposed, without transformers' per-module overhead: about 1.7x faster "
        "decoding on a CPU, same logits). false = always transformers' modules."))


class Placement(Strict):
    """Where a pool's replicas may run: plain Ray scheduling resources."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU. >0 runs on CUDA.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'A100'.")
    labels: dict[str, str] = Field(default_factory=dict, description="Node labels a replica's node must carry.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")

    def actor_options(self) -> dict:
        """Serve's ray_actor_options for this placement."""
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        if self.labels:
            opts["label_selector"] = dict(self.labels)
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class VerifierPool(Placement):
    """The verifiers: the target model, the client-facing gRPC ingress."""

    replicas: int = Field(1, ge=1, description="Verifier replicas.")
    max_num_seqs: int = Field(16, ge=1, description="Sequences decoded together (the running batch).")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED.")
    max_seq_len: int = Field(2048, ge=16, description="Longest sequence (prompt + output) a slot holds.")


class DrafterAutoscaling(Strict):
    """Serve autoscaling of the drafter pool from drafter load (sequences per replica)."""

    min_replicas: int = Field(1, ge=0, description="Fewest drafter replicas.")
    max_replicas: int = Field(4, ge=1, description="Most drafter replicas.")
    target_sequences_per_replica: float = Field(8.0, gt=0, description="Live sequences one replica should carry.")
    upscale_delay_s: float = Field(3.0, ge=0, description=(
        "How long the load must call for more replicas before one is added; short, since a missing "
        "drafter costs speed at once."))
    downscale_delay_s: float = Field(30.0, ge=0, description=(
        "How long the load must call for fewer replicas before one is removed; long, so that a lull "
        "does not stop warm drafters."))
    look_back_period_s: float = Field(30.0, gt=0, description=(
        "Window of drafter load Serve averages over for each decision (Serve's default); replicas "
        "report about every 10 s, so keep it above that."))

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DrafterPool(Placement):
    """The drafters: draft model or n-gram table, each replica serving draft streams over gRPC."""

    replicas: int = Field(1, ge=0, description="Drafter replicas (ignored when autoscaling is set).")
    autoscaling: DrafterAutoscaling | None = Field(None, description="Scale the pool with its load instead.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences one replica drafts for at once.")
    host: str | None = Field(None, description="Address the draft server binds; unset = the node's IP.")


class SpeculationConfig(Strict):
    """How the verifier uses drafts."""

    def suffix(self) -> SuffixConfig:
        """The suffix index these settings describe (its min_match is prompt_lookup)."""
        return SuffixConfig(max_match=max(self.suffix_max_match, self.prompt_lookup),
                            min_match=self.prompt_lookup, spec_factor=self.suffix_spec_factor,
                            min_prob=self.suffix_min_prob, max_tokens=self.suffix_max_tokens,
                            max_age_s=self.suffix_max_age_s)

    k_max: int = Field(8, ge=1, le=32, description="Longest draft block.")
    confidence_threshold: float = Field(0.0, ge=0, le=1, description=(
        "Drafter stops a block when its top probability falls below this; 0 = never: the cost model "
        "alone picks the length (on the demo pair any stop drafts less than pays)."))
    draft_deadline_ms: float = Field(50.0, gt=0, description="Longest wait for a draft; a late sequence decodes without.")
    pipelined: bool = Field(True, description="Drafters draft block n+1 while block n is verified (chains only).")
    speculation_cache: bool = Field(True, description=(
        "With pipelined drafting, drafters push the drafts they make ahead into the verifier's speculation "
        "cache, keyed by the state each assumes; the verifier takes the matching one with no round trip."))
    speculation_outcomes: int = Field(3, ge=1, le=8, description=(
        "Most verdict outcomes a drafter pushes a draft for per draft: the whole draft accepted, then "
        "first rejections at the positions it finds likeliest (with the token it expects there). The "
        "drafter covers fewer where its drafts would not be ready before the verdict or are rarely taken; "
        "1 = only the whole draft accepted."))
    tree_nodes: int = Field(0, ge=0, le=63, description=(
        "> 0: the model drafter drafts token trees of up to this many tokens (depth = the chosen draft "
        "length) instead of chains; 0 = chains."))
    tree_lookup: int = Field(8, ge=0, le=32, description=(
        "Longest prompt-lookup branch merged into greedy token trees: the sequence's continuation "
        "after its latest matching n-gram joins the tree where the drafter did not propose it, "
        "scored by its calibrated accept rate; 0 = none."))
    prompt_lookup: int = Field(PROMPT_LOOKUP, ge=0, le=8, description=(
        "Drafts by suffix lookup where the sequence's last this many tokens (or more, up to "
        "suffix_max_match) occurred before, in it or in recently finished requests: the tokens that "
        "most often followed them. The verifier looks them up itself, with no round trip and no model; "
        "the drafters draft everywhere else. 0 = the drafters draft everything (a drafter much better "
        "than the demo one may want 2-3)."))
    suffix_max_match: int = Field(SUFFIX.max_match, ge=1, le=64, description=(
        "Longest suffix of a sequence the suffix index matches (its n-gram depth): each indexed token "
        "costs this many table entries, and a longer match lets a draft run further."))
    suffix_spec_factor: float = Field(SUFFIX.spec_factor, gt=0, description=(
        "A suffix-lookup draft is at most this many times as long as its match (and at most the "
        "cost model's draft length): a match of a few tokens drafts a few, a long one drafts far."))
    suffix_min_prob: float = Field(SUFFIX.min_prob, ge=0, le=1, description=(
        "A suffix-lookup draft stops where the product of its tokens' empirical probabilities (how "
        "often each followed the match) falls below this; SuffixDecoding's default."))
    suffix_max_tokens: int = Field(SUFFIX.max_tokens, ge=0, description=(
        "Tokens of finished requests each verifier keeps for suffix lookup, oldest evicted first "
        "(memory: at most suffix_max_match table entries per token, ~2 KB per token measured on Python "
        "sources at the defaults); "
        "0 = only each request's own prompt and output."))
    suffix_max_age_s: float = Field(SUFFIX.max_age_s, gt=0, description=(
        "Finished requests older than this leave the suffix index (retention of served traffic)."))
    fixed_k: int | None = Field(None, ge=1, le=FIXED_K_MAX, description=(
        "Draft exactly this many tokens every step instead of the cost model's choice (the drafter's "
        "confidence stop still applies); for studies of drafter quality such as `bench --distill`."))
    kernels: Literal["auto", "torch", "triton"] = Field("auto", description=(
        "Verification and cache kernels: auto = Triton on CUDA devices, the torch reference on CPUs."))


class TapSettings(Strict):
    """What the verifiers record of served traffic for distillation (user data: bounded, sampled)."""

    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of verified blocks recorded.")
    top_k: int = Field(16, ge=1, le=1024, description="Target probabilities kept per verified position.")
    capacity: int = Field(4096, ge=1, description=(
        "Records a verifier holds until they are shipped to the distiller; beyond, the oldest are dropped "
        "(counted)."))
    max_age_s: float = Field(600.0, gt=0, description="Records older than this are dropped unshipped (retention).")
    max_context: int = Field(128, ge=1, description="Context tokens kept per record (the most recent ones).")


class DistillConfig(Strict):
    """Online distillation of the drafter from served traffic, and hot swap of its weights."""

    enabled: bool = Field(False, description="Record traffic, train the drafter on it, publish better versions.")
    store_path: str = Field("specserve-drafter-versions", description=(
        "Directory (on the node running the weight store) where published versions persist as safetensors; "
        "a restarted cluster resumes from its latest good version."))
    tap: TapSettings = Field(default_factory=TapSettings, description="Traffic recording in the verifiers.")
    loss: Literal["fkl", "rkl", "jsd"] = Field("fkl", description=(
        "KD loss: forward KL (mass-covering), reverse KL (mode-seeking) or JSD."))
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate of the drafter copy.")
    batch_size: int = Field(16, ge=1, description="Records per training step.")
    max_len: int = Field(64, ge=16, description="Tokens per training row (context tail + draft).")
    rejected_weight: float = Field(3.0, ge=0, description="Loss weight of the first rejected position (OSD).")
    teacher_temperature: float = Field(1.0, gt=0, le=1, description=(
        "Recorded p is sharpened to this temperature for training and the gate; < 1 concentrates the "
        "drafter on the target's first choice, which is all greedy requests use."))
    steps_per_round: int = Field(50, ge=1, description="Training steps between two gate evaluations.")
    min_records: int = Field(256, ge=1, description="Records in the buffer before training starts.")
    buffer_capacity: int = Field(20000, ge=16, description="Replay buffer size (records); the oldest leave first.")
    half_life_records: float = Field(2000.0, gt=0, description="Recency weighting: a record's weight halves "
                                     "every this many newer records.")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="Newest share of the buffer held out for the gate.")
    gate_margin: float = Field(0.002, ge=-1, le=1, description=(
        "A candidate is published when its expected acceptance on held-out traffic beats the live "
        "version's by more than this (negative: publish slightly worse ones too; for tests)."))
    duty_cycle: float = Field(0.25, gt=0, le=1, description=(
        "Share of wall time the trainer computes; it sleeps the rest so serving on shared CPUs keeps its pace."))
    canary_fraction: float = Field(0.5, gt=0, le=1, description=(
        "Share of drafter replicas (at least one) that run a new version before the whole pool."))
    canary_min_drafted: int = Field(400, ge=1, description=(
        "Draft trials (draft tokens verified, plus draft steps that came back empty) the canary must have "
        "had before it is promoted or rolled back."))
    rollback_margin: float = Field(0.05, ge=0, le=1, description=(
        "The canary is rolled back when its live acceptance falls below the stable version's by more than this."))
    canary_max_s: float = Field(120.0, gt=0, description=(
        "A canary with fewer verified drafts than canary_min_drafted after this long is promoted on the "
        "gate's held-out evidence (speculation may be off where it does not pay)."))
    num_cpus: float = Field(1.0, ge=0, description="CPUs of the training worker.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the training worker (a fraction shares a verifier's GPU).")
    threads: int = Field(1, ge=1, description="torch CPU threads of the training worker.")
    nice: int = Field(19, ge=0, le=19, description=(
        "CPU niceness of the training thread: 19 lets serving on the same cores preempt training "
        "(training then runs on what serving leaves), 0 competes with serving as an equal."))


class ServerConfig(Strict):
    """The client-facing gRPC port (Serve's gRPC proxy; with security.tls, the verifiers' own)."""

    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=1, le=65535, description="Port of the Generation service.")
    host: str = Field("0.0.0.0", description=(
        "Address the verifiers bind the client port on when they serve it themselves (security.tls)."))
    http_port: int = Field(8000, ge=1, le=65535, description=(
        "Port of Serve's HTTP proxy: the OpenAI-compatible API (server.openai) and Serve's health checks."))
    openai: bool = Field(True, description=(
        "Serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) on http_port, "
        "through the same verifier replicas as gRPC."))
    model_name: str | None = Field(None, description=(
        "Model name of the OpenAI API (the `model` field clients send); default: the target checkpoint's "
        "directory name, 'specserve-demo' for the demo pair."))


class ClientTls(Strict):
    """TLS on the client port. Paths are read by the verifier replicas on their own nodes."""

    cert_file: str = Field(description="PEM certificate chain the server presents.")
    key_file: str = Field(description="PEM private key of that certificate.")
    client_ca_file: str | None = Field(None, description=(
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."))


class InternalTls(Strict):
    """Mutual TLS on the verifier<->drafter draft streams: both ends present certificates of one CA."""

    ca_file: str = Field(description="PEM CA bundle both ends verify the other's certificate against.")
    cert_file: str = Field(description="PEM certificate every replica presents (server and client side).")
    key_file: str = Field(description="PEM private key of that certificate.")
    server_name: str | None = Field(None, description=(
        "Name the drafters' certificate carries, checked by the verifiers instead of the drafter's IP "
        "address (one certificate for every node)."))


class SecurityConfig(Strict):
    """Who may call, and how traffic is protected (certificates and tokens are read from files)."""

    tls: ClientTls | None = Field(None, description=(
        "TLS on the client port. The verifier replicas then serve that port themselves (Serve's gRPC "
        "proxy has no TLS and is not started); unset = plaintext through Serve's gRPC proxy."))
    auth_token_file: str | None = Field(None, description=(
        "File of accepted bearer tokens, one per line; Generate then needs 'authorization: Bearer <token>' "
        "metadata (UNAUTHENTICATED otherwise). Use it with tls: a token on a plaintext port is readable."))
    internal_tls: InternalTls | None = Field(None, description="Mutual TLS on the internal draft streams.")


class SpecserveConfig(Strict):
    """A whole deployment."""

    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Checkpoints.")
    verifier: VerifierPool = Field(default_factory=VerifierPool, description="Verifier pool.")
    drafter: DrafterPool = Field(default_factory=DrafterPool, description="Drafter pool.")
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig, description="Speculation policy.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Client port.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Online drafter distillation.")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="TLS and authentication.")

    @model_validator(mode="after")
    def _distill_needs_model(self):
        if self.distill.enabled and self.models.drafter in ("ngram", "none"):
            raise ValueError("distill.enabled needs a model drafter (models.drafter), not "
                             f"{self.models.drafter!r}")
        return self

    def app_args(self) -> dict:
        """The application builder's arguments: everything but pool sizes (see module doc).

        Serve rebuilds (and restarts every replica of) an application whose arguments change;
        keeping replica counts out of them makes scaling a pool a config-only update.
        """
        sizes = {"verifier": {"replicas"}, "drafter": {"replicas", "autoscaling"}}
        return self.model_dump(mode="json", exclude=sizes)

    def drafter_deployment(self) -> dict:
        """Serve's per-deployment override for the drafter pool."""
        d = self.drafter
        out = {"name": DRAFTER, "ray_actor_options": d.actor_options(), "max_ongoing_requests": 1000}
        if d.autoscaling:
            out["autoscaling_config"] = {
                "min_replicas": d.autoscaling.min_replicas,
                "max_replicas": d.autoscaling.max_replicas,
                "upscale_delay_s": d.autoscaling.upscale_delay_s,
                "downscale_delay_s": d.autoscaling.downscale_delay_s,
                "look_back_period_s": d.autoscaling.look_back_period_s,
                "policy": {
                    "policy_function": "specserve.cluster.autoscale:DrafterPolicy",
                    "policy_kwargs": {"target_sequences_per_replica": d.autoscaling.target_sequences_per_replica},
                },
            }
        else:
            out["num_replicas"] = d.replicas
        return out

    def verifier_deployment(self) -> dict:
        """Serve's per-deployment override for the verifier pool."""
        v = self.verifier
        # the ingress must accept every stream it may batch or queue; admission control is ours
        ongoing = v.max_num_seqs + v.max_queue + 16
        return {"name": VERIFIER, "num_replicas": v.replicas, "ray_actor_options": v.actor_options(),
                "max_ongoing_requests": ongoing,
                # a stopping replica drains (actors/verifier.py DRAIN_S per phase) before Serve may kill it
                "graceful_shutdown_timeout_s": 75}

    def application(self, name: str = APP_NAME, route_prefix: str = "/") -> dict:
        """This configuration as one application of a Serve config."""
        return {
            "name": name,
            "route_prefix": route_prefix,
            "import_path": "specserve.cluster.app:build_app",
            "args": self.app_args(),
            "deployments": [self.verifier_deployment()]
            + ([] if self.models.drafter == "none" else [self.drafter_deployment()]),
        }

    def to_serve_config(self, applications: list[dict] | None = None) -> dict:
        """A Ray Serve config (ServeDeploySchema) deploying this configuration.

        Several specserve applications can share a cluster (the benchmark compares variants
        side by side); gRPC clients pick one with the `application` metadata key (a call without
        it goes to the one named APP_NAME, see cluster/grpc_ingress.py). With
        security.tls the verifiers serve the client port themselves and Serve's gRPC proxy,
        which cannot do TLS, is left off (no servicer functions): nothing plaintext listens.
        """
        servicers = [] if self.security.tls else list(SERVICER_FUNCTIONS)
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": self.server.http_port},
            "grpc_options": {"port": self.server.grpc_port, "grpc_servicer_functions": servicers},
            "applications": applications or [self.application()],
        }


def parse_config(data: dict | None) -> SpecserveConfig:
    """Validate a config mapping, raising ConfigError that names the offending field."""
    try:
        return SpecserveConfig.model_validate(data or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"{loc}: {err['msg']}") from None


def load_config(path: str | Path | None) -> SpecserveConfig:
    """The config in a YAML file, or the defaults (demo pair, one of each pool) when None."""
    if path is None:
        return SpecserveConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(data)
