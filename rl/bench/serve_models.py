"""The models ``exitrl bench serve`` serves: what users serve, the demo's trained S-GRPO policy, and the
SFT model it was trained from (the tiny reasoner).

The trained policy is the demo's own run when ``runs/demo`` holds one; else it is trained once with
the demo's recipe (``configs/tiny_sgrpo.yaml``, seed 0: the demo's S-GRPO run) into the model cache
and reused after (a killed training resumes from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny_sgrpo.yaml"
DEMO_SUMMARY = Path("runs") / "demo" / "summary.json"


def demo_policy_run(summary: Path = DEMO_SUMMARY) -> Path | None:
    """The demo's S-GRPO run folder when its summary names one with a checkpoint, else None."""
    from rl.trainer.checkpoint import latest_checkpoint

    if not summary.is_file():
        return None
    run = (json.loads(summary.read_text()).get("runs") or {}).get("sgrpo")
    if run and Path(run).is_dir() and latest_checkpoint(Path(run)) is not None:
        return Path(run)
    return None


def trained_policy(base: Path, progress: bool = True) -> Path:
    """A run folder holding the demo's S-GRPO policy trained from ``base`` (see the module)."""
    from rl.models.tiny_reasoner import cache_root
    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config
    from rl.trainer.loop import train

    found = demo_policy_run()
    if found is not None:
        return found
    digest = hashlib.sha256(f"{base.resolve()}\n{RECIPE.read_text()}".encode()).hexdigest()[:12]
    out = Path(cache_root()) / f"sgrpo-policy-{digest}"
    if (out / "summary.json").is_file():
        return out
    if progress:
        print(f"bench serve: training the demo's S-GRPO policy once into {out} (about 10 minutes on 2 cores)")
    train(load_config(TrainConfig, RECIPE, [f"model.path={base}", f"run.out_dir={out}", "run.seed=0"]))
    return out
