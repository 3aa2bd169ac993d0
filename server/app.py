"""The starlette application: routes, error shapes, health."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from .auth import Keyring, authorize
from .engine.async_engine import EngineDeadError
from .engine.request import RequestError
from .protocol import APIError
from . import openapi
from .routes import admin, compose, openai
from .state import ServerState

log = logging.getLogger("loraplex.server")


def _version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return await _api_error(request, APIError.from_request_error(exc))


async def _engine_dead(request: Request, exc: Exception) -> Response:
    return await _api_error(request, APIError(503, str(exc), None, "engine_dead"))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    return await _api_error(request, APIError(status, str(getattr(exc, "detail", exc))))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}"))


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    if not state.engine.alive:
        return JSONResponse(APIError(503, "the engine is not running").body(), status_code=503)
    if state.draining:
        return JSONResponse(APIError(503, "the server is shutting down").body(), status_code=503)
    return Response(status_code=200)


async def metrics_route(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    names_visible = state.principal(request).patterns != ()
    return Response(state.metrics.render(names_visible), media_type=CONTENT_TYPE_LATEST)


async def version_route(request: Request) -> Response:
    return JSONResponse({"version": _version()})


class AuthMiddleware:
    """Resolves the caller once per request (`request.state.principal`) and refuses what
    the route table does not allow it, before any handler runs."""

    def __init__(self, app, keyring: Keyring):
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        try:
            principal = authorize(self.keyring, scope["path"],
                                  header.decode("latin-1") if header else None)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            return await response(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, receive, send)


class HTTPMetricsMiddleware:
    """Counts every response by route template, method and status (`http_requests_total`),
    refusals by the auth layer and 404s included: the error-rate alerts read it."""

    def __init__(self, app, routes, counter):
        self.app = app
        self.routes = routes
        self.counter = counter

    def _handler(self, scope) -> str:
        # The router records the route it matched (starlette >= 0.41); requests it never saw
        # (refused by the auth layer) are matched here.
        route = scope.get("route")
        if route is not None:
            return route.path
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "none"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client sees if the app fails before it answers

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.counter.labels(self._handler(scope), scope["method"], str(status)).inc()


def build_app(state: ServerState) -> Starlette:
    app = Starlette(
        routes=[Route("/health", health), Route("/ping", health, methods=["GET", "POST"]),
                Route("/version", version_route), Route("/metrics", metrics_route),
                *openai.routes, *compose.routes, *admin.routes, *openapi.routes],
        exception_handlers={APIError: _api_error, RequestError: _request_error,
                            HTTPException: _http_error, EngineDeadError: _engine_dead,
                            Exception: _internal_error},
    )
    app.state.loraplex = state
    app.add_middleware(AuthMiddleware, keyring=state.keyring)
    # Added last, so it is outermost and counts the auth layer's refusals too.
    app.add_middleware(HTTPMetricsMiddleware, routes=app.routes,
                       counter=state.metrics.http_requests)
    return app
