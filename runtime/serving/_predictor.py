"""The predictor deployment: raw JSON rows -> the shared preprocessing -> the model.

Routes (below the application's route prefix):

- ``POST /predict`` with ``{"instances": [{"col": value, ...}, ...]}`` answers
  ``{"predictions": [...], "model": {"name", "version", "uri"}}`` (plus ``probabilities``
  and ``classes`` for classifiers). Bad input is a 4xx whose body names the field, the
  value and the rule; it is never a 500.
- ``GET /healthz`` answers 200 with the model identity once the replica is loaded.

The replica refuses to start when the installed preprocessing code's fingerprint differs
from the one the model was trained with (``allow_fingerprint_mismatch`` overrides, loudly).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from runtime.config import ServeAppArgs, load_config
from runtime.errors import SchemaValidationError

logger = logging.getLogger("ray.serve")


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON; send null for a missing value")


def _error(status: int, field: str | None, value: Any, rule: str, row: int | None = None) -> JSONResponse:
    if not isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        value = repr(value)[:200]  # JSON has no NaN/inf, and bodies stay small
    body = {"error": {"field": field, "row": row, "value": value, "rule": rule}}
    return JSONResponse(body, status_code=status)


@serve.deployment(name="Predictor", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class Predictor:
    def __init__(self, args: dict[str, Any]) -> None:
        from runtime import registry

        self.args = load_config(ServeAppArgs, args)
        ref, self.model = registry.load(self.args.model_uri, self.args.allow_fingerprint_mismatch)
        self.identity = {
            "name": ref.name if ref else None,
            "version": ref.version if ref else None,
            "uri": self.args.model_uri,
        }
        # Fail at start-up, not on the first request, if the model cannot predict.
        self._canary = self._canary_record()
        self.model.predict_records([self._canary])
        logger.info("loaded %s (version %s)", self.args.model_uri, self.identity["version"])

    def _canary_record(self) -> dict[str, Any]:
        schema = self.model.preprocessor.input_schema
        return {f.name: ("" if str(f.type) == "string" else 0.0) for f in schema}

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        self.model.predict_records([self._canary])

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path[len(request.scope.get("root_path", "")) :].rstrip("/") or "/"
        if path == "/healthz":
            return JSONResponse({"status": "ok", "model": self.identity})
        if path != "/predict":
            return _error(404, None, path, "unknown route; use POST /predict or GET /healthz")
        if request.method != "POST":
            return _error(405, None, request.method, "POST /predict")
        body = await request.body()
        if len(body) > self.args.max_body_bytes:
            return _error(413, None, len(body), f"request body at most {self.args.max_body_bytes} bytes")
        # The model runs in a worker thread so the replica's event loop keeps serving.
        return await asyncio.to_thread(self._predict, body)

    def _predict(self, body: bytes) -> JSONResponse:
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return _error(400, None, body[:100].decode("utf-8", "replace"), f"body must be valid JSON ({exc})")
        if not isinstance(payload, dict) or "instances" not in payload:
            return _error(
                422,
                "instances",
                payload if not isinstance(payload, dict) else None,
                'body must be an object {"instances": [{...}, ...]}',
            )
        instances = payload["instances"]
        if not isinstance(instances, list) or not instances:
            return _error(422, "instances", instances, "must be a non-empty list of objects")
        if len(instances) > self.args.max_instances:
            return _error(413, "instances", len(instances), f"at most {self.args.max_instances} instances per request")
        for i, row in enumerate(instances):
            if not isinstance(row, dict):
                return _error(422, "instances", row, "each instance must be an object of column: value", row=i)
        try:
            preds = self.model.predict_records(instances)
        except SchemaValidationError as exc:
            err = exc.to_dict()
            return _error(422, err["field"], err["value"], err["rule"], row=err["row"])
        out = preds.to_json()
        out["model"] = self.identity
        return JSONResponse(out)


def build_predictor_app(args: dict[str, Any]) -> serve.Application:
    """An application builder: validates ``args`` before any replica starts."""
    validated = load_config(ServeAppArgs, dict(args))
    return Predictor.bind(validated.model_dump())  # type: ignore[attr-defined]
