"""Weights from the learner, in the names a fresh Hugging Face checkpoint of the base model uses.

A PEFT LoRA model is merged on the fly (``W + B A * scale``) without touching the learner's
modules; wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile,
``base_model.model.`` and ``.base_layer`` from PEFT) are stripped.

``checkpoint_format=True`` names and lays out the tensors as the model's checkpoint does, which is
what vLLM's loader reads: transformers 5 keeps some weights converted in memory (MoE experts fused
into ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj``; checkpoints hold
``mlp.experts.N.gate_proj.weight`` ...), and its own save-time reversal
(``revert_weight_conversion``) undoes that one parameter at a time.

Sharded learners yield full tensors, gathered one parameter at a time so the peak stays one
parameter: FSDP2 parameters are DTensors (``full_tensor()``, a collective: every rank must iterate).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _clean(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a possibly sharded parameter (collective for sharded ones)."""
    if hasattr(t, "full_tensor"):  # DTensor: FSDP2, tensor parallel
        return t.full_tensor().detach()
    return t.detach()


def _transformers_model(model):
    """The transformers model inside DDP / torch.compile / PEFT wrappers (None: not one)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def checkpoint_converter(model):
    """A function (in-memory name, tensor) -> [(checkpoint name, tensor), ...] for ``model``: the
    identity unless transformers converts some of its weights at load time (MoE experts)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, revert_weight_conversion

    base = _transformers_model(model)
    if base is None:
        return lambda name, t: [(name, t)]
    conversions = getattr(base, "_weight_conversions", None)
    if conversions is None:  # built from a config, not loaded: the model type's default conversions
        conversions = [
            c for c in get_model_conversion_mapping(base, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
    if not conversions:
        return lambda name, t: [(name, t)]
    return lambda name, t: list(revert_weight_conversion(base, {name: t}).items())


@torch.no_grad()
def policy_weights(
    model, routers_attr: str | None = None, checkpoint_format: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of the policy, LoRA deltas merged in. ``routers_attr``:
    the submodule holding layer routers (joint training), whose tensors are named ``routers.*``,
    as routed engines read them (``rollout.routing.vllm_model``, the HF backend).
    ``checkpoint_format``: names and layouts as the model's checkpoint holds them (what vLLM loads),
    not as transformers keeps them in memory."""
    if checkpoint_format:
        convert = checkpoint_converter(model)
        for name, t in policy_weights(model, routers_attr):
            yield from [(name, t)] if name.startswith("routers.") else convert(name, t)
        return
    lora = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and getattr(mod, "active_adapters", None):
            lora[_clean(name) + ".weight"] = mod
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        clean = _clean(name)
        if routers_attr is not None and clean.startswith(routers_attr + "."):
            yield "routers." + clean[len(routers_attr) + 1 :], full_tensor(p)
            continue
        mod = lora.get(clean)
        if mod is not None and not getattr(mod, "merged", False):
            w = full_tensor(p).clone()
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    w += mod.get_delta_weight(adapter).to(w.dtype)
            yield clean, w
        else:
            yield clean, full_tensor(p)
    for name, b in model.named_buffers():
        if "lora_" not in name and not name.endswith("inv_freq"):
            yield _clean(name), full_tensor(b)
