import json

import torch

from rl.data.prompts import build_prompt
from rl.data.synthetic_task import EXIT_PROMPT, generate_problems
from rl.models.tiny_reasoner import TinyModelRecipe


def test_recipe_digest_changes_with_recipe():
    assert TinyModelRecipe().digest() == TinyModelRecipe().digest()
    assert TinyModelRecipe(sft_steps=1).digest() != TinyModelRecipe().digest()


def test_tokenizer_round_trip_and_chat_template(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    for p in generate_problems(20, seed=9):
        text = p.completion() + EXIT_PROMPT + "Ünïcode ∑ 12,345 \\frac{1}{2}"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("</think>", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("</think>")]
    prompt = build_prompt(tok, "What is 2+2?")
    assert prompt.startswith("<|im_start|>user\nWhat is 2+2?\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_model_loads_in_transformers_and_peft(quick_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    info = json.loads((quick_model_dir / "build_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(quick_model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.head_dim >= 32
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 0 < trainable < info["parameters"] // 10
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def test_build_pins_its_numerics_whatever_the_caller_runs_with(quick_model_dir, tmp_path, monkeypatch):
    """The build runs in a child process under PINNED_NUMERICS: a caller with another thread count and
    another ATen vector ISA (what differs between machines) gets the bit-identical model."""
    from rl.models.tiny_reasoner import PINNED_NUMERICS, build_tiny_model

    info = json.loads((quick_model_dir / "build_info.json").read_text())
    assert info["numerics"]["mkl_cbwr"] == PINNED_NUMERICS["MKL_CBWR"]
    assert info["numerics"]["cpu_capability"] == "AVX2"
    assert info["numerics"]["threads"] == 2 and info["numerics"]["deterministic_algorithms"] is True
    assert info["numerics"]["torch"] == torch.__version__
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    again = build_tiny_model(TinyModelRecipe(**info["recipe"]), out_dir=tmp_path / "again")
    info2 = json.loads((again / "build_info.json").read_text())
    assert info2["weights_sha256"] == info["weights_sha256"]
    assert info2["tokenizer_sha256"] == info["tokenizer_sha256"]
    assert (again / "model.safetensors").read_bytes() == (quick_model_dir / "model.safetensors").read_bytes()
