"""Shared fixtures: paths to ../shared, one quickly-built tiny model per session, one vLLM engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("EXITRL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not found (tests read ../shared beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def quick_model_dir() -> Path:
    """A tiny Qwen3 model with the real tokenizer and architecture, briefly trained (60 steps: it
    writes step lines, mostly wrong; for loading, rollout and plumbing tests; the demo builds the
    fully trained one)."""
    from rl.models.tiny_reasoner import TinyModelRecipe, build_tiny_model

    return build_tiny_model(TinyModelRecipe(sft_steps=60, train_problems=2000, batch_size=16, restart_steps=0))


@pytest.fixture(scope="session")
def vllm_engine(quick_model_dir):
    """One vLLM (vllm-cpu here) engine for the whole test session, built as the product builds it."""
    from rollout.backends.vllm import VLLMBackend

    llm = VLLMBackend.from_pretrained(
        str(quick_model_dir), dtype="float32", seed=0, max_model_len=1024, gpu_memory_utilization=0.5
    ).llm
    yield llm
    del llm


def run_exitrl_train(overrides: list[str], recipe: str = "configs/tiny_sgrpo.yaml"):
    """``exitrl train RECIPE OVERRIDES...`` as a user runs it (a child process in the checkout);
    its CompletedProcess, after asserting exit 0 (stderr's tail in the message)."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "rl.cli", "train", recipe, *overrides],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


SERVE_KEY = "test-key-123"


@pytest.fixture(scope="session")
def served(quick_model_dir, tmp_path_factory):
    """One ``exitrl serve`` (vLLM on its private socket + the front end, key ``SERVE_KEY``) of the
    quick model's export, shared by the serving tests."""
    from rl.serving.export import export
    from rl.serving.server import ServeConfig, Served

    out = export(quick_model_dir, tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")
    s = Served(ServeConfig(model_dir=str(out), port=0, max_model_len=1024, api_key=SERVE_KEY, served_model_name="tiny"))
    yield s
    s.stop()
    assert s.upstream.proc.poll() is not None  # vLLM stopped by its own pid
