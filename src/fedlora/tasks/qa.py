"""Extractive question answering (SQuAD-style): windows with stride, offsets, exact match and F1.

Data: a local JSON/JSONL/CSV/parquet file or a datasets name with ``question``, ``context`` and
``answers`` (``{"text": [...], "answer_start": [...]}``). Contexts longer than
``task.max_length`` are split into overlapping windows (``task.doc_stride`` tokens of overlap);
a window without the whole answer points at [CLS]. The model is any
``AutoModelForQuestionAnswering`` backbone with its span head as ``classifier``.

The unit of privacy is one (question, context) example, not one window: the training set's
rows are examples (``features["windows"]`` lists each one's windows, held in
``extra["windows"]``), so partitioning, Poisson sampling and the accountant count examples; a
batch of examples expands to their windows with a ``record`` row per window, and the DP step sums
each example's window gradients before clipping (one clipped contribution of norm <= C).
"""

from __future__ import annotations

import ast
import collections
import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedlora.devices import to_device
from fedlora.errors import DataError
from fedlora.tasks.base import ExampleSet, register_task
from fedlora.tasks.tables import _hub_splits, _local_splits
from fedlora.tasks.text import TextClassificationTask, resolve_model_path


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction: str, truth: str) -> float:
    p, t = normalize(prediction).split(), normalize(truth).split()
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if not p or not t:
        return float(p == t)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


