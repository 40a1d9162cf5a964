"""The LM job on Ray Train against a plain PyTorch loop on the same model, step and GPU.

For each mode (``eager``, ``compiled``) and in one run:

- **plain**: this process, no Ray: the same model (``build_model``), optimizer
  (``make_optimizer``, fused AdamW), schedule, data (the job's ``TokenSource``: windows cut on
  the device) and step (``train_step``: bf16 autocast, gradient clipping); tokens/s over the
  steps after ``--warmup`` (clock read after a device sync at both ends only).
- **ray**: ``jobs.lm``'s driver (``run_lm``, tracking off) with the same config and steps: Ray
  Train worker, the OOM guard, the memory tracker and the watchdog on, as a user runs it;
  tokens/s as the job reports it (``ThroughputMeter``: warm-up left out, evaluation between
  reporting intervals left out).

Prints tokens/s, MFU and the ratio ray/plain per mode (target >= 0.98). Needs a GPU for MFU;
on a CPU it runs (small config) to check the plumbing.

    python benchmarks/lm_overhead.py --config jobs/configs/lm_gpu.yaml [--modes eager,compiled] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(cfg: Any, compiled: bool, warmup: int) -> dict[str, Any]:
    """The job's pieces without Ray, callbacks or the guard."""
    import torch

    from runtime.data import load_text_tokens
    from runtime.models import build_model, flops_per_token, num_parameters
    from runtime.training import (
        LMObjective,
        LoopState,
        TokenSource,
        make_optimizer,
        make_scheduler,
        prepare_corpus,
        split_tokens,
    )
    from runtime.training import train_step as step
    from runtime.training.callbacks import mfu, peak_flops

    t, m = cfg.training, cfg.model
    device = torch.device("cuda" if torch.cuda.is_available() and t.use_gpu else "cpu")
    if device.type == "cpu":  # as many threads as the Ray worker gets (Ray sets OMP_NUM_THREADS to its CPUs)
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    train, valid = split_tokens(load_text_tokens(prepare_corpus(cfg.data)), cfg.data.valid_fraction, m.seq_len)
    source = TokenSource(
        train, valid, 0, t.batch_size, m.seq_len, t.steps, t.steps, 1, t.seed,
        device if device.type == "cuda" and t.tokens_on_device else None,
    )  # fmt: skip
    torch.manual_seed(t.seed)
    model_config = m.artifact_config(m.io)
    base = build_model(model_config).to(device)
    optimizer = make_optimizer(
        base, "adamw", t.lr, t.weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda"
    )  # fmt: skip
    scheduler = make_scheduler(optimizer, "cosine", t.steps, t.warmup_steps, t.min_lr_ratio)
    model = torch.compile(base) if compiled else base
    state = LoopState(
        rank=0, world_size=1, epochs=1, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size or t.batch_size,
        model=model, optimizer=optimizer,
    )  # fmt: skip
    objective = LMObjective()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens, t0 = 0, 0.0
    model.train()
    for i, batch in enumerate(source.batches(0)):
        if i == warmup:
            sync()
            t0, tokens = time.perf_counter(), 0
        step(state, batch, objective, device, t.precision, t.grad_clip)
        if scheduler is not None:
            scheduler.step()
        tokens += objective.count(batch)
    sync()
    seconds = time.perf_counter() - t0
    tps = tokens / seconds
    n_non_emb = num_parameters(base, exclude_embeddings=True)
    fpt = flops_per_token(n_non_emb, m.n_layers, m.d_model, m.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(), "bf16") if device.type == "cuda" else None
    return {"tokens_per_s": tps, "mfu": mfu(tps, fpt, peak), "timed_steps": t.steps - warmup, "device": str(device)}


def ray_job(cfg: Any) -> dict[str, Any]:
    from runtime.training import run_lm

    outcome = run_lm(cfg, progress=lambda msg: print(f"  [ray] {msg}", flush=True))
    return {"tokens_per_s": outcome.tokens_per_s, "mfu": outcome.mfu, "device": outcome.device}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=Path("jobs/configs/lm_gpu.yaml"))
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="plain loop: untimed first steps (compilation)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_overhead.json"))
    args = parser.parse_args(argv)

    import torch

    from runtime.config import load_config
    from runtime.training import LMJobConfig

    base = load_config(LMJobConfig, args.config)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("eager", "compiled"):
            raise SystemExit(f"--modes: {mode!r} is not eager or compiled")
        training = base.training.model_copy(
            update={"steps": args.steps, "log_every": args.steps, "compile": mode == "compiled", "eval_batches": 1}
        )
        cfg = base.model_copy(update={"training": training, "experiment": None})
        print(f"{mode}: plain PyTorch loop ...", flush=True)
        plain = plain_loop(cfg, mode == "compiled", args.warmup)
        print(f"{mode}: plain {plain['tokens_per_s']:,.0f} tokens/s, MFU {plain['mfu']}", flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(f"{mode}: Ray Train job ...", flush=True)
        ray = ray_job(cfg)
        ratio = ray["tokens_per_s"] / plain["tokens_per_s"]
        print(
            f"{mode}: ray {ray['tokens_per_s']:,.0f} tokens/s, MFU {ray['mfu']}; ratio ray/plain {ratio:.3f}",
            flush=True,
        )
        results.append({"mode": mode, "steps": args.steps, "plain": plain, "ray": ray, "ratio_ray_plain": ratio})
    payload = {
        "benchmark": "lm_overhead",
        "config": str(args.config),
        "model": base.model.model_dump(),
        "batch_size": base.training.batch_size,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
