"""The OOM guard under 2 real Ray Train workers, by fault injection on CPU: one rank's model
raises ``torch.cuda.OutOfMemoryError`` (the real class) for inputs above a size. The run
halves the micro-batch on every rank, finishes with the same weights as a run that started
at the smaller micro-batch, and leaves a readable bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.errors import TrainingError
from runtime.training import Callback, LoopState, TrainJobConfig, run_training

pytestmark = pytest.mark.integration


class InjectOom(Callback):
    """On ``rank``, the model raises a CUDA OOM for any input of more than ``max_rows`` rows."""

    def __init__(self, rank: int, max_rows: int) -> None:
        self.rank, self.max_rows = rank, max_rows

    def on_run_start(self, state: LoopState) -> None:
        if state.rank != self.rank:
            return
        inner = getattr(state.model, "module", state.model)
        forward, limit = inner.forward, self.max_rows

        def guarded_forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {x.shape[0] * 4} MiB (injected: {x.shape[0]} rows > {limit})"
                )
            return forward(x)

        inner.forward = guarded_forward


class RecordMicroBatch(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_run_end(self, state: LoopState) -> None:
        Path(f"{self.path}.rank{state.rank}").write_text(str(state.micro_batch_size))


def _cfg(data: Path, name: str, micro: int) -> TrainJobConfig:
    return TrainJobConfig.model_validate(
        {
            "data": {"path": str(data)},
            "features": synthetic_feature_spec(),
            # dropout: a recomputed step must draw the masks it drew the first time
            "model": {"hidden": [16], "dropout": 0.2},
            "training": {
                "epochs": 1,
                "batch_size": 128,
                "num_workers": 2,
                "seed": 3,
                "micro_batch_size": micro,
                "run_name": name,
            },
            "memory": {"sample_interval_s": 0.2},
            "registry": {"model_name": name, "promote": False},
        }
    )


def _weights(outcome: Any) -> dict[str, torch.Tensor]:
    return load_file(str(outcome.model_dir / "weights.safetensors"))


def test_one_rank_ooms_every_rank_halves_and_the_model_is_unchanged(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=1500, seed=2)))
    results = tmp_path / "results"
    reference = run_training(_cfg(data, "oom-ref", 32), progress=lambda m: None, storage_path=str(results))
    record = tmp_path / "micro"
    guarded = run_training(
        _cfg(data, "oom-hit", 64),
        progress=lambda m: None,
        callbacks=[InjectOom(rank=1, max_rows=40), RecordMicroBatch(str(record))],
        storage_path=str(results),
    )
    # every rank ended at the halved micro-batch (64 -> 32), told by the collective
    assert [Path(f"{record}.rank{r}").read_text() for r in (0, 1)] == ["32", "32"]
    # and the training result is the one a run started at 32 gives: bit for bit on CPU
    ref, got = _weights(reference), _weights(guarded)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert guarded.metrics == reference.metrics

    bundles = sorted((results / "oom-hit" / "diagnostics").glob("oom-*"))
    assert [b.name for b in bundles] == ["oom-rank1-step0-1"]  # one event, on rank 1 only
    report = (bundles[0] / "REPORT.md").read_text()
    assert "rank 1, step 0" in report and "from 64 to 32" in report
    assert "model parameters" in report or "optimizer state" in report  # the largest consumers
    facts = json.loads((bundles[0] / "context.json").read_text())
    assert facts["micro_batch_before"] == 64 and facts["micro_batch_after"] == 32
    assert facts["input_shape"][0] == 64
    assert "OutOfMemoryError" in (bundles[0] / "error.txt").read_text()
    assert "thread" in (bundles[0] / "stacks.txt").read_text()
    artifacts = mlflow.artifacts.list_artifacts(run_id=guarded.run_id, artifact_path="diagnostics/oom-rank1-step0-1")
    assert {Path(a.path).name for a in artifacts} >= {"REPORT.md", "context.json", "stacks.txt", "error.txt"}


def test_when_micro_batch_one_does_not_fit_every_rank_stops_with_the_bundle(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=600, seed=2)))
    results = tmp_path / "results"
    with pytest.raises(TrainingError, match="micro-batch 1") as info:
        run_training(
            _cfg(data, "oom-never", 8),
            progress=lambda m: None,
            callbacks=[InjectOom(rank=0, max_rows=0)],
            storage_path=str(results),
        )
    assert "diagnostics" in str(info.value)
    bundles = sorted(p.name for p in (results / "oom-never" / "diagnostics").glob("oom-*"))
    # 8 -> 4 -> 2 -> 1 -> none: bundles for the first events and always for the last
    assert bundles[-1] == "oom-rank0-step0-4" and len(bundles) == 4
    assert (
        "Micro-batch 1 did not fit" in (results / "oom-never" / "diagnostics" / bundles[-1] / "REPORT.md").read_text()
    )


class Balloon(Callback):
    """From ``step`` on ``rank``, holds 16 MiB more every 100 ms until something stops it.

    The watchdog's dump request races a leak this fast on a loaded machine, so once asked
    (a request file in ``diag``) the balloon waits for the dump to land, at most 30 s, and then
    grows on to its death: the test checks the dump, not who wins the race."""

    def __init__(self, rank: int, step: int, diag: Path) -> None:
        self.rank, self.step, self.diag = rank, step, diag

    def on_step_end(self, state: LoopState) -> None:
        if state.rank != self.rank or state.step != self.step:
            return
        import time

        import numpy as np

        held = []
        for _ in range(2000):  # 32 GiB at most: far past any limit the test sets
            held.append(np.ones(2 << 20))
            if list(self.diag.glob(f"dump-request-rank{self.rank}-*")):
                deadline = time.monotonic() + 30
                while not list(self.diag.glob(f"allocations-rank{self.rank}-*.txt")) and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.1)


def test_host_oom_kill_ends_the_job_with_a_readable_cause(ray_session: Any, tmp_path: Path) -> None:
    from runtime.memory import try_create_limited_cgroup

    probe = try_create_limited_cgroup(f"skewless-probe-{id(tmp_path)}", 64 << 20)
    enforced_by = "kernel OOM killer" if probe is not None else "watchdog"
    if probe is not None:
        probe.remove()
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=1500, seed=2)))
    results = tmp_path / "results"
    cfg = _cfg(data, "host-oom", 32)
    # Workers are moved into a 1 GiB cgroup after start-up (charges made before the move stay
    # where they were), or, without cgroups, the watchdog kills at RSS 3 GiB.
    limit = (1 << 30) if probe is not None else (3 << 30)
    cfg = cfg.model_copy(
        update={
            "memory": cfg.memory.model_copy(
                update={
                    "watchdog": cfg.memory.watchdog.model_copy(
                        update={"memory_limit_bytes": limit, "poll_interval_s": 0.1, "soft_fraction": 0.5}
                    )
                }
            )
        }
    )
    diag = results / "host-oom" / "diagnostics" / "host-memory"
    with pytest.raises(TrainingError) as info:
        run_training(
            cfg, progress=lambda m: None, callbacks=[Balloon(rank=1, step=3, diag=diag)], storage_path=str(results)
        )
    message = str(info.value)
    assert "failed on host memory" in message, message
    assert "rank 1 (pid" in message and "at step 3" in message and enforced_by in message
    assert f"{limit / (1 << 20):,.0f} MiB limit" in message
    assert "rank 1" in (diag / "REPORT.md").read_text()
    assert list(diag.glob("allocations-rank1-*.txt")) and list(diag.glob("stacks-rank1-*.txt"))
    assert list(diag.glob("incident-rank1-*.json"))


class WaitForMemoryMetrics(Callback):
    """At run end, each rank polls Ray's metrics export until its memory gauges show up."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_run_end(self, state: LoopState) -> None:
        import time

        import httpx
        import ray
        from prometheus_client.parser import text_string_to_metric_families

        node = next(n for n in ray.nodes() if n["Alive"])
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        deadline, found = time.monotonic() + 60, []
        while time.monotonic() < deadline and not found:
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
                if family.name == "ray_skewless_memory_bytes":
                    found = [s for s in family.samples if s.labels.get("rank") == str(state.rank)]
            time.sleep(1)
        Path(f"{self.path}.rank{state.rank}").write_text(json.dumps([(s.labels, s.value) for s in found]))


def test_per_rank_memory_reaches_mlflow_and_rays_prometheus_export(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=800, seed=2)))
    record = tmp_path / "metrics"
    outcome = run_training(
        _cfg(data, "mem-metrics", 32),
        progress=lambda m: None,
        callbacks=[WaitForMemoryMetrics(str(record))],
        storage_path=str(tmp_path / "results"),
    )
    for rank in (0, 1):
        samples = json.loads(Path(f"{record}.rank{rank}").read_text())
        kinds = {labels["kind"] for labels, value in samples if value > 0}
        assert "rss" in kinds, samples
    client = mlflow.MlflowClient()
    for rank in (0, 1):
        assert client.get_metric_history(outcome.run_id, f"mem/rank{rank}/rss_mb")
    artifacts = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "memory")}
    assert {"memory_rank0.png", "memory_rank1.png", "memory_timeline_rank1.jsonl"} <= artifacts
