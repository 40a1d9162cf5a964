"""``skewless reproduce``: re-run a registered model's training from its recorded lineage."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.config import TrainJobConfig
from runtime.errors import TrainingError
from runtime.training._driver import Progress, TrainOutcome, run_training


@dataclass(frozen=True)
class Reproduction:
    original: dict[str, float]
    outcome: TrainOutcome

    def differences(self) -> list[tuple[str, float, float, float]]:
        """(metric, original, reproduced, reproduced - original) for the holdout metrics."""
        return [
            (k, v, self.outcome.metrics[k], self.outcome.metrics[k] - v)
            for k, v in sorted(self.original.items())
            if k.startswith("holdout_") and k in self.outcome.metrics
        ]


def check_reproducible(tags: dict[str, str], data_path: str, data_format: str | None) -> None:
    """Refuse when the data or the preprocessing code differs from what the run recorded."""
    from runtime.data import dataset_fingerprint
    from runtime.preprocessing import code_fingerprint

    recorded = tags.get("skewless.dataset_sha256")
    actual = dataset_fingerprint(data_path, data_format)  # type: ignore[arg-type]
    if recorded != actual:
        raise TrainingError(
            f"cannot reproduce: the dataset at {data_path} has sha256 {actual[:16]}, the run recorded "
            f"{(recorded or '?')[:16]}; restore the original data (the recorded sha256 identifies it)"
        )
    recorded_code = tags.get("skewless.preprocessing_code_fingerprint")
    if recorded_code != code_fingerprint():
        raise TrainingError(
            f"cannot reproduce: the installed preprocessing code is {code_fingerprint()[:16]}, the run used "
            f"{(recorded_code or '?')[:16]}; check out git commit {tags.get('skewless.git_commit', '?')}"
        )


def reproduce(model_uri: str, progress: Progress = print) -> Reproduction:
    """Re-train from the lineage of ``model_uri``; registers a version but moves no alias."""
    from runtime.registry import configure_mlflow
    from runtime.registry._reproduce import model_lineage

    configure_mlflow()
    lineage = model_lineage(model_uri)
    config = dict(lineage.config)
    config["registry"] = {**config.get("registry", {}), "promote": False}
    config.get("training", {}).pop("run_name", None)  # a fresh Ray Train run, not a resume
    cfg = TrainJobConfig.model_validate(config)
    check_reproducible(lineage.tags, cfg.data.path, cfg.data.format)
    progress(f"reproducing run {lineage.run_id}: data and preprocessing code match the recorded lineage")
    outcome = run_training(
        cfg, progress=progress, extra_tags={"skewless.reproduces": lineage.run_id}, move_candidate=False
    )
    return Reproduction(lineage.metrics, outcome)
