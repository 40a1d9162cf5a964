"""What a training job minimizes and how its validation is scored: the loop's one job-specific part.

The worker loop (:mod:`runtime.training._worker`) is the same for every job; an objective
tells it how to slice a batch into micro-batches, the summed loss of a micro-batch, what the
loss is averaged over (rows, or tokens), and the validation metrics. Objectives are small,
picklable values: the driver puts one in the :class:`~runtime.training._worker.WorkerConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.preprocessing import FEATURES, LABEL
from runtime.tasks import Head, task_for

TOKENS = "tokens"  # (batch, seq_len + 1) int64 windows: inputs and next-token targets


class Objective:
    """The interface; see the module docstring."""

    def rows(self, batch: dict[str, Any]) -> int:
        """Length of the batch dimension (what micro-batches slice)."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> int:
        """What the summed loss is divided by for the mean (rows, or tokens)."""
        return self.rows(batch)

    def input_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        raise NotImplementedError

    def loss_sum(self, model: Any, batch: dict[str, Any], device: Any) -> Any:
        """The summed loss of ``batch`` (a scalar tensor with grad)."""
        raise NotImplementedError

    def eval_sums(self, model: Any, batch: dict[str, Any], device: Any) -> dict[str, float]:
        """Additive validation sums over ``batch`` (they are all-reduced over ranks)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``valid_*`` metrics from all ranks' summed :meth:`eval_sums` (NaN when no rows)."""
        raise NotImplementedError

    def eval_keys(self) -> tuple[str, ...]:
        """The keys of :meth:`eval_sums`, always all of them, in this order: every rank
        all-reduces the same vector, whatever rows it had (none, too)."""
        raise NotImplementedError

    def metric_names(self) -> list[str]:
        """The ``valid_*`` metrics :meth:`eval_metrics` reports (early stopping and Tune pick one)."""
        return ["valid_loss"]

    def primary(self) -> str:
        """The validation metric early stopping watches by default."""
        return "valid_loss"

    def higher_is_better(self, metric: str) -> bool:
        return False


@dataclass(frozen=True)
class TabularObjective(Objective):
    """Rows of preprocessed features and encoded labels; the task decides loss and metrics."""

    task: str
    head: Head

    def rows(self, batch: dict[str, Any]) -> int:
        return len(batch[LABEL])

    def input_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        return tuple(batch[FEATURES].shape)

    def _forward(self, model: Any, batch: dict[str, Any], device: Any) -> Any:
        import torch

        return model(torch.from_numpy(batch[FEATURES]).to(device))

    def loss_sum(self, model: Any, batch: dict[str, Any], device: Any) -> Any:
        task = task_for(self.task)
        out = self._forward(model, batch, device)
        return task.loss()(out.float(), task.targets(batch[LABEL], self.head).to(device))

    def eval_sums(self, model: Any, batch: dict[str, Any], device: Any) -> dict[str, float]:
        task = task_for(self.task)
        out = self._forward(model, batch, device).float()
        loss = float(task.loss()(out, task.targets(batch[LABEL], self.head).to(device)))
        acc = task.accumulator(ranked=False)
        acc.add(task.predict(out.cpu().numpy(), self.head), batch[LABEL])
        return {"loss": loss, **acc.sums()}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        task = task_for(self.task)
        rows = sums.get("rows", 0.0)
        metrics = {"loss": sums.get("loss", 0.0) / rows if rows else float("nan")}
        metrics.update(task.accumulator(ranked=False).result(sums))
        return {f"valid_{k}": v for k, v in metrics.items()}

    def eval_keys(self) -> tuple[str, ...]:
        return ("loss", *task_for(self.task).sum_keys)

    def metric_names(self) -> list[str]:
        return ["valid_loss", *(f"valid_{m}" for m in task_for(self.task).additive_metrics())]

    def primary(self) -> str:
        return task_for(self.task).primary_metric("valid_").name

    def higher_is_better(self, metric: str) -> bool:
        return task_for(self.task).metric(metric).higher_is_better


@dataclass(frozen=True)
class LMObjective(Objective):
    """Next-token prediction over windows of ``seq_len + 1`` tokens; mean cross-entropy per token."""

    def rows(self, batch: dict[str, Any]) -> int:
        return len(batch[TOKENS])

    def count(self, batch: dict[str, Any]) -> int:
        windows = batch[TOKENS]
        return int(windows.shape[0] * (windows.shape[1] - 1))

    def input_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        windows = batch[TOKENS]
        return (int(windows.shape[0]), int(windows.shape[1] - 1))

    def loss_sum(self, model: Any, batch: dict[str, Any], device: Any) -> Any:
        import torch
        from torch.nn import functional as F

        windows = batch[TOKENS]
        if isinstance(windows, np.ndarray):
            windows = torch.from_numpy(windows)
            if getattr(device, "type", None) == "cuda":
                windows = windows.pin_memory()  # so the copy below overlaps with compute
        windows = windows.to(device, non_blocking=True)
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")

    def eval_sums(self, model: Any, batch: dict[str, Any], device: Any) -> dict[str, float]:
        return {"loss": float(self.loss_sum(model, batch, device)), "tokens": float(self.count(batch))}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        tokens = sums.get("tokens", 0.0)
        return {"valid_loss": sums.get("loss", 0.0) / tokens if tokens else float("nan")}

    def eval_keys(self) -> tuple[str, ...]:
        return ("loss", "tokens")
