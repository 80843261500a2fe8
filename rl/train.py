"""S-GRPO / GRPO training loop on accelerate.

    accelerate launch -m rl.train configs/<recipe>.yaml [key=value ...]
    exitrl train configs/<recipe>.yaml [key=value ...]

Each step: rollout (serial groups: 1 full + m exits; or parallel groups) -> rewards (verified
answers; decaying over a serial group) -> advantages -> ``optim.epochs`` passes of PPO-clip over
micro-batches packed by token count -> weights pushed to the rollout engine. Checkpoints are atomic
and a rerun with the same ``run.out_dir`` resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from rewards.batch import BatchVerifier, BatchVerifierConfig
from rewards.reward_functions import format_penalties, get_reward
from rl import checkpoint as ckpt
from rl.config_loading import load_config, to_dict
from rl.core_algos import aggregation_weights, get_advantage, kl_k3, masked_aggregate, ppo_clip_stats, truncated_is_weights
from rl.learner import LearnerBatch, PolicyLogprobs, PolicyTokenLoss, build_learner_batch, collate, pack_micro_batches, scatter_tokens
from rl.metrics_log import MetricsLogger
from rl.problems import build_prompt, load_problems
from rl.train_config import TrainConfig
from rollout.serial_group import parallel_group_rollout, serial_group_rollout, thinking_span
from rollout.types import SamplingConfig


class TrainingStopped(RuntimeError):
    """The run stopped on a guard (e.g. too many non-finite losses in a row)."""


def resolve_model_path(path: str) -> str:
    if path == "tiny":
        from rl.tiny_model import build_tiny_model

        return str(build_tiny_model())
    return path


def load_policy(cfg: TrainConfig, resume_from: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = resolve_model_path(cfg.model.path)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    tok = AutoTokenizer.from_pretrained(base_path)
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        if resume_from is not None:
            model = PeftModel.from_pretrained(base, resume_from / "model", is_trainable=True)
        else:
            model = get_peft_model(base, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                    target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(resume_from / "model") if resume_from else base_path, dtype=dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok, base_path


def make_backend(cfg: TrainConfig, model, tok, model_path: str):
    r = cfg.rollout
    if r.backend == "hf":
        from rollout.hf_backend import HFBackend

        return HFBackend(model, tok)  # shares the learner's weights: nothing to sync
    if r.backend == "vllm":
        from rollout.vllm_backend import VLLMBackend

        return VLLMBackend.from_pretrained(model_path, dtype=cfg.model.dtype, seed=cfg.run.seed,
                                           gpu_memory_utilization=r.vllm_gpu_memory_utilization)
    if r.backend == "ray":
        from rollout.ray_workers import BackendSpec, RayRolloutPool

        kw = {} if r.ray_backend == "hf" else {"dtype": cfg.model.dtype, "seed": cfg.run.seed}
        return RayRolloutPool(BackendSpec(r.ray_backend, model_path, kw), num_actors=r.ray_actors, address=r.ray_address,
                              num_gpus_per_actor=1.0 if torch.cuda.is_available() else 0.0)
    raise ValueError(f"unknown rollout.backend {r.backend!r}")


def make_scheduler(opt, cfg: TrainConfig):
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


def take_problems(problems, cursor: int, k: int, seed: int):
    """``k`` problems from position ``cursor`` of the seeded, per-epoch shuffled stream."""
    out = []
    for c in range(cursor, cursor + k):
        epoch, i = divmod(c, len(problems))
        out.append(problems[problem_order(len(problems), seed, epoch)[i]])
    return out


def step_rewards(seqs, members, golds, tok, cfg: TrainConfig, verifier: BatchVerifier):
    """Correctness per sequence, then the recipe's reward per group (``members``: each group's
    sequence indices; serial groups are ordered)."""
    texts = [tok.decode(s.completion_ids, skip_special_tokens=False) for s in seqs]
    correct = verifier.verify(texts, [golds[s.group_id] for s in seqs])
    reward_name = cfg.loss.reward or ("decaying" if cfg.rollout.algorithm == "sgrpo" else "correctness")
    reward_fn = get_reward(reward_name)
    penalties = format_penalties(texts, cfg.loss.format_penalty) if cfg.loss.format_penalty else [0.0] * len(seqs)
    rewards = [0.0] * len(seqs)
    for idx in members:
        for i, r in zip(idx, reward_fn([correct[i] for i in idx])):
            rewards[i] = r + penalties[i]
    return correct, rewards


def rollout_metrics(batch, members, correct, close_id, open_id) -> dict:
    full = [(s, c) for s, c in zip(batch.sequences, correct) if s.is_full]
    think = [thinking_span(s.completion_ids, open_id, close_id) for s, _ in full]
    earliest = [min(batch.sequences[i].exit_position for i in idx if correct[i]) for idx in members if any(correct[i] for i in idx)]
    return {
        "rollout/accuracy": sum(c for _, c in full) / max(1, len(full)),
        "rollout/think_tokens": statistics.mean(e - s for s, e, _ in think) if think else 0.0,
        "rollout/completion_tokens": statistics.mean(len(s.completion_ids) for s, _ in full) if full else 0.0,
        "rollout/unclosed_thinking": sum(1 for _, _, closed in think if not closed),
        "rollout/earliest_correct_exit": statistics.mean(earliest) if earliest else float("nan"),
        "rollout/member_accuracy": sum(correct) / max(1, len(correct)),
    }


def _token_order(slots: torch.Tensor):
    """[b, Tc] completion-layout tensor -> [N] in the flat token order of ``slots``."""
    return lambda x: x.reshape(-1)[slots]


def learn(policy, accelerator, optimizer, scheduler, lb, cfg: TrainConfig, pad_id: int, ref_policy=None) -> dict:
    """``epochs`` x ``mini_batches`` optimizer steps of PPO-clip over ``lb``; returns metrics."""
    o, L = cfg.optim, cfg.loss
    temp = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    dev = accelerator.device
    lengths = [len(x) for x in lb.input_ids]
    micro = pack_micro_batches(lengths, o.micro_batch_tokens) if len(lb) else []
    if accelerator.num_processes > 1:
        # every rank must run the same number of backward passes (DDP/FSDP/ZeRO all-reduce in
        # them): ranks with less work pad with an empty micro-batch whose loss mask is all zero
        most = int(accelerator.gather(torch.tensor([len(micro)], device=dev)).max())
        if len(micro) < most:
            lb = LearnerBatch(lb.input_ids + [[pad_id, pad_id]], lb.prompt_lens + [1], lb.mask + [[0]], lb.sampled + [[0]],
                              lb.sampler_logp + [[0.0]], lb.advantages + [0.0])
            micro += [[len(lb) - 1]] * (most - len(micro))
    if not micro:
        return {}
    need_old = o.epochs * o.mini_batches > 1
    old: dict[int, torch.Tensor] = {}
    ref: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for mi, idx in enumerate(micro):
            t = collate(lb.select(idx), pad_id, dev)
            shape = tuple(t["completion_mask"].shape)
            if need_old:
                lp, _ = policy(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], temp)
                old[mi] = scatter_tokens(lp, t["slots"], shape)
            if ref_policy is not None:
                lp, _ = ref_policy(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], temp)
                ref[mi] = scatter_tokens(lp, t["slots"], shape)
    stats = {"clip_frac": [], "ratio_max": [], "is_raw_mean": [], "is_raw_max": [], "is_raw_min": [], "entropy": [], "kl": [], "loss": [], "grad_norm": []}
    nonfinite = 0
    rng = random.Random(len(lb))
    for _epoch in range(o.epochs):
        order = list(range(len(micro)))
        rng.shuffle(order)
        minis = [order[i:: o.mini_batches] for i in range(o.mini_batches)]
        for mini in minis:
            if not mini:
                continue
            # exact mini-batch aggregation: each micro-batch weighted by its share of the denominator
            denom_tok = sum(sum(sum(lb.mask[i]) for i in micro[m]) for m in mini)
            denom_seq = sum(len(micro[m]) for m in mini)
            optimizer.zero_grad(set_to_none=True)
            bad_loss = 0.0
            for k, mi in enumerate(mini):
                t = collate(lb.select(micro[mi]), pad_id, dev)
                shape = tuple(t["completion_mask"].shape)
                ctx = accelerator.no_sync(policy) if k < len(mini) - 1 and accelerator.num_processes > 1 else contextlib.nullcontext()
                with ctx:
                    sampled = t["sampled"] * t["completion_mask"]
                    flat = _token_order(t["slots"])
                    token_loss = PolicyTokenLoss(
                        weight=flat(aggregation_weights(t["loss_mask"], L.aggregation)),
                        advantages=t["advantages"][t["slots"] // shape[1]],
                        clip_low=L.clip_low, clip_high=L.clip_high,
                        old_logp=flat(old[mi]) if need_old else None,
                        sampler_logp=flat(t["sampler_logp"]), sampled=flat(sampled), tis_cap=L.tis_cap,
                        ref_logp=flat(ref[mi]) if ref_policy is not None else None, kl_coef=L.kl_coef)
                    loss, lp, ent = policy(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], temp, token_loss=token_loss)
                    share = (float(t["loss_mask"].sum()) / max(1, denom_tok)) if L.aggregation == "token-mean" else len(micro[mi]) / max(1, denom_seq)
                    if not torch.isfinite(loss):
                        bad_loss = 1.0  # still backpropagated: every rank keeps the same collectives
                    accelerator.backward(loss * share)
                with torch.no_grad():  # metrics from the detached log-probs
                    logp = scatter_tokens(lp, t["slots"], shape)  # [b, Tc]
                    old_logp = old[mi] if need_old else logp
                    if L.tis_cap is not None:
                        _, raw = truncated_is_weights(old_logp, t["sampler_logp"], sampled, L.tis_cap)
                        m = sampled.bool()
                        if m.any():
                            stats["is_raw_mean"].append(float(raw[m].mean()))
                            stats["is_raw_max"].append(float(raw[m].max()))
                            stats["is_raw_min"].append(float(raw[m].min()))
                    s = ppo_clip_stats(logp, old_logp, t["advantages"], t["loss_mask"], L.clip_low, L.clip_high)
                    if ref_policy is not None:
                        stats["kl"].append(float(masked_aggregate(kl_k3(logp, ref[mi]), t["loss_mask"], L.aggregation)))
                stats["clip_frac"].append(s["clip_frac"])
                stats["ratio_max"].append(s["ratio_max"])
                stats["loss"].append(float(loss.detach()))
                stats["entropy"].append(float(scatter_tokens(ent.detach(), t["slots"], shape)[t["loss_mask"].bool()].mean()) if t["loss_mask"].any() else 0.0)
            gn = accelerator.clip_grad_norm_(policy.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
            if accelerator.num_processes > 1:
                bad_loss = float(accelerator.reduce(torch.tensor([bad_loss], device=dev), reduction="sum"))
            if bad_loss or not torch.isfinite(torch.as_tensor(gn)):  # the same verdict on every rank
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                continue
            stats["grad_norm"].append(float(gn))
            optimizer.step()
            scheduler.step()
    out = {f"learn/{k}": statistics.mean(v) for k, v in stats.items() if v}
    out["learn/nonfinite_skipped"] = nonfinite
    out["learn/micro_batches"] = len(micro)
    out["learn/lr"] = scheduler.get_last_lr()[0]
    return out


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    accelerator = Accelerator()
    out = Path(cfg.run.out_dir)
    resume_from = ckpt.latest_checkpoint(out) if cfg.run.resume else None
    set_seed(cfg.run.seed)
    model, tok, model_path = load_policy(cfg, resume_from)
    policy = PolicyLogprobs(model, fused=cfg.loss.fused_logprob)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    ref_policy = None
    if cfg.loss.kl_coef > 0:
        import copy

        ref_policy = PolicyLogprobs(copy.deepcopy(model).eval().requires_grad_(False), fused=cfg.loss.fused_logprob).to(accelerator.device)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(policy).model

    problems = load_problems(cfg.data)
    step, cursor, history = 0, 0, []
    if resume_from is not None:
        state, meta = ckpt.load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, cursor = meta["step"], state["data"]["cursor"]
        history = state["data"].get("history", [])
        accelerator.print(f"resumed from {resume_from} (step {step})")

    backend = make_backend(cfg, raw_model, tok, model_path)
    if cfg.rollout.backend != "hf" and resume_from is not None:
        from rollout.weight_sync import policy_weights

        backend.load_weights(policy_weights(raw_model))
    verifier = BatchVerifier(BatchVerifierConfig(workers=cfg.run.verifier_workers))
    logger = MetricsLogger(out, cfg.run.tensorboard, cfg.run.wandb_project, to_dict(cfg), enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    close_id, open_id = tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<think>")
    sampling = SamplingConfig(max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    evaluate = _evaluator(cfg, backend, raw_model, tok)
    if evaluate and step == 0 and not history:
        history.append({"step": 0, **evaluate()})
        logger.log(0, {f"eval/{k}": v for k, v in history[-1].items() if k != "step"})

    nonfinite_run, t_start, last = 0, time.time(), {}
    bar = tqdm(total=cfg.run.steps, initial=step, desc="S-GRPO" if cfg.rollout.algorithm == "sgrpo" else "GRPO",
               disable=not accelerator.is_main_process, mininterval=2)
    try:
        while step < cfg.run.steps:
            t0 = time.perf_counter()
            k, rank = cfg.rollout.prompts_per_step, accelerator.process_index
            batch_problems = take_problems(problems, cursor, k * accelerator.num_processes, cfg.run.seed)[rank * k:(rank + 1) * k]
            cursor += k * accelerator.num_processes
            prompt_ids = [tok(build_prompt(tok, p.problem, cfg.data.instruction), add_special_tokens=False)["input_ids"] for p in batch_problems]
            step_sampling = SamplingConfig(**{**vars(sampling), "seed": cfg.run.seed * 100_003 + step * 101 + rank})
            raw_model.eval()
            if hasattr(backend, "wake_up"):
                backend.wake_up()
            if cfg.rollout.algorithm == "sgrpo":
                batch = serial_group_rollout(backend, prompt_ids, step_sampling, cfg.rollout.serial, seed=step_sampling.seed)
            else:
                batch = parallel_group_rollout(backend, prompt_ids, step_sampling, cfg.rollout.group_size)
            if hasattr(backend, "sleep"):
                backend.sleep()
            t1 = time.perf_counter()
            members = batch.group_indices()
            correct, rewards = step_rewards(batch.sequences, members, [p.answer for p in batch_problems], tok, cfg, verifier)
            t2 = time.perf_counter()

            adv_name = cfg.loss.advantage or cfg.rollout.algorithm
            adv_fn = get_advantage(adv_name)
            advantages = [0.0] * len(batch.sequences)
            keep, zero_groups, empty_groups = [], 0, 0
            for idx in members:
                if not idx:
                    empty_groups += 1
                    continue
                rs = [rewards[i] for i in idx]
                a = adv_fn(rs, scale_std=cfg.loss.grpo_scale_std) if adv_name == "grpo" else adv_fn(rs)
                for i, v in zip(idx, a):
                    advantages[i] = v
                if all(abs(v) < 1e-12 for v in a):
                    zero_groups += 1  # no signal: left out of the update, counted
                else:
                    keep.extend(idx)
            raw_model.train()
            learn_stats = {}
            if keep or accelerator.num_processes > 1:  # with several ranks, all enter learn()
                lb = build_learner_batch([batch.sequences[i] for i in keep], [advantages[i] for i in keep], cfg.loss.loss_mask)
                learn_stats = learn(policy, accelerator, optimizer, scheduler, lb, cfg, tok.pad_token_id or 0, ref_policy)
            raw_model.eval()
            t3 = time.perf_counter()
            if cfg.rollout.backend != "hf":
                from rollout.weight_sync import policy_weights

                backend.load_weights(policy_weights(raw_model))
            t4 = time.perf_counter()

            skipped = learn_stats.get("learn/nonfinite_skipped", 0)
            nonfinite_run = nonfinite_run + 1 if skipped and skipped >= cfg.optim.epochs * cfg.optim.mini_batches else 0
            step += 1
            gen_tokens = batch.stats["full_tokens"] + batch.stats["branch_tokens"]
            metrics = {
                "reward/mean": statistics.mean(rewards) if rewards else 0.0,
                **rollout_metrics(batch, members, correct, close_id, open_id),
                **learn_stats,
                "groups/zero_advantage": zero_groups,
                "groups/empty": empty_groups,
                "groups/sequences": len(batch.sequences),
                "perf/rollout_tokens_per_s": gen_tokens / max(1e-9, t1 - t0),
                "perf/learn_tokens_per_s": sum(len(batch.sequences[i].prompt_ids) + len(batch.sequences[i].completion_ids) for i in keep) / max(1e-9, t3 - t2),
                "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learn_s": t3 - t2, "time/sync_s": t4 - t3,
            }
            if evaluate and cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                ev = evaluate()
                history.append({"step": step, **ev})
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            logger.log(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['rollout/accuracy']:.2f}", think=f"{metrics['rollout/think_tokens']:.0f}")
            if nonfinite_run >= cfg.run.max_nonfinite:
                raise TrainingStopped(f"{nonfinite_run} steps in a row had non-finite losses (last at step {step}); "
                                      f"lower optim.lr or check the data; the last checkpoint is intact")
            if accelerator.is_main_process and ((cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps):
                ckpt.save_checkpoint(out, step, accelerator.unwrap_model(policy).model, tok, optimizer, scheduler,
                                     {"cursor": cursor, "history": history}, {"metrics": _jsonable(metrics)}, cfg.run.keep_last)
            accelerator.wait_for_everyone()
    finally:
        bar.close()
        verifier.close()
        logger.close()
    summary = {"steps": step, "wall_s": round(time.time() - t_start, 1), "last": _jsonable(last), "eval_history": history,
               "checkpoint": str(ckpt.latest_checkpoint(out))}
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def _evaluator(cfg: TrainConfig, backend, model, tok):
    """Held-out greedy evaluation for the synthetic task (None for other data)."""
    if cfg.data.source != "synthetic" or not cfg.run.eval_every:
        return None
    from rl.demo import evaluate_synthetic
    from rollout.hf_backend import HFBackend

    hf = backend if isinstance(backend, HFBackend) else HFBackend(model, tok)

    def run() -> dict:
        r = evaluate_synthetic(hf, cfg.run.eval_problems, max_tokens=cfg.rollout.max_tokens)
        return {"accuracy": r["accuracy"], "think_tokens": r["think_tokens"]}

    return run


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="exitrl train", description="S-GRPO / GRPO training (run under accelerate launch for multi-GPU)")
    p.add_argument("recipe", nargs="?", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields (optim.lr=1e-6)")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, args.recipe, args.overrides)
    try:
        summary = train(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("steps", "wall_s", "checkpoint")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
