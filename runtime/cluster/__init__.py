"""Ray clusters: join the one the user points at, or start a local instance."""

from runtime.cluster._connect import connect, started_locally

__all__ = ["connect", "started_locally"]
