"""What a run is built from: the policy (full or LoRA, resumed or fresh), the rollout backend, the
learning-rate schedule and the training problem stream."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from rl.models.tiny_reasoner import resolve_model_path
from rl.trainer.checkpoint import ROUTERS_ATTR
from rl.trainer.config import TrainConfig
from rollout.backends.base import RolloutBackend
from rollout.backends.factory import make_backend


def attention_kernel(setting: str) -> str:
    """The attention implementation to load the learner with (``model.attn_implementation``): with
    ``auto``, flash-attention 2 on CUDA when installed, else sdpa; on CPU ``kernels.gqa_attention``
    (sdpa without copying the grouped KV heads)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    from kernels.gqa_attention import register

    return register()


def load_policy(cfg: TrainConfig, resume_from: Path | None):
    """(model, tokenizer, base model path); the model comes from ``resume_from`` when given, in fp32
    (``model.dtype: bfloat16`` is the compute dtype, applied by accelerate's mixed precision)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = resolve_model_path(cfg.model.path)
    # master weights are fp32 whatever the compute dtype: bf16 parameters under AdamW round small
    # updates away (lr 1e-6 on a bf16 weight of magnitude 1e-2 is below half an ulp)
    dtype = torch.float32
    tok = AutoTokenizer.from_pretrained(base_path)
    attn = attention_kernel(cfg.model.attn_implementation)
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation=attn)
        if resume_from is not None:
            model = PeftModel.from_pretrained(base, resume_from / "model", is_trainable=True)
        else:
            lora = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(resume_from / "model") if resume_from else base_path, dtype=dtype, attn_implementation=attn
        )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok, base_path


def attach_routers(cfg: TrainConfig, model, resume_from: Path | None):
    """Joint training (``layers.enabled``): the layer routers become a submodule of the policy
    model, so they sit in its optimizer state and checkpoints. Loaded from the checkpoint when
    resuming, else from ``layers.init_routers`` (warm start), else fresh. Returns them (or None)."""
    if not cfg.layers.enabled:
        return None
    from rollout.routing.routers import EXECUTE, LayerRouters, RouterConfig

    ly = cfg.layers
    if resume_from is not None:
        routers = LayerRouters.load(resume_from / "model")
    elif ly.init_routers:
        routers = LayerRouters.load(ly.init_routers)
    else:
        c = model.config
        routers = LayerRouters(RouterConfig(c.num_hidden_layers, c.hidden_size, ly.router_hidden, ly.num_windows))
        with torch.no_grad():  # a prior towards the full model: sampled plans start near all-execute
            routers.b2[:, EXECUTE] += ly.init_execute_bias
    if routers.num_layers != model.config.num_hidden_layers:
        raise ValueError(f"routers have {routers.num_layers} layers, the model {model.config.num_hidden_layers}")
    routers.train()
    setattr(model, ROUTERS_ATTR, routers)
    return routers


def recipe_backend(cfg: TrainConfig, model, tok, model_path: str, routers=None, rank: int = 0) -> RolloutBackend:
    """The rollout backend the recipe names (``hf`` shares the learner's weights). Joint training
    (``routers`` given) on ``vllm`` or ``ray``: the engines load the routed model from a folder of
    the base weights and the current routers (``<out_dir>/rollout_model.rank-N``), so they
    generate the layer variants under the learner's plans; weight sync keeps both current."""
    r = cfg.rollout
    if r.backend == "hf":
        return make_backend("hf", model_path, model=model, tokenizer=tok)
    return make_backend(
        r.backend,
        model_path,
        routers=routers,
        routed_folder=Path(cfg.run.out_dir) / f"rollout_model.rank-{rank}",
        dtype=cfg.model.dtype,
        seed=cfg.run.seed,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        ray_actors=r.ray_actors,
        ray_address=r.ray_address,
        ray_backend=r.ray_backend,
        num_gpus_per_actor=1.0 if torch.cuda.is_available() else 0.0,
    )


def make_scheduler(opt, cfg: TrainConfig):
    """Linear warmup, then constant, cosine or linear decay over all optimizer steps of the run."""
    o = cfg.optim
    total = max(1, cfg.run.steps * o.epochs * o.mini_batches)
    warm = o.warmup_steps * o.epochs * o.mini_batches

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = (s - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else max(0.0, 1 - frac)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def problem_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class ProblemStream:
    """The training problems as one seeded stream: epoch ``e`` visits every problem once in the order
    ``problem_order(n, seed, e)``; ``take(cursor, k)`` returns the ``k`` problems from position
    ``cursor``. Each epoch's order is computed once, when the stream first reaches it."""

    def __init__(self, problems, seed: int):
        if not problems:
            raise ValueError("the training problem stream is empty")
        self.problems, self.seed = problems, seed
        self._epoch, self._order = -1, []
        self.orders_computed = 0

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, problem_order(len(self.problems), self.seed, epoch)
            self.orders_computed += 1
        return self._order

    def take(self, cursor: int, k: int) -> list:
        out = []
        for c in range(cursor, cursor + k):
            epoch, i = divmod(c, len(self.problems))
            out.append(self.problems[self.order(epoch)[i]])
        return out
