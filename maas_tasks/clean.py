"""Cleaning: turn validated raw snapshots into the normalised, de-duplicated and split table every later stage
reads (``text``, ``label``, ``split``, and ``group``/``id``/``slice:<column>`` when asked for).

Raw reviews carry HTML (``<br />`` line breaks, ``&amp;`` entities), compatibility characters (non-breaking
spaces, full-width letters, ligatures) and ragged whitespace that would otherwise become vocabulary; the same
review posted twice would be counted twice, or land on both sides of the split. Labels become class-name
strings here, once (through the ``label_map`` when one is given), so features, training, export and serving
agree on them. The work is vectorised (Arrow compute kernels): 25,000 IMDB reviews clean, de-duplicate and
split in one to two seconds on two cores.

Rows that cannot be trained on are quarantined, not silently dropped: texts empty after cleaning, missing
labels, and every copy of a text that appears with conflicting labels (which one is right cannot be known).
Exact copies that agree keep their first occurrence. The split (:func:`maas_tasks.features.assign_splits`) is
decided here too, so the cleaned table says for every row where it belongs.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from maas_tasks.features import assign_splits, check_splits
from maas_tasks.storage import Store, store_key

log = logging.getLogger(__name__)

# Columns kept for evaluation slices are renamed with this prefix, so they never clash with the roles.
SLICE_PREFIX = "slice:"
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
# Why a row is not kept: the cleaned quarantine's ``reason`` column, by the code ``removed`` counts it under.
# A "duplicate" (a later copy of a text whose label agrees with the first) is dropped, not quarantined.
_REASONS = {
    "missing_text": "text is missing",
    "empty_text": "text is empty after cleaning (HTML tags, entities and whitespace removed)",
    "missing_label": "label is missing",
}
_CONFLICT = "the same text appears with conflicting labels ({labels})"
# Arrow's regular expressions are RE2. A tag is short; a lone "<" (as in "<3") is not the start of one.
_TAG = r"<[^>]{0,200}>"
# Whitespace other than the plain space: Python's str.split() set (ASCII controls, NEL, Unicode spaces).
_OTHER_SPACE = "\t\n\x0b\f\r\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Runs of two or more, or one non-plain space: a lone " " needs no replacing, which keeps the kernel fast.
_SPACE_RUN = f"[ {_OTHER_SPACE}]{{2,}}|[{_OTHER_SPACE}]"
# "1.0" is the class "1": numbers read from text keep no ".0" (as integral floats lose theirs).
_INTEGRAL = re.compile(r"^(-?\d+)\.0+$")


def _where(array: pa.Array, mask: pa.Array, transform: Any) -> pa.Array:
    """``array`` with ``transform`` applied to the rows of ``mask`` only (the rest untouched)."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return array
    return pc.replace_with_mask(array, mask, transform(pc.filter(array, mask)))


def _unescape(array: pa.Array) -> pa.Array:
    # html.unescape has no Arrow kernel; only the rows holding an "&" go through Python.
    return pa.array([html.unescape(text) for text in array.to_pylist()], type=array.type)


def clean_texts(texts: pd.Series) -> pd.Series:
    """Clean every text: HTML tags removed (each becomes a space, so ``end.<br />Next`` keeps two words),
    entities unescaped (after the tags, so a typed ``&lt;br /&gt;`` stays as text), Unicode NFKC, whitespace
    collapsed to single spaces and stripped. Missing texts become ``""``.
    """
    array = pa.array(texts.astype("string"), from_pandas=True)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = pc.fill_null(array.cast(pa.large_string()), "")
    array = _where(array, pc.match_substring(array, "<"), lambda a: pc.replace_substring_regex(a, _TAG, " "))
    array = _where(array, pc.match_substring(array, "&"), _unescape)
    # ASCII text is already NFKC-normal; only the rest is normalised.
    array = _where(array, pc.invert(pc.string_is_ascii(array)), lambda a: pc.utf8_normalize(a, form="NFKC"))
    array = pc.utf8_trim_whitespace(pc.replace_substring_regex(array, _SPACE_RUN, " "))
    return pd.Series(array, index=texts.index, dtype="str")


