"""Ray clusters from the CLI: submit and follow jobs through Ray's Jobs API; render the cloud
(``ray up``) and KubeRay specs from the project's job and Serve configs, validated against their schemas."""

from runtime.cluster._jobs import (
    SECRET_PATTERNS,
    JobInfo,
    Submission,
    follow_logs,
    forwarded_env,
    job_entrypoint,
    job_info,
    job_logs,
    list_jobs,
    project_root,
    stage_working_dir,
    stop_job,
    submit_job,
)
from runtime.cluster._kuberay import render_kuberay, tracking_uri
from runtime.cluster._render import (
    PROVIDERS,
    CloudSettings,
    default_image,
    render_manifests,
    render_ray_up,
    stale_manifests,
    token_file,
    write_manifests,
)
from runtime.cluster._schemas import kuberay_schema_dir, validate_kuberay, validate_ray_up
from runtime.cluster._sizing import JobResources, job_resources, serve_gpus

__all__ = [
    "PROVIDERS",
    "SECRET_PATTERNS",
    "CloudSettings",
    "JobInfo",
    "JobResources",
    "Submission",
    "default_image",
    "follow_logs",
    "forwarded_env",
    "job_entrypoint",
    "job_info",
    "job_logs",
    "job_resources",
    "kuberay_schema_dir",
    "list_jobs",
    "project_root",
    "render_kuberay",
    "render_manifests",
    "render_ray_up",
    "serve_gpus",
    "stage_working_dir",
    "stale_manifests",
    "stop_job",
    "submit_job",
    "token_file",
    "tracking_uri",
    "validate_kuberay",
    "validate_ray_up",
    "write_manifests",
]
