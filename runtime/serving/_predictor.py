"""The predictor deployment: raw rows -> the shared preprocessing -> the model.

Routes (below the application's route prefix; the table is :data:`runtime.serving.ROUTES`):

- ``POST /predict`` with JSON ``{"instances": [{"col": value, ...}, ...]}`` answers JSON
  ``{"predictions": [...], "model": {"name", "version", "uri"}}`` (plus ``probabilities``
  and ``classes`` for classifiers). With ``Content-Type: application/vnd.apache.arrow.stream``
  (an Arrow IPC stream of raw rows) it answers in Arrow IPC: bulk scoring through the same
  preprocessing and model.
- ``GET /healthz`` answers 200 with the model identity and its load/warm-up times.

Bad input is a 4xx whose body names the field, the row, the value and the rule (413 size,
415 content type, 422 schema, 400 malformed, 401 without the API key when one is set); it is
never a 500. JSON requests go through Ray Serve's dynamic batching (``@serve.batch``): many
concurrent small requests become one model call (with no batch wait set, a request alone on
the replica skips the batch queue and calls the model itself). Arrow requests are already batches and go
straight to the model. Backpressure (``max_ongoing_requests``, ``max_queued_requests``,
``backpressure_config``: 503/429 with ``Retry-After``) is Ray Serve's own, set in the Serve
config.

The replica refuses to start when the installed preprocessing code's fingerprint differs
from the one the model was trained with (``allow_fingerprint_mismatch`` overrides, loudly).
A replica given a GPU (``ray_actor_options.num_gpus``, whole or a fraction; ``device: auto``)
serves on it, in ``precision`` fp32, bf16 or fp16: preprocessing stays on the CPU (Arrow ->
NumPy), each batch goes to the device through a pinned buffer without blocking, and the replica
warms up on the device (``gpu_rows_per_call`` rows) before it takes traffic. With a fraction
(``num_gpus: 0.25``) it caps its allocator at that share of the device; weights that cannot fit
the share stop the replica at start with the numbers. ``/healthz`` (``device``, ``gpu_budget``)
and the ``skewless_serve_device_memory_bytes`` gauge show the device and its memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.config import ServeAppArgs, load_config
from runtime.errors import SchemaValidationError, ServingError
from runtime.preprocessing import FittedPreprocessor
from runtime.serving._auth import ApiKeyAuth
from runtime.serving._codec import HttpError, decode_request, encode_response, is_arrow
from runtime.serving._grpc import bind_grpc_to_front_host
from runtime.serving._routes import ROUTES, UNKNOWN_ROUTE
from runtime.serving._wire import coalesce_response_writes

logger = logging.getLogger("ray.serve")
INLINE_ROWS = 512
DRAIN_BYTES = 64 << 20  # an oversized body is read (and dropped) up to this, so the client gets its 413
GRPC_ROUTE = "/skewless.v1.Predictor/Predict"  # the metrics' route label of the gRPC method
INLINE_JSON_BYTES = 64 << 10  # JSON up to this size is decoded on the event loop (~450 rows, ~0.9 ms)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


SUMMARY_ROWS = 256  # rows of each answer a router compares (shadow disagreement, divergence)


@dataclass(frozen=True)
class Answer:
    """A predictor's answer to one ``POST /predict`` body, as a router in front receives it."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str]
    labels: list[Any] | None = None  # the first SUMMARY_ROWS predictions
    probabilities: list[list[float]] | None = None  # and their class probabilities


