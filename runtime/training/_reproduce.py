"""``skewless reproduce``: re-run a registered model's training from its recorded lineage, and say
whether the result is the same model, bit for bit.

The run is refused up front when the data or the inference code differ from what the lineage
recorded. Afterwards the weights' sha256 and every holdout metric are compared with the
original's: :attr:`Reproduction.exact` is true only when all of them are equal. Runs that
trained from memory (``skewless.ingest = memory``) depend on the data, the seed and the
number of workers only, so they reproduce exactly on a cluster of any other shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime import registry
from runtime.config import validate
from runtime.errors import ConfigError, TrainingError
from runtime.redact import MASK, redact
from runtime.registry import Tag
from runtime.training._config import TrainJobConfig
from runtime.training._driver import Progress, fit_preprocessing, package, prepare, tracked_run, train
from runtime.training._promote import TrainOutcome, register_run


@dataclass(frozen=True)
class Reproduction:
    original: dict[str, float]
    outcome: TrainOutcome
    weights_equal: bool
    original_ingest: str | None

    def differences(self) -> list[tuple[str, float, float, float]]:
        """(metric, original, reproduced, reproduced - original) for the holdout metrics."""
        return [
            (k, v, self.outcome.metrics[k], self.outcome.metrics[k] - v)
            for k, v in sorted(self.original.items())
            if k.startswith("holdout_") and k in self.outcome.metrics
        ]

    @property
    def exact(self) -> bool:
        """The same weights, bit for bit, and every holdout metric equal."""
        return self.weights_equal and all(diff == 0 for _, _, _, diff in self.differences())

    def mismatches(self) -> list[str]:
        """What differs, in words (empty when :attr:`exact`)."""
        out = [f"{name} {old:.6g} -> {new:.6g}" for name, old, new, diff in self.differences() if diff != 0]
        if not self.weights_equal:
            out.append("the weights differ")
        return out


def check_reproducible(tags: dict[str, str], data_path: str, data_format: str | None) -> None:
    """Refuse when the data or the inference code differs from what the run recorded."""
    from runtime.data import dataset_fingerprint

    recorded = tags.get(Tag.DATASET_SHA256)
    actual = dataset_fingerprint(data_path, data_format)  # type: ignore[arg-type]
    if recorded != actual:
        raise TrainingError(
            f"cannot reproduce: the dataset at {redact(data_path)} has sha256 {actual[:16]}, the run recorded "
            f"{(recorded or '?')[:16]}; restore the original data (the recorded sha256 identifies it)"
        )


def _weights_sha(model_dir: Path) -> str:
    return str(json.loads((model_dir / registry.MANIFEST).read_text())["files"]["weights.safetensors"])


def reproduce(model_uri: str, progress: Progress = print, data_path: str | None = None) -> Reproduction:
    """Re-train from the lineage of ``model_uri``; registers a version but moves no alias.

    ``data_path`` replaces the recorded dataset path (which is recorded redacted when it
    carried credentials); the data's sha256 must still match.
    """
    registry.configure_mlflow()
    lineage = registry.model_lineage(model_uri)
    config = dict(lineage.config)
    data = dict(config.get("data", {}))
    if data_path is not None:
        data["path"] = data_path
    elif MASK in str(data.get("path", "")):
        raise ConfigError(
            f"the recorded dataset path {data.get('path')!r} carried credentials and was recorded redacted; "
            "pass the path with --data"
        )
    if lineage.record.ingest in ("memory", "stream"):
        data["ingest"] = lineage.record.ingest  # how the original was fed, whatever this cluster's size says
    config["data"] = data
    config["registry"] = {**config.get("registry", {}), "promote": False}
    config["training"] = {k: v for k, v in config.get("training", {}).items() if k != "run_name"}  # a fresh run
    cfg = validate(TrainJobConfig, config, f"lineage/config.yaml of run {lineage.run_id}")
    check_reproducible(lineage.tags, cfg.data.path, cfg.data.format)
    p = prepare(cfg, progress=progress)
    f = fit_preprocessing(p, progress)
    recorded_code = lineage.record.fingerprints.get("code")
    actual_code = registry.inference_code_fingerprint(f.model_config)
    if recorded_code != actual_code:
        raise TrainingError(
            f"cannot reproduce: the installed inference code is {actual_code[:16]}, the run used "
            f"{(recorded_code or '?')[:16]}; check out git commit {lineage.record.git.commit}"
        )
    progress(f"reproducing run {lineage.run_id}: data and inference code match the recorded lineage")
    with tracked_run(p, f, {Tag.REPRODUCES: lineage.run_id}) as run:
        trained = train(p, f, run, progress)
        packaged = package(p, f, trained, run, progress)
        outcome = register_run(
            run.run_id, cfg, packaged.metrics, packaged.holdout, progress, packaged.model_dir, move_aliases=False
        )
    _, original_dir = registry.download(lineage.model.uri)
    same = _weights_sha(original_dir) == _weights_sha(outcome.model_dir)
    return Reproduction(lineage.metrics, outcome, same, lineage.record.ingest)
