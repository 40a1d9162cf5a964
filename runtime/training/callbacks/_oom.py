"""The OOM guard: survive a CUDA out-of-memory with an unchanged effective batch, and leave a
bundle a person can read.

How it plugs into the training loop (:func:`runtime.training.guarded_step`):

- the loop runs a step's micro-batches with no collective in between (DDP's gradient
  all-reduce is deferred to one explicit all-reduce after the last micro-batch), so a rank
  that runs out of memory mid-step can retry the step on its own without leaving another
  rank waiting in a half-matched all-reduce;
- :meth:`OomGuard.on_oom` catches ``torch.cuda.OutOfMemoryError`` (the class, not string
  matching), writes a diagnostics bundle, frees what the failed step held, and halves the
  micro-batch; the loop retries the step;
- before the gradient all-reduce every rank takes part in a 16-byte all-reduce of its
  micro-batch size (min and max) on a CPU (gloo) group: the collective that tells every
  rank. Ranks with a larger micro-batch than the minimum recompute their step with it and
  all ranks agree again, until min == max; so all ranks accumulate the same way and the
  result equals a run that started at the smaller micro-batch. A minimum of 0 means a rank
  could not fit micro-batch 1: every rank stops with that error together.
- on the happy path the guard does nothing per step but read ``num_alloc_retries`` from
  ``torch.cuda.memory_stats`` (a host-side counter read: no CUDA synchronization); the
  agreement is a CPU collective, not a CUDA one. A thrashing allocator (retries growing
  step after step) halves the micro-batch the same way.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import pickle
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Literal

from runtime.errors import ConfigError
from runtime.memory import ThrashDetector, all_thread_stacks, host_memory_report, nvml_report, private_diagnostics_dir
from runtime.registry import RunLogger
from runtime.training.callbacks._base import Callback, LoopState

logger = logging.getLogger(__name__)

HISTORY_ENTRIES = 20_000
UNATTRIBUTED = "unattributed"
NO_HISTORY = (
    "activations and other temporaries (allocated minus the above; this bundle has no allocator "
    "history: `record_history: always` names their source lines)"
)
HistoryMode = Literal["always", "after_first_oom", "never"]
HISTORY_MODES: tuple[HistoryMode, ...] = ("always", "after_first_oom", "never")
MAX_BUNDLES_PER_RANK = 3
_MB = 1 << 20


def is_cuda_oom(error: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(error, torch.cuda.OutOfMemoryError)


class OomGuard(Callback):
    """Catches CUDA OOMs, writes a diagnostics bundle, halves the micro-batch.

    ``diagnostics_dir`` is a local path or a ``pyarrow.fs`` URI (the run's storage); bundles
    are also logged to the MLflow run through ``run_logger``, under ``diagnostics/``.
    """

    def __init__(
        self,
        diagnostics_dir: str,
        run_logger: RunLogger | None = None,
        record_history: str | bool = "after_first_oom",
        thrash_window: int = 3,
        context: dict[str, Any] | None = None,
        check_every_steps: int = 25,
    ) -> None:
        if record_history is True or record_history is False:
            record_history = "always" if record_history else "never"
        if record_history not in HISTORY_MODES:
            raise ConfigError(f"record_history ({record_history!r}) must be one of {', '.join(HISTORY_MODES)}")
        if check_every_steps < 1:
            raise ConfigError(f"check_every_steps ({check_every_steps}) must be >= 1")
        self.diagnostics_dir = diagnostics_dir
        self.run_logger = run_logger
        self.record_history = record_history
        self.thrash_window = thrash_window
        self.check_every_steps = check_every_steps
        self.context = context or {}
        self.bundles: list[str] = []
        self._events = 0
        self._thrash: Any = None
        self._device: Any = None
        self._recording = False

    # ------------------------------------------------------------------ events

    def on_run_start(self, state: LoopState) -> None:
        import torch

        self._thrash = ThrashDetector(self.thrash_window)
        if torch.cuda.is_available():
            self._device = torch.cuda.current_device()
            if self.record_history == "always":
                self._record(True)

    def _record(self, on: bool) -> None:
        """Allocator history on (python stacks: C++ ones make a dump take minutes) or off."""
        import torch

        try:
            if on:
                torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
            else:
                torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = on
        except (RuntimeError, TypeError) as exc:
            logger.warning("allocator history not %s: %s", "recorded" if on else "stopped", exc)

    def on_step_end(self, state: LoopState) -> None:
        # Every check_every_steps steps: reading the counters is a dict build of ~100 entries
        # (70-130 µs), which on a 2 ms step every step would cost 5%.
        if self._device is None or self._thrash is None or state.step % self.check_every_steps:
            return
        import torch

        retries = int(torch.cuda.memory_stats(self._device).get("num_alloc_retries", 0))
        if self._thrash.update(retries) and state.micro_batch_size > 1:
            reason = (
                f"allocator thrash: num_alloc_retries grew at each of the last {self.thrash_window} checks, "
                f"{self.check_every_steps} steps apart ({retries})"
            )
            self._shrink(state, None, reason)
            release_memory(state)  # no failed attempt holds anything: defragment the cache now

    def on_oom(self, state: LoopState, error: BaseException) -> bool:
        """Write the bundle and halve the micro-batch; the loop frees the failed attempt's
        memory once out of its ``except`` block (the traceback holds it until then)."""
        if not is_cuda_oom(error):
            return False
        self._shrink(state, error, "CUDA out of memory")
        if self.record_history == "after_first_oom" and not self._recording and self._device is not None:
            self._record(True)  # the next bundle says which line allocated what
        return True

    def on_run_end(self, state: LoopState) -> None:
        if self._device is not None and self._recording:
            self._record(False)

    # ------------------------------------------------------------------ recovery

    def _shrink(self, state: LoopState, error: BaseException | None, reason: str) -> None:
        before = state.micro_batch_size
        after = before // 2  # 0: micro-batch 1 did not fit; the loop stops every rank
        self._events += 1
        bundle = None
        if self._events <= MAX_BUNDLES_PER_RANK or after == 0:
            bundle = self.write_bundle(state, error, reason, before, after)
        state.micro_batch_size = after
        if self._thrash is not None:  # judge the new micro-batch on its own steps
            self._thrash = ThrashDetector(self.thrash_window)
        events = state.extra.setdefault("oom_events", [])
        events.append({"step": state.step, "reason": reason, "micro_batch": [before, after], "bundle": bundle})
        if bundle:
            state.extra["oom_bundle"] = bundle
        logger.warning(
            "rank %d step %d: %s; micro-batch %d -> %s%s",
            state.rank,
            state.step,
            reason,
            before,
            after or "none (micro-batch 1 does not fit)",
            f"; diagnostics in {bundle}" if bundle else "",
        )

    # ------------------------------------------------------------------ the bundle

    def write_bundle(self, state: LoopState, error: BaseException | None, reason: str, before: int, after: int) -> str:
        """Write the bundle locally, copy it to the run's storage and MLflow; returns where."""
        name = f"oom-rank{state.rank}-step{state.step}-{self._events}"
        with tempfile.TemporaryDirectory(prefix="skewless-oom-") as tmp:
            local = Path(tmp) / name
            local.mkdir()
            try:
                write_bundle_files(local, state, error, reason, before, after, self.context)
            except Exception as exc:  # a failing bundle must not hide the OOM itself
                (local / "BUNDLE_ERROR.txt").write_text(traceback.format_exc())
                logger.warning("diagnostics bundle incomplete: %s", exc)
            try:
                target = _copy_out(local, self.diagnostics_dir, name)
            except Exception as exc:  # storage unreachable: keep a local copy, keep recovering
                kept = private_diagnostics_dir() / name
                shutil.copytree(local, kept, dirs_exist_ok=True)
                target = str(kept)
                logger.warning("diagnostics not copied to %s (%s); kept at %s", self.diagnostics_dir, exc, kept)
            if self.run_logger is not None:
                self.run_logger.log_artifacts(local, f"diagnostics/{name}")
        self.bundles.append(target)
        return target


def write_bundle_files(
    directory: Path,
    state: LoopState,
    error: BaseException | None,
    reason: str,
    before: int,
    after: int,
    context: dict[str, Any] | None = None,
) -> None:
    """Every file of a diagnostics bundle, ``REPORT.md`` last (it summarizes the others)."""
    import torch

    cuda = torch.cuda.is_available()
    files: list[str] = []

    def put(name: str, text: str) -> None:
        (directory / name).write_text(text)
        files.append(name)

    if error is not None:
        put("error.txt", "".join(traceback.format_exception(error)))
    put("stacks.txt", all_thread_stacks())
    host = host_memory_report()
    facts: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "event": "out of memory" if error is not None else "allocator thrash",  # thrash: no exception
        "reason": reason,
        "rank": state.rank,
        "world_size": state.world_size,
        "epoch": state.epoch,
        "step": state.step,
        "step_in_epoch": state.step_in_epoch,
        "micro_batch_before": before,
        "micro_batch_after": after,
        "rows_per_rank_step": state.batch_size,
        "input_shape": state.extra.get("input_shape"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "host_memory": host,
        "pid": os.getpid(),
        "config": context or {},
    }
    if cuda:
        facts["allocator"] = {
            k: v for k, v in torch.cuda.memory_stats().items() if k.endswith(".all.current") or k.startswith("num_")
        }
        put("memory_summary.txt", torch.cuda.memory_summary())
        put("nvml.json", json.dumps(nvml_report(), indent=2))
        snapshot = _snapshot()
        if snapshot is not None:
            # torch's own format, for https://pytorch.org/memory_viz (we only write it).
            with open(directory / "memory_snapshot.pickle", "wb") as f:
                pickle.dump(snapshot, f)
            files.append("memory_snapshot.pickle")
        consumers = consumers_from_snapshot(snapshot) if snapshot else []
        if all(what.startswith(UNATTRIBUTED) for what, _ in consumers):
            # no allocator history (the default arms it after the first OOM): by role instead
            census = tensor_census(state)
            rest = torch.cuda.memory_allocated() - sum(size for _, size in census)
            if rest > 0:
                census.append((NO_HISTORY, rest))
            consumers = sorted(census, key=lambda kv: -kv[1])
    else:
        consumers = []
    if not consumers:
        consumers = tensor_census(state)
    facts["largest_consumers"] = [{"what": w, "bytes": b} for w, b in consumers[:10]]
    put("context.json", json.dumps(facts, indent=2, default=str))
    (directory / "REPORT.md").write_text(_report(facts, consumers, files, error))


def _report(facts: dict[str, Any], consumers: list[tuple[str, int]], files: list[str], error: Any) -> str:
    after = facts["micro_batch_after"]
    oom = facts["event"] == "out of memory"
    what_next = (
        f"The guard halved the micro-batch from {facts['micro_batch_before']} to {after} rows and "
        + ("retried the step" if oom else "runs the next steps with it")
        + "; gradients accumulate, so the effective batch is unchanged."
        if after
        else "Micro-batch 1 did not fit: the run stops. Free memory (smaller model, bf16, fewer workers per GPU) "
        "or give the worker a larger GPU."
    )
    lines = [
        f"# {'Out of memory' if oom else 'Allocator thrash'}: rank {facts['rank']}, step {facts['step']} "
        f"(epoch {facts['epoch']})",
        "",
        f"**What happened:** {facts['reason']} on `{facts['device']}` while running a micro-batch of "
        f"{facts['micro_batch_before']} rows (input shape {facts['input_shape']}) of this rank's "
        f"{facts['rows_per_rank_step']}-row step, {facts['world_size']} rank(s) in the run.",
        "",
        f"**What the guard did:** {what_next}",
        "",
        "## The three largest consumers",
        "",
    ]
    for what, size in consumers[:3]:
        lines.append(f"1. {size / _MB:,.1f} MiB: {what}")
    if not consumers:
        lines.append("(none found)")
    host = facts.get("host_memory") or {}
    lines += [
        "",
        "## Host memory",
        "",
        f"{host.get('usage_mb', '?')} MiB used of {host.get('limit_mb', '?')} MiB ({host.get('source', '?')}); "
        f"this process RSS {host.get('rss_mb', '?')} MiB.",
        "",
        "## Files",
        "",
        *(
            f"- `{f}`: step, shapes, config, allocator counters, largest consumers"
            if f == "context.json"
            else f"- `{f}`"
            for f in files
        ),
    ]
    if error is not None:
        lines += ["", "## Error", "", "```", str(error).strip()[:2000], "```"]
    return "\n".join(lines) + "\n"


def tensor_census(state: LoopState) -> list[tuple[str, int]]:
    """What holds memory, by role, when there is no allocator snapshot (CPU, or history off)."""
    import torch

    model = getattr(state.model, "module", state.model)
    params = list(model.parameters()) if model is not None else []
    sizes: dict[str, int] = {
        "model parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
    }
    opt_bytes = 0
    if state.optimizer is not None:
        for per_param in state.optimizer.state.values():
            for v in per_param.values():
                if isinstance(v, torch.Tensor):
                    opt_bytes += v.numel() * v.element_size()
    sizes["optimizer state"] = opt_bytes
    shape = state.extra.get("input_shape")
    if shape:
        rows, cols = shape[0], shape[1] if len(shape) > 1 else 1
        sizes[f"input micro-batch {tuple(shape)} (float32)"] = rows * cols * 4
    return sorted(((k, v) for k, v in sizes.items() if v), key=lambda kv: -kv[1])


def consumers_from_snapshot(snapshot: dict[str, Any]) -> list[tuple[str, int]]:
    """Live allocations grouped by the first frame outside torch, largest first."""
    by_site: dict[str, int] = {}
    for segment in snapshot.get("segments", []):
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames") or []
            site = next(
                (
                    f"{f.get('filename')}:{f.get('line')} in {f.get('name')}"
                    for f in frames
                    if "/torch/" not in str(f.get("filename", "")) and f.get("filename")
                ),
                f"{UNATTRIBUTED} (allocated before history recording started)",
            )
            by_site[site] = by_site.get(site, 0) + int(block.get("size", 0))
    return sorted(by_site.items(), key=lambda kv: -kv[1])


def _snapshot() -> dict[str, Any] | None:
    import torch

    try:
        snap: dict[str, Any] = torch.cuda.memory._snapshot()
        return snap
    except Exception as exc:
        logger.warning("no allocator snapshot: %s", exc)
        return None


def release_memory(state: LoopState) -> None:
    """Drop what a failed attempt held: gradients, reference cycles, and the allocator's
    cached segments (the fragments a retry at a smaller size would otherwise have to fit in)."""
    if state.optimizer is not None:
        state.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _copy_out(local: Path, destination: str, name: str) -> str:
    """Copy a bundle to ``destination`` (a path or a pyarrow.fs URI); returns its location."""
    if "://" not in destination:
        target = Path(destination) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, target, dirs_exist_ok=True)
        return str(target)
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(destination)
    fs.create_dir(f"{base}/{name}", recursive=True)
    pafs.copy_files(str(local), f"{base}/{name}", destination_filesystem=fs)
    return f"{destination.rstrip('/')}/{name}"
