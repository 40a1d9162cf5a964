"""The training driver, as steps: prepare -> fit preprocessing -> train -> package -> evaluate
-> register.

:func:`run_training` composes them for ``python -m jobs.train``; Tune (each trial: all but
register, then the best trial registered) and ``reproduce`` (all of them, moving no alias)
compose them their own way. Runs wherever the job runs: on a laptop it starts (or joins) a
local Ray instance; under ``ray job submit`` it joins the cluster the job was submitted to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from runtime import registry
from runtime.connect import check_placeable, connect, cpus_for, verbose_requested
from runtime.data import dataset_fingerprint
from runtime.errors import ConfigError, TrainingError
from runtime.preprocessing import FeatureSpec, FittedPreprocessor, fit
from runtime.redact import redact, redact_obj
from runtime.registry import LineageRecord, RunLogger, Tag
from runtime.tasks import Head, Task, task_for
from runtime.training._config import TrainJobConfig
from runtime.training._evaluate import HoldoutStream, evaluate, summary
from runtime.training._ingest import (
    IngestPlan,
    InMemoryData,
    driver_batches,
    features_stage,
    fit_pass,
    ingest_options,
    materialize,
    open_split,
    plan_ingest,
)
from runtime.training._launch import RunPlaces, fit_watched, scaling, worker_memory
from runtime.training._logs import engine_logs, job_log_path
from runtime.training._objective import TabularObjective
from runtime.training._progress import ProgressChannel, TrainingDisplay, failure_notices
from runtime.training._worker import EarlyStop, StreamingData, WorkerConfig, train_loop_per_worker
from runtime.training.callbacks import Callback

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


def _log(msg: str) -> None:
    logger.info(msg)


# ---------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class Prepared:
    """A validated job joined to a Ray cluster: the spec, the task, the data's fingerprint."""

    cfg: TrainJobConfig
    spec: FeatureSpec
    task: Task
    columns: list[str]
    dataset_sha256: str
    resolved: dict[str, Any]  # the config with the spec inline: what `reproduce` re-runs

    def splits(self) -> dict[str, Any]:
        d = self.cfg.data
        return open_split(
            d.path, d.format, self.columns, d.test_fraction, d.validation_fraction, self.cfg.training.seed
        )


def prepare(cfg: TrainJobConfig, config_dir: Path | None = None, progress: Progress = _log) -> Prepared:
    import ray

    spec_dict = cfg.feature_spec_dict(config_dir)
    spec = FeatureSpec.model_validate(spec_dict)
    if spec.label is None:
        raise ConfigError(
            "the feature spec has no `label:` section; training needs one, e.g. label: {name: y, task: binary}"
        )
    progress(f"streaming {redact(cfg.data.path)} through Ray Data")
    data_fp = dataset_fingerprint(cfg.data.path, cfg.data.format)
    registry.configure_mlflow()
    connect(min_cpus=cpus_for(cfg.training.num_workers, cfg.training.cpus_per_worker))
    check_placeable(cfg.training, ray.cluster_resources())
    resolved = {**cfg.model_dump(mode="json"), "features": spec_dict}
    columns = [f.name for f in spec.features] + [spec.label.name]
    return Prepared(cfg, spec, task_for(spec.label.task), columns, data_fp, resolved)


# ---------------------------------------------------------------------- fit preprocessing


@dataclass(frozen=True)
class Fitted:
    prep: FittedPreprocessor
    train_rows: int
    fit_rows: int
    head: Head
    model_config: dict[str, Any]  # the packaged model's model.json
    example: pa.Table = field(repr=False)  # a few raw feature rows: MLflow's input example
    sample: pa.Table = field(repr=False)  # the uniform training sample fit on: the monitoring reference's rows


def fit_preprocessing(p: Prepared, progress: Progress = _log) -> Fitted:
    """One streaming pass over the training split: its row count and a bounded sample to fit on."""
    cfg = p.cfg
    fitted = fit_pass(
        p.splits()["train"], p.columns, cfg.training.seed, cfg.data.fit_sample_rows, cfg.data.path, progress
    )
    exact = fitted.sample.num_rows == fitted.train_rows
    progress(
        f"{fitted.train_rows:,} training rows (dataset sha256 {p.dataset_sha256[:12]}); preprocessing fit on "
        + ("all of them" if exact else f"a uniform sample of {fitted.sample.num_rows:,}")
    )
    prep = fit(p.spec, fitted.sample)
    classes = tuple(prep.classes) if prep.classes else None
    head = Head(classes, p.task.target_scale(prep.transform_label(fitted.sample)))
    model_config = registry.model_json(cfg.model, prep, p.task, head.target_scale)
    example = prep.records_to_table(fitted.sample.slice(0, 3).to_pylist())
    return Fitted(prep, fitted.train_rows, fitted.sample.num_rows, head, model_config, example, fitted.sample)


