"""Shared fixtures of the ML stage tests: a file store and one small trained model reused across modules.

Training even a tiny model costs seconds (TensorFlow start-up, tracing), so the pipeline from a
generated snapshot to a trained model runs once per session and evaluate/export tests reuse it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from maas_tasks.storage import FileStore, Store


def put_parquet(store: Store, key: str, df: pd.DataFrame) -> str:
    """Write ``df`` as Parquet at ``key`` (what ingest does with a raw CSV) and return the key."""
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    store.put_bytes(key, buffer.getvalue())
    return key


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained through clean → features → train on 300 generated reviews (the test split held out)."""
    from maas_tasks.clean import clean_snapshots
    from maas_tasks.features import build_features
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model

    store = FileStore(tmp_path_factory.mktemp("trained") / "store")
    snapshot = put_parquet(store, "snapshots/test/data.parquet", generate_reviews(300, seed=5))
    cleaned = clean_snapshots(
        store, [{"key": snapshot, "quarantine_key": None}], text_col="text", label_col="label", group_col="movie_id"
    )
    features = build_features(store, cleaned["key"], max_tokens=5000)
    trained = train_model(store, features["key"], epochs=2, batch_size=16, device="cpu")
    return {"store": store, "snapshot_key": snapshot, "cleaned": cleaned, "features": features, "trained": trained}
