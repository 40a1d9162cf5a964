"""``skewless cluster render``: the cluster specs, rendered from the project's own job and Serve
configs so a worker count, a GPU share or a Serve application is written once.

It writes ``aws.yaml`` and ``gcp.yaml`` (Ray's cluster launcher: ``ray up``) and
``kubernetes/*.yaml`` (KubeRay v1.7, see ``_kuberay``), each checked against its schema before it
is written (``_schemas``), under a header naming its sources. The GPU worker type scales from 0
to the GPUs the job and the Serve deployments can use at once (``_sizing``).

A ``ray up`` cluster, secure by default:

- Token auth: ``RAY_AUTH_MODE=token`` on every node. The token is a local file
  (``~/.skewless/clusters/<name>/auth_token``, mode 0600) that ``file_mounts`` copies to
  ``~/.ray/auth_token`` on each node (``chmod 600`` there); no token value is in a spec.
- The dashboard (and so the Jobs and Serve REST APIs) listens on the head's 127.0.0.1: reach it
  through an SSH tunnel (``ray dashboard cluster/aws.yaml``).
- MLflow's tracking server runs on the head and listens on the head's private IP (the address Ray
  itself uses for the node, which workers get as ``$RAY_HEAD_IP``), never 0.0.0.0: every node must
  reach it, a public interface must not. Every node gets ``MLFLOW_TRACKING_URI`` for it; artifacts
  go through it (``--serve-artifacts``) to the bucket, so only the head needs bucket credentials
  (Ray's default head role/service account has them).
- Ray's GCS, raylets and metrics export listen on the node IP, guarded by the token and the
  cloud firewall (what ``ray up`` sets up admits SSH from outside, not Ray's ports).
- Only the project's code travels (``PROJECT_MOUNTS``), never a ``.env`` or a key file.

Account-specific values (bucket, AMI, project) are :class:`CloudSettings`, listed in each file's
header and under ``metadata.skewless``; the committed files hold ``SET-ME-*`` placeholders, and
a head still holding one refuses to set up.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.metadata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from runtime.cluster._jobs import SECRET_PATTERNS, project_root
from runtime.cluster._kuberay import METRICS_PORT, MLFLOW_PORT, render_kuberay
from runtime.cluster._schemas import kuberay_schema_dir, validate_kuberay, validate_ray_up
from runtime.cluster._sizing import gpu_nodes, job_resources, ray_version, serve_gpus
from runtime.config import read_yaml
from runtime.errors import ConfigError

Provider = Literal["aws", "gcp"]
PROVIDERS: tuple[Provider, ...] = ("aws", "gcp")

RAY_IMAGE_PYTHON = "py311"  # the project's Python, in rayproject/ray image tags
PLACEHOLDER = "SET-ME"  # upper case: no S3/GCS bucket, AMI or GCP project can be named like this
# What a node needs to `pip install -c constraints.txt -e .` (setuptools reads README.md).
PROJECT_MOUNTS = ("runtime", "jobs", "serve_apps", "pyproject.toml", "constraints.txt", "README.md")
# Files the launcher itself copies, which a secret pattern in rsync_exclude would keep off the nodes.
_LAUNCHER_FILES = ("auth_token", "ray_bootstrap_key.pem", "ray_bootstrap_config.yaml")
# Machine shapes; `resources` is what the autoscaler plans with (one GPU per worker node).
AWS_HEAD = {"InstanceType": "m6i.2xlarge", "resources": {"CPU": 8}}
AWS_GPU = {"InstanceType": "g5.xlarge", "resources": {"CPU": 4, "GPU": 1}}
GCP_HEAD = {"machineType": "n2-standard-8", "resources": {"CPU": 8}}
GCP_GPU = {"machineType": "g2-standard-8", "accelerator": "nvidia-l4", "resources": {"CPU": 8, "GPU": 1}}


@dataclass(frozen=True)
class CloudSettings:
    """Account-specific values of the ``ray up`` specs. ``SET-ME-*`` values are placeholders that
    must be set (``skewless cluster render --set NAME=VALUE``) before ``ray up``."""

    aws_region: str = field(default="us-west-2", metadata={"doc": "AWS region of every node"})
    aws_ami: str = field(
        default=f"{PLACEHOLDER}-aws-ami",
        metadata={
            "doc": "AMI with Docker and an NVIDIA driver, in aws_region: aws ssm get-parameter --name "
            "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
        },
    )
    aws_bucket: str = field(
        default=f"{PLACEHOLDER}-aws-bucket", metadata={"doc": "S3 bucket for MLflow's artifacts (s3://<bucket>/mlflow)"}
    )
    gcp_project: str = field(default=f"{PLACEHOLDER}-gcp-project", metadata={"doc": "GCP project id"})
    gcp_region: str = field(default="us-central1", metadata={"doc": "GCP region"})
    gcp_zone: str = field(default="us-central1-a", metadata={"doc": "GCP zone (must offer g2-standard-8 with L4)"})
    gcp_image: str = field(
        default="projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570",
        metadata={"doc": "Deep Learning VM image family with Docker and the NVIDIA driver"},
    )
    gcp_bucket: str = field(
        default=f"{PLACEHOLDER}-gcp-bucket",
        metadata={"doc": "GCS bucket for MLflow's artifacts (gs://<bucket>/mlflow)"},
    )

    @classmethod
    def parse(cls, pairs: Iterable[str]) -> CloudSettings:
        """``NAME=VALUE`` pairs (``--set``) over the defaults; an unknown name gets a did-you-mean."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, str] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            name = name.strip()
            if not sep or not value.strip():
                raise ConfigError(f"--set {pair!r}: expected NAME=VALUE, e.g. --set aws_bucket=my-bucket")
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"--set {pair!r}: unknown setting {name!r}{hint} (settings: {', '.join(names)})")
            values[name] = value.strip()
        return cls(**values)

    def for_provider(self, provider: Provider) -> dict[str, str]:
        """The settings one provider's spec uses, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(f"{provider}_")}

    @classmethod
    def doc(cls, name: str) -> str:
        """What setting ``name`` is."""
        return str(next(f.metadata["doc"] for f in dataclasses.fields(cls) if f.name == name))


# ---------------------------------------------------------------------------------------- ray up


def _rsync_exclude() -> list[str]:
    """Secret patterns the project mounts skip, minus those that would stop the launcher's own files."""
    keep = [p for p in SECRET_PATTERNS if not any(fnmatch.fnmatch(name, p) for name in _LAUNCHER_FILES)]
    return ["__pycache__", "*.pyc", "*.egg-info", *keep]


