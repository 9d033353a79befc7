"""Text cleaning: turn a validated raw snapshot into the normalised ``text``/``label``/``group`` table
(plus any ``slice:<column>`` the evaluation reports metrics by).

Raw reviews carry HTML (``<br />`` line breaks, ``&amp;`` entities) and ragged whitespace that would
otherwise become vocabulary. Labels are normalised to class-name strings here, once, so every later
stage (features, training, export, serving) agrees on them: ``0``/``1`` become ``"0"``/``"1"``.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from maas_tasks.storage import Store

log = logging.getLogger(__name__)

# Columns kept for evaluation slices are renamed with this prefix, so they never clash with the roles.
SLICE_PREFIX = "slice:"
_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Remove HTML tags, unescape entities, collapse whitespace and strip."""
    # Tags are replaced by a space so "end.<br />Next" does not glue two words together.
    without_tags = _TAG.sub(" ", str(text))
    return _SPACE.sub(" ", html.unescape(without_tags)).strip()


def normalize_label(value: Any) -> str:
    """A label as its class-name string: integral numbers lose their ``.0`` (``1.0`` -> ``"1"``)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item"):  # numpy scalars
        return normalize_label(value.item())
    return str(value).strip()


def _as_key(value: Any) -> str:
    return "" if pd.isna(value) else normalize_label(value)


def _require_columns(df: pd.DataFrame, **columns: str | None) -> None:
    for role, col in columns.items():
        if col is not None and col not in df.columns:
            have = ", ".join(map(str, df.columns)) or "(none)"
            raise ValueError(f"{role} {col!r} is not a column of the table; it has: {have}")


def clean_frame(
    df: pd.DataFrame, *, text_col: str, label_col: str, group_col: str | None = None, slice_cols: Sequence[str] = ()
) -> pd.DataFrame:
    """Normalise a raw table to columns ``text``, ``label`` (and ``group`` when ``group_col`` is given).

    Each of ``slice_cols`` is kept, as strings, in a column ``slice:<name>`` (missing values: ``""``): the
    evaluation reports metrics per value of it.

    Rows whose text is empty after cleaning, or that have no label, are dropped; the number dropped
    is ``len(df) - len(result)``.

    Raises:
        ValueError: a named column does not exist (the message lists the columns there are).
    """
    _require_columns(df, text_col=text_col, label_col=label_col, group_col=group_col)
    for col in slice_cols:
        _require_columns(df, slice_col=col)
    keep = df[text_col].notna() & df[label_col].notna()
    raw = df.loc[keep]
    out = pd.DataFrame(
        {
            "text": raw[text_col].map(clean_text).astype(str),
            "label": raw[label_col].map(normalize_label).astype(str),
        }
    )
    if group_col is not None:
        out["group"] = raw[group_col].map(_as_key).astype(str)
    for col in slice_cols:
        out[f"{SLICE_PREFIX}{col}"] = raw[col].map(_as_key).astype(str)
    out = out[(out["text"] != "") & (out["label"] != "")]
    return out.reset_index(drop=True)


def clean_snapshot(
    store: Store,
    snapshot_key: str,
    *,
    text_col: str,
    label_col: str,
    group_col: str | None = None,
    slice_cols: Sequence[str] = (),
) -> dict[str, Any]:
    """Clean the Parquet snapshot at ``snapshot_key`` and write ``cleaned/<hash>/data.parquet``.

    The hash covers the snapshot's bytes and the column arguments, so a re-run writes the same key.

    Returns:
        ``key`` of the cleaned table, ``rows`` kept and ``dropped`` (empty text or missing label).
    """
    raw_bytes = store.get_bytes(snapshot_key)
    df = pd.read_parquet(io.BytesIO(raw_bytes))
    try:
        cleaned = clean_frame(df, text_col=text_col, label_col=label_col, group_col=group_col, slice_cols=slice_cols)
    except ValueError as exc:
        raise ValueError(f"{store.uri(snapshot_key)}: {exc}") from None
    if cleaned.empty:
        raise ValueError(
            f"{store.uri(snapshot_key)}: no row has both a label and non-empty text after cleaning "
            f"({len(df)} rows dropped); check --text-col/--label-col and the source file"
        )
    params = {"text_col": text_col, "label_col": label_col, "group_col": group_col}
    if slice_cols:
        params["slice_cols"] = list(slice_cols)
    digest = hashlib.sha256(raw_bytes)
    digest.update(json.dumps(params, sort_keys=True).encode())
    key = f"cleaned/{digest.hexdigest()[:16]}/data.parquet"
    buffer = io.BytesIO()
    cleaned.to_parquet(buffer, index=False)
    store.put_bytes(key, buffer.getvalue())
    log.info(
        "cleaned %d rows (HTML stripped, whitespace normalised); dropped %d without text or label",
        len(cleaned), len(df) - len(cleaned),
    )
    return {"key": key, "rows": len(cleaned), "dropped": len(df) - len(cleaned)}
