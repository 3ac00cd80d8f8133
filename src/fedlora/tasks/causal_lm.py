"""Causal language modelling on prompt/response pairs (instruction tuning) for decoder models.

Model: any ``AutoModelForCausalLM`` (a name, or a local folder): GPT-2, Llama, Qwen, Mistral,
... LoRA goes on its attention projections through PEFT (``adapter.target_modules: [auto]``, the
default for this task, picks PEFT's per-architecture list: ``c_attn`` for GPT-2, ``q_proj`` and
``v_proj`` for Llama-style models; name any others, e.g. the MLP's ``up_proj``/``down_proj``).
There is no classification head: the head role does not arise.

Data: a local JSON/JSONL/CSV/parquet file (or a folder of ``train.*``/``test.*``), or a
``datasets`` name, with a prompt column and a response column (``task.prompt_column``,
``task.response_column``). The prompt is written through ``task.prompt_template`` and the
response gets the tokenizer's end-of-sequence token, so the model learns to stop. An optional
grouping column (``task.label_column``, e.g. an instruction category) becomes the label the
Dirichlet partition splits by; without one every example is in one group (the split is then a
size skew only).

Loss: the response tokens only (prompt and padding are masked out). The per-example loss is the
**mean** over that example's response tokens: the unit of privacy is one example whatever its
length, and per-example clipping bounds the gradient of all its tokens together; with the mean, a
long response does not get a larger gradient (and so more clipping) than a short one before the
clip, and the non-private loss is the usual per-example average.

Evaluation (held-out split): ``loss`` is the mean negative log-likelihood per response token
(``perplexity`` = exp(loss)), ``token_accuracy`` the share of response tokens whose argmax is
the reference token, and ``exact_match`` the share of examples whose greedy generation equals
the reference response (end-of-sequence included). Greedy decoding reproduces the reference
exactly if and only if, teacher-forced on the reference, every response position's argmax is the
reference token, so exact match is read off the same forward pass as the loss (ties aside). The
federation's ``accuracy`` is this exact match (as the QA task's ``accuracy`` is its exact match).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedlora.devices import to_device
from fedlora.errors import DataError
from fedlora.tasks.base import ExampleSet, register_task
from fedlora.tasks.tables import _LOCAL_SUFFIXES, _hub_splits, _local_splits
from fedlora.tasks.text import resolve_model_path

IGNORE = -100


def _load_frames(cfg: Any, seed: int, need_train: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames with columns ``prompt``, ``response``, ``group``."""
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        splits = _local_splits(path, need_train)
    elif path.suffix.lower() in _LOCAL_SUFFIXES:
        raise DataError(f"data file '{path}' does not exist; check task.dataset")
    else:
        splits = _hub_splits(cfg.dataset, cfg.dataset_config)
    frames = {s: _clean(df, cfg, cfg.dataset) for s, df in splits.items()}
    test_split = next((s for s in ("test", "validation") if s in frames and len(frames[s])), None)
    if test_split is not None:
        train = frames.get("train", frames[test_split].iloc[:0])
        test = frames[test_split]
    else:
        if "train" not in frames or len(frames["train"]) == 0:
            raise DataError(f"data '{cfg.dataset}' has no examples with a non-empty response; check the file")
        train = frames["train"]
        order = np.random.default_rng(seed).permutation(len(train))
        n_test = max(1, int(round(cfg.test_fraction * len(train))))
        test, train = train.iloc[order[:n_test]], train.iloc[order[n_test:]]
    if need_train and len(train) == 0:
        raise DataError(f"data '{cfg.dataset}' has no training examples; check the file")
    if cfg.max_train_examples is not None and len(train) > cfg.max_train_examples:
        train = train.sample(n=cfg.max_train_examples, random_state=seed)
    if cfg.max_test_examples is not None and len(test) > cfg.max_test_examples:
        test = test.sample(n=cfg.max_test_examples, random_state=seed)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def _clean(df: pd.DataFrame, cfg: Any, source: str) -> pd.DataFrame:
    for col, key in ((cfg.prompt_column, "task.prompt_column"), (cfg.response_column, "task.response_column")):
        if col not in df.columns:
            raise DataError(f"data '{source}' has no column '{col}' (columns: {', '.join(map(str, df.columns))}); set {key}")
    group = df[cfg.label_column].astype(str) if cfg.label_column in df.columns else pd.Series("all", index=df.index)
    out = pd.DataFrame({"prompt": df[cfg.prompt_column], "response": df[cfg.response_column], "group": group})
    out = out.dropna(subset=["prompt", "response"])
    out = out.assign(prompt=out["prompt"].astype(str), response=out["response"].astype(str))
    return out[out["response"].str.strip() != ""].reset_index(drop=True)


