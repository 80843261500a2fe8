"""Which implementation a fused kernel runs: the exact torch path or Triton."""

import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]


def pick_backend(backend: Backend, x: torch.Tensor) -> str:
    """'auto' -> Triton on CUDA when installed, else torch; 'triton' on CPU needs TRITON_INTERPRET=1."""
    if backend == "auto":
        if x.is_cuda:
            try:
                import triton  # noqa: F401

                return "triton"
            except ImportError:
                return "torch"
        return "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend {backend!r}: expected 'auto', 'torch' or 'triton'")
    return backend
