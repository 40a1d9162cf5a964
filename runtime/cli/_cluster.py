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


@cluster_app.command("up")
def up(
    spec: Annotated[
        Path,
        typer.Argument(
            help="Cluster spec: local (cluster/local.yaml), `ray up` (cluster/aws.yaml, cluster/gcp.yaml) "
            "or KubeRay manifests (cluster/kubernetes/raycluster.yaml)."
        ),
    ] = Path("cluster/local.yaml"),
) -> None:
    """Start a cluster: a real multi-node Ray cluster on this machine (MLflow's tracking server on
    the head), or a cloud one through Ray's launcher (`ray up`), or KubeRay's (`kubectl apply`).

    Local: every port on 127.0.0.1, token auth on (the token stays in the cluster's state
    directory, 0600); later commands without --address use this cluster. Cloud: the token file the
    spec mounts is made first (0600), then `ray up -y` runs with its own output.

    Example: skewless cluster up cluster/local.yaml
    """
    from runtime.cluster import cluster_up, launch, load_spec, spec_kind

    if spec_kind(spec) != "local":
        code = launch(spec, "up", progress=console.print)
        if code:
            raise typer.Exit(code)
        return
    state = cluster_up(load_spec(spec), progress=console.print)
    console.print(f"dashboard  {state.dashboard}   (remote: ssh -L 8265:{state.dashboard[7:]} <host>)")
    console.print(f"tracking   {state.tracking_uri}")
    console.print(f"token      {state.token_path} (0600; never printed)")


@cluster_app.command("down")
def down(
    name: Annotated[
        str | None,
        typer.Argument(help="Local cluster name (default: the current one), or a `ray up` / KubeRay spec file."),
    ] = None,
) -> None:
    """Stop a cluster: every process a local `cluster up` started (workers, head, tracking
    server) and nothing else, or a cloud one through `ray down` / `kubectl delete`.

    Example: skewless cluster down
    """
    from runtime.cluster import cluster_down, launch, spec_kind

    if name is not None and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        if spec_kind(Path(name)) != "local":
            code = launch(Path(name), "down", progress=console.print)
            if code:
                raise typer.Exit(code)
            return
        from runtime.cluster import load_spec

        name = load_spec(name).name
    cluster_down(name, progress=console.print)


@cluster_app.command("status")
def status(
    name: Annotated[str | None, typer.Argument(help="Cluster name (default: the current one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Nodes and their resources, jobs, Serve applications and replicas, addresses, listeners.

    Example: skewless cluster status --json
    """
    import json

    from rich.table import Table

    from runtime.cluster import cluster_status

    st = cluster_status(name)
    if as_json:
        console.print_json(json.dumps(st.to_dict(), default=str))
        return
    console.print(f"[bold]{st.name}[/]  dashboard {st.dashboard}  tracking {st.tracking_uri}")
    nodes = Table("node", "role", "state", "CPU", "GPU", "memory", "other resources")
    for n in st.nodes:
        r = dict(n["resources"])
        other = {
            k: v
            for k, v in r.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
        }
        nodes.add_row(
            str(n["node_id"])[:12],
            "head" if n["head"] else "worker",
            str(n["state"]),
            f"{r.get('CPU', 0):g}",
            f"{r.get('GPU', 0):g}",
            f"{r.get('memory', 0) / 2**30:.1f} GiB",
            ", ".join(f"{k}={v:g}" for k, v in other.items()),
        )
    console.print(nodes)
    for g in st.gpus:
        console.print(f"GPU {g['index']}: {g['name']}, {g['memory_bytes'] / 2**30:.0f} GiB (NVML)")
    jobs = Table("job", "status", "entrypoint")
    for j in st.jobs:
        jobs.add_row(str(j["job_id"]), str(j["status"]), str(j["entrypoint"])[:60])
    console.print(jobs if st.jobs else "jobs: none")
    for app_name, app in st.applications.items():
        reps = ", ".join(f"{d}: {n}" for d, n in app["replicas"].items())
        console.print(f"serve app {app_name} ({app['route_prefix']}): {app['status']}, replicas {reps}")
    hosts = sorted({(x["host"], x["port"], x["process"]) for x in st.listeners})
    exposed = [h for h in hosts if h[0] not in ("127.0.0.1", "::1")]
    console.print(
        f"listeners: {len(hosts)} sockets, "
        + ("all on 127.0.0.1" if not exposed else f"[bold red]{len(exposed)} not on loopback[/]: {exposed[:8]}")
    )
