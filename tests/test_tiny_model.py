import dataclasses
import json

import torch

from rl.data.prompts import build_prompt
from rl.data.synthetic_task import generate_problems
from rl.models.tiny_reasoner import TinyModelRecipe, deep_recipe
from rollout.thinking import DEFAULT_EXIT_PROMPT


def test_recipe_digest_changes_with_recipe():
    assert TinyModelRecipe().digest() == TinyModelRecipe().digest()
    assert TinyModelRecipe(sft_steps=1).digest() != TinyModelRecipe().digest()
    # fields added later leave older recipes' digests (and caches) alone; the expanded deep model
    # grows from exactly the demo's 4-layer build
    first_cycle = TinyModelRecipe(restart_steps=0)
    assert first_cycle.digest() == "9ebf9e194f65" == TinyModelRecipe().before_restart().digest()
    assert TinyModelRecipe().digest() != first_cycle.digest()
    # the deep model grows from exactly the demo's 4-layer build (warm restart included); without the
    # restart it is the earlier deep build, grown from the first cycle (its digest unchanged)
    deep = deep_recipe(0)
    assert deep.base_recipe().digest() == TinyModelRecipe().digest() == "f1d09fde8183"
    first_cycle_deep = dataclasses.replace(deep, restart_steps=0)
    assert first_cycle_deep.digest() == "417e57cc0245" and first_cycle_deep.base_recipe().digest() == "9ebf9e194f65"
    assert deep.digest() == "90faadfc4ded"  # recipe v3 (SFT from the training share) rebuilt every build


def test_tokenizer_round_trip_and_chat_template(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    for p in generate_problems(20, seed=9):
        text = p.completion() + DEFAULT_EXIT_PROMPT + "Ünïcode ∑ 12,345 \\frac{1}{2}"
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


def test_warm_restart_continues_from_the_build_without_it(quick_model_dir, tmp_path):
    """A recipe with restart_steps builds its first-cycle sibling (here the cached quick model) and
    trains a second cosine cycle from its weights: same tokenizer, other weights, recorded in the info."""
    from safetensors.torch import load_file

    from rl.models.tiny_reasoner import build_tiny_model

    quick = TinyModelRecipe(**json.loads((quick_model_dir / "build_info.json").read_text())["recipe"])
    assert quick.restart_steps == 0
    recipe = TinyModelRecipe(**{**quick.__dict__, "restart_steps": 6, "restart_lr": 1e-3})
    assert recipe.before_restart().digest() == quick.digest() != recipe.digest()
    out = build_tiny_model(recipe, out_dir=tmp_path / "restarted")
    info = json.loads((out / "build_info.json").read_text())
    assert info["recipe"]["restart_steps"] == 6 and info["digest"] == recipe.digest()
    assert (out / "tokenizer.json").read_bytes() == (quick_model_dir / "tokenizer.json").read_bytes()
    base, new = load_file(quick_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == new.keys()
    moved = [k for k in base if not torch.equal(base[k], new[k])]
    assert len(moved) == len(base)  # every tensor trained on in the restart (AdamW touches all)


def test_block_expansion_computes_what_the_smaller_model_did():
    """LLaMA-Pro expansion 3 -> 7 blocks: same logits and same cached greedy tokens as the 3-block
    model; the new copies start as identity blocks and train (their zeroed projections get gradients)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rl.models.tiny_reasoner import expand_blocks

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    small = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = small(input_ids=ids).logits
        want_gen = small.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    import copy

    big = expand_blocks(copy.deepcopy(small), 7).eval()
    assert len(big.model.layers) == 7 == big.config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in big.model.layers] == list(range(7))
    zeroed = [float(layer.mlp.down_proj.weight.abs().sum()) == 0 for layer in big.model.layers]
    assert zeroed == [False, True, True, False, True, False, True]  # sources 0 0 0 1 1 2 2
    with torch.no_grad():
        torch.testing.assert_close(big(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(big.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want_gen)
    big.train()
    big(input_ids=ids, labels=ids).loss.backward()
    assert float(big.model.layers[1].mlp.down_proj.weight.grad.abs().sum()) > 0