# ---------------------------------------------------------------------- the MLflow run


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    logger: RunLogger


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@contextlib.contextmanager
def tracked_run(p: Prepared, f: Fitted, extra_tags: dict[str, str] | None = None) -> Iterator[TrackedRun]:
    """An MLflow run holding the job's params, lineage tags and lineage artifacts (credentials redacted)."""
    import mlflow

    cfg = p.cfg
    experiment_id = registry.ensure_experiment(cfg.registry.experiment or cfg.registry.model_name)
    env_text, _ = registry.environment_lock()
    record = LineageRecord.collect(
        workload="tabular",
        architecture=cfg.model.architecture,
        dataset_path=cfg.data.path,
        dataset_sha256=p.dataset_sha256,
        seed=cfg.training.seed,
        task=p.task.name,
        rows={"train": f.train_rows, "fit": f.fit_rows},
        fingerprints={
            "preprocessing": f.prep.fingerprint,
            "code": registry.inference_code_fingerprint(f.model_config),
            **f.prep.fingerprints,
        },
    )
    with mlflow.start_run(experiment_id=experiment_id) as run:
        params = _flatten("", redact_obj(cfg.model_dump(mode="json", exclude={"features"})), {})
        mlflow.log_params(params)
        mlflow.set_tags({**record.to_tags(), **(extra_tags or {})})
        mlflow.log_text(env_text, "lineage/environment.txt")
        mlflow.log_text(yaml.safe_dump(redact_obj(p.resolved), sort_keys=False), "lineage/config.yaml")
        mlflow.log_text(yaml.safe_dump(p.spec.model_dump(mode="json"), sort_keys=False), "lineage/feature_spec.yaml")
        yield TrackedRun(run.info.run_id, RunLogger(registry.tracking_uri(), run.info.run_id))


# ---------------------------------------------------------------------- train


@dataclass(frozen=True)
class Trained:
    weights: dict[str, Any] = field(repr=False)  # the final checkpoint's state dict
    metrics: dict[str, Any]  # the last report
    ingest: IngestPlan


def _early_stop(p: Prepared, objective: TabularObjective) -> EarlyStop | None:
    e = p.cfg.training.early_stopping
    if e is None:
        return None
    metric = e.metric or objective.primary()
    if metric not in objective.metric_names():
        raise ConfigError(
            f"training.early_stopping.metric = {metric!r}: a {p.task.name} job reports "
            f"{', '.join(objective.metric_names())} every epoch"
        )
    return EarlyStop(metric, objective.higher_is_better(metric), e.patience, e.min_delta)


