"""Start or join a Ray cluster, deploy the specserve application, scale it, report on it."""

from __future__ import annotations

import sys
import time

import ray
from ray import serve
from ray.serve.schema import ServeDeploySchema

from specserve.actors.distill.hub import HUB_NAME
from specserve.actors.distill.job import DISTILLER_NAME
from specserve.actors.registry import NAMESPACE, REGISTRY_NAME, get_registry
from specserve.actors.suffix_share import SHARE_NAME
from specserve.cluster.config import APP_NAME, DRAFTER, SpecserveConfig


LOCAL_START_ATTEMPTS = 3  # a loaded machine can miss Ray's fixed 30 s wait for its raylet once


class DeployError(RuntimeError):
    """The application did not come up; the message says which deployment and why."""


def connect(address: str | None, num_cpus: float | None = None, temp_dir: str | None = None) -> None:
    """Join the cluster at `address`, or start a local one (None)."""
    if ray.is_initialized():
        return
    kwargs: dict = {"namespace": NAMESPACE, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
        return
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception when its raylet does not register in time
            if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                raise
            print(f"specserve: the local Ray node did not come up ({e}); starting it again "
                  f"({attempt + 1} of {LOCAL_START_ATTEMPTS})", file=sys.stderr)
            ray.shutdown()  # stops what did start (GCS, a raylet that came up late)
            time.sleep(2.0)


def deploy(cfg: SpecserveConfig, timeout_s: float = 600.0, progress=None,
           applications: list[dict] | None = None) -> None:
    """Deploy (or update) the application (or several, see to_serve_config) and wait until running."""
    serve_config = cfg.to_serve_config(applications)
    start_serve(serve_config)
    get_registry()  # before the drafters, so their first heartbeat finds it
    if cfg.distill.enabled:
        start_distillation(cfg)  # the hub first: drafters ask it for their weight version on start
    _client().deploy_apps(ServeDeploySchema.model_validate(serve_config))
    for app in serve_config["applications"]:
        wait_running(timeout_s, progress, app["name"])


def start_serve(serve_config: dict) -> None:
    """Start Serve and its proxies (HTTP, and gRPC on the client port) with `serve_config`'s
    options; nothing is deployed yet (a no-op where Serve already runs)."""
    serve.start(http_options=serve_config["http_options"], grpc_options=serve_config["grpc_options"],
                proxy_location=serve_config["proxy_location"])


def start_distillation(cfg: SpecserveConfig) -> None:
    """Start (or find) the distill hub and the distiller job for `cfg`'s drafter."""
    from specserve.cluster.app import distill_specs
    from specserve.actors.distill.hub import start_hub
    from specserve.actors.distill.job import start_distiller

    hub_settings, spec = distill_specs(cfg)
    ray.get(start_hub(hub_settings).status.remote(), timeout=60)
    start_distiller(spec)


def _client():
    """Serve's controller client (Serve must have been started on this cluster)."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def wait_running(timeout_s: float, progress=None, name: str = APP_NAME, recovering: bool = False) -> None:
    """Block until the application is RUNNING; raise DeployError if it fails or times out.

    recovering: a replica just died, so UNHEALTHY is expected until Serve has replaced it; only
    the timeout is an error then.
    """
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        app = serve.status().applications.get(name)
        if app is not None:
            state = (app.status, tuple(sorted((n, d.status) for n, d in app.deployments.items())))
            if progress and state != last:
                progress(" ".join([f"{name} {app.status}:"] + [f"{n} {s}" for n, s in state[1]]))
            last = state
            if app.status == "RUNNING":
                return
            if app.status == "DEPLOY_FAILED" or (app.status == "UNHEALTHY" and not recovering):
                details = "; ".join(f"{n}: {d.message}" for n, d in app.deployments.items() if d.message)
                raise DeployError(f"{app.status}: {app.message or details}")
        time.sleep(0.5)
    raise DeployError(f"the application was not running after {timeout_s:.0f} s")


def scale_drafters(replicas: int, timeout_s: float = 300.0, progress=None, app_name: str = APP_NAME) -> None:
    """Set an application's drafter pool to `replicas` without touching anything else.

    The Serve config the cluster runs is redeployed as it is (every application, every other
    deployment, the verifiers' replica counts) with only the Drafter deployment's
    `num_replicas` changed, so Serve applies it as a config-only update.
    """
    details = _client().get_serve_details()
    apps = {name: app.get("deployed_app_config") for name, app in details.get("applications", {}).items()}
    if not apps.get(app_name) or not all(apps.values()):
        raise DeployError(f"application {app_name!r} is not deployed from a config on this cluster")
    drafter = next((d for d in apps[app_name].get("deployments", []) if d["name"] == DRAFTER), None)
    if drafter is None:
        raise DeployError(f"application {app_name!r} has no drafter pool")
    drafter.pop("autoscaling_config", None)
    drafter["num_replicas"] = replicas
    config = {k: details[k] for k in ("proxy_location", "http_options", "grpc_options") if details.get(k)}
    _client().deploy_apps(ServeDeploySchema.model_validate({**config, "applications": list(apps.values())}))
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        app = serve.status().applications.get(app_name)
        dep = app.deployments.get(DRAFTER) if app else None  # absent while the update is applied
        if dep is not None:
            if dep.replica_states.get("RUNNING", 0) == replicas == sum(dep.replica_states.values()):
                return
            if progress:
                progress(f"drafters: {dict(dep.replica_states)} -> {replicas}")
        time.sleep(1.0)
    raise DeployError(f"the drafter pool did not reach {replicas} replicas in {timeout_s:.0f} s")


def status() -> dict:
    """Pools, replicas and live drafter registrations."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        raise DeployError("no specserve application is deployed on this cluster")
    pools = {name: {"status": d.status, "replicas": dict(d.replica_states)} for name, d in app.deployments.items()}
    drafters = ray.get(get_registry().list_dicts.remote(), timeout=10)
    verifier = serve.get_app_handle(APP_NAME).load.remote().result(timeout_s=30)  # one replica's view
    return {"application": app.status, "pools": pools, "drafters": drafters, "verifier": verifier}


def shutdown() -> None:
    """Tear the application and Serve down, then disconnect (nothing to do when not connected)."""
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        for name in (REGISTRY_NAME, HUB_NAME, DISTILLER_NAME, SHARE_NAME):
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:  # not running
                pass
        ray.shutdown()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


