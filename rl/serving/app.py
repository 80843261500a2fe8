"""The FastAPI app of the ``exitrl serve`` front end (``build_app``): ``ROUTES`` only, behind
``Guard``; ``Routes`` holds one handler per route over one upstream client."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import httpx
from fastapi import Request  # module level: FastAPI resolves the routes' (string) annotations here

from rl.serving.first_finish import first_finish
from rl.serving.front_end import (
    ClientGone,
    FrontEnd,
    FrontMetrics,
    error_body,
    parse_json,
    until_disconnect,
    upstream_body,
)
from rl.serving.guard import MAX_BODY_BYTES, Guard
from rl.serving.plan_route import decide_plan, plan_usage, with_plan
from rl.serving.request_schema import RequestError, validate_request
from rl.serving.upstream import send_once_more


def fail(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, param), status_code=status)


async def read_body(request: Request) -> bytes:
    """The request body, a 413 as soon as it grows past ``MAX_BODY_BYTES``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Routes:
    """The front end's route handlers (``health``, ``prometheus``, ``models``, ``chat``,
    ``completions``) over one client of the upstream."""

    def __init__(self, fe: FrontEnd, metrics: FrontMetrics):
        self.fe, self.metrics = fe, metrics
        self.headers = {"Authorization": f"Bearer {fe.upstream_key}"}
        # idle connections expire before vLLM's uvicorn closes them (keep-alive 5 s): reusing one the
        # server is closing is a ReadError
        self.client = httpx.AsyncClient(
            transport=fe.transport,
            base_url="http://vllm",
            timeout=httpx.Timeout(connect=10, read=fe.request_timeout_s, write=60, pool=60),
            limits=httpx.Limits(max_connections=512, keepalive_expiry=2.0),
        )

    async def post(self, path: str, body: dict):
        return await send_once_more(self.client, "POST", path, body, self.headers)

    def upstream_failed(self, e: Exception):
        if isinstance(e, httpx.TimeoutException):
            return fail(504, f"the vLLM server did not answer within {self.fe.request_timeout_s:.0f} s")
        if not self.fe.upstream_alive():
            return fail(503, "the vLLM engine is not running")
        return fail(502, f"the vLLM server did not answer: {type(e).__name__}")

    @staticmethod
    def relayed(r):
        """An upstream answer as the client's: vLLM's 4xx as they are, its 5xx as a 502."""
        from fastapi.responses import Response

        if r.status_code >= 500:
            return fail(502, f"the vLLM server failed ({r.status_code}): {r.text[:300]}")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    # ------------------------------------------------------------------------------ the routes
    # (no return annotations: FastAPI would read them as response models)

    async def health(self):
        from fastapi.responses import JSONResponse

        if not self.fe.upstream_alive():
            return JSONResponse({"status": "unavailable", "reason": "the vLLM engine exited"}, status_code=503)
        try:
            r = await self.client.get("/health", timeout=5)
        except httpx.HTTPError as e:
            return JSONResponse({"status": "unavailable", "reason": type(e).__name__}, status_code=503)
        if r.status_code != 200:
            return JSONResponse({"status": "unavailable", "reason": f"engine health {r.status_code}"}, 503)
        return {"status": "ok"}

    async def prometheus(self):
        from fastapi.responses import PlainTextResponse

        try:
            r = await self.client.get("/metrics", headers=self.headers, timeout=10)
            upstream, up = (r.text, 1) if r.status_code == 200 else ("", 0)
        except httpx.HTTPError:
            upstream, up = "", 0
        own = self.metrics.text() + f"# TYPE exitrl_upstream_up gauge\nexitrl_upstream_up {up}\n"
        return PlainTextResponse(upstream + own, media_type="text/plain; version=0.0.4")

    async def models(self):
        try:
            r = await self.client.get("/v1/models", headers=self.headers)
        except httpx.HTTPError as e:
            return self.upstream_failed(e)
        if r.status_code != 200:
            return self.relayed(r)
        cards = r.json().get("data") or []
        for c in cards:  # vLLM's card names the model folder as `root`: the served name instead
            c["root"] = c.get("id")
            c.pop("parent", None)
            c.pop("permission", None)
        return {"object": "list", "data": cards}

    async def chat(self, request: Request):
        return await self.complete(request, "/v1/chat/completions")

    async def completions(self, request: Request):
        return await self.complete(request, "/v1/completions")

    # ------------------------------------------------------------------------------ completions

    async def complete(self, request: Request, path: str):
        """A completion request: read, parsed, validated, answered; every failure an error body."""
        fe = self.fe
        self.metrics.in_flight.inc()
        try:
            body = parse_json(await read_body(request))
            body = validate_request(
                path,
                body,
                model_name=fe.model_name,
                max_model_len=fe.max_model_len,
                vocab_size=fe.vocab_size,
                cpu=fe.cpu,
                routed=fe.num_layers is not None,
            )
            return await self.answer(request, path, body)
        except RequestError as e:
            return fail(e.status, e.message, e.param)
        except ClientGone:
            self.metrics.disconnects.inc()
            return fail(499, "the client closed the request")
        except httpx.HTTPError as e:
            return self.upstream_failed(e)
        finally:
            self.metrics.in_flight.dec()

    async def answer(self, request: Request, path: str, body: dict):
        """A validated body answered: under its plan (a routed model), by FFS, streamed or in one piece."""
        from fastapi.responses import JSONResponse

        up = upstream_body(self.fe, body)
        plan = None
        if self.fe.num_layers is not None:
            plan = await decide_plan(self.post, self.fe, path, up)
            up = with_plan(self.fe, up, plan)
        if body.get("ffs_n"):
            fe = self.fe
            work = first_finish(
                self.client, self.headers, fe.model_name, path, up, body["ffs_n"], fe.ffs_stream_interval,
                in_engine=fe.ffs_mode == "engine",
            )  # fmt: skip
            out = await until_disconnect(request, work)
            self.metrics.ffs_aborted.inc(out["usage"]["ffs_aborted"])
            if plan is not None:
                out["usage"].update(plan_usage(plan))
            return JSONResponse(out)
        if up.get("stream"):
            return await self.stream(path, up, plan)
        r = await until_disconnect(request, self.post(path, up))
        if plan is not None and r.status_code == 200:
            out = r.json()
            out.setdefault("usage", {}).update(plan_usage(plan))
            return JSONResponse(out)
        return self.relayed(r)

    async def stream(self, path: str, up: dict, plan):
        from fastapi.responses import StreamingResponse

        r = await send_once_more(self.client, "POST", path, up, self.headers, stream=True)
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            return self.relayed(r)

        async def relay():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:  # the upstream went away mid-stream: say so, then end
                err = error_body(502, f"the vLLM server stopped streaming: {type(e).__name__}")
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
            finally:
                await r.aclose()  # a client that leaves closes the upstream stream: vLLM aborts it

        extra = {"x-exitrl-layer-plan": ",".join(map(str, plan))} if plan is not None else None
        return StreamingResponse(relay(), media_type="text/event-stream", headers=extra)


def build_app(fe: FrontEnd):
    """The FastAPI app of the front end (``ROUTES`` only, behind ``Guard``)."""
    from fastapi import FastAPI

    metrics = FrontMetrics()
    routes = Routes(fe, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await routes.client.aclose()

    app = FastAPI(title="exitrl serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, fe=fe, metrics=metrics)
    app.get("/health")(routes.health)
    app.get("/metrics")(routes.prometheus)
    app.get("/v1/models")(routes.models)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)
    return app
