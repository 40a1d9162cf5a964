"""Ray clusters: join the one the user points at or start a local one; submit jobs to it."""

from runtime.cluster._connect import check_placeable, connect, started_locally
from runtime.cluster._jobs import (
    JobInfo,
    follow_logs,
    job_info,
    job_logs,
    list_jobs,
    stop_job,
    submit_training,
    wait_for_job,
)

__all__ = [
    "JobInfo",
    "check_placeable",
    "connect",
    "follow_logs",
    "job_info",
    "job_logs",
    "list_jobs",
    "started_locally",
    "stop_job",
    "submit_training",
    "wait_for_job",
]
