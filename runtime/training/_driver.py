"""The training driver: data -> split -> fit preprocessing -> Ray Train -> MLflow registry.

Runs wherever ``python -m jobs.train`` runs: on a laptop it starts (or joins) a local Ray
instance; under ``ray job submit`` it joins the cluster the job was submitted to.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from runtime.cluster import check_placeable, connect, cpus_for
from runtime.config import TrainJobConfig
from runtime.data import dataset_fingerprint
from runtime.errors import ConfigError, FingerprintMismatchError, SkewlessError, TrainingError
from runtime.models import mlp_config
from runtime.preprocessing import FeatureSpec, FittedPreprocessor, fit
from runtime.training._events import Callback
from runtime.training._ingest import (
    HOLDOUT_SAMPLE_ROWS,
    driver_batches,
    features_stage,
    fit_pass,
    ingest_options,
    open_split,
)

logger = logging.getLogger(__name__)
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


class HoldoutStream:
    """The holdout split, iterable any number of times (each pass streams it from the files).

    Counts its rows and keeps its first ``HOLDOUT_SAMPLE_ROWS`` rows on the first pass.
    """

    def __init__(self, dataset: Callable[[], Any], uri: str) -> None:
        self.dataset, self.uri = dataset, uri
        self.rows = 0
        self._head: list[pa.Table] = []
        self._passes = 0

    def __iter__(self) -> Iterator[pa.Table]:
        first = self._passes == 0
        self._passes += 1
        for batch in driver_batches(self.dataset(), self.uri):
            if first:
                kept = sum(t.num_rows for t in self._head)
                if kept < HOLDOUT_SAMPLE_ROWS:
                    self._head.append(batch.slice(0, HOLDOUT_SAMPLE_ROWS - kept))
                self.rows += batch.num_rows
            yield batch
        if first and self.rows == 0:
            raise ConfigError(
                f"data.holdout_fraction: no holdout rows in {self.uri!r}; raise holdout_fraction or add data"
            )

    @property
    def sample(self) -> pa.Table:
        head = self._head or list(driver_batches(self.dataset().limit(HOLDOUT_SAMPLE_ROWS), self.uri))
        if not head:
            raise ConfigError(f"data.holdout_fraction: no holdout rows in {self.uri!r}; raise it or add data")
        return pa.concat_tables(head)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def run_training(
    cfg: TrainJobConfig,
    config_dir: Path | None = None,
    progress: Progress = lambda msg: logger.info(msg),
    callbacks: list[Callback] | None = None,
    storage_path: str | None = None,
    extra_tags: dict[str, str] | None = None,
    register: bool = True,
    run_callbacks: list[Any] | None = None,
    move_candidate: bool = True,
) -> TrainOutcome:
    """Train, evaluate, package, log, register and (maybe) promote. Returns the outcome.

    ``callbacks`` are added to the worker loop's (they are pickled to the workers);
    ``run_callbacks`` are Ray Train ``RunConfig`` callbacks (Tune's report callback).
    With ``register=False`` the packaged model is logged to the run (its URI in the tag
    ``skewless.model_uri``) but not registered: Tune registers only its best trial.
    """
    import mlflow
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runtime import registry
    from runtime.training._checkpoint import WEIGHTS as CKPT_WEIGHTS
    from runtime.training._evaluate import evaluate
    from runtime.training._loop import train_loop_per_worker

    t0 = time.monotonic()
    spec_dict = cfg.feature_spec_dict(config_dir)
    spec = FeatureSpec.model_validate(spec_dict)
    if spec.label is None:
        raise ConfigError(
            "the feature spec has no `label:` section; training needs one, e.g. label: {name: y, task: binary}"
        )
    # The resolved config is self-contained (the spec inline), so `reproduce` needs no files.
    resolved = {**cfg.model_dump(mode="json"), "features": spec_dict}
    progress(f"streaming {cfg.data.path} through Ray Data")
    data_fp = dataset_fingerprint(cfg.data.path, cfg.data.format)
    tracking = registry.configure_mlflow()
    connect(min_cpus=cpus_for(cfg.training.num_workers, cfg.training.cpus_per_worker))
    check_placeable(cfg.training, ray.cluster_resources())
    split_columns = [f.name for f in spec.features] + [spec.label.name]

    def datasets() -> tuple[Any, Any]:
        return open_split(cfg.data.path, cfg.data.format, split_columns, cfg.data.holdout_fraction, cfg.training.seed)

    fitted = fit_pass(
        datasets()[0], split_columns, cfg.training.seed, cfg.data.fit_sample_rows, cfg.data.path, progress
    )
    exact = fitted.sample.num_rows == fitted.train_rows
    progress(
        f"{fitted.train_rows:,} training rows (dataset sha256 {data_fp[:12]}); preprocessing fit on "
        + ("all of them" if exact else f"a uniform sample of {fitted.sample.num_rows:,}")
    )
    prep: FittedPreprocessor = fit(spec, fitted.sample)
    task = spec.label.task
    target_scale = (0.0, 1.0)
    if task == "regression":
        y = prep.transform_label(fitted.sample).astype(np.float64)
        target_scale = (float(y.mean()), float(y.std() or 1.0))
    model_config = mlp_config(prep, task, cfg.model.hidden, cfg.model.dropout, cfg.model.activation, target_scale)

    name = cfg.registry.model_name
    experiment_id = registry.ensure_experiment(cfg.registry.experiment or name)
    git = registry.git_info()
    env_text, env_hash = registry.environment_lock()

    with mlflow.start_run(experiment_id=experiment_id) as run:
        run_id = run.info.run_id
        mlflow.log_params(_flatten("", cfg.model_dump(exclude={"features"}), {}))
        lineage = {
            "skewless.dataset_path": cfg.data.path,
            "skewless.dataset_sha256": data_fp,
            "skewless.train_rows": str(fitted.train_rows),
            "skewless.preprocessing_fit_rows": str(fitted.sample.num_rows),
            "skewless.preprocessing_fingerprint": prep.fingerprint,
            "skewless.preprocessing_code_fingerprint": prep.code_fingerprint,
            "skewless.environment_sha256": env_hash,
            "skewless.seed": str(cfg.training.seed),
            "skewless.task": task,
            **git.as_tags(),
            **{f"skewless.hardware.{k}": v for k, v in registry.hardware().items()},
        }
        mlflow.set_tags({**lineage, **(extra_tags or {})})
        mlflow.log_text(env_text, "lineage/environment.txt")
        mlflow.log_text(yaml.safe_dump(resolved, sort_keys=False), "lineage/config.yaml")
        mlflow.log_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "lineage/feature_spec.yaml")

        run_name = cfg.training.run_name or f"{name}-{run_id[:12]}"
        storage = storage_path or str(registry.skewless_home() / "ray_results")
        # The watchdog writes where it runs: the run's storage when it is a local path.
        host_diag = (
            f"{storage}/{run_name}/diagnostics/host-memory"
            if "://" not in storage
            else str(registry.skewless_home() / "runs" / run_id / "host-memory")
        )
        progress(f"training on {cfg.training.num_workers} Ray Train worker(s), {cfg.training.epochs} epoch(s)")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "seed": cfg.training.seed,
                "task": task,
                "epochs": cfg.training.epochs,
                "batch_size": cfg.training.batch_size,
                "optimizer": cfg.optimizer.model_dump(),
                "model": model_config,
                "preprocessor": prep.to_json(),
                "target_scale": target_scale,
                "train_rows": fitted.train_rows,
                "micro_batch_size": cfg.training.micro_batch_size,
                "precision": cfg.training.precision,
                "lr_schedule": cfg.training.lr_schedule,
                "checkpoint_every_steps": cfg.training.checkpoint_every_steps,
                "callbacks": list(callbacks or []),
                "memory": {
                    **cfg.memory.model_dump(exclude={"watchdog"}),
                    "oom_guard": cfg.memory.oom_guard,
                    "diagnostics_dir": f"{storage}/{run_name}/diagnostics",
                    "report_dir": str(registry.skewless_home() / "runs" / run_id / "memory"),
                    "watchdog_run": run_id[:12] if cfg.memory.watchdog.enabled else None,
                    "host_diagnostics_dir": host_diag,
                },
                "mlflow_run_id": run_id,
                "tracking_uri": tracking,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.training.num_workers,
                use_gpu=cfg.training.use_gpu,
                resources_per_worker={"CPU": cfg.training.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.training.max_failures),
                callbacks=run_callbacks,
            ),
            datasets={name: features_stage(ds, prep) for name, ds in zip(("train", "valid"), datasets(), strict=True)},
            dataset_config=DataConfig(execution_options=ingest_options()),
        )
        watchdogs = _start_watchdogs(cfg, run_id[:12], host_diag)
        incidents: list[dict[str, Any]] = []
        try:
            result = trainer.fit()
        except SkewlessError:
            raise
        except Exception as exc:
            incidents = _stop_watchdogs(watchdogs, run_id, host_diag)
            watchdogs = []
            if incidents:
                raise TrainingError(
                    f"training run {run_id} failed on host memory: "
                    + "; ".join(i["summary"] for i in incidents)
                    + f". Diagnostics (stack and allocation dumps, REPORT.md): {host_diag}. Ray reported: {exc}"
                ) from exc
            raise TrainingError(f"training run {run_id} failed: {exc}") from exc
        finally:
            incidents = incidents or _stop_watchdogs(watchdogs, run_id, host_diag)
        if incidents:  # workers were replaced (max_failures) and the run went on: say so
            progress("host memory incidents during the run: " + "; ".join(i["summary"] for i in incidents))
        if result.checkpoint is None:
            raise TrainingError(f"training run {run_id} ended without a checkpoint")
        progress(
            f"trained in {time.monotonic() - t0:.1f}s; last epoch: "
            + ", ".join(f"{k}={v:.4f}" for k, v in (result.metrics or {}).items() if isinstance(v, float))
        )

        from safetensors.torch import load_file

        with result.checkpoint.as_directory() as d:
            state = load_file(str(Path(d) / CKPT_WEIGHTS))
        # Kept beside the store (not in /tmp): MLflow holds the logged copy, this one is the run's.
        model_dir = registry.skewless_home() / "runs" / run_id / "model"
        registry.write_model_dir(model_dir, state, model_config, prep)
        candidate = registry.load_model_dir(model_dir)
        holdout = HoldoutStream(lambda: datasets()[1], cfg.data.path)
        metrics = evaluate(candidate, holdout)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("skewless.holdout_rows", str(holdout.rows))
        progress("holdout: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

        model_uri = registry.log_pyfunc_model(
            model_dir, prep.records_to_table(fitted.sample.slice(0, 3).to_pylist()), pip_requirements=_requirements()
        )
        manifest_sha = registry.sha256_file(model_dir / registry.MANIFEST)
        mlflow.set_tags({"skewless.model_uri": model_uri, registry.MANIFEST_TAG: manifest_sha})
        if not register:
            return TrainOutcome(run_id, name, "", metrics, False, "not registered", model_dir, holdout.sample)
        outcome = register_run_model(run_id, cfg, metrics, holdout, progress, model_dir, move_candidate)
    return outcome


def register_run_model(
    run_id: str,
    cfg: TrainJobConfig,
    metrics: dict[str, float],
    holdout: HoldoutStream,
    progress: Progress,
    model_dir: Path | None = None,
    move_candidate: bool = True,
) -> TrainOutcome:
    """Register the model a run logged: version tagged with the run's lineage, alias
    ``candidate``, and ``champion`` when it beats the incumbent on ``holdout``."""
    import mlflow

    from runtime import registry
    from runtime.training._evaluate import primary_metric

    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    version_tags = {k: v for k, v in tags.items() if k.startswith("skewless.") and k != "skewless.dataset_path"}
    name = cfg.registry.model_name
    ref = registry.register(tags["skewless.model_uri"], name, tags=version_tags)
    if move_candidate:
        registry.set_alias(name, registry.CANDIDATE, ref.version)
    promoted, decision = _maybe_promote(cfg, ref, metrics, holdout, primary_metric(tags["skewless.task"]), progress)
    client.set_tag(run_id, "skewless.promotion", decision)
    progress(f"registered models:/{name}/{ref.version} ({decision})")
    if model_dir is None:
        _, model_dir = registry.download(ref.uri)
    return TrainOutcome(run_id, name, ref.version, metrics, promoted, decision, model_dir, holdout.sample)


def _maybe_promote(
    cfg: TrainJobConfig,
    ref: Any,
    metrics: dict[str, float],
    holdout: Iterable[pa.Table],
    metric: Any,
    progress: Progress,
) -> tuple[bool, str]:
    """Move ``champion`` to the new version when it beats the current one on this holdout."""
    from runtime import registry
    from runtime.training._evaluate import evaluate

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
        except FingerprintMismatchError as exc:
            # Evaluating it here would run its fitted state through other preprocessing code:
            # compare with the metric recorded when it was trained instead, and say so.
            recorded = _recorded_metric(champion, metric.name)
            if recorded is None:
                return (
                    False,
                    f"kept champion v{champion.version}: it cannot be evaluated here ({exc}) nor has a recorded {metric.name}",
                )
            old, basis = (
                recorded,
                f"against its recorded {metric.name} (its preprocessing code {exc.expected[:12]} differs from {exc.actual[:12]})",
            )
        except SkewlessError as exc:
            progress(f"cannot evaluate champion v{champion.version} on this holdout ({exc}); keeping it")
            return False, f"kept champion v{champion.version}: it could not be evaluated ({exc})"
        if not metric.better(new, old):
            return False, f"kept champion v{champion.version} ({metric.name} {old:.4f} vs {new:.4f}, {basis})"
        decision = f"champion: beats v{champion.version} ({metric.name} {new:.4f} vs {old:.4f}, {basis})"
    if not cfg.registry.promote:
        return False, decision.replace("champion:", "would be champion (promote: false):")
    registry.set_alias(name, registry.CHAMPION, ref.version)
    return True, decision


def _start_watchdogs(cfg: TrainJobConfig, run: str, diagnostics_dir: str) -> list[Any]:
    if not cfg.memory.watchdog.enabled:
        return []
    from runtime.gpu._watchdog import start_watchdogs

    w = cfg.memory.watchdog
    return start_watchdogs(
        run,
        diagnostics_dir,
        soft_fraction=w.soft_fraction,
        poll_interval_s=w.poll_interval_s,
        memory_limit_bytes=w.memory_limit_bytes,
        cgroup_name=f"skewless-{run}",
    )


def _stop_watchdogs(watchdogs: list[Any], run_id: str, diagnostics_dir: str) -> list[dict[str, Any]]:
    if not watchdogs:
        return []
    import mlflow

    from runtime.gpu._watchdog import stop_watchdogs

    incidents = stop_watchdogs(watchdogs)
    if incidents:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "skewless.host_memory_incidents", "; ".join(i["summary"] for i in incidents)[:5000])
        if Path(diagnostics_dir).is_dir():
            client.log_artifacts(run_id, diagnostics_dir, "diagnostics/host-memory")
    return incidents


def _recorded_metric(ref: Any, name: str) -> float | None:
    import mlflow

    if not ref.run_id:
        return None
    value = mlflow.MlflowClient().get_run(ref.run_id).data.metrics.get(name)
    return None if value is None else float(value)


def _requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("skewless", "torch", "pyarrow", "numpy", "safetensors", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs
