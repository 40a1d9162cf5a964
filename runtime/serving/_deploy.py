"""``skewless serve deploy``: validate a Serve config, then hand it to Ray as `serve deploy` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.config import ServeAppArgs, load_config, read_yaml
from runtime.errors import ConfigError, ServingError
from runtime.redact import redact

PREDICTOR_IMPORT_PATH = "serve_apps.predictor:app"


def validate_serve_config(
    config: dict[str, Any], source: str, gpu_total_bytes: int | None = None, gpus: int | None = None
) -> Any:
    """Ray's own schema first, then skewless's args for each predictor application, then
    whether fractional-GPU replicas fit their GPU (before anything starts).

    ``gpu_total_bytes`` is one GPU's memory; by default the first GPU NVML sees here. With
    neither, only Ray's own rules apply to ``num_gpus``. ``gpus`` is the cluster's GPU count;
    unknown (the default), only each replica's fit in its share is checked.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(f"{source}: not a valid Serve config:\n{exc}") from None
    grpc_on = bool(schema.grpc_options and schema.grpc_options.grpc_servicer_functions)
    demands = []
    for app in schema.applications:
        if app.import_path != PREDICTOR_IMPORT_PATH:
            continue
        args = load_config(ServeAppArgs, dict(app.args or {}))
        if grpc_on and not (args.api_key or args.api_key_env):
            raise ConfigError(
                f"{source}: applications[{app.name}].args: gRPC is on (grpc_options.grpc_servicer_functions) "
                "but the app has no API key: in HAProxy mode Ray 2.60's fallback proxy also serves gRPC on "
                "every interface (port 9500, no host setting). Set args.api_key_env (e.g. SKEWLESS_API_KEY) "
                "and the variable in the replicas' runtime_env, or remove grpc_options"
            )
        for dep in app.deployments:
            demand = _gpu_demand(app.name, dep, args)
            if demand is not None:
                demands.append(demand)
    if demands:
        total = gpu_total_bytes or _local_gpu_total()
        if total is not None:
            from runtime.memory import check_packing

            try:
                # unknown GPU count: enough GPUs that only each replica's own fit can fail
                check_packing(demands, total, devices=gpus or sum(d.num_replicas for d in demands))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    return schema


def _gpu_demand(app: str, dep: Any, args: ServeAppArgs) -> Any:
    from runtime.memory import ReplicaDemand

    fields = dep.model_dump(exclude_unset=True)
    gpus = float((fields.get("ray_actor_options") or {}).get("num_gpus") or 0)
    if gpus <= 0:
        return None
    autoscaling = fields.get("autoscaling_config") or {}
    count = fields.get("num_replicas")
    replicas = int(autoscaling.get("max_replicas") or (count if isinstance(count, int) else 1))
    return ReplicaDemand(f"{app}/{dep.name}", replicas, gpus, declared_bytes=args.gpu_memory_bytes)


def _local_gpu_total() -> int | None:
    from runtime.memory import gpu_available, memory, visible_devices

    if not gpu_available():
        return None
    devices = visible_devices()
    return memory(devices[0]).total if devices else None


# The application logging of the shipped config (serve_apps/configs/churn.yaml says the same):
# Serve's per-request access log off. Each line is formatted and written by the replica's event
# loop, in line with the request (~4% of a replica's time at one request in flight). Without it
# no line per request is written: the prediction log (monitoring on) keeps answered predictions
# by request id, and the skewless_serve_requests counter counts every answer by route and status
# (4xx/5xx included). ``logging_config: {enable_access_log: true}`` in a Serve config, or
# ``run_app(..., logging_config={...})``, turns Serve's lines back on.
APP_LOGGING: dict[str, Any] = {"enable_access_log": False}


def run_app(app: Any, name: str, route_prefix: str, logging_config: Any = None) -> None:
    """``serve.run`` that, when replicas fail to start, raises with *their* error messages.

    Serve's own exception only says "Failed to update the deployments"; the cause (a
    fingerprint mismatch, a missing model) is in the deployment status. ``logging_config`` is
    the application's (a Serve ``LoggingConfig`` or its fields); default :data:`APP_LOGGING`.
    """
    from ray import serve

    try:
        serve.run(
            app,
            name=name,
            route_prefix=route_prefix,
            logging_config=dict(APP_LOGGING) if logging_config is None else logging_config,
        )
    except RuntimeError as exc:
        try:
            status = serve.status().applications[name]
            details = (
                "; ".join(f"{dep}: {info.message}" for dep, info in status.deployments.items() if info.message)
                or status.message
            )
        except Exception:  # status unavailable: keep Serve's own message
            details = ""
        raise ServingError(f"application {name!r} failed to start: {details or exc}") from exc


def deploy_config(path: Path, address: str | None = None) -> tuple[str, list[str]]:
    """Deploy the applications in ``path`` to the cluster whose dashboard is ``address``
    (default: ``RAY_ADDRESS``, else the local one). Returns the address and the app names.

    On a cluster on this machine, a config without ``controller_options`` gets those of
    :func:`~runtime.serving.ingress_options` (HAProxy in front, every listener on the HTTP
    host): they take effect if this deploy starts Serve. A remote cluster's mode is its own.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from runtime.connect import dashboard_address
    from runtime.serving._ingress import ingress_options

    address = dashboard_address(address)
    config = read_yaml(path, "Serve config")
    schema = validate_serve_config(config, str(path))
    body = schema.model_dump(exclude_unset=True)
    if "controller_options" not in body and _is_local(address):
        options = ingress_options(schema.http_options.model_dump())
        if options is not None:
            body["controller_options"] = options
    try:
        ServeSubmissionClient(address).deploy_applications(body)
    except Exception as exc:  # connection refused, auth, HTTP errors
        raise ServingError(
            f"cannot deploy to {redact(address)}: {redact(str(exc))}. Is a cluster running? Start one with "
            "`skewless cluster up cluster/local.yaml` (or `ray start --head`), or pass --address"
        ) from exc
    return address, [app.name for app in schema.applications]


def _is_local(address: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"http://{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1")
