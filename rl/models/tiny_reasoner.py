"""The embedded tiny reasoning model: a byte-level BPE tokenizer and a Qwen3ForCausalLM trained
from scratch by SFT on the synthetic over-thinking traces (``rl.data.synthetic_task``).

Saved in Hugging Face format (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a chat template) so transformers, PEFT and vLLM all load it.
Built once and cached under ``$EXITRL_CACHE`` (default ``~/.cache/exitrl``) in a directory named by
the hash of its recipe: change the recipe and it is rebuilt.

The build runs in a fresh Python process with pinned CPU numerics (``PINNED_NUMERICS``: MKL's
AVX2 code path whatever the processor, ATen's AVX2 kernels, a fixed thread count, deterministic
algorithms), because those are what made two builds of one recipe differ across machines: MKL picks
a different GEMM code path on Intel AVX-512 than on AMD, and ATen picks AVX-512 or AVX2 vector
kernels by CPU; each changes float rounding, and 1500 SFT steps amplify one ulp into another
model. Thread count and data order do not (checked: 1 and 2 threads give identical weights; every
generator is seeded). ``build_info.json`` records what the build ran with and the weights' hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rl.data.prompts import INSTRUCTION, build_prompt
from rl.data.synthetic_task import (
    MODULUS,
    SFT_SEED_OFFSET,
    TASKS,
    forced_exit_completion,
    generate_problems,
    untrained_spans,
)
from rl.models.numerics import BUILD_THREADS, PINNED_NUMERICS
from rollout.thinking import DEFAULT_EXIT_PROMPT

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the recheck task: share of full SFT traces showing a wrong first pass that the re-check overrules
WRONG_FIRST_PASS_FRACTION = 0.5
TASK_VERSIONS = {"recheck": 2}  # bump when a variant's SFT data changes (2: wrong first passes, masked)
RECIPE_VERSION = 3  # bump when the build code changes in a way the fields below do not capture
# (2: builds run under PINNED_NUMERICS; 3: SFT problems come from the training share only)


@dataclass
class TinyModelRecipe:
    """How the tiny reasoning model is built. Its hash names the cache directory."""

    vocab_size: int = field(default=384, metadata={"help": "BPE vocabulary size (special tokens included)"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    num_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads (head_dim = 32, vLLM needs >= 32)"})
    num_kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA)"})
    max_positions: int = field(default=1024, metadata={"help": "max sequence length"})
    sft_steps: int = field(default=1500, metadata={"help": "SFT optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "SFT sequences per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak SFT learning rate (cosine decay, 5% warmup)"})
    forced_exit_fraction: float = field(default=0.25, metadata={"help": "share of SFT traces cut by the exit prompt"})
    train_problems: int = field(default=40000, metadata={"help": "size of the SFT problem pool"})
    seed: int = field(default=0, metadata={"help": "seed for data and init"})
    task: str = field(
        default="redundant",
        metadata={
            "help": "the synthetic task's traces (rl.data.synthetic_task.TASKS): 'redundant' (steps, then "
            "redundant re-checks) or 'recheck' (a one-line first pass before the steps)"
        },
    )
    layer_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LayerSkip-style layer dropout: each SFT step skips layer l with probability "
            "layer_dropout * l / (L - 1) (never layer 0; the whole batch alike), so the model learns to "
            "tolerate skipped blocks, deep ones most"
        },
    )

    expand_from_layers: int = field(
        default=0,
        metadata={
            "help": "0: every block trained from scratch. k > 0: LLaMA-Pro block expansion - build this "
            "recipe's k-layer sibling (no layer dropout, cached like any build), give each of its blocks "
            "copies whose output projections are zero (identity blocks at first) up to num_layers, then "
            "SFT the whole model expand_steps steps at expand_lr with layer dropout"
        },
    )
    expand_steps: int = field(default=400, metadata={"help": "SFT steps after the block expansion"})
    expand_lr: float = field(default=5e-4, metadata={"help": "peak learning rate after the block expansion"})
    restart_steps: int = field(
        default=1200,
        metadata={
            "help": "SGDR warm restart: after the first cosine cycle, a second one of this many SFT steps "
            "(0 = none), continuing from this recipe's build without it (cached like any build). Some builds "
            "end the first cycle stuck (seed 0 on an Intel Xeon: 0.616 held-out, subtraction computed as "
            "addition); a 1200-step restart takes that one to 0.979 (600 steps: 0.955). In a block-expanded "
            "recipe: the restart of the base it grows from"
        },
    )
    restart_lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the warm restart"})

    def before_restart(self) -> TinyModelRecipe:
        """This recipe without its warm restart: the build the restart continues from."""
        return dataclasses.replace(self, restart_steps=0, restart_lr=1e-3)

    def base_recipe(self) -> TinyModelRecipe:
        """The k-layer model a block-expanded recipe grows from (with this recipe's warm restart: in a
        block-expanded recipe, ``restart_steps`` is its base's)."""
        return dataclasses.replace(
            self, num_layers=self.expand_from_layers, layer_dropout=0.0, expand_from_layers=0, expand_steps=400,
            expand_lr=5e-4,
        )  # fmt: skip

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["layer_dropout"] == 0:  # added later: recipes without it keep their digest (and cache)
            del fields["layer_dropout"]
        if fields["expand_from_layers"] == 0:  # likewise for the block expansion
            for k in ("expand_from_layers", "expand_steps", "expand_lr"):
                del fields[k]
        if fields["task"] == "redundant":  # likewise for the task variant
            del fields["task"]
        else:
            fields["task_version"] = TASK_VERSIONS.get(self.task, 1)
        if fields["restart_steps"] == 0:  # likewise for the warm restart
            del fields["restart_steps"], fields["restart_lr"]
        blob = json.dumps({**fields, "v": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("EXITRL_CACHE", Path.home() / ".cache" / "exitrl"))


def train_tokenizer(recipe: TinyModelRecipe, corpus: list[str]):
    """A byte-level BPE (digits split one per token) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sft_examples(recipe: TinyModelRecipe) -> list[tuple[str, str]]:
    """(prompt_text_messages_content, completion) pairs: reference traces plus forced exits."""
    rng = random.Random(recipe.seed)
    if recipe.task not in TASKS:
        raise ValueError(f"unknown task {recipe.task!r}; known: {sorted(TASKS)}")
    problems = generate_problems(
        recipe.train_problems, seed=SFT_SEED_OFFSET + recipe.seed, config=TASKS[recipe.task], prefix="train"
    )
    out = []
    for p in problems:
        if p.first_pass and rng.random() < WRONG_FIRST_PASS_FRACTION:
            # a wrong first pass the re-check overrules (context only: untrained_spans masks it)
            wrong = rng.choice([v for v in range(MODULUS) if str(v) != p.answer])
            p = dataclasses.replace(p, shown_first_pass=wrong)
            out.append((p.problem, p.completion()))
            continue
        if rng.random() < recipe.forced_exit_fraction:
            lines = p.thinking().split("\n")
            cut_lines = rng.randint(0, len(lines) - 1)
            cut_chars = len("\n".join(lines[: cut_lines + 1]))
            if cut_chars > 0 and not p.thinking()[:cut_chars].endswith("\n"):
                cut_chars += 1  # keep the newline: exits after a whole line
            out.append((p.problem, forced_exit_completion(p, cut_chars)))
        else:
            out.append((p.problem, p.completion()))
    return out


def _encode_examples(tokenizer, examples: list[tuple[str, str]]) -> list[tuple[list[int], int, list[int]]]:
    """Token ids of prompt+completion+<|im_end|>, the number of prompt tokens, and the positions left
    out of the loss (tokens overlapping ``untrained_spans`` of the completion)."""
    prompts = [build_prompt(tokenizer, p) for p, _ in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    comp = tokenizer([c + "<|im_end|>" for _, c in examples], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for a, b, offsets, (_, c) in zip(p_ids, comp["input_ids"], comp["offset_mapping"], examples):
        spans = untrained_spans(c)
        masked = [len(a) + t for t, (s, e) in enumerate(offsets) if any(s < e2 and e > s2 for s2, e2 in spans)]
        out.append((a + b, len(a), masked))
    return out


def _sft(model, encoded, recipe: TinyModelRecipe, pad_id: int, log_every: int = 50) -> list[float]:
    from tqdm import tqdm

    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, recipe.sft_steps // 20)

    def lr_at(s: int) -> float:
        if s < warm:
            return recipe.lr * (s + 1) / warm
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, recipe.sft_steps - warm)))

    # bucket by length so a batch holds similar lengths (less padding, faster on CPU)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    buckets = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
    losses = []
    model.train()
    bar = tqdm(range(recipe.sft_steps), desc="SFT tiny model", mininterval=5)
    for step in bar:
        idx = buckets[int(torch.randint(len(buckets), (1,), generator=g))]
        seqs = [encoded[i] for i in idx]
        T = max(len(s) for s, _, _ in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, (s, n_prompt, untrained) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, n_prompt : len(s)] = torch.tensor(s[n_prompt:])
            labels[r, untrained] = -100
            attn[r, : len(s)] = 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        if recipe.layer_dropout > 0:
            loss = _layer_dropout_loss(model, ids, attn, labels, recipe.layer_dropout, g)
        else:
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")
    model.eval()
    return losses


def layer_dropout_plan(num_layers: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """One step's plan [L]: layer l skipped (0) with probability rate * l / (L - 1), else run (1)."""
    p_skip = rate * torch.arange(num_layers, dtype=torch.float) / max(1, num_layers - 1)
    return (torch.rand(num_layers, generator=generator) >= p_skip).long()


def _layer_dropout_loss(model, ids, attn, labels, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Next-token loss of one batch under a sampled layer-dropout plan (the routed forward)."""
    from rollout.routing.routed_model import RoutedModel

    routed = RoutedModel(model, mode="grouped")
    plan = layer_dropout_plan(routed.num_layers, rate, generator).expand(ids.shape[0], -1)
    logits = routed(ids, attn, plan=plan).logits  # [B, T, V]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _same_tokenizer(base_dir: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(base_dir).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"{base_dir}: its tokenizer differs from this recipe's (same seed and data expected)")


def expand_blocks(model, num_layers: int):
    """LLaMA-Pro block expansion: ``num_layers`` blocks from the model's k, block i a copy of block
    ``i * k // num_layers``; every copy after the first of a block has its attention output and MLP
    down projections zeroed, so it adds nothing to the residual stream and the expanded model
    computes exactly what the k-layer one did, until training gives the new blocks work."""
    import copy

    layers = model.model.layers
    k = len(layers)
    if num_layers < k:
        raise ValueError(f"block expansion grows a model: {num_layers} layers < its {k}")
    new = []
    for i in range(num_layers):
        src = i * k // num_layers
        block = copy.deepcopy(layers[src])
        if i > 0 and (i - 1) * k // num_layers == src:  # not the first copy of block src
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
        block.self_attn.layer_idx = i
        new.append(block)
    model.model.layers = torch.nn.ModuleList(new)
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[0]] * num_layers
    return model


def build_tiny_model(
    recipe: TinyModelRecipe | None = None, out_dir: str | Path | None = None, force: bool = False
) -> Path:
    """Build (or reuse from cache) the tiny reasoning model; returns its directory.

    The build itself runs in a child process under ``PINNED_NUMERICS`` (see the module docstring)."""
    recipe = recipe or TinyModelRecipe()
    out = Path(out_dir) if out_dir else cache_root() / f"tiny-reasoner-{recipe.digest()}"
    if (out / "build_info.json").exists() and not force:
        return out
    env = {**os.environ, **PINNED_NUMERICS}
    cmd = [
        sys.executable,
        "-m",
        "rl.models.tiny_reasoner",
        "--out",
        str(out),
        "--recipe",
        json.dumps(dataclasses.asdict(recipe)),
    ]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not (out / "build_info.json").exists():
        raise RuntimeError(f"building the tiny reasoner into {out} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return out


def weights_digest(model) -> str:
    """sha256 (12 hex digits) of the parameters' bytes in order: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def numerics_info() -> dict:
    """What this process computes with (recorded in ``build_info.json``)."""
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(recipe: TinyModelRecipe, out: Path) -> Path:
    """The build proper (run by ``build_tiny_model`` in a child process with pinned numerics)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t0 = time.time()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    examples = sft_examples(recipe)
    corpus = (
        [p for p, _ in examples[:4000]]
        + [c for _, c in examples[:4000]]
        + [INSTRUCTION, DEFAULT_EXIT_PROMPT, "user\nassistant\n"]
    )
    tokenizer = train_tokenizer(recipe, corpus)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if config.head_dim < 32:
        raise ValueError(f"head_dim {config.head_dim} < 32: vLLM cannot load it; raise hidden_size or lower num_heads")
    encoded = _encode_examples(tokenizer, examples)
    if recipe.expand_from_layers:  # its restart_steps is its base's (the expansion SFT is its own second cycle)
        base_dir = build_tiny_model(recipe.base_recipe())
        _same_tokenizer(base_dir, tokenizer)
        model = expand_blocks(Qwen3ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32), recipe.num_layers)
        tune = dataclasses.replace(recipe, sft_steps=recipe.expand_steps, lr=recipe.expand_lr)
        losses = _sft(model, encoded, tune, tokenizer.pad_token_id)
    elif recipe.restart_steps:
        base_dir = build_tiny_model(recipe.before_restart())
        model = Qwen3ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        _same_tokenizer(base_dir, tokenizer)
        tune = dataclasses.replace(recipe, sft_steps=recipe.restart_steps, lr=recipe.restart_lr)
        losses = _sft(model, encoded, tune, tokenizer.pad_token_id)
    else:
        model = Qwen3ForCausalLM(config)
        losses = _sft(model, encoded, recipe, tokenizer.pad_token_id)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "digest": recipe.digest(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.time() - t0, 1),
        "final_sft_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "weights_sha256": weights_digest(model),
        "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()[:12],
        "numerics": numerics_info(),
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def deep_recipe(seed: int = 0) -> TinyModelRecipe:
    """The tiny reasoner with layers to spare (the layer level's model): the 4-block reasoner of the
    same seed grown to 8 blocks by LLaMA-Pro block expansion, then trained with layer dropout so
    easy problems tolerate skipped blocks. (Trained from scratch, 8 blocks learn the arithmetic far
    slower: SFT loss 0.69 vs 0.41 for 4 blocks after 400 steps, and 1500 steps of it with layer
    dropout 0.2 gave 14 % held-out accuracy.)"""
    # grows from the demo's 4-block build (warm restart included); restart_steps=0 gives the earlier
    # deep build (digest 08930be5e116, grown from the first cycle alone: 0.883 held-out)
    return TinyModelRecipe(num_layers=8, layer_dropout=0.2, expand_from_layers=4, seed=seed)


def resolve_model_path(path: str) -> str:
    """A model directory or hub id; ``tiny`` is the embedded tiny reasoner, ``tiny-deep`` its 8-layer
    sibling for the layer level (each built on first use)."""
    if path == "tiny":
        return str(build_tiny_model())
    if path == "tiny-deep":
        return str(build_tiny_model(deep_recipe()))
    return path


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="build the tiny reasoner (run by build_tiny_model under pinned numerics)")
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--recipe", required=True, help="TinyModelRecipe fields as JSON")
    args = ap.parse_args(argv)
    _build(TinyModelRecipe(**json.loads(args.recipe)), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
