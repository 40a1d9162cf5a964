"""Rollouts end to end on the session's Ray Serve (HAProxy mode, 127.0.0.1): the router in front of
pinned registered versions, the canary judge, promotion and rollback by alias (compare-and-swap),
shadow and sticky A/B, under steady load, with a replica killed mid-rollout."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.monitoring import MonitoringStore
from runtime.preprocessing import FeatureSpec, fit
from runtime.serving import RolloutSpec, rollout_status, run_rollout
from tests.conftest import wait_for_condition

pytestmark = pytest.mark.integration
MODEL = "rollout-it"


def _model_dir(path: Path, table: pa.Table, seed: int, always_positive: bool = False) -> Path:
    import torch

    from runtime.models import MLPConfig, build_model
    from runtime.registry import model_json, write_model_dir
    from runtime.tasks import task_for

    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    config = model_json(MLPConfig(hidden=[16]), prep, task_for("binary"))
    torch.manual_seed(seed)
    state = build_model(config).state_dict()
    if always_positive:  # a model that never errors and disagrees with everyone: class 1 for every row
        bias = [k for k in state if k.endswith("bias")][-1]
        state[bias] = torch.full_like(state[bias], -30.0)
        state[bias][-1] = 30.0
    write_model_dir(path, state, config, prep)
    return path


def _register(model_dir: Path, example: pa.Table) -> str:
    import mlflow

    from runtime.registry import MANIFEST_TAG, configure_mlflow, log_pyfunc_model, register

    configure_mlflow()
    with mlflow.start_run(run_name=f"register {model_dir.name}"):
        uri, sha = log_pyfunc_model(model_dir, example)
    return register(uri, MODEL, tags={MANIFEST_TAG: sha}).version


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    d = tmp_path_factory.mktemp("rollout-data")
    table = pq.read_table(generate_synthetic(d / "d.parquet", SyntheticConfig(rows=3000, seed=5)))
    return table


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, rows: pa.Table, ray_session: Any) -> dict[str, str]:
    """v1 the champion; v2 the same weights retrained; v3 a model that always says 1."""
    from runtime import registry

    d = tmp_path_factory.mktemp("rollout-models")
    example = rows.drop_columns(["churned"]).slice(0, 5)
    out = {
        "base": _register(_model_dir(d / "base", rows, seed=1), example),
        "same": _register(_model_dir(d / "same", rows, seed=1), example),
        "wild": _register(_model_dir(d / "wild", rows, seed=1, always_positive=True), example),
    }
    registry.move_alias(MODEL, registry.CHAMPION, out["base"], expected=None, reason="test baseline")
    return out


@pytest.fixture
def champion_reset(versions: dict[str, str]) -> Iterator[None]:
    yield
    from runtime import registry

    current = registry.current_champion(MODEL)
    if current is not None and current.version != versions["base"]:
        registry.move_alias(MODEL, registry.CHAMPION, versions["base"], expected=current.version, reason="test reset")


def _spec(app: str, port: int, candidate: str, **overrides: Any) -> RolloutSpec:
    base = {
        "app": app,
        "model": MODEL,
        "candidate": candidate,
        "steps": [50, 100],
        "http_port": port,
        "analysis": {"window_s": 3.0, "max_extensions": 4, "thresholds": {"min_requests": 25, "alpha": 0.01}},
        "arm_num_cpus": 0.25,
    }
    return RolloutSpec.model_validate({**base, **overrides})


class Load:
    """Steady closed-loop load from ``workers`` threads until stopped (at most ``limit_s``)."""

    def __init__(self, url: str, rows: pa.Table, workers: int = 3, limit_s: float = 180.0, keys: bool = False) -> None:
        self.url, self.workers, self.limit_s, self.keys = url, workers, limit_s, keys
        raw = rows.drop_columns(["churned"]).slice(0, 200).to_pylist()
        self.bodies = [json.dumps({"instances": [r]}) for r in raw]
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str | None]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, worker: int) -> None:
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                body = self.bodies[(n * self.workers + worker) % len(self.bodies)]
                try:
                    r = client.post(self.url, content=body, headers={"content-type": "application/json"})
                    status, arm = r.status_code, r.headers.get("x-skewless-arm")
                except httpx.HTTPError:
                    status, arm = 0, None
                with self.lock:
                    self.results.append((time.time(), status, arm))
                n += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _wait_routable(url: str) -> None:
    wait_for_condition(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=60)


def _rollout_under_load(spec: RolloutSpec, url: str, rows: pa.Table) -> tuple[Any, Load, float]:
    """Run the rollout; steady load from the moment its router answers until 2 s after it ends.
    Returns the result, the load, and when the rollout ended (routers pick up the final weights
    within a poll interval: look at what follows a second later)."""
    out: list[Any] = []
    runner = threading.Thread(target=lambda: out.append(run_rollout(spec, progress=print)), daemon=True)
    runner.start()
    wait_for_condition(lambda: rollout_status(spec.app).get("status") == "running", timeout=180, message="running")
    _wait_routable(url)
    with Load(f"{url}/predict", rows) as load:
        runner.join(timeout=300)
        ended = time.time()
        time.sleep(2.0)
    assert out, "the rollout did not finish"
    return out[0], load, ended


def _kill_control(app: str) -> None:
    import ray

    from runtime.serving import control_actor

    with contextlib.suppress(ValueError):
        ray.kill(control_actor(app))


def test_a_canary_as_good_as_the_baseline_is_promoted_with_no_failed_request_through_a_replica_kill(
    serve_clean: int, versions: dict[str, str], rows: pa.Table, champion_reset: None
) -> None:
    import ray

    from runtime import registry

    app = "ro-promote"
    # a replica killed inside the first window leaves the canary one replica for a while: its p99
    # rightly rises (the judge saw x1.8 once); this test is about losing no request, so it allows that
    spec = _spec(
        app,
        serve_clean,
        versions["same"],
        replicas=2,
        analysis={
            "window_s": 3.0,
            "max_extensions": 4,
            "thresholds": {"min_requests": 25, "alpha": 0.01, "max_p99_ratio": 10.0},
        },
    )
    url = f"http://127.0.0.1:{serve_clean}/{app}"
    killed: list[tuple[str, float]] = []

    def kill_one_candidate_replica() -> None:
        from ray.util.state import list_actors

        def candidate_replica() -> Any:
            return [
                a
                for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.name and f"{MODEL}-v{versions['same']}" in a.name and "SERVE_REPLICA" in a.name
            ]

        wait_for_condition(lambda: rollout_status(app).get("status") == "running", timeout=180)
        found = wait_for_condition(candidate_replica, timeout=60, message="a candidate replica")
        time.sleep(3.0)  # into the first analysis window: the load starts as soon as the router answers
        ray.kill(ray.get_actor(found[0].name, namespace="serve"), no_restart=True)
        killed.append((found[0].name, time.time()))

    try:
        killer = threading.Thread(target=kill_one_candidate_replica, daemon=True)
        killer.start()
        result, load, after = _rollout_under_load(spec, url, rows)
        killer.join(timeout=60)
        assert killed, "no candidate replica was killed"
        kill_t = killed[0][1]
        assert any(t < kill_t for t, _, _ in load.results), "the kill came before the load"
        assert sum(1 for t, _, _ in load.results if kill_t < t < after) > 50, "too little load after the kill"
        assert result.outcome == "promoted", (result.reason, result.windows)
        statuses = Counter(s for _, s, _ in load.results)
        assert set(statuses) == {200}, statuses  # not one failed request: rollout, kill, promotion
        arms = Counter(a for t, _, a in load.results if t < after)
        assert arms[f"v{versions['base']}"] > 0 and arms[f"v{versions['same']}"] > 0, arms
        tail = [a for t, _, a in load.results if t > after + 1.0]
        assert tail and set(tail) == {f"v{versions['same']}"}
        # the registry's champion names what production serves, and says who moved it and why
        assert registry.current_champion(MODEL).version == versions["same"]  # type: ignore[union-attr]
        move = registry.alias_history(MODEL, registry.CHAMPION)[-1]
        assert (move.from_version, move.to_version) == (versions["base"], versions["same"])
        assert "every window passed" in move.reason
        assert result.report is not None and "promoted" in result.report.read_text()
        state = rollout_status(app)
        assert state["status"] == "promoted" and len(state["windows"]) >= 2
    finally:
        _kill_control(app)


def test_a_canary_that_errors_is_rolled_back(
    serve_clean: int, versions: dict[str, str], rows: pa.Table, champion_reset: None
) -> None:
    from runtime import registry

    app = "ro-errors"
    spec = _spec(app, serve_clean, versions["same"], candidate_app_args={"inject_error_rate": 0.3})
    url = f"http://127.0.0.1:{serve_clean}/{app}"
    try:
        result, load, after = _rollout_under_load(spec, url, rows)
        assert result.outcome == "rolled_back", result
        failed = [c for c in result.windows[-1]["verdict"]["checks"] if c["passed"] is False]
        assert [c["name"] for c in failed] == ["error_rate"], failed
        assert registry.current_champion(MODEL).version == versions["base"]  # type: ignore[union-attr]
        tail = [r for r in load.results if r[0] > after + 1.0]
        assert tail and {a for _, _, a in tail} == {f"v{versions['base']}"} and {s for _, s, _ in tail} == {200}
    finally:
        _kill_control(app)


def test_a_canary_that_never_errors_but_disagrees_is_rolled_back(
    serve_clean: int, versions: dict[str, str], rows: pa.Table, champion_reset: None
) -> None:
    from runtime import registry

    app = "ro-wild"
    spec = _spec(app, serve_clean, versions["wild"])
    url = f"http://127.0.0.1:{serve_clean}/{app}"
    try:
        result, load, _ = _rollout_under_load(spec, url, rows)
        assert {s for _, s, _ in load.results} == {200}  # it never errors...
        assert result.outcome == "rolled_back", result
        failed = {c["name"] for c in result.windows[-1]["verdict"]["checks"] if c["passed"] is False}
        assert "prediction_divergence" in failed, result.windows[-1]["verdict"]  # ...but the judge sees the model
        assert "error_rate" not in failed
        assert registry.current_champion(MODEL).version == versions["base"]  # type: ignore[union-attr]
    finally:
        _kill_control(app)


def test_shadow_traffic_is_compared_and_never_reaches_the_caller(
    serve_clean: int, versions: dict[str, str], rows: pa.Table, champion_reset: None
) -> None:
    app = "ro-shadow"
    spec = _spec(app, serve_clean, versions["wild"], strategy="shadow", shadow={"max_in_flight": 8})
    url = f"http://127.0.0.1:{serve_clean}/{app}"
    try:
        result, load, _ = _rollout_under_load(spec, url, rows)
        assert {a for _, _, a in load.results} == {f"v{versions['base']}"}  # every answer is the live one's
        assert {s for _, s, _ in load.results} == {200}
        window = result.windows[-1]
        assert window["checks"]["disagreement"] is not None and window["checks"]["disagreement"] > 0.3, window
        failed = {c["name"] for c in window["verdict"]["checks"] if c["passed"] is False}
        assert result.outcome == "rolled_back" and "disagreement" in failed, result
        counters = rollout_status(app)
        assert counters["status"] == "rolled_back"
        # labels reach the store through the router too (any arm takes them: one store)
        sent = httpx.post(f"{url}/labels", json={"labels": [{"request_id": "rollout-req-1", "label": "1"}]})
        assert sent.status_code == 200 and sent.json() == {"accepted": 1}, (sent.status_code, sent.text)
        assert "rollout-req-1" in MonitoringStore().labels(app)["request_id"].to_pylist()
        assert httpx.post(f"{url}/labels", json={"labels": []}).status_code == 422
    finally:
        _kill_control(app)


def test_sticky_ab_keeps_each_key_on_its_arm(
    serve_clean: int, versions: dict[str, str], rows: pa.Table, champion_reset: None
) -> None:
    app = "ro-ab"
    spec = _spec(
        app,
        serve_clean,
        versions["same"],
        strategy="ab",
        split=30,
        router_replicas=2,
        analysis={"window_s": 30.0, "max_extensions": 0, "thresholds": {"min_requests": 25}},
    )
    url = f"http://127.0.0.1:{serve_clean}/{app}"
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(run_rollout(spec, progress=print)), daemon=True)
    runner.start()
    try:
        wait_for_condition(lambda: rollout_status(app).get("step") == 0, timeout=120, message="the A/B split is live")
        _wait_routable(url)
        # each router replica applies the split at its next poll (POLL_S): until then it routes by
        # the deploy-time weights, and a key would meet both arms
        split = int(rollout_status(app)["config_version"])
        wait_for_condition(
            lambda: all(httpx.get(f"{url}/healthz", timeout=5).json()["config_version"] >= split for _ in range(8)),
            timeout=30,
            message="both routers on the split",
        )
        body = json.dumps({"instances": rows.drop_columns(["churned"]).slice(0, 1).to_pylist()})
        seen: dict[str, set[str]] = {}
        with httpx.Client(timeout=30) as client:
            for _ in range(2):  # every key twice; two router replicas share the load
                for i in range(400):
                    key = f"user-{i}"
                    r = client.post(
                        f"{url}/predict",
                        content=body,
                        headers={"content-type": "application/json", "x-skewless-key": key},
                    )
                    assert r.status_code == 200, r.text
                    seen.setdefault(key, set()).add(r.headers["x-skewless-arm"])
        assert all(len(arms) == 1 for arms in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
        share = sum(1 for arms in seen.values() if arms == {f"v{versions['same']}"}) / len(seen)
        assert 0.22 < share < 0.38, share  # 30% of keys, within sampling error for 400 keys
    finally:
        from runtime.serving import abort_rollout

        abort_rollout(spec, "test over")
        runner.join(timeout=60)
        _kill_control(app)


def test_two_concurrent_promotions_exactly_one_wins(
    serve_clean: int, versions: dict[str, str], champion_reset: None
) -> None:
    """Two operators (or a rollout and an operator) promote the same rollout at once: the alias
    move is compare-and-swap, so one wins and the other is told the champion moved."""
    from runtime import registry
    from runtime.errors import AliasConflictError, ServingError
    from runtime.serving import deploy_rollout, promote_rollout

    app = "ro-race"
    spec = _spec(app, serve_clean, versions["same"])
    before = len(registry.alias_history(MODEL, registry.CHAMPION))
    try:
        deploy_rollout(spec, progress=print)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def promote(who: str) -> None:
            barrier.wait()
            try:
                promote_rollout(spec, f"promoted by {who}", progress=print)
                outcomes.append("won")
            except (AliasConflictError, ServingError) as exc:  # the status, or the alias, moved first
                outcomes.append(f"conflict: {exc}")

        threads = [threading.Thread(target=promote, args=(who,)) for who in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(o.split(":")[0] for o in outcomes) == ["conflict", "won"], outcomes
        assert registry.current_champion(MODEL).version == versions["same"]  # type: ignore[union-attr]
        moves = registry.alias_history(MODEL, registry.CHAMPION)[before:]
        assert len(moves) == 1 and moves[0].to_version == versions["same"], moves
        # a promoted rollout cannot be aborted (only rolled back): the status is compare-and-swap too
        from runtime.serving import abort_rollout

        with pytest.raises(ServingError, match="cannot abort: the rollout is promoted"):
            abort_rollout(spec)
    finally:
        _kill_control(app)


def test_a_step_judges_only_requests_routed_by_its_weights(ray_session: Any) -> None:
    """Routers apply a step's weights at their next poll: what they routed by the old weights
    meanwhile (all of it to the baseline) must not join the step's window, or the arms would be
    compared over different stretches of traffic (identical models once read as diverging)."""
    import ray

    from runtime.serving import control_actor

    app = "window-versions"
    control = control_actor(app, {"weights": {"a": 100.0}, "versions": {"a": "1"}})
    try:
        step = int(ray.get(control.set_config.remote(weights={"a": 50.0, "b": 50.0})))
        t = time.time()
        old = [(t, "a", "live", 1.0, 200, [0], None, step - 1) for _ in range(5)]  # routed before the poll
        new = [(t, arm, "live", 1.0, 200, [1], None, step) for arm in ("a", "b")]
        legacy = [(t, "a", "live", 1.0, 200, [1], None)]  # a sample without a version is kept
        ray.get(control.record.remote(old + new + legacy, [], {}))
        window = ray.get(control.window.remote(t - 1, t + 1, step))
        assert [s[5] for s in window["samples"]["a"]] == [[1], [1]] and len(window["samples"]["b"]) == 1
        assert len(ray.get(control.window.remote(t - 1, t + 1))["samples"]["a"]) == 7  # no version asked: all
    finally:
        _kill_control(app)
