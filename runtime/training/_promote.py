"""Registration and the champion decision: a new version becomes ``candidate``, and ``champion``
only when it beats the current champion on the same holdout rows (the task's primary metric)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from runtime import registry
from runtime.errors import (
    AliasConflictError,
    ArtifactIntegrityError,
    FingerprintMismatchError,
    RegistryError,
    SkewlessError,
)
from runtime.registry import Tag
from runtime.tasks import Metric, task_for
from runtime.training._config import TrainJobConfig
from runtime.training._evaluate import HoldoutStream, evaluate

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_name: str
    version: str
    metrics: dict[str, float]
    promoted: bool
    decision: str
    model_dir: Path
    # The first holdout rows (all of them up to HOLDOUT_SAMPLE_ROWS), for parity checks.
    holdout_sample: pa.Table = field(repr=False)


def register_run(
    run_id: str,
    cfg: TrainJobConfig,
    metrics: dict[str, float],
    holdout: HoldoutStream,
    progress: Progress,
    model_dir: Path | None = None,
    move_aliases: bool = True,
) -> TrainOutcome:
    """Register the model a run logged, its version tagged with the run's lineage; alias
    ``candidate``, and ``champion`` when it beats the incumbent on ``holdout`` (with
    ``move_aliases=False``, as ``reproduce`` does, no alias moves)."""
    import mlflow

    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    version_tags = Tag.for_version(tags)
    name = cfg.registry.model_name
    ref = registry.register(tags[Tag.MODEL_URI], name, tags=version_tags)
    if move_aliases:
        registry.set_alias(name, registry.CANDIDATE, ref.version)
        promoted, decision = _maybe_promote(
            cfg, ref, metrics, holdout, task_for(tags[Tag.TASK]).primary_metric(), progress
        )
    else:
        promoted, decision = False, "registered without moving an alias"
    client.set_tag(run_id, Tag.PROMOTION, decision)
    progress(f"registered models:/{name}/{ref.version} ({decision})")
    if model_dir is None:
        _, model_dir = registry.download(ref.uri)
    return TrainOutcome(run_id, name, ref.version, metrics, promoted, decision, model_dir, holdout.sample)


def _maybe_promote(
    cfg: TrainJobConfig,
    ref: Any,
    metrics: dict[str, float],
    holdout: Iterable[pa.Table],
    metric: Metric,
    progress: Progress,
) -> tuple[bool, str]:
    """Move ``champion`` to the new version when it beats the current one on this holdout, and
    only if ``champion`` still points where it did when the decision was made (a concurrent
    promotion or a rollback meanwhile wins over this run)."""
    name = cfg.registry.model_name
    champion = registry.current_champion(name)
    new = metrics[metric.name]
    if champion is None:
        decision = f"champion: first version ({metric.name}={new:.4f})"
    else:
        basis = "on this holdout"
        try:
            _, incumbent_model = registry.load(champion.uri)
            old = evaluate(incumbent_model, holdout)[metric.name]
        except (FingerprintMismatchError, ArtifactIntegrityError, RegistryError) as exc:
            # It cannot run here (other inference code, a model format from before, or files
            # that fail verification): compare with the metric recorded when it was trained,
            # and say why. A champion that cannot be verified must not block every successor.
            why = _why_not_evaluated(exc)
            if isinstance(exc, ArtifactIntegrityError):
                progress(
                    f"WARNING: champion v{champion.version} fails verification ({exc}); comparing with its recorded {metric.name}"
                )
            recorded = _recorded_metric(champion, metric.name)
            if recorded is None:
                return (
                    False,
                    f"kept champion v{champion.version}: it cannot be evaluated here ({why}) nor has a recorded "
                    f"{metric.name}",
                )
            old, basis = recorded, f"against its recorded {metric.name}: {why}"
        except SkewlessError as exc:
            progress(f"cannot evaluate champion v{champion.version} on this holdout ({exc}); keeping it")
            return False, f"kept champion v{champion.version}: it could not be evaluated ({exc})"
        if not metric.better(new, old):
            return False, f"kept champion v{champion.version} ({metric.name} {old:.4f} vs {new:.4f}, {basis})"
        decision = f"champion: beats v{champion.version} ({metric.name} {new:.4f} vs {old:.4f}, {basis})"
    if not cfg.registry.promote:
        return False, decision.replace("champion:", "would be champion (promote: false):")
    expected = champion.version if champion is not None else None
    try:
        registry.move_alias(name, registry.CHAMPION, ref.version, expected=expected, reason=decision)
    except AliasConflictError as exc:
        return False, f"kept champion: {exc}"
    return True, decision


def _why_not_evaluated(exc: Exception) -> str:
    if isinstance(exc, FingerprintMismatchError):
        return f"its {exc.what} {exc.expected[:12]} differs from {exc.actual[:12]}"
    if isinstance(exc, ArtifactIntegrityError):
        return f"its artifacts fail verification: {exc}"
    return f"it cannot be loaded here: {exc}"


def _recorded_metric(ref: Any, name: str) -> float | None:
    import mlflow

    if not ref.run_id:
        return None
    value = mlflow.MlflowClient().get_run(ref.run_id).data.metrics.get(name)
    return None if value is None else float(value)
