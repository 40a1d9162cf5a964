"""What shadow traffic costs the caller: the rollout router with and without a shadow copy.

The same router application (``runtime.serving.deploy_rollout``: a router in front of two pinned
registered versions, Serve in the shipped HAProxy mode, 127.0.0.1) serves the same closed-loop
JSON load (1 row a request) twice: all live traffic on the baseline with no shadow (the
baseline), then with every request also copied to the candidate. The caller's p50/p99 and
requests/s are compared, and the shadow's own figures (compared, dropped at the in-flight
bound, label flips) are read from the application's control actor.

    python benchmarks/rollout_bench.py [--duration 8] [--concurrency 8] [--max-in-flight 32] [--fraction 1.0]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import free_port, json_payloads, make_model_dir, run_sweep

MODEL = "rollout-bench"


def register_versions(workdir: Path) -> tuple[str, str, Any]:
    """Two registered versions of one packaged model (weights differ: seeds 0 and 1)."""
    import mlflow
    import torch

    from runtime.registry import (
        CHAMPION,
        MANIFEST_TAG,
        configure_mlflow,
        load_model_dir,
        log_pyfunc_model,
        move_alias,
        register,
        write_model_dir,
    )

    model_dir, raw = make_model_dir(workdir / "a")
    configure_mlflow()
    versions = []
    for seed in (0, 1):
        loaded = load_model_dir(model_dir)
        torch.manual_seed(seed)
        state = {k: torch.randn_like(v) * 0.3 for k, v in loaded.module.state_dict().items()}
        directory = write_model_dir(workdir / f"v{seed}", state, loaded.config, loaded.preprocessor)
        with mlflow.start_run(run_name=f"bench v{seed}"):
            uri, sha = log_pyfunc_model(directory, raw.slice(0, 5))
        versions.append(register(uri, MODEL, tags={MANIFEST_TAG: sha}).version)
    move_alias(MODEL, CHAMPION, versions[0], expected=None, reason="rollout_bench baseline")
    return versions[0], versions[1], raw


def measure(spec: Any, raw: Any, concurrency: int, duration: float) -> dict[str, Any]:
    import ray

    from runtime.serving import control_actor, deploy_rollout

    base, cand, endpoint = deploy_rollout(spec, progress=print)
    control = control_actor(spec.app)
    ray.get(control.set_config.remote(weights={f"v{base}": 100.0, f"v{cand}": 0.0}))
    time.sleep(1.0)  # every router replica has polled the settings
    since = time.time()
    sweep = run_sweep(f"{endpoint}/predict", json_payloads(raw, 1), [concurrency], duration)[0]
    time.sleep(1.0)  # the routers' last samples reach the control actor
    window = ray.get(control.window.remote(since))
    shadows = window["shadows"]
    counters = window["counters"]
    return {
        **sweep,
        "shadow": {
            "compared_requests": len(shadows),
            "compared_rows": sum(s[3] for s in shadows),
            "label_flips": sum(s[4] for s in shadows),
            "dropped": counters.get("shadow_dropped", 0),
            "errors": counters.get("shadow_error", 0),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=8.0, help="Seconds of load per target.")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight.")
    parser.add_argument("--max-in-flight", type=int, default=32, help="Shadow copies in flight per router replica.")
    parser.add_argument("--fraction", type=float, default=1.0, help="Share of live requests copied to the shadow.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rollout_bench.json"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    os.environ.setdefault("SKEWLESS_HOME", str(workdir / "home"))
    os.environ["RAY_ADDRESS"] = "local"
    base, cand, raw = register_versions(workdir)

    import ray
    from ray import serve

    from runtime.serving import RolloutSpec

    port = free_port()
    common = {"model": MODEL, "baseline": base, "candidate": cand, "http_port": port, "arm_num_cpus": 0.5}
    results: dict[str, Any] = {
        "benchmark": "rollout_shadow",
        "config": {
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "max_in_flight": args.max_in_flight,
            "fraction": args.fraction,
        },
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    }
    try:
        plain = RolloutSpec.model_validate({**common, "app": "bench-plain"})
        print("running without shadow ...", flush=True)
        results["baseline"] = measure(plain, raw, args.concurrency, args.duration)
        serve.delete("bench-plain")
        shadowed = RolloutSpec.model_validate(
            {
                **common,
                "app": "bench-shadow",
                "shadow": {"max_in_flight": args.max_in_flight, "fraction": args.fraction},
            }
        )
        print("running with a shadow copy of every request ...", flush=True)
        results["shadow"] = measure(shadowed, raw, args.concurrency, args.duration)
    finally:
        serve.shutdown()
        ray.shutdown()
    b, s = results["baseline"], results["shadow"]
    results["ratios"] = {
        "requests_per_s": s["requests_per_s"] / b["requests_per_s"],
        "p50": s["p50_ms"] / b["p50_ms"],
        "p99": s["p99_ms"] / b["p99_ms"],
    }
    print(f"{'target':10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name in ("baseline", "shadow"):
        r = results[name]
        print(f"{name:10}{r['requests_per_s']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}")
    sh = s["shadow"]
    print(
        f"shadow: {sh['compared_requests']} requests compared ({sh['compared_rows']} rows, {sh['label_flips']} label "
        f"flips), {sh['dropped']} dropped at the bound, {sh['errors']} errors"
    )
    r = results["ratios"]
    print(f"with shadow / without: requests/s x{r['requests_per_s']:.2f}, p50 x{r['p50']:.2f}, p99 x{r['p99']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
