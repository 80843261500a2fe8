"""The CPU numerics the tiny model's build (and ``exitrl demo``) pin, so two machines compute alike.

No torch import here: these must be in the environment before torch loads.
"""

# Set before torch loads in the build process: the same code paths on any x86-64 CPU with AVX2.
PINNED_NUMERICS = {
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one GEMM code path on Intel and AMD
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels: AVX2 even where AVX-512 exists
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "TOKENIZERS_PARALLELISM": "false",
}
BUILD_THREADS = int(PINNED_NUMERICS["OMP_NUM_THREADS"])
