"""What the memory tracker and the OOM guard cost per training step, measured in one run.

The same model, data and step (a batch of feature arrays, as the pipeline stage gives them
-> forward/backward/optimizer step) run two ways, interleaved in blocks so drift hits both
equally:

- **off**: the loop's plain ``train_step``;
- **on**: ``guarded_step`` (the OOM-guard protocol) with :class:`MemoryTracker` sampling in
  the background every ``--interval`` seconds and :class:`OomGuard` on the step-end event,
  both with their defaults (allocator history armed after a first OOM, counters read every
  25 / 50 steps);
- **history** (on a GPU): as *on*, with allocator history recorded from the start
  (``record_history: always``).

Prints the median step time of each and the ratio (targets: at most 2% on a 2 ms step and
0.5% on a 60 ms one). With a GPU it also times the NVML calls the sampler makes.

    python benchmarks/memory_overhead.py [--steps 400] [--interval 1.0] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.preprocessing import FeatureSpec, fit

BLOCK = 25


def _setup(device: str, batch: int, hidden: list[int]) -> dict[str, Any]:
    import torch

    from runtime.models import MLPConfig, build_model
    from runtime.registry import model_json
    from runtime.tasks import Head, task_for
    from runtime.training import LoopState, TabularObjective

    tmp = Path(tempfile.mkdtemp(prefix="skewless-membench-"))
    table = pq.read_table(generate_synthetic(tmp / "d.parquet", SyntheticConfig(rows=batch * 8, seed=1)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    torch.manual_seed(0)
    model = build_model(model_json(MLPConfig(hidden=hidden), prep, task_for("binary"))).to(device)
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=batch, micro_batch_size=batch)
    state.model, state.optimizer = model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = TabularObjective("binary", Head(tuple(prep.classes)))
    return {"tmp": tmp, "table": table, "prep": prep, "state": state, "objective": objective}


def run(steps: int, interval: float, device_name: str, batch: int, hidden: list[int], history: bool) -> dict[str, Any]:
    import torch

    from runtime.preprocessing import features_and_labels
    from runtime.training import CallbackList, guarded_step, micro_batch_agreement, train_step
    from runtime.training.callbacks import MemoryTracker, OomGuard

    env = _setup(device_name, batch, hidden)
    state, prep, table, objective = env["state"], env["prep"], env["table"], env["objective"]
    device = torch.device(device_name)
    guard = OomGuard(str(env["tmp"] / "diagnostics"))  # the defaults: what a run gets
    tracker = MemoryTracker(interval_s=interval, output_dir=str(env["tmp"] / "memory"), log_every_steps=50)
    callbacks = CallbackList([tracker, guard])
    agree = micro_batch_agreement(1)
    callbacks.on_run_start(state)
    batches = [features_and_labels(prep, table.slice(i * batch, batch)) for i in range(table.num_rows // batch)]
    modes = ["off", "on"] + (["history"] if history else [])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one(mode: str, i: int) -> float:
        b = batches[i % len(batches)]
        if mode == "history" and not guard._recording:
            guard._record(True)  # record_history: always
        elif mode != "history" and guard._recording:
            guard._record(False)
        sync()
        t0 = time.perf_counter()
        if mode == "off":
            train_step(state, b, objective, device, "fp32")
            state.step += 1
        else:
            guarded_step(state, b, objective, device, "fp32", callbacks, agree)
            state.step += 1
            callbacks.on_step_end(state)
        sync()
        return time.perf_counter() - t0

    for i in range(BLOCK):  # warm-up every path
        for mode in modes:
            one(mode, i)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for block in range(steps // BLOCK):
        order = modes[block % len(modes) :] + modes[: block % len(modes)]  # rotate: drift hits all alike
        for mode in order:
            times[mode] += [one(mode, i) for i in range(BLOCK)]
    pieces = _pieces(state, callbacks, device)
    callbacks.on_run_end(state)
    median = {m: statistics.median(t) for m, t in times.items()}
    off, on = median["off"], median["on"]
    out: dict[str, Any] = {
        "device": device_name,
        "batch": batch,
        "hidden": hidden,
        "steps_each": len(times["on"]),
        "sample_interval_s": interval,
        "step_ms_off": round(off * 1e3, 4),
        "step_ms_on": round(on * 1e3, 4),
        "ratio_on_off": round(on / off, 4),
        "samples_taken": _count_lines(tracker.report_paths.get("timeline")),
        "guard_defaults": {"record_history": guard.record_history, "check_every_steps": guard.check_every_steps},
    }
    # What the guard and the tracker add to a step, timed alone in tight loops: steadier than
    # the difference of two noisy step medians on a shared machine.
    out["added_us_per_step"] = pieces
    out["added_fraction"] = round(sum(pieces.values()) / (off * 1e6), 5)
    if history:
        out["step_ms_history_always"] = round(median["history"] * 1e3, 4)
        out["ratio_history_always_off"] = round(median["history"] / off, 4)
    out["nvml_call_us"] = nvml_latencies() if device.type == "cuda" else None
    return out


def _pieces(state: Any, callbacks: Any, device: Any, n: int = 20_000) -> dict[str, float]:
    """Microseconds per step of the work the guarded loop adds: the step-end callbacks (the
    tracker and the guard, at their defaults, averaged over their every-N-steps reads) and
    the generator-state snapshot a recomputed step would restore."""
    from runtime.training import rng_snapshot

    def per_call(fn: Any) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return round(best, 3)

    def step_end() -> None:
        state.step += 1
        callbacks.on_step_end(state)

    return {
        "step_end_callbacks": per_call(step_end),
        "rng_snapshot": per_call(lambda: rng_snapshot(device)),
    }


def _count_lines(path: Any) -> int:
    if not path or not Path(path).exists():
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def nvml_latencies(n: int = 200) -> dict[str, float]:
    from runtime import memory as _nvml

    dev = _nvml.visible_devices()[0]
    calls = {
        "memory": lambda: _nvml.memory(dev),
        "utilization": lambda: _nvml.utilization(dev),
        "process_usage": lambda: _nvml.process_usage(dev),
    }
    out = {}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        out[name] = round((time.perf_counter() - t0) / n * 1e6, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per mode (after warm-up)")
    parser.add_argument("--interval", type=float, default=1.0, help="tracker sampling period, seconds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--out", default="benchmarks/results/memory_overhead.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    cases = [(256, [256, 256], args.steps), (1024, [1024, 1024], args.steps)]
    if device == "cuda":  # a step of ~60 ms on an H100/H200, where the guard should vanish
        cases.append((8192, [8192, 8192], max(2 * BLOCK, args.steps // 6)))
    for batch, hidden, steps in cases:
        r = run(steps, args.interval, device, batch, hidden, history=device == "cuda")
        results.append(r)
        print(
            f"{device} batch {batch} hidden {hidden}: off {r['step_ms_off']:.3f} ms/step, "
            f"on {r['step_ms_on']:.3f} ms/step -> ratio {r['ratio_on_off']:.4f} "
            f"({(r['ratio_on_off'] - 1) * 100:+.2f}%)"
            + (
                f"; record_history always {r['step_ms_history_always']:.3f} ms/step "
                f"({(r['ratio_history_always_off'] - 1) * 100:+.2f}%)"
                if "step_ms_history_always" in r
                else ""
            )
            + f"; added work alone {r['added_us_per_step']} µs = {r['added_fraction'] * 100:.2f}% of a step"
            + (f"; NVML µs/call {r['nvml_call_us']}" if r["nvml_call_us"] else ""),
            flush=True,
        )
    payload = {
        "benchmark": "memory_overhead",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
