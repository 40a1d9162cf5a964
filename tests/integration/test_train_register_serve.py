"""The whole path on the session's real local Ray: Ray Train -> MLflow registry -> Ray Serve."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from runtime import registry
from runtime.data import SyntheticConfig, dataset_fingerprint, generate_synthetic, synthetic_feature_spec
from runtime.errors import ArtifactIntegrityError, FingerprintMismatchError
from runtime.serving import build_predictor_app, check_parity
from runtime.training import TrainJobConfig, TrainOutcome, run_training
from tests.conftest import wait_for_condition

pytestmark = pytest.mark.integration
NAME = "itest-churn"


def _config(data: Path, **training: Any) -> TrainJobConfig:
    return TrainJobConfig.model_validate(
        {
            "data": {"path": str(data)},
            "features": synthetic_feature_spec("binary"),
            "model": {"hidden": [32]},
            "optimizer": {"lr": 5e-3},
            "training": {"epochs": 2, "batch_size": 128, "num_workers": 2, "seed": 1, **training},
            "registry": {"model_name": NAME},
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "churn.parquet"
    return Path(generate_synthetic(path, SyntheticConfig(rows=4000, seed=5)))


def _no_materializing(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the training driver must stream the dataset, not hold it")


@pytest.fixture(scope="module")
def trained(ray_session: Any, dataset: Path) -> TrainOutcome:
    import ray.data

    cfg = _config(dataset)
    # the fit sees a bounded sample of the ~3200 training rows
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fit_sample_rows": 1000})})
    # The driver process only (Ray Data reads in tasks): nothing reads the files whole or pulls
    # a dataset into the driver. (Training from memory materializes the preprocessed split
    # into the object store, not into the driver.)
    with pytest.MonkeyPatch.context() as mp:
        for target, name in [
            (pq, "read_table"),
            (ray.data.Dataset, "take_all"),
            (ray.data.Dataset, "to_pandas"),
            (ray.data.Dataset, "to_arrow_refs"),
        ]:
            mp.setattr(target, name, _no_materializing)
        mp.setattr("runtime.data.read_table", _no_materializing)
        return run_training(cfg, progress=lambda m: None)


def test_driver_streams_splits_by_content_and_fits_on_a_bounded_sample(trained: TrainOutcome, dataset: Path) -> None:
    from runtime.data import split_unit

    tags = mlflow.MlflowClient().get_run(trained.run_id).data.tags
    table = pq.read_table(dataset)
    spec = synthetic_feature_spec("binary")
    columns = [f["name"] for f in spec["features"]] + [spec["label"]["name"]]
    u = split_unit(table, columns, seed=1)
    in_holdout, in_train = u < 0.2, u >= 0.3  # test 20%, validation 10%, training the rest
    assert int(tags["skewless.holdout_rows"]) == int(in_holdout.sum())
    assert int(tags["skewless.train_rows"]) == int(in_train.sum())
    assert tags["skewless.preprocessing_fit_rows"] == "1000"
    assert tags["skewless.ingest"] == "memory"  # a small split: preprocessed once, iterated in memory
    # the holdout sample is exactly the holdout rows, in file order
    assert trained.holdout_sample.equals(table.filter(in_holdout))


def test_run_records_lineage_and_registers_champion(trained: TrainOutcome, dataset: Path) -> None:
    client = mlflow.MlflowClient()
    run = client.get_run(trained.run_id)
    tags = run.data.tags
    assert tags["skewless.dataset_sha256"] == dataset_fingerprint(str(dataset))
    manifest = json.loads((trained.model_dir / "manifest.json").read_text())
    assert tags["skewless.preprocessing_fingerprint"] == manifest["preprocessing"]["fingerprint"]
    assert tags["skewless.code_fingerprint"] == manifest["code_fingerprint"]  # preprocessing + task + model code
    assert tags["skewless.spec_fingerprint"] == manifest["preprocessing"]["spec"]
    assert tags["skewless.state_fingerprint"] == manifest["preprocessing"]["state"]
    assert len(tags["skewless.git_commit"]) in (40, 7) or tags["skewless.git_commit"] == "unknown"
    assert tags["skewless.git_dirty"] in ("true", "false", "none")
    assert len(tags["skewless.environment_sha256"]) == 64
    # per-epoch metrics logged by rank 0, holdout metrics by the driver
    history = client.get_metric_history(trained.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1]
    assert 0.5 < run.data.metrics["holdout_accuracy"] <= 1.0
    assert run.data.params["training.num_workers"] == "2"

    champion = registry.resolve(f"models:/{NAME}@champion")
    candidate = registry.resolve(f"models:/{NAME}@candidate")
    assert champion.version == candidate.version == trained.version
    assert champion.tags["skewless.dataset_sha256"] == tags["skewless.dataset_sha256"]


def test_mlflow_pyfunc_predicts_from_raw_rows(trained: TrainOutcome, dataset: Path) -> None:
    raw = pq.read_table(dataset).slice(0, 50).drop_columns(["churned"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(raw.to_pandas())
    assert list(out.columns) == ["prediction", "probability_0", "probability_1"]
    assert set(out["prediction"]) <= {0, 1}
    np.testing.assert_allclose(out["probability_0"] + out["probability_1"], 1.0, rtol=1e-6)
    # the same rows through the library loader give bit-identical probabilities
    _, loaded = registry.load(f"models:/{NAME}@champion")
    probs = loaded.predict_table(raw).probabilities
    assert probs is not None
    assert np.array_equal(probs[:, 1], out["probability_1"].to_numpy())


def test_second_run_is_candidate_and_champion_only_if_better(trained: TrainOutcome, dataset: Path) -> None:
    worse = run_training(_config(dataset, epochs=1, seed=2), progress=lambda m: None)
    candidate = registry.resolve(f"models:/{NAME}@candidate")
    champion = registry.resolve(f"models:/{NAME}@champion")
    assert candidate.version == worse.version != trained.version
    if worse.promoted:
        assert champion.version == worse.version and "beats" in worse.decision
    else:
        assert champion.version == trained.version and "kept champion" in worse.decision
    # rollback is moving the alias: the old version still loads
    registry.set_alias(NAME, "champion", trained.version)
    assert registry.load(f"models:/{NAME}@champion")[0].version == trained.version  # type: ignore[union-attr]


def test_tampered_artifact_and_foreign_code_are_refused(
    trained: TrainOutcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(trained.model_dir, copy)
    with (copy / "weights.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactIntegrityError, match="weights.safetensors"):
        registry.load_model_dir(copy)

    monkeypatch.setattr("runtime.registry._package.inference_code_fingerprint", lambda config: "f" * 64)
    with pytest.raises(FingerprintMismatchError) as exc:
        registry.load_model_dir(trained.model_dir)
    assert "ffffffffffffffff" in str(exc.value)
    loaded = registry.load_model_dir(trained.model_dir, allow_fingerprint_mismatch=True)
    assert loaded.task is not None and loaded.task.name == "binary"


def _serve(name: str, args: dict[str, Any], port: int) -> str:
    from ray import serve

    serve.run(build_predictor_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    endpoint = f"http://127.0.0.1:{port}/{name}"
    wait_for_condition(
        lambda: httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200,
        timeout=120,
        message=f"{endpoint}/healthz",
    )
    return endpoint


def test_serve_predicts_and_matches_offline(trained: TrainOutcome, dataset: Path, serve_clean: int) -> None:
    endpoint = _serve("churn", {"model_uri": f"models:/{NAME}@champion"}, serve_clean)
    health = httpx.get(f"{endpoint}/healthz").json()
    assert health["model"]["name"] == NAME

    raw = pq.read_table(dataset).slice(100, 64).drop_columns(["churned"])
    resp = httpx.post(f"{endpoint}/predict", json={"instances": raw.to_pylist()[:3]})
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["predictions"]) == 3 and body["classes"] == [0, 1]
    # the alias was resolved once, at deploy: every replica serves (and names) that version
    pinned = f"models:/{NAME}/{trained.version}"
    assert body["model"] == {"name": NAME, "version": trained.version, "uri": pinned}

    report = check_parity(endpoint, f"models:/{NAME}@champion", raw)
    assert report.ok, str(report)


def test_parity_check_sends_the_api_key_an_endpoint_requires(
    trained: TrainOutcome, dataset: Path, serve_clean: int
) -> None:
    key = "parity-" + os.urandom(12).hex()
    endpoint = _serve("churn-key", {"model_uri": f"models:/{NAME}@champion", "api_key": key}, serve_clean)
    raw = pq.read_table(dataset).slice(0, 32).drop_columns(["churned"])
    with pytest.raises(httpx.HTTPStatusError) as refused:
        check_parity(endpoint, f"models:/{NAME}@champion", raw)
    assert refused.value.response.status_code == 401
    report = check_parity(endpoint, f"models:/{NAME}@champion", raw, api_key=key)
    assert report.ok, str(report)


BAD_INPUTS = [
    (b"{not json", 400, None),
    (json.dumps({"rows": []}).encode(), 422, "instances"),
    (json.dumps({"instances": []}).encode(), 422, "instances"),
    (json.dumps({"instances": [1, 2]}).encode(), 422, "instances"),
    (json.dumps({"instances": [{"age": 30}]}).encode(), 422, None),  # missing columns
    (b"[" * 100_000 + b"]" * 100_000, 400, None),  # nesting deep enough to blow the parser's stack
]


def test_serve_bad_input_is_4xx_naming_field_value_rule(trained: TrainOutcome, dataset: Path, serve_clean: int) -> None:
    endpoint = _serve("churn", {"model_uri": f"models:/{NAME}@champion", "max_body_bytes": 300_000}, serve_clean)
    good = pq.read_table(dataset).slice(0, 1).drop_columns(["churned"]).to_pylist()[0]
    too_big = httpx.post(f"{endpoint}/predict", json={"instances": [good] * 5000})
    assert too_big.status_code == 413 and too_big.json()["error"]["rule"].startswith("request body at most")
    for body, status, field in BAD_INPUTS:
        resp = httpx.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == status, (body, resp.text)
        err = resp.json()["error"]
        assert set(err) == {"field", "row", "value", "rule"} and err["rule"]
        if field:
            assert err["field"] == field
    cases = [
        ({**good, "age": "old"}, "age"),
        ({**good, "plan": 7}, "plan"),
        ({**good, "tenure_months": None}, "tenure_months"),
    ]
    for row, field in cases:
        resp = httpx.post(f"{endpoint}/predict", json={"instances": [good, row]})
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["field"] == field and err["row"] == 1, err
    # NaN is not valid JSON for us, but Python's parser accepts it: still a 4xx, never a 500
    resp = httpx.post(
        f"{endpoint}/predict", content=b'{"instances": [{"age": NaN}]}', headers={"content-type": "application/json"}
    )
    assert 400 <= resp.status_code < 500
    # unseen categories are not errors
    resp = httpx.post(f"{endpoint}/predict", json={"instances": [{**good, "region": "atlantis"}]})
    assert resp.status_code == 200
    assert httpx.get(f"{endpoint}/healthz").status_code == 200


def test_replica_refuses_foreign_preprocessing_code(trained: TrainOutcome, tmp_path: Path, serve_clean: int) -> None:
    from ray import serve

    copy = tmp_path / "foreign"
    shutil.copytree(trained.model_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["code_fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="Deploying application foreign failed"):
        serve.run(build_predictor_app({"model_uri": str(copy)}), name="foreign", route_prefix="/foreign")
    status = serve.status().applications["foreign"]
    message = status.deployments["Predictor"].message
    assert "fingerprint mismatch" in message and "0000000000000000" in message, message


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_other_tasks_train_register_and_predict(ray_session: Any, tmp_path: Path, task: str) -> None:
    data = Path(generate_synthetic(tmp_path / f"{task}.parquet", SyntheticConfig(rows=2000, seed=3, task=task)))
    spec = synthetic_feature_spec(task)  # type: ignore[arg-type]
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"path": str(data)},
            "features": spec,
            "optimizer": {"lr": 1e-2},
            "training": {"epochs": 2, "batch_size": 128, "num_workers": 2},
            "registry": {"model_name": f"itest-{task}"},
        }
    )
    outcome = run_training(cfg, progress=lambda m: None)
    label = spec["label"]["name"]
    assert outcome.holdout_sample.num_rows < 4096  # so the sample is the whole holdout
    raw = outcome.holdout_sample.drop_columns([label])
    out = mlflow.pyfunc.load_model(f"models:/itest-{task}@champion").predict(raw.to_pandas())
    truth = outcome.holdout_sample[label].to_numpy()
    if task == "multiclass":
        assert set(out["prediction"]) <= {0, 1, 2}
        assert outcome.metrics["holdout_accuracy"] > 0.45  # 3 classes: chance is ~0.33
        assert np.mean(out["prediction"].to_numpy() == truth) == pytest.approx(outcome.metrics["holdout_accuracy"])
    else:
        rmse = float(np.sqrt(np.mean((out["prediction"].to_numpy() - truth) ** 2)))
        assert rmse == pytest.approx(outcome.metrics["holdout_rmse"], rel=1e-6)
        assert rmse < float(np.std(truth))  # better than predicting the mean


def test_every_artifact_file_is_verified_before_anything_runs(
    trained: TrainOutcome, capsys: Any, tmp_path: Path
) -> None:
    """MLflow runs the logged code file on load: a tampered code file or MLmodel is refused
    before it can run, as is a registered version without the manifest tag."""
    from runtime.cli import main
    from runtime.errors import ArtifactIntegrityError

    uri = f"models:/{NAME}/{trained.version}"
    verified = registry.verify(uri, tmp_path / "a")
    assert {"MLmodel", "_pyfunc_model.py", "requirements.txt"} <= set(verified.files)
    assert any(name.endswith("weights.safetensors") for name in verified.files)
    with pytest.raises(SystemExit) as ok:
        main(["models", "verify", uri])
    assert ok.value.code == 0 and "verified" in capsys.readouterr().out

    # tamper with the stored code file MLflow would import on load
    client = mlflow.MlflowClient()
    source = client.get_model_version(NAME, trained.version).source  # models:/m-<id>
    stored = Path(client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    code = stored / "_pyfunc_model.py"
    original = code.read_text()
    try:
        code.write_text(original + "\nimport os  # injected\n")
        with pytest.raises(ArtifactIntegrityError, match="_pyfunc_model.py"):
            registry.verify(uri, tmp_path / "b")
        with pytest.raises(ArtifactIntegrityError):
            registry.load_pyfunc(uri)  # MLflow never gets to run it
        with pytest.raises(SystemExit) as exit_info:
            main(["models", "verify", uri])
        assert exit_info.value.code == 2
    finally:
        code.write_text(original)

    # a version registered outside skewless (no manifest tag) is refused
    bare = mlflow.register_model(source, NAME)
    with pytest.raises(ArtifactIntegrityError, match="has no skewless.manifest_sha256 tag"):
        registry.load(f"models:/{NAME}/{bare.version}")