def final_validation(metrics: dict[str, Any]) -> dict[str, float]:
    """The validation metrics of the weights a run packaged: early stopping's best epoch's
    (``best_valid_*``) when it kept one, else the last epoch's (``valid_*``)."""
    best = {k.removeprefix("best_"): v for k, v in metrics.items() if k.startswith("best_valid_")}
    return best or {k: v for k, v in metrics.items() if k.startswith("valid_")}


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def train(
    p: Prepared,
    f: Fitted,
    run: TrackedRun,
    progress: Progress = _log,
    callbacks: list[Callback] | None = None,
    run_callbacks: list[Any] | None = None,
    storage_path: str | None = None,
    show_progress: bool = True,
    log_file: Path | None = None,
) -> Trained:
    """Ray Train over the preprocessed training split; the weights of its final checkpoint.

    ``callbacks`` join the worker loop's (pickled to the workers); ``run_callbacks`` are Ray
    Train ``RunConfig`` callbacks (Tune's report callback). With ``show_progress`` the run's
    steps, epochs and worker failures are shown through ``progress`` (and ``log_file``) as they
    happen (:class:`~runtime.training._progress.TrainingDisplay`).
    """
    import mlflow
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from runtime.training._checkpoint import load_weights

    t0 = time.monotonic()
    cfg, t = p.cfg, p.cfg.training
    objective = TabularObjective(p.task.name, f.head)
    early = _early_stop(p, objective)  # a bad metric name fails here, before any Ray work
    plan = plan_ingest(
        cfg.data.ingest,
        f.train_rows,
        f.prep.output_dim,
        t.num_workers,
        float(ray.cluster_resources().get("object_store_memory", 0.0)),
    )
    progress(f"training split: {plan.reason}")
    splits = p.splits()
    data: Any
    datasets: dict[str, Any] | None = None
    if plan.mode == "memory":
        train_refs, _ = materialize(features_stage(splits["train"], f.prep), cfg.data.path)
        valid_refs, valid_rows = materialize(features_stage(splits["validation"], f.prep), cfg.data.path)
        if valid_rows == 0:
            raise ConfigError(
                f"data.validation_fraction ({cfg.data.validation_fraction}): no validation rows in "
                f"{redact(cfg.data.path)!r}; raise it or add data (early stopping and Tune read the validation split)"
            )
        mlflow.set_tag(Tag.VALIDATION_ROWS, str(valid_rows))
        data = InMemoryData(train_refs, valid_refs)
    else:
        data = StreamingData(f.train_rows)
        datasets = {side: features_stage(splits[side], f.prep) for side in ("train", "validation")}
    places = RunPlaces(
        storage=storage_path or str(registry.skewless_home() / "ray_results"),
        name=t.run_name or f"{cfg.registry.model_name}-{run.run_id[:12]}",
        key=run.run_id,
        run_id=run.run_id,
    )
    with contextlib.ExitStack() as stack:
        channel = ProgressChannel() if show_progress else None
        if channel is not None:  # the queue's actor goes when this does, whatever fails below
            stack.callback(channel.close)
        worker = WorkerConfig(
            progress=channel,
            objective=objective,
            data=data,
            model=f.model_config,
            optimizer=cfg.optimizer,
            seed=t.seed,
            epochs=t.epochs,
            batch_size=t.batch_size,
            # a checkpoint of another run (other data, features or model) is refused on resume
            run_fingerprint=_sha256(f.prep.fingerprint + json.dumps(f.model_config, sort_keys=True)),
            micro_batch_size=t.micro_batch_size,
            precision=t.precision,
            lr_schedule=t.lr_schedule,
            warmup_steps=t.warmup_steps,
            grad_clip=t.grad_clip,
            checkpoint_every_steps=t.checkpoint_every_steps,
            early_stopping=early,
            memory=worker_memory(cfg.memory, places),
            run_logger=run.logger,
            checkpoint_files={"preprocessor.json": f.prep.to_json(), "model.json": json.dumps(f.model_config)},
            callbacks=tuple(callbacks or ()),
        )
        progress(f"training on {t.num_workers} Ray Train worker(s), {t.epochs} epoch(s)")
        trainer = TorchTrainer(
            train_loop_per_worker,  # type: ignore[arg-type]  # V2 keeps rank 0's return value; the stubs say None
            train_loop_config={"worker": worker},
            **scaling(t.num_workers, t.use_gpu, t.cpus_per_worker, t.gpus_per_worker),
            run_config=RunConfig(
                name=places.name,
                storage_path=places.storage,
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures),
                callbacks=[*(run_callbacks or []), *([failure_notices(channel)] if channel else [])] or None,
            ),
            datasets=datasets,
            dataset_config=DataConfig(execution_options=ingest_options()),
        )
        if channel is not None:
            stack.enter_context(TrainingDisplay(channel, max_failures=t.max_failures, out=progress, log_file=log_file))
        result = fit_watched(trainer, cfg.memory, places, progress)
    if result.checkpoint is None:
        raise TrainingError(f"training run {run.run_id} ended without a checkpoint")
    metrics = dict(result.metrics or {})
    progress(
        f"trained in {time.monotonic() - t0:.1f}s; the packaged model's validation: {summary(final_validation(metrics))}"
    )
    # The driver records through its own MLflow client (the run is active here); run.logger
    # is the workers' (retrying, never raising) writer.
    mlflow.set_tags(
        {Tag.INGEST: plan.mode, Tag.INGEST_REASON: plan.reason[:5000], **_early_stopping_tags(metrics, progress)}
    )
    with result.checkpoint.as_directory() as d:
        weights = load_weights(Path(d), f.model_config)
    return Trained(weights, metrics, plan)


def _early_stopping_tags(metrics: dict[str, Any], progress: Progress) -> dict[str, str]:
    best = metrics.get("early_stopping/best_epoch")
    if best is None:
        return {}
    tags = {Tag.BEST_EPOCH: str(int(best))}
    stopped = metrics.get("early_stopping/stopped_epoch")
    if stopped is not None:
        tags[Tag.STOPPED_EPOCH] = str(int(stopped))
    progress(
        "early stopping: "
        + (f"stopped after epoch {int(stopped)}, " if stopped is not None else "ran every epoch, ")
        + f"kept the weights of epoch {int(best)}"
    )
    return tags


# ---------------------------------------------------------------------- package, evaluate


