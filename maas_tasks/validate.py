"""Data checks on a raw snapshot before it is published: the gate between "a file arrived" and "we train on it".

The checks are a Great Expectations suite, so what was checked and found is a standard GX validation result,
saved as JSON with its rendered Data Docs page in the store beside the snapshot. Two kinds of check:

- Row checks (no text, a blank, too short or too long text, bytes that were not UTF-8, no label, a label
  outside the label map, a repeated id) condemn single rows, not the data: those rows are listed in a
  quarantine file with their reasons, and the run goes on while they are few (``max_quarantine_fraction``).
  The snapshot is published unchanged (raw input is never modified); cleaning leaves the quarantined rows out.
- Table checks (the named columns exist, the text column holds text, few enough rows quarantined, and, on the
  rows kept: enough of them, two classes or more, no class too rare, not too many repeated texts) judge the
  data as a whole. One failing stops the run with one message: what is wrong, where, and what to change.

Great Expectations is imported inside the functions: it takes seconds to import and DAG files must parse quickly.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maas_tasks.clean import normalize_label, normalize_labels
from maas_tasks.sources import UNDECODABLE
from maas_tasks.storage import Store, delete_prefix, store_key, upload_tree

log = logging.getLogger(__name__)

SUITE_NAME = "maas_labeled_text"
RESULT_FILE = "result.json"
DOCS_DIR = "docs"
DOCS_INDEX = "index.html"
QUARANTINE_FILE = "rows.parquet"
# Columns added to the table the suite checks (never to the snapshot), so that table checks can judge the rows
# kept: whether a row is quarantined, its class (after the label map), and the share of the kept rows in it.
QUARANTINED_COLUMN = "maas:quarantined"
CLASS_COLUMN = "maas:class"
CLASS_SHARE_COLUMN = "maas:class_share"

LABEL_NOT_IN_MAP = "label not in the label map"
_EXAMPLES = 3
_EXAMPLE_CHARS = 60
# Longer values are cut in the saved result and in Data Docs: a 10 MB review must not make a 10 MB page.
_RESULT_VALUE_CHARS = 200
_OPTIONS = {"text": "--text-col", "label": "--label-col", "id": "--id-col", "group": "--group-col"}
_LINK = re.compile(r"""(?:href|src)=["']([^"'#?]+)""")


class DataValidationError(ValueError):
    """The data failed a table check; the message lists each failure and how to fix it.

    ``summary`` is the summary a success would have returned, with ``success`` False and ``failures``;
    ``validation`` is the whole :class:`FrameValidation`, reports included.
    """

    def __init__(self, message: str, summary: dict[str, Any], validation: FrameValidation | None = None) -> None:
        super().__init__(message)
        self.summary = summary
        self.validation = validation


@dataclass(frozen=True)
class FrameValidation:
    """What :func:`validate_frame` found.

    ``summary`` is small and JSON-able (what the registry keeps). ``quarantine`` has one row per quarantined
    row: ``row`` (its 0-based position), ``reason`` (each reason it failed, joined by ``"; "``), then every
    source column as strings. ``result`` is the Great Expectations validation result as a JSON dict;
    ``docs_page`` the path of its Data Docs page in the site built (None when none was).
    """

    summary: dict[str, Any]
    quarantine: pd.DataFrame
    result: dict[str, Any]
    docs_page: str | None = None

    @property
    def success(self) -> bool:
        return bool(self.summary["success"])


@dataclass(frozen=True)
class _RowCheck:
    """A row check: its expectation and, per quarantine reason, the rows that fail it."""

    check: str
    column: str
    expectation: Any
    failing: dict[str, pd.Series]
    around: str | None = None  # what the examples of failing values are centred on

    def mask(self) -> np.ndarray:
        return np.logical_or.reduce([m.to_numpy(dtype=bool) for m in self.failing.values()])


def _meta(check: str, level: str) -> dict[str, str]:
    return {"check": check, "level": level}


def _is_text(values: pd.Series) -> bool:
    return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")


def _label_names(labels: pd.Series) -> pd.Series:
    """Labels as the class-name strings later stages use (``1``, ``"1"`` and ``"1.0"`` alike); blank ones are
    missing."""
    names = normalize_labels(labels)
    return names.mask(names == "")


def _row_checks(
    frame: pd.DataFrame, labels: pd.Series | None, *, text_col: str | None, label_col: str, id_col: str | None,
    known_labels: list[str] | None, min_text_chars: int, max_text_chars: int, mostly: float,
) -> list[_RowCheck]:
    """The row checks of the columns there are, each with vectorised masks of its failing rows: the same
    predicates as its expectation, so the quarantine holds the rows the result counts.

    Each expectation passes while at most ``1 - mostly`` of the rows fail it, as the run goes on while at most
    that share is quarantined: GX's verdict on the data is the run's.
    """
    import great_expectations.expectations as gxe

    checks: list[_RowCheck] = []

    def add(check: str, column: str, expectation: type, description: str, failing: dict[str, pd.Series],
            around: str | None = None, **kwargs: Any) -> None:
        checks.append(_RowCheck(check, column, expectation(
            column=column, mostly=mostly, description=description, meta=_meta(check, "row"), **kwargs
        ), failing, around))

    if text_col is not None:
        text = frame[text_col]
        present = text.notna()
        length = text.str.len()
        add("text_not_null", text_col, gxe.ExpectColumnValuesToNotBeNull, f"every row has a text in {text_col!r}",
            {"no text": ~present})
        # \S anywhere means the text is not blank once stripped.
        add("text_not_blank", text_col, gxe.ExpectColumnValuesToMatchRegex, "no text is blank",
            {"blank text": present & ~text.str.contains(r"\S", regex=True).fillna(False)}, regex=r"\S")
        add("text_length", text_col, gxe.ExpectColumnValueLengthsToBeBetween,
            f"every text is {min_text_chars:,} to {max_text_chars:,} characters long", {
                f"text shorter than {_chars(min_text_chars)}": present & (length < min_text_chars),
                f"text longer than {_chars(max_text_chars)}": present & (length > max_text_chars),
            }, min_value=min_text_chars, max_value=max_text_chars)
    if labels is not None:
        add("label_not_null", label_col, gxe.ExpectColumnValuesToNotBeNull, f"every row has a label in {label_col!r}",
            {"no label": labels.isna()})
        if known_labels is not None:
            add("label_in_map", label_col, gxe.ExpectColumnValuesToBeInSet,
                f"every label is one the label map names: {', '.join(known_labels)}",
                {LABEL_NOT_IN_MAP: labels.notna() & ~labels.isin(known_labels)}, value_set=known_labels)
    for col in frame.columns:
        if _is_text(frame[col]):
            # Ingest reads a run of bytes that are not UTF-8 as one U+FFFD, in whichever field it fell.
            add(f"decodable:{col}", col, gxe.ExpectColumnValuesToNotMatchRegex,
                f"no value of {col!r} holds bytes that are not UTF-8 (read as U+FFFD)",
                {f"bytes that are not UTF-8 in {col!r}": frame[col].str.contains(UNDECODABLE, regex=False)
                 .fillna(False)}, around=UNDECODABLE, regex=UNDECODABLE)
    if id_col is not None:
        ids = frame[id_col]
        # The share of distinct ids, not ExpectColumnValuesToBeUnique: that counts every copy of a repeated id,
        # while the quarantine keeps the first and sets the repeats aside; this tolerates as many as it does.
        checks.append(_RowCheck("id_unique", id_col, gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=id_col, min_value=mostly, description=f"the ids in {id_col!r} are unique",
            meta=_meta("id_unique", "row"),
        ), {"repeated id (an earlier row has it)": ids.notna() & ids.duplicated(keep="first")}))
    return checks


