"""``exitrl export``: a run, a checkpoint or a model folder -> a folder plain ``vllm serve`` loads.

OUT/ config.json, model.safetensors (the chosen dtype, LoRA merged unless ``adapter``),
     tokenizer files with the chat template (``<think>``/``</think>`` as ordinary added tokens,
     so ``/v1/completions`` keeps them in its text, as Qwen3's tokenizer does),
     generation_config.json (the recipe's sampling defaults: vLLM's ``--generation-config auto``),
     exitrl_export.json (exit prompt, reasoning parser, recipe, source step)
     routers.safetensors + routers.json when the model has layer routers (a joint run's checkpoint,
     or ``routers=DIR``): ``architectures`` becomes ``ExitrlRoutedQwen3ForCausalLM``, the routed
     model the exitrl vLLM plugin registers (``rollout/routing/vllm_model.py``)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rollout.thinking import DEFAULT_EXIT_PROMPT

THINK_TAGS = ("<think>", "</think>")
METADATA = "exitrl_export.json"
DTYPES = ("bfloat16", "float16", "float32")


class ExportError(ValueError):
    """Bad export input; the message names the file or folder."""


def resolve_source(src: str | Path) -> tuple[Path, Path | None, int | None]:
    """(model folder, run folder or None, step or None) of a run, a ``step-N`` checkpoint or a model folder."""
    from rl.trainer.checkpoint import latest_checkpoint

    p = Path(src)
    if not p.exists():
        raise ExportError(f"{p}: no such run, checkpoint or model folder")
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ExportError(f"{p}: a run folder without a complete checkpoint (checkpoints/step-N/meta.json)")
        p = ckpt
    if (p / "meta.json").exists() and (p / "model").is_dir():
        step = json.loads((p / "meta.json").read_text()).get("step")
        return p / "model", p.parent.parent, step
    if (p / "config.json").exists() or (p / "adapter_config.json").exists():
        return p, None, None
    raise ExportError(
        f"{p}: not a run, a checkpoint or a model folder (no config.json, adapter_config.json or checkpoints/)"
    )


def _check_servable(config, out_hint: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise ExportError(f"{out_hint}: config.json names no architecture")
    try:
        from vllm.model_executor.models import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
    except Exception:  # vLLM not importable here: the check is left to vllm serve
        supported = None
    if supported is not None and not any(a in supported for a in archs):
        raise ExportError(f"{out_hint}: architecture {archs[0]!r} is not one vLLM serves")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim < 32:
        raise ExportError(f"{out_hint}: head_dim {head_dim} < 32: vLLM's attention backends need head_dim >= 32")


def think_tags_as_plain_tokens(folder: Path) -> None:
    """Mark ``<think>``/``</think>`` non-special in ``tokenizer.json`` and drop them from the special
    tokens list of ``tokenizer_config.json`` (ids unchanged), so decoding with
    ``skip_special_tokens`` keeps them."""
    tj = folder / "tokenizer.json"
    data = json.loads(tj.read_text())
    for tok in data.get("added_tokens", []):
        if tok["content"] in THINK_TAGS:
            tok["special"] = False
    tj.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    tc = folder / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(cfg.get(key), list):
            cfg[key] = [t for t in cfg[key] if (t if isinstance(t, str) else t.get("content")) not in THINK_TAGS]
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        if entry.get("content") in THINK_TAGS:
            entry["special"] = False
    tc.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))


def reasoning_parser_for(tokenizer) -> str:
    """``deepseek_r1`` when the chat template opens ``<think>`` in the prompt, else ``qwen3``."""
    from rl.data.prompts import build_prompt
    from rollout.thinking import prompt_opens_thinking, think_tag_ids

    ids = tokenizer(build_prompt(tokenizer, "1+1?"), add_special_tokens=False)["input_ids"]
    return "deepseek_r1" if prompt_opens_thinking(ids, *think_tag_ids(tokenizer)) else "qwen3"


@dataclass
class _Source:
    """The model an export reads, checked: its folder, run, step, LoRA base and config."""

    model_dir: Path
    run_dir: Path | None
    step: int | None
    is_adapter: bool
    base_dir: str | Path  # the LoRA adapter's base model, else model_dir
    config: object  # its transformers config


def _checked_source(src: str | Path, out: Path, dtype: str, adapter: bool) -> _Source:
    """``src`` resolved and checked against the export's options before anything is written."""
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    model_dir, run_dir, step = resolve_source(src)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; export into a new folder")
    is_adapter = (model_dir / "adapter_config.json").exists()
    if adapter and not is_adapter:
        raise ExportError(f"{model_dir}: --adapter given but the model has no LoRA adapter (adapter_config.json)")
    base_dir = (
        json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        if is_adapter
        else model_dir
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).exists():
            raise ExportError(f"{model_dir}: missing {name}")
    config = AutoConfig.from_pretrained(base_dir)
    _check_servable(config, str(model_dir))
    return _Source(model_dir, run_dir, step, is_adapter, base_dir, config)


