"""The language-model driver: corpus -> object store -> Ray Train -> MLflow.

Runs wherever ``python -m jobs.lm`` runs: on a laptop it starts (or joins) a local Ray
instance; under ``ray job submit`` it joins the cluster the job was submitted to. Workers
report to Ray Train; rank 0 returns the metric history, which the driver prints and logs to
MLflow after the run (one writer to the tracking store, no MLflow in the workers).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.cluster import check_placeable, connect, cpus_for
from runtime.data import generate_text, load_text_tokens
from runtime.errors import DatasetNotFoundError, SkewlessError, TrainingError
from runtime.training._lm import LMDataConfig, LMJobConfig, split_tokens

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class LMOutcome:
    """What a language-model run achieved. Losses are mean next-byte cross-entropy in nats."""

    final_loss: float  # held-out eval loss after the last step
    initial_loss: float  # the same held-out batches before the first step
    train_loss: float  # mean training loss over the last reporting window
    tokens_per_s: float  # all workers together, warm-up steps excluded
    mfu: float | None  # None where the device's peak is unknown (a CPU)
    n_params: int
    n_params_non_embedding: int
    steps: int
    device: str
    run_id: str | None  # the MLflow run, when tracking is on
    checkpoint_path: str | None
    history: tuple[dict[str, float], ...] = field(default=(), repr=False)


def prepare_corpus(cfg: LMDataConfig, progress: Progress = lambda msg: None) -> Path:
    """The corpus file: ``cfg.path``, generated first when it is missing and ``generate`` is on."""
    path = Path(cfg.path)
    if not path.is_file():
        if not cfg.generate:
            raise DatasetNotFoundError(
                f"data.path {cfg.path!r} does not exist; point it at a text file or set data.generate: true"
            )
        progress(f"generating a {cfg.n_bytes:,}-byte synthetic corpus at {path}")
        generate_text(path, cfg.n_bytes, cfg.seed)
    return path


def _params(cfg: LMJobConfig) -> dict[str, Any]:
    dump = cfg.model_dump()
    flat = {
        f"{section}.{k}": v for section, values in dump.items() if isinstance(values, dict) for k, v in values.items()
    }
    flat["experiment"] = dump["experiment"]
    return flat


def _start_tracking(cfg: LMJobConfig, progress: Progress) -> str | None:
    """The MLflow experiment id, or None when tracking is off or the store cannot be reached."""
    if not cfg.experiment:
        return None
    from runtime import registry

    try:
        registry.configure_mlflow()
        return registry.ensure_experiment(cfg.experiment)
    except Exception as exc:  # a remote tracking server that is down must not stop training
        progress(f"WARNING: MLflow store {registry.tracking_uri()} unavailable ({exc}); this run is not tracked")
        return None


def _fmt(metrics: dict[str, float]) -> str:
    parts = [f"step {int(metrics['step'])}", f"loss {metrics['loss']:.4f}", f"{metrics['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in metrics:
        parts.append(f"MFU {metrics['mfu']:.1%}")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['initial_eval_loss']:.4f} -> {metrics['eval_loss']:.4f}")
    return ", ".join(parts)


def run_lm(cfg: LMJobConfig, progress: Progress = lambda msg: logger.info(msg)) -> LMOutcome:
    """Train the byte-level language model on Ray Train; returns its losses and throughput."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runtime import registry
    from runtime.training._lm import lm_train_loop

    t0 = time.monotonic()
    t = cfg.training
    corpus = prepare_corpus(cfg.data, progress)
    tokens = load_text_tokens(corpus)
    split_tokens(tokens, cfg.data.valid_fraction, cfg.model.seq_len)  # fail here, not in a worker
    connect(min_cpus=cpus_for(t.num_workers, t.cpus_per_worker))
    check_placeable(cfg.training, ray.cluster_resources())
    tokens_ref = ray.put(tokens)  # one read-only copy per node, shared by its workers

    experiment_id = _start_tracking(cfg, progress)
    run_id: str | None = None
    with contextlib.ExitStack() as stack:
        if experiment_id is not None:
            import mlflow

            run_id = stack.enter_context(mlflow.start_run(experiment_id=experiment_id)).info.run_id
            mlflow.log_params(_params(cfg))
            mlflow.set_tags(
                {
                    "skewless.workload": "char_lm",
                    "skewless.dataset_path": str(corpus),
                    "skewless.dataset_sha256": registry.sha256_file(corpus),
                    "skewless.dataset_bytes": str(tokens.size),
                    "skewless.seed": str(t.seed),
                    **registry.git_info().as_tags(),
                }
            )
        m = cfg.model
        progress(
            f"training a {m.n_layers}-layer d_model={m.d_model} byte LM for {t.steps} steps on "
            f"{t.num_workers} worker(s) ({'GPU' if t.use_gpu else 'CPU'}), corpus {tokens.size:,} bytes"
        )
        trainer = TorchTrainer(
            lm_train_loop,  # type: ignore[arg-type]  # V2 keeps rank 0's return value; the stubs say None
            train_loop_config={"job": cfg.model_dump(mode="json"), "tokens": tokens_ref},
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            run_config=RunConfig(
                name=f"lm-{(run_id or uuid.uuid4().hex)[:12]}",
                storage_path=str(registry.skewless_home() / "ray_results"),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        try:
            result = trainer.fit()
        except SkewlessError:
            raise
        except Exception as exc:
            raise TrainingError(f"language-model run {run_id or ''} failed: {exc}") from exc
        summary = getattr(result, "return_value", None)  # Ray Train V2's Result (the stubs name V1's)
        if not isinstance(summary, dict) or not summary.get("history"):
            raise TrainingError("the language-model run ended without a summary from rank 0")
        history: list[dict[str, float]] = summary["history"]
        for metrics in history:
            progress(_fmt(metrics))
        if run_id is not None:
            import mlflow

            for metrics in history:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
            mlflow.log_params(
                {k: summary[k] for k in ("n_params", "n_params_non_embedding", "flops_per_token", "world_size")}
            )
            mlflow.set_tag("skewless.device", summary["device"])

    final = history[-1]
    outcome = LMOutcome(
        final_loss=float(final["eval_loss"]),
        initial_loss=float(final["initial_eval_loss"]),
        train_loss=float(final["loss"]),
        tokens_per_s=float(final["tokens_per_s"]),
        mfu=float(final["mfu"]) if "mfu" in final else None,
        n_params=int(summary["n_params"]),
        n_params_non_embedding=int(summary["n_params_non_embedding"]),
        steps=t.steps,
        device=str(summary["device"]),
        run_id=run_id,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        history=tuple(history),
    )
    progress(f"done in {time.monotonic() - t0:.1f}s; {outcome.n_params:,} parameters")
    return outcome