def _column_expectations(columns: dict[str, str], text_col: str | None) -> list:
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectColumnToExist(
            column=col, description=f"the {role} column {col!r} exists", meta=_meta(f"{role}_column", "table")
        )
        for role, col in columns.items()
    ]
    if text_col is not None:
        expectations.append(gxe.ExpectColumnValuesToBeOfType(
            column=text_col, type_="str", description=f"column {text_col!r} holds text", meta=_meta("text_type", "table")
        ))
    return expectations


def _kept_row_expectations(
    *, text_col: str | None, has_labels: bool, max_quarantine_fraction: float, min_rows: int,
    max_duplicate_fraction: float, min_class_fraction: float,
) -> list:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    kept = Column(QUARANTINED_COLUMN) == False  # noqa: E712 (a GX row condition, not a Python comparison)
    expectations = [
        gxe.ExpectColumnMeanToBeBetween(
            column=QUARANTINED_COLUMN, max_value=max_quarantine_fraction,
            description=f"at most {max_quarantine_fraction:.1%} of the rows fail a row check (quarantined)",
            meta=_meta("quarantine_share", "table"),
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=min_rows, row_condition=kept, description=f"at least {min_rows:,} rows pass the row checks",
            meta=_meta("row_count", "table"),
        ),
    ]
    if has_labels:
        expectations += [
            gxe.ExpectColumnUniqueValueCountToBeBetween(
                column=CLASS_COLUMN, min_value=2, row_condition=kept, description="the rows kept have 2 classes or more",
                meta=_meta("class_count", "table"),
            ),
            gxe.ExpectColumnMinToBeBetween(
                column=CLASS_SHARE_COLUMN, min_value=min_class_fraction,
                description=f"every class has at least {min_class_fraction:.1%} of the rows kept",
                meta=_meta("class_balance", "table"),
            ),
        ]
    if text_col is not None:
        expectations.append(gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column=text_col, min_value=1 - max_duplicate_fraction, row_condition=kept,
            description=f"at most {max_duplicate_fraction:.1%} of the rows kept repeat an earlier row's text",
            meta=_meta("duplicate_share", "table"),
        ))
    return expectations


