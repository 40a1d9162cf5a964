"""Ray clusters: join the one the user points at or start a local one; submit jobs to it."""

from runtime.cluster._connect import check_placeable, connect, cpus_for, started_locally
from runtime.cluster._jobs import (
    JobInfo,
    follow_logs,
    job_info,
    job_logs,
    list_jobs,
    stop_job,
    submit_training,
)

__all__ = [
    "JobInfo",
    "check_placeable",
    "connect",
    "cpus_for",
    "follow_logs",
    "job_info",
    "job_logs",
    "list_jobs",
    "started_locally",
    "stop_job",
    "submit_training",
]
