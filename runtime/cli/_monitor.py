"""``skewless monitor``: drift, labels, reports and the retraining decision, from the store the
serving replicas write to (``args.monitoring.store``; default ``$SKEWLESS_HOME/monitoring``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)

monitor_app = typer.Typer(
    help="Model monitoring: drift, delayed labels, estimated and realised performance, retraining.",
    no_args_is_help=True,
)

STORE_HELP = "Monitoring store (a directory or pyarrow.fs URI); default $SKEWLESS_HOME/monitoring."
SINCE_HELP = "Window start: a duration back from now (30m, 6h, 7d) or a Unix time."
App = Annotated[str, typer.Argument(help="Serve application name (as in the Serve config).")]
Store = Annotated[str | None, typer.Option("--store", help=STORE_HELP)]
Version = Annotated[str | None, typer.Option(help="Model version (default: the latest one the app served).")]
Since = Annotated[str, typer.Option(help=SINCE_HELP)]


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``/``6h``/``7d``/``90s`` back from ``now``, or an absolute Unix time."""
    from runtime.errors import ConfigError

    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither a duration (30m, 6h, 7d) nor a Unix time") from None


def _report(app: str, version: str | None, since: str, store_uri: str | None) -> Any:
    from runtime.errors import DataError
    from runtime.monitoring import ModelReference, MonitoringStore, evaluate_window

    store = MonitoringStore(store_uri)
    versions = store.versions(app)
    if not versions:
        known = store.apps()
        raise DataError(
            f"no monitoring data for app {app!r} in {store!r}"
            + (f"; apps with data: {', '.join(known)}" if known else "")
            + ". Serve it with args.monitoring.enabled (the default) and send traffic; replicas flush every "
            "flush_interval_s"
        )
    chosen = version or versions[-1]
    if chosen not in versions:
        raise DataError(f"app {app!r} has no data for version {chosen!r}; it has {', '.join(versions)}")
    text = store.reference(app, chosen)
    if text is None:
        raise DataError(
            f"app {app!r} version {chosen} has no reference in the store: the model was packaged before "
            "monitoring; retrain it to get one"
        )
    return evaluate_window(store, app, chosen, ModelReference.from_dict(json.loads(text)), since=parse_since(since))


def _print_report(report: Any) -> None:
    drift = report.drift
    console.print(
        f"[bold]{report.app}[/] version {report.version}: {report.rows:,} rows from {report.replicas} replica(s) "
        f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report.since))} UTC"
    )
    if drift is None:
        console.print("no rows in the window")
    else:
        from rich.table import Column

        table = Table(
            Column("feature", overflow="fold"),
            Column("kind", overflow="fold"),
            Column("statistic", overflow="fold"),
            Column("value", no_wrap=True),
            Column("p (adj.)", no_wrap=True),
            Column("thr.", no_wrap=True),
            Column("verdict", overflow="fold"),
        )
        for r in (*drift.features, *(() if drift.prediction is None else (drift.prediction,))):
            style = {"DRIFT": "bold red", "data problem": "bold yellow"}.get(r.verdict, "")
            table.add_row(
                r.feature,
                r.kind,
                r.statistic,
                f"{r.value:.4g}",
                "" if r.p_adjusted is None else f"{r.p_adjusted:.3g}",
                f"{r.threshold:.4g}",
                f"[{style}]{r.verdict}[/]" if style else r.verdict,
            )
        console.print(table)
        verdict = "[bold red]DRIFT[/]" if drift.dataset_drift else "[green]no drift[/]"
        console.print(
            f"dataset: {verdict}: {drift.n_drifted} of {drift.n_tested} features drifted ({drift.share:.0%}; "
            f"drift at >= {drift.drift_share:.0%}), correction {drift.correction}"
        )
        for p in drift.problems:
            console.print(f"[bold yellow]data problem[/] {p} (an upstream pipeline change: fix it, do not retrain)")
    for line in report.performance_lines():
        console.print(line)


