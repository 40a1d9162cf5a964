"""Training: the per-worker loop Ray Train runs, the driver that wires data, MLflow and Ray."""

from runtime.training._driver import TrainOutcome, run_training, split_holdout
from runtime.training._evaluate import evaluate, primary_metric

__all__ = ["TrainOutcome", "evaluate", "primary_metric", "run_training", "split_holdout"]
