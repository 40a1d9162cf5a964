"""The rollout router: one ingress deployment in front of two or more pinned model versions.

Open-source Ray Serve has had no traffic splitting or shadowing since 1.x, so the router does it
with Serve's own model composition: each arm is a :class:`~runtime.serving.Predictor`
deployment loading ``models:/<name>/<version>``, and the router holds a ``DeploymentHandle``
to each. Per request it

- picks an arm: by weight (canary), or, when the request carries the sticky header, by a
  stable hash of its value (sticky A/B: BLAKE2b salted with the rollout's name, the same in
  every router replica and after restarts; never Python's ``hash()``);
- calls the arm's :meth:`~runtime.serving.Predictor.answer`, retrying (up to ``retries``
  times) when the call fails for a reason other than the model's own answer (a replica that
  died or is unreachable): a prediction is idempotent;
- copies the request to the shadow arm, if there is one, in a task of its own. Its answer never
  reaches the caller, and its failures and latency never touch the caller's. At most
  ``max_in_flight`` shadow calls run at once; past that a copy is dropped and counted. Label
  flips and probability deltas against the live answer are recorded.

The weights, the sticky header and the shadow settings live in a named Ray actor,
:class:`RolloutControl` (one per application), which every router replica polls every
:data:`POLL_S`: changing them changes traffic within a fraction of a second, without
restarting any replica (a router or a model). The router replicas hand their per-request
samples (arm, latency, status, the first rows' predictions) to the same actor every
:data:`FLUSH_S`; the canary judge reads its windows from there. Prometheus gets the same
figures from ``ray.util.metrics`` (``skewless_rollout_*``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
import time
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.serving._auth import ApiKeyAuth
from runtime.serving._codec import HttpError
from runtime.serving._predictor import Answer, read_body, request_id_of
from runtime.serving._wire import coalesce_response_writes

logger = logging.getLogger("ray.serve")

__all__ = [
    "CONTROL_NAMESPACE",
    "FLUSH_S",
    "POLL_S",
    "ROLLOUT_METRICS",
    "RolloutControl",
    "Router",
    "control_actor",
    "pick_arm",
    "stable_unit",
]

CONTROL_NAMESPACE = "skewless"
POLL_S = 0.25
FLUSH_S = 0.5
SAMPLES_PER_ARM = 50_000  # the control actor keeps this many recent requests per arm...
SAMPLE_ROWS = 16  # ...and of each, this many rows' predictions (a bulk request is not kept whole)
SHADOW_TIMEOUT_S = 30.0

# What Prometheus scrapes from the routers (Ray's agent adds ``ray_``; counters get ``_total``).
ROLLOUT_METRICS = (
    "ray_skewless_rollout_requests_total",
    "ray_skewless_rollout_latency_seconds_bucket",
    "ray_skewless_rollout_latency_seconds_count",
    "ray_skewless_rollout_latency_seconds_sum",
    "ray_skewless_rollout_weight",
    "ray_skewless_rollout_shadow_total",
    "ray_skewless_rollout_shadow_rows_total",
)


def stable_unit(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key`` and ``salt``: the same in every process, forever."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_arm(weights: dict[str, float], u: float) -> str:
    """The arm whose share of the cumulative weights (arms in name order) holds ``u`` in [0, 1)."""
    arms = sorted(a for a, w in weights.items() if w > 0)
    if not arms:
        raise ValueError("no arm has a positive weight")
    total = sum(weights[a] for a in arms)
    edge = 0.0
    for arm in arms:
        edge += weights[arm] / total
        if u < edge:
            return arm
    return arms[-1]


@ray.remote(num_cpus=0, max_concurrency=64)  # type: ignore[call-overload]
class RolloutControl:
    """One application's traffic settings, its recent per-request samples and the rollout's state.

    Its methods are ``async`` with no ``await`` inside: Ray runs an async actor's calls on one
    event loop, so each runs whole (a window is never read while samples are being added).

    ``config``: ``weights`` {arm: weight}, ``versions`` {arm: model version}, ``sticky_header``
    (or None), ``shadow`` ({"arm", "fraction", "max_in_flight"} or None), ``salt``.
    """

    def __init__(self, app: str, config: dict[str, Any]) -> None:
        self.app = app
        self.config = dict(config)
        self.version = 1
        self.samples: dict[str, collections.deque[tuple[Any, ...]]] = {}
        self.shadows: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=SAMPLES_PER_ARM)
        self.counters: collections.Counter[str] = collections.Counter()
        self.state: dict[str, Any] = {"status": "idle"}

    async def get_config(self, known: int = 0) -> tuple[int, dict[str, Any]] | None:
        """The settings, or None when the caller already has version ``known``."""
        return None if known == self.version else (self.version, self.config)

    async def set_config(self, **changes: Any) -> int:
        self.config = {**self.config, **changes}
        self.version += 1
        return self.version

    async def record(
        self, samples: list[tuple[Any, ...]], shadows: list[tuple[Any, ...]], counters: dict[str, int]
    ) -> None:
        for sample in samples:  # (t, arm, kind, latency_ms, status, labels, probabilities, config version)
            self.samples.setdefault(sample[1], collections.deque(maxlen=SAMPLES_PER_ARM)).append(sample)
        self.shadows.extend(shadows)  # (t, live arm, shadow arm, pairs, flips, prob_deltas)
        self.counters.update(counters)

    async def window(self, since: float, until: float | None = None, min_version: int = 0) -> dict[str, Any]:
        """Samples with ``since <= t < until`` routed by config ``min_version`` or later (a router
        applies new weights at its next poll: requests it routed by the old ones meanwhile belong to
        the previous step, and counting them would compare the arms over different stretches of
        traffic): {"samples": {arm: [...]}, "shadows": [...], "counters"}."""
        end = float("inf") if until is None else until

        def kept(s: tuple[Any, ...]) -> bool:
            return since <= s[0] < end and (len(s) < 8 or s[7] >= min_version)

        return {
            "samples": {arm: [s for s in q if kept(s)] for arm, q in self.samples.items()},
            "shadows": [s for s in self.shadows if since <= s[0] < end],
            "counters": dict(self.counters),
        }

    async def get_state(self) -> dict[str, Any]:
        return {**self.state, "config": self.config, "config_version": self.version}

    async def update_state(self, **changes: Any) -> dict[str, Any]:
        self.state = {**self.state, **changes}
        return self.state

    async def transition(self, allowed: list[str], status: str, **changes: Any) -> dict[str, Any] | None:
        """Compare-and-swap on the status: move to ``status`` only from one of ``allowed``; the
        new state, or None (someone else moved it first). Serialises promote, rollback and abort."""
        if self.state.get("status") not in allowed:
            return None
        self.state = {**self.state, **changes, "status": status}
        return self.state


def control_actor(app: str, config: dict[str, Any] | None = None) -> Any:
    """The application's :class:`RolloutControl`; with ``config``, created (detached) if absent.
    Only a rollout's deploy creates it: a router replica started later must not bring back the
    deploy-time weights after a promotion (it uses them only while the actor is unreachable)."""
    name = f"rollout:{app}"
    if config is None:
        return ray.get_actor(name, namespace=CONTROL_NAMESPACE)
    return RolloutControl.options(  # type: ignore[attr-defined]
        name=name, namespace=CONTROL_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(app, config)


def _is_model_answer(exc: BaseException) -> bool:
    """Whether a failed handle call is the arm's own doing (an exception in its code), which a
    retry would only repeat; anything else (a replica that died, a lost connection) is retried."""
    return isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc, ray.exceptions.RayActorError)


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class Router:
    def __init__(self, arms: dict[str, Any], args: dict[str, Any]) -> None:
        coalesce_response_writes()  # the rollout's HTTP ingress: an answer's head and body in one write
        self.handles = dict(arms)
        self.app = args["app"]
        self.auth = ApiKeyAuth.for_app(args.get("api_key"), args.get("api_key_env"))
        self.max_body_bytes = int(args.get("max_body_bytes", 10 << 20))
        self.retries = int(args.get("retries", 2))
        self.config_version, self.config = 0, dict(args["control"])
        try:
            self.control = control_actor(self.app)
            self.config_version, self.config = ray.get(self.control.get_config.remote(0), timeout=30)
        except Exception as exc:  # gone: the deploy-time settings, and a warning while it stays so
            logger.warning("rollout control of %s unreachable (%s): routing by the deploy-time weights", self.app, exc)
            self.control = None
        self.samples: list[tuple[Any, ...]] = []
        self.shadows: list[tuple[Any, ...]] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.shadow_in_flight = 0
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        self.background: list[asyncio.Task[None]] = []
        self._warned = 0.0
        self.metrics = _RouterMetrics(self.app)
        self.metrics.weights(self.config)

    # ------------------------------------------------------------------ background

    def _ensure_background(self) -> None:
        if not self.background:
            loop = asyncio.get_running_loop()
            self.background = [loop.create_task(self._poll_config()), loop.create_task(self._flush_loop())]

    async def _poll_config(self) -> None:
        while True:
            try:
                if self.control is None:
                    self.control = control_actor(self.app)
                update = await self.control.get_config.remote(self.config_version)
                if update is not None:
                    self.config_version, self.config = update
                    self.metrics.weights(self.config)
            except Exception as exc:  # the control actor gone: keep the last settings, say so rarely
                self.control = None
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    logger.warning("rollout control unreachable (%s); keeping config v%d", exc, self.config_version)
            await asyncio.sleep(POLL_S)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()

    async def _flush(self) -> None:
        if not (self.samples or self.shadows or self.counters):
            return
        samples, shadows, counters = self.samples, self.shadows, dict(self.counters)
        self.samples, self.shadows, self.counters = [], [], collections.Counter()
        if self.control is None:
            return  # dropped: nothing to judge them (the buffers stay bounded)
        try:
            await self.control.record.remote(samples, shadows, counters)
        except Exception as exc:
            logger.warning("could not hand %d samples to the rollout control: %s", len(samples), exc)

    async def check_health(self) -> None:
        self._ensure_background()

    # ------------------------------------------------------------------ requests

    async def __call__(self, request: Request) -> Response:
        self._ensure_background()
        path = request.url.path[len(request.scope.get("root_path", "")) :].rstrip("/") or "/"
        try:
            if path == "/healthz" and request.method == "GET":
                return JSONResponse({"app": self.app, "config_version": self.config_version, **self._public_config()})
            if path not in ("/predict", "/labels"):
                raise HttpError(404, None, path, "unknown route; use one of: POST /predict, POST /labels, GET /healthz")
            if request.method != "POST":
                raise HttpError(405, None, request.method, f"POST {path}", headers={"Allow": "POST"})
            self.auth.check(request.headers.get("authorization"))
            body = await read_body(request, self.max_body_bytes)
            if path == "/labels":  # every arm writes one store: the first takes them
                status, out = await self.handles[sorted(self.handles)[0]].accept_labels.remote(
                    request.headers.get("content-type"), body
                )
                return Response(out, status_code=status, media_type="application/json")
        except HttpError as err:
            return Response(
                err.body(), status_code=err.status, media_type="application/json", headers=dict(err.headers)
            )
        content_type = request.headers.get("content-type")
        request_id = request_id_of(request.headers.get("x-request-id"))  # one id for the live and shadow answers
        config_version = self.config_version  # the weights this request was routed by
        arm = self._choose(request)
        t0 = time.perf_counter()
        answer = await self._call(arm, content_type, body, request_id)
        latency_ms = (time.perf_counter() - t0) * 1000
        self._observe(arm, "live", latency_ms, answer, config_version)
        shadow = self.config.get("shadow")
        if shadow and shadow["arm"] != arm and answer.status == 200 and random.random() < shadow.get("fraction", 1.0):
            self._start_shadow(shadow, arm, content_type, body, answer, request_id)
        # Serve's proxy answers with the x-request-id header itself: the arm's copy would double it
        headers = {**{k: v for k, v in answer.headers.items() if k != "x-request-id"}, "x-skewless-arm": arm}
        return Response(answer.body, status_code=answer.status, media_type=answer.media_type, headers=headers)

    def _public_config(self) -> dict[str, Any]:
        c = self.config
        return {k: c.get(k) for k in ("weights", "versions", "sticky_header", "shadow")}

    def _choose(self, request: Request) -> str:
        weights = self.config["weights"]
        header = self.config.get("sticky_header")
        key = request.headers.get(header) if header else None
        u = stable_unit(key, self.config.get("salt", self.app)) if key else random.random()
        return pick_arm(weights, u)

    async def _call(self, arm: str, content_type: str | None, body: bytes, request_id: str) -> Answer:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                answer: Answer = await self.handles[arm].answer.remote(content_type, body, request_id)
                if attempt:
                    self.counters[f"retried_ok:{arm}"] += 1
                return answer
            except Exception as exc:
                if _is_model_answer(exc):
                    logger.error("arm %s failed on a request: %s", arm, exc)
                    return _internal_error(arm)
                if isinstance(exc, serve.exceptions.BackPressureError):  # overloaded: retrying adds load
                    return _internal_error(arm, status=503)
                last = exc
                self.counters[f"retry:{arm}"] += 1
                await asyncio.sleep(0.05 * (attempt + 1))
        logger.error("arm %s unreachable after %d attempts: %s", arm, self.retries + 1, last)
        return _internal_error(arm, status=503)

    def _observe(
        self, arm: str, kind: str, latency_ms: float, answer: Answer, config_version: int | None = None
    ) -> None:
        routed_by = self.config_version if config_version is None else config_version
        sample = (time.time(), arm, kind, latency_ms, answer.status, answer.labels, answer.probabilities, routed_by)
        self.samples.append(sample)
        version = str(self.config.get("versions", {}).get(arm, ""))
        self.metrics.request(arm, version, kind, answer.status, latency_ms / 1000)

    # ------------------------------------------------------------------ shadow

    def _start_shadow(
        self,
        shadow: dict[str, Any],
        live_arm: str,
        content_type: str | None,
        body: bytes,
        live: Answer,
        request_id: str,
    ) -> None:
        if self.shadow_in_flight >= int(shadow.get("max_in_flight", 32)):
            self.counters["shadow_dropped"] += 1
            self.metrics.shadow("dropped")
            return
        self.shadow_in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._shadow(shadow["arm"], live_arm, content_type, body, live, request_id)
        )
        self.shadow_tasks.add(task)
        task.add_done_callback(self._shadow_done)

    def _shadow_done(self, task: asyncio.Task[None]) -> None:
        self.shadow_in_flight -= 1
        self.shadow_tasks.discard(task)

    async def _shadow(
        self, arm: str, live_arm: str, content_type: str | None, body: bytes, live: Answer, request_id: str
    ) -> None:
        t0 = time.perf_counter()
        response = self.handles[arm].answer.remote(content_type, body, request_id)
        try:
            answer: Answer = await asyncio.wait_for(_awaited(response), SHADOW_TIMEOUT_S)
        except Exception as exc:  # never the caller's problem: counted
            if isinstance(exc, asyncio.TimeoutError):
                response.cancel()  # cancelling the await does not stop the candidate's work; this does
            self.counters["shadow_error"] += 1
            self.metrics.shadow("error")
            answer = _internal_error(arm, status=599 if isinstance(exc, asyncio.TimeoutError) else 503)
        self._observe(arm, "shadow", (time.perf_counter() - t0) * 1000, answer)
        if answer.status != 200 or answer.labels is None or live.labels is None:
            return
        pairs = min(len(answer.labels), len(live.labels))
        flips = sum(1 for a, b in zip(live.labels[:pairs], answer.labels[:pairs], strict=True) if _differ(a, b))
        deltas: list[float] = []
        if answer.probabilities is not None and live.probabilities is not None:
            for p, q in zip(live.probabilities[:pairs], answer.probabilities[:pairs], strict=True):
                deltas.append(max(abs(a - b) for a, b in zip(p, q, strict=False)) if p and q else 0.0)
        deltas = deltas[:SAMPLE_ROWS]
        self.shadows.append((time.time(), live_arm, arm, pairs, flips, deltas))
        self.counters["shadow_compared"] += 1
        self.metrics.shadow("compared", pairs=pairs, flips=flips)


async def _awaited(response: Any) -> Any:
    return await response


def _differ(a: Any, b: Any) -> bool:
    """A label flip; a regression output counts only when it differs beyond float noise."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return True
    return bool(a != b)


