"""Data checks on a raw snapshot before it is published: the gate between "a file arrived" and "we train on it".

The checks run as a Great Expectations suite (columns exist, no nulls, labels known and at least two
of them, non-blank texts, enough rows) so the results are the standard GX validation results; this
module turns a failed run into one readable message that says which check failed, on which column,
how many rows, a few bad values, and what to change. Great Expectations is imported inside the
functions: it is slow to import and DAG files must parse quickly.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pandas as pd

from maas_tasks.clean import normalize_label
from maas_tasks.storage import Store

log = logging.getLogger(__name__)

_EXAMPLES = 3


class DataValidationError(ValueError):
    """The data failed one or more checks; the message lists each failure and how to fix it."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _build_expectations(text_col: str, label_col: str, allowed_labels: list[str] | None, min_rows: int) -> list:
    import great_expectations.expectations as gxe

    def meta(check: str, description: str) -> dict[str, str]:
        return {"check": check, "description": description}

    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, meta=meta("row_count", f"at least {min_rows} rows")),
        gxe.ExpectColumnToExist(column=text_col, meta=meta("text_exists", f"text column {text_col!r} exists")),
        gxe.ExpectColumnToExist(column=label_col, meta=meta("label_exists", f"label column {label_col!r} exists")),
        gxe.ExpectColumnValuesToNotBeNull(column=text_col, meta=meta("text_not_null", "every row has a text")),
        gxe.ExpectColumnValuesToNotBeNull(column=label_col, meta=meta("label_not_null", "every row has a label")),
        # \S anywhere means the text is not blank once stripped.
        gxe.ExpectColumnValuesToMatchRegex(
            column=text_col, regex=r"\S", meta=meta("text_not_blank", "no text is blank")
        ),
        gxe.ExpectColumnUniqueValueCountToBeBetween(
            column=label_col, min_value=2, meta=meta("label_count", "at least 2 distinct labels")
        ),
    ]
    if allowed_labels is not None:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=label_col, value_set=list(allowed_labels),
                meta=meta("label_in_set", f"every label is one of {', '.join(map(repr, allowed_labels))}"),
            )
        )
    return expectations


