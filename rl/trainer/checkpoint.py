"""Checkpoints that lose nothing: written to a temporary folder then renamed into place (a crash
mid-write leaves the previous checkpoint intact), keep-last-k, and a resume that restores model,
optimiser, scheduler, every rank's RNG, the data position and the step.

Layout: ``<out>/checkpoints/step-000012/{model/, optimizer/, trainer_state.pt, rng.rank-K.pt,
meta.json}``; the newest complete one is found by listing (a folder is complete once renamed from
``*.tmp``). Every rank takes part in a save: ``model/`` is a plain Hugging Face folder (a sharded
learner's full weights gathered to rank 0), ``optimizer/`` a ``torch.distributed.checkpoint`` in
which each rank writes its own shard of the optimizer state (FSDP2 / ZeRO-style sharding; the whole
state for a single process or DDP) and reads it back on resume. Joint training's routers (a
submodule of the policy, ``ROUTERS_ATTR``) are saved beside the weights as ``model/routers.*``
(the routed-model layout ``LayerRouters.load`` reads) and kept out of ``model.safetensors``, so the
folder stays a plain model that transformers and vLLM load; their optimizer state is in
``optimizer/`` with the rest.
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
ROUTERS_ATTR = "exit_routers"  # joint training: the routers' place on the policy model


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


def _is_sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def complete_adamw_state(optimizer) -> None:
    """Give every parameter of an AdamW its (zero) state. A parameter group that has not stepped
    yet (joint training: the routers step before the policy has a signal, or the other way round)
    has no state, and a resumed run's fresh optimizer expects one for every parameter; AdamW treats
    step 0 with zero moments exactly as no state."""
    opt = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(opt, torch.optim.AdamW) or not opt.state:
        return  # all empty: torch.distributed.checkpoint initialises it whole
    for group in opt.param_groups:
        for p in group["params"]:
            if p not in opt.state or not opt.state[p]:
                st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
                opt.state[p] = st


def _optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    complete_adamw_state(optimizer)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer))


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
    rank: int = 0,
    barrier=lambda: None,
) -> Path:
    """Write ``step-N`` atomically; prune to the newest ``keep_last``. Called on every rank
    (``barrier`` waits for all of them); rank 0 writes the shared files and renames."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_dir(out_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if _is_sharded(model) and getattr(model, ROUTERS_ATTR, None) is not None:
        raise NotImplementedError("saving routers of a sharded (FSDP) policy")
    if _is_sharded(model):  # gathered in one collective on all ranks; rank 0 writes it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(tmp / "model", state_dict=full, safe_serialization=True)
    elif rank == 0:
        routers = getattr(model, ROUTERS_ATTR, None)
        if routers is None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            weights = {k: v for k, v in model.state_dict().items() if not k.startswith(ROUTERS_ATTR + ".")}
            model.save_pretrained(tmp / "model", state_dict=weights, safe_serialization=True)
            routers.save(tmp / "model")
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    dcp.save({"optimizer": _optimizer_state(model, optimizer)}, checkpoint_id=str(tmp / "optimizer"))
    torch.save(rng_state(), tmp / f"rng.rank-{rank}.pt")
    barrier()
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "data": data_state}, tmp / "trainer_state.pt")
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
    barrier()
    return final


def load_trainer_state(ckpt: Path, rank: int = 0) -> tuple[dict, dict]:
    """(trainer_state, meta) of a checkpoint; ``trainer_state["rng"]`` is this rank's RNG (rank 0's
    when the run had fewer ranks)."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    rng = ckpt / f"rng.rank-{rank}.pt"
    state["rng"] = torch.load(rng if rng.exists() else ckpt / "rng.rank-0.pt", weights_only=False)
    meta = json.loads((ckpt / "meta.json").read_text())
    return state, meta


def load_optimizer(ckpt: Path, model, optimizer) -> None:
    """Every rank reads its own shard of the optimizer state (re-sharded if the world size changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = {"optimizer": _optimizer_state(model, optimizer)}
    dcp.load(state, checkpoint_id=str(ckpt / "optimizer"))
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])
