"""Tests of the Great Expectations data checks: good data passes, each row check quarantines alone, each table
check fails alone with a clear message, and a staged snapshot is published or discarded with its reports in the
store and the registry."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re

import pandas as pd
import pytest

from maas_tasks.validate import (
    DataValidationError,
    FrameValidation,
    validate_frame,
    validate_snapshot,
    validate_staged_snapshot,
)
from tests.maas_tasks.conftest import put_parquet

TEXTS = [f"review number {n}, a film worth a word or two" for n in range(10)]
LABELS = ["pos", "neg"] * 5


def _frame(texts: list = TEXTS, labels: list = LABELS, **extra: list) -> pd.DataFrame:
    """A raw table as ingest reads one: every column text."""
    columns = {"id": [str(n) for n in range(len(texts))], "text": texts, "label": labels, **extra}
    return pd.DataFrame({name: pd.array(values, dtype="string") for name, values in columns.items()})


def _validate(df: pd.DataFrame, **kwargs) -> FrameValidation:
    return validate_frame(df, text_col=kwargs.pop("text_col", "text"), label_col="label", **kwargs)


def _failure(df: pd.DataFrame, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        _validate(df, **kwargs)
    assert isinstance(info.value, ValueError)
    assert "Traceback" not in str(info.value) and "MetricConfigurationID" not in str(info.value)
    return info.value


def _result_of(validation: FrameValidation, check: str) -> dict:
    (found,) = [r for r in validation.result["results"] if r["expectation_config"]["meta"]["check"] == check]
    return found


def test_good_data_passes_with_a_summary():
    validation = _validate(_frame(), id_col="id", label_map={"pos": "positive", "neg": "negative"})
    summary = validation.summary
    assert validation.success and summary["success"] is True
    assert (summary["rows"], summary["kept_rows"], summary["quarantined_rows"]) == (10, 10, 0)
    assert summary["labels"] == {"negative": 5, "positive": 5}
    assert summary["quarantine"] == {}
    assert all(check["success"] for check in summary["checks"])
    assert {c["check"] for c in summary["checks"]} >= {
        "text_column", "label_column", "id_column", "text_type", "text_not_null", "text_not_blank", "text_length",
        "label_not_null", "label_in_map", "decodable:text", "decodable:label", "decodable:id", "id_unique",
        "quarantine_share", "row_count", "class_count", "class_balance", "duplicate_share",
    }
    assert list(validation.quarantine.columns) == ["row", "reason", "id", "text", "label"]
    assert validation.quarantine.empty
    # The GX result is JSON, and names each expectation by its type.
    types = {r["expectation_config"]["type"] for r in json.loads(json.dumps(validation.result))["results"]}
    assert {"expect_column_values_to_not_be_null", "expect_column_value_lengths_to_be_between",
            "expect_column_proportion_of_unique_values_to_be_between", "expect_table_row_count_to_be_between"} <= types


@pytest.mark.parametrize("labels", [["0", "1"] * 5, [0, 1] * 5, ["0.0", "1.0"] * 5, [" 0", "1 "] * 5])
def test_labels_are_compared_as_class_names(labels):
    df = _frame().assign(label=labels)
    validation = _validate(df, label_map={"0": "negative", "1.0": "positive"})
    assert validation.summary["labels"] == {"negative": 5, "positive": 5}
    assert validation.summary["quarantined_rows"] == 0


@pytest.mark.parametrize(
    "column, value, reason, kwargs",
    [
        ("text", None, "no text", {}),
        ("text", "   ", "blank text", {}),
        ("text", "ok", "text shorter than 3 characters", {"min_text_chars": 3}),
        ("text", "x" * 81, "text longer than 80 characters", {"max_text_chars": 80}),
        ("text", "caf\ufffd au lait", "bytes that are not UTF-8 in 'text'", {}),
        ("id", "4\ufffd", "bytes that are not UTF-8 in 'id'", {}),
        ("label", None, "no label", {}),
        ("label", "meh", "label not in the label map", {"label_map": {"pos": "pos", "neg": "neg"}}),
        ("id", "3", "repeated id (an earlier row has it)", {"id_col": "id"}),
    ],
)
def test_each_row_check_quarantines_the_rows_failing_it(column, value, reason, kwargs):
    df = _frame()
    df.loc[4, column] = value
    validation = _validate(df, max_quarantine_fraction=0.1, **kwargs)
    assert validation.success
    summary = validation.summary
    assert (summary["kept_rows"], summary["quarantined_rows"]) == (9, 1)
    assert list(summary["quarantine"]) == [reason]
    assert summary["quarantine"][reason]["examples"][0]["row"] == 4
    quarantine = validation.quarantine
    assert quarantine["row"].tolist() == [4] and quarantine["row"].dtype == "int64"
    assert quarantine["reason"].tolist() == [reason]
    assert quarantine.loc[0, ["id", "text", "label"]].tolist() == df.loc[4, ["id", "text", "label"]].tolist()
    # Exactly one row expectation saw the row, and it still passed (the share is within the limit).
    row_checks = [c for c in summary["checks"] if c["level"] == "row" and c["quarantined"]]
    assert len(row_checks) == 1 and row_checks[0]["success"] is True
    found = _result_of(validation, row_checks[0]["check"])["result"]
    if row_checks[0]["check"] == "id_unique":
        assert found["observed_value"] == 0.9  # 9 distinct ids of 10
    else:
        assert found["unexpected_count"] == 1 and found["partial_unexpected_index_list"] == [4]


def test_a_row_failing_several_checks_has_every_reason():
    df = _frame()
    df.loc[2, ["text", "label"]] = ["bad \ufffd", None]
    quarantine = _validate(df, max_quarantine_fraction=0.2).quarantine
    assert quarantine["reason"].tolist() == ["no label; bytes that are not UTF-8 in 'text'"]


def test_the_quarantine_keeps_every_source_column_as_text():
    df = _frame(reason=["r"] * 10, row=["x"] * 10)
    df.loc[1, "text"] = None
    quarantine = _validate(df, max_quarantine_fraction=0.2).quarantine
    assert list(quarantine.columns) == ["row", "reason", "id", "text", "label", "source:reason", "source:row"]
    assert quarantine.iloc[0][["id", "label", "source:reason"]].tolist() == ["1", "neg", "r"]
    assert all(str(quarantine[c].dtype) == "string" for c in quarantine.columns[2:])


def test_quarantine_under_the_limit_passes_and_over_it_fails():
    df = _frame()
    df.loc[[1, 6], "label"] = None
    df.loc[8, "text"] = "x" * 200
    assert _validate(df, max_text_chars=100, max_quarantine_fraction=0.3).summary["quarantined_rows"] == 3
    error = _failure(df, max_text_chars=100, max_quarantine_fraction=0.25)
    message = str(error)
    assert message.startswith("data validation failed (1 problem(s)):")
    assert "3 rows of 10 (30.0%) fail a row check, more than max_quarantine_fraction allows (25.0%)" in message
    assert "2 rows with no label (row 1: (missing), row 6: (missing))" in message
    assert "1 row with text longer than 100 characters (row 8: 'xxxx" in message
    assert "raise max_quarantine_fraction" in message
    # Examples are cut to about 60 characters.
    assert re.search(r"row 8: 'x{60}…'", message)
    assert error.summary["success"] is False and error.validation.quarantine["row"].tolist() == [1, 6, 8]
    failed = [c["check"] for c in error.summary["checks"] if not c["success"]]
    assert failed == ["quarantine_share"]


def test_table_checks_judge_the_rows_kept():
    # Every "neg" row lacks a text: the rows kept have one class only.
    texts = [t if label == "pos" else None for t, label in zip(TEXTS, LABELS)]
    message = str(_failure(_frame(texts), max_quarantine_fraction=0.5))
    assert "the 5 rows kept have 1 class(es) in column 'label' ('pos'); a classifier needs at least 2" in message


@pytest.mark.parametrize(
    "df, kwargs, expected, failed",
    [
        (_frame(), {"text_col": "review"},
         "column 'review' (the text column) is missing; the file has columns: id, text, label; pass --text-col",
         "text_column"),
        (_frame(), {"group_col": "film"}, "column 'film' (the group column) is missing; the file has columns: "
         "id, text, label; pass --group-col with the right name or leave it out", "group_column"),
        (pd.DataFrame(), {}, "no columns at all: the file is empty or has no header row", "text_column"),
        (_frame([], []), {}, "the table is empty (0 rows, at least 2 needed)", "row_count"),
        (_frame(), {"min_rows": 20}, "the table has 10 rows, at least 20 needed", "row_count"),
        (_frame(labels=["pos"] * 10), {}, "the 10 rows kept have 1 class(es) in column 'label' ('pos')",
         "class_count"),
        (_frame(labels=["pos"] * 9 + ["neg"]), {"min_class_fraction": 0.2},
         "1 class(es) have less than min_class_fraction (20.0%) of the 10 rows kept: 'neg' (1 row, 10.0%)",
         "class_balance"),
        (_frame(TEXTS[:4] + [TEXTS[0]] * 6), {"max_duplicate_fraction": 0.5},
         "6 rows of the 10 kept (60.0%) repeat an earlier row's text, more than max_duplicate_fraction allows "
         "(50.0%) (row 4: 'review number 0", "duplicate_share"),
        (_frame().assign(text=range(10)), {}, "column 'text' holds int values, not text", "text_type"),
    ],
)
def test_each_table_check_fails_alone_with_a_clear_message(df, kwargs, expected, failed):
    error = _failure(df, **kwargs)
    assert expected in str(error)
    assert failed in {c["check"] for c in error.summary["checks"] if not c["success"]}
    assert error.summary["failures"] and error.summary["success"] is False


def test_an_empty_table_is_not_also_blamed_for_having_one_class():
    message = str(_failure(_frame([], [])))
    assert "class" not in message and message.count("\n- ") == 1


def test_a_label_map_that_merges_every_label_leaves_one_class():
    message = str(_failure(_frame(), label_map={"pos": "any", "neg": "any"}))
    assert "have 1 class(es) in column 'label' ('any')" in message and "--label-map" in message


def test_every_problem_is_listed_and_kept_on_the_error():
    error = _failure(_frame(labels=["x"] * 10), group_col="film", min_rows=11)
    assert len(error.summary["failures"]) == 2  # the group column, and too few rows (not also one class)


def test_long_values_are_cut_in_the_result_and_examples_centre_on_bad_bytes():
    df = _frame()
    df.loc[3, "text"] = "y" * 5000
    df.loc[5, "text"] = "a" * 500 + "\ufffd" + "b" * 500
    validation = _validate(df, max_text_chars=1000, max_quarantine_fraction=0.2)
    for found in validation.result["results"]:
        assert all(len(str(v)) <= 200 for v in found["result"].get("partial_unexpected_list", []))
    (example,) = validation.summary["quarantine"]["bytes that are not UTF-8 in 'text'"]["examples"]
    assert example == {"row": 5, "value": repr("…" + "a" * 20 + "\ufffd" + "b" * 39 + "…")}


def test_validate_snapshot_reads_parquet_and_names_the_object(file_store):
    key = put_parquet(file_store, "snapshots/s1/data.parquet", _frame())
    assert validate_snapshot(file_store, key, text_col="text", label_col="label")["key"] == key
    bad = put_parquet(file_store, "snapshots/s2/data.parquet", _frame(labels=["x"] * 10))
    with pytest.raises(DataValidationError, match="snapshots/s2/data.parquet"):
        validate_snapshot(file_store, bad, text_col="text", label_col="label")


def test_data_docs_are_built_when_asked(tmp_path):
    validation = _validate(_frame(), docs_dir=tmp_path / "docs", run_name="manual__1")
    page = tmp_path / "docs" / validation.docs_page
    assert validation.docs_page.startswith("validations/maas_labeled_text/manual__1/")
    assert (tmp_path / "docs" / "index.html").is_file() and page.is_file()
    html = page.read_text()
    assert "every text is 1 to 100,000 characters long" in html and "the rows kept have 2 classes or more" in html


# ---------------------------------------------------------------- staged snapshots, with the registry


@pytest.fixture
def registry(pg_dsn):
    from maas_tasks.registry import Registry

    with Registry.connect(pg_dsn) as reg:
        yield reg


def _stage(store, df: pd.DataFrame, run: str = "r1", **extra) -> dict:
    """What ingest returns for ``df`` (see the data contract): the rows staged under the run's key."""
    sha = hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
    key = put_parquet(store, f"staging/{sha}/{run}/data.parquet", df)
    return {
        "key": key, "sha256": sha, "rows": len(df), "columns": list(df.columns), "source": "reviews.csv",
        "source_uri": "/data/reviews.csv", "schema": {c: "string" for c in df.columns}, "watermark": None,
        "new": True, "snapshot_id": None, **extra,
    }


