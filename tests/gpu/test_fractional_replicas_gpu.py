"""Four Serve replicas at 0.25 GPU each on one GPU, under load: each caps its allocator at its
share and reports NVML usage inside its budget; and a config that cannot fit is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import wait_for_condition

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_four_quarter_gpu_replicas_stay_inside_their_budgets(serve_clean: int, tmp_path: Path) -> None:
    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import model_json, write_model_dir
    from runtime.serving import build_predictor_app, run_app
    from runtime.tasks import task_for

    table = pq.read_table(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=5000, seed=1)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    config = model_json(MLPConfig(hidden=[4096, 4096]), prep, task_for("binary"))
    write_model_dir(tmp_path / "m", build_model(config).state_dict(), config, prep)
    options = {"num_replicas": 4, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}
    run_app(build_predictor_app({"model_uri": str(tmp_path / "m")}, options), name="quarters", route_prefix="/q")
    url = f"http://127.0.0.1:{serve_clean}/q"
    wait_for_condition(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=120)

    body = json.dumps({"instances": table.drop_columns(["churned"]).slice(0, 512).to_pylist()})

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(
                *(
                    client.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
                    for _ in range(400)
                )
            )
        return [r.status_code for r in rs]

    assert set(asyncio.run(load())) == {200}
    budgets: dict[int, Any] = {}
    for _ in range(200):
        h = httpx.get(f"{url}/healthz").json()
        budgets[h["replica"]["pid"]] = h["gpu_budget"]
        if len(budgets) == 4:
            break
    assert len(budgets) == 4, budgets
    total = torch.cuda.get_device_properties(0).total_memory
    for pid, b in budgets.items():
        assert b["budget_bytes"] < total / 4, (pid, b)
        assert b["within_budget"], (pid, b)
        assert b["torch_reserved_bytes"] <= b["budget_bytes"], (pid, b)
        print(f"replica {pid}: budget {b['budget_bytes'] >> 20} MiB, NVML {b['nvml_used_bytes']}, "
              f"torch reserved {b['torch_reserved_bytes'] >> 20} MiB")  # fmt: skip


def test_a_config_that_cannot_fit_this_gpu_is_refused() -> None:
    from runtime.errors import ConfigError
    from runtime.serving import validate_serve_config

    total = torch.cuda.get_device_properties(0).total_memory
    config = {
        "applications": [
            {
                "name": "big",
                "route_prefix": "/big",
                "import_path": "serve_apps.predictor:app",
                "args": {"model_uri": "models:/x@champion", "gpu_memory_bytes": total // 3},
                "deployments": [{"name": "Predictor", "num_replicas": 4, "ray_actor_options": {"num_gpus": 0.25}}],
            }
        ]
    }
    with pytest.raises(ConfigError, match="big/Predictor"):
        validate_serve_config(config, "big.yaml")  # the GPU's size from NVML on this machine
