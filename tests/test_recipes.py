"""Every shipped recipe loads into TrainConfig; accelerate configs name the strategies they claim."""

import re
from pathlib import Path

import pytest
import yaml

from rl.trainer.config import TrainConfig
from rl.trainer.config_loading import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_recipe_loads(recipe):
    cfg = load_config(TrainConfig, CONFIGS / recipe)
    assert cfg.run.steps > 0 and cfg.optim.lr > 0
    assert cfg.rollout.algorithm in ("sgrpo", "grpo")


def test_paper_settings_in_the_large_recipes():
    for name in ("qwen3_8b_sgrpo.yaml", "r1_distill_7b_sgrpo.yaml"):
        cfg = load_config(TrainConfig, CONFIGS / name)
        assert cfg.optim.lr == 1e-6 and cfg.rollout.algorithm == "sgrpo" and cfg.loss.kl_coef == 0.0
        assert cfg.rollout.serial.window == (0.1, 0.9) and cfg.rollout.backend == "vllm"


def test_accelerate_configs():
    kinds = {p.stem: yaml.safe_load(p.read_text())["distributed_type"] for p in (CONFIGS / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "cpu": "NO"}


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="rollout.serial.num_exitz"):
        load_config(TrainConfig, CONFIGS / "tiny_sgrpo.yaml", ["rollout.serial.num_exitz=3"])


# The architecture each shipped recipe's model has (from its hub config; no hub at test time).
ARCHITECTURES = {
    "tiny": "Qwen3ForCausalLM",
    "Qwen/Qwen3-8B": "Qwen3ForCausalLM",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "Qwen2ForCausalLM",
}


def _recipe_launch_pairs():
    for recipe in sorted(CONFIGS.glob("*.yaml")):
        for name in re.findall(r"--config_file configs/accelerate/(\w+)\.yaml", recipe.read_text()):
            yield recipe.name, name


@pytest.mark.parametrize("recipe,launch", list(_recipe_launch_pairs()))
def test_fsdp_wrap_plan_fits_the_recipes_model(recipe, launch):
    """Each recipe + the accelerate config its header launches it with: on a meta-device model of the
    recipe's architecture, wrapped as the trainer wraps it (PolicyLogprobs), FSDP's auto-wrap policy
    puts every decoder layer (and nothing else) in its own unit."""
    import torch
    import transformers
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from rl.trainer.learner import PolicyLogprobs

    launch_cfg = yaml.safe_load((CONFIGS / "accelerate" / f"{launch}.yaml").read_text())
    if launch_cfg["distributed_type"] != "FSDP":
        pytest.skip(f"{launch} is not an FSDP config")
    fsdp = launch_cfg["fsdp_config"]
    arch = ARCHITECTURES[load_config(TrainConfig, CONFIGS / recipe).model.path]
    model_cls = getattr(transformers, arch)
    config = model_cls.config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=128,
    )
    with torch.device("meta"):
        policy = PolicyLogprobs(model_cls(config))
    names = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=names.split(",") if names else None,
    )
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, policy)
    wrapped = [type(m).__name__ for m in policy.modules() if wrap(m)]
    assert wrapped == [arch.replace("ForCausalLM", "DecoderLayer")] * 3
