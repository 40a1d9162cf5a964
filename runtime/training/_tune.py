"""Hyperparameter search: Ray Tune over the same training driver, ASHA early stopping.

The Ray 2.60 pattern: a :class:`ray.tune.Tuner` runs one *driver function* per trial; each
builds its own ``TorchTrainer`` (through :func:`run_training`) with Tune's
``TuneReportCallback``, so per-epoch ``valid_loss`` reaches Tune and ASHA can stop a trial
early. Every trial is an MLflow child run of the search's parent run with full lineage and its
packaged model; at the end the trial with the best holdout metric is registered as
``candidate`` (and ``champion`` when it beats the incumbent).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from runtime.config import StrictModel, TrainJobConfig, load_config, read_yaml, resolve_path
from runtime.errors import ConfigError, TrainingError
from runtime.training._driver import Progress, TrainOutcome

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
    metric: Literal["valid_loss", "valid_accuracy"] = Field(default="valid_loss")
    scheduler: SchedulerConfig = SchedulerConfig()

    @model_validator(mode="after")
    def _one_distribution_each(self) -> TuneJobConfig:
        for key, dist in self.search_space.items():
            if len(dist) != 1:
                raise ValueError(f"search_space.{key} must have exactly one distribution, got {sorted(dist)}")
        return self

    @property
    def mode(self) -> str:
        return "min" if self.metric == "valid_loss" else "max"


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
    train_cfg = load_config(TrainJobConfig, base)
    base = {**base, "features": train_cfg.feature_spec_dict(base_dir)}
    if train_cfg.training.checkpoint_every_steps:
        raise ConfigError(
            "base.training.checkpoint_every_steps must be unset under Tune: every report must carry "
            f"{tune_cfg.metric!r} for ASHA to compare trials"
        )
    for key, dist in tune_cfg.search_space.items():
        ((name, args),) = dist.items()
        for value in _probe_values(key, name, args):
            probe = copy.deepcopy(base)
            _set(probe, key, value)
            try:
                load_config(TrainJobConfig, probe)
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


def _trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    """One trial: the training driver with these hyperparameters, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from runtime.training._driver import run_training

    config = copy.deepcopy(base)
    for key, value in params.items():
        _set(config, key, value)
    cfg = TrainJobConfig.model_validate(config)
    trial_id = tune.get_context().get_trial_id()
    run_training(
        cfg,
        register=False,
        run_callbacks=[TuneReportCallback()],
        progress=print,
        extra_tags={
            "mlflow.parentRunId": parent_run_id,
            "skewless.tune_trial": str(trial_id),
            "skewless.tune_params": repr(params),
        },
    )


def run_tune(path: Path, progress: Progress = print) -> TrainOutcome:
    """Search, then register the best finished trial. Returns its outcome."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from runtime import registry
    from runtime.cluster import connect, cpus_for
    from runtime.training._driver import HoldoutStream, register_run_model
    from runtime.training._evaluate import primary_metric
    from runtime.training._ingest import open_split

    tune_cfg, base = resolve_tune_config(path)
    train_cfg = TrainJobConfig.model_validate(base)
    registry.configure_mlflow()
    experiment_id = registry.ensure_experiment(train_cfg.registry.experiment or train_cfg.registry.model_name)
    connect(
        min_cpus=cpus_for(
            train_cfg.training.num_workers, train_cfg.training.cpus_per_worker, groups=tune_cfg.max_concurrent_trials
        )
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{path.stem}") as parent:
        mlflow.log_dict(tune_cfg.model_dump(mode="json"), "tune/config.json")
        progress(
            f"tuning {len(tune_cfg.search_space)} hyperparameter(s), {tune_cfg.num_samples} sample(s), "
            f"ASHA on {tune_cfg.metric} ({tune_cfg.mode})"
        )
        tuner = tune.Tuner(
            # Each trial's driver takes Tune's default 1 CPU; its Train workers reserve their own.
            tune.with_parameters(_trial, base=base, parent_run_id=parent.info.run_id),
            param_space=_param_space(tune_cfg.search_space),
            tune_config=tune.TuneConfig(
                metric=tune_cfg.metric,
                mode=tune_cfg.mode,
                num_samples=tune_cfg.num_samples,
                max_concurrent_trials=tune_cfg.max_concurrent_trials,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    # One past the last epoch: a trial that reaches max_t is stopped by Tune, which
                    # would kill the driver before it evaluates and logs the model.
                    max_t=train_cfg.training.epochs + 1,
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
        task = children[0].data.tags.get("skewless.task", "binary") if children else "binary"
        metric = primary_metric(task)
        finished = [r for r in children if metric.name in r.data.metrics and "skewless.model_uri" in r.data.tags]
        for run in children:
            if run not in finished:  # stopped early by ASHA: its driver was killed mid-run
                mlflow.MlflowClient().set_terminated(run.info.run_id, "KILLED")
        if not finished:
            raise TrainingError(f"tune run {parent.info.run_id}: no trial finished with a holdout metric")
        best = (max if metric.higher_is_better else min)(finished, key=lambda r: r.data.metrics[metric.name])
        mlflow.set_tags(
            {
                "skewless.best_trial_run": best.info.run_id,
                "skewless.best_params": best.data.tags.get("skewless.tune_params", ""),
            }
        )
        mlflow.log_metric(f"best_{metric.name}", best.data.metrics[metric.name])
        progress(
            f"best trial: run {best.info.run_id} {best.data.tags.get('skewless.tune_params', '')} "
            f"{metric.name}={best.data.metrics[metric.name]:.4f}"
        )
        best_cfg = load_config(TrainJobConfig, _read_yaml_text(best.info.run_id))
        spec = best_cfg.feature_spec_dict()
        columns = [f["name"] for f in spec["features"]] + [spec["label"]["name"]]
        data = best_cfg.data
        holdout = HoldoutStream(
            lambda: open_split(data.path, data.format, columns, data.holdout_fraction, best_cfg.training.seed)[1],
            data.path,
        )
        holdout_metrics = {k: v for k, v in best.data.metrics.items() if k.startswith("holdout_")}
        return register_run_model(best.info.run_id, best_cfg, holdout_metrics, holdout, progress)


def _read_yaml_text(run_id: str) -> dict[str, Any]:
    import mlflow
    import yaml

    data: dict[str, Any] = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/lineage/config.yaml"))
    return data
