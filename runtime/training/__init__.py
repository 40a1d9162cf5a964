"""Training: the per-worker loop Ray Train runs, its events, and the driver that wires data,
MLflow and Ray together."""

from runtime.training._driver import TrainOutcome, run_training
from runtime.training._evaluate import evaluate, primary_metric
from runtime.training._events import Callback, Event, LoopState

__all__ = [
    "Callback",
    "Event",
    "LoopState",
    "TrainOutcome",
    "evaluate",
    "primary_metric",
    "run_training",
]
