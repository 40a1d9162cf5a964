"""Lineage of a registered model, and re-running its training from that lineage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from runtime.errors import RegistryError
from runtime.registry._registry import ModelRef, resolve


@dataclass(frozen=True)
class Lineage:
    model: ModelRef
    aliases: list[str]
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]
    config: dict[str, Any] = field(repr=False)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for display, most important first."""
        t = self.tags
        out = [
            (
                "model",
                f"models:/{self.model.name}/{self.model.version}"
                + (f" (@{', @'.join(self.aliases)})" if self.aliases else ""),
            ),
            ("run", self.run_id),
            (
                "dataset",
                f"{t.get('skewless.dataset_path', '?')} ({t.get('skewless.train_rows', '?')} training rows, {t.get('skewless.holdout_rows', '?')} holdout)",
            ),
            ("dataset sha256", t.get("skewless.dataset_sha256", "?")),
            ("preprocessing", t.get("skewless.preprocessing_fingerprint", "?")),
            ("preprocessing code", t.get("skewless.preprocessing_code_fingerprint", "?")),
            ("git commit", f"{t.get('skewless.git_commit', '?')} (dirty: {t.get('skewless.git_dirty', '?')})"),
            ("environment sha256", t.get("skewless.environment_sha256", "?")),
            ("seed", t.get("skewless.seed", "?")),
            (
                "hardware",
                ", ".join(
                    f"{k.removeprefix('skewless.hardware.')}={v}"
                    for k, v in sorted(t.items())
                    if k.startswith("skewless.hardware.")
                ),
            ),
        ]
        out += [(k, f"{v:.6g}") for k, v in sorted(self.metrics.items()) if k.startswith("holdout_")]
        return out


def model_lineage(model_uri: str) -> Lineage:
    """Everything recorded about the run that produced ``model_uri``."""
    import mlflow

    ref = resolve(model_uri)
    if not ref.run_id:
        raise RegistryError(f"{model_uri}: the registered version has no source run; cannot show its lineage")
    client = mlflow.MlflowClient()
    run = client.get_run(ref.run_id)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{ref.run_id}/lineage/config.yaml")
    except Exception as exc:  # MLflow raises several types for a missing artifact
        raise RegistryError(f"{model_uri}: run {ref.run_id} has no lineage/config.yaml ({exc})") from exc
    aliases = list(client.get_model_version(ref.name, ref.version).aliases or [])
    return Lineage(ref, aliases, ref.run_id, dict(run.data.tags), dict(run.data.metrics), yaml.safe_load(text))
