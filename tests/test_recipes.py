"""Every shipped recipe loads into TrainConfig; accelerate configs name the strategies they claim."""

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
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED", "cpu": "NO"}
    ds = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero3.yaml").read_text())
    assert ds["deepspeed_config"]["zero_stage"] == 3


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="rollout.serial.num_exitz"):
        load_config(TrainConfig, CONFIGS / "tiny_sgrpo.yaml", ["rollout.serial.num_exitz=3"])