def _validate_staged(store, registry, staged, **kwargs) -> dict:
    return validate_staged_snapshot(
        store, registry, staged, text_col="text", label_col="label", dag_run_id="run-1", **kwargs
    )


def _key(store, uri: str) -> str:
    return uri.removeprefix(store.url + "/")


def test_good_data_is_published_with_its_reports(file_store, registry, caplog):
    staged = _stage(file_store, _frame())
    with caplog.at_level(logging.INFO):
        ref = _validate_staged(file_store, registry, staged, id_col="id", label_map={"pos": "good", "neg": "bad"})
    sha = staged["sha256"]
    assert ref == {
        "key": f"snapshots/{sha}/data.parquet", "uri": file_store.uri(f"snapshots/{sha}/data.parquet"),
        "sha256": sha, "rows": 10, "snapshot_id": ref["snapshot_id"], "source_uri": "/data/reviews.csv",
        "new": True, "quarantine_key": None, "quarantined_rows": 0,
        "validation_uri": file_store.uri(f"validation/{sha}/result.json"),
        "docs_uri": ref["docs_uri"],
    }
    # The Data Docs page of this validation (plain HTML that reads offline, unlike GX's index page).
    page = next(k for k in file_store.list_keys(f"validation/{sha}/docs") if "/validations/" in k)
    assert ref["docs_uri"] == file_store.uri(page) and page.endswith(".html")
    assert file_store.list_keys("staging") == []
    # The raw rows are published unchanged.
    published = pd.read_parquet(io.BytesIO(file_store.get_bytes(ref["key"])))
    pd.testing.assert_frame_equal(published, _frame(), check_dtype=False)
    snapshot = registry.get_snapshot(ref["snapshot_id"])
    assert (snapshot.sha256, snapshot.rows, snapshot.source_uri) == (sha, 10, "/data/reviews.csv")
    assert snapshot.schema == {"id": "string", "text": "string", "label": "string"}
    assert snapshot.metadata == {
        "text_col": "text", "label_col": "label", "id_col": "id", "group_col": None,
        "label_map": {"pos": "good", "neg": "bad"}, "labels": {"bad": 5, "good": 5}, "dag_run_id": "run-1",
    }
    assert snapshot.validation["success"] is True and snapshot.validation["labels"] == {"bad": 5, "good": 5}
    assert (snapshot.validation_uri, snapshot.docs_uri) == (ref["validation_uri"], ref["docs_uri"])
    assert (snapshot.quarantine_uri, snapshot.quarantined_rows) == (None, 0)
    # The task log says what was checked, and Great Expectations' own INFO chatter stays out of it.
    lines = [r.getMessage() for r in caplog.records if r.name == "maas_tasks.validate"]
    assert re.fullmatch(
        r"data checks of reviews\.csv \(Great Expectations 1\.\d+\.\d+\): 10 rows, columns id, text, label; "
        r"(\d+) of \1 expectations passed", lines[0]
    )
    assert "  passed every label is one the label map names: neg, pos" in lines
    assert "classes of the rows kept: bad (5 rows), good (5 rows)" in lines
    assert not [r for r in caplog.records if r.name.startswith("great_expectations") and r.levelno < logging.WARNING]