def clean_text(text: Any) -> str:
    """One text cleaned as :func:`clean_texts` cleans a column."""
    return str(clean_texts(pd.Series([str(text)]))[0])


def normalize_label(value: Any) -> str:
    """A label as its class-name string: integral numbers lose their ``.0`` (``1.0`` and ``"1.0"`` -> ``"1"``)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item"):  # numpy scalars
        return normalize_label(value.item())
    return _INTEGRAL.sub(r"\1", str(value).strip())


def normalize_labels(values: pd.Series) -> pd.Series:
    """:func:`normalize_label` of every value (missing values stay missing), without a Python call per row."""
    if pd.api.types.is_string_dtype(values.dtype) and not pd.api.types.is_object_dtype(values.dtype):
        stripped = values.str.strip()
        return stripped.str.replace(_INTEGRAL.pattern, r"\1", regex=True).astype("str")
    # Any other dtype: labels have few distinct values, so each distinct value is normalised once.
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    names = np.asarray([normalize_label(u) for u in uniques] + [None], dtype=object)
    return pd.Series(names[codes], index=values.index, dtype="str")


def _keys(values: pd.Series) -> pd.Series:
    """Group, id and slice values as strings; missing values become ``""``."""
    return normalize_labels(values).fillna("")


def _require_columns(df: pd.DataFrame, **columns: str | None) -> None:
    for role, col in columns.items():
        if col is not None and col not in df.columns:
            have = ", ".join(map(str, df.columns)) or "(none)"
            raise ValueError(f"{role} {col!r} is not a column of the table; it has: {have}")


def _apply_label_map(labels: pd.Series, label_map: Mapping[Any, str]) -> pd.Series:
    """Class names of ``labels`` (already normalised); raises if a present label is not in the map."""
    mapping = {normalize_label(raw): str(name) for raw, name in label_map.items()}
    mapped = labels.map(mapping)
    unmapped = labels.notna() & mapped.isna()
    if unmapped.any():
        counts = labels[unmapped].value_counts()
        shown = ", ".join(f"{value!r} ({n} row{'s' if n > 1 else ''})" for value, n in counts.head(5).items())
        raise ValueError(
            f"label value(s) {shown}{' and more' if len(counts) > 5 else ''} are not in the label map "
            f"({', '.join(f'{k}={v}' for k, v in mapping.items())}); add them to the map, or check the label column"
        )
    return mapped.astype("str")


def _triage(
    df: pd.DataFrame,
    *,
    text_col: str,
    label_col: str,
    id_col: str | None,
    group_col: str | None,
    label_map: Mapping[Any, str] | None,
    slice_cols: Sequence[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cleaned columns of every row of ``df``, and per row the ``code`` of why it is not kept (missing: it
    is kept) and the quarantine's ``reason`` sentence."""
    _require_columns(df, text_col=text_col, label_col=label_col, id_col=id_col, group_col=group_col)
    for col in slice_cols:
        _require_columns(df, slice_col=col)
    labels = normalize_labels(df[label_col])
    labels = labels.mask(labels == "")
    if label_map:
        labels = _apply_label_map(labels, label_map)
    out = pd.DataFrame({"text": clean_texts(df[text_col]), "label": labels}, index=df.index)
    if group_col is not None:
        out["group"] = _keys(df[group_col])
    if id_col is not None:
        out["id"] = _keys(df[id_col])
    for col in slice_cols:
        out[f"{SLICE_PREFIX}{col}"] = _keys(df[col])

    codes = pd.Series(None, index=df.index, dtype=object)
    codes[out["text"] == ""] = "empty_text"
    codes[df[text_col].isna()] = "missing_text"
    codes[out["label"].isna() & codes.isna()] = "missing_label"
    reasons = codes.map(_REASONS)
    copies = codes.isna() & out["text"].duplicated(keep=False)
    if copies.any():
        repeated = out.loc[copies, ["text", "label"]]
        conflicting = repeated.groupby("text", sort=False)["label"].transform("nunique") > 1
        names = repeated[conflicting].groupby("text")["label"].agg(lambda s: ", ".join(sorted(set(s))))
        codes[conflicting[conflicting].index] = "conflicting_labels"
        reasons[conflicting[conflicting].index] = repeated.loc[conflicting, "text"].map(
            lambda text: _CONFLICT.format(labels=names[text])
        )
        later = repeated.loc[~conflicting, "text"].duplicated(keep="first")
        codes[later[later].index] = "duplicate"
    out["label"] = out["label"].fillna("")
    return out, pd.DataFrame({"code": codes, "reason": reasons})