def token_file(cluster_name: str) -> str:
    """The local token file ``ray up`` copies to every node (create it with mode 0600 first)."""
    return f"~/.skewless/clusters/{cluster_name}/auth_token"


def _placeholder_guard(settings: Mapping[str, str]) -> list[str]:
    unset = sorted(name for name, value in settings.items() if value.startswith(PLACEHOLDER))
    if not unset:
        return []
    sets = " ".join(f"--set {n}=..." for n in unset)
    return [f"echo 'not configured: {', '.join(unset)}; re-render: skewless cluster render {sets}' >&2; exit 1"]


def render_ray_up(
    provider: Provider,
    *,
    cluster_name: str,
    serve_config: Mapping[str, Any],
    job_config: Mapping[str, Any],
    settings: CloudSettings | None = None,
    sources: tuple[str, str] = ("job config", "serve config"),
) -> dict[str, Any]:
    """A ``ray up`` cluster YAML for ``provider``: a CPU head running MLflow's tracking server and
    an autoscaling GPU worker type, token auth, metrics export, the project installed as README.md does."""
    if provider not in PROVIDERS:
        raise ConfigError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    settings = settings or CloudSettings()
    values = settings.for_provider(provider)
    job = job_resources(job_config, sources[0])
    gpu_max = gpu_nodes(job.gpus + serve_gpus(serve_config, sources[1]))
    version = ray_version()
    scheme = "s3" if provider == "aws" else "gs"
    artifacts = f"{scheme}://{values[f'{provider}_bucket']}/mlflow"
    env_line = "export RAY_AUTH_MODE=token SKEWLESS_HEAD_IP=%s MLFLOW_TRACKING_URI=http://%s:" + str(MLFLOW_PORT)
    write_env = f'printf \'{env_line}\\n\' "$HEAD_IP" "$HEAD_IP" > ~/.skewless_env'
    source_env = "grep -qs skewless_env ~/.bashrc || echo '. ~/.skewless_env' >> ~/.bashrc"
    mlflow_pid = "~/mlflow/server.pid"
    head, gpu = _node_types(provider, settings)
    gpu["min_workers"], gpu["max_workers"] = 0, gpu_max
    return {
        "cluster_name": cluster_name,
        "max_workers": gpu_max,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": _provider(provider, settings),
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "head_image": f"rayproject/ray:{version}-{RAY_IMAGE_PYTHON}-cpu",
            "worker_image": f"rayproject/ray:{version}-{RAY_IMAGE_PYTHON}-gpu",
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "available_node_types": {"head": head, "gpu_worker": {**gpu, "docker": {"worker_run_options": ["--gpus all"]}}},
        "head_node_type": "head",
        "file_mounts": {
            "~/.ray/auth_token": token_file(cluster_name),
            **{f"~/skewless/{name}": f"./{name}" for name in PROJECT_MOUNTS},
        },
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": _rsync_exclude(),
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [
            "chmod 700 ~/.ray && chmod 600 ~/.ray/auth_token",
            "cd ~/skewless && pip install -c constraints.txt -e .",
        ],
        "head_setup_commands": [
            *_placeholder_guard(values),
            "pip install boto3" if provider == "aws" else "pip install google-cloud-storage",
            "HEAD_IP=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())') && " + write_env,
            source_env,
        ],
        "worker_setup_commands": ['HEAD_IP="$RAY_HEAD_IP" && ' + write_env, source_env],
        "head_start_ray_commands": [
            "ray stop",
            f"if [ -f {mlflow_pid} ]; then kill -- -$(cat {mlflow_pid}) 2>/dev/null || kill $(cat {mlflow_pid}) "
            "2>/dev/null; rm -f " + mlflow_pid + "; true; fi",
            "mkdir -p ~/mlflow && cd ~/mlflow && nohup mlflow server "
            f'--host "$SKEWLESS_HEAD_IP" --port {MLFLOW_PORT} --workers 2 '
            '--backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" '
            f"--artifacts-destination {artifacts} --serve-artifacts "
            f"> ~/mlflow/server.log 2>&1 < /dev/null & echo $! > {mlflow_pid}",
            "cd ~/skewless && ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1 "
            f"--metrics-export-port={METRICS_PORT}",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "cd ~/skewless && ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076 "
            f"--metrics-export-port={METRICS_PORT}",
        ],
        "metadata": {"skewless": {"settings": values, "mlflow_artifacts": artifacts}},
    }