def test_the_result_and_data_docs_are_in_the_store(file_store, registry):
    staged = _stage(file_store, _frame())
    ref = _validate_staged(file_store, registry, staged)
    result = json.loads(file_store.get_bytes(_key(file_store, ref["validation_uri"])))
    assert result["success"] is True
    assert "expect_column_value_lengths_to_be_between" in {r["expectation_config"]["type"] for r in result["results"]}
    docs = f"validation/{staged['sha256']}/docs"
    keys = [k.removeprefix(docs + "/") for k in file_store.list_keys(docs)]
    (page,) = [k for k in keys if k.startswith("validations/maas_labeled_text/run-1/")]
    # The site's pages and what they link, in their layout (not the 4 MB of fonts GX copies).
    assert sorted(keys) == sorted(
        ["MANIFEST.json", "index.html", "expectations/maas_labeled_text.html", "static/images/favicon.ico", page]
    )
    index = file_store.get_bytes(f"{docs}/index.html").decode()
    assert page in index  # the index links the result page by its relative path
    html = file_store.get_bytes(f"{docs}/{page}").decode()
    for description in ("every row has a text in 'text'", "at most 5.0% of the rows fail a row check (quarantined)",
                        "at most 50.0% of the rows kept repeat an earlier row's text"):
        assert description in html


