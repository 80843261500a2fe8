"""S-GRPO / GRPO training loop on accelerate.

    accelerate launch -m rl.train configs/<recipe>.yaml [key=value ...]
    exitrl train configs/<recipe>.yaml [key=value ...]

``train`` builds the run (policy, optimizer, rollout backend, verifier; resumed from the last
checkpoint when there is one), then repeats ``rl.trainer.step.training_step`` (rollout -> score ->
advantages -> learn -> sync) with logging, held-out evaluation and atomic checkpoints around it. A
rerun with the same ``run.out_dir`` resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from rewards.batch import BatchVerifier, BatchVerifierConfig
from rl.data.problems import DatasetError, Problem, drop_overlong, load_problems
from rl.trainer import checkpoint as ckpt
from rl.trainer.checkpoint import ROUTERS_ATTR
from rl.trainer.config import TrainConfig, validate
from rl.trainer.config_loading import ConfigError, load_config, to_dict
from rl.trainer.learner import PolicyLogprobs
from rl.trainer.metrics_log import MetricsLogger
from rl.trainer.setup import ProblemStream, attach_routers, load_policy, make_scheduler, recipe_backend
from rl.trainer.step import Trainer, sync_stage, training_step
from rl.trainer.update import Update


class TrainingStopped(RuntimeError):
    """The run stopped on a guard (e.g. too many non-finite losses in a row)."""


def build_trainer(cfg: TrainConfig, resume_from: Path | None) -> Trainer:
    """Policy, optimizer, schedule, reference, rollout backend and verifier, prepared by accelerate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # a run configures its own precision even when an earlier run in this process (the demo runs
    # several) set another; the process group (PartialState) is kept
    AcceleratorState._reset_state()
    # bf16 recipes: fp32 master weights under bf16 autocast (None: whatever `accelerate launch` configured)
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per
    # process per optimizer step (it assumes the global batch grows with the ranks); here a step's
    # prompts are split over the ranks, so the schedule counts optimizer steps (2 ranks ran the
    # cosine to 0 at half the run)
    from accelerate.utils import DistributedDataParallelKwargs

    # joint training runs the layer variants' answers under their plans: a micro-batch may skip a
    # layer on every row, and DDP must then not wait for that layer's gradients
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.layers.enabled else []
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.model.dtype == "bfloat16" else None,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=ddp,
    )
    if accelerator.distributed_type.name == "DEEPSPEED":
        # the update accumulates a variable number of micro-batches per optimizer step, which a
        # DeepSpeed engine (one step per backward unless a fixed accumulation is declared) does not do
        raise ConfigError(
            "DeepSpeed is not supported; launch with configs/accelerate/fsdp.yaml (FSDP2 shards "
            "parameters, gradients and optimizer state)"
        )
    model, tok, model_path = load_policy(cfg, resume_from)
    routers = attach_routers(cfg, model, resume_from)
    policy = PolicyLogprobs(model, fused=cfg.loss.fused_logprob)
    router_ids = {id(p) for p in routers.parameters()} if routers is not None else set()
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in router_ids]}]
    if routers is not None:
        # the routers' own parameter group (its lr follows the same warmup / decay factor); DDP leaves
        # them alone (their loss is not part of the policy's forward): the router step all-reduces them
        groups.append({"params": list(routers.parameters()), "lr": cfg.layers.router_lr, "weight_decay": 0.0})
        policy._ddp_params_and_buffers_to_ignore = [
            f"model.{n}" for n, _ in policy.model.named_parameters() if n.startswith(ROUTERS_ATTR + ".")
        ]
        if accelerator.distributed_type.name == "FSDP":
            raise ConfigError("layers.enabled does not run under FSDP yet (the routers would be sharded); use DDP")
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = make_scheduler(optimizer, cfg)
    ref_policy = None
    if cfg.loss.kl_coef > 0:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        ref_policy = PolicyLogprobs(frozen, fused=cfg.loss.fused_logprob).to(accelerator.device)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(policy).model
    update = Update(policy, accelerator, optimizer, scheduler, cfg, tok.pad_token_id or 0, ref_policy)
    backend = recipe_backend(cfg, raw_model, tok, model_path, routers, rank=accelerator.process_index)
    verifier = BatchVerifier(BatchVerifierConfig(workers=cfg.run.verifier_workers))
    routers = getattr(raw_model, ROUTERS_ATTR, None)
    t = Trainer(cfg, update, raw_model, tok, backend, verifier, routers=routers)
    if routers is not None:
        from rl.trainer.layer_stage import initial_layer_state

        t.layer_state = initial_layer_state(cfg.layers)
    return t


def all_ranks_sum(acc, value: int) -> int:
    """``value`` summed over the ranks (every rank gets the same total, so all stop together)."""
    if acc.num_processes == 1:
        return int(value)
    return int(acc.reduce(torch.tensor([int(value)], device=acc.device), reduction="sum").item())


