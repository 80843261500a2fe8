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

    if backend != "hf":
        raise ValueError("bench routed: only --backend hf exists until routed vLLM lands")
    routers_dir = Path(routers or "runs/routers/routers")
    if not (routers_dir / "routers.safetensors").exists():
        raise FileNotFoundError(f"{routers_dir}: no routers.safetensors (exitrl routers label && exitrl routers train)")
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
