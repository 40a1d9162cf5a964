"""Whether to retrain: what the errors cost if the model stays, against what a retrain costs.

Keeping the model costs the extra errors it makes: the accuracy lost since its holdout
(realised from labels when there are enough, else estimated without them, see
``_performance``) times the predictions it will serve until the next retrain, times what a
wrong prediction costs. Retraining costs the compute: the wall-clock hours past training runs
of the model took, times the workers, times the price of a worker-hour. Retrain when keeping
costs more.

What this assumes, and leaves out:

- a retrain restores the holdout accuracy for the whole horizon, at once: an upper bound on
  what it saves (the degradation may keep growing, or a retrain may not recover it all);
- the degradation is taken at face value: a realised accuracy from ``min_labels`` rows is
  still noisy (a standard error of about 0.03 at 200 labels and 75% accuracy), so raise ``min_labels`` when
  the costs are close;
- the cost of labels, of a rollout and of a worse model being promoted is not counted;
- never on broken inputs: with data problems (a unit change, a renamed category, a column
  gone null) a retrain would learn the breakage, so the decision is to fix the pipeline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from runtime.errors import ConfigError, RegistryError
from runtime.monitoring._problems import DataProblem
from runtime.redact import redact

SOURCES = ("labels", "estimate", "none")


@dataclass(frozen=True)
class RetrainCosts:
    """What an error and a worker-hour cost, and how much the model serves."""

    cost_per_error: float  # currency per wrong prediction
    compute_price_per_hour: float  # currency per worker-hour
    traffic_per_day: float  # predictions per day
    horizon_days: float = 30.0  # how long a retrained model serves before the next retrain
    currency: str = "USD"

    def __post_init__(self) -> None:
        for name, positive, meaning in (
            ("cost_per_error", True, "what one wrong prediction costs"),
            ("compute_price_per_hour", True, "the price of one worker for one hour"),
            ("traffic_per_day", False, "predictions served per day"),
            ("horizon_days", True, "days a retrained model serves before the next retrain"),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if positive else value < 0):
                rule = "> 0" if positive else ">= 0"
                raise ConfigError(f"{name} ({value!r}) must be a finite number {rule}: {meaning}")
        if not isinstance(self.currency, str) or not self.currency.strip():
            raise ConfigError(f"currency ({self.currency!r}) must be a non-empty name, e.g. 'USD'")


@dataclass(frozen=True)
class RetrainDecision:
    """The decision, the two costs it compared and where their numbers came from."""

    retrain: bool
    reason: str
    keep_cost: float
    retrain_cost: float | None  # None: no past run to price a retrain with
    degradation: float  # error-rate increase since the holdout, 0..1
    degradation_source: str  # "labels" | "estimate" | "none"
    training_hours: float | None
    runs_counted: int
    data_problems: tuple[str, ...]
    costs: RetrainCosts
    workers: int
    labelled_rows: int
    min_labels: int
    reference_accuracy: float
    observed_accuracy: float | None  # the realised or estimated accuracy the degradation is from
    noise: float = 0.0  # the margin left out of the drop: z x its standard error (sampling noise)
    z: float = 0.0

    def explain(self) -> str:
        """The arithmetic in words, ending with the decision."""
        c = self.costs
        if self.degradation_source == "labels":
            source = f"realised from {self.labelled_rows:,} labels"
        elif self.degradation_source == "estimate":
            source = "estimated without labels (CBPE)"
            if self.labelled_rows < self.min_labels:
                source = f"estimated without labels (CBPE): {self.labelled_rows:,} labels < {self.min_labels:,} needed"
        else:
            source = "no labels and no estimate to measure it"
        if self.noise > 0 and self.observed_accuracy is not None:
            drop = self.reference_accuracy - self.observed_accuracy
            source += (
                f"; accuracy {_num(self.reference_accuracy)} -> {_num(self.observed_accuracy)}, less "
                f"{_num(self.noise)} of sampling noise (z {self.z:g} x its standard error)"
            )
            if drop > 0 and self.degradation == 0:
                source += ": the drop is within the noise"
        keep = (
            f"keep: {_num(self.degradation)} more errors per prediction ({source}) x {_num(c.traffic_per_day)} "
            f"predictions/day x {_num(c.horizon_days)} days x {_money(c.cost_per_error, c.currency)} "
            f"= {_money(self.keep_cost, c.currency)}"
        )
        if self.retrain_cost is None or self.training_hours is None:
            retrain = "retrain: not priced (no finished past training run of the model)"
        else:
            runs = f"median of {self.runs_counted} past run{'s' if self.runs_counted != 1 else ''}"
            if not self.runs_counted:
                runs = "as given"
            retrain = (
                f"retrain: {self.training_hours:.2f} h ({runs}) x {self.workers} worker{'s' if self.workers != 1 else ''}"
                f" x {_money(c.compute_price_per_hour, c.currency)}/h = {_money(self.retrain_cost, c.currency)}"
            )
        verdict = "retrain" if self.retrain else "keep"
        return f"{keep}; {retrain} -> {verdict}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_problems"] = list(self.data_problems)
        out["explanation"] = self.explain()
        return out


def retrain_decision(
    *,
    reference_accuracy: float,
    realised_accuracy: float | None,
    labelled_rows: int,
    estimated_accuracy: float | None,
    costs: RetrainCosts,
    training_hours: float | None,
    runs_counted: int = 0,
    workers: int = 1,
    data_problems: Sequence[str | DataProblem] = (),
    min_labels: int = 200,
    reference_rows: int = 0,
    observed_rows: int | None = None,
    z: float = 1.645,
) -> RetrainDecision:
    """Retrain iff the extra errors of keeping the model cost more than a retrain.

    The degradation is ``reference_accuracy`` (the holdout's) minus the realised accuracy
    when ``labelled_rows >= min_labels``, else minus ``estimated_accuracy`` (CBPE) when there
    is one, else 0; never below 0. An accuracy of None or NaN is "not measured".
    ``training_hours`` is the wall-clock hours of one run (:func:`training_hours` gives the
    median of past runs and ``runs_counted``); None refuses to retrain, since the cost is
    unknown. Any ``data_problems`` refuse it too. See the module docstring for the assumptions.

    A drop within sampling noise is not a degradation: ``z`` standard errors of the difference
    of two accuracies (the holdout's over ``reference_rows``, the window's over ``observed_rows``:
    the labelled rows, or the rows the estimate averaged; binomial) are taken off it first. With
    ``z = 0`` (or no row counts) the drop is taken at face value.
    """
    _check_accuracy("reference_accuracy", reference_accuracy)
    realised = _measured("realised_accuracy", realised_accuracy)
    estimated = _measured("estimated_accuracy", estimated_accuracy)
    for name, value, least in (
        ("labelled_rows", labelled_rows, 0),
        ("workers", workers, 1),
        ("min_labels", min_labels, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} ({value!r}) must be an integer >= {least}")
    if training_hours is not None and not (math.isfinite(training_hours) and training_hours >= 0):
        raise ConfigError(
            f"training_hours ({training_hours!r}) must be a finite number >= 0 (wall-clock hours of one run), "
            "or None when no run is known"
        )

    if labelled_rows >= min_labels and realised is not None:
        observed, source = realised, "labels"
    elif estimated is not None:
        observed, source = estimated, "estimate"
    else:
        observed, source = None, "none"
    noise = 0.0
    if observed is not None and z > 0:
        rows = labelled_rows if source == "labels" else (observed_rows or 0)
        variance = 0.0
        if reference_rows > 0:
            variance += reference_accuracy * (1 - reference_accuracy) / reference_rows
        if rows > 0:
            variance += observed * (1 - observed) / rows
        noise = z * math.sqrt(variance)
    degradation = 0.0 if observed is None else max(0.0, reference_accuracy - observed - noise)
    keep_cost = degradation * costs.traffic_per_day * costs.horizon_days * costs.cost_per_error
    retrain_cost = None if training_hours is None else training_hours * workers * costs.compute_price_per_hour
    problems = tuple(str(p) for p in data_problems)
    money = costs.currency

    if problems:
        retrain = False
        reason = (
            f"{len(problems)} data problem{'s' if len(problems) != 1 else ''} ({'; '.join(problems)}): fix the upstream "
            "pipeline first, retraining on broken inputs learns the breakage"
        )
    elif retrain_cost is None:
        retrain = False
        reason = (
            "no finished past training run of this model to price a retrain with; pass training_hours= "
            "(an estimate of one run's wall-clock hours) to decide"
        )
    elif keep_cost > retrain_cost:
        retrain = True
        reason = (
            f"the extra errors cost more than a retrain ({_money(keep_cost, money)} > {_money(retrain_cost, money)})"
        )
    elif source == "none":
        retrain = False
        reason = f"no degradation measured: fewer than {min_labels} labels and no estimate"
    else:
        retrain = False
        reason = (
            f"a retrain costs more than the errors it would save "
            f"({_money(retrain_cost, money)} >= {_money(keep_cost, money)})"
        )
    return RetrainDecision(
        retrain=retrain,
        reason=reason,
        keep_cost=keep_cost,
        retrain_cost=retrain_cost,
        degradation=degradation,
        degradation_source=source,
        training_hours=training_hours,
        runs_counted=runs_counted if training_hours is not None else 0,
        data_problems=problems,
        costs=costs,
        workers=workers,
        labelled_rows=labelled_rows,
        min_labels=min_labels,
        reference_accuracy=reference_accuracy,
        observed_accuracy=observed,
        noise=noise,
        z=z if noise > 0 else 0.0,
    )


def training_hours(model_name: str, *, client: Any = None) -> tuple[float | None, int]:
    """The median wall-clock hours of the finished MLflow runs that produced versions of the
    registered model ``model_name``, and how many runs counted (``(None, 0)``: none).

    A run counts once however many versions it registered; runs not ``FINISHED`` (failed,
    killed, still running) or without an end time are skipped, as are versions registered
    without a run. ``client`` defaults to an ``MlflowClient`` on skewless's store.
    """
    from mlflow.exceptions import MlflowException

    if client is None:
        import mlflow

        from runtime.registry import configure_mlflow  # imports torch: only when asked

        configure_mlflow()
        client = mlflow.MlflowClient()
    quote = '"' if "'" in model_name else "'"  # MLflow's filter has no escapes, only the other quote
    if quote in model_name:
        raise ConfigError(f"model name {model_name!r} holds both quote characters, which an MLflow search cannot quote")
    try:
        versions = client.search_model_versions(f"name={quote}{model_name}{quote}")
    except MlflowException as exc:
        where = redact(str(getattr(client, "tracking_uri", "the tracking store")))
        raise RegistryError(f"cannot list the versions of model {model_name!r} at {where}: {exc.message}") from None
    hours: list[float] = []
    for run_id in dict.fromkeys(v.run_id for v in versions if v.run_id):
        try:
            info = client.get_run(run_id).info
        except MlflowException:  # the run was deleted (garbage-collected) since
            continue
        if info.status != "FINISHED" or not info.end_time or info.start_time is None or info.end_time < info.start_time:
            continue
        hours.append((info.end_time - info.start_time) / 3_600_000.0)
    if not hours:
        return None, 0
    return float(statistics.median(hours)), len(hours)


def _check_accuracy(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} ({value!r}) must be a number in [0, 1]")


def _measured(name: str, value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    _check_accuracy(name, value)
    return float(value)


def _num(value: float) -> str:
    """0.034, 1,204, 50,000, 30, 2.5: three significant digits below 1, thousands grouped above."""
    if value == 0:
        return "0"
    if abs(value) < 1:
        return f"{value:.3g}"
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def _money(value: float, currency: str) -> str:
    """10,200 USD, 2.46 USD, 0.0001 USD: cents unless they would show a price as 0.00."""
    if abs(value) >= 1000:
        return f"{value:,.0f} {currency}"
    if 0 < abs(value) < 0.01:
        return f"{value:.2g} {currency}"
    return f"{value:,.2f} {currency}"
