"""``exitrl serve``: the real ``vllm serve`` on a private Unix socket (``rl.serving.upstream``), and in
front of it a small OpenAI-compatible front end (FastAPI + httpx: ``rl.serving.app``, behind the
middleware of ``rl.serving.guard``; ``rl.serving.front_end``: what it knows per request) that is the
only way in:

- routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/metrics`` (vLLM's own
  metrics beside the front end's) and ``/health`` (open liveness: 503 once the engine is gone); an API
  key (``EXITRL_API_KEY``) on every route but ``/health``, required whenever the front end binds
  beyond loopback; POST bodies must be ``application/json``;
- an explicit allowlist of request fields, each validated (``rl.serving.request_schema``): anything
  else is a 400 naming the field, and only what the front end understands goes upstream;
- **First Finish Search** (``"ffs_n": n``, ``rl.serving.first_finish``: raced inside vLLM by
  ``rollout.first_finish_race``, or through a streamed relay), with ``usage`` reporting
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

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.serving.app import build_app
from rl.serving.front_end import FrontEnd, error_body, parse_json, upstream_body
from rl.serving.guard import MAX_BODY_BYTES, OPEN_ROUTES, ROUTES, Guard
from rl.serving.upstream import UpstreamError, VLLMServer, check_vllm_args, on_cpu

# what the front end is made of lives beside this module; these names stay importable from here
__all__ = [
    "API_KEY_ENV",
    "LOOPBACK",
    "MAX_BODY_BYTES",
    "OPEN_ROUTES",
    "ROUTES",
    "FrontEnd",
    "Guard",
    "ServeConfig",
    "Served",
    "build_app",
    "error_body",
    "parse_json",
    "serve",
    "upstream_body",
]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FFS_MODES = ("engine", "relay")
API_KEY_ENV = "EXITRL_API_KEY"


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
    ffs_mode: str = field(
        default="engine",
        metadata={"help": "FFS race: 'engine' ends the losers inside vLLM; 'relay' streams and aborts them"},
    )
    ffs_stream_interval: int = field(
        default=0,
        metadata={"help": "FFS relay: 0 streams each sample's first token and its finish only; N > 0 every N tokens"},
    )

    def __post_init__(self):
        if self.ffs_mode not in FFS_MODES:
            raise ValueError(f"ffs_mode must be one of {FFS_MODES}, got {self.ffs_mode!r}")
        if self.ffs_stream_interval < 0:
            raise ValueError(
                f"ffs_stream_interval must be >= 0 (0: first token and finish only), got {self.ffs_stream_interval}"
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
        # the race's last: a forced end wins over a forced exit prompt
        "--logits-processors", "rollout.think_budget:ThinkBudgetProcessor",
        "rollout.first_finish_race:FirstFinishRaceProcessor",
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
        ffs_mode=cfg.ffs_mode,
        ffs_stream_interval=cfg.ffs_stream_interval,
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
