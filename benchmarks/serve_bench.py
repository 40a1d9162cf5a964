"""Serving throughput and latency: the skewless Ray Serve app against a plain FastAPI server.

Both targets serve the same packaged model (an MLP with random weights over the synthetic
churn features: weights do not change the work) to the same load generator, on 127.0.0.1:

- a closed-loop concurrency sweep of JSON requests (N requests in flight): requests/s,
  p50/p99 latency, errors, and how busy the load generator itself was;
- bulk: in-process ``predict_table`` on 64k-row tables (the ceiling any server can reach)
  and, for a target that takes Arrow IPC, rows/s of Arrow bodies posted over HTTP.

Targets are functions in :data:`TARGETS`; ``baseline`` (a FastAPI + uvicorn process, see
``serve_baseline.py``) needs no Ray. When two targets ran, the ratios are printed.

    python benchmarks/serve_bench.py [--only baseline] [--duration 3] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Payload:
    """One request body; ``rows`` lets a sweep report rows/s as well as requests/s."""

    body: bytes
    content_type: str
    rows: int


PayloadFactory = Callable[[int], Payload]  # request number -> body


# --------------------------------------------------------------------------- the model and payloads


def make_model_dir(workdir: Path, fit_rows: int = 20_000, hidden: Sequence[int] = (64, 32)) -> tuple[Path, pa.Table]:
    """A packaged model with random weights and its monitoring reference (as training stores
    one, so the served path summarises its traffic), and the raw (label-free) rows it was fit on."""
    import pyarrow.parquet as pq
    import torch

    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.models import MLPConfig, build_model
    from runtime.monitoring import REFERENCE_FILE, build_reference
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import add_model_file, load_model_dir, model_json, write_model_dir
    from runtime.tasks import task_for

    table = pq.read_table(generate_synthetic(workdir / "data.parquet", SyntheticConfig(rows=fit_rows, seed=7)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec("binary")), table)
    config = model_json(MLPConfig(hidden=list(hidden)), prep, task_for("binary"))
    torch.manual_seed(0)
    model_dir = write_model_dir(workdir / "model", build_model(config).state_dict(), config, prep)
    reference = build_reference(load_model_dir(model_dir), table, table.slice(0, 4096), {})
    add_model_file(model_dir, REFERENCE_FILE, reference.to_json())
    return model_dir, table.select(prep.input_schema.names)


def json_payloads(raw: pa.Table, rows_per_request: int, pool: int = 256) -> PayloadFactory:
    """A pool of distinct JSON bodies, cycled: no two consecutive requests are the same bytes."""
    records = raw.to_pylist()
    bodies = []
    for i in range(pool):
        start = (i * rows_per_request) % max(len(records) - rows_per_request, 1)
        bodies.append(json.dumps({"instances": records[start : start + rows_per_request]}).encode())
    payloads = [Payload(b, "application/json", rows_per_request) for b in bodies]
    return lambda i: payloads[i % len(payloads)]


def arrow_payloads(raw: pa.Table, rows_per_request: int, pool: int = 8) -> PayloadFactory:
    """Arrow IPC stream bodies of ``rows_per_request`` raw rows each."""
    payloads = []
    for i in range(pool):
        start = (i * rows_per_request) % max(raw.num_rows - rows_per_request, 1)
        sink = pa.BufferOutputStream()
        part = raw.slice(start, rows_per_request)
        with pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        payloads.append(Payload(sink.getvalue().to_pybytes(), ARROW_STREAM, part.num_rows))
    return lambda i: payloads[i % len(payloads)]


# --------------------------------------------------------------------------- the load generator


class _Connection:
    """A minimal HTTP/1.1 keep-alive client: the generator must cost far less than the server."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path = host, port, path
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: Payload) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {payload.content_type}\r\n"
            f"Content-Length: {len(payload.body)}\r\n{self.extra}\r\n"
        )
        self.writer.write(head.encode() + payload.body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class _GrpcConnection:
    """One caller on a shared gRPC channel (HTTP/2 multiplexes the callers, as gRPC clients do):
    ``skewless.v1.Predictor/Predict`` with the payload as the message body. A status other than
    OK counts under its code's name."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub, self.metadata = stub, metadata

    async def request(self, payload: Payload) -> int | str:
        import grpc

        from runtime.serving import PredictRequest

        message = PredictRequest(body=payload.body, content_type=payload.content_type)
        try:
            await self.stub(message, metadata=self.metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return 200

    async def close(self) -> None:
        pass


def _loopback(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "grpc") or parts.hostname not in LOOPBACK:
        raise ValueError(
            f"url {url!r} must be http://127.0.0.1:<port>/... or grpc://127.0.0.1:<port>: "
            "the benchmark only loads loopback"
        )
    return parts.hostname, parts.port or 80, parts.path or "/"


@dataclass
class _Level:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    sent: int = 0


async def _level(
    url: str, factory: PayloadFactory, concurrency: int, duration_s: float, warmup_s: float, headers: dict[str, str]
) -> tuple[_Level, float]:
    host, port, path = _loopback(url)
    channel = None
    connections: list[Any]
    if url.startswith("grpc:"):
        import grpc

        from runtime.serving import predict_stub

        channel = grpc.aio.insecure_channel(f"{host}:{port}")
        metadata = tuple((k.lower(), v) for k, v in headers.items())
        connections = [_GrpcConnection(predict_stub(channel), metadata) for _ in range(concurrency)]
    else:
        connections = [_Connection(host, port, path, headers) for _ in range(concurrency)]
    level = _Level()
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s
    deadline = start + duration_s

    async def worker(conn: Any) -> None:
        while (now := loop.time()) < deadline:  # closed loop: the next request when one returns
            payload = factory(level.sent)
            level.sent += 1
            try:
                status = str(await conn.request(payload))
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status = type(exc).__name__
                await conn.close()
            if now >= start:  # the warm-up opens connections and warms caches; not counted
                level.latencies.append(loop.time() - now)
                level.statuses[status] = level.statuses.get(status, 0) + 1
                level.rows += payload.rows if status == "200" else 0

    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = loop.time() - start
    for conn in connections:
        await conn.close()
    if channel is not None:
        await channel.close()
    return level, elapsed


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of processes (and their reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited, or not Linux
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def run_sweep(
    url: str,
    payload_factory: PayloadFactory,
    concurrencies: Sequence[int],
    duration_s: float,
    *,
    warmup_s: float = 0.5,
    headers: dict[str, str] | None = None,
    server_pids: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """One closed-loop run per concurrency against ``url`` (loopback only); stops by itself.

    ``client_cpu_fraction`` near 1.0 means the (single-threaded) generator, not the server,
    set the pace; ``server_cpu_fraction`` is summed over ``server_pids``.
    """
    results = []
    for concurrency in concurrencies:
        cpu0, server0 = time.process_time(), _cpu_seconds(server_pids)
        wall0 = time.perf_counter()
        level, elapsed = asyncio.run(_level(url, payload_factory, concurrency, duration_s, warmup_s, headers or {}))
        wall = time.perf_counter() - wall0
        lat_ms = np.asarray(level.latencies) * 1e3
        ok = level.statuses.get("200", 0)
        results.append(
            {
                "concurrency": concurrency,
                "requests": len(lat_ms),
                "seconds": elapsed,
                "requests_per_s": len(lat_ms) / elapsed,
                "rows_per_s": level.rows / elapsed,
                "p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms.size else None,
                "p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms.size else None,
                "mean_ms": float(lat_ms.mean()) if lat_ms.size else None,
                "errors": len(lat_ms) - ok,
                "statuses": level.statuses,
                "client_cpu_fraction": (time.process_time() - cpu0) / wall,
                "server_cpu_fraction": (_cpu_seconds(server_pids) - server0) / wall if server_pids else None,
            }
        )
    return results


# --------------------------------------------------------------------------- bulk


def bulk_inprocess(model: Any, raw: pa.Table, batch_rows: int = 65_536, min_seconds: float = 2.0) -> dict[str, Any]:
    """Rows/s of ``predict_table`` on ``batch_rows``-row tables in this process: the ceiling."""
    table = raw
    while table.num_rows < batch_rows:
        table = pa.concat_tables([table, raw])
    batch = table.slice(0, batch_rows).combine_chunks()
    model.predict_table(batch)  # warm up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 2:
        model.predict_table(batch)
        calls += 1
    return {"batch_rows": batch_rows, "calls": calls, "rows_per_s": calls * batch_rows / elapsed}


def post_arrow(
    url: str,
    raw: pa.Table,
    rows_per_request: int = 8192,
    concurrency: int = 2,
    duration_s: float = 3.0,
    **sweep: Any,
) -> dict[str, Any]:
    """Rows/s of Arrow IPC bodies posted to ``url`` (a target that accepts them)."""
    result = run_sweep(url, arrow_payloads(raw, rows_per_request), [concurrency], duration_s, **sweep)[0]
    return {"rows_per_request": rows_per_request, **result}


# --------------------------------------------------------------------------- targets


@dataclass
class BenchContext:
    model_dir: Path
    raw: pa.Table
    concurrencies: list[int]
    duration_s: float
    rows_per_request: int
    bulk_rows: int
    torch_threads: int
    workdir: Path
    serve_env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A free loopback port this run has not handed out before."""
    from runtime.connect import free_port as distinct_free_port

    return distinct_free_port()


def wait_until_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail fast, with the server's log, if it exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def run_baseline(ctx: BenchContext) -> dict[str, Any]:
    """FastAPI + uvicorn (1 worker) calling the model directly, in its own process."""
    from runtime.registry import load_model_dir

    port = free_port()
    log = ctx.workdir / "baseline.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_baseline.py"), "--model-dir", str(ctx.model_dir)]
    cmd += ["--port", str(port), "--torch-threads", str(ctx.torch_threads)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/healthz", proc, log)
        payloads = json_payloads(ctx.raw, ctx.rows_per_request)
        sweep = run_sweep(f"{url}/predict", payloads, ctx.concurrencies, ctx.duration_s, server_pids=[proc.pid])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    import torch

    torch.set_num_threads(ctx.torch_threads)
    bulk = bulk_inprocess(load_model_dir(ctx.model_dir), ctx.raw, ctx.bulk_rows)
    return {"server": "fastapi+uvicorn, 1 worker", "url": url, "sweep": sweep, "bulk_inprocess": bulk}


def run_serve(ctx: BenchContext, ingress: str = "shipped", monitoring: bool = True) -> dict[str, Any]:
    """The skewless Serve app (one replica, dynamic batching), reached through one of Ray
    Serve's ingress paths:

    - ``shipped``: what ``skewless demo`` and ``skewless serve deploy`` start,
      ``runtime.serving.ingress_options`` (Serve's HAProxy mode: HAProxy on the HTTP port in front
      of the replica's own HTTP server, with Ray's throughput-optimized settings);
    - ``proxy``: Serve's stock Python HTTP proxy (what plain ``serve deploy`` starts);
    - ``direct``: direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``), the load generator
      addressing the replica's own port (Serve picks one in 30000-31000): no front at all, so
      no balancing across replicas.

    ``--serve-env`` adds to the Serve controller's environment in every mode. Starts a private
    local Ray instance in this process and shuts it down after.
    """
    import httpx
    import ray
    from ray import serve

    from runtime.config import ServeAppArgs
    from runtime.serving import build_predictor_app, ingress_options, run_app

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    grpc_options = None
    if ingress == "grpc":  # the shipped HAProxy mode, with Serve's gRPC ingress on beside HTTP
        grpc_options = {"port": free_port(), "grpc_servicer_functions": ["runtime.serving.add_predictor_servicer"]}
    env: dict[str, str] = {}
    if ingress in ("shipped", "grpc"):
        env = dict((ingress_options(http) or {"runtime_env": {"env_vars": {}}})["runtime_env"]["env_vars"])
    elif ingress == "direct":
        env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    env.update(ctx.serve_env)
    try:
        serve.start(
            http_options=http,
            grpc_options=grpc_options,
            controller_options={"runtime_env": {"env_vars": env}} if env else None,
        )
        defaults = ServeAppArgs.model_fields
        args = {
            "model_uri": str(ctx.model_dir),
            "max_batch_size": int(os.environ.get("SKEWLESS_BENCH_MAX_BATCH", defaults["max_batch_size"].default)),
            "batch_wait_timeout_s": float(
                os.environ.get("SKEWLESS_BENCH_BATCH_WAIT_S", defaults["batch_wait_timeout_s"].default)
            ),
            "max_body_bytes": 256 << 20,
            "max_instances": 1 << 20,
            "monitoring": {"enabled": monitoring, "store": str(ctx.workdir / "monitoring")},
        }
        options = {
            "num_replicas": 1,
            "max_ongoing_requests": 256,
            "ray_actor_options": {
                "num_cpus": 1,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(ctx.torch_threads)}},
            },
        }
        run_app(build_predictor_app(args, options), name="bench", route_prefix="/bench")
        url = f"http://127.0.0.1:{port}/bench"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        replica_pid = int(health.json()["replica"]["pid"])
        if ingress == "direct":  # the replica's own HTTP server (Serve picks a port in 30000-31000)
            ports = [p for p in listening_ports(replica_pid) if 30000 <= p <= 31000]
            if not ports:
                raise SystemExit(f"direct ingress: replica {replica_pid} listens on no port in 30000-31000")
            url = f"http://127.0.0.1:{ports[0]}/bench"
            print(f"direct ingress: replica {replica_pid} serves {url}", flush=True)
        payloads = json_payloads(ctx.raw, ctx.rows_per_request)
        target = f"{url}/predict"
        if grpc_options is not None:  # the same JSON bodies, as skewless.v1.Predictor/Predict messages
            target = url = f"grpc://127.0.0.1:{grpc_options['port']}"
        sweep = run_sweep(target, payloads, ctx.concurrencies, ctx.duration_s, server_pids=[replica_pid])
        arrow = None
        if grpc_options is None:  # bulk Arrow over HTTP (the gRPC target's would repeat `serve`'s)
            copies = -(-ctx.bulk_rows // ctx.raw.num_rows) + 1
            arrow = post_arrow(
                f"{url}/predict",
                pa.concat_tables([ctx.raw] * copies),
                rows_per_request=ctx.bulk_rows,
                concurrency=2,
                duration_s=max(ctx.duration_s, 3.0),
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "server": f"skewless Ray Serve app, 1 replica ({INGRESS[ingress]})",
        "url": url,
        "controller_env": env,
        "batching": args,
        "sweep": sweep,
        "bulk_arrow": arrow,
    }


INGRESS = {
    "shipped": "shipped: HAProxy mode, throughput-optimized",
    "proxy": "Serve's HTTP proxy",
    "direct": "direct ingress, no front",
    "grpc": "gRPC: HAProxy mode, Serve's gRPC ingress",
}


def listening_ports(pid: int) -> list[int]:
    """TCP ports ``pid`` listens on, from /proc (Linux)."""
    from runtime.cluster import listening_sockets

    return sorted({sock.port for sock in listening_sockets([pid])})


TARGETS: dict[str, Callable[[BenchContext], dict[str, Any]]] = {
    "baseline": run_baseline,
    "serve": run_serve,
    "serve_unmonitored": lambda ctx: run_serve(ctx, monitoring=False),
    "serve_proxy": lambda ctx: run_serve(ctx, ingress="proxy"),
    "serve_direct": lambda ctx: run_serve(ctx, ingress="direct"),
    "serve_grpc": lambda ctx: run_serve(ctx, ingress="grpc"),
}


SERVE_TARGETS = [name for name in TARGETS if name != "baseline"]

# --------------------------------------------------------------------------- report


def ratios(results: dict[str, Any], target: str = "serve", baseline: str = "baseline") -> list[dict[str, Any]]:
    """``target`` over ``baseline`` at each concurrency both ran: requests/s and p99, each the
    ratio of the medians over the repeated levels (``--repeat``), with the range of the p99
    ratio over the repetitions paired in order."""
    if target not in results or baseline not in results:
        return []

    def by_level(sweep: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        levels: dict[int, list[dict[str, Any]]] = {}
        for r in sweep:
            if r["requests_per_s"] and r["p99_ms"]:
                levels.setdefault(r["concurrency"], []).append(r)
        return levels

    theirs, ours = by_level(results[baseline]["sweep"]), by_level(results[target]["sweep"])
    out = []
    for concurrency, mine in ours.items():
        base = theirs.get(concurrency)
        if not base:
            continue
        paired = [a["p99_ms"] / b["p99_ms"] for a, b in zip(mine, base, strict=False)]
        out.append(
            {
                "concurrency": concurrency,
                "repeats": min(len(mine), len(base)),
                "requests_per_s_ratio": float(np.median([r["requests_per_s"] for r in mine]))
                / float(np.median([r["requests_per_s"] for r in base])),
                "p99_ratio": float(np.median([r["p99_ms"] for r in mine]))
                / float(np.median([r["p99_ms"] for r in base])),
                "p99_ratio_range": [min(paired), max(paired)],
            }
        )
    return out


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'target':10}{'conc':>6}{'req/s':>10}{'rows/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'client cpu':>12}"
    )
    for name in TARGETS:
        if name not in results:
            continue
        for r in results[name]["sweep"]:
            print(
                f"{name:10}{r['concurrency']:>6}{r['requests_per_s']:>10,.0f}{r['rows_per_s']:>11,.0f}"
                f"{r['p50_ms'] or 0:>9.2f}{r['p99_ms'] or 0:>9.2f}{r['errors']:>8}{r['client_cpu_fraction']:>11.0%}"
            )
        bulk = results[name].get("bulk_inprocess")
        if bulk:
            print(
                f"{name:10} bulk in-process predict_table: {bulk['rows_per_s']:,.0f} rows/s ({bulk['batch_rows']} rows)"
            )
        arrow = results[name].get("bulk_arrow")
        if arrow:
            print(
                f"{name:10} bulk Arrow over HTTP: {arrow['rows_per_s']:,.0f} rows/s ({arrow['rows_per_request']} rows)"
            )
    for r in results.get("ratios", []):
        spread = ""
        if r["repeats"] > 1:
            low, high = r["p99_ratio_range"]
            spread = f" (medians of {r['repeats']} runs; p99 ratio run by run {low:.2f}-{high:.2f})"
        print(
            f"{r['target']} / baseline at concurrency {r['concurrency']}: "
            f"requests/s x{r['requests_per_s_ratio']:.2f}, p99 x{r['p99_ratio']:.2f}{spread}"
        )
    for name in SERVE_TARGETS:
        arrow = results.get(name, {}).get("bulk_arrow")
        bulk = results.get("baseline", {}).get("bulk_inprocess")
        if arrow and bulk:
            print(f"{name} bulk Arrow / in-process batched: {arrow['rows_per_s'] / bulk['rows_per_s']:.0%}")
    busy = [r for n in TARGETS if n in results for r in results[n]["sweep"] if r["client_cpu_fraction"] > 0.85]
    if busy:
        print("note: the load generator used > 85% of a core at some levels; those numbers are client-bound")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=sorted(TARGETS), action="append", help="Run only these targets.")
    parser.add_argument("--duration", type=float, default=3.0, help="Seconds per concurrency level.")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated in-flight request counts.")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Run the concurrency levels this many times, interleaved (1,8,32,1,8,32,...); ratios use the medians.",
    )
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--bulk-rows", type=int, default=65_536)
    parser.add_argument("--torch-threads", type=int, default=1, help="In every server and the bulk baseline.")
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Add to the Serve controller's environment in every Serve target (e.g. RAY_SERVE_USE_GRPC_BY_DEFAULT=0).",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_bench.json"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir, raw = make_model_dir(workdir)
    ctx = BenchContext(
        model_dir=model_dir,
        raw=raw,
        concurrencies=[int(c) for c in args.concurrency.split(",")] * max(1, args.repeat),
        duration_s=args.duration,
        rows_per_request=args.rows_per_request,
        bulk_rows=args.bulk_rows,
        torch_threads=args.torch_threads,
        workdir=workdir,
        serve_env=dict(item.split("=", 1) for item in args.serve_env),
    )
    results: dict[str, Any] = {
        "benchmark": "serve",
        "config": {k: v for k, v in vars(ctx).items() if k not in ("raw", "workdir", "model_dir")},
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    for name in args.only or list(TARGETS):
        print(f"running {name} ...", flush=True)
        results[name] = TARGETS[name](ctx)
    results["ratios"] = [{**r, "target": t} for t in SERVE_TARGETS for r in ratios(results, target=t)]
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
