"""The evaluation report of a model version: one HTML page a reviewer opens from the store.

A version's metrics and gate decision are in the registry as JSON; people judge a model from pictures and
tables: the confusion matrix, ROC and precision-recall curves, a reliability diagram (are the scores
probabilities?), the slice table and every gate check with its numbers. :func:`render_report` draws them
with matplotlib (the Agg canvas, no display and no global pyplot state) and returns the files;
:func:`write_report` stores them under one prefix, PNGs first and ``index.html`` last (the commit point).
The page embeds its images too, so it opens the same from a file store, a presigned MinIO URL or a copy.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from maas_tasks.storage import Store

REPORT_FILE = "index.html"
PLOTS = ("confusion_matrix", "roc_curve", "pr_curve", "reliability")
# Curves of at most this many classes are drawn one per class; above it only the macro summary is shown.
MAX_CURVE_CLASSES = 10


def _figure(width: float = 4.8, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Counts per (true, predicted) class, darker for more, each cell labelled."""
    cells = np.asarray(matrix, dtype=np.int64)
    size = min(2.5 + 0.6 * len(classes), 12)
    figure = _figure(size + 1, size)
    ax = figure.add_subplot()
    image = ax.imshow(cells, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=45 if len(classes) > 3 else 0, ha="right" if len(classes) > 3 else "center")
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    threshold = cells.max() / 2 if cells.size else 0
    for (row, col), value in np.ndenumerate(cells):
        ax.text(col, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    return _png(figure)


def _curve_classes(truth: np.ndarray, classes: Sequence[str]) -> list[int]:
    """The class columns to draw a one-vs-rest curve for: the positive class of two, else every present one."""
    if len(classes) == 2:
        return [1]
    present = [k for k in range(len(classes)) if 0 < np.sum(truth == k) < len(truth)]
    return present[:MAX_CURVE_CLASSES]


def plot_roc_curve(truth: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> bytes:
    """ROC curve(s), one-vs-rest, with each curve's AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = _figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for k in _curve_classes(truth, classes):
        positive = truth == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {roc_auc_score(positive, scores[:, k]):.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def plot_pr_curve(truth: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> bytes:
    """Precision-recall curve(s), one-vs-rest, with each curve's average precision in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = _figure()
    ax = figure.add_subplot()
    for k in _curve_classes(truth, classes):
        positive = truth == k
        if positive.all() or not positive.any():
            continue
        precision, recall, _ = precision_recall_curve(positive, scores[:, k])
        ap = average_precision_score(positive, scores[:, k])
        ax.plot(recall, precision, label=f"{classes[k]} (AP {ap:.3f}, base rate {positive.mean():.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall curve")
    ax.legend(loc="lower left", fontsize="small")
    return _png(figure)


def plot_reliability(truth: np.ndarray, scores: np.ndarray, ece: float, *, bins: int = 10) -> bytes:
    """Reliability diagram: accuracy against confidence (the top score) per bin, and how many rows each bin has."""
    from sklearn.calibration import calibration_curve

    confidence = np.clip(scores.max(axis=1), 0.0, 1.0)
    correct = (scores.argmax(axis=1) == truth).astype(int)
    figure = _figure(4.8, 5.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    if correct.min() != correct.max():
        accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
        top.plot(mean_confidence, accuracy, marker="o", label=f"model (ECE {ece:.3f})")
    else:
        top.plot([confidence.mean()], [correct.mean()], marker="o", label=f"model (ECE {ece:.3f})")
    top.set_ylabel("accuracy")
    top.set_title("Reliability diagram (top score)")
    top.legend(loc="upper left", fontsize="small")
    bottom.hist(confidence, bins=np.linspace(0, 1, bins + 1), color="tab:blue", alpha=0.7)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("rows")
    return _png(figure)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("n/a" if value is None else str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str | None] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #555; margin-top: 0; }
.verdict { display: inline-block; padding: 0.3em 0.8em; border-radius: 4px; font-weight: bold; color: white; }
.passed { background: #2e7d32; } .rejected { background: #c62828; } .forced { background: #ef6c00; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; text-align: left; } tr.fail td { background: #fdecea; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots figure { margin: 0; }
"""


def render_report(
    *,
    model_name: str,
    version: int | None,
    metrics: dict[str, Any],
    gate: dict[str, Any],
    truth: np.ndarray,
    scores: np.ndarray,
    facts: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The report's files: ``index.html`` and one PNG per plot of :data:`PLOTS`.

    Args:
        metrics: :func:`maas_tasks.evaluate.describe_scores`'s dict (with ``slices`` and, if present,
            ``column_slices`` and ``short_probe``).
        gate: :func:`maas_tasks.evaluate.decide_gate`'s dict.
        truth: class indices of the evaluated rows; scores: their n x K probabilities.
        facts: anything else to list (run id, data snapshot, parameters), shown as a table.
    """
    classes = [str(c) for c in metrics["classes"]]
    truth = np.asarray(truth, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    plots = {
        "confusion_matrix": plot_confusion_matrix(metrics["confusion_matrix"], classes),
        "roc_curve": plot_roc_curve(truth, scores, classes),
        "pr_curve": plot_pr_curve(truth, scores, classes),
        "reliability": plot_reliability(truth, scores, float(metrics["ece"])),
    }
    verdict = "forced" if gate.get("forced") else "passed" if gate.get("passed") else "rejected"
    title = f"{model_name} v{version}" if version is not None else model_name
    checks = gate.get("checks") or []
    parts = [
        f"<h1>Evaluation report: {html.escape(title)}</h1>",
        f"<p class=\"sub\">{metrics['n_eval']} held-out rows, classes {html.escape(', '.join(classes))}; "
        f"written {datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>",
        f"<h2>Gate <span class=\"verdict {verdict}\">{verdict.upper()}</span></h2>",
        f"<p>{html.escape(str(gate.get('reason', '')))}</p>",
        _table(("check", "result", "detail"), [(c["name"], "pass" if c["passed"] else "FAIL", c["detail"]) for c in checks],
               ["" if c["passed"] else "fail" for c in checks]),
        "<h2>Metrics</h2>",
        _table(("metric", "value"), [
            (label, metrics.get(key)) for key, label in (
                ("accuracy", "accuracy"), ("precision", f"precision ({metrics.get('average')})"),
                ("recall", f"recall ({metrics.get('average')})"), ("f1", f"F1 ({metrics.get('average')})"),
                ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC (average precision)"), ("log_loss", "log loss"),
                ("cohen_kappa", "Cohen's kappa"), ("ece", "expected calibration error (10 bins)"),
            )
        ]),
        "<div class=\"plots\">",
        *(
            f"<figure><img alt=\"{name}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
            f"<figcaption>{name}.png</figcaption></figure>"
            for name, png in plots.items()
        ),
        "</div>",
        "<h2>Slices</h2>",
        _table(("slice", "rows", "accuracy", "log loss", "ECE"), [
            (name, part["n"], part["accuracy"], part["log_loss"], part["ece"])
            for name, part in {**metrics.get("slices", {}), **metrics.get("column_slices", {})}.items()
        ]),
    ]
    probe = metrics.get("short_probe")
    if probe:
        parts.append(
            f"<p>Each text cut to its first {probe['words']} words: accuracy {probe['accuracy']:.4f}, "
            f"ECE {probe['ece']:.4f}.</p>"
        )
    if facts:
        parts += ["<h2>About this version</h2>", _table(("", ""), [(k, v) for k, v in facts.items()])]
    page = (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}: evaluation"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    return {**{f"{name}.png": png for name, png in plots.items()}, REPORT_FILE: page.encode("utf-8")}


def write_report(store: Store, prefix: str, files: dict[str, bytes]) -> str:
    """Store the report's files under ``prefix``, ``index.html`` last; returns the page's URI."""
    prefix = prefix.rstrip("/")
    for name, content in sorted(files.items(), key=lambda item: item[0] == REPORT_FILE):
        store.put_bytes(f"{prefix}/{name}", content)
    return store.uri(f"{prefix}/{REPORT_FILE}")
