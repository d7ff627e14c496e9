"""The studio's FastAPI application: the pages (static files shipped in the package) and the API, one router per
page (plan, data, runs, compare, use).

The API (everything under ``/api``) wants ``Authorization: Bearer TOKEN`` (or ``?token=TOKEN``, which EventSource
needs) when the studio has a token; the pages hold no data and need none. Errors are ``{"error": "one line"}`` with
the status saying whose fault it is: 400 bad input, 401 wrong token, 403 a path outside the workspace, 404 unknown
model / file / run, 409 a run folder that is taken or a run in the wrong state.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from peftkit.errors import PeftkitError
from peftkit.studio import compare, data, plan, runs, use
from peftkit.studio.runfolders import Runs
from peftkit.studio.workspace import StudioError, Workspace

__all__ = ["create_app"]

STATIC = Path(__file__).with_name("static")


def create_app(workspace: str | Path, token: str | None = None) -> FastAPI:
    """The studio over `workspace` (created if missing); with `token`, the API wants it."""
    ws = Workspace(workspace)
    run_folders = Runs(ws)
    host = use.EngineHost(run_folders)
    jobs = use.Jobs(run_folders)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        host.close()
        run_folders.shutdown()

    app = FastAPI(title="peftkit studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workspace, app.state.runs = ws, run_folders
    _add_error_handlers(app)
    for r in (plan.router(ws), data.router(ws), runs.router(run_folders), compare.router(run_folders),
              use.router(host, jobs)):
        app.include_router(r, prefix="/api")

    @app.get("/api/workspace")
    def workspace_info() -> dict[str, Any]:
        return {"root": str(ws.root)}

    app.router.routes.append(Mount("/api/use/serve", app=host))
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="pages")
    app.add_middleware(TokenCheck, token=token)
    return app


class TokenCheck:
    """ASGI middleware: every ``/api`` request (the mounted serve API included) shows the token, in the
    ``Authorization`` header or the ``token`` query parameter."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token and scope["type"] == "http" and scope["path"].startswith("/api") and not self._ok(scope):
            response = JSONResponse({"error": "missing or wrong token (send Authorization: Bearer <token>, or open "
                                              "the URL the studio printed)"}, status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ok(self, scope: Scope) -> bool:
        assert self.token is not None
        request = Request(scope)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as one line."""

    @app.exception_handler(StudioError)
    async def studio_error(_: Request, e: StudioError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(PeftkitError)
    async def peftkit_error(_: Request, e: PeftkitError) -> JSONResponse:
        status = getattr(e, "status", 400)
        return JSONResponse({"error": str(e).splitlines()[0] if str(e) else type(e).__name__},
                            status_code=status if isinstance(status, int) else 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query")) or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)
