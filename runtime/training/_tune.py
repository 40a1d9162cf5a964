"""Hyperparameter search: Ray Tune over the same training steps, ASHA early stopping.

The Ray 2.60 pattern: a :class:`ray.tune.Tuner` runs one *driver function* per trial; each
runs the training steps (prepare, fit preprocessing, train, package, evaluate) and builds its
own ``TorchTrainer`` with Tune's ``TuneReportCallback``, so per-epoch validation metrics reach
Tune and ASHA can stop a trial early. Every trial is an MLflow child run of the search's
parent run with full lineage and its packaged model. The best trial is chosen on the
*validation* split (the search metric of its final weights: the best epoch's when early
stopping kept it); the test split only gives the final metrics and the champion comparison.
The best trial is registered as ``candidate`` (and ``champion`` when it beats the incumbent).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from runtime.config import StrictModel, load_config, read_yaml, resolve_path, validate
from runtime.errors import ConfigError, TrainingError
from runtime.registry import Tag
from runtime.tasks import task_for
from runtime.training._config import TrainJobConfig
from runtime.training._driver import Progress
from runtime.training._promote import TrainOutcome

Distribution = Literal["choice", "grid", "uniform", "loguniform", "randint"]


class SchedulerConfig(StrictModel):
    grace_period: int = Field(default=1, ge=1, description="Epochs before ASHA may stop a trial.")
    reduction_factor: float = Field(default=2.0, gt=1.0)


class TuneJobConfig(StrictModel):
    """What ``python -m jobs.tune --config <file>`` reads."""

    base: str | dict[str, Any] = Field(description="The training job config (path relative to this file) or inline.")
    search_space: dict[str, dict[Distribution, Any]] = Field(
        description="Dotted config keys to distributions, e.g. optimizer.lr: {loguniform: [1e-4, 1e-2]}."
    )
    num_samples: int = Field(default=4, ge=1, description="Trials (per grid point, when a grid is used).")
    max_concurrent_trials: int = Field(default=2, ge=1)
    metric: str = Field(
        default="valid_loss",
        pattern=r"^valid_[a-z0-9_]+$",
        description="A per-epoch validation metric of the task (valid_loss, valid_accuracy, valid_rmse, ...): "
        "ASHA compares trials on it and the best trial is chosen on it.",
    )
    scheduler: SchedulerConfig = SchedulerConfig()

    @model_validator(mode="after")
    def _one_distribution_each(self) -> TuneJobConfig:
        for key, dist in self.search_space.items():
            if len(dist) != 1:
                raise ValueError(f"search_space.{key} must have exactly one distribution, got {sorted(dist)}")
        return self


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _probe_values(key: str, dist: str, args: Any) -> list[Any]:
    """Every value a distribution can reach the edge of, to validate it against the config."""
    where = f"search_space.{key}.{dist}"
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} = {args!r}: expected a non-empty list of values")
        return list(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(v, (int, float)) for v in args)):
        raise ConfigError(f"{where} = {args!r}: expected [low, high]")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where} = {args!r}: low must be < high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where} = {args!r}: loguniform needs low > 0")
    return [int(low), int(high) - 1] if dist == "randint" else [low, high]


def resolve_tune_config(path: Path) -> tuple[TuneJobConfig, dict[str, Any]]:
    """The tune config and its base training config (as a dict with the spec inline)."""
    tune_cfg = load_config(TuneJobConfig, path)
    if isinstance(tune_cfg.base, dict):
        base, base_dir = dict(tune_cfg.base), path.parent
    else:
        base_path = resolve_path(tune_cfg.base, path.parent)
        base, base_dir = read_yaml(base_path), base_path.parent
    train_cfg = load_config(TrainJobConfig, base, "base")
    base = {**base, "features": train_cfg.feature_spec_dict(base_dir)}
    if train_cfg.training.checkpoint_every_steps:
        raise ConfigError(
            "base.training.checkpoint_every_steps must be unset under Tune: every report must carry "
            f"{tune_cfg.metric!r} for ASHA to compare trials"
        )
    label = base["features"].get("label") if isinstance(base["features"], dict) else None
    if label and "task" in label:
        task = task_for(label["task"])
        reported = ["valid_loss", *(f"valid_{m}" for m in task.additive_metrics())]
        if tune_cfg.metric not in reported:
            raise ConfigError(
                f"metric = {tune_cfg.metric!r}: a {task.name} job reports {', '.join(reported)} every epoch"
            )
    for key, dist in tune_cfg.search_space.items():
        ((name, args),) = dist.items()
        for value in _probe_values(key, name, args):
            probe = copy.deepcopy(base)
            _set(probe, key, value)
            try:
                load_config(TrainJobConfig, probe, "base")
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key} = {value!r} does not fit the training config: {exc}") from None
    return tune_cfg, base


def _param_space(space: dict[str, dict[Distribution, Any]]) -> dict[str, Any]:
    from ray import tune

    makers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {key: makers[name](args) for key, dist in space.items() for name, args in dist.items()}


FINAL = "final_"  # the search metric of a trial's final weights, logged by the trial


def _report_callback() -> Any:
    """Tune's report callback for Ray Train, minus each run's last report.

    ASHA judges a trial at every rung it reaches; judged on its last epoch's report, a trial
    that finished training could be stopped while its driver packages and evaluates the model,
    leaving no model behind. The last report is the trial's own business: it logs the final
    validation metric to MLflow, where the selection reads it.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from runtime.training._worker import LAST_REPORT

    class ReportUntilTheLast(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metrics[0].get(LAST_REPORT):
                return
            super().after_report(run_context, metrics, checkpoint)

    return ReportUntilTheLast()


def _trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str, metric: str) -> None:
    """One trial: the training steps with these hyperparameters, reporting to Tune."""
    import mlflow
    from ray import tune

    from runtime.training._driver import (
        final_validation,
        fit_preprocessing,
        package,
        prepare,
        tracked_run,
        train,
    )

    cfg = _trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    p = prepare(cfg, progress=print)
    f = fit_preprocessing(p, print)
    tags = {Tag.PARENT_RUN: parent_run_id, Tag.TUNE_TRIAL: str(trial_id), Tag.TUNE_PARAMS: json.dumps(params)}
    with tracked_run(p, f, tags) as run:
        trained = train(p, f, run, print, run_callbacks=[_report_callback()], show_progress=False)
        package(p, f, trained, run, print)
        # the validation metric of the weights it packaged (early stopping's best epoch's)
        mlflow.log_metric(FINAL + metric, float(final_validation(trained.metrics)[metric]))


