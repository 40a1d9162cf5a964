"""Alias moves are compare-and-swap under a lock made of MLflow's own unique constraint, and each
is recorded on the registered model: against MLflow's SQLite store and a real tracking server,
with threads and processes racing (no MLflow mocks)."""

from __future__ import annotations

import getpass
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import AliasConflictError, AliasLockTimeoutError, ModelNotFoundError
from runtime.registry import CHAMPION, AliasMove, alias_history, lock_name, move_alias, resolve, set_alias
from tests.conftest import free_port, subprocess_env, wait_for_condition

MLFLOW = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mlflow"


@contextmanager
def _pointed_at(uri: str) -> Iterator[Any]:
    """MLflow's client on ``uri``; the previous URIs (and the variables MLflow exports) after."""
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient()
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('aliases') / 'mlflow.db'}"


@pytest.fixture
def client(sqlite_uri: str) -> Iterator[Any]:
    with _pointed_at(sqlite_uri) as c:
        yield c


def _model(client: Any, versions: int) -> str:
    """A registered model with ``versions`` versions (sources that are never downloaded), each
    from a run whose ``holdout_accuracy`` is 0.5."""
    name = f"aliases-{uuid.uuid4().hex[:8]}"
    experiment = client.get_experiment_by_name("aliases")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("aliases")
    client.create_registered_model(name)
    for _ in range(versions):
        run_id = client.create_run(experiment_id).info.run_id
        client.log_metric(run_id, "holdout_accuracy", 0.5)
        client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return name


def _champion(client: Any, name: str) -> str:
    return str(client.get_model_version_by_alias(name, CHAMPION).version)


def _no_lock_left(client: Any, name: str) -> bool:
    return not [m.name for m in client.search_registered_models() if m.name.startswith(lock_name(name))]


def test_a_move_from_where_the_alias_points_moves_it_and_records_who_why_and_when(client: Any) -> None:
    name = _model(client, 2)
    before = time.time()
    first = move_alias(name, CHAMPION, 1, expected=None, reason="first version", actor="alice@laptop")
    assert first == AliasMove(name, CHAMPION, None, "1", "alice@laptop", "first version", first.at, 1)
    assert before <= first.at <= time.time()
    second = move_alias(name, CHAMPION, "2", expected=1, reason="x" * 2000)
    assert (second.from_version, second.to_version, second.seq) == ("1", "2", 2)
    assert second.actor == f"{getpass.getuser()}@{socket.gethostname()}"
    assert second.reason == "x" * 500  # cut to fit MLflow's tag column with room to spare
    assert _champion(client, name) == "2"
    assert alias_history(name) == [first, second]
    assert alias_history(name, CHAMPION) == [first, second] and alias_history(name, "candidate") == []
    tags = client.get_registered_model(name).tags
    assert sorted(k for k in tags if k.startswith("skewless.alias_move.")) == [
        "skewless.alias_move.000001",
        "skewless.alias_move.000002",
    ]
    assert ", " not in tags["skewless.alias_move.000001"] and len(tags["skewless.alias_move.000002"]) < 1000
    # where it already points: nothing changes, nothing is recorded
    same = move_alias(name, CHAMPION, 2, expected="2", reason="again")
    assert (same.from_version, same.to_version, same.seq) == ("2", "2", 0)
    assert len(alias_history(name)) == 2
    assert _no_lock_left(client, name)


def test_a_stale_expectation_moves_nothing_and_says_where_the_alias_is(client: Any) -> None:
    name = _model(client, 3)
    move_alias(name, CHAMPION, 2, expected=None, reason="first")
    with pytest.raises(AliasConflictError) as err:
        move_alias(name, CHAMPION, 3, expected=1, reason="beats v1")
    message = str(err.value)
    assert f"'{name}'" in message and "'champion'" in message
    assert "points to version 2, not to version 1" in message and "re-read the alias and decide again" in message
    assert (err.value.current, err.value.expected) == ("2", "1")
    assert str(pickle.loads(pickle.dumps(err.value))) == message  # crosses a Ray task boundary
    with pytest.raises(AliasConflictError, match=r"points to version 2, not to nowhere \(unset\)"):
        move_alias(name, CHAMPION, 3, expected=None, reason="first")
    with pytest.raises(AliasConflictError, match=r"'candidate' .* points to nowhere \(unset\), not to version 2"):
        move_alias(name, "candidate", 3, expected=2, reason="x")
    assert _champion(client, name) == "2" and len(alias_history(name)) == 1
    # no such version, no such model: nothing recorded, no lock left behind
    with pytest.raises(ModelNotFoundError, match=f"models:/{name}/9"):
        move_alias(name, CHAMPION, 9, expected=2, reason="x")
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope-"):
        move_alias(f"nope-{name}", CHAMPION, 1, expected=None, reason="x")
    assert _champion(client, name) == "2" and len(alias_history(name)) == 1
    assert _no_lock_left(client, name) and _no_lock_left(client, f"nope-{name}")


