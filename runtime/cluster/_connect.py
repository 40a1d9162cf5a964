"""Joining Ray: ``RAY_ADDRESS`` or a running local cluster if there is one, else a new local one.

``RAY_ADDRESS=local`` always starts a new local instance, even beside a running cluster.

A new local instance gets more logical CPUs than the machine has cores (at least
``min_cpus``), so that Train workers, Ray Data tasks and Serve replicas can coexist on a
2-core laptop. Token authentication stays on (Ray's default for local clusters).
"""

from __future__ import annotations

import logging
import os

_started_here = False


def connect(min_cpus: int = 8) -> None:
    """Connect this process to Ray once; a no-op when already connected."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(address=address, **quiet)  # type: ignore[arg-type]
        return
    if not address:
        try:
            ray.init(address="auto", **quiet)  # type: ignore[arg-type]
            return
        except ConnectionError:
            pass
    ray.init(num_cpus=max(min_cpus, os.cpu_count() or 1), include_dashboard=False, **quiet)  # type: ignore[arg-type]
    _started_here = True


def started_locally() -> bool:
    """Whether :func:`connect` started a Ray instance that dies with this process."""
    return _started_here
