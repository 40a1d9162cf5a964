"""Security by default: credentials redacted wherever they are printed or recorded, jobs ship an
allow-listed working_dir with a quoted entrypoint, diagnostics go to a private directory."""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from runtime.cluster import forwarded_env, job_entrypoint, stage_working_dir
from runtime.errors import DatasetNotFoundError
from runtime.memory import private_diagnostics_dir
from runtime.redact import MASK, has_credentials, redact, redact_obj

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"postgresql://mlflow:{SECRET}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        (f"https://{SECRET}@tracking.example.com", "https://***@tracking.example.com"),
        (f"s3://bucket/d.parquet?access_key=AKIA&secret_key={SECRET}&region=eu",
         "s3://bucket/d.parquet?access_key=***&secret_key=***&region=eu"),
        (f"https://acct.blob.core.windows.net/c/f.parquet?sv=2022&sig={SECRET}",
         "https://acct.blob.core.windows.net/c/f.parquet?sv=2022&sig=***"),
        (f"cannot reach http://u:{SECRET}@host:5000 (timed out)", "cannot reach http://***@host:5000 (timed out)"),
        ("sqlite:////home/me/.skewless/mlflow.db", "sqlite:////home/me/.skewless/mlflow.db"),
        ("gs://bucket/data?monkey=1", "gs://bucket/data?monkey=1"),
    ],
)  # fmt: skip
def test_redact_masks_userinfo_and_secret_query_values(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert SECRET not in redact(text)
    assert has_credentials(text) == (text != expected)


def test_redact_obj_walks_a_config() -> None:
    config = {"data": {"path": f"s3://k:{SECRET}@b/x"}, "n": 3, "list": [f"https://{SECRET}@h"]}
    clean = redact_obj(config)
    assert SECRET not in yaml.safe_dump(clean) and clean["n"] == 3
    assert clean["data"]["path"] == f"s3://{MASK}@b/x"


def test_dataset_errors_do_not_print_credentials(tmp_path: Path) -> None:
    from runtime.data import dataset_fingerprint

    with pytest.raises(DatasetNotFoundError) as info:
        dataset_fingerprint(f"file://user:{SECRET}@{tmp_path}/missing.parquet")
    assert SECRET not in str(info.value)


def test_tracked_run_records_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow params, tags and lineage/config.yaml of a run whose dataset URI carries credentials."""
    import mlflow
    import pyarrow as pa

    from runtime import registry
    from runtime.data import synthetic_feature_spec
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.tasks import Head, task_for
    from runtime.training import Fitted, Prepared, TrainJobConfig, tracked_run

    monkeypatch.setenv("SKEWLESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure_mlflow()
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/churn.parquet?token={SECRET}"
    spec_dict = synthetic_feature_spec()
    cfg = TrainJobConfig.model_validate(
        {"data": {"path": uri}, "features": spec_dict, "registry": {"model_name": "redacted"}}
    )
    spec = FeatureSpec.model_validate(spec_dict)
    table = pa.table(
        {
            "age": [30.0, 40.0], "income": [1.0, 2.0], "tenure_months": [1.0, 2.0], "support_calls": [0.0, 1.0],
            "plan": ["a", "b"], "region": ["r", "s"], "device": ["d", "e"], "churned": [0, 1],
        }
    )  # fmt: skip
    prep = fit(spec, table)
    task = task_for("binary")
    model_config = registry.model_json(cfg.model, prep, task)
    p = Prepared(
        cfg, spec, task, [*table.column_names], "0" * 64, {**cfg.model_dump(mode="json"), "features": spec_dict}
    )
    f = Fitted(prep, 2, 2, Head((0, 1)), model_config, table.drop_columns(["churned"]), table)
    with tracked_run(p, f) as run:
        run_id = run.run_id
    data = mlflow.MlflowClient().get_run(run_id).data
    recorded = yaml.safe_dump({"params": data.params, "tags": data.tags})
    recorded += mlflow.artifacts.load_text(f"runs:/{run_id}/lineage/config.yaml")
    assert SECRET not in recorded and "AKIAEXAMPLE" not in recorded
    assert data.tags["skewless.dataset_path"] == f"s3://{MASK}@bucket/churn.parquet?token={MASK}"


def test_a_job_ships_an_allow_listed_working_dir(tmp_path: Path) -> None:
    root = tmp_path / "project"
    files = {
        "pyproject.toml": "[project]\n",
        "jobs/train.py": "print()\n",
        "jobs/configs/my job; rm -rf.yaml": "data: {}\n",
        "jobs/configs/features.yaml": "features: []\n",
        "serve_apps/predictor.py": "app = None\n",
        "jobs/.env": "TOKEN=x\n",
        "jobs/configs/id_rsa": "key\n",
        "jobs/configs/service.key": "key\n",
        ".env": "AWS_SECRET_ACCESS_KEY=x\n",
        "data/huge.parquet": "PAR1",
        "jobs/data.parquet": "PAR1",
        "venv2/lib/site.py": "x = 1\n",
        "notes/secret-plan.md": "no\n",
        "configs/outside.yaml": "data: {}\n",  # outside the allowed trees: shipped only when referenced
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    staged = tmp_path / "staged"
    staged.mkdir()
    shipped = stage_working_dir(root, [root / "configs/outside.yaml"], staged)
    assert sorted(shipped) == [
        "configs/outside.yaml",
        "jobs/configs/features.yaml",
        "jobs/configs/my job; rm -rf.yaml",
        "jobs/train.py",
        "pyproject.toml",
        "serve_apps/predictor.py",
    ]
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == sorted(shipped)
    with pytest.raises(Exception, match="must live inside the project"):
        stage_working_dir(root, [tmp_path / "elsewhere.yaml"], tmp_path / "staged2")


def test_the_entrypoint_is_shell_quoted() -> None:
    entry = job_entrypoint("jobs.train", "jobs/configs/my job; rm -rf ~.yaml")
    assert shlex.split(entry) == ["python", "-m", "jobs.train", "--config", "jobs/configs/my job; rm -rf ~.yaml"]


def test_a_tracking_uri_with_credentials_is_not_forwarded_and_the_user_is_told() -> None:
    env, notes = forwarded_env(
        {"SKEWLESS_HOME": "/srv/home", "MLFLOW_TRACKING_URI": f"https://ml:{SECRET}@tracking.example.com"}
    )
    assert env == {"SKEWLESS_HOME": "/srv/home"}
    assert len(notes) == 1 and "MLFLOW_TRACKING_URI" in notes[0] and "not forwarded" in notes[0]
    assert SECRET not in notes[0]
    env, notes = forwarded_env({"MLFLOW_TRACKING_URI": "http://tracking:5000"})
    assert env == {"MLFLOW_TRACKING_URI": "http://tracking:5000"} and notes == []


def test_diagnostics_go_to_a_private_per_user_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = private_diagnostics_dir()
    assert path == tmp_path / f"skewless-{os.getuid()}" / "diagnostics"
    for d in (path, path.parent):
        info = os.lstat(d)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    os.chmod(path.parent, 0o777)  # loosened by someone: tightened again
    assert stat.S_IMODE(os.lstat(private_diagnostics_dir().parent).st_mode) == 0o700
    # a symlink planted where the directory should be is not followed
    planted = tmp_path / "planted"
    planted.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(planted))
    (planted / f"skewless-{os.getuid()}").symlink_to(tmp_path / "attacker", target_is_directory=True)
    (tmp_path / "attacker").mkdir()
    other = private_diagnostics_dir()
    assert not str(other).startswith(str(tmp_path / "attacker")) and other.name.startswith("skewless-diagnostics-")
    assert stat.S_IMODE(os.lstat(other).st_mode) == 0o700


@pytest.mark.parametrize(
    "uri",
    [
        f"postgresql://mlflow:p@{SECRET}@db:5432/mlflow",  # '@' in the password
        f"postgresql://mlflow:p/{SECRET}@db:5432/mlflow",  # '/' in the password
    ],
)
def test_the_whole_user_info_is_masked(uri: str) -> None:
    assert redact(uri) == "postgresql://***@db:5432/mlflow"


def test_config_errors_never_echo_a_secret() -> None:
    from runtime.config import ServeAppArgs, load_config
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(ServeAppArgs, {"model_uri": f"https://u:{SECRET}@host/m"})
    assert SECRET not in str(info.value) and "model_uri" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(ServeAppArgs, {"model_uri": "models:/m@champion", "api_key": 12})
    assert "api_key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(ServeAppArgs, {"model_uri": "models:/m@champion", "api_key": SECRET, "max_instances": 0})
    assert SECRET not in str(info.value)


def test_links_are_not_followed_and_a_referenced_secret_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "jobs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\n")
    creds = tmp_path / "creds.yaml"
    creds.write_text(f"password: {SECRET}\n")
    (root / "jobs" / "settings.yaml").symlink_to(creds)
    staged = tmp_path / "staged"
    staged.mkdir()
    assert stage_working_dir(root, [], staged) == ["pyproject.toml"]
    (root / "jobs" / ".env").write_text("X=1\n")
    with pytest.raises(Exception, match="looks like a secret"):
        stage_working_dir(root, [root / "jobs" / ".env"], tmp_path / "staged2")
