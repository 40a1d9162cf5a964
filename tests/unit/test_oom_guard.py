"""The OOM guard's allocator-thrash path on CPU: the allocator's counters are injected (there
is no CUDA here), the guard itself, its bundle and the micro-batch bookkeeping are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.training import LoopState
from runtime.training.callbacks import OomGuard


def _guard_on_a_fake_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retries: list[int]) -> OomGuard:
    guard = OomGuard(str(tmp_path / "diagnostics"), record_history=False, thrash_window=3, check_every_steps=1)
    guard.on_run_start(LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64))
    guard._device = 0  # as on_run_start would on a GPU
    counter = iter(retries)
    # the bundle takes the CPU path (a CUDA host would read the patched counters there too)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def memory_stats(device: Any = None) -> dict[str, int]:
        return {"num_alloc_retries": next(counter)}

    monkeypatch.setattr(torch.cuda, "memory_stats", memory_stats)
    return guard


def test_growing_alloc_retries_halve_the_micro_batch_with_a_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = _guard_on_a_fake_device(tmp_path, monkeypatch, [0, 1, 2, 3, 4, 5, 6, 7])
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64)
    sizes = []
    for step in range(8):
        state.step = step
        guard.on_step_end(state)
        sizes.append(state.micro_batch_size)
    # grew on steps 1, 2, 3 -> halve at step 3; the detector restarts for the new size and
    # needs a previous step plus 3 more growing ones -> halve again at step 7
    assert sizes == [64, 64, 64, 32, 32, 32, 32, 16]
    assert -(-state.batch_size // state.micro_batch_size) == 4  # 4 micro-batches: the effective batch is unchanged
    events = state.extra["oom_events"]
    assert [e["micro_batch"] for e in events] == [[64, 32], [32, 16]]
    assert all("allocator thrash" in e["reason"] for e in events)
    report = (Path(events[0]["bundle"]) / "REPORT.md").read_text()
    assert report.startswith("# Allocator thrash: rank 0, step 3")
    assert "halved the micro-batch from 64 to 32 rows and runs the next steps with it" in report
    assert report.count("`context.json`") == 1


def test_flat_retries_leave_the_micro_batch_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _guard_on_a_fake_device(tmp_path, monkeypatch, [5, 6, 6, 7, 7, 8, 8, 9])
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64)
    for step in range(8):
        state.step = step
        guard.on_step_end(state)
    assert state.micro_batch_size == 64 and "oom_events" not in state.extra
    assert not (tmp_path / "diagnostics").exists()


def test_thrash_at_micro_batch_one_is_left_to_a_real_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _guard_on_a_fake_device(tmp_path, monkeypatch, [0, 1, 2, 3, 4])
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=1)
    for step in range(5):
        state.step = step
        guard.on_step_end(state)
    assert state.micro_batch_size == 1  # thrash is slow, not fatal: only an OOM stops the run


def test_the_counters_are_read_every_check_every_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _guard_on_a_fake_device(tmp_path, monkeypatch, [0, 1, 2, 3, 4, 5])
    guard.check_every_steps = 25
    reads: list[int] = []
    stats = torch.cuda.memory_stats
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: reads.append(1) or stats(device))
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64)
    for step in range(1, 101):
        state.step = step
        guard.on_step_end(state)
    assert len(reads) == 4  # steps 25, 50, 75, 100
    assert state.micro_batch_size == 32  # grew at 50, 75, 100 (3 checks running): halved once


def test_allocator_history_is_armed_by_the_first_oom_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the bundle's CPU path
    guard = OomGuard(str(tmp_path / "diagnostics"))
    assert guard.record_history == "after_first_oom"
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64)
    guard.on_run_start(state)
    guard._device = 0  # as on_run_start would on a GPU
    assert calls == []  # nothing recorded (and nothing paid) before an OOM
    assert guard.on_oom(state, torch.cuda.OutOfMemoryError("injected"))
    assert calls == [{"max_entries": 20_000, "stacks": "python"}] and state.micro_batch_size == 32
    assert guard.on_oom(state, torch.cuda.OutOfMemoryError("again"))
    assert len(calls) == 1  # armed once
    guard.on_run_end(state)
    assert calls[-1] == {"enabled": None}


@pytest.mark.parametrize(("given", "mode"), [(True, "always"), (False, "never"), ("never", "never")])
def test_record_history_takes_a_mode_or_a_bool(tmp_path: Path, given: Any, mode: str) -> None:
    assert OomGuard(str(tmp_path), record_history=given).record_history == mode


def test_a_bad_record_history_names_the_modes(tmp_path: Path) -> None:
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="record_history .'sometimes'. must be one of always, after_first_oom, never"):
        OomGuard(str(tmp_path), record_history="sometimes")
