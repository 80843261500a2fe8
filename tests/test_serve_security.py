"""``exitrl serve`` as something you can expose: what is reachable from where, the request allowlist,
4xx (never 5xx, never a dead engine) for bad input, disconnects that abort upstream work, a schema
fuzz and a mixed load. The server tests share one real server (``served`` in conftest); the unit
tests need none."""

from __future__ import annotations

import os
import re
import stat
import time
from types import SimpleNamespace

import httpx
import pytest

from rl.serving.request_schema import RequestError, validate_request
from rl.serving.server import parse_json
from rl.serving.upstream import check_vllm_args
from rollout.think_budget import check_args
from tests.conftest import SERVE_KEY

AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}
PROBLEM = "Start at 3. Apply in order: 1: +5 2: *2. Work modulo 10."
MSGS = [{"role": "user", "content": PROBLEM}]
KILLER = {"think_budget": 0, "force_ids": [1000000000], "think_end_id": 1}
LIMITS = dict(model_name="tiny", max_model_len=1024, vocab_size=200, cpu=True)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


# ---------------------------------------------------------------------------------- no server


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        (CHAT, {"messages": MSGS, "vllm_xargs": KILLER}, 400, "vllm_xargs"),
        (CHAT, {"messages": MSGS, "vllm_xargs": "x", "thinking_budget": 3}, 400, "vllm_xargs"),
        (CHAT, {"messages": MSGS, "request_id": "mine"}, 400, "request_id"),
        (CHAT, {"messages": MSGS, "chat_template": "{{ 7*7 }}"}, 400, "chat_template"),
        (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        (CHAT, {"messages": MSGS, "temperature": "1"}, 400, "temperature"),
        (CHAT, {"messages": MSGS, "temperature": 7.0}, 400, "temperature"),
        (CHAT, {"messages": MSGS, "max_tokens": True}, 400, "max_tokens"),
        (CHAT, {"messages": MSGS, "max_tokens": 5000}, 400, "max_tokens"),
        (CHAT, {"messages": MSGS, "top_logprobs": 21}, 400, "top_logprobs"),
        (CHAT, {"messages": MSGS, "logit_bias": {"999": 1.0}}, 400, "logit_bias"),
        (CHAT, {"messages": MSGS, "logit_bias": {"a": 1.0}}, 400, "logit_bias"),
        (CHAT, {"messages": MSGS, "stop_token_ids": [-1]}, 400, "stop_token_ids.0"),
        (CHAT, {"messages": MSGS, "seed": 3}, 400, "seed"),
        (CHAT, {"messages": MSGS, "ffs_n": 4, "logprobs": True}, 400, "logprobs"),
        (CHAT, {"messages": MSGS, "ffs_n": 4, "stream": True}, 400, "ffs_n"),
        (CHAT, {"messages": MSGS, "ffs_n": 17}, 400, "ffs_n"),
        (CHAT, {"messages": MSGS, "thinking_budget": -1}, 400, "thinking_budget"),
        (CHAT, {"model": "other", "messages": MSGS}, 404, "model"),
        (CHAT, {}, 400, "messages"),
        (COMPLETIONS, {"prompt": ["a", "b"], "ffs_n": 2}, 400, "prompt"),
        (COMPLETIONS, {"prompt": [5, 300]}, 400, "prompt"),
        (COMPLETIONS, {"prompt": ""}, 400, "prompt"),  # vLLM would refuse it too, after the admission
        (COMPLETIONS, {"prompt": ["a", ""]}, 400, "prompt"),
        (COMPLETIONS, {"prompt": [[5], [1, 200]]}, 400, "prompt"),
        (COMPLETIONS, {"prompt": 3}, 400, "prompt"),
        (COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
        (COMPLETIONS, [1, 2], 400, None),
    ],
)
def test_the_allowlist_refuses_with_the_field_named(path, body, status, param):
    with pytest.raises(RequestError) as e:
        validate_request(path, body, **LIMITS)
    assert (e.value.status, e.value.param) == (status, param)
    if param is not None:
        assert param.split(".")[0] in e.value.message


