"""`skewless cluster render`: the committed cloud and KubeRay specs in cluster/ validate against
their schemas (Ray's ray-schema.json, KubeRay v1.7.0's CRDs), equal a fresh render of the job and
Serve configs (one source for every setting), and are secure by default: token auth, no secret
in any file, no ray up listener on every interface, GPUs only where asked for."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from runtime.cli._cluster import cluster_app
from runtime.cluster import (
    CloudSettings,
    job_resources,
    kuberay_schema_dir,
    render_kuberay,
    render_manifests,
    render_ray_up,
    serve_gpus,
    stale_manifests,
    tracking_uri,
    validate_kuberay,
    validate_ray_up,
)
from runtime.errors import ConfigError
from runtime.redact import has_credentials

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
JOB = ROOT / "jobs" / "configs" / "churn.yaml"
SERVE = ROOT / "serve_apps" / "configs" / "churn.yaml"
VENDORED = kuberay_schema_dir(ROOT)
SHARED = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"  # the workspace copy beside the checkout
RAY_UP = ("aws.yaml", "gcp.yaml")
KUBERNETES = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "mlflow.yaml")
CRDS = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")


def _load(rel: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CLUSTER / rel).read_text(encoding="utf-8"))
    return data


def _ray_specs() -> dict[str, dict[str, Any]]:
    """Every RayCluster spec in the KubeRay manifests, by where it is."""
    return {
        "raycluster": _load("kubernetes/raycluster.yaml")["spec"],
        "rayjob": _load("kubernetes/rayjob.yaml")["spec"]["rayClusterSpec"],
        "rayservice": _load("kubernetes/rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _containers() -> list[tuple[str, dict[str, Any], bool]]:
    """(where, container, has a GPU) for every container the manifests start."""
    found = []
    for where, spec in _ray_specs().items():
        found += [(f"{where} head", c, False) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
        for group in spec["workerGroupSpecs"]:
            found += [(f"{where} {group['groupName']}", c, True) for c in group["template"]["spec"]["containers"]]
        found.append((f"{where} autoscaler", {"name": "autoscaler", **spec["autoscalerOptions"]}, False))
    submitter = _load("kubernetes/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"]
    found += [("rayjob submitter", c, False) for c in submitter]
    deployment = next(i for i in _load("kubernetes/mlflow.yaml")["items"] if i["kind"] == "Deployment")
    found += [("mlflow", c, False) for c in deployment["spec"]["template"]["spec"]["containers"]]
    return found


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# ------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_specs_validate_against_rays_schema(name: str) -> None:
    doc = _load(name)
    validate_ray_up(doc)
    from ray.autoscaler._private.util import validate_config  # Ray's own check, as `ray up` runs it

    validate_config(copy.deepcopy(doc))


@pytest.mark.parametrize("name", KUBERNETES)
def test_kuberay_manifests_validate_against_the_vendored_crds(name: str) -> None:
    validate_kuberay(_load(f"kubernetes/{name}"), VENDORED)


@pytest.mark.parametrize("name", KUBERNETES)
def test_kuberay_manifests_validate_against_the_shared_schemas(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (a checkout outside the workspace); the vendored CRDs are checked above")
    validate_kuberay(_load(f"kubernetes/{name}"), SHARED)


@pytest.mark.parametrize("crd", CRDS)
def test_vendored_crds_are_the_published_ones(crd: str) -> None:
    assert (VENDORED / "LICENSE").read_text().startswith("\n                                 Apache License")
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: nothing to compare the vendored CRDs with")
    assert (VENDORED / crd).read_bytes() == (SHARED / crd).read_bytes(), f"{crd} differs from {SHARED}"


def test_a_wrong_field_type_or_an_unknown_field_fails_validation() -> None:
    """The validators are live: a string where an int belongs, or a misspelt field, is refused."""
    cluster = _load("kubernetes/raycluster.yaml")
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    with pytest.raises(ConfigError, match=r"spec\.workerGroupSpecs\[0\]\.maxReplicas: 'two' is not of type 'integer'"):
        validate_kuberay(bad, VENDORED)
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParms"] = {}
    with pytest.raises(ConfigError, match=r"spec\.headGroupSpec: .*'rayStartParms' was unexpected"):
        validate_kuberay(bad, VENDORED)
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(ConfigError, match=r"spec\.authOptions\.mode: 'password' is not one of"):
        validate_kuberay(bad, VENDORED)
    mlflow = _load("kubernetes/mlflow.yaml")
    mlflow["items"][2]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(
        ConfigError, match=r"(?s)items\[2\]: Deployment 'mlflow'.*containers\[0\]\.ports\[0\]\.containerPort: 'http'"
    ):
        validate_kuberay(mlflow, VENDORED)
    aws = _load("aws.yaml")
    aws["max_workers"] = "1"
    with pytest.raises(ConfigError, match="max_workers: '1' is not of type 'integer'"):
        validate_ray_up(aws)
    aws = _load("aws.yaml")
    aws["head_node_typ"] = "head"
    with pytest.raises(ConfigError, match="'head_node_typ' was unexpected"):
        validate_ray_up(aws)


def test_int_or_string_quantities_accept_both() -> None:
    cluster = _load("kubernetes/raycluster.yaml")
    container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": 8, "memory": "32Gi"}, "limits": {"cpu": 8, "memory": "32Gi"}}
    validate_kuberay(cluster, VENDORED)


# ----------------------------------------------------------------------- one source of truth


def test_the_files_on_disk_equal_a_fresh_render() -> None:
    stale = stale_manifests(CLUSTER, JOB, SERVE)
    assert not stale, f"re-run `skewless cluster render`: {[str(p.relative_to(ROOT)) for p in stale]}"
    for rel in (*RAY_UP, *(f"kubernetes/{k}" for k in KUBERNETES)):
        head = (CLUSTER / rel).read_text(encoding="utf-8").splitlines()[0]
        assert "generated by `skewless cluster render` from jobs/configs/churn.yaml" in head.lower()


def test_the_rayservice_embeds_exactly_the_serve_configs_applications() -> None:
    serve = yaml.safe_load(SERVE.read_text(encoding="utf-8"))
    embedded = yaml.safe_load(_load("kubernetes/rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve["applications"]
    assert embedded["http_options"] == {**serve["http_options"], "host": "0.0.0.0"}  # the serve Service's target
    assert {k: v for k, v in embedded.items() if k != "http_options"} == {
        k: v for k, v in serve.items() if k != "http_options"
    }


def test_the_rayjob_runs_the_job_config() -> None:
    entrypoint = _load("kubernetes/rayjob.yaml")["spec"]["entrypoint"]
    assert shlex.split(entrypoint) == ["python", "-m", "jobs.train", "--config", "jobs/configs/churn.yaml"]
    assert (ROOT / "jobs/configs/churn.yaml").is_file()


def test_sizing_follows_the_job_and_serve_configs() -> None:
    job = yaml.safe_load(JOB.read_text(encoding="utf-8"))
    job["training"].update(use_gpu=True, num_workers=3)
    serve = yaml.safe_load(SERVE.read_text(encoding="utf-8"))
    serve["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = 0.5  # x max_replicas 2
    assert job_resources(job).gpus == 3 and serve_gpus(serve) == 1.0
    manifests = render_kuberay(serve_config=serve, job_config_path="jobs/x.yaml", job_config=job, image="i:1")
    assert manifests["raycluster"]["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 4
    assert manifests["rayjob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 3
    assert manifests["rayservice"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 1
    aws = render_ray_up("aws", cluster_name="c", serve_config=serve, job_config=job)
    assert aws["max_workers"] == aws["available_node_types"]["gpu_worker"]["max_workers"] == 4
    assert aws["available_node_types"]["gpu_worker"]["min_workers"] == 0


def test_sizing_defaults_are_the_training_configs() -> None:
    from runtime.training import TrainingConfig

    defaults, ours = TrainingConfig(), job_resources({})
    assert (ours.num_workers, ours.use_gpu, ours.gpus_per_worker, ours.cpus_per_worker) == (
        defaults.num_workers,
        defaults.use_gpu,
        defaults.gpus_per_worker,
        defaults.cpus_per_worker,
    )


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"use_gpu": "yes"}, r"training\.use_gpu must be true or false, got 'yes'"),
        ({"num_workers": "2"}, r"training\.num_workers must be an integer, got '2'"),
        ({"num_workers": 0}, r"training\.num_workers \(0\) must be >= 1"),
        ({"gpus_per_worker": 2}, r"training\.gpus_per_worker \(2\) must be in \(0, 1\]"),
    ],
)
def test_a_bad_job_config_is_a_config_error_naming_the_field(
    tmp_path: Path, training: dict[str, Any], field: str
) -> None:
    project = tmp_path / "project"  # a checkout of its own: the specs name configs relative to it
    (project / "jobs" / "configs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    job = yaml.safe_load(JOB.read_text(encoding="utf-8"))
    job["training"].update(training)
    bad = project / "jobs" / "configs" / "bad.yaml"
    bad.write_text(yaml.safe_dump(job), encoding="utf-8")
    serve = project / "serve.yaml"
    serve.write_text(SERVE.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ConfigError, match=field) as info:
        render_manifests(bad, serve)
    assert "jobs/configs/bad.yaml" in str(info.value)  # and the file


def test_a_bad_serve_config_is_a_config_error_naming_the_field() -> None:
    serve = yaml.safe_load(SERVE.read_text(encoding="utf-8"))
    serve["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = "half"
    with pytest.raises(ConfigError, match=r"applications\[0\]\.deployments\[0\]\.ray_actor_options\.num_gpus"):
        serve_gpus(serve)
    with pytest.raises(ConfigError, match="applications must be a non-empty list"):
        serve_gpus({"applications": []})


# --------------------------------------------------------------------------- secure by default


def test_gpu_groups_request_gpus_and_every_container_requests_its_limits() -> None:
    for where, spec in _ray_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, where
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, where
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", where
    for where, container, _gpu in _containers():
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{where}: requests != limits"
        assert {"cpu", "memory"} <= set(resources["limits"]), where


def test_cpu_pods_see_no_gpu() -> None:
    for where, container, gpu in _containers():
        assert (_env(container).get("NVIDIA_VISIBLE_DEVICES") == "void") is not gpu, where
        assert gpu or "nvidia.com/gpu" not in container["resources"]["limits"], where


def test_every_ray_pod_and_node_gets_the_one_tracking_server() -> None:
    for where, container, _gpu in _containers():
        if where.endswith(("head", "gpu")):
            assert _env(container)["MLFLOW_TRACKING_URI"] == tracking_uri("skewless"), where
    service = next(i for i in _load("kubernetes/mlflow.yaml")["items"] if i["kind"] == "Service")
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == ("mlflow", "skewless")
    assert service["spec"]["ports"][0]["port"] == 5000
    for name in RAY_UP:
        doc = _load(name)
        for commands in (doc["head_setup_commands"], doc["worker_setup_commands"]):
            assert any("MLFLOW_TRACKING_URI=http://%s:5000" in c for c in commands), name
        (server,) = [c for c in doc["head_start_ray_commands"] if "mlflow server" in c]
        assert "--serve-artifacts" in server and "--artifacts-destination" in server, name
        assert f"{'s3' if name == 'aws.yaml' else 'gs'}://" in server, name


def test_token_auth_is_on_everywhere() -> None:
    for where, spec in _ray_specs().items():
        assert spec["authOptions"] == {"mode": "token"}, where
    for name in RAY_UP:
        doc = _load(name)
        assert doc["file_mounts"]["~/.ray/auth_token"] == "~/.skewless/clusters/skewless/auth_token"
        assert "chmod 600 ~/.ray/auth_token" in doc["setup_commands"][0]
        env_writers = [c for c in doc["head_setup_commands"] + doc["worker_setup_commands"] if "skewless_env" in c]
        assert sum("RAY_AUTH_MODE=token" in c for c in env_writers) == 2, name
        excluded = doc["rsync_exclude"]
        assert {".env", "*.key", "*credentials*"} <= set(excluded) and "auth_token" not in excluded
        assert not any(p in excluded for p in ("*.pem",)), "Ray's own ray_bootstrap_key.pem must still travel"


def test_no_token_or_secret_value_in_any_rendered_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "f" * 24 + "0123456789abcdef" * 2 + "e" * 8  # a token where a render might look for one
    for where in (".ray/auth_token", ".skewless/clusters/skewless/auth_token"):
        (tmp_path / where).parent.mkdir(parents=True)
        (tmp_path / where).write_text(token)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    fresh = render_manifests(JOB, SERVE)
    on_disk = {rel: (CLUSTER / rel).read_text(encoding="utf-8") for rel in fresh}
    for rel, text in [*fresh.items(), *on_disk.items()]:
        assert token not in text, rel
        assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{rel}: a long hex value"
        assert "RAY_AUTH_TOKEN" not in text, f"{rel}: the token is the operator's Secret, never in a manifest"
        assert not has_credentials(text), f"{rel}: a URI with credentials"


def test_ray_up_listeners_are_never_all_interfaces() -> None:
    for name in RAY_UP:
        doc = _load(name)
        commands = " ".join(doc["setup_commands"] + doc["head_setup_commands"] + doc["worker_setup_commands"])
        commands += " ".join(doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
        assert "0.0.0.0" not in commands, name
        (head,) = [c for c in doc["head_start_ray_commands"] if "ray start --head" in c]
        assert "--dashboard-host=127.0.0.1" in head and "--metrics-export-port=8080" in head
        (server,) = [c for c in doc["head_start_ray_commands"] if "mlflow server" in c]
        assert '--host "$SKEWLESS_HEAD_IP"' in server, name  # the head's private IP, as Ray sees it
        assert any("ray.util.get_node_ip_address()" in c for c in doc["head_setup_commands"])
        assert any('HEAD_IP="$RAY_HEAD_IP"' in c for c in doc["worker_setup_commands"])


def test_the_project_is_installed_as_the_readme_does() -> None:
    for name in RAY_UP:
        doc = _load(name)
        assert "cd ~/skewless && pip install -c constraints.txt -e ." in doc["setup_commands"]
        mounted = {Path(local).name for local in doc["file_mounts"].values()}
        assert {"runtime", "jobs", "serve_apps", "pyproject.toml", "constraints.txt", "README.md"} <= mounted


def test_placeholders_stop_the_head_until_set() -> None:
    aws = _load("aws.yaml")
    assert aws["head_setup_commands"][0].endswith("exit 1") and "aws_ami, aws_bucket" in aws["head_setup_commands"][0]
    settings = CloudSettings.parse(["aws_ami=ami-0abc", "aws_bucket=my-bucket"])
    job = yaml.safe_load(JOB.read_text(encoding="utf-8"))
    serve = yaml.safe_load(SERVE.read_text(encoding="utf-8"))
    doc = render_ray_up("aws", cluster_name="skewless", serve_config=serve, job_config=job, settings=settings)
    validate_ray_up(doc)
    assert not any("exit 1" in c for c in doc["head_setup_commands"])
    assert any("--artifacts-destination s3://my-bucket/mlflow" in c for c in doc["head_start_ray_commands"])
    assert doc["available_node_types"]["head"]["node_config"]["ImageId"] == "ami-0abc"
    with pytest.raises(ConfigError, match="did you mean 'aws_bucket'"):
        CloudSettings.parse(["aws_buckt=x"])
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        CloudSettings.parse(["aws_bucket"])


# --------------------------------------------------------------------------------------- CLI


def test_render_writes_and_check_catches_drift(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["render", "--job-config", str(JOB), "--serve-config", str(SERVE), "--out", str(tmp_path)]
    result = runner.invoke(cluster_app, args)
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert written == sorted([*RAY_UP, *(f"kubernetes/{k}" for k in KUBERNETES)])
    assert runner.invoke(cluster_app, [*args, "--check"]).exit_code == 0
    (tmp_path / "kubernetes" / "rayjob.yaml").write_text("edited by hand\n")
    result = runner.invoke(cluster_app, [*args, "--check"])
    assert result.exit_code == 1 and "rayjob.yaml" in result.output
    assert "edited by hand" in (tmp_path / "kubernetes" / "rayjob.yaml").read_text()  # --check writes nothing


def test_render_help_has_an_example() -> None:
    result = CliRunner().invoke(cluster_app, ["render", "--help"])
    assert result.exit_code == 0 and "Example: skewless cluster render" in result.output