def _quiet_great_expectations() -> None:
    """Keep Great Expectations' INFO lines (hundreds, as it registers its classes on import) out of task
    logs; its warnings and errors still show, and a level configured explicitly is left alone."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _run_suite(df: pd.DataFrame, expectations: list) -> list:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        analytics_enabled=False,  # no usage reporting over the network from a pipeline task
        progress_bars=ProgressBarsConfig(globally=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("maas").add_dataframe_asset("snapshot")
    batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(gx.ExpectationSuite(name="maas_labeled_text"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="maas_labeled_text", data=batch_definition, suite=suite)
    )
    result = validation.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
    return list(result.results)


def _examples(result: dict) -> str:
    values = result.get("partial_unexpected_list") or []
    return ", ".join(repr(v) for v in values[:_EXAMPLES])


def _row_numbers(result: dict) -> str:
    rows = result.get("partial_unexpected_index_list") or result.get("unexpected_index_list") or []
    return ", ".join(str(r) for r in list(rows)[:_EXAMPLES])


def _describe_failures(
    df: pd.DataFrame, results: dict[str, Any], text_col: str, label_col: str, allowed_labels: list[str] | None,
    min_rows: int,
) -> list[str]:
    """One sentence per failed check, skipping checks that only failed because of an earlier one."""
    if len(df.columns) == 0:
        return ["the table has no columns at all: the file is empty or has no header row; check the source file"]
    messages = []
    columns = ", ".join(map(str, df.columns))
    missing = set()
    for check, col, flag in (("text_exists", text_col, "--text-col"), ("label_exists", label_col, "--label-col")):
        if not results[check].success:
            missing.add(col)
            messages.append(f"column {col!r} is missing; the file has columns: {columns}; pass {flag} to name it")
    n_rows = len(df)
    if not results["row_count"].success:
        if n_rows == 0:
            messages.append(f"the table is empty (0 rows, at least {min_rows} needed); check the source file")
        else:
            messages.append(f"the table has {n_rows} rows, at least {min_rows} needed; add more labeled rows")
    if n_rows == 0:
        return messages  # every per-value check is meaningless on an empty table

    def per_row(check: str, col: str, what: str, fix: str, show_values: bool = True) -> None:
        if col in missing or results[check].success:
            return
        result = results[check].result
        count = result.get("unexpected_count", "some")
        examples = _examples(result) if show_values else ""
        detail = f" (e.g. {examples})" if examples else ""
        rows = _row_numbers(result)
        where = f" at row index {rows}" if rows else ""
        messages.append(f"column {col!r}: {count} of {n_rows} rows {what}{detail}{where}; {fix}")

    per_row("text_not_null", text_col, "have no text", "fill them or drop those rows from the source",
            show_values=False)
    per_row("label_not_null", label_col, "have no label", "label them or drop those rows from the source",
            show_values=False)
    per_row("text_not_blank", text_col, "are blank after stripping", "drop those rows or give them text")
    if allowed_labels is not None:
        allowed = ", ".join(map(repr, allowed_labels))
        per_row("label_in_set", label_col, f"have a label outside {{{allowed}}}",
                "fix those labels or pass the full label set")
    if label_col not in missing and not results["label_count"].success:
        distinct = df[label_col].dropna().unique().tolist()
        messages.append(
            f"column {label_col!r} has {len(distinct)} distinct label(s) "
            f"({', '.join(map(repr, distinct[:_EXAMPLES])) or 'none'}); a classifier needs at least 2: "
            "add rows of the other class(es) or check that --label-col names the label column"
        )
    return messages


def validate_frame(
    df: pd.DataFrame,
    *,
    text_col: str,
    label_col: str,
    allowed_labels: list[str] | None = None,
    min_rows: int = 2,
) -> dict[str, Any]:
    """Check that ``df`` is usable labeled text, with a Great Expectations suite.

    Args:
        df: the raw table, all source columns as read by pandas.
        text_col, label_col: the columns holding the text and its class.
        allowed_labels: when given, every label must be one of these, compared as class-name strings
            (the int label 1 matches "1").
        min_rows: the least number of rows accepted.

    Returns:
        ``rows``, ``columns``, ``labels`` (label -> count, as strings), ``expectations`` (how many were
        evaluated), ``success`` (True).

    Raises:
        DataValidationError: a check failed; the message explains each failure and its fix, and
            ``.summary`` holds the same dict as a success would (with ``success`` False and ``failures``).
    """
    if allowed_labels is not None:
        allowed_labels = [normalize_label(label) for label in allowed_labels]
    frame = df
    if label_col in df.columns:
        # Compare labels as the class-name strings the later stages use, so 1 and "1" are the same label.
        labels_as_names = df[label_col].map(lambda v: v if pd.isna(v) else normalize_label(v))
        frame = df.assign(**{label_col: labels_as_names})
    _quiet_great_expectations()
    expectations = _build_expectations(text_col, label_col, allowed_labels, min_rows)
    results = {r.expectation_config.meta["check"]: r for r in _run_suite(frame, expectations)}
    labels: dict[str, int] = {}
    if label_col in frame.columns:
        labels = {str(k): int(v) for k, v in frame[label_col].value_counts(dropna=True).sort_index().items()}
    summary: dict[str, Any] = {
        "rows": len(df),
        "columns": [str(c) for c in df.columns],
        "labels": labels,
        "expectations": len(results),
        "checks": [
            {"check": check, "description": r.expectation_config.meta["description"], "success": bool(r.success)}
            for check, r in results.items()
        ],
        "success": all(r.success for r in results.values()),
    }
    if summary["success"]:
        return summary
    failures = _describe_failures(frame, results, text_col, label_col, allowed_labels, min_rows)
    if not failures:  # a check failed in a way not described above: report it rather than pass silently
        failures = [f"{r.expectation_config.type} failed: {r.result}" for r in results.values() if not r.success]
    summary["failures"] = failures
    message = f"data validation failed ({len(failures)} problem(s)):\n" + "\n".join(f"- {m}" for m in failures)
    raise DataValidationError(message, summary)


def log_validation_summary(source: str, summary: dict[str, Any]) -> None:
    """Log what was checked: rows and columns, each check with its outcome, the labels and any failures."""
    checks = summary.get("checks") or []
    passed = sum(1 for check in checks if check["success"])
    log.info(
        "data checks of %s (Great Expectations): %d rows, columns %s; %d of %d checks passed",
        source, summary.get("rows", 0), ", ".join(summary.get("columns") or []) or "(none)", passed, len(checks),
    )
    for check in checks:
        log.info("  %-6s %s", "passed" if check["success"] else "FAILED", check["description"])
    if summary.get("labels"):
        counts = (f"{label} ({count} row{'' if count == 1 else 's'})" for label, count in summary["labels"].items())
        log.info("labels: %s", ", ".join(counts))
    for failure in summary.get("failures") or []:
        log.error("problem: %s", failure)


def validate_snapshot(
    store: Store,
    key: str,
    *,
    text_col: str,
    label_col: str,
    allowed_labels: list[str] | None = None,
    min_rows: int = 2,
) -> dict[str, Any]:
    """Read the Parquet snapshot at ``key`` and run :func:`validate_frame` on it (same arguments and result)."""
    df = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
    try:
        summary = validate_frame(
            df, text_col=text_col, label_col=label_col, allowed_labels=allowed_labels, min_rows=min_rows
        )
    except DataValidationError as exc:
        raise DataValidationError(f"{store.uri(key)}: {exc}", {"key": key, **exc.summary}) from None
    return {"key": key, **summary}


def validate_staged_snapshot(
    store: Store,
    registry: Any,
    staged: dict[str, Any],
    *,
    text_col: str,
    label_col: str,
    group_col: str | None = None,
    allowed_labels: list[str] | None = None,
    dag_run_id: str | None = None,
) -> dict[str, Any]:
    """Validate a snapshot staged by ingest, then publish it or discard it.

    Good data is published under ``snapshots/`` and recorded in the registry; bad data is deleted
    from the store (nothing is left behind) and the failure is logged in the registry's event log.
    Safe to retry: a retry after the staged copy was published validates the published one.

    Returns:
        The published snapshot's reference: ``key``, ``uri``, ``sha256``, ``rows``, ``snapshot_id``.

    Raises:
        DataValidationError: the data failed a check; the message says which and how to fix it.
        ObjectNotFound: the staged copy is gone and was never published (re-run from ingest).
    """
    from maas_tasks.ingest import discard_snapshot, is_published, publish_snapshot, snapshot_key
    from maas_tasks.storage import ObjectNotFound

    if store.exists(staged["key"]):
        key = staged["key"]
    elif is_published(store, staged["sha256"]):
        key = snapshot_key(staged["sha256"])
    else:
        raise ObjectNotFound(
            f"the staged snapshot of {staged['source']} ({store.uri(staged['key'])}) is gone and was never "
            "published; run the DAG again from ingest_data"
        )
    try:
        if group_col and group_col not in staged["columns"]:
            problem = (
                f"group column {group_col!r} is missing; the file has columns: {', '.join(staged['columns'])}; "
                "pass another group_col or leave it empty"
            )
            raise DataValidationError(
                f"data validation failed (1 problem(s)):\n- {problem}",
                {"success": False, "rows": staged.get("rows", 0), "columns": staged["columns"],
                 "missing_columns": [group_col], "failures": [problem]},
            )
        summary = validate_snapshot(store, key, text_col=text_col, label_col=label_col, allowed_labels=allowed_labels)
    except DataValidationError as exc:
        log_validation_summary(staged["source"], exc.summary)
        discard_snapshot(store, staged)
        # Name the user's file, not the internal storage key.
        message = f"{staged['source']}: {str(exc).removeprefix(store.uri(key) + ': ')}"
        registry.record_event(
            "validation_failed",
            detail={"dag_run_id": dag_run_id, "source": staged["source"], "sha256": staged["sha256"], "message": message},
        )
        raise DataValidationError(message, exc.summary) from None
    log_validation_summary(staged["source"], summary)
    published = publish_snapshot(store, staged)
    snapshot_id = registry.record_snapshot(
        published["uri"],
        published["sha256"],
        published["rows"],
        published["source"],
        metadata={"text_col": text_col, "label_col": label_col, "labels": summary.get("labels")},
        columns=published["columns"],
    )
    return {k: published[k] for k in ("key", "uri", "sha256", "rows")} | {"snapshot_id": snapshot_id}
