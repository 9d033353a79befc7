"""Tests of the Great Expectations data checks: good data passes, each kind of bad data fails clearly."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from maas_tasks.validate import DataValidationError, validate_frame, validate_snapshot
from tests.maas_tasks.conftest import put_parquet


def _frame(texts: list, labels: list) -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(texts)), "text": texts, "label": labels})


def _failure(df: pd.DataFrame, **kwargs) -> str:
    with pytest.raises(DataValidationError) as info:
        validate_frame(df, text_col=kwargs.pop("text_col", "text"), label_col="label", **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_good_data_passes_with_a_summary():
    df = _frame(["a fine film", "<br />awful", "ok I guess"], ["pos", "neg", "pos"])
    summary = validate_frame(df, text_col="text", label_col="label", allowed_labels=["pos", "neg"])
    assert summary["success"] is True
    assert summary["rows"] == 3
    assert summary["labels"] == {"neg": 1, "pos": 2}
    assert summary["expectations"] == 8


def test_int_labels_match_allowed_names():
    summary = validate_frame(_frame(["a", "b"], [0, 1]), text_col="text", label_col="label", allowed_labels=["0", "1"])
    assert summary["labels"] == {"0": 1, "1": 1}


def test_missing_text_column_names_the_columns_there_are():
    message = _failure(_frame(["a", "b"], ["x", "y"]), text_col="review")
    assert "column 'review' is missing" in message
    assert "id, text, label" in message
    assert "--text-col" in message
    assert "Traceback" not in message and "MetricConfigurationID" not in message


def test_empty_frame_is_reported_as_empty():
    message = _failure(_frame([], []))
    assert "the table is empty (0 rows, at least 2 needed)" in message
    assert "distinct label" not in message  # not a second, derived complaint


def test_frame_without_columns_is_reported_as_an_empty_file():
    message = _failure(pd.DataFrame())
    assert "no columns" in message and "empty or has no header" in message


def test_null_labels_counted_with_row_index():
    message = _failure(_frame(["a", "b", "c", "d"], ["x", None, "y", None]))
    assert "column 'label': 2 of 4 rows have no label" in message
    assert "row index 1, 3" in message


def test_single_label_is_not_a_classification_task():
    message = _failure(_frame(["a", "b", "c"], ["x", "x", "x"]))
    assert "1 distinct label(s) ('x')" in message
    assert "at least 2" in message


def test_blank_texts_fail_with_examples():
    message = _failure(_frame(["good", "   ", "", "bad"], ["x", "y", "x", "y"]))
    assert "column 'text': 2 of 4 rows are blank after stripping" in message
    assert "'   '" in message


def test_labels_outside_the_allowed_set():
    message = _failure(_frame(["a", "b", "c"], ["pos", "neg", "meh"]), allowed_labels=["pos", "neg"])
    assert "1 of 3 rows have a label outside {'pos', 'neg'}" in message
    assert "'meh'" in message


def test_too_few_rows():
    message = _failure(_frame(["a", "b"], ["x", "y"]), min_rows=10)
    assert "2 rows, at least 10 needed" in message


def test_every_problem_is_listed_and_kept_on_the_error():
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(["a", None, " "], ["x", "x", "x"]), text_col="text", label_col="label")
    failures = info.value.summary["failures"]
    assert len(failures) == 3
    assert info.value.summary["success"] is False


def test_validate_snapshot_reads_parquet_and_names_the_object(file_store):
    key = put_parquet(file_store, "snapshots/s1/data.parquet", _frame(["a", "b"], ["x", "y"]))
    assert validate_snapshot(file_store, key, text_col="text", label_col="label")["key"] == key
    bad = put_parquet(file_store, "snapshots/s2/data.parquet", _frame(["a", "b"], ["x", "x"]))
    with pytest.raises(DataValidationError, match="snapshots/s2/data.parquet"):
        validate_snapshot(file_store, bad, text_col="text", label_col="label")


class TestValidateStagedSnapshot:
    """Publishing or discarding a staged snapshot, with the registry's record of both."""

    @pytest.fixture
    def registry(self, pg_dsn):
        from maas_tasks.registry import Registry

        with Registry.connect(pg_dsn) as reg:
            yield reg

    @staticmethod
    def stage(store, tmp_path, content: str, run_id: str):
        from maas_tasks.ingest import ingest_data

        path = tmp_path / "reviews.csv"
        path.write_text(content)
        return ingest_data(store, path, run_id=run_id)

    GOOD = "text,label,movie\nloved it,pos,a\nhated it,neg,b\nfine film,pos,c\n"

    def test_good_data_is_published_and_recorded(self, file_store, registry, tmp_path, caplog):
        from maas_tasks.validate import validate_staged_snapshot

        staged = self.stage(file_store, tmp_path, self.GOOD, "r1")
        with caplog.at_level(logging.INFO):
            ref = validate_staged_snapshot(file_store, registry, staged, text_col="text", label_col="label")
        # The task log says what was checked, and Great Expectations' own INFO chatter stays out of it.
        lines = [r.getMessage() for r in caplog.records if r.name == "maas_tasks.validate"]
        assert lines[0] == (
            "data checks of reviews.csv (Great Expectations): 3 rows, columns text, label, movie; 7 of 7 checks passed"
        )
        assert "  passed text column 'text' exists" in lines and "labels: neg (1 row), pos (2 rows)" in lines
        assert not [r for r in caplog.records if r.name.startswith("great_expectations") and r.levelno < logging.WARNING]
        assert ref["key"] == f"snapshots/{staged['sha256']}/data.parquet" and ref["rows"] == 3
        assert registry.get_snapshot(ref["snapshot_id"]).sha256 == staged["sha256"]
        assert file_store.list_keys("staging") == []
        # A retry after publishing (the staged copy is gone) validates the published copy: same answer.
        assert validate_staged_snapshot(file_store, registry, staged, text_col="text", label_col="label") == ref

    def test_two_runs_on_the_same_file_do_not_clobber_each_other(self, file_store, registry, tmp_path):
        from maas_tasks.validate import validate_staged_snapshot

        first = self.stage(file_store, tmp_path, self.GOOD, "r1")
        second = self.stage(file_store, tmp_path, self.GOOD, "r2")
        a = validate_staged_snapshot(file_store, registry, first, text_col="text", label_col="label")
        b = validate_staged_snapshot(file_store, registry, second, text_col="text", label_col="label")
        assert a == b and file_store.list_keys("staging") == []

    @pytest.mark.parametrize(
        "content, kwargs, message",
        [
            ("review,label\nnice,pos\nbad,neg\n", {}, "column 'text' is missing"),
            (GOOD, {"group_col": "film_id"}, "group column 'film_id' is missing; the file has columns: text, label, movie"),
        ],
    )
    def test_bad_data_is_discarded_and_logged(self, file_store, registry, tmp_path, content, kwargs, message, caplog):
        from maas_tasks.validate import DataValidationError, validate_staged_snapshot

        staged = self.stage(file_store, tmp_path, content, "r1")
        with pytest.raises(DataValidationError, match=message) as failure:
            validate_staged_snapshot(
                file_store, registry, staged, text_col="text", label_col="label", dag_run_id="r1", **kwargs
            )
        assert str(failure.value).startswith("reviews.csv: ")
        problems = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(message in p for p in problems)
        assert file_store.list_keys() == []
        events = registry.list_events(kind="validation_failed")
        assert len(events) == 1 and events[0].detail["dag_run_id"] == "r1" and message in events[0].detail["message"]