class CausalLMTask:
    name = "causal-lm"
    metric_label = "exact match"  # what this task's 'accuracy' is (the summary line says so)
    prefix_start = 0

    def __init__(self, cfg: Any, seed: int, *, train: bool = True) -> None:
        """``train=False``: no training examples (a folder's ``train.*`` is never opened)."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        if cfg.num_layers is not None:
            raise DataError("task.num_layers is not supported by the causal-lm task; remove it")
        self.cfg, self.seed = cfg, seed
        train_df, test_df = _load_frames(cfg, seed, train)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        except (OSError, ValueError) as err:
            raise DataError(f"could not load the tokenizer of '{cfg.model}' ({str(err).splitlines()[0][:120]})") from None
        groups = sorted(set(train_df["group"]) | set(test_df["group"]))
        self.label_names = groups or ["all"]
        self.num_labels = len(self.label_names)
        self._group_index = {g: i for i, g in enumerate(self.label_names)}
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.train = self._encode(train_df)
        self.test = self._encode(test_df)

    # ------------------------------------------------------------------ data
    def encode_pair(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of prompt + response (+ EOS), truncated to ``task.max_length``, and the prompt's length.

        The response keeps its first tokens (at most max_length - 1); the prompt keeps its last."""
        tok, limit = self.tokenizer, self.cfg.max_length
        p = list(tok(self.cfg.prompt_template.format(prompt=prompt))["input_ids"])
        r = list(tok(response, add_special_tokens=False)["input_ids"])
        if self.eos_id is not None:
            r.append(self.eos_id)
        if not p:  # the first response token needs a position before it
            p = [tok.bos_token_id if tok.bos_token_id is not None else self.pad_id]
        r = r[: max(limit - 1, 1)]
        p = p[-max(limit - len(r), 1):]
        return p + r, len(p)

    def _encode(self, df: pd.DataFrame) -> ExampleSet:
        ids, plen = [], []
        for prompt, response in zip(df["prompt"], df["response"], strict=True):
            x, n = self.encode_pair(prompt, response)
            ids.append(np.asarray(x, dtype=np.int64))
            plen.append(np.asarray([n], dtype=np.int64))
        labels = np.asarray([self._group_index[g] for g in df["group"]], dtype=np.int64)
        return ExampleSet({"input_ids": ids, "prompt_length": plen}, labels,
                          {"prompts": df["prompt"].tolist(), "responses": df["response"].tolist()})

    def batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` (batch, tokens), ``attention_mask`` and ``labels`` (the next
        token at each position, ``-100`` on prompt and padding positions)."""
        rows = [examples.features["input_ids"][int(i)] for i in indices]
        plen = [int(examples.features["prompt_length"][int(i)][0]) for i in indices]
        width = max((len(x) for x in rows), default=1)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        labels = np.full_like(input_ids, IGNORE)
        for r, (x, n) in enumerate(zip(rows, plen, strict=True)):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
            labels[r, n - 1 : len(x) - 1] = x[n:]  # position t predicts token t + 1: the response tokens
        return {k: to_device(torch.from_numpy(v), device) for k, v in
                (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels))}

    # ------------------------------------------------------------------ model, loss, metric
    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        torch.manual_seed(self.seed)
        try:
            # float32 weights whatever the checkpoint's dtype (transformers' default is the checkpoint's, often bf16):
            # PEFT gives the LoRA factors the base layer's dtype, and factors, per-sample gradients and noise stay fp32;
            # train.precision=bf16 runs the forward under autocast instead.
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(self.cfg.model), dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise DataError(f"could not load causal LM '{self.cfg.model}' ({str(err).splitlines()[0][:120]})") from None
        for module in model.modules():  # a frozen backbone: no dropout (the exact loop needs the same forward)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        return model

    def token_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-position NLL (batch, tokens), the response mask and the argmax hits (both (batch, tokens))."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (batch, tokens, vocab)
        labels = batch["labels"]
        keep = labels != IGNORE
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays fp64
        nll = nn.functional.cross_entropy(wide.transpose(1, 2), labels.clamp(min=0), reduction="none")
        hits = (logits.argmax(-1) == labels) & keep
        return nll * keep, keep, hits

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example mean NLL over its response tokens, shape (batch,)."""
        nll, keep, _ = self.token_losses(model, batch)
        return nll.sum(1) / keep.sum(1).clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: ExampleSet, batch_size: int, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        order = np.argsort([len(x) for x in examples.features["input_ids"]], kind="stable")
        nll_sum = tokens = hit_sum = exact = 0.0
        for s in range(0, len(order), batch_size):
            batch = self.batch(examples, order[s : s + batch_size], device)
            nll, keep, hits = self.token_losses(model, batch)
            nll_sum += float(nll.sum())
            tokens += float(keep.sum())
            hit_sum += float(hits.sum())
            exact += float((hits.sum(1) == keep.sum(1)).sum())
        model.train(was_training)
        loss = nll_sum / max(tokens, 1.0)
        em = exact / max(len(order), 1)
        return {"accuracy": em, "exact_match": em, "token_accuracy": hit_sum / max(tokens, 1.0),
                "loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt: str, max_new_tokens: int = 32, device: torch.device | str = "cpu") -> str:
        """Greedy decoding of one prompt (argmax at every step, stops at EOS): what exact match scores."""
        ids = list(self.tokenizer(self.cfg.prompt_template.format(prompt=prompt))["input_ids"]) or [self.pad_id]
        start = len(ids)
        was_training = model.training
        model.eval()
        for _ in range(max_new_tokens):
            x = torch.tensor([ids], device=device)
            nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == self.eos_id:
                break
        model.train(was_training)
        out = ids[start:]
        if out and out[-1] == self.eos_id:
            out = out[:-1]
        return self.tokenizer.decode(out, skip_special_tokens=True)


@register_task("causal-lm", "prompt/response fine-tuning of a decoder LM (loss on the response); online by name")
def _causal_lm_task(cfg: Any, seed: int, train: bool = True) -> CausalLMTask:
    return CausalLMTask(cfg, seed, train=train)
