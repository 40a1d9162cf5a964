"""Ray clusters from the CLI: submit and follow jobs through Ray's Jobs API."""

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

__all__ = [
    "SECRET_PATTERNS",
    "JobInfo",
    "Submission",
    "follow_logs",
    "forwarded_env",
    "job_entrypoint",
    "job_info",
    "job_logs",
    "list_jobs",
    "project_root",
    "stage_working_dir",
    "stop_job",
    "submit_job",
]
