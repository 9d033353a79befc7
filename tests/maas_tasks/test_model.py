"""Behaviour tests of the served model, in the spirit of Made-With-ML's: a model trained here on generated
reviews must react to language the way a reader would, accept any input, and answer the same in a
SavedModel as in process. Plus the artifact round trip of :mod:`maas_tasks.model`."""

from __future__ import annotations

import numpy as np
import pytest

from maas_tasks.storage import FileStore
from tests.maas_tasks.conftest import put_parquet

NEUTRAL = " The film was shown on a Tuesday evening in a small cinema near the station."


@pytest.fixture(scope="module")
def behaving(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from maas_tasks.clean import clean_snapshot
    from maas_tasks.evaluate import load_model
    from maas_tasks.features import build_features
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model

    store = FileStore(tmp_path_factory.mktemp("behaviour") / "store")
    snapshot = put_parquet(store, "snapshots/b/data.parquet", generate_reviews(3000, seed=21))
    cleaned = clean_snapshot(store, snapshot, text_col="text", label_col="label", group_col="movie_id")
    features = build_features(store, cleaned["key"])
    trained = train_model(store, features["key"], device="cpu")
    return {"store": store, "key": trained["key"], "model": load_model(store, trained["key"])}


def positive(behaving: dict, texts: list[str]) -> np.ndarray:
    from maas_tasks.evaluate import predict_scores

    return predict_scores(behaving["model"], texts)[:, 1]  # classes: negative, positive


def test_strong_sentiment_words_move_the_score_their_way(behaving):
    base = "The acting was"
    good, bad, plain = positive(behaving, [f"{base} brilliant.", f"{base} terrible.", f"{base} there."])
    assert good > plain > bad
    assert good - bad > 0.1


def test_negation_flips_the_meaning(behaving):
    praise, negated = positive(behaving, ["The story was great.", "The story was not great."])
    assert praise > 0.5 > negated
    complaint, denied = positive(behaving, ["The story was boring.", "The story was never boring."])
    assert denied > complaint


def test_a_neutral_sentence_barely_moves_the_score(behaving):
    texts = ["I loved the soundtrack; my sister loved it too.", "The pacing was really dull.",
             "What a clumsy film; even the plot could not save it."]
    before = positive(behaving, texts)
    after = positive(behaving, [text + NEUTRAL for text in texts])
    assert np.abs(after - before).max() < 0.15


def test_empty_odd_and_very_long_texts_get_valid_scores(behaving):
    from maas_tasks.evaluate import predict_scores

    texts = ["", "   ", "!!!", "zzqx", "Très bien, ça m'a plu ! 👍", "great " * 20000, "<br /><br />" * 50]
    scores = predict_scores(behaving["model"], texts)
    assert scores.shape == (len(texts), 2) and np.isfinite(scores).all()
    assert scores.sum(axis=1) == pytest.approx([1.0] * len(texts), abs=1e-5)
    assert scores[5, 1] > 0.5  # a long text of one positive word is still positive


def test_the_saved_model_answers_as_in_process(behaving, tmp_path):
    import tensorflow as tf

    from maas_tasks.evaluate import predict_scores
    from maas_tasks.export import write_saved_model
    from maas_tasks.model import load_artifact

    texts = ["The acting was brilliant.", "The plot was not good at all!", "", "great " * 3000, "ça va"]
    write_saved_model(behaving["model"], load_artifact(behaving["store"], behaving["key"]).classes, tmp_path / "1")
    served = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"](text=tf.constant(texts))
    np.testing.assert_allclose(served["scores"].numpy(), predict_scores(behaving["model"], texts), atol=1e-6)


def test_artifact_round_trip_and_refusals(behaving, tmp_path):
    from maas_tasks.model import Artifact, load_artifact, save_artifact

    store = behaving["store"]
    artifact = load_artifact(store, behaving["key"])
    copy = FileStore(tmp_path / "copy")
    assert save_artifact(copy, "trained/x", artifact) == [f"trained/x/{n}" for n in ("model.json", "vocabulary.txt", "weights.npz")]
    again = load_artifact(copy, "trained/x")
    assert again.vocabulary == artifact.vocabulary and np.array_equal(again.kernel, artifact.kernel)
    assert again.info == artifact.info
    broken = Artifact(**{**artifact.__dict__, "vocabulary": artifact.vocabulary[:-1]})
    save_artifact(copy, "trained/broken", broken)
    with pytest.raises(ValueError, match="the model files disagree"):
        load_artifact(copy, "trained/broken")
