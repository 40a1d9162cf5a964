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

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="skewless",
    help="Train a PyTorch model on Ray and serve it with no training-serving skew.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
serve_app = typer.Typer(help="Ray Serve applications.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(serve_app, name="serve")
app.add_typer(data_app, name="data")


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
    """Generate data, train on Ray, register in MLflow, serve, query, and check parity."""
    from runtime.cluster import started_locally
    from runtime.demo import run_demo

    console.rule("[bold]skewless demo")
    result = run_demo(rows=rows, epochs=epochs, workers=workers, port=port, progress=_progress)
    console.rule("[bold]done")
    console.print(f"model     {result.model_uri} (version {result.version})")
    console.print("holdout   " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    console.print(f"endpoint  {result.endpoint}/predict")
    console.print(f"parity    [{'green' if result.parity.ok else 'red'}]{result.parity}[/]")
    console.print(f"mlflow    {result.tracking_uri}")
    console.print(f"          browse: mlflow ui --backend-store-uri {result.tracking_uri}")
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


@train_app.command("run")
def train_run(config: Annotated[Path, typer.Argument(help="Training job YAML.")]) -> None:
    """Run a training job from this process (starts or joins Ray)."""
    from runtime.config import TrainJobConfig, load_config
    from runtime.training import run_training

    cfg = load_config(TrainJobConfig, config)
    outcome = run_training(cfg, config_dir=config.resolve().parent, progress=_progress)
    console.print(f"run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}")


@serve_app.command("deploy")
def serve_deploy(
    config: Annotated[Path, typer.Argument(help="Serve config YAML (the format `serve deploy` takes).")],
    address: Annotated[str, typer.Option(help="Ray dashboard address.")] = "http://127.0.0.1:8265",
) -> None:
    """Validate a Serve config and deploy it to a running Ray cluster, like `serve deploy`."""
    from runtime.serving._deploy import deploy_config

    names = deploy_config(config, address)
    console.print(f"submitted {', '.join(names)} to {address}; check with `serve status`")


@data_app.command("generate")
def data_generate(
    path: Annotated[Path, typer.Argument(help="Output Parquet file.")],
    rows: Annotated[int, typer.Option(min=1)] = 10_000,
    seed: Annotated[int, typer.Option()] = 0,
    task: Annotated[str, typer.Option(help="binary | multiclass | regression")] = "binary",
    shift: Annotated[list[str] | None, typer.Option(help="COLUMN=AMOUNT drift knob; repeatable.")] = None,
) -> None:
    """Write a synthetic tabular dataset (bounded memory, any size)."""
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

    try:
        return app(args=argv, standalone_mode=True)
    except SkewlessError as exc:
        if os.environ.get("SKEWLESS_DEBUG") == "1":
            raise
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