def _checked_routers(source: _Source, routers: str | Path | None, with_routers: bool) -> Path | None:
    """The routers folder the export serves with (``routers``, else the checkpoint's own; None with
    ``with_routers=False``), checked against the model."""
    from rollout.routing.routers import ROUTERS_FILE, LayerRouters
    from rollout.routing.vllm_plugin import ROUTED_MODEL_TYPES

    model_dir, config = source.model_dir, source.config
    if routers is not None and not with_routers:
        raise ExportError("--routers and --no-routers contradict each other")
    routers_dir = Path(routers) if routers is not None else (model_dir if (model_dir / ROUTERS_FILE).exists() else None)
    if not with_routers:
        routers_dir = None
    if routers_dir is None:
        return None
    try:
        layer_routers = LayerRouters.load(routers_dir)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    if layer_routers.num_layers != config.num_hidden_layers:
        raise ExportError(
            f"{routers_dir}: routers for {layer_routers.num_layers} layers, {model_dir} has {config.num_hidden_layers}"
        )
    if config.model_type not in ROUTED_MODEL_TYPES:
        raise ExportError(
            f"{model_dir}: the routed vLLM model serves {', '.join(ROUTED_MODEL_TYPES)} models, not "
            f"{config.model_type!r}; --no-routers exports the policy alone"
        )
    return routers_dir


def _load_model(source: _Source, adapter: bool, tmp: Path):
    """The model in float32: its LoRA adapter merged, or (``adapter``) copied into ``tmp/adapter``
    beside the base model."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, base_dir = source.model_dir, source.base_dir
    if source.is_adapter and not adapter:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    if source.is_adapter:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        (tmp / "adapter").mkdir()
        for f in model_dir.iterdir():
            if f.name.startswith("adapter_"):
                shutil.copy2(f, tmp / "adapter" / f.name)
        return model
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _write_model(tmp: Path, source: _Source, dtype: str, adapter: bool, recipe: dict | None):
    """The model (in ``dtype``, the recipe's sampling defaults as its generation config) and its
    tokenizer (think tags as plain tokens) written into ``tmp``; returns the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.model_dir)
    model = _load_model(source, adapter, tmp).to(torch_dtype)
    model.config.dtype = torch_dtype
    sampling = (recipe or {}).get("rollout", {})
    gen = model.generation_config
    gen.do_sample = True
    gen.temperature = float(sampling.get("temperature", 1.0)) or 1.0
    gen.top_p = float(sampling.get("top_p", 1.0))
    gen.max_new_tokens = int(sampling.get("max_tokens", 1024))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    think_tags_as_plain_tokens(tmp)
    return tokenizer


def export(
    src: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    adapter: bool = False,
    routers: str | Path | None = None,
    with_routers: bool = True,
) -> Path:
    """Write the servable folder ``out`` from ``src`` (see the module docstring); returns ``out``.
    ``with_routers=False``: the policy alone, as a plain model (a joint run's routers left behind)."""
    from rollout.routing.routers import ROUTERS_CONFIG, ROUTERS_FILE
    from rollout.routing.vllm_plugin import name_routed_architecture

    out = Path(out)
    source = _checked_source(src, out, dtype, adapter)
    routers_dir = _checked_routers(source, routers, with_routers)
    run_dir = source.run_dir
    recipe = (
        json.loads((run_dir / "config.json").read_text()) if run_dir and (run_dir / "config.json").exists() else None
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = _write_model(tmp, source, dtype, adapter, recipe)
    if routers_dir is not None:
        for f in (ROUTERS_FILE, ROUTERS_CONFIG):
            shutil.copy2(routers_dir / f, tmp / f)
        name_routed_architecture(tmp)
    exit_prompt = ((recipe or {}).get("rollout", {}).get("serial", {}) or {}).get("exit_prompt", DEFAULT_EXIT_PROMPT)
    meta = {
        "exit_prompt": exit_prompt,
        "reasoning_parser": reasoning_parser_for(tokenizer),
        "source": str(Path(src).resolve()),
        "source_model": str(source.model_dir.resolve()),
        "source_step": source.step,
        "dtype": dtype,
        "lora": "adapter" if adapter else ("merged" if source.is_adapter else None),
        "recipe": recipe,
        "routers": str(routers_dir.resolve()) if routers_dir is not None else None,
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return out


def load_metadata(folder: str | Path) -> dict:
    """``exitrl_export.json`` of an exported folder (an ``ExportError`` naming the folder otherwise)."""
    path = Path(folder) / METADATA
    if not path.exists():
        raise ExportError(f"{folder}: not an exitrl export (no {METADATA}); run exitrl export first")
    return json.loads(path.read_text())
