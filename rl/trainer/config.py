"""The S-GRPO / GRPO recipe: dataclasses with a help string per field, loaded from YAML with
``key=value`` overrides on top (``rl.trainer.config_loading``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rl.data.problems import DataConfig
from rl.trainer.config_loading import ConfigError
from rl.trainer.layer_group import LAYER_REWARDS, LayerGroupConfig
from rollout.ffs_group import FFSGroupConfig
from rollout.serial_group import SerialGroupConfig


@dataclass
class ModelConfig:
    path: str = field(
        default="tiny", metadata={"help": "HF model dir or hub id; 'tiny' builds/reuses the embedded tiny reasoner"}
    )
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "compute dtype; bfloat16 keeps fp32 master weights and optimizer state and runs the learner "
            "under bf16 autocast (accelerate mixed precision); rollout engines load bf16"
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = field(
        default="auto",
        metadata={
            "help": "learner attention kernel; auto = flash_attention_2 on CUDA when flash-attn is installed, else sdpa"
        },
    )


@dataclass
class LoraConfig:
    enabled: bool = field(default=False, metadata={"help": "train a PEFT LoRA adapter instead of all weights"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names LoRA wraps"},
    )


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm", "ray"] = field(
        default="hf", metadata={"help": "hf (shares the learner's weights), vllm in-process, or ray actors"}
    )
    ray_backend: Literal["hf", "vllm"] = field(default="vllm", metadata={"help": "what each Ray actor runs"})
    ray_actors: int = field(default=1, metadata={"help": "Ray rollout actors"})
    ray_address: str | None = field(default=None, metadata={"help": "existing Ray cluster (None = start a local one)"})
    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"help": "vLLM's share of GPU memory"})
    algorithm: Literal["sgrpo", "grpo", "ffs"] = field(
        default="sgrpo",
        metadata={"help": "serial groups (S-GRPO), parallel groups (GRPO), or FFS groups (First Finish Search races)"},
    )
    prompts_per_step: int = field(default=32, metadata={"help": "prompts (groups) per training step"})
    group_size: int = field(default=5, metadata={"help": "GRPO: rollouts per prompt"})
    max_tokens: int = field(default=400, metadata={"help": "max tokens of a full rollout"})
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature (the learner scores at the same temperature)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    serial: SerialGroupConfig = field(
        default_factory=SerialGroupConfig, metadata={"help": "S-GRPO serial group settings"}
    )
    ffs: FFSGroupConfig = field(default_factory=FFSGroupConfig, metadata={"help": "FFS group settings"})


@dataclass
class LossConfig:
    advantage: Literal["sgrpo", "grpo"] | None = field(
        default=None, metadata={"help": "estimator; default follows rollout.algorithm"}
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "'decaying', 'correctness' or a plug-in 'package.module:function' (see README); "
            "default decaying for sgrpo and ffs (in finish order), correctness for grpo"
        },
    )
    grpo_scale_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std"})
    exit_answers: Literal["all", "correct_only"] = field(
        default="all",
        metadata={
            "help": "exit branches train with their advantage whether right or wrong (the paper), or only when "
            "right: a wrong forced answer is not pushed down (it was the right answer to an unfinished thought)"
        },
    )
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip epsilon below 1"})
    clip_high: float = field(default=0.2, metadata={"help": "PPO clip epsilon above 1"})
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = field(
        default="token-mean", metadata={"help": "token-level aggregation"}
    )
    kl_coef: float = field(default=0.0, metadata={"help": "KL(pi || ref) weight (0 = no reference model)"})
    tis_cap: float | None = field(
        default=2.0, metadata={"help": "truncated IS cap on exp(learner_old - sampler) (None = off)"}
    )
    fused_logprob: bool = field(
        default=True,
        metadata={
            "help": "policy loss from hidden states and the LM head with kernels.fused_policy_loss "
            "(no [tokens, vocab] logits, gradients in one pass); false: the model's full logits"
        },
    )
    format_penalty: float = field(default=0.0, metadata={"help": "subtracted when thinking never closed or no answer"})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    schedule: Literal["constant", "cosine", "linear"] = field(default="constant", metadata={"help": "after warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm (0 = off)"})
    epochs: int = field(default=1, metadata={"help": "mu: optimisation passes over each rollout batch"})
    mini_batches: int = field(
        default=1, metadata={"help": "optimizer steps per pass (gradient accumulated within each)"}
    )
    micro_batch_tokens: int = field(
        default=8192, metadata={"help": "tokens per forward/backward (sequences packed by length)"}
    )


@dataclass
class RunConfig:
    steps: int = field(default=100, metadata={"help": "training steps (rollout + update)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, sampling and exits"})
    out_dir: str = field(default="runs/train", metadata={"help": "checkpoints, metrics, summary.json"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume: bool = field(
        default=True, metadata={"help": "resume from the latest checkpoint in out_dir when there is one"}
    )
    rollout_token_budget: int = field(
        default=0,
        metadata={
            "help": "stop once the run has generated this many rollout tokens, all ranks together (0 = off; "
            "run.steps still bounds it): equal-compute comparisons of S-GRPO, GRPO and FFS groups"
        },
    )
    eval_every: int = field(default=0, metadata={"help": "held-out evaluation every N steps (0 = off)"})
    eval_problems: int = field(default=100, metadata={"help": "held-out problems per evaluation"})
    eval_data: DataConfig = field(
        default_factory=lambda: DataConfig(source="synthetic", split="validation"),
        metadata={
            "help": "the validation set checked during training (same fields as data: source, split, column "
            "keys; prompts follow data); the synthetic task's 'validation' share is disjoint from its "
            "held-out 'test' set"
        },
    )
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files"})
    wandb_project: str | None = field(default=None, metadata={"help": "also log to this wandb project"})
    max_nonfinite: int = field(default=3, metadata={"help": "stop after this many non-finite losses in a row"})
    verifier_workers: int = field(default=1, metadata={"help": "answer-verification processes"})
    allow_recipe_change: bool = field(
        default=False,
        metadata={"help": "resume even when the recipe differs from the run's config.json in a way that matters"},
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    layers: LayerGroupConfig = field(default_factory=LayerGroupConfig)


def validate(cfg: TrainConfig, recipe: str | None = None) -> None:
    """Check values the schema's types cannot (counts, ranges, windows, plug-ins) before anything
    loads; raises ``ConfigError`` naming the recipe file and the key."""
    from rewards.reward_functions import get_reward

    where = f"{recipe}: " if recipe else ""

    def need(ok: bool, key: str, rule: str, value) -> None:
        if not ok:
            raise ConfigError(f"{where}{key}: {rule}, got {value!r}")

    _check_counts(cfg, need)
    _check_ranges(cfg, need)
    _check_data_and_layers(cfg, need)
    if cfg.loss.reward is not None:
        try:
            get_reward(cfg.loss.reward)
        except KeyError as e:
            raise ConfigError(f"{where}loss.reward: {e.args[0]}") from None


def _check_counts(cfg: TrainConfig, need) -> None:
    """Counts that must be positive (or non-negative)."""
    r, s, o, run = cfg.rollout, cfg.rollout.serial, cfg.optim, cfg.run
    positive = {
        "run.steps": run.steps,
        "run.keep_last": run.keep_last,
        "run.eval_problems": run.eval_problems,
        "run.max_nonfinite": run.max_nonfinite,
        "run.verifier_workers": run.verifier_workers,
        "rollout.prompts_per_step": r.prompts_per_step,
        "rollout.group_size": r.group_size,
        "rollout.max_tokens": r.max_tokens,
        "rollout.ray_actors": r.ray_actors,
        "rollout.serial.num_exits": s.num_exits,
        "rollout.serial.answer_max_tokens": s.answer_max_tokens,
        "rollout.ffs.n": r.ffs.n,
        "rollout.ffs.finishers": r.ffs.finishers,
        "optim.epochs": o.epochs,
        "optim.mini_batches": o.mini_batches,
        "optim.micro_batch_tokens": o.micro_batch_tokens,
        "lora.r": cfg.lora.r,
    }
    for key, v in positive.items():
        need(v > 0, key, "must be > 0", v)
    need(r.ffs.finishers <= r.ffs.n, "rollout.ffs.finishers", f"must be <= rollout.ffs.n={r.ffs.n}", r.ffs.finishers)
    for key, v in {
        "run.rollout_token_budget": run.rollout_token_budget,
        "run.save_every": run.save_every,
        "run.eval_every": run.eval_every,
        "optim.warmup_steps": o.warmup_steps,
    }.items():
        need(v >= 0, key, "must be >= 0", v)


def _check_ranges(cfg: TrainConfig, need) -> None:
    """Rates, coefficients and windows."""
    r, s, o, lo = cfg.rollout, cfg.rollout.serial, cfg.optim, cfg.loss
    need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", "must be a finite number > 0", o.lr)
    need(len(o.betas) == 2, "optim.betas", "must be two numbers [beta1, beta2]", list(o.betas))
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", "each must be in [0, 1)", list(o.betas))
    for key, v in {
        "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip,
        "loss.kl_coef": lo.kl_coef,
        "loss.format_penalty": lo.format_penalty,
    }.items():
        need(math.isfinite(v) and v >= 0, key, "must be a finite number >= 0", v)
    need(
        math.isfinite(r.temperature) and r.temperature >= 0,
        "rollout.temperature",
        "must be >= 0 (0 = greedy)",
        r.temperature,
    )
    need(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    need(0 < lo.clip_low < 1, "loss.clip_low", "must be in (0, 1)", lo.clip_low)
    need(math.isfinite(lo.clip_high) and lo.clip_high > 0, "loss.clip_high", "must be > 0", lo.clip_high)
    need(lo.tis_cap is None or lo.tis_cap > 0, "loss.tis_cap", "must be > 0 (or null for off)", lo.tis_cap)
    need(len(s.window) == 2, "rollout.serial.window", "must be two fractions [low, high]", list(s.window))
    need(
        0 <= s.window[0] < s.window[1] <= 1,
        "rollout.serial.window",
        "must satisfy 0 <= low < high <= 1",
        list(s.window),
    )
    need(
        0 < r.vllm_gpu_memory_utilization <= 1,
        "rollout.vllm_gpu_memory_utilization",
        "must be in (0, 1]",
        r.vllm_gpu_memory_utilization,
    )


def _check_data_and_layers(cfg: TrainConfig, need) -> None:
    """The data's gold answers, and joint training's layer level."""
    r = cfg.rollout
    need(
        cfg.data.max_prompt_tokens is None or cfg.data.max_prompt_tokens > 0,
        "data.max_prompt_tokens",
        "must be > 0 (or null for no limit)",
        cfg.data.max_prompt_tokens,
    )
    need(
        bool(cfg.data.answer_key or cfg.data.choice_keys),
        "data.answer_key",
        "training needs gold answers (null is for data without golds, e.g. router labels)",
        cfg.data.answer_key,
    )
    ly = cfg.layers
    if ly.enabled:
        need(ly.variants >= 2, "layers.variants", "must be >= 2 (sampled plans + all-execute)", ly.variants)
        need(ly.temperature > 0, "layers.temperature", "must be > 0 (plans are sampled)", ly.temperature)
        need(ly.reward in LAYER_REWARDS, "layers.reward", f"must be one of {sorted(LAYER_REWARDS)}", ly.reward)
        need(math.isfinite(ly.router_lr) and ly.router_lr > 0, "layers.router_lr", "must be > 0", ly.router_lr)
        need(0 < ly.clip < 1, "layers.clip", "must be in (0, 1)", ly.clip)
        need(0 <= ly.max_accuracy_gap < 1, "layers.max_accuracy_gap", "must be in [0, 1)", ly.max_accuracy_gap)
        duals = ("multiplier_init", "multiplier_lr", "min_entropy", "entropy_coef", "entropy_coef_lr")
        for key in (*duals, "policy_coef"):
            v = getattr(ly, key)
            need(math.isfinite(v) and v >= 0, f"layers.{key}", "must be >= 0", v)
        need(ly.answer_max_tokens > 0, "layers.answer_max_tokens", "must be > 0", ly.answer_max_tokens)
        need(
            r.algorithm == "sgrpo",
            "layers.enabled",
            "needs rollout.algorithm sgrpo (the thinking of serial groups)",
            r.algorithm,
        )
        need(not cfg.lora.enabled, "layers.enabled", "is not supported with lora.enabled yet", cfg.lora.enabled)