def test_rows_under_the_limit_are_quarantined_and_the_run_goes_on(file_store, registry):
    df = _frame(TEXTS + [f"{text}, again" for text in TEXTS], LABELS * 2)
    df.loc[7, "text"] = "broken \ufffd line"
    staged = _stage(file_store, df)
    ref = _validate_staged(file_store, registry, staged)
    assert ref["quarantine_key"] == f"quarantine/{staged['sha256']}/rows.parquet" and ref["quarantined_rows"] == 1
    quarantine = pd.read_parquet(io.BytesIO(file_store.get_bytes(ref["quarantine_key"])))
    assert quarantine[["row", "reason"]].values.tolist() == [[7, "bytes that are not UTF-8 in 'text'"]]
    snapshot = registry.get_snapshot(ref["snapshot_id"])
    assert snapshot.quarantine_uri == file_store.uri(ref["quarantine_key"]) and snapshot.quarantined_rows == 1
    assert snapshot.rows == 20  # every raw row is published; clean leaves the quarantined ones out


def test_a_retry_validates_again_and_records_the_same(file_store, registry):
    df = _frame()
    df.loc[0, "label"] = None
    staged = _stage(file_store, df)
    first = _validate_staged(file_store, registry, staged, max_quarantine_fraction=0.2)
    # The staged copy is published and gone: the retry validates the published one, with the same answer.
    again = _validate_staged(file_store, registry, staged, max_quarantine_fraction=0.2)
    # Only the Data Docs page is new (its path holds the validation's time); the registry names the new one.
    assert {**again, "docs_uri": None} == {**first, "docs_uri": None}
    assert registry.get_snapshot(again["snapshot_id"]).docs_uri == again["docs_uri"]
    assert file_store.exists(again["docs_uri"].removeprefix(file_store.uri("k")[:-1]))
    assert len(registry.list_snapshots()) == 1
    pages = [k for k in file_store.list_keys(f"validation/{staged['sha256']}/docs") if "/validations/" in k]
    assert len(pages) == 1  # the earlier try's page is gone
    # Two runs staging the same rows do not clobber each other either.
    second = _stage(file_store, df, run="r2")
    third = _validate_staged(file_store, registry, second, max_quarantine_fraction=0.2)
    assert {**third, "docs_uri": None} == {**first, "docs_uri": None}
    assert file_store.list_keys("staging") == []