def test_the_allowlist_passes_what_clients_send_and_null_means_the_default():
    body = {
        "messages": MSGS, "n": None, "ffs_n": 4, "temperature": 1, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "min_tokens": 2, "ignore_eos": False, "repetition_penalty": 1.1, "include_reasoning": False,
        "stream_options": None, "stop": ["\n\n"], "logit_bias": {"7": -100}, "user": "u", "max_tokens": 64,
    }  # fmt: skip
    out = validate_request(CHAT, body, **LIMITS)
    assert "n" not in out and "stream_options" not in out and out["ffs_n"] == 4 and out["top_k"] == 20
    out = validate_request(COMPLETIONS, {"prompt": [[1, 2], [3]], "logprobs": 2, "echo": True}, **LIMITS)
    assert out["prompt"] == [[1, 2], [3]]


@pytest.mark.parametrize(
    "raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000]
)
def test_non_json_bodies_are_client_errors(raw):
    with pytest.raises(RequestError) as e:
        parse_json(raw)
    assert e.value.status == 400


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0"], ["--port=9000"], ["--uds", "/tmp/x"], ["--api-key", "k"], ["--api_key", "k"],
        ["--ho", "0.0.0.0"], ["--middleware", "evil:m"], ["--root-path", "/x"], ["--grpc-port", "1"],
        ["--config", "c.yaml"], ["--allowed-origins", "*"], ["--logits-processors", "evil:P"],
    ],
)  # fmt: skip
def test_vllm_args_cannot_move_or_open_the_upstream(args):
    with pytest.raises(ValueError, match="exitrl serve sets"):
        check_vllm_args(["--max-num-seqs", "8", *args])


def test_vllm_engine_args_pass():
    ok = ["--max-num-seqs", "8", "--block-size", "32", "--enable-prefix-caching", "--model-impl", "vllm"]
    assert check_vllm_args(ok) == ok


def test_the_budget_processor_drops_bad_arguments_instead_of_raising_in_the_engine():
    from rollout.think_budget import ThinkBudgetProcessor

    assert check_args(KILLER) is None  # admission cannot know the vocabulary ...
    assert "vocabulary" in check_args(KILLER, vocab_size=200)  # ... the engine can
    assert "think_budget" in check_args({"think_budget": True, "force_ids": [1], "think_end_id": 1})
    assert "force_ids" in check_args({"think_budget": 1, "force_ids": [], "think_end_id": 1})
    with pytest.raises(ValueError, match="force_ids"):
        ThinkBudgetProcessor.validate_params(SimpleNamespace(extra_args={**KILLER, "force_ids": "x"}))
    cfg = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: 200))
    proc = ThinkBudgetProcessor(cfg, device="cpu", is_pin_memory=False)
    assert proc._new_state(SimpleNamespace(extra_args=KILLER), None, []) is None
    good = {"think_budget": 0, "force_ids": [7, 8], "think_end_id": 9}
    state = proc._new_state(SimpleNamespace(extra_args=good), None, [])
    assert state[1:4] == (0, [7, 8], 9)


# ---------------------------------------------------------------------------------- the real server


def _post(served, path, body=None, *, content=None, headers=None, **kw):
    h = {**AUTH, **(headers or {})}
    if content is None:
        return httpx.post(served.url + path, json=body, headers=h, timeout=120, **kw)
    return httpx.post(served.url + path, content=content, headers=h, timeout=120, **kw)


def _metric(served, name: str) -> float:
    """A metric from the front end's /metrics, summed over its label sets."""
    text = httpx.get(served.url + "/metrics", headers=AUTH, timeout=30).text
    values = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)", text, re.M)
    assert values, f"{name} not in /metrics"
    return sum(float(v) for v in values)


def _alive(served) -> bool:
    return httpx.get(served.url + "/health", timeout=30).status_code == 200


def _speaks_http(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.3) as c:
        c.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        try:
            return c.recv(5) == b"HTTP/"
        except TimeoutError:
            return False