class SpanModel(nn.Module):
    """Encoder -> per-token (start, end) logits from the ``classifier`` head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.classifier = encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.classifier(hidden)  # (batch, tokens, 2)


def _parse_answer(value: Any, source: str, row: int) -> dict[str, list]:
    """One row's ``answers`` as ``{"text": [str, ...], "answer_start": [int, ...]}``: a dict (JSON,
    datasets, parquet arrays) or the same dict written as text (a CSV cell, JSON or Python literal)."""
    where = f"QA data '{source}', row {row}"
    shape = 'a dict {"text": [...], "answer_start": [...]}'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"{where}: 'answers' is not {shape} (got {value[:60]!r}); write it in that shape") from None
    if not isinstance(value, dict) or not {"text", "answer_start"} <= set(value):
        raise DataError(f"{where}: 'answers' is not {shape} (got {type(value).__name__}); write it in that shape")
    try:
        texts, starts = [str(t) for t in value["text"]], [int(s) for s in value["answer_start"]]
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'answers' needs a list of texts and a list of integer starts; fix that row") from None
    if not texts or len(texts) != len(starts):
        raise DataError(f"{where} has no answer (a SQuAD v2 unanswerable question?) or unequal text/answer_start lists; "
                        "this task trains on answerable questions only: drop such rows")
    return {"text": texts, "answer_start": starts}


def _answers(df: pd.DataFrame, source: str) -> pd.DataFrame:
    for col in ("question", "context", "answers"):
        if col not in df.columns:
            raise DataError(f"QA data '{source}' has no '{col}' column (columns: {', '.join(map(str, df.columns))})")
    df = df.reset_index(drop=True)
    return df.assign(answers=[_parse_answer(a, source, i) for i, a in enumerate(df["answers"])])


class QuestionAnsweringTask(TextClassificationTask):
    name = "question-answering"

    def __init__(self, cfg: Any, seed: int) -> None:  # the parent's table loading is not used
        from transformers import AutoTokenizer  # noqa: PLC0415

        self.cfg, self.seed, self.prefix_start = cfg, seed, 0
        path = Path(cfg.dataset).expanduser()
        splits = _local_splits(path) if path.exists() else _hub_splits(cfg.dataset, cfg.dataset_config)
        train = _answers(splits["train"], cfg.dataset)
        test = _answers(splits.get("validation", splits.get("test", train.iloc[:0])), cfg.dataset)
        if len(test) == 0:
            order = np.random.default_rng(seed).permutation(len(train))
            n_test = max(1, int(round(cfg.test_fraction * len(train))))
            test, train = train.iloc[order[:n_test]].reset_index(drop=True), train.iloc[order[n_test:]].reset_index(drop=True)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        self.label_names, self.num_labels = ["no answer in window", "answer in window"], 2
        self.train, self.test = self._records(self._windows(train)), self._windows(test)

    @staticmethod
    def _records(windows: ExampleSet) -> ExampleSet:
        """One row per example (the unit of privacy), its windows in ``features["windows"]``; its label
        (used by label-skewed partitions) is whether any of its windows holds the answer."""
        owner = np.asarray([int(e[0]) for e in windows.features["example"]], dtype=np.int64)
        groups = [np.flatnonzero(owner == e) for e in range(int(owner.max()) + 1 if len(owner) else 0)]
        labels = np.asarray([int(windows.labels[g].max()) if len(g) else 0 for g in groups], dtype=np.int64)
        return ExampleSet({"windows": groups}, labels, {**windows.extra, "windows": windows})

    def _windows(self, df: pd.DataFrame) -> ExampleSet:
        enc = self.tokenizer(df["question"].tolist(), df["context"].tolist(), truncation="only_second",
                             max_length=self.cfg.max_length, stride=self.cfg.doc_stride,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        feats: dict[str, list[np.ndarray]] = {"input_ids": [], "token_type_ids": [], "span": [], "offsets": [], "example": []}
        for i, ids in enumerate(enc["input_ids"]):
            ex = int(enc["overflow_to_sample_mapping"][i])
            seq = enc.sequence_ids(i)
            offsets = np.asarray([o if s == 1 else (-1, -1) for o, s in zip(enc["offset_mapping"][i], seq, strict=True)])
            ans = df["answers"].iloc[ex]
            start_char = int(ans["answer_start"][0])
            end_char = start_char + len(ans["text"][0])
            inside = np.nonzero((offsets[:, 0] <= start_char) & (offsets[:, 1] > start_char))[0]
            ending = np.nonzero((offsets[:, 0] < end_char) & (offsets[:, 1] >= end_char))[0]
            span = (int(inside[0]), int(ending[0])) if len(inside) and len(ending) else (0, 0)
            feats["input_ids"].append(np.asarray(ids, dtype=np.int64))
            feats["token_type_ids"].append(np.asarray(enc["token_type_ids"][i], dtype=np.int64))
            feats["span"].append(np.asarray(span, dtype=np.int64))
            feats["offsets"].append(offsets)
            feats["example"].append(np.asarray([ex]))
        labels = np.asarray([int(s[1] > 0) for s in feats["span"]], dtype=np.int64)
        contexts = df["context"].tolist()
        golds = [list(a["text"]) for a in df["answers"]]
        return ExampleSet(feats, labels, {"contexts": contexts, "answers": golds})

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering  # noqa: PLC0415

        torch.manual_seed(self.seed)
        try:
            model = AutoModelForQuestionAnswering.from_pretrained(resolve_model_path(self.cfg.model))
        except (OSError, ValueError) as err:
            raise DataError(f"could not load QA model '{self.cfg.model}' ({str(err).splitlines()[0][:120]})") from None
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return SpanModel(getattr(model, model.base_model_prefix), model.qa_outputs)

    def cache_prefix(self, *args: Any, **kwargs: Any) -> None:  # windows are short; no cache
        return None

    def batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch of windows; for a set of examples (the training set), all windows of each, with
        ``record``: the position in ``indices`` of the example each window belongs to."""
        if "windows" in examples.features:
            groups = [examples.features["windows"][int(i)] for i in indices]
            rows = np.concatenate([np.zeros(0, np.int64), *groups])
            batch = self.batch(examples.extra["windows"], rows, device)
            counts = torch.tensor([len(g) for g in groups], device=device)
            batch["record"] = torch.repeat_interleave(torch.arange(len(groups), device=device), counts)
            return batch
        batch = super().batch(examples, indices, device)
        batch["span"] = to_device(torch.from_numpy(np.stack([examples.features["span"][int(i)] for i in indices])), device)
        return batch

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "span", "record")}
        logits = model(**inputs)  # (batch, tokens, 2)
        return logits.masked_fill(batch["attention_mask"][..., None] == 0, torch.finfo(logits.dtype).min)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(model, batch)
        ce = nn.functional.cross_entropy
        return (ce(logits[..., 0], batch["span"][:, 0], reduction="none")
                + ce(logits[..., 1], batch["span"][:, 1], reduction="none")) / 2  # (batch,)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: ExampleSet, batch_size: int, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        best: dict[int, tuple[float, str]] = {}
        losses = []
        for s in range(0, len(examples), batch_size):
            idx = np.arange(s, min(s + batch_size, len(examples)))
            batch = self.batch(examples, idx, device)
            logits = self._logits(model, batch).float().cpu().numpy()
            losses.append(self.loss(model, batch).cpu())
            for row, i in enumerate(idx):
                off, ex = examples.features["offsets"][i], int(examples.features["example"][i][0])
                valid = np.nonzero(off[:, 0] >= 0)[0]
                if not len(valid):
                    continue
                st, en = logits[row, valid, 0], logits[row, valid, 1]
                score = st[:, None] + en[None, :]
                gap = valid[None, :] - valid[:, None]
                score[(gap < 0) | (gap > 30)] = -np.inf
                a, b = np.unravel_index(int(np.argmax(score)), score.shape)
                text = examples.extra["contexts"][ex][off[valid[a]][0] : off[valid[b]][1]]
                if ex not in best or score[a, b] > best[ex][0]:
                    best[ex] = (float(score[a, b]), text)
        model.train(was_training)
        golds = examples.extra["answers"]
        present = sorted({int(x[0]) for x in examples.features["example"]})  # a subset holds some windows
        em = [max(float(normalize(best.get(e, (0, ""))[1]) == normalize(g)) for g in golds[e]) for e in present]
        f1 = [max(f1_score(best.get(e, (0, ""))[1], g) for g in golds[e]) for e in present]
        return {"accuracy": float(np.mean(em)), "exact_match": float(np.mean(em)), "f1": float(np.mean(f1)),
                "loss": float(torch.cat(losses).mean())}


@register_task("question-answering", "extractive QA (SQuAD-style spans, exact match and F1); online by name")
def _qa_task(cfg: Any, seed: int) -> QuestionAnsweringTask:
    return QuestionAnsweringTask(cfg, seed)