def test_rows_seen_before_are_not_validated_again(file_store, registry, monkeypatch, caplog):
    df = _frame()
    df.loc[3, "text"] = None
    first = _validate_staged(file_store, registry, _stage(file_store, df), max_quarantine_fraction=0.2)
    monkeypatch.setattr("maas_tasks.validate.validate_frame", lambda *a, **k: pytest.fail("validated again"))
    seen = {"key": None, "sha256": first["sha256"], "rows": 10, "columns": ["id", "text", "label"],
            "source": "reviews.csv", "source_uri": "/data/reviews.csv", "new": False,
            "snapshot_id": first["snapshot_id"]}
    with caplog.at_level(logging.INFO):
        ref = _validate_staged(file_store, registry, seen)
    assert ref == {**first, "new": False}
    assert ref["quarantine_key"] == f"quarantine/{first['sha256']}/rows.parquet"
    assert any("validated before (snapshot" in r.getMessage() for r in caplog.records)


def test_the_watermark_of_a_batch_is_recorded(file_store, registry):
    staged = _stage(file_store, _frame(), source_uri="postgresql://db/reviews", watermark=["updated_at", "2024-05-01"])
    _validate_staged(file_store, registry, staged)
    assert registry.get_watermark("postgresql://db/reviews") == ("updated_at", "2024-05-01")


@pytest.mark.parametrize(
    "df, kwargs, message",
    [
        (_frame(), {"text_col": "review"}, "column 'review' (the text column) is missing"),
        (_frame(), {"group_col": "film"}, "column 'film' (the group column) is missing"),
        (_frame(labels=["pos"] * 10), {}, "the 10 rows kept have 1 class(es)"),
    ],
)
def test_bad_data_is_discarded_and_its_reports_kept(file_store, registry, df, kwargs, message, caplog):
    staged = _stage(file_store, df)
    with pytest.raises(DataValidationError, match=re.escape(message)) as failure:
        validate_staged_snapshot(
            file_store, registry, staged, label_col="label", dag_run_id="r1", **{"text_col": "text", **kwargs}
        )
    text = str(failure.value)
    assert text.startswith("reviews.csv: data validation failed")
    assert "staging/" not in text  # the user's file is named, not the internal key
    problems = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(message in p for p in problems)
    sha = staged["sha256"]
    assert file_store.list_keys("staging") == [] and file_store.list_keys("snapshots") == []
    assert registry.list_snapshots() == []
    # The reports stay, so the user can see why; the message and the event name them.
    page = next(k for k in file_store.list_keys(f"validation/{sha}/docs") if "/validations/" in k)
    assert text.endswith(f"See the validation report: {file_store.uri(page)}")
    (event,) = registry.list_events(kind="validation_failed")
    assert event.detail["dag_run_id"] == "r1" and message in event.detail["message"]
    assert event.detail["validation_uri"] == file_store.uri(f"validation/{sha}/result.json")
    assert event.detail["docs_uri"] == file_store.uri(page)
    assert event.detail["docs_index_uri"] == file_store.uri(f"validation/{sha}/docs/index.html")
    assert json.loads(file_store.get_bytes(f"validation/{sha}/result.json"))["success"] is False