def held_out_evaluator(t: Trainer, problems: list[Problem]):
    """Greedy evaluation of ``problems`` (``run.eval_data``: the synthetic task's validation share by
    default, never the held-out set results are reported on, or any dataset the recipe names) with
    the recipe's prompts, through ``rl.evaluation.run.evaluate``; ``eval/accuracy`` and ``eval/think_tokens``."""
    from rl.evaluation.run import EvalSettings, evaluate
    from rollout.backends.factory import make_backend

    cfg = t.cfg
    shares = t.backend.capabilities.shares_learner_weights  # else: HF generation on the learner's modules
    hf = t.backend if shares else make_backend("hf", "", model=t.raw_model, tokenizer=t.tokenizer)
    settings = EvalSettings(strategy="greedy", max_tokens=cfg.rollout.max_tokens, progress=False, prompt=cfg.data)

    def run() -> dict:
        r = evaluate(hf, {"heldout": problems}, settings, verify_many=t.verifier.verify)["benchmarks"]["heldout"]
        return {"accuracy": r["accuracy"], "think_tokens": r["think_tokens_mean"]}

    return run


def resume_state(t: Trainer, resume_from: Path | None) -> tuple[int, int, list, dict]:
    """(step, stream cursor, eval history, spent) of a fresh run, or restored from ``resume_from``
    with the optimizer, schedule and RNG state, the rollout engine synced to the restored weights."""
    spent = {"rollout_tokens": 0, "wall_s": 0.0}  # generated tokens (all ranks) and training wall time so far
    if resume_from is None:
        return 0, 0, [], spent
    acc, u = t.update.accelerator, t.update
    state, meta = ckpt.load_trainer_state(resume_from, acc.process_index)
    ckpt.load_optimizer(resume_from, t.raw_model, u.optimizer)
    u.scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    spent.update(state["data"].get("spent", {}))
    t.layer_state.update(state["data"].get("layers", {}))  # joint training's dual variables
    acc.print(f"resumed from {resume_from} (step {meta['step']})")
    sync_stage(t)  # the engine was built from the base weights (and the routers at their start)
    return meta["step"], state["data"]["cursor"], state["data"].get("history", []), spent


def save(t: Trainer, step: int, data: dict, metrics: dict) -> None:
    """A checkpoint of step ``step`` (every rank: each writes its optimizer shard)."""
    acc, u = t.update.accelerator, t.update
    ckpt.save_checkpoint(
        Path(t.cfg.run.out_dir),
        step,
        t.raw_model,
        t.tokenizer,
        u.optimizer,
        u.scheduler,
        data,
        {"metrics": _jsonable(metrics)},
        t.cfg.run.keep_last,
        rank=acc.process_index,
        barrier=acc.wait_for_everyone,
    )


def load_run_problems(cfg: TrainConfig) -> tuple[list[Problem], list[Problem] | None]:
    """The training problems and the held-out ones (None without ``run.eval_every``)."""
    problems = load_problems(cfg.data)
    if not cfg.run.eval_every:
        return problems, None
    return problems, load_problems(dataclasses.replace(cfg.run.eval_data, limit=cfg.run.eval_problems))


def progress_fields(metrics: dict, spent: dict, budget: int) -> dict:
    """What the progress bar shows after a step."""
    out = {
        "reward": f"{metrics['reward/mean']:.3f}",
        "acc": f"{metrics['rollout/accuracy']:.2f}",
        "think": f"{metrics['rollout/think_tokens']:.0f}",
    }
    if budget:
        out["tokens"] = f"{spent['rollout_tokens']}/{budget}"
    return out


