"""``exitrl eval --routers DIR --backend vllm``: the model and its routers as the routed vLLM model.

The engine loads a folder of the model's files (linked) named as its family's routed architecture,
with the routers beside them (``rollout.routing.vllm_plugin.routed_engine_folder``), in the model's
own dtype (a float32 model stays float32, so routed vLLM and routed transformers generate the same
greedy text). Each ``generate`` lets the routers decide every prompt's plan inside the engine from
the whole prompt, then runs each prompt under its plan (``Generation.plan`` set, as the HF backend's
routed generations are)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rollout.types import Generation, SamplingConfig


def model_dtype(path: str | Path) -> str:
    """The checkpoint's own dtype for vLLM (``float32`` / ``bfloat16`` / ``float16``; else ``auto``)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


class RoutedVLLMEval:
    """The evaluation's view of a routed vLLM engine: ``generate`` = plans decided, then generated."""

    def __init__(self, model_path: str, routers_dir: str):
        from rollout.backends.vllm import VLLMBackend
        from rollout.routing.routers import LayerRouters
        from rollout.routing.vllm_plugin import routed_engine_folder

        self.folder = Path(tempfile.mkdtemp(prefix="exitrl-routed-eval-"))
        routed_engine_folder(model_path, LayerRouters.load(routers_dir), self.folder)
        self.engine = VLLMBackend.from_pretrained(str(self.folder), dtype=model_dtype(model_path))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        plans = self.engine.decide_plans(prompt_ids)
        return self.engine.generate_routed(prompt_ids, sampling, plans)