def test_too_many_quarantined_rows_fail_and_name_the_quarantine(file_store, registry):
    df = _frame()
    df.loc[[2, 5], "label"] = "meh"
    staged = _stage(file_store, df)
    with pytest.raises(DataValidationError, match=r"2 rows of 10 \(20.0%\) fail a row check") as failure:
        _validate_staged(file_store, registry, staged, label_map={"pos": "pos", "neg": "neg"})
    quarantine_key = f"quarantine/{staged['sha256']}/rows.parquet"
    assert "add their labels to --label-map, or raise max_quarantine_fraction" in str(failure.value)
    assert f"the rows that failed a row check: {file_store.uri(quarantine_key)}" in str(failure.value)
    assert pd.read_parquet(io.BytesIO(file_store.get_bytes(quarantine_key)))["row"].tolist() == [2, 5]
    (event,) = registry.list_events(kind="validation_failed")
    assert event.detail["quarantine_uri"] == file_store.uri(quarantine_key) and event.detail["quarantined_rows"] == 2
    # Run again with the full label set: it passes, and the stale quarantine is gone.
    ref = _validate_staged(file_store, registry, _stage(file_store, df, run="r2"),
                           label_map={"pos": "pos", "neg": "neg", "meh": "neutral"})
    assert ref["quarantine_key"] is None and not file_store.exists(quarantine_key)
    assert registry.get_snapshot(ref["snapshot_id"]).validation["labels"] == {"neg": 4, "neutral": 2, "pos": 4}


def test_a_staged_copy_gone_and_never_published_is_reported(file_store, registry):
    from maas_tasks.storage import ObjectNotFound

    staged = _stage(file_store, _frame())
    file_store.delete(staged["key"])
    with pytest.raises(ObjectNotFound, match="is gone and was never published; run the DAG again from ingest_data"):
        _validate_staged(file_store, registry, staged)


@pytest.mark.slow
def test_the_data_docs_page_opens_from_the_store_in_a_browser(file_store, registry, chromium):
    df = _frame()
    df.loc[6, "label"] = None
    ref = _validate_staged(file_store, registry, _stage(file_store, df), max_quarantine_fraction=0.2)
    docs = ref["docs_uri"].split("/validations/")[0] + "/"
    page = chromium.new_page()
    try:
        page.goto(docs + "index.html")
        assert "Data Docs" in page.inner_text("body")
        (result_page,) = re.findall(r"validations/maas_labeled_text/run-1/[^'\"]+\.html", page.content())
        assert docs + result_page == ref["docs_uri"]
        page.goto(ref["docs_uri"])  # plain HTML: it reads without the scripts GX loads from CDNs
        body = page.inner_text("body")
        assert "Status: Succeeded" in body and "every row has a label in 'label'" in body
        assert "90% not null" in body  # the quarantined row, as GX saw it
    finally:
        page.close()


def test_reports_go_to_an_s3_store_too(s3_env, registry):
    from maas_tasks.config import load_settings
    from maas_tasks.storage import open_store, read_manifest

    env = {**s3_env, "MAAS_STORE_URL": s3_env["MAAS_STORE_URL"] + "/team"}
    store = open_store(settings=load_settings(env))
    df = _frame()
    df.loc[2, "text"] = None
    staged = _stage(store, df)
    ref = _validate_staged(store, registry, staged, max_quarantine_fraction=0.2)
    sha = staged["sha256"]
    assert ref["docs_uri"].startswith(f"{store.url}/validation/{sha}/docs/validations/")
    assert "index.html" in read_manifest(store, f"validation/{sha}/docs")
    assert store.exists(ref["quarantine_key"]) and store.list_keys("staging") == []
    seen = {**staged, "key": None, "new": False, "snapshot_id": ref["snapshot_id"]}
    assert _validate_staged(store, registry, seen) == {**ref, "new": False}
