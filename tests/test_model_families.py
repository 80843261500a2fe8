"""The routed forward against the plain model on the decoder families users post-train: tiny
random-init Qwen2 (q/k/v biases, as in R1-Distill-Qwen), Llama (R1-Distill-Llama), Mistral with a
sliding window of 8, Qwen3-MoE, and Qwen3 as the control; under eager attention (an additive mask)
and sdpa (a boolean one), left-padded, for a prefill and a cached decode step."""

from __future__ import annotations

import pytest
import torch

from rollout.routing.routed_model import RoutedCache, RoutedModel, layer_windows, positions_from_mask

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip


def _config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if family == "qwen2":
        return Qwen2Config(**COMMON)  # q/k/v biases
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=8)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return Qwen3Config(**COMMON)


def tiny_family_model(family: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(family)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is near zero: larger weights make masking mistakes visible
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _batch(T: int = 20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    return ids, mask


def _plain(model, ids, mask):
    pos = positions_from_mask(mask, ids.shape[1])
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


FAMILIES = ["qwen2", "llama", "mistral", "qwen3_moe", "qwen3"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_routed_all_execute_equals_the_plain_model(family, attn):
    model = tiny_family_model(family, attn)
    ids, mask = _batch()
    routed = RoutedModel(model)
    with torch.no_grad():
        want = _plain(model, ids, mask)
        cache = RoutedCache()
        got = routed(ids, mask, use_cache=True, cache=cache).logits
        real = mask.bool()
        assert (got - want)[real].abs().max() < 1e-4
        # one cached decode step = the plain model over the whole sequence, last column
        nxt = torch.randint(3, 97, (3, 1), generator=torch.Generator().manual_seed(2))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step = routed(nxt, mask2, cache=cache).logits[:, -1]
        full = _plain(model, torch.cat([ids, nxt], 1), mask2)[:, -1]
        assert (step - full).abs().max() < 1e-4


def test_the_sliding_window_matters_here_and_is_read_per_layer():
    """The case is real: Mistral's window of 8 changes the logits of a 20-token prompt (so the test
    above would catch a routed model that ignores it); Qwen2's layer_types put windows on some layers."""
    from transformers import Qwen2Config

    ids, mask = _batch()
    windowed = tiny_family_model("mistral", "sdpa")
    with torch.no_grad():
        a = _plain(windowed, ids, mask)
        windowed.config.sliding_window = None
        b = _plain(windowed, ids, mask)
    assert (a - b)[mask.bool()].abs().max() > 1e-2
    assert layer_windows(_config("mistral"), 3) == [8, 8, 8]
    cfg = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert layer_windows(cfg, 3) == [None, 8, 8]
    assert layer_windows(_config("qwen3"), 3) == [None, None, None]


def test_eager_attention_needs_an_additive_mask():
    """A boolean mask added to the scores masks nothing: the routed model gives eager its float mask."""
    from rollout.routing.routed_model import mask_for

    ids, mask = _batch()
    m = mask_for("eager", mask, ids.shape[1], None, torch.float32)
    assert m.dtype == torch.float32 and m[1, 0, 10, 0] == torch.finfo(torch.float32).min and m[1, 0, 10, 6] == 0
    assert mask_for("sdpa", mask, ids.shape[1], None, torch.float32).dtype == torch.bool
    assert mask_for("flash_attention_2", mask, ids.shape[1], 8, torch.float32) is mask  # it unpads the 2-D mask


@pytest.mark.parametrize("family", ["mistral", "qwen3_moe"])
def test_grouped_rows_equal_masked_rows_under_mixed_plans_with_eager(family):
    """Grouped execution slices the (float, windowed) mask per row group: the same logits as the
    masked reference under a skip / execute / repeat mix, prefill and one decode step."""
    model = tiny_family_model(family, "eager")
    ids, mask = _batch()
    plan = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 2, 1]])
    nxt = torch.randint(3, 97, (3, 1), generator=torch.Generator().manual_seed(2))
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    outs = []
    with torch.no_grad():
        for mode in ("grouped", "masked"):
            routed, cache = RoutedModel(model, mode=mode), RoutedCache()
            a = routed(ids, mask, plan=plan, cache=cache).logits
            outs.append((a, routed(nxt, mask2, cache=cache).logits))
    real = mask.bool()
    assert (outs[0][0] - outs[1][0])[real].abs().max() < 1e-4 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4
    assert (outs[0][0] - _plain(model, ids, mask))[real].abs().max() > 1e-2  # the plan changed the answer


def test_router_labels_and_routers_on_a_users_jsonl_for_a_llama_model(quick_model_dir, tmp_path):
    """``exitrl routers label`` / ``train`` on the user's data (the trainer's data.* keys: a jsonl with
    its own column names and no gold answers) for a non-Qwen3 model: every row labelled with a plan of
    the model's depth, the plans reproducing the full model's own greedy tokens, routers trained."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rollout.routing.routers import LayerRouters

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": len(tok), "num_hidden_layers": 4}))
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    rows = [
        {"uid": f"q{i}", "question": f"Start at {i}. Apply in order: 1: +{i + 1}. Work modulo 10."} for i in range(5)
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"model={tmp_path / 'llama'}", f"data.source={tmp_path / 'mine.jsonl'}", "data.problem_key=question",
        "data.answer_key=null", "data.id_key=uid", "problems=4", "max_tokens=6", "agreement_sample=2",
        "label.budget=2", "vocabulary.vocab_size=0", "train.epochs=2", "train.router_hidden=16",
    ]  # fmt: skip
    out = tmp_path / "routers"
    for cmd in ("label", "train"):
        r = subprocess.run(
            [sys.executable, "-m", "rl.cli", "routers", cmd, "--out", str(out), "--json", *overrides],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert [x["id"] for x in labels] == ["q0", "q1", "q2", "q3"] and all(len(x["plan"]) == 4 for x in labels)
    stats = json.loads((out / "label_stats.json").read_text())
    assert stats["data"] == {"source": str(tmp_path / "mine.jsonl"), "labelled": 4, "with_gold": 0}
    assert stats["agreement"]["pairs"] == 4 and stats["agreement"]["agreement"] == 1.0  # greedy = teacher forcing
    assert LayerRouters.load(out / "routers").num_layers == 4


@pytest.mark.parametrize(
    "family", ["mistral", "qwen3_moe", *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "llama"))]
)
def test_joint_training_on_the_hf_backend_for_each_family(family, quick_model_dir, tmp_path):
    """One S-GRPO step with layer routers (``layers.enabled``) on the HF backend: the policy and the
    routers learn on a tiny model of each family (rewards: members alternately right), and the run
    checkpoints both."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config
    from rl.trainer.loop import train
    from tests.conftest import ROOT

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    cfg = _config(family)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    overrides = [
        f"model.path={tmp_path / 'm'}", f"run.out_dir={tmp_path / 'run'}", "run.steps=1", "run.save_every=1",
        "run.eval_every=0", "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.max_tokens=12",
        "rollout.serial.num_exits=2", "rollout.serial.answer_max_tokens=4", "layers.enabled=true",
        "layers.variants=2", "layers.answer_max_tokens=4", "optim.warmup_steps=0",
        "loss.reward=tests.test_vllm_routed_families:alternating",
    ]  # fmt: skip
    train(load_config(TrainConfig, ROOT / "configs" / "tiny_sgrpo.yaml", overrides))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["learn/micro_batches"] > 0 and row["layers/executed_mean"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "model" / "routers.safetensors").exists()
