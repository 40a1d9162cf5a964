"""KubeRay v1.7 manifests from a job config and a Serve config: RayCluster, RayJob, RayService,
and MLflow's tracking server that every pod uses.

Every Ray cluster has token auth on (``authOptions.mode: token``: the operator generates the
Secret, named after the RayCluster, and sets ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` on every Ray
container and the job submitter), a CPU head, and a GPU worker group that autoscales from 0
(``enableInTreeAutoscaling``). Every container requests exactly its limits; CPU pods carry
``NVIDIA_VISIBLE_DEVICES=void`` so a GPU node's runtime never hands them a device. Every Ray pod
gets ``MLFLOW_TRACKING_URI`` naming the tracking server's Service.

Listeners: the operator talks to the dashboard through the head Service, so it listens on the
pod IP (token-protected); Serve's HTTP does too, for the serve Service. MLflow listens on its pod
IP and a NetworkPolicy admits Ray pods only (``kubectl port-forward`` is not subject to it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from runtime.cluster._jobs import job_entrypoint
from runtime.cluster._sizing import gpu_nodes, job_resources, number, ray_version, serve_gpus

IMAGE_PROJECT_DIR = "/home/ray/skewless"  # the project checkout in the image, installed with pip -e
MLFLOW_PORT = 5000
METRICS_PORT = 8080
HEAD = {"cpu": "8", "memory": "32Gi"}
GPU_WORKER = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
AUTOSCALER = {"cpu": "500m", "memory": "512Mi"}
SUBMITTER = {"cpu": "1", "memory": "1Gi"}
MLFLOW = {"cpu": "1", "memory": "2Gi"}
VOID_GPU = {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}


def tracking_uri(namespace: str) -> str:
    """The in-cluster address of the tracking server's Service."""
    return f"http://mlflow.{namespace}.svc.cluster.local:{MLFLOW_PORT}"


def _exact(resources: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {"requests": dict(resources), "limits": dict(resources)}


def _meta(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "skewless", **labels}}


def _ray_pod(name: str, image: str, namespace: str, gpu: bool, ports: list[dict[str, Any]]) -> dict[str, Any]:
    env = [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri(namespace)}]
    container = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": IMAGE_PROJECT_DIR,  # ray start's cwd, so the job's relative config path resolves
        "env": env if gpu else [*env, dict(VOID_GPU)],
        "ports": ports,
        "resources": _exact(GPU_WORKER if gpu else HEAD),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],  # the object store's shared memory
    }
    spec: dict[str, Any] = {"containers": [container], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def cluster_spec(image: str, namespace: str, gpu_max: int, serve_port: int = 8000) -> dict[str, Any]:
    """A RayCluster ``spec``: token auth, in-tree autoscaling, a CPU head, GPU workers 0..``gpu_max``."""
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": serve_port},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    worker_ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    return {
        "rayVersion": ray_version(),
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 600,
            "resources": _exact(AUTOSCALER),
            "env": [dict(VOID_GPU)],
        },
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
            "template": _ray_pod("ray-head", image, namespace, False, head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": gpu_max,
                "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                "template": _ray_pod("ray-worker", image, namespace, True, worker_ports),
            }
        ],
    }


