"""The one way to build a rollout backend: the trainer, ``exitrl eval`` and the benches all call
``make_backend``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from rollout.backends.base import RolloutBackend

BackendKind = Literal["hf", "vllm", "ray"]


def checkpoint_dtype(path: str | Path) -> str:
    """The checkpoint's own dtype for vLLM (``float32`` / ``bfloat16`` / ``float16``; else ``auto``)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def make_backend(
    kind: BackendKind,
    model_path: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    routers: Any = None,
    routed_folder: str | Path | None = None,
    decide_plans: bool = False,
    dtype: str = "auto",
    seed: int = 0,
    gpu_memory_utilization: float = 0.5,
    ray_actors: int = 1,
    ray_address: str | None = None,
    ray_backend: Literal["hf", "vllm"] = "hf",
    num_gpus_per_actor: float = 0.0,
    **engine_options: Any,
) -> RolloutBackend:
    """A backend of ``kind`` for the model at ``model_path``.

    hf      ``model``/``tokenizer`` given: generation shares those modules (the learner's; nothing
            to sync); else the folder is loaded. ``routers`` (``LayerRouters`` or a folder with
            ``routers.safetensors``): generation routes layers.
    vllm    ``routers``: the engine loads the routed model (a folder of the model's files named as
            its family's routed architecture, the routers beside them, at ``routed_folder`` or a
            temporary one; ``dtype`` ``auto`` then means the checkpoint's own). ``decide_plans``:
            plain ``generate`` decides each prompt's plan (evaluation); otherwise plain calls run
            every layer and plans come through ``generate_routed`` (training).
    ray     ``ray_actors`` actors of ``ray_backend`` engines on the same (routed) folder; HF actors
            get no routers (their plain calls run every layer; ``generate_routed`` needs none).

    ``engine_options`` go to the local backend's constructor (hf: ``batch_size``, ...; vllm:
    ``max_model_len``, ``block_size``, ``enforce_eager`` and the rest of vLLM's engine arguments).
    """
    loaded = _load_routers(routers)
    if kind == "hf":
        from rollout.backends.hf import HFBackend

        if model is not None:
            return HFBackend(model, tokenizer, routers=loaded, **engine_options)
        return HFBackend.from_pretrained(model_path, routers=loaded, **engine_options)
    if kind not in ("vllm", "ray"):
        raise ValueError(f"unknown backend {kind!r} (expected 'hf', 'vllm' or 'ray')")
    engine_path, shape = model_path, None
    if loaded is not None:
        from rollout.routing.vllm_plugin import routed_engine_folder

        folder = Path(routed_folder) if routed_folder else Path(tempfile.mkdtemp(prefix="exitrl-routed-"))
        engine_path = str(routed_engine_folder(model_path, loaded, folder))
        dtype = checkpoint_dtype(model_path) if dtype == "auto" else dtype
        shape = (loaded.config.router_hidden, loaded.config.num_windows)
    if kind == "vllm":
        from rollout.backends.vllm import VLLMBackend

        return VLLMBackend.from_pretrained(
            engine_path,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            decide_on_generate=decide_plans,
            router_shape=shape,
            **engine_options,
        )
    from rollout.backends.ray_pool import BackendSpec, RayRolloutPool

    kw = {} if ray_backend == "hf" else {"dtype": dtype, "seed": seed}
    return RayRolloutPool(
        BackendSpec(ray_backend, engine_path, kw),
        num_actors=ray_actors,
        address=ray_address,
        num_gpus_per_actor=num_gpus_per_actor,
    )


def _load_routers(routers: Any):
    """``LayerRouters`` as given, or loaded from a folder path; None stays None."""
    if routers is None or not isinstance(routers, (str, Path)):
        return routers
    from rollout.routing.routers import LayerRouters

    return LayerRouters.load(str(routers))