def _internal_error(arm: str, status: int = 500) -> Answer:
    rule = "the model version is unavailable; try again" if status == 503 else "internal error; see the replica log"
    return Answer(status, f'{{"error":{{"rule":"{rule}","arm":"{arm}"}}}}'.encode(), "application/json", {})


class _RouterMetrics:
    """``skewless_rollout_*`` through ``ray.util.metrics`` (scraped with Ray's ``ray_`` prefix)."""

    def __init__(self, app: str) -> None:
        from ray.util import metrics

        self.app = app
        self.requests = metrics.Counter(
            "skewless_rollout_requests",
            "Requests through a rollout router, by arm, model version, kind (live/shadow) and status.",
            tag_keys=("app", "arm", "version", "kind", "status"),
        )
        self.latency = metrics.Histogram(
            "skewless_rollout_latency_seconds",
            "Latency of an arm's answer as the router saw it.",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
            tag_keys=("app", "arm", "kind"),
        )
        self.weight = metrics.Gauge(
            "skewless_rollout_weight", "Live traffic weight of each arm (percent).", tag_keys=("app", "arm")
        )
        self.shadows = metrics.Counter(
            "skewless_rollout_shadow", "Shadow copies: compared, dropped (bound), error.", tag_keys=("app", "outcome")
        )
        self.rows = metrics.Counter(
            "skewless_rollout_shadow_rows",
            "Rows compared between live and shadow answers, and label flips.",
            tag_keys=("app", "kind"),
        )

    def request(self, arm: str, version: str, kind: str, status: int, seconds: float) -> None:
        tags = {"app": self.app, "arm": arm, "version": version, "kind": kind, "status": str(status)}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds, tags={"app": self.app, "arm": arm, "kind": kind})

    def weights(self, config: dict[str, Any]) -> None:
        weights = config.get("weights", {})
        total = sum(weights.values()) or 1
        for arm, w in weights.items():
            self.weight.set(100 * w / total, tags={"app": self.app, "arm": arm})

    def shadow(self, outcome: str, pairs: int = 0, flips: int = 0) -> None:
        self.shadows.inc(1, tags={"app": self.app, "outcome": outcome})
        if pairs:
            self.rows.inc(pairs, tags={"app": self.app, "kind": "compared"})
        if flips:
            self.rows.inc(flips, tags={"app": self.app, "kind": "label_flip"})
