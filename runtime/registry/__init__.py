"""MLflow: the embedded store, lineage, model packaging, registration, aliases and loading."""

from runtime.registry._lineage import GitInfo, environment_lock, git_info, hardware
from runtime.registry._package import (
    MANIFEST,
    LoadedModel,
    Predictions,
    load_model_dir,
    sha256_file,
    verify_model_dir,
    write_model_dir,
)
from runtime.registry._registry import (
    CANDIDATE,
    CHAMPION,
    MANIFEST_TAG,
    ModelRef,
    current_champion,
    download,
    load,
    log_pyfunc_model,
    register,
    resolve,
    set_alias,
)
from runtime.registry._store import configure_mlflow, ensure_experiment, skewless_home, tracking_uri

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "MANIFEST",
    "MANIFEST_TAG",
    "GitInfo",
    "LoadedModel",
    "ModelRef",
    "Predictions",
    "configure_mlflow",
    "current_champion",
    "download",
    "ensure_experiment",
    "environment_lock",
    "git_info",
    "hardware",
    "load",
    "load_model_dir",
    "log_pyfunc_model",
    "register",
    "resolve",
    "set_alias",
    "sha256_file",
    "skewless_home",
    "tracking_uri",
    "verify_model_dir",
    "write_model_dir",
]
