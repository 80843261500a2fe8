"""One training step, as named stages with typed inputs and outputs:

    rollout -> score -> advantages -> learn -> sync

``training_step`` runs them top to bottom and returns the step's metrics; ``rl.trainer.loop`` adds
logging, held-out evaluation and checkpoints around it. A new stage is one more line there.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rewards.batch import BatchVerifier
from rewards.reward_functions import RewardInput, format_penalties, get_reward
from rl.data.problems import Problem, encode_prompts
from rl.trainer.config import TrainConfig
from rl.trainer.core_algos import exit_branch_mask, get_advantage
from rl.trainer.learner import build_learner_batch
from rl.trainer.update import Update, learn
from rollout.ffs_group import ffs_group_rollout, ffs_members
from rollout.serial_group import parallel_group_rollout, serial_group_rollout
from rollout.thinking import scored_text, think_tag_ids, thinking_span
from rollout.types import RolloutBatch, RolloutSequence, SamplingConfig


@dataclass
class Trainer:
    """Everything a step works with; built once by ``rl.trainer.loop``."""

    cfg: TrainConfig
    update: Update  # policy, optimizer, scheduler, accelerator, reference
    raw_model: object  # the unwrapped HF model the rollout backend and checkpoints see
    tokenizer: object
    backend: object
    verifier: BatchVerifier
    routers: object | None = None  # joint training: the LayerRouters on the policy model (``layers``)
    # joint training's dual variables (``layer_stage.initial_layer_state``), saved with each checkpoint
    layer_state: dict = field(default_factory=dict)


@dataclass
class Rollout:
    problems: list[Problem]
    batch: RolloutBatch
    members: list[list[int]]  # each group's sequence indices (serial: earliest exit -> full)


@dataclass
class Scores:
    correct: list[bool]  # per sequence
    rewards: list[float]  # per sequence (the recipe's reward + format penalties)


@dataclass
class Advantages:
    values: list[float]  # per sequence
    keep: list[int]  # sequences of groups that carry a learning signal
    zero_groups: int  # groups whose advantages are all zero (left out of the update)
    empty_groups: int


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - t0


def rollout_stage(t: Trainer, problems: list[Problem], step: int) -> Rollout:
    """Serial groups (S-GRPO: 1 full + m exits), parallel groups (GRPO) or FFS groups for ``problems``."""
    cfg, tok, rank = t.cfg, t.tokenizer, t.update.accelerator.process_index
    prompt_ids = encode_prompts(tok, problems, cfg.data)
    r = cfg.rollout
    sampling = SamplingConfig(
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        seed=cfg.run.seed * 100_003 + step * 101 + rank,
    )
    t.raw_model.eval()
    t.backend.wake_up()  # a GPU engine sleeps while the learner steps (a no-op elsewhere)
    if r.algorithm == "sgrpo":
        batch = serial_group_rollout(t.backend, prompt_ids, sampling, r.serial, seed=sampling.seed)
    elif r.algorithm == "ffs":
        batch = ffs_group_rollout(t.backend, prompt_ids, sampling, r.ffs)
    else:
        batch = parallel_group_rollout(t.backend, prompt_ids, sampling, r.group_size)
    t.backend.sleep()
    members = ffs_members(batch, r.ffs.aborted) if r.algorithm == "ffs" else batch.group_indices()
    return Rollout(problems, batch, members)


def step_rewards(
    seqs: list[RolloutSequence], members, problems: list[Problem], tok, cfg: TrainConfig, verifier: BatchVerifier
):
    """Correctness per sequence (verified in isolated workers), then the recipe's reward per group
    (``members``: each group's sequence indices, serial groups ordered), plus format penalties."""
    texts = [scored_text(tok, s.prompt_ids, s.completion_ids) for s in seqs]
    correct = verifier.verify(texts, [problems[s.group_id].answer for s in seqs])
    ffs = cfg.rollout.algorithm == "ffs"
    if ffs:  # an FFS group's unfinished members earn nothing, whatever their text says
        correct = [c and s.finish_reason == "stop" for c, s in zip(correct, seqs)]
    reward_fn = get_reward(cfg.loss.reward or ("correctness" if cfg.rollout.algorithm == "grpo" else "decaying"))
    penalties = format_penalties(texts, cfg.loss.format_penalty) if cfg.loss.format_penalty else [0.0] * len(seqs)
    rewards = [0.0] * len(seqs)
    for idx in members:
        if not idx:
            continue
        # a group's members share its prompt and problem: decoded and read once per group
        p, k = problems[seqs[idx[0]].group_id], len(idx)
        group = RewardInput(
            prompts=[tok.decode(seqs[idx[0]].prompt_ids, skip_special_tokens=False)] * k,
            completions=[texts[i] for i in idx],
            golds=[p.answer] * k,
            rows=[{"id": p.id, "problem": p.problem, "answer": p.answer, **p.meta} for _ in idx],
            correct=[correct[i] for i in idx],
        )
        values = [float(v) for v in reward_fn(group)]
        if len(values) != len(idx):
            raise ValueError(f"reward {cfg.loss.reward!r} returned {len(values)} values for a group of {len(idx)}")
        for i, r in zip(idx, values):
            rewards[i] = 0.0 if ffs and seqs[i].finish_reason != "stop" else r + penalties[i]
    return correct, rewards


def score_stage(t: Trainer, ro: Rollout) -> Scores:
    correct, rewards = step_rewards(ro.batch.sequences, ro.members, ro.problems, t.tokenizer, t.cfg, t.verifier)
    return Scores(correct, rewards)


def advantage_stage(t: Trainer, ro: Rollout, sc: Scores) -> Advantages:
    """Advantages within each group (S-GRPO and FFS groups: ``r - mean r``; GRPO: optionally / std)."""
    name = t.cfg.loss.advantage or ("grpo" if t.cfg.rollout.algorithm == "grpo" else "sgrpo")
    fn = get_advantage(name)
    values = [0.0] * len(ro.batch.sequences)
    keep, zero, empty = [], 0, 0
    for idx in ro.members:
        if not idx:
            empty += 1
            continue
        rs = [sc.rewards[i] for i in idx]
        a = fn(rs, scale_std=t.cfg.loss.grpo_scale_std) if name == "grpo" else fn(rs)
        for i, v in zip(idx, a):
            values[i] = v
        if all(abs(v) < 1e-12 for v in a):
            zero += 1  # no signal: left out of the update, counted
        else:
            keep.extend(idx)
    return Advantages(values, keep, zero, empty)


def learner_masks(t: Trainer, ro: Rollout, sc: Scores, adv: Advantages) -> list[list[int]]:
    """Loss masks of the kept sequences: full rollouts train on every token, exit branches on their
    answer (nothing for a wrong one with ``loss.exit_answers: correct_only``)."""
    seqs, which = ro.batch.sequences, t.cfg.loss.exit_answers
    return [
        [1] * len(seqs[i].regions) if seqs[i].is_full else exit_branch_mask(seqs[i].regions, sc.correct[i], which)
        for i in adv.keep
    ]


def learn_stage(t: Trainer, ro: Rollout, sc: Scores, adv: Advantages, layered=None) -> dict:
    """The policy update over the sequences that carry a signal (and, with ``layered`` - joint
    training's ``LayerRollout`` - and ``layers.policy_loss``, the layer variants' answers under their
    plans, a loss term of their own); ``learn/*`` metrics and ``layers/policy_sequences``."""
    stats = {}
    t.raw_model.train()
    seqs = [ro.batch.sequences[i] for i in adv.keep]
    lb = build_learner_batch(seqs, [adv.values[i] for i in adv.keep], learner_masks(t, ro, sc, adv))
    extra = None
    if layered is not None and t.cfg.layers.policy_loss:
        from rl.trainer.layer_stage import variant_learner_batch

        extra = variant_learner_batch(layered, sum(map(sum, lb.mask)), t.cfg.layers.policy_coef)
    if adv.keep or extra is not None or t.update.accelerator.num_processes > 1:  # all ranks enter learn()
        stats = learn(t.update, lb + extra if extra is not None else lb)
    t.raw_model.eval()
    if layered is not None:
        stats["layers/policy_sequences"] = len(extra) if extra is not None else 0
    return stats


def sync_stage(t: Trainer) -> None:
    """Push the learner's weights to the rollout engine (the HF backend shares them already) in the
    checkpoint's names and layouts, which vLLM's loader reads; in joint training the routers' too,
    as ``routers.*`` (the names the routed engines read)."""
    if t.cfg.rollout.backend != "hf":
        from rl.trainer.checkpoint import ROUTERS_ATTR
        from rollout.weight_sync import policy_weights

        t.backend.load_weights(policy_weights(t.raw_model, routers_attr=ROUTERS_ATTR, checkpoint_format=True))


def rollout_metrics(t: Trainer, ro: Rollout, sc: Scores) -> dict:
    open_id, close_id = think_tag_ids(t.tokenizer)
    seqs = ro.batch.sequences
    # the full rollouts (FFS groups: the finishers; the aborted ones are counted in rollout/aborted)
    ffs = t.cfg.rollout.algorithm == "ffs"
    full = [(s, c) for s, c in zip(seqs, sc.correct) if s.is_full and not (ffs and s.finish_reason != "stop")]
    think = [thinking_span(s.completion_ids, open_id, close_id) for s, _ in full]
    earliest = [
        min(seqs[i].exit_position for i in idx if sc.correct[i])
        for idx in ro.members
        if any(sc.correct[i] for i in idx)
    ]
    extra = {"rollout/aborted": ro.batch.stats["aborted"]} if "aborted" in ro.batch.stats else {}
    return {
        **extra,
        "reward/mean": statistics.mean(sc.rewards) if sc.rewards else 0.0,
        "rollout/accuracy": sum(c for _, c in full) / max(1, len(full)),
        "rollout/think_tokens": statistics.mean(e - s for s, e, _ in think) if think else 0.0,
        "rollout/completion_tokens": statistics.mean(len(s.completion_ids) for s, _ in full) if full else 0.0,
        "rollout/unclosed_thinking": sum(1 for _, _, closed in think if not closed),
        "rollout/earliest_correct_exit": statistics.mean(earliest) if earliest else float("nan"),
        "rollout/member_accuracy": sum(sc.correct) / max(1, len(sc.correct)),
    }


def training_step(t: Trainer, problems: list[Problem], step: int) -> dict:
    """rollout -> score -> advantages -> learn -> sync; returns the step's metrics."""
    clock = StageClock()
    with clock("rollout"):
        ro = rollout_stage(t, problems, step)
    with clock("reward"):
        sc = score_stage(t, ro)
    adv = advantage_stage(t, ro, sc)
    layered, lr = {}, None
    if t.routers is not None:
        from rl.trainer import layer_stage as ls

        with clock("layer_rollout"):
            lr = ls.layer_rollout(t, ro, step)
        layered = dict(lr.stats)
    with clock("learn"):
        learned = learn_stage(t, ro, sc, adv, lr)
    if t.routers is not None:
        with clock("router_step"):
            layered.update(ls.router_step(t, lr))
    with clock("sync"):
        sync_stage(t)

    s, seqs = clock.seconds, ro.batch.sequences
    gen_tokens = ro.batch.stats["full_tokens"] + ro.batch.stats["branch_tokens"]
    learn_tokens = sum(len(seqs[i].prompt_ids) + len(seqs[i].completion_ids) for i in adv.keep)
    if layered:  # every generated token at its share of the layers (token rollouts run all of them)
        layered["compute/layer_tokens"] = gen_tokens + layered.pop("compute/variant_layer_tokens")
        layered["compute/tokens"] = gen_tokens + layered["layers/answer_tokens"]
    return {
        **rollout_metrics(t, ro, sc),
        **learned,
        **layered,
        "groups/zero_advantage": adv.zero_groups,
        "groups/empty": adv.empty_groups,
        "groups/sequences": len(seqs),
        "rollout/tokens": gen_tokens,  # generated this step: full rollouts + exit answers (aborted up to the abort)
        "perf/rollout_tokens_per_s": gen_tokens / max(1e-9, s["rollout"]),
        "perf/learn_tokens_per_s": learn_tokens / max(1e-9, s["learn"]),
        **{f"time/{k}_s": v for k, v in s.items()},
    }