@monitor_app.command("drift")
def monitor_drift(
    app: App,
    since: Since = "1h",
    version: Version = None,
    png: Annotated[
        Path | None, typer.Option(help="Write reference-vs-live distributions of the drifted features.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    store: Store = None,
) -> None:
    """Drift of a served model's inputs and predictions over a window, per feature.

    Example: skewless monitor drift churn --since 6h --png drift.png
    """
    report = _report(app, version, since, store)
    if as_json:
        console.print_json(json.dumps(report.to_dict(), allow_nan=False, default=str))
    else:
        _print_report(report)
    if png is not None and report.drift is not None:
        from runtime.monitoring import drift_png

        console.print(f"wrote {drift_png(report, png)}")


@monitor_app.command("labels")
def monitor_labels(
    file: Annotated[Path, typer.Argument(help="CSV, Parquet or JSON lines with request_id, label and optionally row.")],
    app: Annotated[str, typer.Option(help="Serve application the predictions came from.")],
    store: Store = None,
) -> None:
    """Send ground truth for earlier predictions (joined by request id, from the answers'
    x-request-id header or request_id field).

    Example: skewless monitor labels labels.csv --app churn
    """
    from runtime.monitoring import MonitoringStore, labels_table

    table = labels_table(_read_table(file))
    s = MonitoringStore(store)
    logged = s.predictions(app)
    known = set(logged["request_id"].to_pylist()) if logged.num_rows else set()
    matched = sum(1 for rid in table["request_id"].to_pylist() if rid in known)
    s.write_labels(app, table)
    console.print(
        f"stored {table.num_rows:,} labels for app {app!r}; {matched:,} match a logged prediction"
        + ("" if matched == table.num_rows else " (the rest join when their predictions are flushed, or never)")
    )


def _read_table(path: Path) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from runtime.errors import DataError

    if not path.exists():
        raise DataError(f"labels file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".json", ".jsonl", ".ndjson"):
            return pajson.read_json(path)
        convert = pacsv.ConvertOptions(column_types={"request_id": "string", "label": "string"})
        return pacsv.read_csv(path, convert_options=convert)
    except Exception as exc:
        raise DataError(f"labels file {str(path)!r} cannot be read as {suffix or 'csv'}: {exc}") from None


@monitor_app.command("report")
def monitor_report(
    app: App,
    since: Since = "1h",
    version: Version = None,
    out: Annotated[Path | None, typer.Option(help="Write the report here (default: print Markdown).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md or html.")] = "md",
    store: Store = None,
) -> None:
    """A report of a window: drift per feature, data problems, estimated and realised performance.

    Example: skewless monitor report churn --since 24h --format html --out report.html
    """
    from runtime.errors import ConfigError

    if fmt not in ("md", "html"):
        raise ConfigError(f"--format {fmt!r} must be md or html")
    report = _report(app, version, since, store)
    text = report.html() if fmt == "html" else report.markdown()
    if out is None:
        console.print(text, markup=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote {out}")


@monitor_app.command("retrain-check")
def monitor_retrain_check(
    app: App,
    cost_per_error: Annotated[float, typer.Option(help="What one wrong prediction costs (currency).")],
    compute_price: Annotated[float, typer.Option(help="Price of one training worker for one hour (currency).")],
    since: Since = "24h",
    version: Version = None,
    traffic_per_day: Annotated[
        float | None, typer.Option(help="Predictions per day (default: the window's rate).")
    ] = None,
    horizon_days: Annotated[float, typer.Option(help="Days a retrained model would serve.")] = 30.0,
    workers: Annotated[int, typer.Option(min=1, help="Workers a training run uses.")] = 2,
    training_hours: Annotated[
        float | None, typer.Option(help="One run's wall-clock hours (default: median of past runs in MLflow).")
    ] = None,
    currency: Annotated[str, typer.Option(help="Currency name for the figures.")] = "USD",
    noise_z: Annotated[
        float, typer.Option(min=0.0, help="Standard errors of sampling noise left out of the accuracy drop (0: none).")
    ] = 1.645,
    submit: Annotated[Path | None, typer.Option(help="Training job YAML to submit when the answer is retrain.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for --submit.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
    store: Store = None,
) -> None:
    """Is retraining worth it? The extra errors' cost against a retrain's compute, explained.

    Example: skewless monitor retrain-check churn --cost-per-error 0.2 --compute-price 3 --submit jobs/configs/churn.yaml
    """
    from runtime.monitoring import RetrainCosts, retrain_check
    from runtime.monitoring import training_hours as past_hours

    report = _report(app, version, since, store)
    elapsed = max(1.0, min(time.time(), report.until) - report.since)
    traffic = traffic_per_day if traffic_per_day is not None else report.rows * 86400.0 / elapsed
    runs = 0
    if training_hours is None and report.model:
        from runtime.registry import configure_mlflow

        configure_mlflow()
        training_hours, runs = past_hours(report.model)
    costs = RetrainCosts(cost_per_error, compute_price, traffic, horizon_days, currency)
    decision = retrain_check(
        report, costs, training_hours=training_hours, runs_counted=runs, workers=workers, z=noise_z
    )
    if as_json:
        console.print_json(json.dumps(decision.to_dict(), default=str))
    else:
        console.print(decision.explain())
    if submit is not None and decision.retrain:
        from runtime.cluster import submit_job
        from runtime.training import job_files

        submission = submit_job(submit, "jobs.train", job_files, address)
        console.print(
            f"submitted training job [bold]{submission.job_id}[/]; follow with "
            f"`skewless train logs {submission.job_id} --follow`"
        )
    elif submit is not None:
        console.print("not submitting: the decision is to keep the model")
