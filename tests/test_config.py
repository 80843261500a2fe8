from dataclasses import dataclass, field

import pytest

from rl.trainer.config_loading import ConfigError, describe_fields, load_config


@dataclass
class Optim:
    lr: float = field(default=1e-6, metadata={"help": "learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup"})


@dataclass
class Recipe:
    name: str = field(default="x", metadata={"help": "run name"})
    exits: int = field(default=4, metadata={"help": "exit positions per group"})
    use_lora: bool = field(default=False, metadata={"help": "PEFT LoRA"})
    optim: Optim = field(default_factory=Optim, metadata={"help": "optimizer"})


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: demo\nexits: 6\noptim:\n  lr: 1e-5\n")
    cfg = load_config(Recipe, p, ["optim.warmup_steps=10", "use_lora=true"])
    assert (cfg.name, cfg.exits, cfg.use_lora) == ("demo", 6, True)
    assert cfg.optim.lr == 1e-5 and cfg.optim.warmup_steps == 10


def test_unknown_key_names_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("exit: 6\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'exit'.*did you mean 'exits'"):
        load_config(Recipe, p)
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(Recipe, None, ["optim.lrr=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"exits: expected int, got str 'many'"):
        load_config(Recipe, None, ["exits=many"])
    with pytest.raises(ConfigError, match=r"optim.lr: expected float"):
        load_config(Recipe, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"use_lora: expected bool"):
        load_config(Recipe, None, ["use_lora=3"])


def test_help_lists_fields():
    lines = "\n".join(describe_fields(Recipe))
    assert "optim.lr (float, default 1e-06): learning rate" in lines
    assert "exits (int, default 4): exit positions per group" in lines
