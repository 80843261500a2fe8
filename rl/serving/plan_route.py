"""The one route ``exitrl serve`` adds to its loopback ``vllm serve`` for a routed model:
``POST /exitrl/plans {"tags": [...]}`` -> ``{"plans": [[...] | null, ...]}``, the layer plans the
engine decided for the requests whose ids carry those tags.

The front end's side (``decide_plan``, ``with_plan``, ``plan_usage``) lives here too.

The route is an ASGI middleware loaded by vLLM's own ``--middleware`` option, so it runs inside vLLM's API
server, next to its engine client, and asks the workers through ``collective_rpc`` (the method the
exitrl plugin adds, ``rollout.routing.vllm_plugin.PLANS_RPC``). The route checks the upstream's key
(``VLLM_API_KEY``, which vLLM itself checks only on ``/v1``); the front end never exposes it.
"""

from __future__ import annotations

import os
import secrets

from rl.serving.request_schema import RequestError

PLANS_PATH = "/exitrl/plans"
MAX_TAGS = 256


async def plans_route(request, call_next):
    from starlette.responses import JSONResponse

    if request.url.path != PLANS_PATH:
        return await call_next(request)
    key = os.environ.get("VLLM_API_KEY")
    if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        return JSONResponse({"error": "Unauthorized"}, status_code=401)
    if request.method != "POST":
        return JSONResponse({"error": f"{PLANS_PATH} takes POST"}, status_code=405)
    try:
        tags = (await request.json())["tags"]
    except Exception:
        return JSONResponse({"error": 'body must be {"tags": [str, ...]}'}, status_code=400)
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags) or len(tags) > MAX_TAGS:
        return JSONResponse({"error": f"tags must be a list of at most {MAX_TAGS} non-empty strings"}, status_code=400)
    from rollout.routing.vllm_plugin import PLANS_RPC

    results = await request.app.state.engine_client.collective_rpc(PLANS_RPC, args=(tags,))
    return JSONResponse({"plans": results[0]})


# ---------------------------------------------------------------------------------- the front end's side

DECIDE_DROP = ("stream", "stream_options", "n", "logprobs", "top_logprobs", "max_completion_tokens", "vllm_xargs")


async def decide_plan(post, fe, path: str, body: dict) -> list[int]:
    """A routed model's plan for ``body``'s prompt: a one-token greedy request the routers decide
    in its prefill (its own cache salt: no cached block hides part of the prompt, and its KV is
    never shared), then its plan read from the upstream's ``/exitrl/plans`` by the request's tag."""
    from rollout.routing.vllm_plugin import decide_salt

    tag = f"exitrl{secrets.token_hex(12)}"
    probe = {k: v for k, v in body.items() if k not in DECIDE_DROP}
    probe.update(max_tokens=1, temperature=0.0, request_id=tag, cache_salt=decide_salt(tag))
    r = await post(path, probe)
    if r.status_code != 200:
        raise RequestError(r.status_code if r.status_code < 500 else 502, f"upstream refused: {r.text[:500]}")
    r = await post(PLANS_PATH, {"tags": [tag]})
    try:
        plan = r.json()["plans"][0] if r.status_code == 200 else None
        plan = [int(a) for a in plan] if plan is not None else None
    except (ValueError, KeyError, IndexError, TypeError):
        plan = None
    if plan is None or len(plan) != fe.num_layers:
        raise RequestError(502, f"the routed model decided no plan for request {tag} ({r.status_code}: {r.text[:200]})")
    return plan


def with_plan(fe, body: dict, plan: list[int]) -> dict:
    """``body`` run under ``plan`` (``vllm_xargs``), its cache salted by the plan (and by the
    client's own salt, if any)."""
    from rollout.routing.vllm_plugin import PLAN_KEY, plan_salt

    salt = plan_salt(plan) + (f"-{body['cache_salt']}" if body.get("cache_salt") else "")
    return {**body, "vllm_xargs": {**(body.get("vllm_xargs") or {}), PLAN_KEY: plan}, "cache_salt": salt}


def plan_usage(plan: list[int]) -> dict:
    return {"layers_executed": sum(plan), "num_layers": len(plan), "layer_plan": list(plan)}