def test_the_upstream_listens_on_a_private_socket_and_no_port(served):
    """vLLM's API server has no TCP listener, only its socket in a 0700 folder; what else its engine
    processes listen on (torch.distributed's store, gloo) does not speak HTTP; vLLM's routes outside
    /v1 are not exposed by the front end."""
    import psutil

    st = os.stat(served.upstream.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert stat.S_ISSOCK(os.stat(served.upstream.socket).st_mode)
    api = psutil.Process(served.upstream.pid)
    assert [c for c in api.net_connections("inet") if c.status == psutil.CONN_LISTEN] == []
    engine = api.children(recursive=True)
    ports = {c.laddr.port for p in engine for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert not any(_speaks_http(port) for port in ports)
    for path in ("/invocations", "/tokenize", "/detokenize", "/version", "/load", "/scale_elastic_ep", "/docs"):
        r = httpx.post(served.url + path, headers=AUTH, json={"prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_every_route_but_health_needs_the_key(served):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT), ("POST", COMPLETIONS)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": b"Bearer \xff\xfe"}):
            r = httpx.request(method, served.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


def test_models_and_metrics_show_the_engine_not_the_machine(served):
    text = httpx.get(served.url + "/v1/models", headers=AUTH).text
    assert '"id":"tiny"' in text and str(served.model_dir) not in text and os.sep + "tmp" not in text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "process_resident_memory_bytes"):
        assert _metric(served, name) >= 0
    before = _metric(served, "exitrl_responses_total")
    httpx.get(served.url + "/v1/models", headers=AUTH)
    assert _metric(served, "exitrl_responses_total") >= before + 1


def test_the_request_that_killed_the_engine_is_refused_and_the_engine_lives(served):
    r = _post(served, CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 4, "vllm_xargs": KILLER})
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs"
    # the same arguments straight at the engine (as a local process with the upstream key would send
    # them): the processor drops them instead of raising; the engine answers and lives
    import httpx as h

    with h.Client(transport=h.HTTPTransport(uds=served.upstream.socket), timeout=120) as c:
        body = {"model": "tiny", "messages": MSGS, "max_tokens": 4, "temperature": 0, "vllm_xargs": KILLER}
        raw = c.post("http://vllm" + CHAT, json=body, headers={"Authorization": f"Bearer {served.upstream.key}"})
    assert raw.status_code == 200 and raw.json()["usage"]["completion_tokens"] == 4
    assert _alive(served)


@pytest.mark.parametrize(
    "kind, path, content, ctype, status, param",
    [
        ("nan", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, 400, None),
        ("infinity", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', None, 400, None),
        ("xargs not an object", CHAT, b'{"messages": [], "vllm_xargs": 3, "thinking_budget": 2}', None, 400, None),
        ("ffs batch", COMPLETIONS, b'{"prompt": ["a", "b"], "ffs_n": 2}', None, 400, "prompt"),
        ("text/plain", CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', "text/plain", 415, None),
        ("no type", CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', "", 415, None),
        ("form", COMPLETIONS, b"prompt=x", "application/x-www-form-urlencoded", 415, None),
        ("not json", COMPLETIONS, b"{prompt", None, 400, None),
        ("array", COMPLETIONS, b"[1]", None, 400, None),
        ("token beyond vocab", COMPLETIONS, b'{"prompt": [1, 99999999]}', None, 400, "prompt"),
    ],
)
def test_bad_bodies_get_openai_style_4xx(served, kind, path, content, ctype, status, param):
    r = _post(
        served, path, content=content, headers={"Content-Type": ctype if ctype is not None else "application/json"}
    )
    err = r.json()["error"]
    assert r.status_code == status and err["code"] == status and err["message"], kind
    if param is not None:
        assert err["param"] == param


def test_ffs_with_n_null_and_without_reasoning_counts_its_tokens(served):
    body = {"messages": MSGS, "max_tokens": 40, "temperature": 1.0, "ffs_n": 3, "n": None, "include_reasoning": False}
    r = _post(served, CHAT, body)
    assert r.status_code == 200, r.text
    out = r.json()
    u, msg = out["usage"], out["choices"][0]["message"]
    assert (
        u["completion_tokens"] == u["sequential_tokens"] > 0
        and u["ffs_total_completion_tokens"] >= u["completion_tokens"]
    )
    assert "reasoning" not in msg


def _settled(served, within_s=10.0) -> bool:
    """Until vLLM runs no request (True), or ``within_s`` passed (False)."""
    t0 = time.time()
    while time.time() - t0 < within_s:
        if _metric(served, "vllm:num_requests_running") == 0:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["plain", "ffs", "stream"])
def test_a_client_that_leaves_aborts_its_upstream_work(served, mode):
    """16 samples of 1000 tokens (about 15 s of work here, 16,000 tokens); the client leaves after its
    first bytes (streamed) or 0.7 s (not streamed): vLLM stops with it, far short of 16,000 tokens."""
    body = {"prompt": PROBLEM, "max_tokens": 1000, "ignore_eos": True, "temperature": 1.0}
    body |= {"ffs_n": 16} if mode == "ffs" else {"n": 16, "stream": True} if mode == "stream" else {"n": 16}
    assert _settled(served)
    tokens, gone = _metric(served, "vllm:generation_tokens_total"), _metric(served, "exitrl_client_disconnects_total")
    if mode == "stream":
        with httpx.stream("POST", served.url + COMPLETIONS, json=body, headers=AUTH, timeout=30) as r:
            next(r.iter_lines())
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + COMPLETIONS, json=body, headers=AUTH, timeout=httpx.Timeout(30, read=0.7))
    assert _settled(served)
    assert _metric(served, "vllm:generation_tokens_total") - tokens < 16_000 / 2
    if mode != "stream":
        assert _metric(served, "exitrl_client_disconnects_total") == gone + 1
    assert _alive(served)


def test_schema_fuzz_never_gets_a_5xx(served):
    """Bodies built from the allowlisted field names (and some that are not) with values of any JSON
    type; small completions where a body is valid. No 5xx; the server alive after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from rl.serving.request_schema import ChatRequest, CompletionRequest

    names = sorted(set(ChatRequest.model_fields) | set(CompletionRequest.model_fields) | {"vllm_xargs", "best_of"})
    scalar = (
        st.none()
        | st.booleans()
        | st.integers(-(2**40), 2**40)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8)
    )
    value = st.recursive(
        scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3)
    )
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": value})
    seen = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        path=st.sampled_from([CHAT, COMPLETIONS]),
        fields=st.dictionaries(st.sampled_from(names), value, max_size=5),
        messages=st.lists(message, min_size=0, max_size=2),
        prompt=st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 300), max_size=4)),
    )
    def probe(path, fields, messages, prompt):
        body = {**fields, "model": "tiny"}
        body.setdefault("messages" if path == CHAT else "prompt", messages if path == CHAT else prompt)
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and not isinstance(body[k], bool) and body[k] > 4:
                body[k] = 4  # valid bodies stay cheap
        body.setdefault("max_tokens", 4)
        r = _post(served, path, body)
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)

    probe()
    assert len(seen) == 60 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
    assert _alive(served)


def test_mixed_load_at_concurrency_32_has_no_errors(served):
    """vLLM's own load tool (plain, streamed) and FFS@4 requests at once, 32 in flight of each."""
    from rl.bench.serve import mixed_load

    report = mixed_load(
        served.url, "tiny", str(served.model_dir), SERVE_KEY, n_requests=48, concurrency=32, max_tokens=16
    )
    assert report["errors"] == 0, report
    assert report["plain"]["completed"] == 48 and report["ffs@4"]["completed"] == 48
    assert report["front_rss_mb_after"] > 0 and _alive(served)


# ---------------------------------------------------------------------------------- a broken upstream


def _front(handler, alive: bool = True, num_layers: int | None = None, ffs_mode: str = "engine"):
    """The front end over a mock upstream (``handler`` answers what vLLM would, or fails)."""
    from starlette.testclient import TestClient

    from rl.serving.server import FrontEnd, build_app

    fe = FrontEnd(
        transport=httpx.MockTransport(handler),
        upstream_key="u",
        model_name="tiny",
        max_model_len=1024,
        vocab_size=200,
        force_ids=[1],
        think_end_id=2,
        think_open_id=None,
        cpu=True,
        num_layers=num_layers,
        upstream_alive=lambda: alive,
        ffs_mode=ffs_mode,
    )
    return TestClient(build_app(fe))


def _down(request):
    raise httpx.ConnectError("no socket", request=request)


def _sse(*chunks) -> bytes:
    return b"".join(b"data: " + c.encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "handler, alive, body, status",
    [
        (_down, False, {"prompt": "x"}, 503),
        (_down, False, {"prompt": "x", "stream": True}, 503),
        (_down, False, {"prompt": "x", "ffs_n": 2}, 503),
        (_down, True, {"prompt": "x"}, 502),
        (lambda r: httpx.Response(500, text="boom"), True, {"prompt": "x"}, 502),
        (lambda r: httpx.Response(500, text="boom"), True, {"prompt": "x", "stream": True}, 502),
        (lambda r: httpx.Response(500, text="boom"), True, {"prompt": "x", "ffs_n": 2}, 502),
        (lambda r: httpx.Response(400, json={"error": {"message": "too long"}}), True, {"prompt": "x"}, 400),
        (lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)), True, {"prompt": "x"}, 504),
        (lambda r: httpx.Response(200, content=_sse("{bad")), True, {"prompt": "x", "ffs_n": 2}, 502),
        (
            lambda r: httpx.Response(200, content=_sse('{"choices": [{"index": 7}]}')),
            True,
            {"prompt": "x", "ffs_n": 2},
            502,
        ),
        (
            lambda r: httpx.Response(200, content=_sse('{"choices": [{"index": 0}]}')),
            True,
            {"prompt": "x", "ffs_n": 2},
            502,
        ),
    ],
)
def test_upstream_failures_are_502_503_504_with_a_message(handler, alive, body, status):
    r = _front(handler, alive).post(COMPLETIONS, json=body)
    assert r.status_code == status and r.json()["error"]["message"], r.text


