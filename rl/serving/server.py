"""``exitrl serve``: the real ``vllm serve`` on a private Unix socket (``rl.serving.upstream``), and in
front of it a small OpenAI-compatible front end (FastAPI + httpx) that is the only way in:

- routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/metrics`` (vLLM's own
  metrics beside the front end's) and ``/health`` (open liveness: 503 once the engine is gone); an API
  key (``EXITRL_API_KEY``) on every route but ``/health``, required whenever the front end binds
  beyond loopback; POST bodies must be ``application/json``;
- an explicit allowlist of request fields, each validated (``rl.serving.request_schema``): anything
  else is a 400 naming the field, and only what the front end understands goes upstream;
- **First Finish Search** (``"ffs_n": n``, ``rl.serving.first_finish``), with ``usage`` reporting
  sequential and total tokens;
- **a thinking budget** (``"thinking_budget": N``): after N thinking tokens the model writes the exit
  prompt it was trained with and answers (``rollout.think_budget``, a vLLM logits processor);
- **routed models** (an export with routers): each request's plan is decided first by the routers
  inside vLLM (a one-token request with a cache salt of its own), read back through the upstream's
  ``/exitrl/plans`` (``rl.serving.plan_route``), then the request runs under that plan with the plan
  as its cache salt. ``usage`` reports ``layers_executed``, ``num_layers`` and ``layer_plan``;
  streamed responses carry the plan in ``x-exitrl-layer-plan``;
- lifecycle: a client that goes away aborts its upstream work (streamed or not, FFS included);
  upstream reads time out (504); upstream failures are 502/503 with a message.

``serve`` exits 0 when stopped by SIGTERM / SIGINT (a second one kills vLLM at once), 1 when vLLM
failed to start or died, and never leaves a vLLM process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the routes' (string) annotations here

from rl.serving.first_finish import first_finish
from rl.serving.plan_route import decide_plan, plan_usage, with_plan
from rl.serving.request_schema import OURS, RequestError, validate_request
from rl.serving.upstream import UpstreamError, VLLMServer, check_vllm_args, on_cpu, send_once_more

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_ROUTES = ("/health",)
ROUTES = {  # path -> its one method
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/metrics": "GET",
    "/health": "GET",
}
API_KEY_ENV = "EXITRL_API_KEY"
MAX_BODY_BYTES = 8 << 20


@dataclass
class ServeConfig:
    """How ``exitrl serve`` runs."""

    model_dir: str = field(metadata={"help": "an exitrl export (exitrl export RUN OUT)"})
    host: str = field(default="127.0.0.1", metadata={"help": "front-end bind address"})
    port: int = field(default=8000, metadata={"help": "front-end port (0: a free one)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name clients use"})
    max_model_len: int = field(default=2048, metadata={"help": "context length (prompt + completion)"})
    api_key: str | None = field(default=None, metadata={"help": f"required key (default: ${API_KEY_ENV})"})
    vllm_args: list[str] = field(default_factory=list, metadata={"help": "extra vllm serve (engine) arguments"})
    startup_timeout_s: float = field(default=600.0, metadata={"help": "wait this long for vLLM to come up"})
    request_timeout_s: float = field(
        default=600.0, metadata={"help": "longest wait for the upstream's next bytes (504 after it)"}
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def routed_layers(model_dir: str | Path) -> int | None:
    """The number of layers of a routed export (``architectures`` names the routed model), else None."""
    from rollout.routing.vllm_plugin import is_routed

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["num_hidden_layers"]) if is_routed(cfg.get("architectures")) else None


def vllm_serve_args(cfg: ServeConfig, meta: dict, name: str) -> list[str]:
    """``vllm serve``'s arguments for an export (the socket is the upstream's own)."""
    args = [
        "--model", str(cfg.model_dir), "--served-model-name", name, "--max-model-len", str(cfg.max_model_len),
        "--reasoning-parser", meta["reasoning_parser"],
        "--logits-processors", "rollout.think_budget:ThinkBudgetProcessor",
        "--generation-config", "auto", "--disable-fastapi-docs",
    ]  # fmt: skip
    if on_cpu():
        args += ["--enforce-eager", "--dtype", "float32" if meta.get("dtype") == "float32" else "bfloat16"]
    if routed_layers(cfg.model_dir) is not None:
        # plans change the control flow (eager); a deciding prefill must hold its whole prompt
        # (no chunking, a token budget of a full context); the plans route beside vLLM's
        args += ["--enforce-eager", "--no-enable-chunked-prefill"]
        args += ["--max-num-batched-tokens", str(cfg.max_model_len)]
        args += ["--middleware", "rl.serving.plan_route.plans_route"]
    return args + check_vllm_args(cfg.vllm_args)


# ---------------------------------------------------------------------------------- requests


@dataclass
class FrontEnd:
    """What the app needs to know about the model it fronts and the upstream it reaches."""

    transport: object  # an httpx async transport to the upstream (its Unix socket)
    upstream_key: str
    model_name: str
    max_model_len: int
    vocab_size: int
    force_ids: list[int]
    think_end_id: int
    think_open_id: int | None
    cpu: bool
    api_key: str | None = None
    num_layers: int | None = None  # a routed model's layers (None: a plain model, no plans)
    request_timeout_s: float = 600.0
    upstream_alive: Callable[[], bool] = lambda: True


def upstream_body(fe: FrontEnd, body: dict) -> dict:
    """The body sent to vLLM for a validated client body: the client's allowlisted fields, the
    served name, and the thinking budget as the logits processor's own arguments."""
    out = {k: v for k, v in body.items() if k not in OURS}
    out["model"] = fe.model_name
    budget = body.get("thinking_budget")
    if budget is not None:
        xargs = {"think_budget": budget, "force_ids": list(fe.force_ids), "think_end_id": fe.think_end_id}
        if fe.think_open_id is not None:
            xargs["think_open_id"] = fe.think_open_id
        out["vllm_xargs"] = xargs
    return out


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    """The JSON body, or a 400 (bad UTF-8, bad JSON, NaN / Infinity, nesting too deep to parse)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def until_disconnect(request: Request, work):
    """``await work``, cancelled (and its upstream connection closed, so vLLM aborts the request) the
    moment the client goes away (``ClientGone``)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


