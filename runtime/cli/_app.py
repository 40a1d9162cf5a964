"""``skewless`` commands. Each parses, calls one library function and prints with rich.

Nothing heavy (ray, torch, mlflow) is imported at module level, so ``--help`` is instant.
User errors (:class:`~runtime.errors.SkewlessError`) print without a traceback unless
``SKEWLESS_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from runtime.cli._cluster import cluster_app
from runtime.cli._monitor import monitor_app
from runtime.connect import VERBOSE_ENV

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="skewless",
    help="Train a PyTorch model on Ray and serve it with no training-serving skew.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
serve_app = typer.Typer(help="Ray Serve applications.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")
app.add_typer(data_app, name="data")
app.add_typer(monitor_app, name="monitor")
app.add_typer(cluster_app, name="cluster")


def _progress(msg: str) -> None:
    console.print(msg)


@app.command()
def demo(
    rows: Annotated[int, typer.Option(min=1000, help="Synthetic rows to generate.")] = 20_000,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 4,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers.")] = 2,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Serve HTTP port on 127.0.0.1.")] = 8000,
    keep_serving: Annotated[bool, typer.Option(help="Keep the endpoint up until Ctrl-C.")] = False,
) -> None:
    """Generate data, train on Ray, register in MLflow, serve, query, and check parity.

    Example: skewless demo --keep-serving
    """
    from runtime.connect import started_locally
    from runtime.demo import run_demo
    from runtime.redact import redact

    console.rule("[bold]skewless demo")
    result = run_demo(rows=rows, epochs=epochs, workers=workers, port=port, progress=_progress)
    console.rule("[bold]done")
    console.print(f"model     {result.model_uri} (version {result.version})")
    console.print("holdout   " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    console.print(f"endpoint  {result.endpoint}/predict")
    console.print(f"parity    [{'green' if result.parity.ok else 'red'}]{result.parity}[/]")
    console.print(f"mlflow    {redact(result.tracking_uri)}")
    console.print(f"          browse: mlflow ui --backend-store-uri {redact(result.tracking_uri)}")
    console.print(f"try it    {result.curl}")
    if not result.parity.ok:
        raise typer.Exit(1)
    if keep_serving:
        import time

        console.print("serving; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    elif started_locally():
        console.print(
            "(the endpoint stops with this command: pass --keep-serving, or run "
            "`ray start --head` first so the app outlives it)"
        )


VERBOSE_HELP = (
    "Show the engines' logs (Ray Data, Ray Train, workers' output) too; by default they go to the job's log file."
)


@train_app.command("run")
def train_run(
    config: Annotated[Path, typer.Argument(help="Training job YAML.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Run a training job from this process (starts or joins Ray), showing each epoch's
    progress (loss, rows/s) and any worker failure and resume.

    Example: skewless train run jobs/configs/churn.yaml
    """
    from runtime.training import load_train_config, run_training

    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # before Ray is joined: the workers' output is forwarded
    cfg = load_train_config(config)
    outcome = run_training(cfg, config_dir=config.resolve().parent, progress=_progress, verbose=verbose)
    console.print(f"run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}")


ADDRESS_HELP = "Ray dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)."