def _provider(provider: Provider, settings: CloudSettings) -> dict[str, Any]:
    if provider == "aws":
        return {"type": "aws", "region": settings.aws_region, "cache_stopped_nodes": False}
    return {
        "type": "gcp",
        "region": settings.gcp_region,
        "availability_zone": settings.gcp_zone,
        "project_id": settings.gcp_project,
    }


def _node_types(provider: Provider, settings: CloudSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    if provider == "aws":

        def aws(shape: Mapping[str, Any], disk: int) -> dict[str, Any]:
            volume = {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk, "VolumeType": "gp3"}}
            config = {
                "InstanceType": shape["InstanceType"],
                "ImageId": settings.aws_ami,
                "BlockDeviceMappings": [volume],
            }
            return {"resources": dict(shape["resources"]), "node_config": config}

        return aws(AWS_HEAD, 200), aws(AWS_GPU, 200)

    def gcp(shape: Mapping[str, Any], gpu: bool) -> dict[str, Any]:
        disk = {"diskSizeGb": 200, "sourceImage": settings.gcp_image}
        config: dict[str, Any] = {
            "machineType": shape["machineType"],
            "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT", "initializeParams": disk}],
        }
        if gpu:
            config["guestAccelerators"] = [{"acceleratorType": shape["accelerator"], "acceleratorCount": 1}]
            config["scheduling"] = {"onHostMaintenance": "TERMINATE", "automaticRestart": True}
            config["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
        return {"resources": dict(shape["resources"]), "node_config": config}

    return gcp(GCP_HEAD, False), gcp(GCP_GPU, True)


# --------------------------------------------------------------------------------------- output


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key

    def ignore_aliases(self, data: Any) -> bool:
        return True  # every value written out, never an &anchor


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def dump_yaml(doc: Any) -> str:
    """Block-style YAML in the given key order; multi-line strings as literal blocks."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


HEADER = (
    "Generated by `skewless cluster render` from {sources}; edit those, then re-render.\n"
    "`skewless cluster render --check` fails while this file is stale. cluster/README.md explains it.\n"
)
_NOTES = {
    "aws": "`ray up cluster/aws.yaml` from the project root; the token file must exist first (0600).",
    "gcp": "`ray up cluster/gcp.yaml` from the project root; the token file must exist first (0600).",
    "raycluster": "A long-lived cluster for interactive jobs and `serve deploy`; token auth on (operator's Secret).",
    "rayjob": "The training job on its own cluster, deleted when the job ends.",
    "rayservice": "The Serve config's applications, with HTTP on the pod IP for the serve Service.",
    "mlflow": "MLflow's tracking server for every pod (SQLite + artifacts on a volume), reachable from Ray pods only.",
}


def _text(stem: str, doc: Mapping[str, Any], sources: str) -> str:
    lines = HEADER.format(sources=sources) + _NOTES[stem] + "\n"
    settings = (doc.get("metadata") or {}).get("skewless", {}).get("settings") if stem in PROVIDERS else None
    if settings:
        lines += "Account settings (re-render with --set NAME=VALUE; SET-ME-* must be set before `ray up`):\n"
        lines += "".join(f"  {k} = {v}\n      {CloudSettings.doc(k)}\n" for k, v in settings.items())
    return "".join(f"# {line}".rstrip() + "\n" for line in lines.splitlines()) + dump_yaml(doc)


def default_image() -> str:
    """The KubeRay pods' image unless ``--image`` names one: ``skewless:<version>`` (cluster/README.md)."""
    return f"skewless:{importlib.metadata.version('skewless')}"


def render_manifests(
    job_config: Path,
    serve_config: Path,
    *,
    image: str | None = None,
    settings: CloudSettings | None = None,
    cluster_name: str = "skewless",
    namespace: str = "skewless",
) -> dict[str, str]:
    """Every spec as text, by path relative to the output directory, each validated first."""
    root = project_root(job_config.resolve().parent)
    names = []
    for path in (job_config, serve_config):
        try:
            names.append(path.resolve().relative_to(root).as_posix())
        except ValueError:
            raise ConfigError(f"{path} must live inside the project ({root}) so the specs can name it") from None
    job = read_yaml(job_config, "job config")
    serve = read_yaml(serve_config, "serve config")
    sources = (f"job config {names[0]!r}", f"serve config {names[1]!r}")
    out = {}
    for provider in PROVIDERS:
        doc = render_ray_up(
            provider, cluster_name=cluster_name, serve_config=serve, job_config=job, settings=settings, sources=sources
        )
        validate_ray_up(doc)
        out[f"{provider}.yaml"] = _text(provider, doc, " and ".join(names))
    manifests = render_kuberay(
        serve_config=serve,
        job_config_path=names[0],
        job_config=job,
        image=image or default_image(),
        namespace=namespace,
        cluster_name=cluster_name,
        sources=sources,
    )
    for stem, doc in manifests.items():
        validate_kuberay(doc, kuberay_schema_dir(root))
        out[f"kubernetes/{stem}.yaml"] = _text(stem, doc, " and ".join(names))
    return out


def write_manifests(
    out_dir: Path,
    job_config: Path,
    serve_config: Path,
    *,
    image: str | None = None,
    settings: CloudSettings | None = None,
) -> list[Path]:
    """Render (see :func:`render_manifests`) and write every spec under ``out_dir``; returns their paths."""
    written = []
    for rel, text in render_manifests(job_config, serve_config, image=image, settings=settings).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_manifests(
    out_dir: Path,
    job_config: Path,
    serve_config: Path,
    *,
    image: str | None = None,
    settings: CloudSettings | None = None,
) -> list[Path]:
    """The specs under ``out_dir`` that differ from, or are missing in, a fresh render."""
    fresh = render_manifests(job_config, serve_config, image=image, settings=settings)
    return [
        out_dir / rel
        for rel, text in fresh.items()
        if not (out_dir / rel).is_file() or (out_dir / rel).read_text(encoding="utf-8") != text
    ]
