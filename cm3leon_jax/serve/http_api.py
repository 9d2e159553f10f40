"""The HTTP API: `POST /api/generate` (text -> image), `POST /api/describe`
(image -> text), `POST /api/edit` (fine-tuned models) and `GET /api/info`.

JSON in, JSON out. A bad request is HTTP 400 (unreadable body or image), 413
(over a size limit) or 422 (a field out of range), with {"error": message};
a full queue is HTTP 503. No request can take the server down: whatever
fails inside is HTTP 500 with its message, and the next request is served.
"""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse
from starlette.requests import Request

from cm3leon_jax.serve import requests as req_lib
from cm3leon_jax.serve.batcher import QueueFull

MAX_BODY_BYTES = req_lib.MAX_UPLOAD_BYTES * 4 // 3 + (64 << 10)  # a base64 upload and its fields


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> dict:
    """The JSON body; an oversized one is read to its end without keeping it
    (so the client, still sending, receives the 413 rather than a broken pipe)."""
    raw, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            raw += chunk
    if size > MAX_BODY_BYTES:
        raise req_lib.RequestError(f"the request body has {size:,} bytes; the limit is {MAX_BODY_BYTES:,}", 413)
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise req_lib.RequestError(f"the request body is not valid JSON: {e}", 400) from None


def add_routes(app, server) -> None:
    """Adds the API's routes to a FastAPI app serving `server` (a ModelServer)."""

    async def answer(request: Request, work):
        try:
            body = await _body(request)
            return await work(body)
        except req_lib.RequestError as e:
            return _error(e.status, str(e))
        except QueueFull as e:
            return _error(503, str(e))
        except Exception as e:  # noqa: BLE001 - one failed request never stops the server
            server.log(f"error: {request.url.path}: {type(e).__name__}: {e}")
            return _error(500, f"{type(e).__name__}: {e}")

    @app.post("/api/generate")
    async def generate(request: Request):
        async def work(body):
            r = req_lib.generate_request(body, server.max_retrieved)
            server.check_prompt(r)
            loop = asyncio.get_running_loop()
            t = loop.time()
            imgs, _, retrieved = await asyncio.wrap_future(server.submit_generate(r))
            return await loop.run_in_executor(None, server.generate_response, r, imgs, retrieved, loop.time() - t)
        return await answer(request, work)

    def one_at_a_time(parse, run):
        """A route that checks its body with `parse(body, resolution)` and
        runs `run(request)` on a worker thread (image -> text, editing)."""
        async def route(request: Request):
            async def work(body):
                r = parse(body, server.g.vq.resolution)
                return await asyncio.get_running_loop().run_in_executor(None, run, r)
            return await answer(request, work)
        return route

    app.post("/api/describe")(one_at_a_time(req_lib.describe_request, server.describe))
    app.post("/api/edit")(one_at_a_time(req_lib.edit_request, server.edit))

    @app.get("/api/info")
    async def info():
        return server.info()

