"""What the ``exitrl serve`` front end knows and does per request, apart from its routes
(``rl.serving.app``): the model it fronts (``FrontEnd``), the body sent upstream, error bodies, JSON
parsing, cancelling upstream work when the client leaves, and its own metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.serving.request_schema import OURS, RequestError

if TYPE_CHECKING:
    from fastapi import Request


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
    ffs_mode: str = "engine"  # "engine": the race ends in vLLM; "relay": the front end watches a stream
    ffs_stream_interval: int = 0  # relay: 0 streams each sample's first token and its finish only
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
