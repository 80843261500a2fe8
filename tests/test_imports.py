import subprocess
import sys


def test_third_party_imports_with_our_kernels_package():
    """Our top-level `kernels` package must not confuse transformers' probe for HF's `kernels`."""
    code = (
        "import kernels, transformers, trl, peft, accelerate;"
        "from transformers import AutoModelForCausalLM;"
        "import vllm;"
        "from kernels.fused_logprob import fused_logprob;"
        "print('imports-ok', kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "imports-ok" in out.stdout, out.stderr[-3000:]
    assert "/kernels/__init__.py" in out.stdout