def _quiet_great_expectations() -> None:
    """Keep Great Expectations' INFO lines (hundreds, as it registers its classes on import) out of task
    logs; its warnings and errors still show, and a level configured explicitly is left alone."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _RESULT_VALUE_CHARS:
        return value[: _RESULT_VALUE_CHARS - 1] + "…"
    return value


def _shorten_examples(result: Any) -> None:
    """Cut long example values in a GX result, in place (counts and row indices stay exact)."""
    for item in result.results:
        found = item.result
        if "partial_unexpected_list" in found:
            found["partial_unexpected_list"] = [_shorten(v) for v in found["partial_unexpected_list"]]
        if "partial_unexpected_counts" in found:
            found["partial_unexpected_counts"] = [
                {**entry, "value": _shorten(entry["value"])} for entry in found["partial_unexpected_counts"]
            ]


def _run_suite(batch: pd.DataFrame, expectations: list, *, docs_dir: Path | None, run_name: str | None) -> Any:
    """Run the expectations on ``batch`` in an ephemeral context (in-memory stores, no usage reporting; a few
    milliseconds to create) and, given a ``docs_dir``, build there the Data Docs site of this one result."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["maas"] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "show_how_to_buttons": False,  # GX's tutorial links, not about this data
        }
    config = DataContextConfig(
        analytics_enabled=False,  # no usage reporting over the network from a pipeline task
        progress_bars=ProgressBarsConfig(globally=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("maas").add_dataframe_asset("snapshot")
    # Built whole: adding expectations one by one re-serialises the suite into its store each time.
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    validation = context.validation_definitions.add(gx.ValidationDefinition(
        name=SUITE_NAME, data=asset.add_batch_definition_whole_dataframe("snapshot"), suite=suite
    ))
    result = validation.run(
        batch_parameters={"dataframe": batch}, result_format="SUMMARY", run_id=RunIdentifier(run_name=run_name)
    )
    _shorten_examples(result)
    if docs_dir is not None:
        # The run stored the result before it was shortened; Data Docs are rendered from the stored copy.
        results_store = context.validation_results_store
        (key,) = results_store.list_keys()
        results_store.set(key, result)
        context.build_data_docs()
    return result


def _excerpt(value: Any, *, around: str | None = None) -> str:
    """A value for a message: quoted and cut to about 60 characters (around the first ``around`` if given)."""
    if pd.isna(value):
        return "(missing)"
    text = str(value)
    start = max(0, text.find(around) - _EXAMPLE_CHARS // 3) if around and around in text else 0
    end = start + _EXAMPLE_CHARS
    return repr(("…" if start else "") + text[start:end] + ("…" if end < len(text) else ""))


def _examples(values: pd.Series, mask: np.ndarray, *, around: str | None = None) -> list[dict[str, Any]]:
    """The first few rows of ``mask``: their position and ``values`` excerpt."""
    return [
        {"row": int(row), "value": _excerpt(values.iat[row], around=around)}
        for row in np.flatnonzero(mask)[:_EXAMPLES]
    ]


def _format_examples(examples: list[dict[str, Any]]) -> str:
    return ", ".join(f"row {e['row']}: {e['value']}" for e in examples)


def _rows(count: int) -> str:
    return f"{count:,} row{'' if count == 1 else 's'}"


def _chars(count: int) -> str:
    return f"{count:,} character{'' if count == 1 else 's'}"


def _quarantine_table(frame: pd.DataFrame, checks: list[_RowCheck], quarantined: np.ndarray) -> pd.DataFrame:
    """One row per quarantined row: its position, every reason it failed, and the source row as strings."""
    positions = np.flatnonzero(quarantined)
    reasons = np.full(len(positions), "", dtype=object)
    for check in checks:
        for reason, mask in check.failing.items():
            hit = mask.to_numpy(dtype=bool)[positions]
            reasons[hit] = np.where(reasons[hit] == "", reason, reasons[hit] + "; " + reason)
    table = pd.DataFrame({"row": positions.astype("int64"), "reason": pd.array(reasons, dtype="string")})
    rows = frame.iloc[positions]
    for col in frame.columns:
        # A source column named like one of ours keeps its values under "source:<name>".
        table[f"source:{col}" if col in ("row", "reason") else col] = rows[col].astype("string").array
    return table


def _describe_failures(
    failed: set[str], frame: pd.DataFrame, summary: dict[str, Any], columns: dict[str, str], *, kept: np.ndarray,
    classes: pd.Series | None, text_col: str | None, label_col: str, max_quarantine_fraction: float, min_rows: int,
    max_duplicate_fraction: float, min_class_fraction: float,
) -> list[str]:
    """One sentence per failed table check (what, where, how to fix it), leaving out the checks of the rows
    kept when there are too few of them to judge (an empty table has no second class either)."""
    if len(frame.columns) == 0:
        return ["the table has no columns at all: the file is empty or has no header row; check the source file"]
    have = ", ".join(frame.columns)
    messages = []
    for role, col in columns.items():
        if f"{role}_column" in failed:
            optional = "" if role in ("text", "label") else " or leave it out"
            messages.append(
                f"column {col!r} (the {role} column) is missing; the file has columns: {have}; "
                f"pass {_OPTIONS[role]} with the right name{optional}"
            )
    if "text_type" in failed:
        odd = frame[text_col].dropna().map(type)
        odd = odd[odd != str]
        kind = odd.iat[0].__name__ if len(odd) else str(frame[text_col].dtype)
        messages.append(
            f"column {text_col!r} holds {kind} values, not text; check that --text-col names the column of texts"
        )
    total, n_kept = len(frame), int(kept.sum())
    if "quarantine_share" in failed and total:
        reasons = "; ".join(
            f"{_rows(found['rows'])} with {reason} ({_format_examples(found['examples'])})"
            for reason, found in summary["quarantine"].items()
        )
        unmapped = ", add their labels to --label-map" if LABEL_NOT_IN_MAP in summary["quarantine"] else ""
        messages.append(
            f"{_rows(total - n_kept)} of {total:,} ({(total - n_kept) / total:.1%}) "
            f"{'fails' if total - n_kept == 1 else 'fail'} a row check, more than max_quarantine_fraction allows "
            f"({max_quarantine_fraction:.1%}): {reasons}; fix those rows in the source (rows are numbered from 0)"
            f"{unmapped}, or raise max_quarantine_fraction"
        )
    if "row_count" in failed:
        if total == 0:
            messages.append(f"the table is empty (0 rows, at least {min_rows:,} needed); check the source file")
        elif n_kept < total:
            messages.append(
                f"only {n_kept:,} of {total:,} rows pass the row checks, at least {min_rows:,} needed; "
                "fix the rows that fail or add more labeled rows"
            )
        else:
            messages.append(f"the table has {_rows(total)}, at least {min_rows:,} needed; add more labeled rows")
        return messages
    if "class_count" in failed:
        names = classes[kept].dropna().unique().tolist()
        messages.append(
            f"the {n_kept:,} rows kept have {len(names)} class(es) in column {label_col!r} "
            f"({', '.join(map(repr, names[:_EXAMPLES])) or 'none'}); a classifier needs at least 2: add rows of "
            "the other class(es), or check --label-col and --label-map"
        )
    if "class_balance" in failed:
        counts = classes[kept].value_counts()
        rare = counts[counts / n_kept < min_class_fraction].sort_values()
        shown = ", ".join(
            f"{name!r} ({_rows(count)}, {count / n_kept:.1%})" for name, count in rare.head(_EXAMPLES).items()
        )
        messages.append(
            f"{len(rare)} class(es) have less than min_class_fraction ({min_class_fraction:.1%}) of the "
            f"{n_kept:,} rows kept: {shown}; add rows of those classes, merge them into others with --label-map, "
            "or lower min_class_fraction"
        )
    if "duplicate_share" in failed:
        repeats = np.zeros(total, dtype=bool)
        repeats[kept] = frame[text_col][kept].duplicated(keep="first").to_numpy()
        messages.append(
            f"{_rows(int(repeats.sum()))} of the {n_kept:,} kept ({repeats.sum() / n_kept:.1%}) repeat an earlier "
            f"row's text, more than max_duplicate_fraction allows ({max_duplicate_fraction:.1%}) "
            f"({_format_examples(_examples(frame[text_col], repeats))}); check that --text-col names the column "
            "of texts, or remove the copies from the source"
        )
    return messages


def _check_entry(expectation: Any, found: Any, quarantined: dict[str, int]) -> dict[str, Any]:
    """An expectation's outcome for the summary: what it checked, whether it passed, and what it saw."""
    check = expectation.meta["check"]
    entry = {
        "check": check, "level": expectation.meta["level"], "expectation": found.expectation_config.type,
        "description": expectation.description, "success": bool(found.success),
    }
    if check in quarantined:
        entry["quarantined"] = quarantined[check]
    elif "observed_value" in found.result:
        observed = found.result["observed_value"]
        entry["observed"] = observed.item() if isinstance(observed, np.generic) else observed
    return entry


def validate_frame(
    df: pd.DataFrame,
    *,
    text_col: str,
    label_col: str,
    id_col: str | None = None,
    group_col: str | None = None,
    label_map: Mapping[str, str] | None = None,
    max_quarantine_fraction: float = 0.05,
    min_rows: int = 2,
    min_text_chars: int = 1,
    max_text_chars: int = 100_000,
    max_duplicate_fraction: float = 0.5,
    min_class_fraction: float = 0.0,
    docs_dir: Path | None = None,
    run_name: str | None = None,
) -> FrameValidation:
    """Check that ``df`` is usable labeled text with the Great Expectations suite, and find the rows to quarantine.

    Args:
        df: the raw table, every source column as read.
        text_col, label_col: the columns holding the text and its class. ``id_col``, ``group_col``: optional
            columns that must exist when named; ids must be unique (each repeat is quarantined).
        label_map: ``{raw label: class name}``; a row whose label is not a key is quarantined. Labels are
            compared as class-name strings (``1``, ``"1"`` and ``"1.0"`` are one label).
        max_quarantine_fraction: the largest share of the rows that may fail a row check.
        min_rows: the least number of rows that must pass the row checks.
        min_text_chars, max_text_chars: the bounds of a text's length, in characters.
        max_duplicate_fraction: the largest share of the rows kept whose text repeats an earlier row's.
        min_class_fraction: the least share of the rows kept that every class must have.
        docs_dir: where to build the Data Docs site (``index.html`` and the pages it links); None: no docs.
        run_name: the run the result and its page are filed under (the DAG run id).

    Returns:
        The :class:`FrameValidation`. Its ``summary`` has ``success``, ``rows``, ``kept_rows``,
        ``quarantined_rows``, ``columns``, ``labels`` (class -> rows kept), ``quarantine`` (reason -> ``rows``
        and ``examples``), ``checks`` (per expectation: ``check``, ``level`` "row" or "table", ``expectation``,
        ``description``, ``success``, and ``quarantined`` rows or the ``observed`` value) and
        ``great_expectations`` (its version).

    Raises:
        DataValidationError: a table check failed; the message explains each failure and its fix, ``.summary``
            is the summary (``success`` False, with ``failures``) and ``.validation`` the whole result.
    """
    _quiet_great_expectations()  # before the import: registering its classes logs hundreds of INFO lines
    import great_expectations as gx

    # Positional row indices (GX's examples then give positions, as the quarantine does) and string column names.
    frame = df.reset_index(drop=True).rename(columns=str)
    columns = {
        role: col for role, col in (("text", text_col), ("label", label_col), ("id", id_col), ("group", group_col))
        if col is not None
    }
    text = text_col if text_col in frame.columns else None
    # A text column that holds no text fails its type check; its rows are not checked one by one.
    text_checked = text if text is not None and _is_text(frame[text]) else None
    labels = _label_names(frame[label_col]) if label_col in frame.columns else None
    mapping = None if label_map is None else {normalize_label(raw): str(name) for raw, name in label_map.items()}

    row_checks = _row_checks(
        frame, labels, text_col=text_checked, label_col=label_col,
        id_col=id_col if id_col in frame.columns else None, known_labels=None if mapping is None else sorted(mapping),
        min_text_chars=min_text_chars, max_text_chars=max_text_chars, mostly=1 - max_quarantine_fraction,
    )
    quarantined = np.zeros(len(frame), dtype=bool)
    for check in row_checks:
        quarantined |= check.mask()
    kept = ~quarantined
    batch = frame.assign(**{QUARANTINED_COLUMN: quarantined})
    classes = None
    if labels is not None:
        classes = labels if mapping is None else labels.map(mapping)
        share = classes.map(classes[kept].value_counts(normalize=True)).where(kept).astype(float)
        batch = batch.assign(**{label_col: labels, CLASS_COLUMN: classes, CLASS_SHARE_COLUMN: share})

    expectations = [
        *_column_expectations(columns, text),
        *(check.expectation for check in row_checks),
        *_kept_row_expectations(
            text_col=text_checked, has_labels=labels is not None, max_quarantine_fraction=max_quarantine_fraction, min_rows=min_rows,
            max_duplicate_fraction=max_duplicate_fraction, min_class_fraction=min_class_fraction,
        ),
    ]
    result = _run_suite(batch, expectations, docs_dir=docs_dir, run_name=run_name)

    found = {item.expectation_config.meta["check"]: item for item in result.results}
    row_counts = {check.check: int(check.mask().sum()) for check in row_checks}
    checks = [_check_entry(e, found[e.meta["check"]], row_counts) for e in expectations]
    quarantine = {
        reason: {"rows": int(mask.sum()), "examples": _examples(frame[check.column], mask.to_numpy(dtype=bool),
                                                                around=check.around)}
        for check in row_checks for reason, mask in check.failing.items() if mask.any()
    }
    failed = {c["check"] for c in checks if c["level"] == "table" and not c["success"]}
    summary: dict[str, Any] = {
        "success": not failed,
        "rows": len(frame),
        "kept_rows": int(kept.sum()),
        "quarantined_rows": int(quarantined.sum()),
        "columns": list(frame.columns),
        "labels": {} if classes is None else {
            str(name): int(count) for name, count in classes[kept].value_counts().sort_index().items()
        },
        "quarantine": quarantine,
        "checks": checks,
        "great_expectations": gx.__version__,
    }
    # The site's index lists the result with JavaScript from CDNs; its own page is plain HTML (readable offline).
    docs_page = None if docs_dir is None else next(docs_dir.glob("validations/**/*.html")).relative_to(docs_dir)
    validation = FrameValidation(
        summary, _quarantine_table(frame, row_checks, quarantined), result.to_json_dict(),
        None if docs_page is None else docs_page.as_posix(),
    )
    if not failed:
        return validation
    failures = _describe_failures(
        failed, frame, summary, columns, kept=kept, classes=classes, text_col=text, label_col=label_col,
        max_quarantine_fraction=max_quarantine_fraction, min_rows=min_rows,
        max_duplicate_fraction=max_duplicate_fraction, min_class_fraction=min_class_fraction,
    )
    summary["failures"] = failures
    message = f"data validation failed ({len(failures)} problem(s)):\n" + "\n".join(f"- {m}" for m in failures)
    raise DataValidationError(message, summary, validation)


def log_validation_summary(source: str, summary: dict[str, Any]) -> None:
    """Log what was checked: rows and columns, each expectation with its outcome, the classes of the rows
    kept, the quarantine by reason with examples, and any failures."""
    checks = summary.get("checks") or []
    log.info(
        "data checks of %s (Great Expectations %s): %s, columns %s; %d of %d expectations passed",
        source, summary.get("great_expectations", "?"), _rows(summary.get("rows", 0)),
        ", ".join(summary.get("columns") or []) or "(none)", sum(1 for c in checks if c["success"]), len(checks),
    )
    for check in checks:
        note = f" ({_rows(check['quarantined'])} quarantined)" if check.get("quarantined") else ""
        log.info("  %-6s %s%s", "passed" if check["success"] else "FAILED", check["description"], note)
    if summary.get("labels"):
        log.info("classes of the rows kept: %s", ", ".join(
            f"{label} ({_rows(count)})" for label, count in summary["labels"].items()
        ))
    if summary.get("quarantined_rows"):
        log.info(
            "quarantined %s of %s (%.2f%%):", _rows(summary["quarantined_rows"]), f"{summary['rows']:,}",
            100 * summary["quarantined_rows"] / summary["rows"],
        )
        for reason, found in summary["quarantine"].items():
            log.info("  %s with %s: %s", _rows(found["rows"]), reason, _format_examples(found["examples"]))
    for failure in summary.get("failures") or []:
        log.error("problem: %s", failure)


def validate_snapshot(store: Store, key: str, **checks: Any) -> dict[str, Any]:
    """Read the Parquet snapshot at ``key`` and run :func:`validate_frame` on it, ``checks`` being its keyword
    arguments; returns ``key`` and the summary (errors name the object)."""
    df = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    try:
        validation = validate_frame(df, **checks)
    except DataValidationError as exc:
        raise DataValidationError(f"{store.uri(key)}: {exc}", {"key": key, **exc.summary}, exc.validation) from None
    return {"key": key, **validation.summary}


def _keep_linked_files(site: Path) -> None:
    """Delete what the Data Docs build copied but no page links (4 MB of fonts and images GX ships)."""
    pages = set(site.rglob("*.html"))
    linked = {
        (page.parent / target).resolve()
        for page in pages for target in _LINK.findall(page.read_text(encoding="utf-8")) if "://" not in target
    }
    for path in site.rglob("*"):
        if path.is_file() and path not in pages and path.resolve() not in linked:
            path.unlink()


def _store_reports(store: Store, sha256: str, validation: FrameValidation, docs_dir: Path) -> dict[str, str | None]:
    """Write the result JSON, the Data Docs tree and the quarantine of ``sha256``; returns their keys (the
    quarantine's None when no row was quarantined: a stale one from an earlier try is removed)."""
    prefix = f"validation/{sha256}"
    docs = f"{prefix}/{DOCS_DIR}"
    result_key = f"{prefix}/{RESULT_FILE}"
    store.put_bytes(result_key, json.dumps(validation.result, indent=2).encode())
    # A retry files its page under a new run time: the earlier tree goes, so the index lists one validation.
    delete_prefix(store, docs)
    _keep_linked_files(docs_dir)
    upload_tree(store, docs_dir, docs)
    quarantine_key: str | None = f"quarantine/{sha256}/{QUARANTINE_FILE}"
    if len(validation.quarantine):
        buffer = io.BytesIO()
        validation.quarantine.to_parquet(buffer, index=False)
        store.put_bytes(quarantine_key, buffer.getvalue())
    else:
        store.delete(quarantine_key)
        quarantine_key = None
    return {
        "result": result_key, "docs": f"{docs}/{DOCS_INDEX}", "page": f"{docs}/{validation.docs_page}",
        "quarantine": quarantine_key,
    }


def _recorded_reference(store: Store, registry: Any, snapshot_id: int) -> dict[str, Any]:
    """The reference of a snapshot validated and recorded before, from the registry."""
    snapshot = registry.get_snapshot(snapshot_id)
    return {
        "key": store_key(store, snapshot.uri), "uri": snapshot.uri, "sha256": snapshot.sha256, "rows": snapshot.rows,
        "snapshot_id": snapshot.id, "source_uri": snapshot.source_uri, "new": False,
        "quarantine_key": store_key(store, snapshot.quarantine_uri) if snapshot.quarantine_uri else None,
        "quarantined_rows": snapshot.quarantined_rows,
        "validation_uri": snapshot.validation_uri, "docs_uri": snapshot.docs_uri,
    }


def validate_staged_snapshot(
    store: Store,
    registry: Any,
    staged: dict[str, Any],
    *,
    text_col: str,
    label_col: str,
    id_col: str | None = None,
    group_col: str | None = None,
    label_map: Mapping[str, str] | None = None,
    max_quarantine_fraction: float = 0.05,
    min_rows: int = 2,
    min_text_chars: int = 1,
    max_text_chars: int = 100_000,
    max_duplicate_fraction: float = 0.5,
    min_class_fraction: float = 0.0,
    dag_run_id: str | None = None,
) -> dict[str, Any]:
    """Validate a snapshot staged by ingest (the checks of :func:`validate_frame`), then publish or discard it.

    Either way the GX result (``validation/<sha>/result.json``), its Data Docs (``validation/<sha>/docs/``; the
    validation's page, ``docs_uri``, is plain HTML that opens from the store in a browser without a network) and the quarantined rows (``quarantine/<sha>/rows.parquet``)
    are written to the store. Good data is published unchanged (every raw row) under ``snapshots/`` and
    recorded in the registry with those reports; bad data is deleted from staging and the failure is logged in
    the registry's event log, naming the reports. Rows ingest had seen before (``staged["new"]`` False) are not
    validated again: the recorded reference is returned. Safe to retry: a retry after the staged copy was
    published validates the published copy and records the same.

    Returns:
        ``key``, ``uri``, ``sha256``, ``rows`` of the published snapshot, ``snapshot_id``, ``source_uri``,
        ``new``, ``quarantine_key`` (None when no row was quarantined), ``quarantined_rows``,
        ``validation_uri`` and ``docs_uri``.

    Raises:
        DataValidationError: a table check failed; the message says which, how to fix it, and where the report is.
        ObjectNotFound: the staged copy is gone and was never published (re-run from ingest).
    """
    from maas_tasks.ingest import discard_snapshot, is_published, publish_snapshot, snapshot_key
    from maas_tasks.storage import ObjectNotFound

    if not staged["new"]:
        reference = _recorded_reference(store, registry, staged["snapshot_id"])
        log.info(
            "%s: these rows were validated before (snapshot %d, report %s); not validating them again",
            staged["source"], reference["snapshot_id"], reference["docs_uri"] or "not recorded",
        )
        return reference
    sha256 = staged["sha256"]
    if store.exists(staged["key"]):
        key = staged["key"]
    elif is_published(store, sha256):
        key = snapshot_key(sha256)
    else:
        raise ObjectNotFound(
            f"the staged snapshot of {staged['source']} ({store.uri(staged['key'])}) is gone and was never "
            "published; run the DAG again from ingest_data"
        )
    df = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    failure = None
    with tempfile.TemporaryDirectory(prefix="maas-validate-") as tmp:
        docs_dir = Path(tmp) / DOCS_DIR
        try:
            validation = validate_frame(
                df, text_col=text_col, label_col=label_col, id_col=id_col, group_col=group_col, label_map=label_map,
                max_quarantine_fraction=max_quarantine_fraction, min_rows=min_rows, min_text_chars=min_text_chars,
                max_text_chars=max_text_chars, max_duplicate_fraction=max_duplicate_fraction,
                min_class_fraction=min_class_fraction, docs_dir=docs_dir, run_name=dag_run_id,
            )
        except DataValidationError as exc:
            failure, validation = exc, exc.validation
        keys = _store_reports(store, sha256, validation, docs_dir)
    uris = {name: store.uri(k) if k else None for name, k in keys.items()}
    summary = validation.summary
    log_validation_summary(staged["source"], summary)
    if failure is not None:
        discard_snapshot(store, staged)
        where = f"the validation report: {uris['page']}"
        if uris["quarantine"]:
            where += f"; the rows that failed a row check: {uris['quarantine']}"
        message = f"{staged['source']}: {failure}\nSee {where}"
        registry.record_event("validation_failed", detail={
            "dag_run_id": dag_run_id, "source": staged["source"], "source_uri": staged.get("source_uri"),
            "sha256": sha256, "message": message, "validation_uri": uris["result"], "docs_uri": uris["page"],
            "docs_index_uri": uris["docs"], "quarantine_uri": uris["quarantine"], "quarantined_rows": summary["quarantined_rows"],
        })
        raise DataValidationError(message, summary, validation) from None
    published = publish_snapshot(store, staged)
    snapshot_id = registry.record_snapshot(
        published["uri"], sha256, published["rows"], published["source"],
        metadata={
            "text_col": text_col, "label_col": label_col, "id_col": id_col, "group_col": group_col,
            "label_map": None if label_map is None else dict(label_map), "labels": summary["labels"],
            "dag_run_id": dag_run_id,
        },
        columns=published["columns"], source_uri=staged.get("source_uri"), schema=staged.get("schema"),
        watermark=tuple(staged["watermark"]) if staged.get("watermark") else None,
    )
    registry.set_snapshot_reports(
        snapshot_id, validation=summary, validation_uri=uris["result"], docs_uri=uris["page"],
        quarantine_uri=uris["quarantine"], quarantined_rows=summary["quarantined_rows"],
    )
    return {
        "key": published["key"], "uri": published["uri"], "sha256": sha256, "rows": published["rows"],
        "snapshot_id": snapshot_id, "source_uri": staged.get("source_uri"), "new": True,
        "quarantine_key": keys["quarantine"], "quarantined_rows": summary["quarantined_rows"],
        "validation_uri": uris["result"], "docs_uri": uris["page"],
    }
