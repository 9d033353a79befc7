"""Tests of the evaluation report: the plots are real PNGs, the page shows the gate's checks, the metrics and
the slices, embeds its images, and is written with its page last."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from maas_tasks.evaluate import decide_gate, describe_scores
from maas_tasks.report import PLOTS, REPORT_FILE, render_report, write_report
from maas_tasks.storage import FileStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scored(k: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[truth]
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return truth, scores, [f"class {i}" for i in range(k)]


@pytest.mark.parametrize("k", [2, 3])
def test_report_draws_every_plot_and_shows_the_gate_metrics_and_slices(k):
    truth, scores, classes = _scored(k)
    texts = ["word " * (1 + i % 400) for i in range(len(truth))]
    metrics = describe_scores(truth, scores, classes, texts)
    gate = decide_gate([
        {"name": "min_accuracy", "passed": True, "detail": "accuracy fine"},
        {"name": "champion", "passed": False, "detail": "worse than v3 <by a lot>"},
    ])
    files = render_report(model_name="m", version=7, metrics=metrics, gate=gate, truth=truth, scores=scores,
                          facts={"DAG run": "manual__1"})
    assert sorted(files) == sorted([*(f"{p}.png" for p in PLOTS), REPORT_FILE])
    for name in PLOTS:
        assert files[f"{name}.png"].startswith(PNG_MAGIC) and len(files[f"{name}.png"]) > 5000
    page = files[REPORT_FILE].decode("utf-8")
    assert "Evaluation report: m v7" in page and 'class="verdict rejected">REJECTED' in page
    assert "worse than v3 &lt;by a lot&gt;" in page  # details are escaped, not markup
    assert f"{metrics['accuracy']:.4f}" in page and "manual__1" in page
    for name in metrics["slices"]:
        assert f"<td>{name}</td>" in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(PLOTS) and all(base64.b64decode(e).startswith(PNG_MAGIC) for e in embedded)


def test_a_forced_gate_reads_forced_and_column_slices_are_listed():
    truth, scores, classes = _scored(2)
    metrics = describe_scores(truth, scores, classes, ["short text"] * len(truth))
    metrics["column_slices"] = {"genre=drama": {"n": 12, "accuracy": 0.5, "log_loss": 0.7, "ece": 0.1}}
    gate = decide_gate([{"name": "champion", "passed": False, "detail": "worse"}], force=True, forced_by="run-9")
    page = render_report(model_name="m", version=1, metrics=metrics, gate=gate, truth=truth,
                         scores=scores)[REPORT_FILE].decode()
    assert 'class="verdict forced">FORCED' in page and "FORCED by run-9" in page
    assert "<td>genre=drama</td>" in page


def test_write_report_puts_the_page_last(tmp_path):
    written = []

    class RecordingStore(FileStore):
        def put_bytes(self, key, data):
            written.append(key)
            super().put_bytes(key, data)

    store = RecordingStore(tmp_path / "store")
    files = {REPORT_FILE: b"<html></html>", "a.png": PNG_MAGIC, "z.png": PNG_MAGIC}
    uri = write_report(store, "reports/m/1/", files)
    assert written[-1] == f"reports/m/1/{REPORT_FILE}" and sorted(written) == sorted(f"reports/m/1/{n}" for n in files)
    assert uri == store.uri(f"reports/m/1/{REPORT_FILE}")
