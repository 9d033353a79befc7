"""Tests of the drift checks: the served tokenizer's words, the three statistics, and the report against a real
registry (the serving version, its training snapshot and its exported vocabulary)."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from maas_tasks.clean import clean_frame, clean_snapshots
from maas_tasks.drift import check_drift, measure_drift, split_words
from maas_tasks.registry import Registry
from maas_tasks.sample_data import generate_reviews
from tests.maas_tasks.conftest import put_parquet

TRICKY = [
    "A GOOD film!", "not good <br /> at all", "Très bien, ça m'a plu ! 👍", "don't STOP?!", "", "tabs\tand\nnewlines",
    "ÀÉÎ Straße ΩΜΈΓΑ", "1,000 reasons... (really)", "<a href='x'>link</a> & <b>bold", "   ", "2 < 3 > 1",
]


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


def _cleaned(df: pd.DataFrame) -> pd.DataFrame:
    return clean_frame(df, text_col="text", label_col="label")


def _vocabulary(texts: pd.Series) -> list[str]:
    """Every word in at least two texts, as the feature stage keeps them, and a few bigrams (which OOV ignores)."""
    counts = pd.Series(split_words(texts).to_pylist()).map(set).explode().value_counts()
    return [*counts[counts >= 2].index, "good film", "the acting"]


def test_words_are_cut_as_the_served_model_cuts_them():
    import tensorflow as tf

    from maas_tasks.model import ngram_tokens

    served = [[word.decode("utf-8") for word in row if word] for row in ngram_tokens(tf.constant(TRICKY), 1).to_list()]
    assert split_words(TRICKY).to_pylist() == served
    assert split_words(pd.Series(["<i>Hi</i>, you!", ""])).to_pylist() == [["hi", "you", "!"], []]


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return _cleaned(generate_reviews(1200, seed=1))


def test_data_from_the_same_source_does_not_drift(reference):
    new = _cleaned(generate_reviews(1200, seed=2))
    result = measure_drift(reference, new, _vocabulary(reference["text"]))
    assert result["flagged"] is False and result["reasons"] == []
    checks = result["checks"]
    assert checks["label"]["p_value"] > 0.01 and checks["label"]["reference"] == pytest.approx(
        {"negative": 0.5, "positive": 0.5}, abs=0.02)
    assert checks["length"]["statistic"] < 0.1 and checks["length"]["reference_median"] > 20
    assert checks["oov"]["reference_rate"] < 0.05 and abs(checks["oov"]["increase"]) < 0.02
    assert result["rows"] == {"reference": len(reference), "new": len(new)}
    json.dumps(result)  # recorded in the registry as it is


def test_each_check_flags_its_own_drift(reference):
    vocabulary = _vocabulary(reference["text"])
    new = _cleaned(generate_reviews(1200, seed=3))
    skewed = pd.concat([new[new["label"] == "positive"], new[new["label"] == "negative"].head(100)])
    labels = measure_drift(reference, skewed, vocabulary)
    assert labels["flagged"] and [r.split(" (")[0] for r in labels["reasons"]] == ["the label distribution changed"]
    assert labels["checks"]["label"]["new"]["positive"] > 0.8 and labels["checks"]["label"]["p_value"] < 1e-6

    short = new.assign(text=new["text"].str.split().str[:6].str.join(" "))
    lengths = measure_drift(reference, short, vocabulary)
    assert lengths["checks"]["length"]["drifted"] and lengths["checks"]["length"]["new_median"] <= 6
    assert "the text length changed (KS statistic" in lengths["reasons"][0]

    # Five words of each text become words the vocabulary never saw; the lengths stay.
    slang = new.assign(text=new["text"].str.split().map(lambda w: " ".join(["totes", "yeet", "vibes", "zorp",
                                                                             "blorp", *w[5:]])))
    words = measure_drift(reference, slang, vocabulary)
    assert [check for check, found in words["checks"].items() if found["drifted"]] == ["oov"]
    assert words["checks"]["oov"]["increase"] > 0.05
    assert words["reasons"][0].startswith("the out-of-vocabulary rate rose from")

    with_new_class = pd.concat([new, new.head(300).assign(label="neutral")])
    added = measure_drift(reference, with_new_class, vocabulary)
    assert added["checks"]["label"]["new_classes"] == ["neutral"] and "new class(es) neutral" in added["reasons"][0]
    # Thresholds are the caller's: loose enough, nothing is flagged.
    assert not measure_drift(reference, skewed, vocabulary, max_label_p=0.0)["flagged"]


def _publish(store, registry, df: pd.DataFrame, name: str, **metadata) -> tuple[int, dict]:
    """A published snapshot recorded in the registry, as validation leaves one."""
    key = put_parquet(store, f"snapshots/{name}/data.parquet", df)
    sha = hashlib.sha256(store.get_bytes(key)).hexdigest()
    snapshot_id = registry.record_snapshot(store.uri(key), sha, len(df), f"{name}.csv",
                                           {"text_col": "text", "label_col": "label", **metadata})
    return snapshot_id, {"key": key, "quarantine_key": None, "sha256": sha, "source": f"{name}.csv"}


def _serve(store, registry, snapshot_id: int, vocabulary: list[str], model: str = "sentiment") -> int:
    """A serving version trained on ``snapshot_id``, with the exported layout drift reads its vocabulary from."""
    version = registry.register_version(model, snapshot_id=snapshot_id)
    store.put_bytes("trained/abc/vocabulary.txt", "\n".join(vocabulary).encode())
    store.put_bytes(f"models/{model}/{version}.json", json.dumps({"model_key": "trained/abc"}).encode())
    registry.set_artifact(model, version, store.uri(f"models/{model}/{version}"))
    registry.mark_serving(model, version)
    return version


def test_without_a_serving_version_there_is_nothing_to_compare(file_store, registry):
    snapshot_id, batch = _publish(file_store, registry, generate_reviews(100, seed=4), "first")
    cleaned = clean_snapshots(file_store, [batch], text_col="text", label_col="label")
    result = check_drift(file_store, registry, cleaned["key"], snapshot_id, model_name="sentiment")
    assert (result["compared"], result["flagged"], result["serving_version"]) == (False, False, None)
    assert result["message"] == "sentiment has no serving version yet: there is nothing to compare the new data with"
    recorded = registry.get_snapshot(snapshot_id)
    assert recorded.drift["compared"] is False and recorded.drift_uri == result["report_uri"]
    assert file_store.exists(result["key"]) and b"not compared" in file_store.get_bytes(
        result["key"].replace("report.json", "report.html"))


def test_new_data_is_compared_with_what_the_serving_version_was_trained_on(file_store, registry):
    raw = generate_reviews(1000, seed=5).assign(label=lambda d: d["label"].map({"negative": "0", "positive": "1"}))
    raw.loc[0, "text"] = "zorp " * 50  # quarantined by validation: must not count
    reference_id, reference_batch = _publish(file_store, registry, raw, "reviews-1",
                                             label_map={"0": "negative", "1": "positive"})
    put_parquet(file_store, "quarantine/r1/rows.parquet", pd.DataFrame({"row": [0], "reason": ["too odd"]}))
    registry.set_snapshot_reports(reference_id, quarantine_uri=file_store.uri("quarantine/r1/rows.parquet"))
    reference = _cleaned(raw.iloc[1:].assign(label=lambda d: d["label"].map({"0": "negative", "1": "positive"})))
    version = _serve(file_store, registry, reference_id, _vocabulary(reference["text"]))

    same_id, same_batch = _publish(file_store, registry, generate_reviews(1000, seed=6), "reviews-2")
    cleaned = clean_snapshots(file_store, [same_batch], text_col="text", label_col="label")
    calm = check_drift(file_store, registry, cleaned["key"], same_id, model_name="sentiment")
    assert (calm["compared"], calm["flagged"], calm["serving_version"], calm["reference_snapshot_id"]) == (
        True, False, version, reference_id)
    assert calm["rows"] == {"reference": len(reference), "new": cleaned["rows"]}
    assert calm["message"].startswith(f"compared with the {len(reference)} rows sentiment v{version} was trained on")
    # The reference was cleaned with its own label map: its "0"/"1" are the classes the new data names.
    assert calm["checks"]["label"]["reference"]["negative"] == pytest.approx(0.5, abs=0.03)

    odd = generate_reviews(600, seed=7)
    odd = odd[odd["label"] == "positive"].assign(text=lambda d: d["text"].str.split().str[:5].str.join(" ")
                                                 + " totes yeet zorp")
    odd_id, odd_batch = _publish(file_store, registry, odd, "reviews-3")
    odd_cleaned = clean_snapshots(file_store, [odd_batch], text_col="text", label_col="label", test_fraction=0.3)
    flagged = check_drift(file_store, registry, odd_cleaned["key"], odd_id, model_name="sentiment",
                          max_oov_rate_increase=0.1)
    assert flagged["flagged"] and len(flagged["reasons"]) == 3
    assert flagged["thresholds"]["max_oov_rate_increase"] == 0.1
    recorded = registry.get_snapshot(odd_id)
    assert recorded.drift["flagged"] is True and recorded.drift["reasons"] == flagged["reasons"]
    assert recorded.drift_uri == flagged["report_uri"] == file_store.uri(flagged["key"])
    stored = json.loads(file_store.get_bytes(flagged["key"]))
    assert stored["checks"]["oov"] == flagged["checks"]["oov"]
    assert flagged["html_uri"] == file_store.uri(flagged["key"].replace("report.json", "report.html"))
    page = file_store.get_bytes(flagged["key"].replace("report.json", "report.html")).decode()
    assert "drift flagged" in page and "out-of-vocabulary rate rose" in page
    # The same comparison again writes the same report.
    assert check_drift(file_store, registry, odd_cleaned["key"], odd_id, model_name="sentiment",
                       max_oov_rate_increase=0.1)["key"] == flagged["key"]
    assert registry.get_snapshot(same_id).drift["flagged"] is False