def _summary(preds: Any) -> tuple[list[Any], list[list[float]] | None]:
    labels = list(preds.values[:SUMMARY_ROWS])
    probs = None if preds.probabilities is None else preds.probabilities[:SUMMARY_ROWS].tolist()
    return labels, probs


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (chunked bodies too); a larger one is a 413.

    The rest of an oversized body is read and dropped (up to ``DRAIN_BYTES``) before the
    answer: a client that sends its whole body before reading (Python's urllib, most
    others) would otherwise see the connection reset instead of the 413.
    """
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else 0
    parts: list[bytes] = []
    over = size > limit
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            over = True
        if over:
            if received > DRAIN_BYTES:
                break  # past this, the connection may be cut: the client is told nothing more
            continue
        parts.append(chunk)
    if over:
        raise HttpError(413, "body", max(size, received), f"request body at most {limit} bytes")
    return b"".join(parts)


def request_id_of(header: str | None) -> str:
    """The request's id: Ray Serve's (its proxy takes the caller's ``x-request-id`` or makes
    one, passes it in that header and answers with it), else a fresh one. Labels sent later name
    the prediction by it."""
    return header if header else uuid.uuid4().hex


def _is_replica_zero() -> bool:
    """Whether this replica is rank 0 of its deployment now (Serve renumbers after a scale-down)."""
    rank = serve.get_replica_context().rank
    return getattr(rank, "rank", rank) == 0


def _error_response(err: HttpError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json", headers=dict(err.headers))


@serve.deployment(name="Predictor", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Predictor:
    def __init__(self, args: dict[str, Any]) -> None:
        from runtime import registry

        t0 = time.perf_counter()
        self.args = load_config(ServeAppArgs, args)
        self.auth = ApiKeyAuth.for_app(self.args.api_key, self.args.api_key_env)
        self.budget = self._apply_gpu_budget()
        ref, self.model = registry.load(self.args.model_uri, self.args.allow_fingerprint_mismatch)
        if self.model.preprocessor is None:
            raise ServingError(
                f"{self.args.model_uri}: a {self.model.config.get('architecture')!r} model does not predict from "
                "rows of features; the predictor serves models trained by the tabular job"
            )
        self.preprocessor: FittedPreprocessor = self.model.preprocessor
        self.identity = {
            "name": ref.name if ref else None,
            "version": ref.version if ref else None,
            "uri": self.args.model_uri,
        }
        self._place_model()
        load_s = time.perf_counter() - t0
        # Fail at start-up, not on the first request, if the model cannot predict (or does not
        # fit its GPU budget); the warm-up also pays the first-call costs (CUDA context,
        # allocator, kernels, the pinned staging buffer) before traffic does.
        t1 = time.perf_counter()
        self._canary = self._canary_table()
        # JSON requests between decoding and their answer on this replica. With no batch wait
        # (batch_wait_timeout_s 0, the default) a lone one of up to INLINE_ROWS rows calls the
        # model itself, on the loop, as a batch of its size would (so JSON model calls stay one
        # at a time, as @serve.batch's max_concurrent_batches=1 keeps them): Serve's batch
        # queue (@serve.batch: the queue, its task's turns of the loop, its batch metrics) took a
        # lone request's p50 from 0.66 to 0.84 ms here. With others in flight, or a wait set, it
        # joins the queue.
        self._json_in_flight = 0
        self._warm_up()
        self.startup = {"load_s": round(load_s, 4), "warmup_s": round(time.perf_counter() - t1, 4)}
        self.metrics = self._metrics()
        self.live = self._live_monitor()
        bind_grpc_to_front_host()  # before Serve starts this replica's own gRPC server (after __init__)
        coalesce_response_writes()  # and before its HTTP server: a response's head and body in one write
        self._publish_device_memory()
        self._batched_predict.set_max_batch_size(self.args.max_batch_size)  # type: ignore[attr-defined]
        self._batched_predict.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]
        logger.info(
            "loaded %s (version %s) on %s (%s) in %.2fs, warm-up %.3fs%s",
            self.args.model_uri,
            self.identity["version"],
            self.model.device,
            self.model.precision,
            self.startup["load_s"],
            self.startup["warmup_s"],
            "; API key required" if self.auth.enabled else "",
        )
        if self.args.inject_error_rate:
            logger.warning("FAULT INJECTION: %.1f%% of predictions answer 500", 100 * self.args.inject_error_rate)

    # ------------------------------------------------------------------ the device

    def _place_model(self) -> None:
        """Resolve ``device`` and ``precision``, check the weights fit the GPU budget, move them."""
        import ray

        assigned = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        want, precision = self.args.device, self.args.precision
        cuda = _cuda_available()
        if want == "cuda" and not cuda:
            raise ServingError(
                f"device: cuda, but this replica sees no GPU (ray_actor_options.num_gpus {assigned:g}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); give the deployment "
                "ray_actor_options.num_gpus (e.g. 0.25) on a cluster with GPUs, or set device: cpu"
            )
        device = "cuda" if want == "cuda" or (want == "auto" and assigned > 0 and cuda) else "cpu"
        if device == "cpu" and precision != "fp32":
            raise ServingError(
                f"precision: {precision} needs a GPU, and this replica serves on the CPU (device: {want}, "
                f"num_gpus {assigned:g}); use precision: fp32, or give the replica a GPU"
            )
        if device == "cpu":
            return
        if self.budget is not None:
            need = self.model.parameter_bytes(precision)
            have = self.budget.budget_bytes()
            if need > have:
                raise ServingError(
                    f"{self.args.model_uri}: the weights need {_mib(need)} in {precision}, more than this replica's "
                    f"GPU budget of {_mib(have)} ({self.budget.fraction:g} of {_mib(self.budget.total_bytes or 0)} "
                    f"less {_mib(self.budget.headroom_bytes)} for the CUDA context): {_mib(need - have)} over. "
                    "Raise ray_actor_options.num_gpus, use precision: bf16, or lower gpu_headroom_bytes"
                )
        try:
            self.model.to(device, precision, rows_per_call=self.args.gpu_rows_per_call)
        except Exception as exc:
            raise self._over_budget(exc, "moving the weights") from exc

    def _over_budget(self, exc: Exception, doing: str) -> Exception:
        import torch

        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            return exc
        have = self.budget.budget_bytes() if self.budget is not None else torch.cuda.mem_get_info()[1]
        used = torch.cuda.memory_reserved()
        return ServingError(
            f"{self.args.model_uri} does not fit this replica's GPU memory ({_mib(have)}"
            + (f", {self.budget.fraction:g} of the GPU" if self.budget is not None else "")
            + f"): out of memory while {doing} with {_mib(used)} reserved (weights {_mib(self.model.parameter_bytes())}); "
            f"{str(exc).splitlines()[0]}. Raise ray_actor_options.num_gpus, use precision: bf16, or lower "
            "gpu_rows_per_call"
        )

    def _warm_up(self) -> None:
        """One-row calls; on a GPU then one of ``gpu_rows_per_call`` rows, the largest a model
        call takes, so its memory is allocated (and checked against the budget) before traffic."""
        sizes = [1, 1, 1]
        if self.model.device.startswith("cuda"):
            sizes.append(self.args.gpu_rows_per_call)
        try:
            for rows in sizes:
                self.model.predict_table(self._canary.take([0] * rows) if rows > 1 else self._canary)
        except Exception as exc:
            raise self._over_budget(exc, f"warming up on {sizes[-1]} rows") from exc

    def device_memory(self) -> dict[str, Any]:
        """The device, its precision and memory as this replica uses it (no CUDA sync)."""
        out: dict[str, Any] = {"device": self.model.device, "precision": self.model.precision}
        if out["device"].startswith("cuda"):
            import torch

            index = torch.device(out["device"]).index or 0
            out.update(
                name=torch.cuda.get_device_name(index),
                total_bytes=int(torch.cuda.get_device_properties(index).total_memory),
                parameter_bytes=self.model.parameter_bytes(),
                torch_allocated_bytes=int(torch.cuda.memory_allocated(index)),
                torch_reserved_bytes=int(torch.cuda.memory_reserved(index)),
            )
        return out

    def _publish_device_memory(self) -> None:
        if self.metrics is None:
            return
        memory = self.device_memory()
        values = {k.removesuffix("_bytes"): v for k, v in memory.items() if k.endswith("_bytes")}
        if self.budget is not None:
            values["budget"] = self.budget.budget_bytes()
        self.metrics.set_device_memory(memory["device"], values)

    def _canary_table(self) -> pa.Table:
        schema = self.preprocessor.input_schema
        row = {f.name: ("" if pa.types.is_string(f.type) else 0.0) for f in schema}
        return self.preprocessor.records_to_table([row])

    def _apply_gpu_budget(self) -> Any:
        import ray

        fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        if not 0.0 < fraction < 1.0:
            return None
        from runtime.memory import DEFAULT_CONTEXT_HEADROOM, apply_budget

        headroom = self.args.gpu_headroom_bytes
        return apply_budget(fraction, headroom_bytes=DEFAULT_CONTEXT_HEADROOM if headroom is None else headroom)

    def _metrics(self) -> Any:
        from runtime.serving._metrics import ServingMetrics

        try:
            return ServingMetrics.for_model(self.model, str(self.identity["name"]), str(self.identity["version"]))
        except Exception as exc:  # metrics must never take the replica down
            logger.warning("serving metrics disabled: %s", exc)
            return None

    def _live_monitor(self) -> Any:
        """Live monitoring (``args.monitoring``): summaries and the prediction log, flushed by a
        thread; replica 0 also judges the trailing window. Never takes the replica down."""
        settings = self.args.monitoring
        if not settings.enabled:
            return None
        try:
            from runtime.monitoring import LiveMonitor, LiveSettings, MonitorGauges, MonitoringStore, load_reference

            context = serve.get_replica_context()
            reference = load_reference(self.model.directory)
            if reference is None:
                logger.info(
                    "monitoring: %s has no reference.json (packaged before monitoring); logging predictions only",
                    self.args.model_uri,
                )
            model, version = self.monitoring_identity()
            gauges = MonitorGauges(model, version)
            live = LiveMonitor(
                app=context.app_name,
                model=model,
                version=version,
                replica=context.replica_id.unique_id,
                task=self.model.task.name if self.model.task else "regression",
                reference=reference,
                store=MonitoringStore(settings.store),
                settings=LiveSettings(**settings.model_dump(exclude={"enabled", "store"})),
                evaluator=_is_replica_zero,
                publish=gauges.publish,
                count_dropped=gauges.count_dropped,
            )
            return live.start()
        except Exception as exc:
            logger.warning("monitoring disabled on this replica: %s: %s", type(exc).__name__, exc)
            return None

    def monitoring_identity(self) -> tuple[str, str]:
        """(model, version) as monitoring names them: the registered name and version, or for a
        model directory its folder name and ``dir-`` + the manifest's sha256 prefix."""
        name, version = self.identity["name"], self.identity["version"]
        if name is not None and version is not None:
            return str(name), str(version)
        digest = hashlib.sha256(repr(sorted(self.model.manifest.get("files", {}).items())).encode()).hexdigest()
        return self.model.directory.name, f"dir-{digest[:12]}"

    def __del__(self) -> None:
        live = getattr(self, "live", None)
        if live is not None:  # a graceful stop: flush what is buffered
            live.stop()

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (and replaces it)."""
        preds = self.model.predict_table(self._canary)
        if len(preds) != 1:
            raise RuntimeError(f"canary prediction returned {len(preds)} rows, expected 1")
        if self.metrics is not None:
            self.metrics.flush()
            self._publish_device_memory()

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ok",
            "model": self.identity,
            "startup": self.startup,
            "replica": {"pid": os.getpid()},
            "device": self.device_memory(),
        }
        if self.budget is not None:
            from runtime.memory import budget_usage

            usage = budget_usage(self.budget)
            out["gpu_budget"] = {
                "budget_bytes": usage.budget_bytes,
                "nvml_used_bytes": usage.nvml_used_by_this_process,
                "torch_reserved_bytes": usage.torch_reserved,
                "within_budget": usage.within_budget,
            }
        return out

    async def __call__(self, request: Request) -> Response:
        t0 = time.perf_counter()
        path = request.url.path[len(request.scope.get("root_path", "")) :].rstrip("/") or "/"
        route = ROUTES.get(path)
        try:
            if route is None:
                listed = ", ".join(f"{'/'.join(sorted(r.methods))} {p}" for p, r in ROUTES.items())
                raise HttpError(404, None, path, f"unknown route; use one of: {listed}")
            if request.method not in route.methods:
                allow = ", ".join(sorted(route.methods))
                raise HttpError(405, None, request.method, f"{allow} {route.path}", headers={"Allow": allow})
            if route.auth:
                self.auth.check(request.headers.get("authorization"))
            response = await route.handle(self, request)
        except HttpError as err:
            response = _error_response(err)
        except Exception:  # a bug of ours: log it, answer 500 (never die)
            logger.exception("unexpected error on %s", path)
            response = JSONResponse({"error": {"rule": "internal error; see the replica log"}}, status_code=500)
        if self.metrics is not None:
            label = route.path if route is not None else UNKNOWN_ROUTE
            self.metrics.observe_request(label, response.status_code, time.perf_counter() - t0)
        return response

    async def labels(self, request: Request) -> Response:
        """``POST /labels``: ``{"labels": [{"request_id": ..., "label": ..., "row": 0}, ...]}``,
        the ground truth of earlier predictions (``row`` for a multi-row request; default 0)."""
        if self.live is None:
            raise HttpError(409, "monitoring.enabled", False, "labels need monitoring; set args.monitoring.enabled")
        body = await read_body(request, self.args.max_body_bytes)
        accepted = await self._store_labels(request.headers.get("content-type"), body)
        return JSONResponse({"accepted": accepted})

    async def accept_labels(self, content_type: str | None, body: bytes) -> tuple[int, bytes]:
        """``POST /labels`` for a router in front (a ``DeploymentHandle`` call): (status, JSON body)."""
        try:
            if self.live is None:
                raise HttpError(409, "monitoring.enabled", False, "labels need monitoring; set args.monitoring.enabled")
            if len(body) > self.args.max_body_bytes:
                raise HttpError(413, "body", len(body), f"request body at most {self.args.max_body_bytes} bytes")
            accepted = await self._store_labels(content_type, body)
            return 200, json.dumps({"accepted": accepted}).encode()
        except HttpError as err:
            return err.status, err.body()

    async def _store_labels(self, content_type: str | None, body: bytes) -> int:
        assert self.live is not None
        table = await asyncio.to_thread(_labels_table, content_type, body)
        try:
            await asyncio.to_thread(self.live.store.write_labels, self.live.app, table)
        except Exception as exc:
            logger.warning("writing %d labels failed: %s", table.num_rows, exc)
            raise HttpError(
                503,
                "store",
                None,
                "the monitoring store is unavailable; send the labels again later",
                headers={"Retry-After": "10"},
            ) from None
        return int(table.num_rows)

    async def predict(self, request: Request) -> Response:
        """``POST /predict`` (see the module docstring); the route table checked method and key."""
        body = await read_body(request, self.args.max_body_bytes)
        given = request.headers.get("x-request-id")
        request_id = request_id_of(given)
        out, media, headers, _ = await self._predict_body(request.headers.get("content-type"), body, request_id)
        if given:  # Serve's proxy answers with the x-request-id header itself
            headers.pop("x-request-id", None)
        return Response(out, media_type=media, headers=headers)

    async def answer(self, content_type: str | None, body: bytes, request_id: str | None = None) -> Answer:
        """``POST /predict``'s answer for a router in front (a ``DeploymentHandle`` call, no HTTP):
        the body, status and headers it would send, and the first rows' predictions for the
        router's comparisons. Bad input is an answer (a 4xx), never an exception."""
        t0 = time.perf_counter()
        try:
            if len(body) > self.args.max_body_bytes:
                raise HttpError(413, "body", len(body), f"request body at most {self.args.max_body_bytes} bytes")
            out, media, headers, preds = await self._predict_body(content_type, body, request_id_of(request_id))
            answer = Answer(200, out, media, headers, *_summary(preds))
        except HttpError as err:
            answer = Answer(err.status, err.body(), "application/json", dict(err.headers))
        except Exception:  # a bug of ours: log it, answer 500 (the router counts it against this arm)
            logger.exception("unexpected error answering a routed request")
            answer = Answer(500, b'{"error":{"rule":"internal error; see the replica log"}}', "application/json", {})
        if self.metrics is not None:
            self.metrics.observe_request("/predict", answer.status, time.perf_counter() - t0)
        return answer

    async def Predict(self, request: Any, grpc_context: Any = None) -> Any:
        """``skewless.v1.Predictor/Predict`` through Serve's gRPC ingress (``runtime.serving._grpc``):
        the ``POST /predict`` body in a message, the same checks and answer; an error sets the
        gRPC status (the HTTP status's counterpart) with the JSON error body as its details
        (called without a gRPC context, through a handle, it raises the :class:`HttpError`)."""
        from runtime.serving._grpc import PredictReply, grpc_status

        t0 = time.perf_counter()
        reply, error = PredictReply(), None
        try:
            metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
            self.auth.check(metadata.get("authorization"))
            body = getattr(request, "body", None)
            if not isinstance(body, bytes):
                raise HttpError(400, "body", type(body).__name__, "a skewless.v1.PredictRequest message")
            if len(body) > self.args.max_body_bytes:
                raise HttpError(413, "body", len(body), f"request body at most {self.args.max_body_bytes} bytes")
            given = request.request_id or metadata.get("x-request-id")
            out, media, headers, _ = await self._predict_body(
                request.content_type or "application/json", body, request_id_of(given)
            )
            reply = PredictReply(
                body=out,
                content_type=media,
                request_id=headers["x-request-id"],
                model_version=headers["x-skewless-model-version"],
            )
        except HttpError as err:
            error = err
        except Exception:  # a bug of ours: log it, answer INTERNAL (never die)
            logger.exception("unexpected error on gRPC Predict")
            error = HttpError(500, None, None, "internal error; see the replica log")
        if self.metrics is not None:
            status = 200 if error is None else error.status
            self.metrics.observe_request(GRPC_ROUTE, status, time.perf_counter() - t0)
        if error is not None:
            if grpc_context is None:  # not through gRPC (a DeploymentHandle call): nowhere to set a status
                raise error
            grpc_context.set_code(grpc_status(error.status))
            grpc_context.set_details(error.body().decode())
        return reply

    async def _predict_body(
        self, content_type: str | None, body: bytes, request_id: str
    ) -> tuple[bytes, str, dict[str, str], Any]:
        if self.args.inject_error_rate and random.random() < self.args.inject_error_rate:
            raise HttpError(500, None, None, f"injected error (inject_error_rate {self.args.inject_error_rate:g})")
        arrow = is_arrow(content_type)
        headers: dict[str, str] = {
            "x-skewless-model-version": str(self.identity["version"]),
            "x-request-id": request_id,
        }
        if arrow:  # bulk: decode, transform and predict off the event loop
            table, preds = await asyncio.to_thread(self._decode_and_predict, content_type, body)
        else:  # a large body is parsed off the event loop, so other requests keep moving
            if len(body) <= INLINE_JSON_BYTES:
                table = self._decode(content_type, body)
            else:
                table = await asyncio.to_thread(self._decode, content_type, body)
            self._json_in_flight += 1
            try:
                await asyncio.sleep(0)  # requests that came in with this one get to count themselves
                if self._json_in_flight == 1 and not self.args.batch_wait_timeout_s and table.num_rows <= INLINE_ROWS:
                    # alone, no wait asked, small: the model call is synchronous, so it overlaps nothing
                    preds, batched = self._predict_or_error(table), 1
                else:
                    preds, batched = await self._batched_predict(table)
            finally:
                self._json_in_flight -= 1
            if isinstance(preds, HttpError):
                raise preds
            headers["x-skewless-batch-requests"] = str(batched)
        if self.live is not None:
            self.live.observe(request_id, table, preds)
        out, media = encode_response(preds, self.identity, arrow=arrow, request_id=request_id)
        return out, media, headers, preds

    def _decode(self, content_type: str | None, body: bytes) -> pa.Table:
        return decode_request(
            content_type,
            body,
            preprocessor=self.preprocessor,
            max_body_bytes=self.args.max_body_bytes,
            max_instances=self.args.max_instances,
        )

    def _predict(self, table: pa.Table) -> Any:
        """One model call (per batch of requests, or per Arrow body), observed by the metrics."""
        try:
            preds = self.model.predict_table(table)
        except SchemaValidationError as exc:
            raise HttpError.from_schema_error(exc) from None
        if self.metrics is not None:
            self.metrics.observe_batch(table, preds)
        return preds

    def _decode_and_predict(self, content_type: str | None, body: bytes) -> tuple[pa.Table, Any]:
        table = self._decode(content_type, body)
        return table, self._predict(table)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched_predict(self, tables: list[pa.Table]) -> list[tuple[Any, int]]:
        """One model call for the rows of many requests; each gets its slice (or its error)
        and the number of requests that shared the call."""
        n = len(tables)
        if n == 1:
            return [(await self._run_model(tables[0]), 1)]
        try:
            merged = pa.concat_tables(tables)
        except pa.ArrowInvalid:  # cannot happen with one schema; keep the requests apart anyway
            return [(await self._run_model(t), 1) for t in tables]
        preds = await self._run_model(merged)
        if isinstance(preds, HttpError):  # one bad row: find whose, answer the others
            return [(await self._run_model(t), 1) for t in tables]
        out, start = [], 0
        for t in tables:
            out.append((preds.slice(start, start + t.num_rows), n))
            start += t.num_rows
        return out

    async def _run_model(self, table: pa.Table) -> Any:
        """Small batches run inline (a thread hop costs more than they do and the replica's
        model is single-threaded anyway); large ones in a thread, so health checks and
        request decoding go on meanwhile."""
        if table.num_rows <= INLINE_ROWS:
            return self._predict_or_error(table)
        return await asyncio.to_thread(self._predict_or_error, table)

    def _predict_or_error(self, table: pa.Table) -> Any:
        try:
            return self._predict(table)
        except HttpError as err:
            return err


