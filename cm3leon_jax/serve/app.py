"""`cm3leon serve`: load a model dir once, compile the sampler, then serve
the page (`/`) and the HTTP API (`/api/...`) with uvicorn."""
from __future__ import annotations

import os
import sys
import time

from cm3leon_jax.serve.model_server import ModelServer, ServeConfig


def make_app(server: ModelServer):
    """The FastAPI app: the API routes, then the gradio page mounted at /."""
    import gradio as gr
    from fastapi import FastAPI

    from cm3leon_jax.serve import http_api, page

    app = FastAPI(title="cm3leon serve", docs_url="/api/docs", openapi_url="/api/openapi.json")
    http_api.add_routes(app, server)
    return gr.mount_gradio_app(app, page.build(server), path="/")


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, warm_up: bool = True) -> int:
    # gradio asks the internet for analytics and its latest version unless told not to
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    def log(msg: str) -> None:
        print(f"[serve] {msg}", file=sys.stderr, flush=True)

    t = time.time()
    server = ModelServer(config, log=log)
    if warm_up:
        log(f"compiling the sampler (default settings, batches of up to {config.max_batch_rows} rows)...")
        log(f"compiled in {server.warm_up():.1f}s")
    app = make_app(server)
    log(f"ready in {time.time() - t:.1f}s: http://{host}:{port}/ (API: POST /api/generate, /api/describe; "
        f"docs /api/docs)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        server.close()
    return 0
