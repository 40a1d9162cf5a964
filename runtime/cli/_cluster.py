"""``skewless cluster``: Ray clusters on VMs (``ray up``) and Kubernetes (KubeRay).

``render`` writes the specs from the project's job and Serve configs (``runtime.cluster``);
nothing heavy is imported until a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

cluster_app = typer.Typer(
    help="Ray clusters: the `ray up` (AWS, GCP) and KubeRay specs, rendered from the project's configs.",
    no_args_is_help=True,
)

SETTINGS_HELP = (
    "Account setting NAME=VALUE, repeatable: aws_region, aws_ami, aws_bucket, gcp_project, gcp_region, "
    "gcp_zone, gcp_image, gcp_bucket (each file's header says what they are)."
)


@cluster_app.callback()
def _group() -> None:
    """A command group even while `render` is its only command (`skewless cluster render`)."""


@cluster_app.command("render")
def render(
    out: Annotated[Path, typer.Option(help="Directory to write aws.yaml, gcp.yaml and kubernetes/ into.")] = Path(
        "cluster"
    ),
    job_config: Annotated[
        Path, typer.Option(help="Training job YAML: the RayJob runs it; worker counts and GPUs come from it.")
    ] = Path("jobs/configs/churn.yaml"),
    serve_config: Annotated[
        Path, typer.Option(help="Serve config YAML: the RayService embeds it; GPU replicas come from it.")
    ] = Path("serve_apps/configs/churn.yaml"),
    image: Annotated[
        str | None, typer.Option(help="Image of the KubeRay pods (default skewless:<version>; cluster/README.md).")
    ] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", help=SETTINGS_HELP)] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if a file differs from a fresh render (for CI).")
    ] = False,
) -> None:
    """Render the cloud (`ray up`) and Kubernetes (KubeRay) specs from the job and Serve configs.

    Each spec is checked against its schema (Ray's ray-schema.json, KubeRay v1.7.0's CRDs) before it is written.

    Edit the configs, never the output, then re-render; account values (bucket, AMI, project) go in with --set.

    Example: skewless cluster render --set aws_ami=ami-0123456789abcdef0 --set aws_bucket=my-bucket --out my-cluster/
    """
    from runtime.cluster import CloudSettings, stale_manifests, write_manifests

    cloud = CloudSettings.parse(settings or [])
    if check:
        stale = stale_manifests(out, job_config, serve_config, image=image, settings=cloud)
        for path in stale:
            err_console.print(f"[red]stale[/] {path}")
        if stale:
            err_console.print("re-render with the same options: skewless cluster render ...")
            raise typer.Exit(1)
        console.print(f"[green]up to date[/]: the specs in {out} match a fresh render")
        return
    for path in write_manifests(out, job_config, serve_config, image=image, settings=cloud):
        console.print(f"wrote {path}")
