"""The Ray Serve application: a Verifier deployment (the gRPC ingress) and a Drafter deployment.

`build_app` is the application builder named in the Serve config (`import_path`); its
arguments are a specserve config. The drafter deployment is bound into the verifier only so
that Serve deploys it with the application: verifiers reach drafters over gRPC streams found
through the registry, never through Serve handles.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from specserve.actors.drafter import Drafter
from specserve.actors.settings import DrafterSettings, ModelChoice, VerifierSettings
from specserve.actors.verifier import Verifier
from specserve.cluster.config import SpecserveConfig, parse_config


def settings(cfg: SpecserveConfig) -> tuple[VerifierSettings, DrafterSettings]:
    """Replica settings from a validated config."""
    models = ModelChoice(cfg.models.target, cfg.models.drafter, cfg.models.dtype)
    spec = cfg.speculation
    verifier = VerifierSettings(models, cfg.verifier.max_num_seqs, cfg.verifier.max_seq_len, cfg.verifier.max_queue,
                                spec.k_max, spec.draft_deadline_ms, threads=max(1, round(cfg.verifier.num_cpus)),
                                tree_nodes=spec.tree_nodes, kernels=spec.kernels)
    drafter = DrafterSettings(models, cfg.drafter.max_num_seqs, cfg.verifier.max_seq_len,
                              spec.confidence_threshold, spec.pipelined, cfg.drafter.host,
                              threads=max(1, round(cfg.drafter.num_cpus)), tree_nodes=spec.tree_nodes,
                              kernels=spec.kernels)
    return verifier, drafter


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
    verifier = serve.deployment(VerifierIngress, name="Verifier", **_options(cfg.verifier_deployment()))
    return verifier.bind(verifier_settings, drafters)


class VerifierIngress(Verifier):
    """The verifier, holding the drafter deployment's handle so Serve deploys both together."""

    def __init__(self, settings: VerifierSettings, drafters=None):
        super().__init__(settings)
        self.drafters = drafters