def clean_frame(
    df: pd.DataFrame,
    *,
    text_col: str,
    label_col: str,
    id_col: str | None = None,
    group_col: str | None = None,
    label_map: Mapping[Any, str] | None = None,
    slice_cols: Sequence[str] = (),
) -> pd.DataFrame:
    """Clean a raw table to columns ``text``, ``label`` (and ``group``, ``id`` when their columns are given).

    Each of ``slice_cols`` is kept, as strings, in a column ``slice:<name>`` (missing values: ``""``): the
    evaluation reports metrics per value of it. Rows :func:`clean_snapshots` would quarantine (empty text, no
    label, conflicting duplicates) are dropped, and of exact duplicates the first is kept; the number dropped
    is ``len(df) - len(result)``.

    Raises:
        ValueError: a named column does not exist (the message lists the columns there are), or a label is
            not in ``label_map``.
    """
    out, triage = _triage(df, text_col=text_col, label_col=label_col, id_col=id_col, group_col=group_col,
                          label_map=label_map, slice_cols=slice_cols)
    return out[triage["code"].isna()].reset_index(drop=True)


def _read_parquet(store: Store, key: str) -> tuple[bytes, pd.DataFrame]:
    raw = store.get_bytes(key)
    return raw, pd.read_parquet(io.BytesIO(raw))


def _source_name(item: Mapping[str, Any], store: Store) -> str:
    """How messages name a snapshot: its source as the user gave it, else where the snapshot is stored."""
    return str(item.get("source") or item.get("source_uri") or store.uri(item["key"]))


