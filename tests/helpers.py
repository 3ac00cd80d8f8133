"""Helpers shared by several test modules (fixtures live in conftest.py). A test module imports
from here, never from another test module."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.adapters import Factor

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely", "fun", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "grim"]
NEUTRAL = ["movie", "film", "plot", "actor", "scene", "story", "the", "a", "was", "is", "very", "quite"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]


def make_sentences(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(NEUTRAL, size=4)) + list(rng.choice(POSITIVE if label else NEGATIVE, size=2))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i % 7}", "label": label})
    return pd.DataFrame(rows)


def tiny_tree(model_dir: Path, data: Path, run_root: Path, **sections: dict) -> dict:
    """A config tree for a fast run on the tiny model; sections update the defaults."""
    tree = {
        "task": {"dataset": str(data), "model": str(model_dir), "max_length": 16},
        "adapter": {"rank": 2, "alpha": 4},
        "federation": {"num_clients": 3, "rounds": 2, "local_steps": 2, "min_client_size": 20},
        "privacy": {"epsilon": 3.0, "reproducible_noise": True},  # bit-identical tests; secure noise is tested on its own
        "train": {"batch_size": 16, "lr": 0.1},
        "eval": {"batch_size": 64},
        "output": {"root": str(run_root)},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


# ---------------------------------------------------------------- IDX files (Fashion-MNIST layout)
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_folder(root: Path, n_train: int = 240, n_test: int = 60, seed: int = 0) -> Path:
    """Three learnable classes: dark, grey and bright noisy images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 3, size=n)
        images = rng.integers(0, 60, size=(n, 28, 28)) + 90 * labels[:, None, None]
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


# ---------------------------------------------------------------- the method table
# method -> roles its uploads may contain
UPLOAD_ROLES = {
    "dp-lora": {"A", "B", "head"},
    "ffa-lora": {"B", "head"},
    "rolora": {"A", "B", "head"},
    "fedsa-lora": {"A"},
    "fedsa-rslora": {"A"},
    "fedsa-vera": {"A"},  # VeRA's lambda_d
    "la-lora": {"A", "B", "head"},
    "as-lora": {"A", "B", "head", "score"},  # per-layer scores under score/<layer>/<factor>
    "fedex-lora": {"A", "B", "head"},
    "flora": {"A", "B", "head"},
    "fedsvd": {"B", "head"},
    "head-only": {"head"},
}
# method -> config sections it needs beyond the tiny defaults
NEEDS = {"fedsa-rslora": {"adapter": {"rslora": True}}, "fedsa-vera": {"adapter": {"type": "vera"}}}

# a three-layer factor table for plan-level tests (AS-LoRA)
FACTORS = [Factor(f"l{i}.{r}", f"l{i}", i, r) for i in range(3) for r in ("A", "B")] + [Factor("head.w", "head", None, "head")]


@dataclass
class Spy:
    """Wraps a schedule; records the parameters before each step and the tensors noised at it."""

    inner: object
    adapted: object
    snaps: list = field(default_factory=list)
    noised: list = field(default_factory=list)

    def active(self, plan, step):
        return self.inner.active(plan, step)

    def transform(self, grads, plan, step):
        self.snaps.append(self.adapted.state())
        self.noised.append(set(grads))
        return self.inner.transform(grads, plan, step)


# ---------------------------------------------------------------- what a finished short run shows
def check_short_run(summary: dict, rounds: int, n_test: int, target_epsilon: float | None = None) -> list[dict]:
    """A short run finished every round, its accuracy is a rate over the ``n_test`` test examples
    and the summary's is the last round's, each round spent privacy (within the target), and the
    adapter was saved in PEFT's format. Returns the metrics records."""
    run = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == rounds and [r["round"] for r in records] == list(range(1, rounds + 1))
    acc = records[-1]["accuracy"]
    assert summary["final"]["accuracy"] == acc and abs(acc * n_test - round(acc * n_test)) < 1e-3, (acc, n_test)  # float32 rates
    if target_epsilon is not None:
        eps = [r["epsilon"] for r in records]
        assert 0 < eps[0] and all(a < b for a, b in zip(eps, eps[1:], strict=False)) and eps[-1] <= target_epsilon, eps
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    return records


# ---------------------------------------------------------------- tiny decoders (causal-lm)
LM_WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small", "fast"]
LM_VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", "copy", "reverse", ":", *LM_WORDS]


def write_tiny_decoder(path: Path, kind: str = "gpt2", seed: int = 0) -> Path:
    """A random-weight decoder (``gpt2``: GPT-2 with its Conv1D projections; ``llama``: q/k/v/o_proj
    and a gated MLP, grouped-query attention) and a word-level tokenizer, saved to ``path``
    (the Llama-style tokenizer adds a BOS token, as Llama's does). Nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(LM_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    common = {"vocab_size": len(LM_VOCAB), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
              "initializer_range": 0.3}  # logits of a useful scale: the frozen tied embeddings bound them
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                             **common))
    model.save_pretrained(path)
    return path


def make_pairs(n: int, seed: int = 0) -> pd.DataFrame:
    """Prompt/response pairs with a learnable rule: 'copy: a b c' -> 'a b c', 'reverse: a b c' -> 'c b a';
    the column ``kind`` (copy or reverse) can serve as a grouping label."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = list(rng.choice(LM_WORDS, size=int(rng.integers(2, 5))))
        kind = "copy" if rng.random() < 0.5 else "reverse"
        answer = words if kind == "copy" else words[::-1]
        rows.append({"prompt": f"{kind} : {' '.join(words)}", "response": " ".join(answer), "kind": kind})
    return pd.DataFrame(rows)


def lm_tree(model_dir: Path, data: Path, run_root: Path, **sections: dict) -> dict:
    """A config tree for a fast causal-lm run on a tiny decoder; sections update the defaults."""
    tree = tiny_tree(model_dir, data, run_root, **sections)
    tree["task"] = {"name": "causal-lm", "dataset": str(data), "model": str(model_dir), "max_length": 16,
                    **sections.get("task", {})}
    tree["adapter"] = {"rank": 2, "alpha": 4, **sections.get("adapter", {})}
    return tree
