"""Promotion end to end: object store (FileStore) -> serving volume -> model config -> running server."""

from __future__ import annotations

import pytest

from maas_tasks.storage import FileStore, StoreError, upload_tree
from serving.client import get_model_status_grpc, predict_grpc
from serving.model_config import get_model_entry, read_model_config, single_model_config, write_model_config
from serving.promotion import PromotionError, install_version, promote_version

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path, saved_models) -> FileStore:
    store = FileStore(tmp_path / "store")
    for version, path in saved_models.items():
        upload_tree(store, path, f"models/sentiment/{version}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"published intact, but not a SavedModel")
    upload_tree(store, broken, "models/sentiment/3")
    return store


@pytest.fixture
def serving(tmp_path, install_model, start_server):
    """A serving volume whose config file already serves another model, and a server started from it."""
    serving_dir = tmp_path / "serving"
    install_model(serving_dir / "other", 1)
    config_path = serving_dir / "models.config"
    write_model_config(config_path, single_model_config("other", serving_dir / "other"))
    server = start_server(read_model_config(config_path))
    return serving_dir, config_path, server


def _promote(store, version, serving_dir, config_path, server, timeout=30.0):
    return promote_version(
        store,
        f"models/sentiment/{version}",
        model_name="sentiment",
        version=version,
        serving_dir=serving_dir,
        config_path=config_path,
        grpc_target=server.grpc_target,
        timeout=timeout,
    )


def test_install_is_idempotent_and_leaves_no_temporary_dir(tmp_path, store):
    serving_dir = tmp_path / "serving"
    path = install_version(store, "models/sentiment/1", serving_dir, "sentiment", 1)
    assert path == (serving_dir / "sentiment" / "1").resolve() and (path / "saved_model.pb").is_file()
    assert install_version(store, "models/sentiment/1", serving_dir, "sentiment", 1) == path
    assert sorted(p.name for p in (serving_dir / "sentiment").iterdir()) == ["1"]


def test_install_refuses_a_different_existing_version(tmp_path, store):
    path = install_version(store, "models/sentiment/1", tmp_path / "serving", "sentiment", 1)
    (path / "saved_model.pb").write_bytes(b"changed")
    with pytest.raises(PromotionError, match="already exists but does not match"):
        install_version(store, "models/sentiment/1", tmp_path / "serving", "sentiment", 1)


def test_install_rejects_a_corrupt_store_file(tmp_path, store):
    (store.root / "models/sentiment/2/saved_model.pb").write_bytes(b"bit rot")
    with pytest.raises(StoreError, match="does not match its manifest"):
        install_version(store, "models/sentiment/2", tmp_path / "serving", "sentiment", 2)
    assert list((tmp_path / "serving" / "sentiment").iterdir()) == []


def test_promote_serves_the_new_version_and_keeps_other_models(store, serving):
    serving_dir, config_path, server = serving
    first = _promote(store, 1, serving_dir, config_path, server)
    assert first["previous_version"] is None
    second = _promote(store, 2, serving_dir, config_path, server)
    assert second == {
        "model": "sentiment",
        "version": 2,
        "path": str((serving_dir / "sentiment" / "2").resolve()),
        "previous_version": 1,
    }
    assert predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]["version"] == 2
    states = {s["version"]: s["state"] for s in get_model_status_grpc("sentiment", target=server.grpc_target)}
    assert states == {2: "AVAILABLE", 1: "END"}
    written = read_model_config(config_path)
    assert list(get_model_entry(written, "sentiment").model_version_policy.specific.versions) == [2]
    assert get_model_entry(written, "other").base_path == str(serving_dir / "other")
    assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 1


def test_failed_promotion_restores_the_previous_config(store, serving):
    serving_dir, config_path, server = serving
    _promote(store, 1, serving_dir, config_path, server)
    before = config_path.read_text()
    with pytest.raises(PromotionError) as info:
        _promote(store, 3, serving_dir, config_path, server)
    message = str(info.value)
    assert "version 3 of model sentiment failed to load" in message and "restored" in message
    assert config_path.read_text() == before
    assert not (serving_dir / "sentiment" / "3").exists()
    assert predict_grpc(["good"], model="sentiment", target=server.grpc_target)[0]["version"] == 1


def test_concurrent_promotions_of_two_models_keep_both_entries(store, serving, saved_models):
    from concurrent.futures import ThreadPoolExecutor

    serving_dir, config_path, server = serving
    upload_tree(store, saved_models[2], "models/spam/1")
    jobs = [("sentiment", "models/sentiment/1"), ("spam", "models/spam/1")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: promote_version(
            store, job[1], model_name=job[0], version=1, serving_dir=serving_dir, config_path=config_path,
            grpc_target=server.grpc_target, timeout=60,
        ), jobs))
    assert [r["model"] for r in results] == ["sentiment", "spam"]
    config = read_model_config(config_path)
    assert {c.name for c in config.model_config_list.config} == {"other", "sentiment", "spam"}
