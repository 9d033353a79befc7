"""Drift stage: how far a run's data has moved from the data the serving model was trained on.

A model keeps its accuracy only while what it scores looks like what it learnt from. Each run compares its
cleaned table with the snapshot the serving version was trained on (found through the registry: serving
version, its snapshot, that snapshot's published rows cleaned the same way) on three signals a text
classifier is sensitive to:

- the label distribution: a chi-square test of the two rows of class counts (``scipy.stats.chi2_contingency``);
- the text length in words: the two-sample Kolmogorov-Smirnov statistic D (``scipy.stats.ks_2samp``), the
  largest gap between the two length distributions. D, not its p-value, meets the threshold: on 25,000 rows
  any gap at all is significant;
- the out-of-vocabulary rate: the share of words the serving model's vocabulary does not hold, new data
  against the reference (its own rate is not zero: rare words never made the vocabulary). New words, a new
  product or a new slang, are what a fixed vocabulary cannot score.

Words are cut as the served model cuts them (:func:`maas_tasks.model.ngram_tokens`): the same RE2 patterns
run on Arrow's kernels (a test checks both agree), since importing TensorFlow would cost seconds for this
alone. Arrow and TensorFlow may lower-case a few rare characters differently, so the rates are approximate
there.

Drift is flagged, not raised: the report goes to ``drift/<hash>/report.json`` and ``report.html`` and to the
registry with the snapshot, the run goes on, and whoever watches the flag decides to retrain.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from maas_tasks.clean import clean_batches, snapshot_batch
from maas_tasks.model import MARK_PATTERN, TAG_PATTERN, VOCABULARY_FILE, WORD_CHARS, read_vocabulary
from maas_tasks.storage import Store, store_key

log = logging.getLogger(__name__)

DEFAULT_MAX_LABEL_P = 0.01
DEFAULT_MAX_LENGTH_KS = 0.1
DEFAULT_MAX_OOV_RATE_INCREASE = 0.05
REPORT_FILE = "report.json"
HTML_FILE = "report.html"
# maas_tasks.model.standardize's separators, except that a run of plain spaces is left for the split to skip:
# replacing every space would cost most of the time.
_SEPARATORS = f"[^{WORD_CHARS} ][^{WORD_CHARS}]*"


def split_words(texts: Sequence[str] | pd.Series) -> pa.ListArray:
    """Each text's words as the served model's tokenizer (:func:`maas_tasks.model.ngram_tokens`, one word wide)
    cuts them, computed with Arrow; an empty text has no word."""
    array = pa.array(pd.Series(texts, dtype="string"), from_pandas=True)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = pc.utf8_lower(pc.fill_null(array.cast(pa.large_string()), ""))
    tagged = pc.match_substring(array, "<")
    if pc.any(tagged).as_py():
        array = pc.replace_with_mask(array, tagged, pc.replace_substring_regex(pc.filter(array, tagged), TAG_PATTERN, " "))
    array = pc.replace_substring_regex(pc.replace_substring_regex(array, MARK_PATTERN, r" \1 "), _SEPARATORS, " ")
    if array.nbytes < 2**31:  # Arrow splits 32-bit-offset strings several times faster
        array = array.cast(pa.string())
    pieces = pc.split_pattern(array, " ")
    flat = pc.list_flatten(pieces)
    words = pc.not_equal(flat, "")
    lengths = np.bincount(pc.list_parent_indices(pieces).to_numpy(), weights=words.to_numpy(zero_copy_only=False),
                          minlength=len(array)).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pc.filter(flat, words))


def _word_counts(texts: pd.Series, vocabulary: pa.Array) -> tuple[np.ndarray, int, int]:
    """Words per text, and how many words there are in all and how many of them ``vocabulary`` holds."""
    words = split_words(texts)
    flat = pc.list_flatten(words)
    known = pc.sum(pc.is_in(flat, value_set=vocabulary.cast(flat.type))).as_py() or 0
    return pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64), len(flat), int(known)


def _shares(counts: pd.Series, classes: list[str]) -> dict[str, float]:
    total = max(int(counts.sum()), 1)
    return {name: round(int(counts.get(name, 0)) / total, 4) for name in classes}


def measure_drift(
    reference: pd.DataFrame,
    new: pd.DataFrame,
    vocabulary: Sequence[str],
    *,
    max_label_p: float = DEFAULT_MAX_LABEL_P,
    max_length_ks: float = DEFAULT_MAX_LENGTH_KS,
    max_oov_rate_increase: float = DEFAULT_MAX_OOV_RATE_INCREASE,
) -> dict[str, Any]:
    """Compare two cleaned tables (``text``, ``label``) on labels, lengths and the OOV rate of ``vocabulary``.

    Only the single words of ``vocabulary`` count: an n-gram of 2 or 3 words is never in more texts than its
    words, so a word the vocabulary lacks is a word the model cannot read in any n-gram.

    Returns:
        ``flagged``, ``reasons`` (one sentence per check over its threshold), ``rows`` (reference, new) and
        ``checks``: ``label`` (chi-square ``statistic``, ``p_value``, ``reference`` and ``new`` class shares,
        ``total_variation``, ``new_classes``), ``length`` (KS ``statistic``, ``p_value``, median and mean words
        of each side) and ``oov`` (``reference_rate``, ``new_rate``, ``increase``); each with ``threshold`` and
        ``drifted``.
    """
    from scipy.stats import chi2_contingency, ks_2samp

    ref_counts, new_counts = reference["label"].value_counts(), new["label"].value_counts()
    classes = sorted(set(ref_counts.index) | set(new_counts.index))
    table = np.array([[int(counts.get(c, 0)) for c in classes] for counts in (ref_counts, new_counts)])
    statistic, p_value = 0.0, 1.0
    if len(classes) > 1 and table.sum(axis=1).all():
        test = chi2_contingency(table)
        statistic, p_value = float(test.statistic), float(test.pvalue)
    ref_shares, new_shares = _shares(ref_counts, classes), _shares(new_counts, classes)
    label = {
        "statistic": round(statistic, 4), "p_value": p_value, "reference": ref_shares, "new": new_shares,
        "total_variation": round(0.5 * sum(abs(ref_shares[c] - new_shares[c]) for c in classes), 4),
        "new_classes": sorted(set(new_counts.index) - set(ref_counts.index)),
        "threshold": max_label_p, "drifted": p_value < max_label_p,
    }

    words = pa.array([token for token in vocabulary if " " not in token], type=pa.large_string())
    ref_lengths, ref_words, ref_known = _word_counts(reference["text"], words)
    new_lengths, new_words, new_known = _word_counts(new["text"], words)
    ks = ks_2samp(ref_lengths, new_lengths)
    length = {
        "statistic": round(float(ks.statistic), 4), "p_value": float(ks.pvalue),
        "reference_median": float(np.median(ref_lengths)), "new_median": float(np.median(new_lengths)),
        "reference_mean": round(float(ref_lengths.mean()), 2), "new_mean": round(float(new_lengths.mean()), 2),
        "threshold": max_length_ks, "drifted": float(ks.statistic) > max_length_ks,
    }
    ref_rate = 1 - ref_known / ref_words if ref_words else 0.0
    new_rate = 1 - new_known / new_words if new_words else 0.0
    oov = {
        "reference_rate": round(ref_rate, 4), "new_rate": round(new_rate, 4),
        "increase": round(new_rate - ref_rate, 4), "threshold": max_oov_rate_increase,
        "drifted": new_rate - ref_rate > max_oov_rate_increase,
    }

    reasons = []
    if label["drifted"]:
        moved = ", ".join(f"{c} {ref_shares[c]:.1%} -> {new_shares[c]:.1%}" for c in classes)
        added = f"; new class(es) {', '.join(label['new_classes'])}" if label["new_classes"] else ""
        reasons.append(f"the label distribution changed (chi-square p = {p_value:.2g}, under {max_label_p:g}): "
                       f"{moved}{added}")
    if length["drifted"]:
        reasons.append(
            f"the text length changed (KS statistic {length['statistic']:.3f}, over {max_length_ks:g}): median "
            f"{length['reference_median']:g} -> {length['new_median']:g} words"
        )
    if oov["drifted"]:
        reasons.append(
            f"the out-of-vocabulary rate rose from {ref_rate:.1%} to {new_rate:.1%} of the words "
            f"(+{new_rate - ref_rate:.1%}, over {max_oov_rate_increase:.1%})"
        )
    return {
        "flagged": bool(reasons), "reasons": reasons, "rows": {"reference": len(reference), "new": len(new)},
        "checks": {"label": label, "length": length, "oov": oov},
    }


def _serving_vocabulary(store: Store, artifact_uri: str) -> list[str]:
    """The vocabulary of the exported version at ``artifact_uri``.

    The SavedModel holds its vocabulary as a constant of the lookup table, not as an asset file; the version's
    metadata (``<version prefix>.json``, written by :func:`maas_tasks.export.export_model`) names the trained
    model it was exported from, whose ``vocabulary.txt`` is that same vocabulary.
    """
    prefix = store_key(store, artifact_uri).rstrip("/")
    exported = json.loads(store.get_bytes(f"{prefix}.json"))
    return read_vocabulary(store.get_bytes(f"{exported['model_key'].rstrip('/')}/{VOCABULARY_FILE}"))


def _reference(registry: Any, model_name: str) -> tuple[dict[str, Any], Any, Any]:
    """What the new data is compared with: facts about it, the serving version's record and its training
    snapshot's (both None when there is nothing to compare with; the facts' ``message`` says why)."""
    version = registry.serving_version(model_name)
    if version is None:
        return {"serving_version": None, "message": f"{model_name} has no serving version yet: there is nothing to "
                                                     "compare the new data with"}, None, None
    record = registry.get_version(model_name, version)
    facts = {"serving_version": version, "reference_snapshot_id": record.snapshot_id}
    snapshot = registry.get_snapshot(record.snapshot_id) if record.snapshot_id is not None else None
    if snapshot is None or not record.artifact_uri or not (snapshot.metadata or {}).get("text_col"):
        missing = ("no training snapshot" if snapshot is None else "no exported artifact" if not record.artifact_uri
                   else f"a training snapshot ({snapshot.id}) without its text and label columns")
        return {**facts, "message": f"{model_name} v{version} records {missing}: there is nothing to compare the new "
                                    "data with"}, None, None
    return facts, record, snapshot


def _html_page(report: dict[str, Any]) -> bytes:
    """A small page of the report for a person: the verdict, then one row per check."""
    esc = html.escape
    rows = ""
    for name, check in report.get("checks", {}).items():
        shown = {k: v for k, v in check.items() if k not in ("threshold", "drifted")}
        rows += (
            f"<tr><td>{esc(name)}</td><td>{esc(json.dumps(shown))}</td><td>{esc(str(check['threshold']))}</td>"
            f"<td>{'drifted' if check['drifted'] else 'ok'}</td></tr>"
        )
    verdict = "drift flagged" if report["flagged"] else "no drift" if report["compared"] else "not compared"
    reasons = "".join(f"<li>{esc(reason)}</li>" for reason in report["reasons"])
    table = (
        f"<table><tr><th>check</th><th>measured</th><th>threshold</th><th>result</th></tr>{rows}</table>"
        if rows else ""
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>MaaS drift report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}table{border-collapse:collapse}</style></head><body>"
        f"<h1>Drift of snapshot {esc(str(report['snapshot_id']))}: {verdict}</h1>"
        f"<p>{esc(report['message'])}</p><ul>{reasons}</ul>{table}</body></html>"
    )
    return page.encode("utf-8")


def check_drift(
    store: Store,
    registry: Any,
    cleaned_key: str,
    snapshot_id: int,
    *,
    model_name: str,
    max_label_p: float = DEFAULT_MAX_LABEL_P,
    max_length_ks: float = DEFAULT_MAX_LENGTH_KS,
    max_oov_rate_increase: float = DEFAULT_MAX_OOV_RATE_INCREASE,
) -> dict[str, Any]:
    """Compare the cleaned table at ``cleaned_key`` with the data the serving ``model_name`` was trained on,
    write the report and record it with snapshot ``snapshot_id`` (``set_snapshot_reports(drift=...)``).

    The reference is the serving version's training snapshot, its rows that validation did not quarantine
    cleaned as :func:`maas_tasks.clean.clean_snapshots` cleans (with the text, label, id and group columns and
    label map its registry metadata records); the vocabulary is that version's (:func:`_serving_vocabulary`).
    With no serving version (or one recording no snapshot) the report says there is nothing to compare with.

    Args:
        max_label_p: the label distribution has drifted when the chi-square p-value is below this.
        max_length_ks: the text length has drifted when the KS statistic (0 to 1) is above this.
        max_oov_rate_increase: the vocabulary has drifted when the new OOV rate exceeds the reference's by
            more than this (a share of the words: 0.05 is 5 points).

    Returns:
        ``compared``, ``flagged``, ``reasons``, ``message``, ``model_name``, ``serving_version``,
        ``reference_snapshot_id``, ``snapshot_id``, ``thresholds``, ``rows`` and ``checks``
        (:func:`measure_drift`; empty when not compared), then ``key`` (the report JSON), ``report_uri`` and
        ``html_uri``.
    """
    thresholds = {
        "max_label_p": max_label_p, "max_length_ks": max_length_ks, "max_oov_rate_increase": max_oov_rate_increase,
    }
    new = pd.read_parquet(io.BytesIO(store.get_bytes(cleaned_key)), columns=["text", "label"])
    facts, record, snapshot = _reference(registry, model_name)
    report: dict[str, Any] = {
        "model_name": model_name, "snapshot_id": snapshot_id, "reference_snapshot_id": None, **facts,
        "compared": False, "flagged": False, "reasons": [], "thresholds": thresholds,
        "rows": {"new": len(new)}, "checks": {},
    }
    reference_sha = None
    if record is not None:
        reference_sha = snapshot.sha256
        columns = snapshot.metadata
        reference = clean_batches(
            store, [snapshot_batch(store, snapshot)], text_col=columns["text_col"], label_col=columns["label_col"],
            id_col=columns.get("id_col"), group_col=columns.get("group_col"), label_map=columns.get("label_map"),
        )
        if reference.empty:
            raise ValueError(
                f"{snapshot.source} (snapshot {snapshot.id}, which {model_name} v{record.version} was trained on) has "
                "no row left after cleaning: its metadata's text and label columns do not match its data"
            )
        measured = measure_drift(reference, new, _serving_vocabulary(store, record.artifact_uri), **thresholds)
        verdict = "; ".join(measured["reasons"]) if measured["flagged"] else "no check crossed its threshold"
        report.update(measured, compared=True, message=(
            f"compared with the {len(reference)} rows {model_name} v{record.version} was trained on "
            f"(snapshot {record.snapshot_id}): {verdict}"
        ))
    digest = hashlib.sha256(json.dumps(
        {"cleaned": cleaned_key, "model": model_name, "version": report["serving_version"],
         "reference": reference_sha, **thresholds}, sort_keys=True,
    ).encode())
    prefix = f"drift/{digest.hexdigest()[:16]}"
    store.put_bytes(f"{prefix}/{HTML_FILE}", _html_page(report))
    store.put_bytes(f"{prefix}/{REPORT_FILE}", json.dumps(report, indent=2, sort_keys=True).encode())
    report_uri = store.uri(f"{prefix}/{REPORT_FILE}")
    registry.set_snapshot_reports(snapshot_id, drift=report, drift_uri=report_uri)
    log.log(logging.WARNING if report["flagged"] else logging.INFO, "drift of snapshot %s: %s (report: %s)",
            snapshot_id, report["message"], report_uri)
    return {**report, "key": f"{prefix}/{REPORT_FILE}", "report_uri": report_uri,
            "html_uri": store.uri(f"{prefix}/{HTML_FILE}")}