def _read_batches(
    store: Store, batches: Sequence[Mapping[str, Any]], *, columns: Sequence[str | None], digest: Any = None
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The ``columns`` of every batch's rows that validation did not quarantine, concatenated in order; where
    each row came from (``row`` in its batch, ``batch`` number); and how many quarantined rows were left out.
    ``digest`` (a hashlib object), when given, is fed every file read.

    Raises:
        ValueError: a batch lacks a named column (the message names the batch's source).
    """
    wanted = list(dict.fromkeys(c for c in columns if c is not None))
    frames, origins = [], []
    left_out = 0
    for number, item in enumerate(batches):
        raw, df = _read_parquet(store, item["key"])
        if digest is not None:
            digest.update(hashlib.sha256(raw).digest())
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            have = ", ".join(map(str, df.columns)) or "(none)"
            raise ValueError(
                f"{_source_name(item, store)}: column(s) {', '.join(map(repr, missing))} are not in the table; "
                f"it has: {have}"
            )
        keep = np.ones(len(df), dtype=bool)
        if item.get("quarantine_key"):
            quarantine_raw, quarantine = _read_parquet(store, item["quarantine_key"])
            if digest is not None:
                digest.update(hashlib.sha256(quarantine_raw).digest())
            rows = quarantine["row"].to_numpy(dtype=np.int64)
            keep[rows[(rows >= 0) & (rows < len(df))]] = False
            left_out += int((~keep).sum())
        positions = np.flatnonzero(keep)
        frames.append(df.iloc[positions][wanted])
        origins.append(pd.DataFrame({"row": positions, "batch": number}))
    return pd.concat(frames, ignore_index=True), pd.concat(origins, ignore_index=True), left_out


def clean_batches(
    store: Store,
    batches: Sequence[Mapping[str, Any]],
    *,
    text_col: str,
    label_col: str,
    id_col: str | None = None,
    group_col: str | None = None,
    label_map: Mapping[Any, str] | None = None,
) -> pd.DataFrame:
    """The rows of ``batches`` (items as :func:`clean_snapshots` takes them) cleaned as it cleans them, but
    neither split nor written: :func:`clean_frame` of what validation did not quarantine."""
    df, _, _ = _read_batches(store, batches, columns=(text_col, label_col, id_col, group_col))
    return clean_frame(df, text_col=text_col, label_col=label_col, id_col=id_col, group_col=group_col,
                       label_map=label_map)


def clean_snapshots(
    store: Store,
    snapshots: Sequence[Mapping[str, Any]],
    *,
    text_col: str,
    label_col: str,
    id_col: str | None = None,
    group_col: str | None = None,
    label_map: Mapping[Any, str] | None = None,
    slice_cols: Sequence[str] = (),
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, Any]:
    """Clean, de-duplicate and split published snapshots into one table, ``cleaned/<hash>/data.parquet``.

    Several snapshots are the batches of one source, oldest first: their rows are concatenated (a text seen
    in an earlier batch keeps that row). Each row gets its ``split`` (:func:`maas_tasks.features.assign_splits`:
    whole groups, else ids, else texts, by a hash of each alone, so adding rows never moves a row between
    splits). Rows quarantined here go to ``cleaned/<hash>/quarantine.parquet``: ``row`` (0-based position in
    its snapshot), ``reason``, ``snapshot_sha256``, ``text`` and ``label`` as in the source. The key's hash
    covers the snapshots' and quarantines' bytes and every argument, so a re-run writes the same key; the
    table is written last, after its quarantine.

    Args:
        snapshots: each a mapping with ``key`` (the published Parquet), ``quarantine_key`` (validation's
            quarantine, whose ``row`` positions are dropped; or None) and optionally ``sha256`` and
            ``source``/``source_uri`` (named in messages).
        label_map: ``{raw label: class name}``; raw labels compare as :func:`normalize_label` strings.
        validation_fraction, test_fraction: the share of units (groups, ids or texts) each side holds.

    Returns:
        ``key``, ``rows`` (kept), ``dropped`` (input rows not kept, for any reason), ``quarantined`` (rows in
        the quarantine written here), ``quarantine_key`` (or None when nothing was quarantined), ``splits``
        (rows per split) and ``removed`` (rows per reason: ``validation_quarantine``, ``duplicate``, ``missing_text``,
        ``empty_text``, ``missing_label``, ``conflicting_labels``; reasons with no row are left out).

    Raises:
        ValueError: a column is missing, a label is not in ``label_map``, nothing is left after cleaning, or
            the split cannot give every class training rows (the message says what to change).
    """
    if not snapshots:
        raise ValueError("no snapshot to clean: pass at least one published snapshot")
    params = {
        "text_col": text_col, "label_col": label_col, "id_col": id_col, "group_col": group_col,
        "label_map": {str(k): str(v) for k, v in (label_map or {}).items()} or None, "slice_cols": list(slice_cols),
        "validation_fraction": validation_fraction, "test_fraction": test_fraction,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    names = " + ".join(dict.fromkeys(_source_name(item, store) for item in snapshots))
    df, origin, validation_dropped = _read_batches(
        store, snapshots, columns=(text_col, label_col, id_col, group_col, *slice_cols), digest=digest
    )
    try:
        out, triage = _triage(df, text_col=text_col, label_col=label_col, id_col=id_col, group_col=group_col,
                              label_map=label_map, slice_cols=slice_cols)
    except ValueError as exc:
        raise ValueError(f"{names}: {exc}") from None
    kept = triage["code"].isna()
    if not kept.any():
        raise ValueError(
            f"{names}: no row has both a label and non-empty text after cleaning ({len(df)} rows dropped); "
            "check the text and label columns and the source file"
        )
    cleaned = out[kept].reset_index(drop=True)
    try:
        cleaned.insert(2, "split", assign_splits(cleaned, validation_fraction=validation_fraction,
                                                 test_fraction=test_fraction))
        check_splits(cleaned)
    except ValueError as exc:
        raise ValueError(f"{names}: {exc}") from None

    prefix = f"cleaned/{digest.hexdigest()[:16]}"
    quarantined = triage["code"].notna() & (triage["code"] != "duplicate")
    quarantine_key = None
    if quarantined.any():
        shas = [item.get("sha256") for item in snapshots]
        table = pd.DataFrame({
            "row": origin.loc[quarantined, "row"].astype("int64"),
            "reason": triage.loc[quarantined, "reason"].astype("str"),
            "snapshot_sha256": origin.loc[quarantined, "batch"].map(lambda n: shas[n]).astype("str"),
            "text": df.loc[quarantined, text_col].astype("str"),
            "label": df.loc[quarantined, label_col].astype("str"),
        }).reset_index(drop=True)
        quarantine_key = f"{prefix}/quarantine.parquet"
        store.put_bytes(quarantine_key, _to_parquet(table))
    key = f"{prefix}/data.parquet"
    store.put_bytes(key, _to_parquet(cleaned))

    removed = {"validation_quarantine": validation_dropped, **triage["code"].value_counts().to_dict()}
    removed = {code: int(n) for code, n in removed.items() if n}
    splits = {name: int(n) for name, n in cleaned["split"].value_counts().reindex(
        ["train", "validation", "test"], fill_value=0).items()}
    total = len(df) + validation_dropped
    log.info(
        "cleaned %s: %d rows kept of %d (%s); split %s%s; quarantined %d", names, len(cleaned), total,
        ", ".join(f"{n} {code.replace('_', ' ')}" for code, n in removed.items()) or "none removed",
        ", ".join(f"{n} {name}" for name, n in splits.items()),
        " by group" if group_col else " by id" if id_col else " by text", int(quarantined.sum()),
    )
    return {
        "key": key,
        "rows": len(cleaned),
        "dropped": total - len(cleaned),
        "quarantined": int(quarantined.sum()),
        "quarantine_key": quarantine_key,
        "splits": splits,
        "removed": removed,
    }


def clean_snapshot(store: Store, snapshot_key: str, **options: Any) -> dict[str, Any]:
    """:func:`clean_snapshots` of the one Parquet snapshot at ``snapshot_key``, nothing quarantined before
    (``options``: its keyword arguments)."""
    return clean_snapshots(store, [{"key": snapshot_key, "quarantine_key": None}], **options)


def snapshot_batch(store: Store, snapshot: Any) -> dict[str, Any]:
    """The :func:`clean_snapshots` item of a registry snapshot record (a :class:`maas_tasks.registry.Snapshot`)."""
    return {
        "key": store_key(store, snapshot.uri),
        "quarantine_key": store_key(store, snapshot.quarantine_uri) if snapshot.quarantine_uri else None,
        "sha256": snapshot.sha256,
        "source": snapshot.source,
    }


def training_batches(
    store: Store, registry: Any, snapshot: Mapping[str, Any], *, window: int | None = None
) -> list[dict[str, Any]]:
    """What to train on after validating ``snapshot`` (validation's reference): the :func:`clean_snapshots`
    items, oldest first.

    A source read by watermark (PostgreSQL) delivers a batch of new rows per run: every batch of it so far is
    trained on, or only the newest ``window`` of them. Any other snapshot holds the whole dataset, so it is
    trained on alone.
    """
    record = registry.get_snapshot(snapshot["snapshot_id"])
    if record.watermark is None or not record.source_uri:
        return [snapshot_batch(store, record)]
    return [snapshot_batch(store, batch) for batch in registry.list_snapshots(record.source_uri, last=window or None)]


def _to_parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()
