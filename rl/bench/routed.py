"""``exitrl bench routed``: routed generation (grouped execution, plans from the routers) against the
full model on the same prompts, in one run.

Every row decodes exactly ``max_tokens`` tokens (EOS ignored), so each variant does the same number
of decode steps whatever its plans make it write: the wall times compare per-token work. Reported:
``layer_fraction`` (executed passes / L, mean over rows), ``time_ratio`` (routed / full model through
the same decoding loop), ``time_ratio_vs_hf_generate`` (routed / ``model.generate``, the loop a user
would otherwise run) and the masked reference's ratio (it computes every layer: about 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _routers_dir(routers: str | None) -> Path:
    routers_dir = Path(routers or "runs/routers/routers")
    if not (routers_dir / "routers.safetensors").exists():
        raise FileNotFoundError(f"{routers_dir}: no routers.safetensors (exitrl routers label && exitrl routers train)")
    return routers_dir


def main(
    model: str = "tiny-deep",
    routers: str | None = None,
    n_prompts: int = 64,
    max_tokens: int = 200,
    backend: str = "hf",
    repeats: int = 2,
) -> dict:
    from rl.data.problems import DataConfig, Problem, encode_prompts
    from rl.data.synthetic_task import heldout_problems
    from rl.routing.pipeline import load_model
    from rollout.routing.routed_generation import left_pad, routed_generate
    from rollout.routing.routed_model import RoutedModel
    from rollout.routing.routers import LayerRouters

    if backend == "vllm":
        return main_vllm(model, routers, n_prompts, max_tokens, repeats)
    if backend != "hf":
        raise ValueError(f"bench routed: --backend hf or vllm, not {backend!r}")
    routers_dir = _routers_dir(routers)
    lm, tok, resolved = load_model(model)
    r = LayerRouters.load(routers_dir)
    problems = [Problem(p.id, p.problem, p.answer) for p in heldout_problems(n_prompts)]
    prompts = encode_prompts(tok, problems, DataConfig())
    kw = dict(max_tokens=max_tokens, eos_ids={-1}, pad_id=tok.pad_token_id)
    full = RoutedModel(lm, mode="grouped")
    grouped = RoutedModel(lm, r, mode="grouped")
    masked = RoutedModel(lm, r, mode="masked")
    ids, attn = left_pad(prompts, tok.pad_token_id, "cpu")
    plans = grouped.decide_plans(ids, attn)

    def hf_generate():
        with torch.no_grad():
            lm.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    t_full = _timed(lambda: routed_generate(full, prompts, **kw), repeats)
    t_grouped = _timed(lambda: routed_generate(grouped, prompts, **kw), repeats)
    t_masked = _timed(lambda: routed_generate(masked, prompts, **kw), repeats)
    t_hf = _timed(hf_generate, repeats)
    L = full.num_layers
    layer_fraction = float(plans.sum(1).float().mean()) / L
    return {
        "model": resolved,
        "routers": str(routers_dir),
        "prompts": n_prompts,
        "tokens_per_row": max_tokens,
        "num_layers": L,
        "layer_fraction": round(layer_fraction, 4),
        "distinct_plans": len({tuple(p) for p in plans.tolist()}),
        "layers_run_by_no_row": int((plans == 0).all(0).sum()),
        "seconds": {"full": t_full, "routed_grouped": t_grouped, "routed_masked": t_masked, "hf_generate": t_hf},
        "time_ratio": round(t_grouped / t_full, 4),
        "time_ratio_vs_hf_generate": round(t_grouped / t_hf, 4),
        "masked_time_ratio": round(t_masked / t_full, 4),
        "full_loop_vs_hf_generate": round(t_full / t_hf, 4),
        "bar": {"time_ratio <= layer_fraction + 0.15": t_grouped / t_full <= layer_fraction + 0.15},
    }


def main_vllm(
    model: str = "tiny-deep", routers: str | None = None, n_prompts: int = 64, max_tokens: int = 200, repeats: int = 2
) -> dict:
    """``--backend vllm``: the routed export (``ExitrlRoutedQwen3ForCausalLM``) against the plain
    export of the same model on the same prompts, each engine in its own process. Plans are decided
    in the engine (``VLLMBackend.decide_plans``, one prefill per prompt, timed as ``decide_s``), then
    generated grouped by plan (``generate_routed``: one engine call per plan)."""
    import json
    import subprocess
    import sys
    import tempfile

    from rl.models.tiny_reasoner import resolve_model_path
    from rl.serving.export import export

    routers_dir = _routers_dir(routers)
    resolved = resolve_model_path(model)
    res = {}
    with tempfile.TemporaryDirectory(prefix="exitrl-bench-routed-") as tmp:
        plain = export(resolved, Path(tmp) / "plain", dtype="float32")
        routed = export(resolved, Path(tmp) / "routed", dtype="float32", routers=routers_dir)
        for name, folder in (("plain", plain), ("routed", routed)):
            args = [str(folder), str(n_prompts), str(max_tokens), str(repeats)]
            p = subprocess.run([sys.executable, "-m", "rl.bench.routed", *args], capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
            if p.returncode or not line:
                raise RuntimeError(f"bench routed --backend vllm ({name}) failed:\n{p.stderr[-3000:]}")
            res[name] = json.loads(line[-1][6:])
    L = res["routed"]["num_layers"]
    plans = res["routed"]["plans"]
    layer_fraction = sum(sum(p) for p in plans) / (len(plans) * L)
    t_plain, t_routed, t_decide = res["plain"]["generate_s"], res["routed"]["generate_s"], res["routed"]["decide_s"]
    return {
        "backend": "vllm",
        "model": resolved,
        "routers": str(routers_dir),
        "prompts": n_prompts,
        "tokens_per_row": max_tokens,
        "num_layers": L,
        "layer_fraction": round(layer_fraction, 4),
        "distinct_plans": len({tuple(p) for p in plans}),
        "seconds": {"plain": t_plain, "routed": t_routed, "routed_decide": t_decide},
        "time_ratio": round(t_routed / t_plain, 4),
        "time_ratio_with_decide": round((t_routed + t_decide) / t_plain, 4),
        "bar": {"time_ratio <= layer_fraction + 0.2": t_routed / t_plain <= layer_fraction + 0.2},
    }


def _vllm_child(folder: str, n_prompts: int, max_tokens: int, repeats: int) -> None:
    import json

    from rl.data.problems import DataConfig, Problem, encode_prompts
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.factory import make_backend
    from rollout.types import SamplingConfig

    be = make_backend("vllm", folder, dtype="float32", seed=0, max_model_len=1024)
    problems = [Problem(p.id, p.problem, p.answer) for p in heldout_problems(n_prompts)]
    prompts = encode_prompts(be.tokenizer, problems, DataConfig())
    out = {"num_layers": be.num_layers, "decide_s": 0.0}
    if be.routed:
        be.decide_plans(prompts[:4])  # warm-up
        t0 = time.perf_counter()
        plans = be.decide_plans(prompts)
        out["decide_s"] = time.perf_counter() - t0
    else:
        plans = [[1] * be.num_layers for _ in prompts]
    out["plans"] = plans
    greedy = SamplingConfig(max_tokens=max_tokens, temperature=0.0)

    def run():  # every row exactly max_tokens tokens, one engine call per plan
        be.generate_routed(prompts, greedy, plans, ignore_eos=True)
        be.reset_prefix_cache()

    out["generate_s"] = _timed(run, repeats)
    print("BENCH " + json.dumps(out))


if __name__ == "__main__":
    import sys

    folder, n, t, rep = sys.argv[1:5]
    _vllm_child(folder, int(n), int(t), int(rep))