def serve_config_for_kubernetes(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve config as a RayService runs it: the same applications, HTTP on the pod IP (the
    serve Service routes to it) on the config's port."""
    out = copy.deepcopy(dict(serve_config))
    http = dict(out.get("http_options") or {})
    http["host"] = "0.0.0.0"
    http.setdefault("port", 8000)
    out["http_options"] = http
    return out


def render_kuberay(
    *,
    serve_config: Mapping[str, Any],
    job_config_path: str,
    job_config: Mapping[str, Any],
    image: str,
    namespace: str = "skewless",
    cluster_name: str = "skewless",
    sources: tuple[str, str] = ("job config", "serve config"),
) -> dict[str, dict[str, Any]]:
    """Manifests by file stem: ``raycluster``, ``rayjob`` (``python -m jobs.train --config
    <job_config_path>``, path relative to the image's project directory), ``rayservice`` (the Serve
    config as ``serveConfigV2``) and ``mlflow`` (a ``List``: Namespace, PVC, Deployment, Service,
    NetworkPolicy)."""
    job_gpus = job_resources(job_config, sources[0]).gpus
    app_gpus = serve_gpus(serve_config, sources[1])
    serve = serve_config_for_kubernetes(serve_config)
    port = int(number(serve["http_options"]["port"], "http_options.port", sources[1], integer=True, minimum=1))
    job_name = f"{cluster_name}-train-{Path(job_config_path).stem}".lower().replace("_", "-")
    submitter = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [dict(VOID_GPU)],
        "resources": _exact(SUBMITTER),
    }
    return {
        "raycluster": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": _meta(cluster_name, namespace),
            "spec": cluster_spec(image, namespace, gpu_nodes(job_gpus + app_gpus), port),
        },
        "rayjob": {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _meta(job_name, namespace),
            "spec": {
                "entrypoint": job_entrypoint("jobs.train", job_config_path),
                "submissionMode": "K8sJobMode",
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 600,
                "submitterPodTemplate": {"spec": {"restartPolicy": "Never", "containers": [submitter]}},
                "rayClusterSpec": cluster_spec(image, namespace, gpu_nodes(job_gpus), port),
            },
        },
        "rayservice": {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": _meta(f"{cluster_name}-serve", namespace),
            "spec": {
                "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
                "rayClusterConfig": cluster_spec(image, namespace, gpu_nodes(app_gpus), port),
            },
        },
        "mlflow": mlflow_manifest(image, namespace),
    }


def mlflow_manifest(image: str, namespace: str) -> dict[str, Any]:
    """MLflow's tracking server for the namespace: SQLite and proxied artifacts on one volume."""
    labels = {"app.kubernetes.io/name": "mlflow"}
    service = f"mlflow.{namespace}"
    hosts = [f"{h}:{MLFLOW_PORT}" for h in ("mlflow", service, f"{service}.svc", f"{service}.svc.cluster.local")]
    command = [
        "mlflow", "server",
        "--host", "0.0.0.0",  # the pod IP, for the Service; the NetworkPolicy admits Ray pods only
        "--port", str(MLFLOW_PORT),
        "--workers", "2",
        "--backend-store-uri", "sqlite:////mlflow/mlflow.db",
        "--artifacts-destination", "/mlflow/artifacts",
        "--serve-artifacts",
        "--allowed-hosts", ",".join([*hosts, "localhost:*", "127.0.0.1:*"]),  # Host headers: DNS rebinding
    ]  # fmt: skip
    container = {
        "name": "mlflow",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [dict(VOID_GPU)],
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "resources": _exact(MLFLOW),
        "volumeMounts": [{"name": "data", "mountPath": "/mlflow"}],
    }
    pod = {
        "securityContext": {"fsGroup": 100},  # the ray user's group in rayproject images: the volume is writable
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "mlflow-data"}}],
    }
    ingress = {
        "from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}],
        "ports": [{"port": MLFLOW_PORT, "protocol": "TCP"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": _meta("mlflow-data", namespace, **labels),
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}},
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": _meta("mlflow", namespace, **labels),
                "spec": {
                    "replicas": 1,
                    "strategy": {"type": "Recreate"},  # one SQLite writer on a ReadWriteOnce volume
                    "selector": {"matchLabels": dict(labels)},
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta("mlflow", namespace, **labels),
                "spec": {
                    "selector": dict(labels),
                    "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}],
                },
            },
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": _meta("mlflow", namespace, **labels),
                "spec": {
                    "podSelector": {"matchLabels": dict(labels)},
                    "policyTypes": ["Ingress"],
                    "ingress": [ingress],
                },
            },
        ],
    }
