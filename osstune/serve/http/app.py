"""The ASGI application: routes, API-key check, errors as OpenAI error objects, the web page."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request),
# which are imported inside create_app to keep FastAPI an optional import.

import asyncio
import hmac
import json
from importlib import resources
from typing import Any

from osstune.serve.http.chat import ChatReply
from osstune.serve.http.completions import CompletionReply
from osstune.serve.http.context import ServerContext
from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.responses import ResponsesReply
from osstune.serve.types import RequestError

MAX_BODY_BYTES = 64 << 20  # a request larger than this is refused (413) before it is parsed


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"osstune serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'osstune[serve]'"
        ) from e


def create_app(ctx: ServerContext):
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    static = resources.files("osstune.serve") / "static"
    app = FastAPI(title="osstune", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if ctx.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {ctx.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {len(raw):,} bytes; at most {MAX_BODY_BYTES:,} are accepted")
        try:
            body = json.loads(raw, parse_constant=_not_json)
            # JSON may escape unpaired UTF-16 surrogates ("\ud800"), which are no text: the tokenizers refuse them.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise bad_request(f"the request body is not valid JSON{where}: {e}") from None
        except UnicodeEncodeError:
            raise bad_request("the request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): not text") from None
        return body

    def _not_json(constant: str) -> None:
        # Python's json reads NaN and Infinity; JSON (RFC 8259) has no such numbers.
        raise bad_request(f"the request body is not valid JSON: {constant} is not a JSON number")

    async def answer(request: Request, endpoint: str, make: Any):
        status = 500
        try:
            authorize(request)
            reply = make(ctx, await read_json(request))
            if reply.stream:
                status = 200
                return _Streaming(reply.events(), reply.close, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            else:
                try:
                    result = await _unless_disconnected(request, reply.complete())
                finally:
                    reply.close()  # also when the work was cancelled before it started
            status = 200
            return JSONResponse(result)
        except ApiError as e:
            status = e.status
            raise
        except RequestError as e:  # the engine's own check of what the endpoint did not refuse: the client's
            status = 400
            raise bad_request(str(e), e.field) from None
        finally:
            ctx.metrics.request_done(endpoint, status)

    class _Streaming(StreamingResponse):
        """Runs `cleanup` however the response ends: a client gone before the first chunk never
        starts the body iterator, whose own `finally` would then never run."""

        def __init__(self, content, cleanup, **kwargs) -> None:
            super().__init__(content, **kwargs)
            self.cleanup = cleanup

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                self.cleanup()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat", ChatReply)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completions", CompletionReply)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await answer(request, "responses", ResponsesReply)

    def model_card(model: str) -> dict:
        return {"id": model, "object": "model", "created": ctx.created, "owned_by": "osstune", "root": model,
                "parent": None if model == ctx.model_id else ctx.model_id}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(m) for m in ctx.model_ids]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        authorize(request)
        if model not in ctx.model_ids:
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists them", "model",
                           code="model_not_found")
        return model_card(model)

    @app.get("/health")
    async def health():
        error = getattr(ctx.engine, "error", None)
        if error is not None:  # the engine loop died: every request would fail
            return JSONResponse({"status": "error", "error": error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(ctx.metrics.render(ctx.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(str(static / "index.html"))

    return app


async def _unless_disconnected(request, work):
    """Await `work` unless the client goes away first; then cancel it (which aborts its engine
    requests, see `ChatReply.complete`)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Wait for the cancellation to run the work's cleanup (its engine requests aborted).
            await asyncio.wait({task})
    if task.cancelled():
        raise ApiError(499, "the client closed the connection")
    return task.result()
