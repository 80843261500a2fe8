"""First Finish Search as a serving strategy: ``n`` samples of the prompt race (they share its
prefill) and the first that finishes on its own (``stop``) is the answer; without a natural finisher,
the first to end.

One streamed upstream request carries the ``n`` samples. By default (``stream_interval`` 0) a sample
sends two chunks: its first token and, when it ends, everything else (vLLM streams a request at most
every ``stream_interval`` tokens and always at its finish), so the front end parses about 2n chunks
per request and answers the moment the first finish arrives. A positive ``stream_interval`` streams
every that many tokens (progress the reply does not use: kept to measure the relay's cost,
``exitrl bench serve``).

The losers are ended twice over:
- **in the engine** (``ffs_mode: engine``, the default): the request's ``vllm_xargs`` carry a race id,
  and vLLM's ``FirstFinishRaceProcessor`` (``rollout.first_finish_race``) makes the other samples
  write their end-of-sequence token the step after the first finish, however busy the front end and
  vLLM's API server are;
- **from the front end**: closing the stream makes vLLM abort whatever still runs (the only way with
  ``ffs_mode: relay``; a stop string, found outside the engine, ends its race this way too).

Reasoning is always streamed upstream, so tokens are counted with ``include_reasoning: false``
too; the reply then leaves it out. ``usage``: the winner's tokens (``sequential_tokens``) and the
race's (``ffs_total_completion_tokens``): every sample that ended, at its length, and every sample
still running at the winner's length (the engine's cut adds one or two tokens each, an abort a few
more: ``exitrl bench serve`` measures them from vLLM's token counter). ``ffs_first_finish_s``: seconds
from sending the race to its winner's finish; ``ffs_aborted``: samples still running then.
"""

from __future__ import annotations

import json
import secrets
import time

from rl.serving.request_schema import RequestError
from rl.serving.upstream import send_once_more
from rollout.first_finish_race import XARG_RACE


def _sample_chunks(line: str) -> dict | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    try:
        return json.loads(line[6:])
    except json.JSONDecodeError:
        raise RequestError(502, f"the upstream sent a malformed stream chunk: {line[:200]!r}") from None


FINISH_ONLY_INTERVAL = 1 << 30  # larger than any completion: a sample streams its first token and its finish


def _reply(chat: bool, model_name: str, winner: dict, keep_reasoning: bool, usage: dict) -> dict:
    """The client's reply: the winner as choice 0, and ``usage``."""
    message = {"role": "assistant", "content": winner["text"]}
    if winner["reasoning"] and keep_reasoning:
        message["reasoning"] = winner["reasoning"]
    choice = (
        {"index": 0, "message": message, "finish_reason": winner["finish"]}
        if chat
        else {"index": 0, "text": winner["text"], "finish_reason": winner["finish"]}
    )
    return {
        "id": f"ffs-{secrets.token_hex(8)}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [choice],
        "usage": usage,
    }


def _usage(prompt_tokens: int, winner: dict, total: int, n: int, aborted: int, first_finish_s: float) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": winner["tokens"],
        "total_tokens": prompt_tokens + winner["tokens"],
        "sequential_tokens": winner["tokens"],
        "ffs_total_completion_tokens": total,
        "ffs_n": n,
        "ffs_aborted": aborted,
        "ffs_first_finish_s": round(first_finish_s, 4),
    }


async def first_finish(
    client,
    headers: dict,
    model_name: str,
    path: str,
    body: dict,
    n: int,
    stream_interval: int = 0,
    in_engine: bool = True,
) -> dict:
    """The first of ``n`` samples to finish (see the module); ``in_engine`` tags the race for vLLM's
    ``FirstFinishRaceProcessor``."""
    chat = path.endswith("chat/completions")
    keep_reasoning = body.get("include_reasoning", True)
    interval = stream_interval if stream_interval > 0 else FINISH_ONLY_INTERVAL
    body = {**body, "stream": True, "n": n, "return_token_ids": True, "stream_interval": interval}
    body.pop("stream_options", None)
    if in_engine:
        body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), XARG_RACE: secrets.token_hex(8)}
    if chat:
        body["include_reasoning"] = True
    samples = {i: {"text": "", "reasoning": "", "finish": None, "tokens": 0} for i in range(n)}
    prompt_tokens, winner, t0 = 0, None, time.perf_counter()
    r = await send_once_more(client, "POST", path, body, headers, stream=True)
    try:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")[:500]
            status = r.status_code if 400 <= r.status_code < 500 else 502
            raise RequestError(status, f"upstream refused the request ({r.status_code}): {text}")
        async for line in r.aiter_lines():
            chunk = _sample_chunks(line)
            if chunk is None:
                continue
            for c in chunk.get("choices") or []:
                s = samples.get(c.get("index"))
                if s is None:
                    raise RequestError(502, f"the upstream sent a sample index {c.get('index')!r} outside [0, {n})")
                ptoks = c.get("prompt_token_ids") or chunk.get("prompt_token_ids")
                if ptoks:
                    prompt_tokens = len(ptoks)
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
                break
        first_finish_s = time.perf_counter() - t0
    finally:
        await r.aclose()  # closing the stream early makes vLLM abort the other samples
    if winner is None:
        raise RequestError(502, "the upstream stream ended without a finished sample")
    aborted = sum(1 for s in samples.values() if s["finish"] is None)
    ended = sum(s["tokens"] for s in samples.values() if s["finish"] is not None)
    usage = _usage(prompt_tokens, winner, ended + aborted * winner["tokens"], n, aborted, first_finish_s)
    return _reply(chat, model_name, winner, keep_reasoning, usage)