def _labels_table(content_type: str | None, body: bytes) -> pa.Table:
    """A ``POST /labels`` body as the store's labels table (400/415/422 on bad input)."""
    from runtime.errors import DataError
    from runtime.monitoring import labels_table

    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HttpError(415, "content-type", content_type, "POST /labels takes application/json")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise HttpError(400, "body", None, f"not valid JSON: {exc}") from None
    items = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise HttpError(422, "labels", type(items).__name__, 'a non-empty list of {"request_id", "label", "row"?}')
    try:
        table = pa.Table.from_pylist(
            [
                {
                    "request_id": i.get("request_id"),
                    "label": None if i.get("label") is None else str(i["label"]),
                    "row": int(i.get("row", 0)),
                }
                for i in items
            ]
        )
        return labels_table(table)
    except (DataError, ValueError, TypeError, pa.ArrowInvalid) as exc:
        raise HttpError(422, "labels", None, str(exc)) from None


def build_predictor_app(args: dict[str, Any], options: dict[str, Any] | None = None) -> serve.Application:
    """An application builder: validates ``args`` before any replica starts.

    ``options`` are Serve deployment options (``num_replicas``, ``autoscaling_config``,
    ``max_queued_requests``, ``ray_actor_options`` ...) for code that does not use a config file.
    """
    validated = pin(load_config(ServeAppArgs, dict(args)))
    deployment: Any = Predictor.options(**options) if options else Predictor  # type: ignore[attr-defined]
    app: serve.Application = deployment.bind(validated.model_dump())
    return app


def pin(args: ServeAppArgs) -> ServeAppArgs:
    """``args`` with a ``models:/<name>@<alias>`` resolved, now, to ``models:/<name>/<version>``.

    An application is built once per deploy (``serve.run``, ``serve deploy``), so every replica
    of the deployment (started now, by the autoscaler later, or replacing a dead one) loads the
    same version; moving the alias changes nothing until the next deploy. A local model
    directory or an explicit version is left as it is.
    """
    if not args.model_uri.startswith("models:/") or "@" not in args.model_uri:
        return args
    from runtime import registry

    ref = registry.resolve(args.model_uri)
    logger.info("pinned %s to %s", args.model_uri, ref.uri)
    return args.model_copy(update={"model_uri": ref.uri})
