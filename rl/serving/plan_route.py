"""The one route ``exitrl serve`` adds to its loopback ``vllm serve`` for a routed model:
``POST /exitrl/plans {"tags": [...]}`` -> ``{"plans": [[...] | null, ...]}``, the layer plans the
engine decided for the requests whose ids carry those tags.

It is an ASGI middleware loaded by vLLM's own ``--middleware`` option, so it runs inside vLLM's API
server, next to its engine client, and asks the workers through ``collective_rpc`` (the method the
exitrl plugin adds, ``rollout.routing.vllm_plugin.PLANS_RPC``). The route checks the upstream's key
(``VLLM_API_KEY``, which vLLM itself checks only on ``/v1``); the front end never exposes it.
"""

from __future__ import annotations

import os
import secrets

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
