"""The starlette application: routes, error shapes, health."""

from __future__ import annotations

import hmac
import logging
from importlib.metadata import PackageNotFoundError, version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine.request import RequestError
from .protocol import APIError
from .routes import openai
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
    return Response(status_code=200)


async def version_route(request: Request) -> Response:
    return JSONResponse({"version": _version()})


class APIKeyMiddleware:
    """One shared bearer key on /v1 routes (vLLM's --api-key); compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key", None, "invalid_api_key")
                response = JSONResponse(error.body(), status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(state: ServerState, api_key: str | None = None) -> Starlette:
    app = Starlette(
        routes=[Route("/health", health), Route("/ping", health, methods=["GET", "POST"]),
                Route("/version", version_route), *openai.routes],
        exception_handlers={APIError: _api_error, RequestError: _request_error,
                            HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.loraplex = state
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
