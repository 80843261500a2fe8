"""``exitrl serve`` as a supervisor sees it: the process started as a user starts it, stopped or
broken at the awkward moments. Every way out leaves no vLLM process, and the exit code says what
happened (0: stopped on request, 1: vLLM failed or died)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest


@pytest.fixture(scope="module")
def export_dir(quick_model_dir, tmp_path_factory):
    from rl.serving.export import export

    return export(quick_model_dir, tmp_path_factory.mktemp("lifecycle") / "tiny", dtype="float32")


def _start(export_dir) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rl.cli", "serve", str(export_dir), "--port", "0", "--max-model-len", "512"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _vllm_pid(p: subprocess.Popen, timeout_s: float = 60) -> int:
    """The pid of the ``vllm serve`` that ``exitrl serve`` started."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        for c in psutil.Process(p.pid).children():
            if "vllm.entrypoints.openai.api_server" in " ".join(c.cmdline()):
                return c.pid
        time.sleep(0.2)
    raise AssertionError("exitrl serve started no vLLM")


def _ready_url(p: subprocess.Popen, timeout_s: float = 300) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if select.select([p.stdout], [], [], 1.0)[0]:
            line = p.stdout.readline()
            if line.startswith("exitrl serve: http"):
                return line.split()[2]
        assert p.poll() is None, p.stderr.read()
    raise AssertionError("exitrl serve did not come up")


def _group_gone(pgid: int, within_s: float = 30) -> bool:
    """No live process left in vLLM's process group (it and its engine processes)."""
    t0 = time.time()
    while time.time() - t0 < within_s:
        left = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        if not left:
            return True
        time.sleep(0.3)
    return False


def test_sigterm_while_vllm_starts_stops_it_and_exits_0(export_dir):
    p = _start(export_dir)
    vllm = _vllm_pid(p)
    time.sleep(2)  # vLLM is loading
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    assert "stopped while vLLM was starting" in p.stderr.read()
    assert _group_gone(vllm)


def test_a_killed_front_end_takes_vllm_with_it(export_dir):
    import shutil

    p = _start(export_dir)
    vllm = _vllm_pid(p)
    cmd = psutil.Process(vllm).cmdline()
    socket_dir = os.path.dirname(cmd[cmd.index("--uds") + 1])
    time.sleep(2)
    p.kill()  # SIGKILL: no handler runs; vLLM gets SIGTERM from the kernel (parent-death signal)
    p.wait()
    assert _group_gone(vllm, within_s=60)
    shutil.rmtree(socket_dir, ignore_errors=True)  # what a SIGKILLed front end cannot remove itself


def _serving(export_dir) -> tuple[subprocess.Popen, str, int]:
    """A started ``exitrl serve`` that answers: (process, url, vLLM's pid)."""
    p = _start(export_dir)
    url = _ready_url(p)
    assert httpx.get(url + "/health").status_code == 200
    return p, url, _vllm_pid(p)


def test_vllm_dying_ends_the_server_with_exit_1(export_dir):
    p, _, vllm = _serving(export_dir)
    os.kill(vllm, signal.SIGKILL)  # the engine crashes
    assert p.wait(30) == 1
    assert "vLLM exited" in p.stderr.read()
    assert _group_gone(vllm)


@pytest.mark.slow  # a second full start (about 30 s): make test-slow
def test_ctrl_c_twice_stops_at_once_and_leaves_nothing(export_dir):
    p, url, vllm = _serving(export_dir)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)  # the impatient second Ctrl-C: vLLM is killed without its grace period
    assert p.wait(30) == 0
    assert _group_gone(vllm)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


@pytest.mark.parametrize(
    "args", [["--vllm-args", "--host", "0.0.0.0"], ["--vllm-args", "--port=9"], ["--host", "0.0.0.0"]]
)
def test_arguments_that_would_expose_vllm_or_an_unkeyed_server_exit_2(export_dir, args):
    env = {k: v for k, v in os.environ.items() if k != "EXITRL_API_KEY"}
    cmd = [sys.executable, "-m", "rl.cli", "serve", str(export_dir), "--port", "0", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("exitrl serve:"), r.stderr
    assert ("exitrl serve sets" in r.stderr) if "--vllm-args" in args else ("needs an API key" in r.stderr)
