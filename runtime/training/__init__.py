"""Training: the job configs, the driver's steps, the one worker loop every job runs, Tune,
reproduction, and the byte-level LM job.

- Configs: :class:`TrainJobConfig` (``python -m jobs.train``), :class:`LMJobConfig`
  (``python -m jobs.lm``), :class:`TuneJobConfig` (``python -m jobs.tune``).
- Steps (:mod:`._driver`): :func:`prepare` -> :func:`fit_preprocessing` -> :func:`train` ->
  :func:`package` (which runs :func:`evaluate_holdout` and stores the monitoring reference)
  -> :func:`register_run`; :func:`run_training`
  composes them, :func:`run_tune` and :func:`reproduce` compose them their own way.
- The worker loop (:mod:`._worker`) with its frozen :class:`WorkerConfig`, events and
  callbacks (:mod:`runtime.training.callbacks`), one optimizer step (:mod:`._step`), the
  job-specific objective (:mod:`._objective`) and data sources (:mod:`._sources`).
"""

from runtime.training._checkpoint import ResumePoint, load_checkpoint, save_checkpoint, save_rng_state
from runtime.training._config import (
    DataConfig,
    EarlyStoppingConfig,
    MemoryConfig,
    OptimizerConfig,
    RegistryConfig,
    TrainingConfig,
    TrainJobConfig,
    WatchdogConfig,
    job_files,
    load_train_config,
)
from runtime.training._driver import (
    Fitted,
    Packaged,
    Prepared,
    TrackedRun,
    Trained,
    evaluate_holdout,
    fit_preprocessing,
    package,
    prepare,
    run_training,
    tracked_run,
    train,
)
from runtime.training._evaluate import HoldoutStream, evaluate
from runtime.training._ingest import BottomK, features_stage, ingest_options, open_split, plan_ingest, read_dataset
from runtime.training._lm import LMJobConfig, split_tokens
from runtime.training._lm_driver import LMOutcome, prepare_corpus, run_lm
from runtime.training._objective import LMObjective, Objective, TabularObjective
from runtime.training._promote import TrainOutcome, register_run
from runtime.training._reproduce import Reproduction, reproduce
from runtime.training._sources import TokenSource, sample_windows, shuffled_batches
from runtime.training._step import (
    accumulate,
    guarded_step,
    lr_factor,
    make_optimizer,
    make_scheduler,
    micro_batch_agreement,
    rng_restore,
    rng_snapshot,
    sync_gradients,
    train_step,
)
from runtime.training._tune import TuneJobConfig, resolve_tune_config, run_tune
from runtime.training._worker import WorkerConfig, WorkerMemory, build_callbacks, train_loop_per_worker
from runtime.training.callbacks import Callback, CallbackList, Event, LoopState

__all__ = [
    "BottomK",
    "Callback",
    "CallbackList",
    "DataConfig",
    "EarlyStoppingConfig",
    "Event",
    "Fitted",
    "HoldoutStream",
    "LMJobConfig",
    "LMObjective",
    "LMOutcome",
    "LoopState",
    "MemoryConfig",
    "Objective",
    "OptimizerConfig",
    "Packaged",
    "Prepared",
    "RegistryConfig",
    "Reproduction",
    "ResumePoint",
    "TabularObjective",
    "TokenSource",
    "TrackedRun",
    "TrainJobConfig",
    "TrainOutcome",
    "Trained",
    "TrainingConfig",
    "TuneJobConfig",
    "WatchdogConfig",
    "WorkerConfig",
    "WorkerMemory",
    "accumulate",
    "build_callbacks",
    "evaluate",
    "evaluate_holdout",
    "features_stage",
    "fit_preprocessing",
    "guarded_step",
    "ingest_options",
    "job_files",
    "load_checkpoint",
    "load_train_config",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "micro_batch_agreement",
    "open_split",
    "package",
    "plan_ingest",
    "prepare",
    "prepare_corpus",
    "read_dataset",
    "register_run",
    "reproduce",
    "resolve_tune_config",
    "rng_restore",
    "rng_snapshot",
    "run_lm",
    "run_training",
    "run_tune",
    "sample_windows",
    "save_checkpoint",
    "save_rng_state",
    "shuffled_batches",
    "split_tokens",
    "sync_gradients",
    "tracked_run",
    "train",
    "train_loop_per_worker",
    "train_step",
]
