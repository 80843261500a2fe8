"""``exitrl bench trainer --profile``: where one training step's time goes, ours and TRL's, from
``torch.profiler``.

The same library entry points are labelled in both trainers (``record_function`` ranges put in
around them before either trainer is built), so the stages mean the same work on both sides:

    generation/prefill   decoder forward without grad and without a KV cache yet
    generation/decode    decoder forward without grad on a filled KV cache
    generation/other     the rest of ``generate`` (sampling, logits processors, stopping) and, for
                         ours, reading the rows back (sampler log-probs)
    reward               the verifier (ours: ``BatchVerifier.verify``; TRL: its reward function)
    learner/forward      the policy loss's forward (ours: ``PolicyLogprobs.forward``; TRL:
                         ``GRPOTrainer.compute_loss``) and any no-grad log-prob pass
    learner/backward     ``Tensor.backward`` (TRL's gradient-checkpointing recompute included)
    optimizer            gradient clipping + ``Optimizer.step``
    sync                 weights pushed into a vLLM engine (ours: ``VLLMBackend.load_weights``; TRL:
                         ``VLLMGeneration.sync_weights``)
    other                the step's wall time minus the stages above

With vLLM generation (``--backend vllm``) the engine's prefill and decode are not split: its
whole ``generate`` (or our streaming serial group) is ``generation/other``.

Only the second step is profiled (the first pays warm-up). The profiler's per-op overhead inflates
every stage, so read the shares, not the seconds; the step times of ``bench trainer`` come from an
unprofiled run.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

PREFIX = "stage::"
STAGES = (
    "generation/prefill",
    "generation/decode",
    "generation/other",
    "reward",
    "learner/forward",
    "learner/backward",
    "optimizer",
    "sync",
)


def _labelled(fn, label):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(PREFIX + (label(a, k) if callable(label) else label)):
            return fn(*a, **k)

    return wrapper


def _decoder_label(args, kwargs) -> str:
    if torch.is_grad_enabled():
        return "learner/forward-decoder"
    cache = kwargs.get("past_key_values")
    filled = cache is not None and cache.get_seq_length() > 0
    if filled:
        return "generation/decode"
    return "generation/prefill" if kwargs.get("use_cache") or cache is not None else "learner/forward-decoder"


class StepProfiler:
    """Install with ``with StepProfiler() as sp:`` before the trainer is built; call ``sp.step()``
    at the end of every training step; read ``sp.summary()`` afterwards."""

    def __init__(self, extra: list[tuple[object, str, str]] = (), vllm: bool = False):
        from transformers import GenerationMixin
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

        if vllm:
            from vllm import LLM

            extra = [*extra, (LLM, "generate", "generation")]
        self.targets = [
            (Qwen3Model, "forward", _decoder_label),
            (GenerationMixin, "generate", "generation"),
            (torch.Tensor, "backward", "learner/backward"),
            (torch.optim.AdamW, "step", "optimizer/step"),
            (torch.nn.utils, "clip_grad_norm_", "optimizer/clip"),
            *extra,
        ]
        self._saved: list[tuple[object, str, object]] = []
        self._step_range = None
        self.prof = profile(
            activities=[ProfilerActivity.CPU],
            schedule=schedule(skip_first=1, wait=0, warmup=0, active=1, repeat=1),
        )

    def __enter__(self):
        for owner, attr, label in self.targets:
            fn = owner.__dict__.get(attr, getattr(owner, attr))
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, _labelled(fn, label))
        self.prof.__enter__()
        self.begin_step()
        return self

    def begin_step(self):
        self._step_range = record_function(PREFIX + "step")
        self._step_range.__enter__()

    def step(self):
        """End of a training step: close its range, advance the profiler's schedule, open the next."""
        with contextlib.suppress(Exception):
            self._step_range.__exit__(None, None, None)
        self.prof.step()
        self.begin_step()

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self._step_range.__exit__(None, None, None)
        self.prof.__exit__(*exc)
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)

    def summary(self, top: int = 12) -> dict:
        """Stage seconds of the profiled step, their shares, and the top ops by self CPU time."""
        ev = self.prof.key_averages()
        total = {e.key[len(PREFIX) :]: e.cpu_time_total / 1e6 for e in ev if e.key.startswith(PREFIX)}
        step = total.get("step", 0.0)
        prefill, decode = total.get("generation/prefill", 0.0), total.get("generation/decode", 0.0)
        stages = {
            "generation/prefill": prefill,
            "generation/decode": decode,
            "generation/other": max(0.0, total.get("generation", 0.0) - prefill - decode)
            + total.get("generation/readback", 0.0),
            "reward": total.get("reward", 0.0),
            "learner/forward": total.get("learner/forward", 0.0) or total.get("learner/forward-decoder", 0.0),
            "learner/backward": total.get("learner/backward", 0.0),
            "optimizer": total.get("optimizer/step", 0.0) + total.get("optimizer/clip", 0.0),
            "sync": total.get("sync", 0.0),
        }
        stages["other"] = max(0.0, step - sum(stages.values()))
        ops = sorted((e for e in ev if not e.key.startswith(PREFIX)), key=lambda e: -e.self_cpu_time_total)
        return {
            "step_s": round(step, 3),
            "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "stages_share": {k: round(v / step, 3) if step else 0.0 for k, v in stages.items()},
            "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops[:top]},
        }