def train(cfg: TrainConfig) -> dict:
    from accelerate.utils import set_seed
    from tqdm import tqdm

    validate(cfg)
    out = Path(cfg.run.out_dir)
    resume_from = ckpt.latest_checkpoint(out) if cfg.run.resume else None
    if resume_from is not None:
        check_recipe_unchanged(out, cfg)
    # before any model loads: a bad data source fails fast
    problems, eval_problems = load_run_problems(cfg)
    set_seed(cfg.run.seed)
    t = build_trainer(cfg, resume_from)
    acc = t.update.accelerator

    problems, overlong = drop_overlong(t.tokenizer, problems, cfg.data)
    if overlong:
        acc.print(f"data: {overlong} problems dropped, prompt over data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    step, cursor, history, spent = resume_state(t, resume_from)

    logger = MetricsLogger(out, cfg.run.tensorboard, cfg.run.wandb_project, to_dict(cfg), enabled=acc.is_main_process)
    if acc.is_main_process:
        write_config(out, cfg, step)
    evaluate = held_out_evaluator(t, eval_problems) if eval_problems else None
    if evaluate and step == 0 and not history:
        history.append({"step": 0, **evaluate(), **spent})
        logger.log(0, {f"eval/{k}": v for k, v in history[-1].items() if k != "step"})

    nonfinite_run, t_start, last = 0, time.time(), {}
    desc = {"sgrpo": "S-GRPO", "grpo": "GRPO", "ffs": "FFS groups"}[cfg.rollout.algorithm]
    bar = tqdm(total=cfg.run.steps, initial=step, desc=desc, disable=not acc.is_main_process, mininterval=2)
    stream = ProblemStream(problems, cfg.run.seed)
    try:
        budget = cfg.run.rollout_token_budget
        while step < cfg.run.steps and not (budget > 0 and spent["rollout_tokens"] >= budget):
            k, rank, world = cfg.rollout.prompts_per_step, acc.process_index, acc.num_processes
            batch_problems = stream.take(cursor, k * world)[rank * k : (rank + 1) * k]
            cursor += k * world
            t_step = time.time()
            metrics = training_step(t, batch_problems, step)
            metrics["data/overlong_prompts_dropped"] = overlong
            step += 1
            spent["rollout_tokens"] += all_ranks_sum(acc, metrics["rollout/tokens"])
            spent["wall_s"] += time.time() - t_step
            metrics["rollout/tokens_total"] = spent["rollout_tokens"]
            final = step == cfg.run.steps or (budget > 0 and spent["rollout_tokens"] >= budget)

            skipped = metrics.get("learn/nonfinite_skipped", 0)
            nonfinite_run = nonfinite_run + 1 if skipped and skipped >= cfg.optim.epochs * cfg.optim.mini_batches else 0
            if evaluate and cfg.run.eval_every and (step % cfg.run.eval_every == 0 or final):
                ev = evaluate()
                history.append({"step": step, **ev, **spent})
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            logger.log(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(progress_fields(metrics, spent, budget))
            if nonfinite_run >= cfg.run.max_nonfinite:
                raise TrainingStopped(
                    f"{nonfinite_run} steps in a row had non-finite losses (last at step {step}); "
                    f"lower optim.lr or check the data; the last checkpoint is intact"
                )
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or final:
                save(t, step, {"cursor": cursor, "history": history, "spent": spent, "layers": t.layer_state}, metrics)
            acc.wait_for_everyone()
            if final:
                break
    finally:
        bar.close()
        t.verifier.close()
        logger.close()
    summary = {
        "steps": step,
        "wall_s": round(time.time() - t_start, 1),
        **{"rollout_tokens": spent["rollout_tokens"], "train_wall_s": round(spent["wall_s"], 1)},
        **{"last": _jsonable(last), "eval_history": history, "checkpoint": str(ckpt.latest_checkpoint(out))},
    }  # train_wall_s: training steps only (held-out evaluations left out)
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# Fields that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {
    "run.steps",
    "run.rollout_token_budget",
    "run.out_dir",
    "run.resume",
    "run.save_every",
    "run.keep_last",
    "run.eval_every",
    "run.eval_problems",
    "run.tensorboard",
    "run.wandb_project",
    "run.verifier_workers",
    "run.max_nonfinite",
    "run.allow_recipe_change",
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "template_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose value differs in a way that changes what is trained."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k))


def check_recipe_unchanged(out: Path, cfg: TrainConfig) -> None:
    """Resuming under a different recipe mixes two experiments: stop unless told to go on."""
    path = out / "config.json"
    if not path.exists():
        return
    changed = recipe_changes(json.loads(path.read_text()), to_dict(cfg))
    if changed and not cfg.run.allow_recipe_change:
        raise ConfigError(
            f"{path}: the recipe differs from the run being resumed in {', '.join(changed)}; "
            f"use another run.out_dir, or run.allow_recipe_change=true to go on"
        )


def write_config(out: Path, cfg: TrainConfig, step: int) -> None:
    """``config.json`` of the run; a different earlier one is kept as ``config.step-N.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path, text = out / "config.json", json.dumps(to_dict(cfg), indent=2)
    if path.exists() and path.read_text() != text:
        path.replace(out / f"config.step-{step}.json")
    path.write_text(text)


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def recipe_fields_help() -> str:
    """Every recipe field with its type, default and help string (``exitrl train --help``)."""
    from rl.trainer.config_loading import describe_fields

    return "recipe fields (YAML keys; override as dotted key=value):\n" + "\n".join(describe_fields(TrainConfig))


def add_train_arguments(p) -> None:
    """The one definition of ``exitrl train``'s (and ``python -m rl.train``'s) arguments."""
    p.add_argument("recipe", help="configs/<recipe>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields (optim.lr=1e-6)")


def run_recipe(recipe: str, overrides: list[str]) -> int:
    """Train from ``recipe`` with ``overrides``: exit code 0, or 2 with one line naming what is wrong."""
    try:
        cfg = load_config(TrainConfig, recipe, overrides)
        validate(cfg, recipe)
        summary = train(cfg)
    except (ConfigError, DatasetError) as e:
        print(f"exitrl train: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("steps", "wall_s", "checkpoint")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch -m rl.train RECIPE [key=value ...]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="exitrl train",
        description="S-GRPO / GRPO training (run under accelerate launch for multi-GPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=recipe_fields_help(),
    )
    add_train_arguments(p)
    args = p.parse_args(argv)
    return run_recipe(args.recipe, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