@dataclass(frozen=True)
class Packaged:
    model_dir: Path
    model_uri: str
    manifest_sha256: str
    metrics: dict[str, float]  # holdout_*
    holdout: HoldoutStream


def package(p: Prepared, f: Fitted, trained: Trained, run: TrackedRun, progress: Progress = _log) -> Packaged:
    """The model directory (weights, model.json, preprocessor.json, the monitoring reference,
    manifest), evaluated on the holdout as serving loads it, then logged as a pyfunc with its
    artifact manifest.

    The reference (``reference.json``: the training sample's profile and the model's
    predictions on it, a calibration fitted on the holdout, the holdout figures) is computed
    from the packaged model itself, so live windows are judged against what this exact model
    did at training; it is in the manifest, so it is verified like the weights.
    """
    import mlflow

    from runtime.monitoring import REFERENCE_FILE, build_reference

    # Kept beside the store (not in /tmp): MLflow holds the logged copy, this one is the run's.
    model_dir = registry.skewless_home() / "runs" / run.run_id / "model"
    registry.write_model_dir(model_dir, trained.weights, f.model_config, f.prep)
    model = registry.load_model_dir(model_dir)
    metrics, holdout = evaluate_holdout(p, model, progress)
    reference = build_reference(model, f.sample, holdout.sample, metrics, holdout_rows=holdout.rows)
    registry.add_model_file(model_dir, REFERENCE_FILE, reference.to_json())
    progress(
        f"monitoring reference: {reference.profile.n_rows:,} training rows profiled"
        + (f", calibration on {reference.calibration.rows:,} holdout rows" if reference.calibration else "")
    )
    uri, manifest_sha = registry.log_pyfunc_model(model_dir, f.example)
    mlflow.set_tags({Tag.MODEL_URI: uri, Tag.MANIFEST_SHA256: manifest_sha})
    return Packaged(model_dir, uri, manifest_sha, metrics, holdout)


def evaluate_holdout(
    p: Prepared, model: registry.LoadedModel, progress: Progress = _log
) -> tuple[dict[str, float], HoldoutStream]:
    """The packaged model, loaded as serving loads it, on the test split (streamed)."""
    import mlflow

    holdout = HoldoutStream(lambda: driver_batches(p.splits()["test"], p.cfg.data.path), p.cfg.data.path)
    metrics = evaluate(model, holdout)
    mlflow.log_metrics(metrics)
    mlflow.set_tag(Tag.HOLDOUT_ROWS, str(holdout.rows))
    progress(f"holdout: {summary(metrics)}")
    return metrics, holdout


# ---------------------------------------------------------------------- all of it


def run_training(
    cfg: TrainJobConfig,
    config_dir: Path | None = None,
    progress: Progress = _log,
    callbacks: list[Callback] | None = None,
    storage_path: str | None = None,
    extra_tags: dict[str, str] | None = None,
    verbose: bool = False,
) -> Any:
    """Train, package, evaluate, register and (maybe) promote. Returns the :class:`TrainOutcome`.

    The engines' INFO logs in this process (Ray Data's plans, Ray's, MLflow's) go to the job's log
    file (``$SKEWLESS_HOME/logs/train-<time>-<pid>.log``), which the MLflow run keeps under
    ``logs/``; ``verbose`` (or ``SKEWLESS_VERBOSE=1``) shows them here, with the workers' output.
    Ray Train's controller and the workers log in their own processes (Ray's session logs).
    """
    import mlflow

    from runtime.training._promote import register_run

    log_file = job_log_path("train")
    progress = _teed(progress, log_file)
    with engine_logs(log_file, verbose_requested(verbose)):
        progress(f"engine logs: {log_file}" + ("" if verbose_requested(verbose) else " (--verbose shows them here)"))
        p = prepare(cfg, config_dir, progress)
        f = fit_preprocessing(p, progress)
        with tracked_run(p, f, extra_tags) as run:
            try:
                trained = train(p, f, run, progress, callbacks, storage_path=storage_path, log_file=log_file)
                packaged = package(p, f, trained, run, progress)
                return register_run(run.run_id, cfg, packaged.metrics, packaged.holdout, progress, packaged.model_dir)
            finally:
                with contextlib.suppress(Exception):  # the log is a convenience: never fail the job on it
                    mlflow.log_artifact(str(log_file), "logs")


def _teed(progress: Progress, log_file: Path) -> Progress:
    """``progress``, each line also appended to ``log_file`` (the driver's lines: paths and
    figures it already redacted)."""

    def both(message: str) -> None:
        progress(message)
        try:
            with log_file.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
        except OSError:
            pass

    return both
