"""Checkpoints that lose nothing: written to a temporary folder then renamed into place (a crash
mid-write leaves the previous checkpoint intact), keep-last-k, and a resume that restores model,
optimiser, scheduler, every RNG, the data position and the step.

Layout: ``<out>/checkpoints/step-000012/{model/, trainer_state.pt, meta.json}``; the newest
complete one is found by listing (a folder is complete once renamed from ``*.tmp``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step-"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(out_dir)
    if not root.exists():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp") and (p / "meta.json").exists()
    ]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    data_state: dict,
    extra: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``step-N`` atomically; prune to the newest ``keep_last``."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "data": data_state,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> tuple[dict, dict]:
    """(trainer_state, meta) of a checkpoint."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    meta = json.loads((ckpt / "meta.json").read_text())
    return state, meta
