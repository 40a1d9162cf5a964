"""Where MLflow data lives: one state directory shared by jobs, Serve replicas and the CLI.

The default is an embedded store: a SQLite tracking database and an artifact folder under
``$SKEWLESS_HOME`` (default ``~/.skewless``), not the current directory, because a job
submitted with a ``working_dir`` runs in a copy of it and Serve replicas run elsewhere.
``MLFLOW_TRACKING_URI`` (a tracking server on a real cluster) overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SKEWLESS_HOME"


def skewless_home() -> Path:
    """The state directory, created on first use."""
    home = Path(os.path.expanduser(os.environ.get(HOME_ENV, "~/.skewless"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{skewless_home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Artifact location for experiments skewless creates in the embedded store."""
    return (skewless_home() / "mlartifacts").as_uri()


def configure_mlflow() -> str:
    """Point this process's MLflow client at the store; returns the tracking URI.

    Also exported to the environment so that child processes (Ray workers, replicas)
    started from here resolve the same store.
    """
    import mlflow

    uri = tracking_uri()
    os.environ.setdefault(HOME_ENV, str(skewless_home()))
    mlflow.set_tracking_uri(uri)  # MLflow also exports MLFLOW_TRACKING_URI to children
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it with an artifact root inside the state dir."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = artifact_root() if tracking_uri().startswith("sqlite:") else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)