# ---------------------------------------------------------------------------------- the app


def _content_length(headers: dict) -> int:
    """The declared body size (0 when absent or not a number: the body read enforces the limit too)."""
    v = headers.get(b"content-length", b"")
    return int(v) if v.isdigit() else 0


class Guard:
    """ASGI middleware in front of every route: unknown paths 404, the key (401, compared as bytes:
    any header byte is a wrong key, never an error), the route's method (405), ``application/json``
    POSTs (415), body size (413 by Content-Length); counts responses by route and status."""

    def __init__(self, app, fe: FrontEnd, metrics):
        self.app, self.fe, self.metrics = app, fe, metrics
        self.want = f"Bearer {fe.api_key}".encode() if fe.api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        path, headers = scope["path"], dict(scope["headers"])
        refuse = None
        if path not in ROUTES:
            refuse = (404, f"no route {path}")
        elif self.want is not None and path not in OPEN_ROUTES:
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.want):
                refuse = (401, "missing or wrong API key")
        if refuse is None and scope["method"] != ROUTES[path]:
            refuse = (405, f"{path} takes {ROUTES[path]}")
        if refuse is None and scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                refuse = (415, "the request body must be application/json (Content-Type)")
            elif _content_length(headers) > MAX_BODY_BYTES:
                refuse = (413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        route = path if path in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        if refuse is not None:
            status, msg = refuse
            return await JSONResponse(error_body(status, msg), status_code=status)(scope, receive, counted)
        return await self.app(scope, receive, counted)


class FrontMetrics:
    """The front end's own Prometheus metrics (a private registry, with this process's RSS)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)
        self.responses = Counter("exitrl_responses", "responses by route and status", ["route", "status"], registry=reg)
        self.in_flight = Gauge("exitrl_requests_in_flight", "completions being served", registry=reg)
        self.disconnects = Counter("exitrl_client_disconnects", "requests aborted: the client left", registry=reg)
        self.ffs_aborted = Counter("exitrl_ffs_aborted_samples", "FFS samples aborted", registry=reg)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def build_app(fe: FrontEnd):
    """The FastAPI app of the front end (``ROUTES`` only, behind ``Guard``)."""
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    metrics = FrontMetrics()
    headers = {"Authorization": f"Bearer {fe.upstream_key}"}
    # idle connections expire before vLLM's uvicorn closes them (keep-alive 5 s): reusing one the
    # server is closing is a ReadError
    client = httpx.AsyncClient(
        transport=fe.transport,
        base_url="http://vllm",
        timeout=httpx.Timeout(connect=10, read=fe.request_timeout_s, write=60, pool=60),
        limits=httpx.Limits(max_connections=512, keepalive_expiry=2.0),
    )

    async def post(path: str, body: dict):
        return await send_once_more(client, "POST", path, body, headers)

    def fail(status: int, message: str, param: str | None = None):
        return JSONResponse(error_body(status, message, param), status_code=status)

    def upstream_failed(e: Exception):
        if isinstance(e, httpx.TimeoutException):
            return fail(504, f"the vLLM server did not answer within {fe.request_timeout_s:.0f} s")
        if not fe.upstream_alive():
            return fail(503, "the vLLM engine is not running")
        return fail(502, f"the vLLM server did not answer: {type(e).__name__}")

    def relayed(r):
        """An upstream answer as the client's: vLLM's 4xx as they are, its 5xx as a 502."""
        if r.status_code >= 500:
            return fail(502, f"the vLLM server failed ({r.status_code}): {r.text[:300]}")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(title="exitrl serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, fe=fe, metrics=metrics)

    @app.get("/health")
    async def health():
        if not fe.upstream_alive():
            return JSONResponse({"status": "unavailable", "reason": "the vLLM engine exited"}, status_code=503)
        try:
            r = await client.get("/health", timeout=5)
        except httpx.HTTPError as e:
            return JSONResponse({"status": "unavailable", "reason": type(e).__name__}, status_code=503)
        if r.status_code != 200:
            return JSONResponse({"status": "unavailable", "reason": f"engine health {r.status_code}"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        try:
            r = await client.get("/metrics", headers=headers, timeout=10)
            upstream, up = (r.text, 1) if r.status_code == 200 else ("", 0)
        except httpx.HTTPError:
            upstream, up = "", 0
        own = metrics.text() + f"# TYPE exitrl_upstream_up gauge\nexitrl_upstream_up {up}\n"
        return PlainTextResponse(upstream + own, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        try:
            r = await client.get("/v1/models", headers=headers)
        except httpx.HTTPError as e:
            return upstream_failed(e)
        if r.status_code != 200:
            return relayed(r)
        cards = r.json().get("data") or []
        for c in cards:  # vLLM's card names the model folder as `root`: the served name instead
            c["root"] = c.get("id")
            c.pop("parent", None)
            c.pop("permission", None)
        return {"object": "list", "data": cards}

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def answer(request: Request, path: str, body: dict):
        up = upstream_body(fe, body)
        plan = None
        if fe.num_layers is not None:
            plan = await decide_plan(post, fe, path, up)
            up = with_plan(fe, up, plan)
        if body.get("ffs_n"):
            out = await until_disconnect(request, first_finish(client, headers, fe.model_name, path, up, body["ffs_n"]))
            metrics.ffs_aborted.inc(out["usage"]["ffs_aborted"])
            if plan is not None:
                out["usage"].update(plan_usage(plan))
            return JSONResponse(out)
        if up.get("stream"):
            return await stream(path, up, plan)
        r = await until_disconnect(request, post(path, up))
        if plan is not None and r.status_code == 200:
            out = r.json()
            out.setdefault("usage", {}).update(plan_usage(plan))
            return JSONResponse(out)
        return relayed(r)

    async def stream(path: str, up: dict, plan):
        r = await send_once_more(client, "POST", path, up, headers, stream=True)
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            return relayed(r)

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

    async def complete(request: Request, path: str):
        metrics.in_flight.inc()
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
            return await answer(request, path, body)
        except RequestError as e:
            return fail(e.status, e.message, e.param)
        except ClientGone:
            metrics.disconnects.inc()
            return fail(499, "the client closed the request")
        except httpx.HTTPError as e:
            return upstream_failed(e)
        finally:
            metrics.in_flight.dec()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "/v1/completions")

    return app


# ---------------------------------------------------------------------------------- running it


def front_end_for(cfg: ServeConfig, meta: dict, upstream: VLLMServer, name: str) -> FrontEnd:
    from transformers import AutoTokenizer

    from rollout.serial_group import encode_in_context
    from rollout.thinking import think_tag_ids

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    open_id, close_id = think_tag_ids(tok)
    return FrontEnd(
        transport=upstream.transport(),
        upstream_key=upstream.key,
        model_name=name,
        max_model_len=cfg.max_model_len,
        vocab_size=len(tok),
        force_ids=encode_in_context(tok, meta["exit_prompt"]),
        think_end_id=close_id,
        think_open_id=open_id,
        cpu=on_cpu(),
        api_key=cfg.api_key,
        num_layers=routed_layers(cfg.model_dir),
        request_timeout_s=cfg.request_timeout_s,
        upstream_alive=upstream.alive,
    )


def resolve_api_key(cfg: ServeConfig) -> str | None:
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and cfg.host not in LOOPBACK:
        raise ValueError(f"binding {cfg.host} beyond loopback needs an API key: set {API_KEY_ENV}")
    return key


class Served:
    """A running ``exitrl serve`` (vLLM + front end) in this process: ``url``, ``upstream``; ``stop()``.
    ``stop_event`` set while vLLM starts stops the start (``UpstreamError``), vLLM with it; ``hurry``
    set skips vLLM's grace period when stopping."""

    def __init__(
        self, cfg: ServeConfig, stop_event: threading.Event | None = None, hurry: threading.Event | None = None
    ):
        import uvicorn

        from rl.serving.export import load_metadata

        meta = load_metadata(cfg.model_dir)
        self.model_dir = cfg.model_dir
        cfg = dataclasses.replace(cfg, api_key=resolve_api_key(cfg))  # the caller's config stays as given
        name = cfg.served_model_name or Path(cfg.model_dir).resolve().name
        args = vllm_serve_args(cfg, meta, name)  # bad --vllm-args fail before anything starts
        self.stop_event = stop_event or threading.Event()
        self.hurry = hurry or threading.Event()
        self.upstream = VLLMServer(args)
        try:
            self.upstream.wait_ready(cfg.startup_timeout_s, cancelled=self.stop_event.is_set)
            self.front = front_end_for(cfg, meta, self.upstream, name)
            port = cfg.port or free_port()
            self.url = f"http://{cfg.host}:{port}"
            self.server = uvicorn.Server(
                uvicorn.Config(build_app(self.front), host=cfg.host, port=port, log_level="warning")
            )
            self.thread = threading.Thread(target=self.server.run, daemon=True)
            self.thread.start()
            t0 = time.time()
            while not self.server.started:
                if time.time() - t0 > 30 or not self.thread.is_alive():
                    raise UpstreamError(f"the front end did not start on {cfg.host}:{port}")
                time.sleep(0.1)
        except BaseException:
            self.upstream.stop(hurry=self.hurry.is_set)
            raise

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.upstream.stop(hurry=self.hurry.is_set)


def serve(cfg: ServeConfig) -> int:
    """Run until SIGTERM / SIGINT (exit 0), or until vLLM dies (exit 1); vLLM is stopped by its own
    pid on every way out, at once on a second signal."""
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        served = Served(cfg, stop_event=stop, hurry=hurry)
    except UpstreamError as e:
        print(f"exitrl serve: {e}", file=sys.stderr, flush=True)
        return 0 if stop.is_set() else 1
    print(f"exitrl serve: {served.url} (model {served.front.model_name!r}; vLLM pid {served.upstream.pid})", flush=True)
    code = 0
    while not stop.wait(0.5):
        if not served.upstream.alive():
            print(f"exitrl serve: vLLM exited with code {served.upstream.proc.returncode}", file=sys.stderr, flush=True)
            code = 1
            break
        if not served.thread.is_alive():
            print("exitrl serve: the front end stopped", file=sys.stderr, flush=True)
            code = 1
            break
    served.stop()
    return code
