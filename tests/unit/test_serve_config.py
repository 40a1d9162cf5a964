"""A Serve config is refused before anything starts when fractional-GPU replicas cannot fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.errors import ConfigError
from runtime.serving import validate_serve_config

GIB = 1 << 30


def _config(replicas: int, num_gpus: float, need_gib: float, autoscale: bool = False) -> dict[str, Any]:
    dep: dict[str, Any] = {"name": "Predictor", "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus}}
    if autoscale:
        dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": replicas}
    else:
        dep["num_replicas"] = replicas
    return {
        "applications": [
            {
                "name": "churn",
                "route_prefix": "/churn",
                "import_path": "serve_apps.predictor:app",
                "args": {"model_uri": "models:/churn@champion", "gpu_memory_bytes": int(need_gib * GIB)},
                "deployments": [dep],
            }
        ]
    }


def test_four_quarter_gpu_replicas_that_fit_pass() -> None:
    validate_serve_config(_config(4, 0.25, 10), "ok.yaml", gpu_total_bytes=80 * GIB)


@pytest.mark.parametrize("autoscale", [False, True])
def test_replicas_that_cannot_fit_are_refused_with_the_numbers(autoscale: bool) -> None:
    with pytest.raises(ConfigError) as info:
        validate_serve_config(_config(4, 0.25, 21, autoscale), "big.yaml", gpu_total_bytes=80 * GIB)
    message = str(info.value)
    assert message.startswith("big.yaml: ")
    assert "churn/Predictor" in message and "21.0 GiB" in message and "80.0 GiB" in message


def test_fractions_over_the_gpu_count_are_refused() -> None:
    with pytest.raises(ConfigError, match="churn/Predictor"):
        validate_serve_config(_config(5, 0.25, 1), "many.yaml", gpu_total_bytes=80 * GIB, gpus=1)
    # with the cluster's GPU count unknown, only each replica's own fit is checked
    validate_serve_config(_config(5, 0.25, 1), "many.yaml", gpu_total_bytes=80 * GIB)


def test_without_a_known_gpu_size_only_rays_rules_apply() -> None:
    validate_serve_config(_config(4, 0.25, 21), "nogpu.yaml")  # this machine has no GPU


def test_shipped_serve_configs_validate() -> None:
    for path in Path("serve_apps/configs").glob("*.yaml"):
        validate_serve_config(yaml.safe_load(path.read_text()), str(path))


def test_grpc_needs_an_api_key_on_every_predictor_app() -> None:
    """Ray's fallback proxy serves gRPC on every interface in HAProxy mode: gRPC without a key is refused."""
    config = _config(1, 0.0, 0.0)
    config["applications"][0]["args"] = {"model_uri": "models:/churn@champion"}
    config["grpc_options"] = {"port": 9000, "grpc_servicer_functions": ["runtime.serving.add_predictor_servicer"]}
    with pytest.raises(ConfigError, match=r"applications\[churn\]\.args: gRPC is on .* Set args\.api_key_env"):
        validate_serve_config(config, "serve.yaml")
    config["applications"][0]["args"]["api_key_env"] = "SKEWLESS_API_KEY"
    validate_serve_config(config, "serve.yaml")
    del config["grpc_options"]  # HTTP on loopback only: no key needed
    config["applications"][0]["args"].pop("api_key_env")
    validate_serve_config(config, "serve.yaml")
