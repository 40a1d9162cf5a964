"""The per-worker training loop that Ray Train runs on every rank.

Each rank streams its shard of the raw training rows from Ray Data, turns every batch into
features with the shared ``runtime.preprocessing`` transform (the same code serving runs),
trains the model under DDP, evaluates on its shard of the holdout (all-reduced), reports
metrics per epoch and checkpoints. A restarted run resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

CKPT_WEIGHTS, CKPT_OPTIMIZER, CKPT_STATE = "weights.safetensors", "optimizer.pt", "train_state.json"


def _loss_fn(task: str) -> Any:
    from torch import nn

    return {"binary": nn.BCEWithLogitsLoss, "multiclass": nn.CrossEntropyLoss}.get(task, nn.MSELoss)(reduction="sum")


def _targets(task: str, labels: np.ndarray, target_scale: tuple[float, float]) -> Any:
    import torch

    if task == "multiclass":
        return torch.from_numpy(labels.astype(np.int64))
    y = labels.astype(np.float32)
    if task == "regression":
        y = (y - np.float32(target_scale[0])) / np.float32(target_scale[1])
    return torch.from_numpy(y).unsqueeze(1)


def _make_optimizer(params: Any, cfg: dict[str, Any]) -> Any:
    import torch

    if cfg["name"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    cls = torch.optim.AdamW if cfg["name"] == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _mlflow_logger(config: dict[str, Any]) -> Any:
    """Rank 0 logs per-epoch metrics straight into the driver's MLflow run."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    import mlflow

    return mlflow.MlflowClient(tracking_uri=config["tracking_uri"]), run_id


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file, save_file

    from runtime.models import build_model
    from runtime.preprocessing import FittedPreprocessor

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed: int = config["seed"]
    torch.manual_seed(seed)  # identical initial weights on every rank
    task: str = config["task"]
    target_scale = tuple(config.get("target_scale", (0.0, 1.0)))
    prep = FittedPreprocessor.from_json(config["preprocessor"])

    model = build_model(config["model"])
    optimizer = _make_optimizer(model.parameters(), config["optimizer"])
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, CKPT_WEIGHTS)))
            optimizer.load_state_dict(torch.load(os.path.join(d, CKPT_OPTIMIZER), weights_only=True))
            with open(os.path.join(d, CKPT_STATE)) as f:
                start_epoch = json.load(f)["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    loss_fn = _loss_fn(task)
    per_worker_batch = max(1, config["batch_size"] // world)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    mlflow_log = _mlflow_logger(config) if rank == 0 else None

    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        total, rows = 0.0, 0
        for batch in train_shard.iter_batches(
            batch_size=per_worker_batch,
            batch_format="pyarrow",
            local_shuffle_buffer_size=max(per_worker_batch * 8, 1024),
            local_shuffle_seed=seed * 100_003 + epoch * 101 + rank,
        ):
            x = torch.from_numpy(prep.transform(batch)).to(device)
            y = _targets(task, prep.transform_label(batch), target_scale).to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            (loss / len(batch)).backward()
            optimizer.step()
            total += float(loss.detach())
            rows += len(batch)

        model.eval()
        v_total, v_rows, v_correct = 0.0, 0, 0.0
        with torch.inference_mode():
            for batch in valid_shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
                x = torch.from_numpy(prep.transform(batch)).to(device)
                y = _targets(task, prep.transform_label(batch), target_scale).to(device)
                out = model(x)
                v_total += float(loss_fn(out, y))
                v_rows += len(batch)
                if task == "binary":
                    v_correct += float(((out > 0).float() == y).sum())
                elif task == "multiclass":
                    v_correct += float((out.argmax(dim=1) == y).sum())
        total, n_rows, v_total, n_valid, v_correct = _all_reduce_sum([total, rows, v_total, v_rows, v_correct])
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train_loss": total / max(n_rows, 1),
            "valid_loss": v_total / max(n_valid, 1),
        }
        if task != "regression":
            metrics["valid_accuracy"] = v_correct / max(n_valid, 1)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                base: Any = model.module if hasattr(model, "module") else model
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()},
                    os.path.join(tmp, CKPT_WEIGHTS),
                )
                torch.save(optimizer.state_dict(), os.path.join(tmp, CKPT_OPTIMIZER))
                with open(os.path.join(tmp, CKPT_STATE), "w") as f:
                    json.dump({"epoch": epoch, "preprocessor_fingerprint": prep.fingerprint}, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if mlflow_log is not None:
            client, run_id = mlflow_log
            for key, value in metrics.items():
                if key != "epoch":
                    client.log_metric(run_id, key, value, step=epoch)