def test_health_and_models_say_when_the_engine_is_gone():
    c = _front(_down, alive=False)
    assert c.get("/health").status_code == 503 and "exited" in c.get("/health").json()["reason"]
    assert c.get("/v1/models").status_code == 503
    assert "exitrl_upstream_up 0" in c.get("/metrics").text
    c = _front(_down, alive=True)  # running, but not answering
    assert c.get("/health").status_code == 503


def test_a_malformed_plan_body_is_a_502():
    def vllm(request):
        if request.url.path == "/exitrl/plans":
            return httpx.Response(200, json={"plans": "not plans"})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x"}]})

    r = _front(vllm, num_layers=4).post(COMPLETIONS, json={"prompt": "x"})
    assert r.status_code == 502 and "decided no plan" in r.json()["error"]["message"]


def test_the_ffs_relay_asks_for_finish_events_only_and_counts_the_race():
    """By default the relay asks vLLM to stream each sample's first token and its finish only (a
    stream interval longer than any completion); the winner is the first natural finish, a sample
    that ended at the length limit counts at its length, an aborted one at the winner's."""
    import json

    from rl.serving.first_finish import FINISH_ONLY_INTERVAL

    seen = []

    def vllm(request):
        body = json.loads(request.content)
        seen.append(body)
        first = [
            f'{{"choices": [{{"index": {i}, "text": "<", "token_ids": [5], "prompt_token_ids": [1, 2, 3]}}]}}'
            for i in range(3)
        ]
        return httpx.Response(
            200,
            content=_sse(
                *first,
                json.dumps(
                    {"choices": [{"index": 1, "text": "long", "token_ids": [6] * 5, "finish_reason": "length"}]}
                ),
                json.dumps(
                    {
                        "choices": [
                            {"index": 2, "text": "think>\\boxed{7}", "token_ids": [7, 7], "finish_reason": "stop"}
                        ]
                    }
                ),
                json.dumps(
                    {"choices": [{"index": 0, "text": "never read", "token_ids": [8], "finish_reason": "stop"}]}
                ),
            ),
        )

    body = {"prompt": "x", "ffs_n": 3, "max_tokens": 40, "temperature": 1.0}
    r = _front(vllm, ffs_mode="relay").post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    assert seen[0]["stream"] is True and seen[0]["n"] == 3 and seen[0]["stream_interval"] == FINISH_ONLY_INTERVAL
    out = r.json()
    assert out["choices"][0]["text"] == "<think>\\boxed{7}" and out["choices"][0]["finish_reason"] == "stop"
    u = out["usage"]
    assert u["prompt_tokens"] == 3 and u["completion_tokens"] == u["sequential_tokens"] == 3
    # ended: sample 1 at 6 tokens, the winner at 3; aborted: sample 0 at the winner's 3
    assert u["ffs_total_completion_tokens"] == 6 + 3 + 3 and u["ffs_aborted"] == 1
    assert 0 <= u["ffs_first_finish_s"] < 30


