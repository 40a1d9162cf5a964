"""The language-model driver: corpus -> object store -> the shared worker loop -> MLflow registry.

Runs wherever ``python -m jobs.lm`` runs: on a laptop it starts (or joins) a local Ray
instance; under ``ray job submit`` it joins the cluster the job was submitted to. The workers
run :func:`runtime.training._worker.train_loop_per_worker` with the LM objective, so the job
gets the OOM guard, the memory tracker and watchdog, checkpoints and MLflow logging like any
other; rank 0 returns the metric history. The trained model is packaged (weights,
``model.json``, manifest), logged as a pyfunc and registered with its lineage (alias
``candidate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import registry
from runtime.connect import check_placeable, connect, cpus_for
from runtime.data import generate_text, load_text_tokens
from runtime.errors import DatasetNotFoundError, TrainingError
from runtime.models import build_model, flops_per_token, num_parameters
from runtime.redact import redact
from runtime.registry import LineageRecord, RunLogger, Tag
from runtime.training._config import OptimizerConfig
from runtime.training._launch import RunPlaces, fit_watched, worker_memory
from runtime.training._lm import LMDataConfig, LMJobConfig, split_tokens
from runtime.training._objective import LMObjective
from runtime.training._worker import TokenData, WorkerConfig, train_loop_per_worker
from runtime.training.callbacks import Callback, ThroughputMeter

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class LMOutcome:
    """What a language-model run achieved. Losses are mean next-byte cross-entropy in nats."""

    final_loss: float  # held-out loss after the last step
    initial_loss: float  # the same held-out windows before the first step
    train_loss: float  # mean training loss over the last reporting interval
    tokens_per_s: float  # all workers together, warm-up steps excluded
    mfu: float | None  # None where the device's peak is unknown (a CPU)
    n_params: int
    n_params_non_embedding: int
    steps: int
    device: str
    run_id: str | None  # the MLflow run, when tracking is on
    checkpoint_path: str | None
    model_uri: str | None  # the registered version, when registered
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


def _fmt(metrics: dict[str, float]) -> str:
    parts = [f"step {int(metrics['step'])}", f"loss {metrics['train_loss']:.4f}"]
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {metrics['mfu']:.1%}")
    parts.append(f"eval loss {metrics['valid_loss']:.4f}")
    return ", ".join(parts)


@contextlib.contextmanager
def _tracked(cfg: LMJobConfig, record: LineageRecord, progress: Progress) -> Iterator[str | None]:
    """The MLflow run id, or None when tracking is off or the store cannot be reached."""
    if not cfg.experiment:
        yield None
        return
    import mlflow

    try:
        registry.configure_mlflow()
        experiment_id = registry.ensure_experiment(cfg.experiment)
    except Exception as exc:  # a remote tracking server that is down must not stop training
        progress(
            f"WARNING: MLflow store {redact(registry.tracking_uri())} unavailable ({redact(str(exc))}); "
            "this run is not tracked"
        )
        yield None
        return
    with mlflow.start_run(experiment_id=experiment_id) as run:
        dump = cfg.model_dump(mode="json")
        mlflow.log_params(
            {
                f"{s}.{k}": v
                for s, values in dump.items()
                if isinstance(values, dict)
                for k, v in values.items()
                if not isinstance(v, dict)
            }
        )
        mlflow.set_tags(record.to_tags())
        yield run.info.run_id


def run_lm(
    cfg: LMJobConfig, progress: Progress = lambda msg: logger.info(msg), callbacks: list[Callback] | None = None
) -> LMOutcome:
    """Train the byte-level language model on Ray Train, then package and register it.
    ``callbacks`` join the worker loop's (pickled to the workers)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runtime.training._checkpoint import load_weights

    t0 = time.monotonic()
    t, m = cfg.training, cfg.model
    corpus = prepare_corpus(cfg.data, progress)
    tokens = load_text_tokens(corpus)
    split_tokens(tokens, cfg.data.valid_fraction, m.seq_len)  # fail here, not in a worker
    connect(min_cpus=cpus_for(t.num_workers, t.cpus_per_worker))
    check_placeable(t, ray.cluster_resources())
    tokens_ref = ray.put(tokens)  # one read-only copy per node, shared by its workers

    model_config = m.artifact_config(m.io)
    with torch.device("meta"):  # shapes only: count parameters without allocating them
        shape = build_model(model_config)
    n_params, n_non_emb = num_parameters(shape), num_parameters(shape, exclude_embeddings=True)
    fpt = flops_per_token(n_non_emb, m.n_layers, m.d_model, m.seq_len)
    data_sha = registry.sha256_file(corpus)
    record = LineageRecord.collect(
        workload="char_lm",
        architecture=m.architecture,
        dataset_path=str(corpus),
        dataset_sha256=data_sha,
        seed=t.seed,
        fingerprints={"code": registry.inference_code_fingerprint(model_config)},
    )
    with _tracked(cfg, record, progress) as run_id:
        progress(
            f"training a {m.n_layers}-layer d_model={m.d_model} byte LM for {t.steps} steps on "
            f"{t.num_workers} worker(s) ({'GPU' if t.use_gpu else 'CPU'}), corpus {tokens.size:,} bytes"
        )
        name = f"lm-{(run_id or uuid.uuid4().hex)[:12]}"
        places = RunPlaces(str(registry.skewless_home() / "ray_results"), name, run_id or name, run_id)
        fingerprint = hashlib.sha256(f"{data_sha}:{json.dumps(model_config, sort_keys=True)}".encode()).hexdigest()
        worker = WorkerConfig(
            objective=LMObjective(),
            data=TokenData(
                tokens_ref,
                cfg.data.valid_fraction,
                m.seq_len,
                t.steps,
                t.log_every,
                t.eval_batches,
                on_device=t.tokens_on_device,
            ),
            model=model_config,
            optimizer=OptimizerConfig(name="adamw", lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95)),
            seed=t.seed,
            epochs=math.ceil(t.steps / t.log_every),
            batch_size=t.batch_size * t.num_workers,
            run_fingerprint=fingerprint,
            micro_batch_size=t.micro_batch_size,
            precision=t.precision,
            lr_schedule="cosine",
            warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio,
            grad_clip=t.grad_clip,
            compile=t.compile,
            evaluate_at_start=True,
            memory=worker_memory(cfg.memory, places),
            run_logger=RunLogger(registry.tracking_uri(), run_id) if run_id else None,
            checkpoint_files={"model.json": json.dumps(model_config)},
            checkpoint_each_epoch=False,  # an 86M-parameter model and its Adam state: once, at the end
            callbacks=(ThroughputMeter(fpt, t.precision), *(callbacks or ())),
        )
        trainer = TorchTrainer(
            train_loop_per_worker,  # type: ignore[arg-type]  # V2 keeps rank 0's return value; the stubs say None
            train_loop_config={"worker": worker},
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            run_config=RunConfig(
                name=name, storage_path=places.storage, checkpoint_config=CheckpointConfig(num_to_keep=1)
            ),
        )
        result = fit_watched(trainer, cfg.memory, places, progress)
        summary = getattr(result, "return_value", None)  # Ray Train V2's Result (the stubs name V1's)
        if not isinstance(summary, dict) or not summary.get("history"):
            raise TrainingError("the language-model run ended without a summary from rank 0")
        history: list[dict[str, float]] = summary["history"]
        for metrics in history:
            progress(_fmt(metrics))
        model_uri = None
        if run_id is not None and result.checkpoint is not None:
            import mlflow

            mlflow.log_params({"n_params": n_params, "n_params_non_embedding": n_non_emb, "flops_per_token": fpt})
            mlflow.set_tag(Tag.DEVICE, summary["device"])
            with result.checkpoint.as_directory() as d:
                weights = load_weights(Path(d), model_config)
            model_uri = _register(cfg, run_id, weights, model_config, places.local / "model", progress)

    final = history[-1]
    outcome = LMOutcome(
        final_loss=float(final["valid_loss"]),
        initial_loss=float(history[0].get("initial_valid_loss", float("nan"))),
        train_loss=float(final["train_loss"]),
        tokens_per_s=float(final.get("tokens_per_s", 0.0)),
        mfu=float(final["mfu"]) if "mfu" in final else None,
        n_params=n_params,
        n_params_non_embedding=n_non_emb,
        steps=t.steps,
        device=str(summary["device"]),
        run_id=run_id,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        model_uri=model_uri,
        history=tuple(history),
    )
    progress(f"done in {time.monotonic() - t0:.1f}s; {outcome.n_params:,} parameters")
    return outcome


def _register(
    cfg: LMJobConfig,
    run_id: str,
    weights: dict[str, Any],
    model_config: dict[str, Any],
    model_dir: Path,
    progress: Progress,
) -> str | None:
    """Package the weights, log them as a pyfunc and register the version (alias ``candidate``)."""
    import mlflow

    registry.write_model_dir(model_dir, weights, model_config, None)
    uri, manifest_sha = registry.log_pyfunc_model(model_dir, None)
    mlflow.set_tags({Tag.MODEL_URI: uri, Tag.MANIFEST_SHA256: manifest_sha})
    name = cfg.registry.model_name
    if name is None:
        return None
    ref = registry.register(uri, name, tags=Tag.for_version(mlflow.MlflowClient().get_run(run_id).data.tags))
    registry.set_alias(name, registry.CANDIDATE, ref.version)
    progress(f"registered models:/{name}/{ref.version} (alias candidate)")
    return ref.uri