def _race(name: str, targets: list[int], expected: str) -> tuple[list[AliasMove], list[AliasConflictError]]:
    """Every target moves ``champion`` at once from ``expected``, one thread each."""
    start = threading.Barrier(len(targets))

    def promote(to: int) -> AliasMove:
        start.wait(timeout=60)
        return move_alias(name, CHAMPION, to, expected=expected, reason=f"beats v{expected}", actor=f"trainer-{to}")

    with ThreadPoolExecutor(len(targets)) as pool:
        futures = [pool.submit(promote, to) for to in targets]
    won, lost = [], []
    for future in futures:
        exc = future.exception()
        if exc is None:
            won.append(future.result())
        elif isinstance(exc, AliasConflictError):
            lost.append(exc)
        else:
            raise exc
    return won, lost


def _one_winner(client: Any, name: str, won: list[AliasMove], lost: list[AliasConflictError], records: int) -> None:
    assert len(won) == 1, won
    winner = won[0]
    assert all(exc.current == winner.to_version and exc.expected == "1" for exc in lost)
    assert _champion(client, name) == winner.to_version
    history = alias_history(name)
    assert len(history) == records + 1 and history[-1] == winner and winner.seq == records + 1
    assert _no_lock_left(client, name)


def _eight_threads_one_winner(client: Any) -> None:
    name = _model(client, 9)
    move_alias(name, CHAMPION, 1, expected=None, reason="first")
    targets = list(range(2, 10))
    won, lost = _race(name, targets, "1")
    assert len(lost) == len(targets) - 1
    _one_winner(client, name, won, lost, records=1)


def test_eight_threads_promoting_from_v1_one_wins(client: Any) -> None:
    _eight_threads_one_winner(client)


def _promote_in_child(uri: str, name: str, to: int, start: Any, results: Any) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    start.wait(timeout=120)
    try:
        move = move_alias(name, CHAMPION, to, expected=1, reason="beats v1", actor=f"process-{to}")
        results.put(("won", move.to_version))
    except AliasConflictError as exc:
        results.put(("lost", exc.current))
    except Exception as exc:
        results.put(("error", repr(exc)))