def test_the_race_carries_an_id_of_its_own_for_the_engine_unless_relayed():
    """``ffs_mode: engine`` tags each race (a fresh id per request, beside a thinking budget's
    arguments) for vLLM's race processor; ``relay`` sends none."""
    import json

    seen = []

    def vllm(request):
        seen.append(json.loads(request.content))
        done = {"choices": [{"index": i, "text": "x", "token_ids": [7], "finish_reason": "stop"} for i in range(2)]}
        return httpx.Response(200, content=_sse(json.dumps(done)))

    body = {"prompt": "x", "ffs_n": 2, "max_tokens": 40, "temperature": 1.0}
    front = _front(vllm)
    assert front.post(COMPLETIONS, json=body).status_code == 200
    assert front.post(COMPLETIONS, json={**body, "thinking_budget": 4}).status_code == 200
    first, second = (s["vllm_xargs"] for s in seen)
    assert len(first["ffs_race"]) == 16 and second["ffs_race"] != first["ffs_race"]
    assert second["think_budget"] == 4
    assert _front(vllm, ffs_mode="relay").post(COMPLETIONS, json=body).status_code == 200
    assert "vllm_xargs" not in seen[2]


def test_an_unknown_ffs_mode_is_refused_by_name():
    from rl.serving.server import ServeConfig

    with pytest.raises(ValueError, match="ffs_mode must be one of"):
        ServeConfig(model_dir="x", ffs_mode="fast")


