"""The Ray Serve application: a Verifier deployment (the gRPC ingress) and a Drafter deployment.

`build_app` is the application builder named in the Serve config (`import_path`); its
arguments are a specserve config. The drafter deployment is bound into the verifier only so
that Serve deploys it with the application: verifiers reach drafters over gRPC streams found
through the registry, never through Serve handles.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from specserve.actors.distill.hub import HubSettings
from specserve.actors.distill.job import DistillSpec
from specserve.actors.engine.runner import ModelRunner

from specserve.actors.drafter import Drafter
from specserve.actors.engine.tap import TapConfig
from specserve.actors.security import TlsFiles
from specserve.actors.settings import ClientFrontSettings, DrafterSettings, ModelChoice, VerifierSettings
from specserve.actors.verifier import Verifier
from specserve.cluster.config import SpecserveConfig, parse_config


def settings(cfg: SpecserveConfig) -> tuple[VerifierSettings, DrafterSettings]:
    """Replica settings from a validated config."""
    models = ModelChoice(cfg.models.target, cfg.models.drafter, cfg.models.dtype, cfg.models.lean)
    spec, distill = cfg.speculation, cfg.distill
    tap = TapConfig(distill.enabled, **distill.tap.model_dump())
    sec = cfg.security
    front = None
    if sec.tls:
        front = ClientFrontSettings(cfg.server.host, cfg.server.grpc_port,
                                    TlsFiles(sec.tls.cert_file, sec.tls.key_file, sec.tls.client_ca_file))
    internal = sec.internal_tls and TlsFiles(sec.internal_tls.cert_file, sec.internal_tls.key_file,
                                             sec.internal_tls.ca_file, sec.internal_tls.server_name)
    verifier = VerifierSettings(models, cfg.verifier.max_num_seqs, cfg.verifier.max_seq_len, cfg.verifier.max_queue,
                                spec.k_max, spec.draft_deadline_ms, threads=max(1, round(cfg.verifier.num_cpus)),
                                tree_nodes=spec.tree_nodes, prompt_lookup=spec.prompt_lookup, suffix=spec.suffix(),
                                kernels=spec.kernels, tap=tap, fixed_k=spec.fixed_k, front=front, auth_token_file=sec.auth_token_file, internal_tls=internal,
                                model_name=served_model_name(cfg), speculation_cache=spec.speculation_cache,
                                speculation_outcomes=spec.speculation_outcomes)
    drafter = DrafterSettings(models, cfg.drafter.max_num_seqs, cfg.verifier.max_seq_len,
                              spec.confidence_threshold, spec.pipelined, cfg.drafter.host,
                              weight_version=models.base_version, threads=max(1, round(cfg.drafter.num_cpus)),
                              tree_nodes=spec.tree_nodes, tree_lookup=spec.tree_lookup,
                              prompt_lookup=spec.prompt_lookup, kernels=spec.kernels,
                              hot_swap=distill.enabled,
                              internal_tls=internal)
    return verifier, drafter


def served_model_name(cfg: SpecserveConfig) -> str:
    """The `model` of the OpenAI API: server.model_name, else the target checkpoint's name."""
    if cfg.server.model_name:
        return cfg.server.model_name
    return Path(cfg.models.target).name if cfg.models.target else "specserve-demo"


def distill_specs(cfg: SpecserveConfig) -> tuple[HubSettings, DistillSpec]:
    """The distill hub's settings and the distiller's spec for `cfg` (distill.enabled)."""
    models = ModelChoice(cfg.models.target, cfg.models.drafter, cfg.models.dtype, cfg.models.lean)
    d = cfg.distill
    if models.drafter_kind != "model" or models.drafter_path is None:
        raise ValueError("distillation needs a model drafter with a checkpoint (models.drafter)")
    store = Path(d.store_path).expanduser().resolve()
    hub = HubSettings(str(store), models.base_version, d.canary_fraction, d.canary_min_drafted, d.rollback_margin,
                      d.canary_max_s, inbox_capacity=d.buffer_capacity)
    spec = DistillSpec(str(models.drafter_path), ModelRunner.vocab_size_of(models.target_path), str(store / "train"),
                       d.loss, d.learning_rate, d.batch_size, d.max_len, d.rejected_weight, d.teacher_temperature,
                       d.steps_per_round,
                       d.min_records, d.buffer_capacity, d.half_life_records, d.holdout_fraction, d.gate_margin,
                       d.duty_cycle, d.num_cpus, d.num_gpus, d.threads, d.nice)
    return hub, spec


def _options(deployment: dict) -> dict:
    return {k: v for k, v in deployment.items() if k != "name"}


def build_app(args: dict) -> Application:
    """The specserve application for the config in `args`."""
    cfg = parse_config(args)
    verifier_settings, drafter_settings = settings(cfg)
    if cfg.models.drafter == "none":
        drafters = None
    else:
        drafters = serve.deployment(Drafter, name="Drafter", **_options(cfg.drafter_deployment())).bind(drafter_settings)
    ingress = VerifierIngress
    if cfg.server.openai:
        from specserve.cluster.openai_ingress import OpenAIVerifierIngress as ingress
    verifier = serve.deployment(ingress, name="Verifier", **_options(cfg.verifier_deployment()))
    return verifier.bind(verifier_settings, drafters)


class VerifierIngress(Verifier):
    """The verifier, holding the drafter deployment's handle so Serve deploys both together."""

    def __init__(self, settings: VerifierSettings, drafters=None):
        super().__init__(settings)
        self.drafters = drafters