def run_tune(path: Path, progress: Progress = print) -> TrainOutcome:
    """Search, then register the best finished trial (by the validation metric). Returns its outcome."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from runtime import registry
    from runtime.connect import connect, cpus_for
    from runtime.training._evaluate import HoldoutStream
    from runtime.training._ingest import driver_batches, open_split
    from runtime.training._promote import register_run

    tune_cfg, base = resolve_tune_config(path)
    train_cfg = TrainJobConfig.model_validate(base)
    task = task_for(base["features"]["label"]["task"])
    direction = task.metric(tune_cfg.metric)
    mode = "max" if direction.higher_is_better else "min"
    registry.configure_mlflow()
    experiment_id = registry.ensure_experiment(train_cfg.registry.experiment or train_cfg.registry.model_name)
    t = train_cfg.training
    connect(min_cpus=cpus_for(t.num_workers, t.cpus_per_worker, groups=tune_cfg.max_concurrent_trials))
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{path.stem}") as parent:
        mlflow.log_dict(tune_cfg.model_dump(mode="json"), "tune/config.json")
        progress(
            f"tuning {len(tune_cfg.search_space)} hyperparameter(s), {tune_cfg.num_samples} sample(s), "
            f"ASHA on {tune_cfg.metric} ({mode})"
        )
        tuner = tune.Tuner(
            # Each trial's driver takes Tune's default 1 CPU; its Train workers reserve their own.
            tune.with_parameters(_trial, base=base, parent_run_id=parent.info.run_id, metric=tune_cfg.metric),
            param_space=_param_space(tune_cfg.search_space),
            tune_config=tune.TuneConfig(
                metric=tune_cfg.metric,
                mode=mode,
                num_samples=tune_cfg.num_samples,
                max_concurrent_trials=tune_cfg.max_concurrent_trials,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    # A trial's last epoch is never reported to Tune (see _report_callback), so no
                    # rung or max_t stops a trial that has finished training.
                    max_t=train_cfg.training.epochs,
                    grace_period=tune_cfg.scheduler.grace_period,
                    reduction_factor=tune_cfg.scheduler.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(
                name=f"tune-{parent.info.run_id[:12]}", storage_path=str(registry.skewless_home() / "ray_results")
            ),
        )
        results = tuner.fit()
        progress(f"{len(results)} trial(s) done, {results.num_errors} error(s)")

        children = mlflow.search_runs(
            experiment_ids=[experiment_id],
            output_format="list",
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        )
        selection = FINAL + tune_cfg.metric
        finished = [r for r in children if selection in r.data.metrics and Tag.MODEL_URI in r.data.tags]
        # A trial ASHA stopped leaves its run RUNNING (its driver was killed) or, when the stop
        # reached the driver first, FAILED (MLflow's end for a run an exception ends); with no
        # trial in error, a FAILED run without a model can only be such a stop.
        stopped = ("RUNNING", "FAILED") if results.num_errors == 0 else ("RUNNING",)
        for run in children:
            if run not in finished and run.info.status in stopped:
                mlflow.MlflowClient().set_terminated(run.info.run_id, "KILLED")
        if not finished:
            raise TrainingError(f"tune run {parent.info.run_id}: no trial finished with a model")
        best = (max if direction.higher_is_better else min)(finished, key=lambda r: r.data.metrics[selection])
        params = best.data.tags.get(Tag.TUNE_PARAMS, "")
        mlflow.set_tags({Tag.BEST_TRIAL_RUN: best.info.run_id, Tag.BEST_PARAMS: params})
        mlflow.log_metric(f"best_{tune_cfg.metric}", best.data.metrics[selection])
        progress(f"best trial: run {best.info.run_id} {params} {tune_cfg.metric}={best.data.metrics[selection]:.4f}")
        best_cfg = _trial_config(base, json.loads(params or "{}"))
        spec = best_cfg.feature_spec_dict()
        columns = [f["name"] for f in spec["features"]] + [spec["label"]["name"]]
        d = best_cfg.data
        holdout = HoldoutStream(
            lambda: driver_batches(
                open_split(d.path, d.format, columns, d.test_fraction, d.validation_fraction, best_cfg.training.seed)[
                    "test"
                ],
                d.path,
            ),
            d.path,
        )
        holdout_metrics = {k: v for k, v in best.data.metrics.items() if k.startswith("holdout_")}
        return register_run(best.info.run_id, best_cfg, holdout_metrics, holdout, progress)


def _trial_config(base: dict[str, Any], params: dict[str, Any]) -> TrainJobConfig:
    config = copy.deepcopy(base)
    for key, value in params.items():
        _set(config, key, value)
    return validate(TrainJobConfig, config, "trial config")
