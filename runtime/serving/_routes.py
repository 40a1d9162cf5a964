"""The predictor's route table: one :class:`Route` per path, with its methods and whether it
needs the API key (yes unless it says otherwise: health stays open so probes need no secret).

The deployment (:class:`runtime.serving.Predictor`) dispatches every request through
:data:`ROUTES`: an unknown path is a 404 naming the routes, a wrong method a 405 with
``Allow``, the key is checked before the handler runs when the route needs it, and every
route's requests are counted and timed (label ``route``). A new route is one subclass and one
entry in :data:`ROUTES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from runtime.serving._predictor import Predictor

__all__ = ["ROUTES", "UNKNOWN_ROUTE", "HealthRoute", "LabelsRoute", "PredictRoute", "Route"]

UNKNOWN_ROUTE = "<unknown>"  # the metrics label of a path that is no route (bounded cardinality)


class Route:
    """One path of the predictor. Subclasses set the class attributes and :meth:`handle`."""

    path: ClassVar[str]
    methods: ClassVar[frozenset[str]]
    auth: ClassVar[bool] = True  # needs the API key when one is configured

    async def handle(self, predictor: Predictor, request: Request) -> Response:
        raise NotImplementedError


class PredictRoute(Route):
    """``POST /predict``: JSON instances (dynamically batched) or an Arrow IPC stream (bulk)."""

    path = "/predict"
    methods = frozenset({"POST"})

    async def handle(self, predictor: Predictor, request: Request) -> Response:
        return await predictor.predict(request)


class LabelsRoute(Route):
    """``POST /labels``: ground truth for earlier predictions, by request id (monitoring)."""

    path = "/labels"
    methods = frozenset({"POST"})

    async def handle(self, predictor: Predictor, request: Request) -> Response:
        return await predictor.labels(request)


class HealthRoute(Route):
    """``GET /healthz``: the model identity, load and warm-up times, the GPU budget."""

    path = "/healthz"
    methods = frozenset({"GET", "HEAD"})
    auth = False

    async def handle(self, predictor: Predictor, request: Request) -> Response:
        return JSONResponse(predictor.health())


ROUTES: dict[str, Route] = {route.path: route for route in (PredictRoute(), LabelsRoute(), HealthRoute())}