@train_app.command("submit")
def train_submit(
    config: Annotated[Path, typer.Argument(help="Training job YAML inside the project.")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Submit a training job through Ray's Jobs API (validated here first).

    Without --address: $RAY_ADDRESS, else the cluster `skewless cluster up` started, else 127.0.0.1:8265.

    Example: skewless train submit jobs/configs/churn.yaml --no-wait
    """
    from runtime.cluster import follow_logs, job_info, submit_job
    from runtime.training import job_files

    submission = submit_job(config, "jobs.train", job_files, address, verbose=verbose)
    for note in submission.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    job_id = submission.job_id
    console.print(
        f"submitted [bold]{job_id}[/] ({len(submission.shipped)} project files shipped); "
        f"follow with `skewless train logs {job_id} --follow`"
    )
    if not wait:
        return
    follow_logs(job_id, lambda chunk: console.out(chunk, end=""), address)
    info = job_info(job_id, address)
    console.print(f"job {job_id}: {info.status} {info.message}")
    if info.status != "SUCCEEDED":
        raise typer.Exit(1)


@train_app.command("status")
def train_status(job_id: str, address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None) -> None:
    """Show a job's status.

    Example: skewless train status raysubmit_XYZ
    """
    from runtime.cluster import job_info

    info = job_info(job_id, address)
    console.print(f"{info.job_id}: {info.status} {info.message}".rstrip())


@train_app.command("logs")
def train_logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
) -> None:
    """Print a job's logs.

    Example: skewless train logs raysubmit_XYZ --follow
    """
    from runtime.cluster import follow_logs, job_logs

    if follow:
        follow_logs(job_id, lambda chunk: console.out(chunk, end=""), address)
    else:
        console.out(job_logs(job_id, address), end="")


@train_app.command("stop")
def train_stop(job_id: str, address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None) -> None:
    """Ask Ray to stop a running job.

    Example: skewless train stop raysubmit_XYZ
    """
    from runtime.cluster import stop_job

    console.print(f"{job_id}: {'stop requested' if stop_job(job_id, address) else 'not running'}")


@train_app.command("list")
def train_list(address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None) -> None:
    """List the cluster's jobs, oldest first.

    Example: skewless train list
    """
    from rich.table import Table

    from runtime.cluster import list_jobs

    table = Table("job", "status", "entrypoint")
    for job in list_jobs(address):
        table.add_row(job.job_id, job.status, job.entrypoint)
    console.print(table)


@serve_app.command("deploy")
def serve_deploy(
    config: Annotated[Path, typer.Argument(help="Serve config YAML (the format `serve deploy` takes).")],
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
) -> None:
    """Validate a Serve config and deploy it to a running Ray cluster, like `serve deploy`.

    Example: skewless serve deploy serve_apps/configs/churn.yaml
    """
    from runtime.redact import redact
    from runtime.serving import deploy_config

    used, names = deploy_config(config, address)
    console.print(f"submitted {', '.join(names)} to {redact(used)}; check with `serve status`")


rollout_app = typer.Typer(
    help="Canary with automated analysis, sticky A/B and shadow rollouts of a registered model on Ray Serve.",
    no_args_is_help=True,
)
serve_app.add_typer(rollout_app, name="rollout")
SPEC_HELP = "Rollout spec YAML (see the README's 'Rollouts' section)."


def _rollout_spec(path: Path) -> Any:
    from runtime.config import load_config
    from runtime.serving import RolloutSpec

    return load_config(RolloutSpec, path, name=str(path))


@rollout_app.command("start")
def rollout_start(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    window: Annotated[float | None, typer.Option(help="Override analysis.window_s (seconds).")] = None,
) -> None:
    """Deploy the router in front of baseline and candidate and run the rollout to its verdict.

    Example: skewless serve rollout start serve_apps/rollouts/churn.yaml
    Exit code 0 when promoted or passed, 3 when rolled back or aborted.
    """
    _run_strategy(spec, _rollout_spec(spec).strategy, window)


def _run_strategy(spec: Path, strategy: str, window: float | None) -> None:
    from runtime.serving import run_rollout

    loaded = _rollout_spec(spec).model_copy(update={"strategy": strategy})
    if window is not None:
        loaded = loaded.model_copy(update={"analysis": loaded.analysis.model_copy(update={"window_s": window})})
    loaded = type(loaded).model_validate(loaded.model_dump())  # the strategy's own rules
    result = run_rollout(loaded, progress=_progress)
    colour = "green" if result.outcome in ("promoted", "passed") else "red"
    console.print(f"[{colour}]{result.outcome}[/]: {result.reason}")
    console.print(f"report: {result.report}")
    if result.outcome not in ("promoted", "passed"):
        raise typer.Exit(3)


@rollout_app.command("shadow")
def rollout_shadow(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    window: Annotated[float | None, typer.Option(help="Override analysis.window_s (seconds).")] = None,
) -> None:
    """Mirror live traffic to the candidate (never answered from it) and judge its disagreement.

    Example: skewless serve rollout shadow serve_apps/rollouts/churn.yaml
    Moves champion only with promote_on_pass: true. Exit 0 when it passed, 3 otherwise.
    """
    _run_strategy(spec, "shadow", window)


@rollout_app.command("ab")
def rollout_ab(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    window: Annotated[float | None, typer.Option(help="Override analysis.window_s (seconds).")] = None,
) -> None:
    """Sticky A/B: keys in the sticky header (x-skewless-key) split `split`% to the candidate, judged per window.

    Example: skewless serve rollout ab serve_apps/rollouts/churn.yaml --window 300
    Moves champion only with promote_on_pass: true. Exit 0 when it passed, 3 otherwise.
    """
    _run_strategy(spec, "ab", window)


@rollout_app.command("status")
def rollout_status_cmd(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    json_out: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
) -> None:
    """The rollout's step, weights, the judge's figures and the verdict so far.

    Example: skewless serve rollout status serve_apps/rollouts/churn.yaml --json
    """
    import json

    from rich.table import Table

    from runtime.serving import rollout_status

    state = rollout_status(_rollout_spec(spec).app)
    if json_out:
        console.print_json(json.dumps(state, default=str))
        return
    config = state.get("config", {})
    console.print(
        f"[bold]{state.get('status')}[/] {state.get('strategy')} of {state.get('model')}: "
        f"baseline v{state.get('baseline')}, candidate v{state.get('candidate')} at {state.get('endpoint')}"
    )
    console.print(
        f"weights {config.get('weights')}; shadow {config.get('shadow')}; reason: {state.get('reason') or '-'}"
    )
    table = Table("window", "candidate %", "verdict", "baseline req/err%/p99", "candidate req/err%/p99", "checks")
    for i, w in enumerate(state.get("windows", [])):
        b, c = w["baseline"], w["candidate"]
        checks = ", ".join(f"{k}={v:.3g}" for k, v in w["checks"].items() if v is not None)
        table.add_row(
            str(i + 1),
            f"{w['weight']:g}",
            w["outcome"],
            f"{b['requests']:.0f}/{100 * b['error_rate']:.2f}/{b['p99_ms']:.1f}",
            f"{c['requests']:.0f}/{100 * c['error_rate']:.2f}/{c['p99_ms']:.1f}",
            checks,
        )
    console.print(table)


@rollout_app.command("promote")
def rollout_promote(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    reason: Annotated[str, typer.Option(help="Recorded in the alias history.")] = "promoted by the operator",
) -> None:
    """Move all traffic and champion to the candidate now (compare-and-swap from the baseline).

    Example: skewless serve rollout promote serve_apps/rollouts/churn.yaml --reason "looks good"
    """
    from runtime.serving import promote_rollout

    promote_rollout(_rollout_spec(spec), reason, progress=_progress)


@rollout_app.command("rollback")
def rollout_rollback(
    spec: Annotated[Path, typer.Argument(help=SPEC_HELP)],
    reason: Annotated[str, typer.Option(help="Recorded in the alias history.")] = "rolled back by the operator",
) -> None:
    """Return all traffic (and champion, if it moved) to the baseline.

    Example: skewless serve rollout rollback serve_apps/rollouts/churn.yaml
    """
    from runtime.serving import rollback_rollout

    rollback_rollout(_rollout_spec(spec), reason, progress=_progress)


@rollout_app.command("abort")
def rollout_abort(spec: Annotated[Path, typer.Argument(help=SPEC_HELP)]) -> None:
    """Stop the analysis and return traffic to the baseline, leaving the alias where it is.

    Example: skewless serve rollout abort serve_apps/rollouts/churn.yaml
    """
    from runtime.serving import abort_rollout

    abort_rollout(_rollout_spec(spec), progress=_progress)


@models_app.command("lineage")
def models_lineage(
    model_uri: Annotated[str, typer.Argument(help="models:/<name>@<alias> or models:/<name>/<version>")],
) -> None:
    """Show the data, preprocessing, code and environment that made a registered model.

    Example: skewless models lineage models:/churn@champion
    """
    from rich.table import Table

    from runtime.registry import configure_mlflow, model_lineage

    configure_mlflow()
    lineage = model_lineage(model_uri)
    table = Table(show_header=False, box=None, pad_edge=False)
    for what, value in lineage.rows():
        table.add_row(f"[bold]{what}[/]", value)
    console.print(table)


@models_app.command("history")
def models_history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Only this alias (e.g. champion).")] = None,
) -> None:
    """Every recorded alias move of a model: from, to, who, when and why.

    Example: skewless models history churn-demo --alias champion
    """
    import time

    from rich.table import Table

    from runtime.registry import alias_history, configure_mlflow

    configure_mlflow()
    table = Table("#", "when (UTC)", "alias", "from", "to", "who", "why")
    for move in alias_history(name, alias):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(move.at))
        table.add_row(
            str(move.seq), when, move.alias, move.from_version or "-", move.to_version, move.actor, move.reason
        )
    console.print(table)


@models_app.command("verify")
def models_verify(
    model_uri: Annotated[
        str, typer.Argument(help="models:/<name>@<alias>, models:/<name>/<version>, or a packaged model directory")
    ],
) -> None:
    """Check every file of a model against the manifest recorded at registration (MLmodel and the
    code file MLflow runs on load included), without running any of it.

    Example: skewless models verify models:/churn@champion
    """
    import tempfile

    from runtime.registry import configure_mlflow, verify

    configure_mlflow()
    with tempfile.TemporaryDirectory(prefix="skewless-verify-") as tmp:
        verified = verify(model_uri, tmp)
    where = f"models:/{verified.ref.name}/{verified.ref.version}" if verified.ref else str(verified.root)
    for name in sorted(verified.files):
        console.print(f"  ok  {verified.files[name][:16]}  {name}")
    console.print(f"[green]verified[/] {where}: {len(verified.files)} file(s) match the recorded sha256")


@app.command()
def reproduce(
    model_uri: Annotated[str, typer.Argument(help="models:/<name>@<alias> or models:/<name>/<version>")],
    data: Annotated[
        str | None, typer.Option(help="The dataset path, when the recorded one was redacted (it had credentials).")
    ] = None,
) -> None:
    """Re-run a registered model's training from its lineage; exit 1 unless it is the same model, bit for bit.

    Example: skewless reproduce models:/churn@champion
    """
    from rich.table import Table

    from runtime.training import reproduce as run

    result = run(model_uri, progress=_progress, data_path=data)
    table = Table("metric", "original", "reproduced", "difference")
    for name, old, new, diff in result.differences():
        table.add_row(name, f"{old:.6f}", f"{new:.6f}", f"{diff:+.2e}")
    console.print(table)
    console.print(f"reproduced as models:/{result.outcome.model_name}/{result.outcome.version} (aliases unchanged)")
    if result.exact:
        console.print("[green]exact[/]: the same weights, bit for bit, and the same holdout metrics")
        return
    err_console.print(f"[red]not exact[/]: {'; '.join(result.mismatches())}")
    if result.original_ingest == "stream":
        err_console.print(
            "the original run streamed its data (data.ingest: stream), so what each worker saw depended on how the "
            "cluster's readers cut the files into blocks; runs that train from memory reproduce on any cluster shape"
        )
    raise typer.Exit(1)


@data_app.command("generate")
def data_generate(
    path: Annotated[Path, typer.Argument(help="Output Parquet file.")],
    rows: Annotated[int, typer.Option(min=1)] = 10_000,
    seed: Annotated[int, typer.Option()] = 0,
    task: Annotated[str, typer.Option(help="binary | multiclass | regression")] = "binary",
    shift: Annotated[list[str] | None, typer.Option(help="COLUMN=AMOUNT drift knob; repeatable.")] = None,
) -> None:
    """Write a synthetic tabular dataset (bounded memory, any size).

    Example: skewless data generate ~/.skewless/data/churn.parquet --rows 20000
    """
    from runtime.data import SyntheticConfig, generate_synthetic
    from runtime.errors import ConfigError

    shifts: dict[str, float] = {}
    for item in shift or []:
        col, sep, amount = item.partition("=")
        try:
            shifts[col] = float(amount)
        except ValueError:
            raise ConfigError(f"--shift {item!r}: expected COLUMN=AMOUNT, e.g. --shift age=1.5") from None
        if not sep:
            raise ConfigError(f"--shift {item!r}: expected COLUMN=AMOUNT, e.g. --shift age=1.5")
    out = generate_synthetic(path, SyntheticConfig(rows=rows, seed=seed, task=task, shift=shifts))  # type: ignore[arg-type]
    console.print(f"wrote {rows} rows to {out}")


def main(argv: list[str] | None = None) -> Any:
    from runtime.errors import SkewlessError
    from runtime.redact import redact

    args = sys.argv[1:] if argv is None else argv
    if not os.environ.get("RAY_ADDRESS") and not any(a.startswith("--address") for a in args):
        from runtime.connect import use_current_cluster

        use_current_cluster()  # before Ray is imported: its token path and the tracking server
    try:
        return app(args=argv, standalone_mode=True)
    except SkewlessError as exc:
        if os.environ.get("SKEWLESS_DEBUG") == "1":
            raise
        from rich.markup import escape

        err_console.print("[red]error:[/] " + escape(redact(str(exc))))  # the message as text, not markup
        sys.exit(2)
