"""Serve replicas on a GPU: four at 0.25 each under load, each with its parameters on CUDA and
its memory inside its budget; a bf16 replica that answers as the fp32 model does; weights that
cannot fit a budget stop the replica at start; a config that cannot fit is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from runtime.models import MLPConfig, build_model
from runtime.registry import load_model_dir
from tests.conftest import wait_for_condition

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(tmp_path: Path) -> tuple[pa.Table, dict[str, Any]]:
    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import model_json, write_model_dir
    from runtime.tasks import task_for

    table = pq.read_table(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=5000, seed=1)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    config = model_json(MLPConfig(hidden=[4096, 4096]), prep, task_for("binary"))
    torch.manual_seed(0)
    write_model_dir(tmp_path / "m", build_model(config).state_dict(), config, prep)
    return table, config


def test_four_quarter_gpu_replicas_stay_inside_their_budgets(serve_clean: int, tmp_path: Path) -> None:
    from runtime.serving import build_predictor_app, run_app

    table, config = _model(tmp_path)
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
    health: dict[int, Any] = {}
    for _ in range(200):
        h = httpx.get(f"{url}/healthz").json()
        health[h["replica"]["pid"]] = h
        if len(health) == 4:
            break
    assert len(health) == 4, health
    total = torch.cuda.get_device_properties(0).total_memory
    weights = sum(p.numel() * 4 for p in build_model(config).parameters())
    for pid, h in health.items():
        b, d = h["gpu_budget"], h["device"]
        # the thing itself: the replica's parameters are on the GPU and its allocator holds them
        assert d["device"].startswith("cuda") and d["precision"] == "fp32", (pid, d)
        assert d["parameter_bytes"] == weights, (pid, d)
        assert d["torch_allocated_bytes"] >= weights, (pid, d)
        assert 0 < d["torch_reserved_bytes"] <= b["budget_bytes"] < total / 4, (pid, b, d)
        # NVML's per-process figure (the CUDA context included) where the platform reports it;
        # the budget leaves the context headroom out, so the bound is the quarter share
        if b["nvml_used_bytes"] is not None:
            assert b["nvml_used_bytes"] <= total / 4, (pid, b)
        assert b["within_budget"], (pid, b)
        print(f"replica {pid} on {d['device']}: budget {b['budget_bytes'] >> 20} MiB, torch reserved "
              f"{d['torch_reserved_bytes'] >> 20} MiB, allocated {d['torch_allocated_bytes'] >> 20} MiB, NVML "
              f"{'n/a' if b['nvml_used_bytes'] is None else b['nvml_used_bytes'] >> 20} MiB")  # fmt: skip
    # the replicas' predictions are the model's (on the CPU, fp32)
    offline = load_model_dir(tmp_path / "m")
    answer = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"}).json()
    want = offline.predict_table(table.drop_columns(["churned"]).slice(0, 512)).probabilities
    np.testing.assert_allclose(np.array(answer["probabilities"]), want, atol=1e-4)


def test_a_bf16_replica_serves_on_the_gpu_and_answers_as_fp32_does(serve_clean: int, tmp_path: Path) -> None:
    from runtime.serving import build_predictor_app, run_app

    table, config = _model(tmp_path)
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}
    args = {"model_uri": str(tmp_path / "m"), "precision": "bf16"}
    run_app(build_predictor_app(args, options), name="bf16", route_prefix="/bf16")
    url = f"http://127.0.0.1:{serve_clean}/bf16"
    wait_for_condition(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=120)
    d = httpx.get(f"{url}/healthz").json()["device"]
    assert d["device"].startswith("cuda") and d["precision"] == "bf16"
    assert d["parameter_bytes"] * 2 == sum(p.numel() * 4 for p in build_model(config).parameters())
    raw = table.drop_columns(["churned"]).slice(0, 2000)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, raw.schema) as writer:
        writer.write_table(raw)
    r = httpx.post(f"{url}/predict", content=sink.getvalue().to_pybytes(),
                   headers={"content-type": "application/vnd.apache.arrow.stream"}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    got = pa.ipc.open_stream(r.content).read_all()["probability_1"].to_numpy()
    want = load_model_dir(tmp_path / "m").predict_table(raw).probabilities[:, 1]
    np.testing.assert_allclose(got, want, atol=0.02)  # bf16 keeps ~3 significant digits
    assert not np.array_equal(got, want)  # ...and it is bf16: not bit-identical to fp32


def test_weights_that_cannot_fit_the_budget_stop_the_replica_at_start(serve_clean: int, tmp_path: Path) -> None:
    from runtime.errors import ServingError
    from runtime.serving import build_predictor_app, run_app

    _model(tmp_path)
    total = torch.cuda.get_device_properties(0).total_memory
    headroom = int(total * 0.25) - (16 << 20)  # leaves a 16 MiB budget for ~2x64 MiB of weights
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}
    args = {"model_uri": str(tmp_path / "m"), "gpu_headroom_bytes": headroom}
    with pytest.raises(
        ServingError, match=r"the weights need [\d,]+ MiB in fp32, more than this replica's GPU budget of 16 MiB"
    ):
        run_app(build_predictor_app(args, options), name="toobig", route_prefix="/toobig")


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