def test_a_negative_ffs_stream_interval_is_refused_by_name():
    from rl.serving.server import ServeConfig

    with pytest.raises(ValueError, match="ffs_stream_interval must be >= 0"):
        ServeConfig(model_dir="x", ffs_stream_interval=-1)


def test_bench_serve_drives_the_three_strategies_and_counts_the_losers(served):
    """``exitrl bench serve``'s per-model run on a live server: every strategy answers every prompt in
    each round, FFS's losers' tokens come from vLLM's own counter (the race generates more than its
    winners), and the curve holds a point per concurrency."""
    from rl.bench.serve import bench_model

    cfg = {"concurrency": 2, "max_tokens": 24, "temperature": 1.0, "n_prompts": 4, "rounds": 2}
    row = bench_model(served.url, "tiny", str(served.model_dir), SERVE_KEY, 2, cfg, [1, 2])
    s = row["strategies"]
    assert set(s) == {"plain", "ffs@2", "maj@2"}
    assert all(v["requests_per_s"] > 0 and 0 <= v["accuracy"] <= 1 for v in s.values())
    assert s["plain"]["upstream_generated_tokens"] >= 2 * 4 * s["plain"]["sequential_tokens_mean"] - 1e-6
    assert s["ffs@2"]["losers_tokens_mean"] > 0 and s["ffs@2"]["ttff_p50_s"] > 0
    assert s["maj@2"]["ttff_p50_s"] is None and s["plain"]["losers_tokens_mean"] is None
    assert [p["concurrency"] for p in row["curve"]] == [1, 2]
    assert row["ffs_p50_latency_ratio"] == s["ffs@2"]["p50_latency_s"] / s["maj@2"]["p50_latency_s"]
    assert _alive(served)
