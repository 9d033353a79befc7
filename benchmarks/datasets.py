"""The data files the scaling benchmark runs on: the benchmark file cut down to each size, or grown past it.

A size at or below the file's row count is a deterministic random subsample of its rows
(:func:`subsample_reviews`). A larger size (the 100k run from the 25k IMDB file) is synthetic
(:func:`synthesize_reviews`): each new review takes a real review's movie, label and sentence count and
fills them with sentences drawn from the real reviews of that movie with that label. Drawing within a movie
keeps the split honest (the split keeps a movie's reviews together, so no sentence reaches both the train
and the test side) and drawing within a label keeps each text's sentiment; the texts are new combinations
of real sentences, so such a run measures cost, not what more real data would do to accuracy. Each size is
written in the input's own format, so ingest reads it as it would read the real file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# A sentence ends at ., ! or ? followed by whitespace, or at an HTML line break.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|<br\s*/?>", re.IGNORECASE)
# Formats pandas writes that ingest reads back the same (anything else is written as CSV).
WRITABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")


def read_reviews(path: Path) -> pd.DataFrame:
    """The rows of a data file as ingest reads them (:func:`maas_tasks.sources.open_source`)."""
    from maas_tasks.sources import open_source

    return open_source(str(path)).read().frame


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences, stripped, without empty ones (a text without an end mark is one sentence)."""
    return [part.strip() for part in SENTENCE_END.split(text) if part and part.strip()]


def subsample_reviews(df: pd.DataFrame, n: int, *, seed: int) -> pd.DataFrame:
    """``n`` of ``df``'s rows, the same ones for the same ``seed``, in their original order.

    Raises:
        ValueError: ``n`` is below 1 or above ``len(df)``.
    """
    if not 1 <= n <= len(df):
        raise ValueError(f"cannot take {n} of {len(df)} rows")
    return df.sample(n=n, random_state=seed).sort_index().reset_index(drop=True)


def _class_quotas(labels: pd.Series, n: int) -> dict[Any, int]:
    """Rows per label out of ``n``, in the labels' shares (largest remainders get the rounding)."""
    shares = labels.value_counts(sort=False) / len(labels) * n
    quotas = np.floor(shares).astype(int)
    short = n - int(quotas.sum())
    for label in (shares - quotas).sort_values(ascending=False, kind="stable").index[:short]:
        quotas[label] += 1
    return {label: int(quota) for label, quota in quotas.items()}


def synthesize_reviews(
    df: pd.DataFrame, n: int, *, seed: int, text_col: str = "text", label_col: str = "label",
    group_col: str | None = "movie_id", id_col: str | None = "review_id",
) -> pd.DataFrame:
    """``n`` synthetic reviews built from ``df``'s sentences, the same ones for the same ``seed``.

    Each label keeps its share of the rows. Each new row copies a real row of that label (drawn with
    replacement) and replaces its text by as many sentences as the real text has, drawn with replacement
    from the texts of the same group (e.g. movie) and label; without ``group_col``, from all texts of the
    label. Rows without a label or a text are not drawn. ``id_col`` (when the table has it) becomes
    ``synthetic-<n>``, so ids stay unique.

    Raises:
        ValueError: ``n`` is below 1 or ``df`` has no labeled row with a text.
    """
    texts = df[text_col].astype("string").fillna("")
    keep = (df[label_col].notna() & texts.str.strip().ne("")).to_numpy()
    source = df.loc[keep].reset_index(drop=True)
    if n < 1 or source.empty:
        raise ValueError(f"cannot build {n} rows from {len(source)} labeled rows with a text")
    sentences = [split_sentences(text) for text in texts[keep]]
    key_cols = [label_col] + ([group_col] if group_col and group_col in df.columns else [])
    keys = list(zip(*(source[c].tolist() for c in key_cols)))
    pools: dict[tuple[Any, ...], list[str]] = {}
    for key, parts in zip(keys, sentences):
        pools.setdefault(key, []).extend(parts)
    rng = np.random.default_rng(seed)
    labels = source[label_col].to_numpy()
    picked = np.concatenate([
        rng.choice(np.flatnonzero(labels == label), size=quota, replace=True)
        for label, quota in _class_quotas(source[label_col], n).items()
    ])
    lengths = np.array([len(sentences[i]) for i in picked])
    pool_sizes = np.array([len(pools[keys[i]]) for i in picked])
    draws = (rng.random(int(lengths.sum())) * np.repeat(pool_sizes, lengths)).astype(np.int64)
    ends = np.cumsum(lengths)
    new_texts = [
        " ".join(pools[keys[i]][j] for j in draws[end - length:end]) for i, length, end in zip(picked, lengths, ends)
    ]
    out = source.iloc[picked].reset_index(drop=True)
    out[text_col] = pd.array(new_texts, dtype=source[text_col].dtype)
    out = out.iloc[rng.permutation(len(out))].reset_index(drop=True)
    if id_col and id_col in out.columns:
        out[id_col] = pd.array([f"synthetic-{i + 1}" for i in range(len(out))], dtype=out[id_col].dtype)
    return out


def data_suffix(path: Path) -> str:
    """The suffix a size of ``path`` is written with: its own when pandas writes it, else ``.csv.gz``."""
    name = path.name.lower()
    return next((s for s in sorted(WRITABLE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), ".csv.gz")


def write_reviews(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` in the format its suffix names (see :data:`WRITABLE_SUFFIXES`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        # Fast gzip: these files live for one run, and level 9 would take longer than ingesting them.
        compression = {"method": "gzip", "compresslevel": 1} if name.endswith(".gz") else None
        df.to_csv(path, index=False, sep="\t" if ".tsv" in name else ",", compression=compression)
    return path


def prepare_size(df: pd.DataFrame, source: Path, n: int, workdir: Path, *, seed: int, **columns: Any) -> dict[str, Any]:
    """The data file of one scaling size: ``source`` itself when it has exactly ``n`` rows, a subsample of
    it when it has more, a synthetic file (:func:`synthesize_reviews`, ``columns`` passed on) when fewer.

    Returns:
        ``path``, ``rows`` and ``synthetic`` (whether the rows are synthetic).
    """
    if n == len(df):
        return {"path": source, "rows": n, "synthetic": False}
    synthetic = n > len(df)
    rows = synthesize_reviews(df, n, seed=seed, **columns) if synthetic else subsample_reviews(df, n, seed=seed)
    path = write_reviews(rows, workdir / f"reviews-{n}{data_suffix(source)}")
    return {"path": path, "rows": n, "synthetic": synthetic}
