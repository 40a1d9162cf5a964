"""GPU serving: a replica on the GPU against in-process ``predict_table`` on the same GPU, and
four 0.25-GPU replicas against one 1.0-GPU replica, in one run.

- **in-process** (the baseline): the packaged model loaded here, moved to the GPU
  (``LoadedModel.to``), ``predict_table`` on 64k-row tables: Arrow -> the shared preprocessing
  on the CPU -> pinned buffer -> the GPU. No HTTP, no Ray.
- **1 x 1.0**: the skewless Serve app, one replica with a whole GPU: bulk Arrow IPC bodies
  (64k rows, 2 in flight) in rows/s, and JSON requests of one row (32 in flight) in requests/s.
  Target: bulk >= 70% of in-process.
- **4 x 0.25**: four replicas sharing the GPU, the same load (bulk with 8 in flight, JSON with
  128), through Ray Serve's HTTP proxy (which spreads requests over replicas); 1 x 1.0 is
  measured through the proxy too for the comparison.

Loopback only; every phase stops by itself. Writes ``--out`` (JSON) and prints the ratios.

    python benchmarks/serve_gpu_bench.py [--duration 4] [--out benchmarks/results/serve_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from benchmarks.serve_bench import bulk_inprocess, free_port, json_payloads, post_arrow, run_sweep

HIDDEN = (1024, 1024, 1024)
BULK_ROWS = 65_536


def _wait_healthy(url: str, replicas: int, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Poll /healthz until ``replicas`` distinct replicas answered; their health bodies."""
    import httpx

    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(seen) < replicas:
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                body = r.json()
                seen[body["replica"]["pid"]] = body
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if len(seen) < replicas:
        raise SystemExit(f"{url}: {len(seen)} of {replicas} replicas healthy after {timeout_s:.0f}s")
    return list(seen.values())


def serve_phase(
    model_dir: Path, raw: pa.Table, port: int, replicas: int, share: float, duration_s: float
) -> dict[str, Any]:
    from ray import serve

    from runtime.serving import build_predictor_app, run_app

    name = f"gpu{replicas}"
    args = {"model_uri": str(model_dir), "max_body_bytes": 256 << 20, "max_instances": 1 << 20, "max_batch_size": 64}
    options = {
        "num_replicas": replicas,
        "max_ongoing_requests": 256,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": share},
    }
    run_app(build_predictor_app(args, options), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    health = _wait_healthy(url, replicas)
    copies = -(-BULK_ROWS // raw.num_rows) + 1
    bulk = post_arrow(
        f"{url}/predict",
        pa.concat_tables([raw] * copies),
        rows_per_request=BULK_ROWS,
        concurrency=2 * replicas,
        duration_s=duration_s,
    )
    sweep = run_sweep(f"{url}/predict", json_payloads(raw, 1), [32 * replicas], duration_s)[0]
    serve.delete(name)
    return {
        "replicas": replicas,
        "num_gpus_each": share,
        "devices": sorted({h["device"]["device"] for h in health}),
        "reserved_mib": [round(h["device"].get("torch_reserved_bytes", 0) / 2**20, 1) for h in health],
        "bulk_rows_per_s": bulk["rows_per_s"],
        "bulk_errors": bulk["errors"],
        "json_requests_per_s": sweep["requests_per_s"],
        "json_p50_ms": sweep["p50_ms"],
        "json_p99_ms": sweep["p99_ms"],
        "json_errors": sweep["errors"],
        "client_cpu_fraction": sweep["client_cpu_fraction"],
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=4.0, help="Seconds per measured load phase.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_gpu.json"))
    parser.add_argument(
        "--plumbing-on-cpu",
        action="store_true",
        help="Run every phase on the CPU (no GPU shares) to check the script itself; the figures mean nothing.",
    )
    args = parser.parse_args(argv)

    import torch

    cpu = args.plumbing_on_cpu
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("serve_gpu_bench needs a CUDA GPU (the CPU serving benchmark is serve_bench.py)")
    import ray
    from ray import serve

    from benchmarks.serve_bench import make_model_dir
    from runtime.registry import load_model_dir

    device_name = "the CPU (plumbing check)" if cpu else torch.cuda.get_device_name(0)
    workdir = Path(tempfile.mkdtemp(prefix="skewless-serve-gpu-"))
    model_dir, raw = make_model_dir(workdir, hidden=HIDDEN)
    model = load_model_dir(model_dir).to("cpu" if cpu else "cuda")
    inprocess = bulk_inprocess(model, raw, batch_rows=BULK_ROWS, min_seconds=args.duration)
    print(
        f"in-process predict_table on {device_name}: {inprocess['rows_per_s']:,.0f} rows/s",
        flush=True,
    )
    del model
    if not cpu:
        torch.cuda.empty_cache()

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    port = free_port()
    phases = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas, share in ((1, 1.0), (4, 0.25)):
            phase = serve_phase(model_dir, raw, port, replicas, 0.0 if cpu else share, args.duration)
            phases.append(phase)
            print(
                f"{replicas} x {share} GPU on {phase['devices']}: bulk {phase['bulk_rows_per_s']:,.0f} rows/s, "
                f"JSON {phase['json_requests_per_s']:,.0f} req/s (p50 {phase['json_p50_ms']:.1f} ms, "
                f"p99 {phase['json_p99_ms']:.1f} ms; load generator CPU {phase['client_cpu_fraction']:.0%}), "
                f"errors {phase['bulk_errors'] + phase['json_errors']}",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    one, four = phases
    ratios = {
        "bulk_serve_vs_inprocess": _ratio(one["bulk_rows_per_s"], inprocess["rows_per_s"]),
        "bulk_4x025_vs_1x1": _ratio(four["bulk_rows_per_s"], one["bulk_rows_per_s"]),
        "json_4x025_vs_1x1": _ratio(four["json_requests_per_s"], one["json_requests_per_s"]),
    }
    for key, value in ratios.items():
        print(f"{key}: {'n/a (nothing completed in the phase)' if value is None else f'{value:.3f}'}", flush=True)
    payload = {
        "benchmark": "serve_gpu",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": device_name,
            "torch": torch.__version__,
        },
        "model": {"architecture": "mlp", "hidden": list(HIDDEN), "precision": "fp32"},
        "inprocess": inprocess,
        "serve": phases,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
