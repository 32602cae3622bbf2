"""The deployment files (deploy/): each validates with Ray's own schemas, the derived Serve
configs equal what specserve.yaml renders to, and the clusters offer the nodes the pools ask for
(labels, GPUs, CPUs, the gRPC port). No cluster is started."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import ray
import yaml
from pydantic import BaseModel
from ray._private.label_utils import validate_node_label_syntax
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from specserve.cluster.config import DRAFTER, VERIFIER, Placement, SpecserveConfig, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SPECSERVE_YAML = DEPLOY / "specserve.yaml"
SERVE_CONFIG_YAML = DEPLOY / "serve_config.yaml"
RAYSERVICE_YAML = DEPLOY / "kuberay" / "rayservice.yaml"
LAUNCHER_YAML = DEPLOY / "cluster-launcher.yaml"
RENDER_SCRIPT = DEPLOY / "render_serve_config.py"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py312"  # the -gpu variant starts the same way
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- loading


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _config() -> SpecserveConfig:
    return load_config(SPECSERVE_YAML)


def _manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(RAYSERVICE_YAML.read_text()) if doc]


def _rayservice() -> dict:
    return next(doc for doc in _manifests() if doc["kind"] == "RayService")


def _cluster_spec() -> dict:
    return _rayservice()["spec"]["rayClusterConfig"]


def _load_render_script():
    """deploy/render_serve_config.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("deploy_render_serve_config", RENDER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- schema strictness


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Optional, Union, List)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _nested_schema(value: dict, attr, annotation) -> BaseModel | None:
    """The validated model to check a nested mapping against: the field's value where Ray keeps
    a model, else the model its annotation admits (Ray keeps autoscaling_config a plain dict)."""
    if isinstance(attr, BaseModel):
        return attr
    models = _models_in(annotation)
    return models[0].model_validate(value) if models else None


def unknown_keys(data: dict, model: BaseModel, where: str = "") -> list[str]:
    """Keys of `data` that `model`'s schema does not know. Ray's Serve schemas ignore unknown
    keys, so a misspelt one (`num_replica`) would validate and then silently do nothing."""
    fields = type(model).model_fields
    names = {name: name for name in fields} | {f.alias: name for name, f in fields.items() if f.alias}
    missing = []
    for key, value in data.items():
        if key not in names:
            missing.append(where + key)
            continue
        attr, path = getattr(model, names[key]), f"{where}{key}."
        if isinstance(value, dict):
            nested = _nested_schema(value, attr, fields[names[key]].annotation)
            missing += unknown_keys(value, nested, path) if nested else []
        elif isinstance(value, list) and all(isinstance(a, BaseModel) for a in attr):
            for i, (item, item_model) in enumerate(zip(value, attr)):
                missing += unknown_keys(item, item_model, f"{path}{i}.")
    return missing


def _validated(serve_config: dict) -> ServeDeploySchema:
    """`serve_config` through Ray's ServeDeploySchema, refusing keys the schema would ignore."""
    schema = ServeDeploySchema.model_validate(serve_config)
    assert unknown_keys(serve_config, schema) == []
    return schema


def test_unknown_keys_finds_a_misspelt_deployment_option():
    config = _yaml(SERVE_CONFIG_YAML)
    config["applications"][0]["deployments"][0]["num_replica"] = 3
    config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replica"] = 3
    schema = ServeDeploySchema.model_validate(config)  # Ray alone accepts both typos
    assert unknown_keys(config, schema) == [
        "applications.0.deployments.0.num_replica",
        "applications.0.deployments.1.autoscaling_config.max_replica",
    ]


# ---------------------------------------------------------------- specserve.yaml and the Serve config


def test_specserve_yaml_puts_verifiers_on_gpus_and_drafters_on_cpus_only():
    config = _config()
    assert config.verifier.num_gpus >= 1 and config.verifier.labels
    assert config.drafter.num_gpus == 0 and config.drafter.num_cpus == 2 and config.drafter.labels
    assert config.drafter.labels != config.verifier.labels
    assert (config.drafter.autoscaling.min_replicas, config.drafter.autoscaling.max_replicas) == (1, 8)


def test_specserve_yaml_comments_every_key():
    for line in SPECSERVE_YAML.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "  # " in line, f"uncommented key: {line.strip()}"