def test_two_processes_promoting_from_v1_one_wins(client: Any, sqlite_uri: str) -> None:
    name = _model(client, 3)
    move_alias(name, CHAMPION, 1, expected=None, reason="first")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_child, args=(sqlite_uri, name, to, start, results)) for to in (2, 3)]
    for p in procs:
        p.start()
    try:
        outcomes = sorted(results.get(timeout=180) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [kind for kind, _ in outcomes] == ["lost", "won"], outcomes
    assert outcomes[0][1] == outcomes[1][1] == _champion(client, name)  # the loser saw the winner
    assert len(alias_history(name)) == 2 and _no_lock_left(client, name)


def test_a_stale_lock_is_broken_once_even_with_eight_waiters(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    name = _model(client, 9)
    move_alias(name, CHAMPION, 1, expected=None, reason="first")
    client.create_registered_model(
        lock_name(name),
        tags={"owner": "ghost@gone", "pid": "4242", "host": "gone", "expires_at": str(time.time() - 5)},
    )
    with caplog.at_level(logging.WARNING, logger="runtime.registry"):
        won, lost = _race(name, list(range(2, 10)), "1")
    _one_winner(client, name, won, lost, records=1)
    breaks = [r.getMessage() for r in caplog.records if "breaking the alias lock" in r.getMessage()]
    assert len(breaks) == 1 and "ghost@gone (pid 4242 on gone)" in breaks[0], breaks


def test_a_live_lock_held_elsewhere_times_out_naming_its_holder(client: Any) -> None:
    name = _model(client, 2)
    move_alias(name, CHAMPION, 1, expected=None, reason="first")
    lock = lock_name(name)
    assert lock == f"{name}.alias-lock"
    client.create_registered_model(
        lock, tags={"owner": "bob@elsewhere", "pid": "7", "host": "elsewhere", "expires_at": str(time.time() + 60)}
    )
    t0 = time.monotonic()
    with pytest.raises(AliasLockTimeoutError) as err:
        move_alias(name, CHAMPION, 2, expected=1, reason="x", lock_timeout_s=1)
    assert 1.0 <= time.monotonic() - t0 < 5.0
    message = str(err.value)
    assert "bob@elsewhere (pid 7 on elsewhere)" in message and "s from now" in message
    assert f"delete the registered model '{lock}'" in message
    assert _champion(client, name) == "1" and len(alias_history(name)) == 1
    assert client.get_registered_model(lock).tags["owner"] == "bob@elsewhere"  # a live lock is left alone
    # a registered model of that name that skewless did not make is never broken
    client.delete_registered_model(lock)
    client.create_registered_model(lock)
    with pytest.raises(AliasLockTimeoutError, match="no expires_at tag.*rename or delete that registered model"):
        move_alias(name, CHAMPION, 2, expected=1, reason="x", lock_timeout_s=0.3)
    client.delete_registered_model(lock)
    assert move_alias(name, CHAMPION, 2, expected=1, reason="x").seq == 2


# -- the champion decision --------------------------------------------------------------------


def _promote(name: str, version: str, accuracy: float) -> tuple[bool, str]:
    from runtime.tasks import Metric
    from runtime.training import TrainJobConfig
    from runtime.training._promote import _maybe_promote

    cfg = TrainJobConfig.model_validate(
        {
            "data": {"path": "unused.parquet"},
            "features": {"label": {"name": "y", "task": "binary"}, "features": [{"name": "x", "type": "numeric"}]},
            "registry": {"model_name": name},
        }
    )
    ref = resolve(f"models:/{name}/{version}")
    return _maybe_promote(cfg, ref, {"holdout_accuracy": accuracy}, [], Metric("holdout_accuracy", True), print)


def test_a_promotion_decided_before_a_rival_promoted_keeps_the_rival(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime import registry

    name = _model(client, 3)
    read = registry.current_champion

    def read_then_a_rival_promotes(model: str) -> Any:
        seen = read(model)
        move_alias(model, CHAMPION, 2, expected=None, reason="rival", actor="rival")
        return seen

    monkeypatch.setattr("runtime.training._promote.registry.current_champion", read_then_a_rival_promotes)
    promoted, decision = _promote(name, "3", 0.9)
    assert not promoted and decision.startswith("kept champion: alias 'champion'")
    assert "points to version 2, not to nowhere (unset)" in decision
    assert _champion(client, name) == "2" and [m.actor for m in alias_history(name)] == ["rival"]


def test_a_rollback_made_while_a_training_decided_is_not_overwritten(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime import registry

    name = _model(client, 3)
    promoted, decision = _promote(name, "1", 0.6)
    assert promoted and decision.startswith("champion: first version")
    assert alias_history(name)[-1].reason == decision
    promoted, decision = _promote(name, "2", 0.7)  # beats v1's recorded 0.5 (v1 cannot be verified)
    assert promoted and _champion(client, name) == "2"
    read = registry.current_champion

    def read_then_someone_rolls_back(model: str) -> Any:
        seen = read(model)
        set_alias(model, CHAMPION, "1")  # the README's rollback: straight through MLflow
        return seen

    monkeypatch.setattr("runtime.training._promote.registry.current_champion", read_then_someone_rolls_back)
    promoted, decision = _promote(name, "3", 0.9)
    assert not promoted and "points to version 1, not to version 2" in decision
    assert _champion(client, name) == "1"
    assert [(m.from_version, m.to_version) for m in alias_history(name)] == [(None, "1"), ("1", "2")]


# -- a real tracking server -------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with two workers over one SQLite database."""
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'server.db'}",
                "--default-artifact-root",
                (tmp_path / "artifacts").as_uri(),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,  # its own process group: uvicorn and its workers go with it
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            return bool(resp.status == 200)

    try:
        wait_for_condition(healthy, timeout=60, interval=0.5, message="mlflow server /health")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_compare_and_swap_against_a_tracking_server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    with _pointed_at(mlflow_server) as server:
        name = _model(server, 2)
        first = move_alias(name, CHAMPION, 1, expected=None, reason="first", actor="alice")
        with pytest.raises(AliasConflictError, match="points to version 1, not to version 2"):
            move_alias(name, CHAMPION, 2, expected=2, reason="stale")
        assert alias_history(name) == [first] and _champion(server, name) == "1"
        _eight_threads_one_winner(server)
