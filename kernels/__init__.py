"""Fused kernels: log-probs from hidden states, exit-head / router computation (Triton on GPU, exact torch on CPU)."""