def test_serve_config_validates_with_ray_serve_deploy_schema():
    schema = _validated(_yaml(SERVE_CONFIG_YAML))
    app = schema.applications[0]
    assert app.import_path == "specserve.cluster.app:build_app"
    assert [d.name for d in app.deployments] == [VERIFIER, DRAFTER]


def test_serve_config_equals_to_serve_config_of_specserve_yaml():
    assert _yaml(SERVE_CONFIG_YAML) == _config().to_serve_config()


def test_serve_config_places_deployments_by_the_pool_labels():
    config = _config()
    deployments = {d.name: d for d in _validated(_yaml(SERVE_CONFIG_YAML)).applications[0].deployments}
    assert deployments[VERIFIER].ray_actor_options.label_selector == config.verifier.labels
    assert deployments[VERIFIER].ray_actor_options.num_gpus == config.verifier.num_gpus
    assert deployments[DRAFTER].ray_actor_options.label_selector == config.drafter.labels
    assert deployments[DRAFTER].ray_actor_options.num_gpus == 0


def test_render_check_passes_on_the_checked_in_files():
    result = subprocess.run([sys.executable, str(RENDER_SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_render_check_notices_an_edit_to_specserve_yaml(tmp_path):
    render = _load_render_script()
    for name in ("specserve.yaml", "serve_config.yaml", "kuberay/rayservice.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / name, tmp_path / name)
    source = tmp_path / "specserve.yaml"
    source.write_text(source.read_text().replace("max_replicas: 8", "max_replicas: 6"))
    assert render.stale_files(tmp_path) == ["serve_config.yaml", "kuberay/rayservice.yaml"]


def test_render_rewrites_only_the_serve_config_block_of_the_rayservice():
    render = _load_render_script()
    manifest = RAYSERVICE_YAML.read_text()
    rewritten = render.embed_serve_config(manifest, "applications: []\n")
    before, after = list(yaml.safe_load_all(manifest)), list(yaml.safe_load_all(rewritten))
    assert after[0]["spec"]["serveConfigV2"] == "applications: []\n"
    after[0]["spec"]["serveConfigV2"] = before[0]["spec"]["serveConfigV2"]
    assert after == before
    assert render.embed_serve_config(rewritten, before[0]["spec"]["serveConfigV2"]) == manifest


# ---------------------------------------------------------------- the clusters' nodes


def _launcher_workers() -> dict[str, dict]:
    """The launcher's worker node types, after Ray fills in its defaults as `ray up` does."""
    config = prepare_config(copy.deepcopy(_yaml(LAUNCHER_YAML)))
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _kuberay_workers() -> dict[str, dict]:
    """The RayService's worker groups as Ray's autoscaler sees them: the translation the KubeRay
    autoscaler runs on the cluster spec (resources from pod limits, labels from `labels`)."""
    service = _rayservice()
    ray_cr = {"metadata": {"name": service["metadata"]["name"], "namespace": "default"},
              "spec": service["spec"]["rayClusterConfig"]}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


CLUSTERS = {"launcher": _launcher_workers, "kuberay": _kuberay_workers}


def _selects(node_type: dict, pool: Placement) -> bool:
    """Whether nodes of `node_type` satisfy the pool's label_selector."""
    return pool.labels.items() <= node_type.get("labels", {}).items()


def _replicas_per_node(pool: Placement, node_type: dict) -> int:
    resources = node_type["resources"]
    fits = [resources.get("CPU", 0) // pool.num_cpus] if pool.num_cpus else []
    fits += [resources.get("GPU", 0) // pool.num_gpus] if pool.num_gpus else []
    return int(min(fits))


def _pool_bounds(config: SpecserveConfig) -> dict[str, tuple[Placement, int, int]]:
    """Each pool with the fewest and most replicas Serve may ask the cluster for."""
    scaling = config.drafter.autoscaling
    drafters = (scaling.min_replicas, scaling.max_replicas) if scaling else (config.drafter.replicas,) * 2
    return {VERIFIER: (config.verifier, config.verifier.replicas, config.verifier.replicas),
            DRAFTER: (config.drafter, *drafters)}


def test_cluster_launcher_validates_with_ray_validate_config():
    # `ray up` fills in the provider's defaults before validating; do the same
    validate_config(prepare_config(copy.deepcopy(_yaml(LAUNCHER_YAML))))


def test_rayservice_cluster_validates_as_rays_kuberay_autoscaler_config():
    assert validate_config(_derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "specserve", "namespace": "default"}, "spec": _cluster_spec()})) is None


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cluster_has_one_gpu_verifier_and_one_cpu_only_drafter_node_type(cluster):
    config, workers = _config(), CLUSTERS[cluster]().values()
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= config.verifier.num_gpus]
    cpu = [t for t in workers if t["resources"].get("GPU", 0) == 0]
    assert [_selects(t, config.verifier) for t in gpu] == [True]
    assert [_selects(t, config.drafter) for t in cpu] == [True]
    assert not _selects(cpu[0], config.verifier) and not _selects(gpu[0], config.drafter)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cluster_node_types_can_hold_every_pool_replica(cluster):
    for name, (pool, fewest, most) in _pool_bounds(_config()).items():
        hosts = [t for t in CLUSTERS[cluster]().values() if _selects(t, pool)]
        assert sum(_replicas_per_node(pool, t) * t["min_workers"] for t in hosts) >= fewest, name
        assert sum(_replicas_per_node(pool, t) * t["max_workers"] for t in hosts) >= most, name


def test_pool_labels_match_the_node_labels_of_both_clusters():
    """The drafter (and verifier) placement labels of specserve.yaml are exactly the labels the
    launcher's and the RayService's nodes of the matching kind carry."""
    config = _config()
    expected = {"cpu": config.drafter.labels, "gpu": config.verifier.labels}
    for cluster, workers in CLUSTERS.items():
        kinds = {("gpu" if t["resources"].get("GPU", 0) else "cpu"): t["labels"] for t in workers().values()}
        assert kinds == expected, cluster


# ---------------------------------------------------------------- KubeRay RayService


def _groups() -> list[dict]:
    return _cluster_spec()["workerGroupSpecs"]


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def test_rayservice_serve_config_v2_validates_and_equals_serve_config():
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    _validated(serve_config)
    assert serve_config == _yaml(SERVE_CONFIG_YAML)


def test_rayservice_gives_gpus_only_to_the_verifier_group():
    service, config = _rayservice(), _config()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    gpu_limits = {g["groupName"]: _containers(g)[0]["resources"]["limits"].get(GPU) for g in _groups()}
    verifier_groups = [g["groupName"] for g in _groups() if _selects(g, config.verifier)]
    assert {name for name, limit in gpu_limits.items() if limit} == set(verifier_groups)


def test_rayservice_labels_are_valid_ray_labels_outside_ray_start_params():
    for group in _groups():
        validate_node_label_syntax(group["labels"])
        # KubeRay >= 1.5 refuses labels in rayStartParams, and Ray's autoscaler ignores them there
        assert "labels" not in group.get("rayStartParams", {})


def test_rayservice_exposes_the_grpc_port_on_the_head_and_in_a_service():
    port = _config().server.grpc_port
    assert port == 50051
    head = _containers(_cluster_spec()["headGroupSpec"])[0]
    assert port in [p["containerPort"] for p in head["ports"]]
    service = next(doc for doc in _manifests() if doc["kind"] == "Service")
    assert port in [p["port"] for p in service["spec"]["ports"]]
    # the Service must select the pods: every group carries its non-KubeRay selector labels
    selector = {k: v for k, v in service["spec"]["selector"].items() if not k.startswith("ray.io/")}
    for spec in [_cluster_spec()["headGroupSpec"], *_groups()]:
        assert selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_rayservice_runs_the_installed_ray_version():
    cluster = _cluster_spec()
    assert cluster["rayVersion"] == ray.__version__
    for spec in [cluster["headGroupSpec"], *_groups()]:
        assert all(c["image"].startswith(RAY_IMAGE) for c in _containers(spec))


# ---------------------------------------------------------------- cluster launcher


def test_cluster_launcher_installs_specserve_with_the_installed_ray_version():
    launcher = _yaml(LAUNCHER_YAML)
    setup = " ".join(launcher["setup_commands"])
    assert "pip install" in setup and "specserve" in setup and f"=={ray.__version__}" in setup
    node_images = [t["docker"]["worker_image"] for t in launcher["available_node_types"].values()
                   if "worker_image" in t.get("docker", {})]
    assert all(image.startswith(RAY_IMAGE) for image in [launcher["docker"]["image"], *node_images])
