"""Contract tests of the object store: the same behaviour on the file backend and on S3 (moto server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maas_tasks.config import load_settings
from maas_tasks.storage import (
    MANIFEST_NAME,
    FileStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    check_key,
    delete_prefix,
    download_tree,
    open_store,
    read_manifest,
    upload_tree,
)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}", settings=load_settings({"MAAS_HOME": str(tmp_path)}))
    env = request.getfixturevalue("s3_env")
    return open_store(settings=load_settings(env))


def _tree(root: Path) -> Path:
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"\x00proto" * 100)
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(bytes(range(256)) * 50)
    return root


def test_bytes_round_trip_and_overwrite(store):
    store.put_bytes("a/b/c.txt", b"one")
    assert store.get_bytes("a/b/c.txt") == b"one"
    store.put_bytes("a/b/c.txt", b"two")
    assert store.get_bytes("a/b/c.txt") == b"two"
    assert store.exists("a/b/c.txt")
    assert not store.exists("a/b/missing")


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    store.put_file("big/file.bin", src)
    dst = tmp_path / "out" / "dst.bin"
    store.get_file("big/file.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temporary left behind


def test_missing_key_raises_object_not_found(store, tmp_path):
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get_bytes("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope/x", tmp_path / "x")


def test_list_keys_is_recursive_sorted_and_prefix_scoped(store):
    for key in ["p/2", "p/1", "p/sub/3", "pq/4", "other"]:
        store.put_bytes(key, b".")
    assert store.list_keys("p") == ["p/1", "p/2", "p/sub/3"]
    assert store.list_keys("p/") == ["p/1", "p/2", "p/sub/3"]
    assert store.list_keys() == ["other", "p/1", "p/2", "p/sub/3", "pq/4"]
    assert store.list_keys("absent") == []


def test_delete_and_delete_prefix(store):
    for key in ["d/1", "d/2/3", "keep"]:
        store.put_bytes(key, b".")
    store.delete("d/1")
    store.delete("d/1")  # deleting a missing key is not an error
    assert store.list_keys() == ["d/2/3", "keep"]
    assert delete_prefix(store, "d") == 1
    assert store.list_keys() == ["keep"]


@pytest.mark.parametrize("key", ["", "/", "../etc/passwd", "a/../b", "a//b", "a\\b"])
def test_invalid_keys_are_rejected(store, key):
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_bytes(key, b"x")


def test_upload_tree_writes_manifest_last_and_download_verifies(store, tmp_path):
    src = _tree(tmp_path / "model")
    files = upload_tree(store, src, "models/m/1")
    assert set(files) == {"saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"}
    assert read_manifest(store, "models/m/1") == files
    manifest = json.loads(store.get_bytes(f"models/m/1/{MANIFEST_NAME}"))
    assert manifest["files"]["variables/variables.index"]["size"] == 5

    out = tmp_path / "copy"
    download_tree(store, "models/m/1", out)
    for rel in files:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()


def test_download_tree_rejects_a_corrupt_file(store, tmp_path):
    upload_tree(store, _tree(tmp_path / "model"), "models/m/2")
    store.put_bytes("models/m/2/variables/variables.index", b"tampered")
    with pytest.raises(StoreError, match="does not match its manifest"):
        download_tree(store, "models/m/2", tmp_path / "copy")


def test_unpublished_tree_has_no_manifest(store, tmp_path):
    store.put_bytes("models/m/3/saved_model.pb", b"half an upload")
    with pytest.raises(ObjectNotFound, match="never published"):
        download_tree(store, "models/m/3", tmp_path / "copy")


def test_uri_names_the_backend(store):
    uri = store.uri("x/y")
    assert uri.endswith("/x/y")
    assert uri.startswith("s3://" if isinstance(store, S3Store) else "file:///")


def test_open_store_errors_are_actionable(tmp_path):
    settings = load_settings({"MAAS_HOME": str(tmp_path)})
    with pytest.raises(StoreError, match="three slashes"):
        open_store("file://host/dir", settings=settings)
    with pytest.raises(StoreError, match="MAAS_S3_ENDPOINT"):
        open_store("s3://bucket", settings=settings)
    with pytest.raises(StoreError, match="not supported"):
        open_store("gs://bucket", settings=settings)


def test_default_store_is_under_maas_home(tmp_path):
    store = open_store(settings=load_settings({"MAAS_HOME": str(tmp_path)}))
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "store"


def test_s3_missing_bucket_and_unreachable_endpoint(s3_endpoint, tmp_path):
    env = {"MAAS_STORE_URL": "s3://never-created", "MAAS_S3_ENDPOINT": s3_endpoint,
           "MAAS_S3_ACCESS_KEY": "a", "MAAS_S3_SECRET_KEY": "b"}
    with pytest.raises(StoreError, match="does not exist.*create it"):
        open_store(settings=load_settings(env)).put_bytes("k", b"v")
    env["MAAS_S3_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: nothing listens
    unreachable = open_store(settings=load_settings(env))
    for call in (lambda: unreachable.get_bytes("k"), unreachable.ensure_bucket, unreachable.list_keys):
        with pytest.raises(StoreError, match="cannot reach http://127.0.0.1:9"):
            call()


def test_s3_prefix_scopes_the_store(s3_env):
    settings = load_settings(s3_env)
    root = open_store(settings=settings)
    scoped = open_store(f"{settings.store_url}/team-a", settings=settings)
    scoped.put_bytes("x", b"1")
    assert root.list_keys() == ["team-a/x"]
    assert scoped.list_keys() == ["x"]
    assert scoped.uri("x") == f"{settings.store_url}/team-a/x"


def test_check_key_normalises():
    assert check_key("/a/b/") == "a/b"


def test_modified_at_is_when_an_object_was_last_written(store):
    from datetime import datetime, timedelta, timezone

    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    store.put_bytes("dated/a.txt", b"x")
    assert before <= store.modified_at("dated/a.txt") <= datetime.now(timezone.utc) + timedelta(seconds=5)
    with pytest.raises(ObjectNotFound):
        store.modified_at("dated/missing.txt")


def test_a_file_store_lists_the_temporary_files_killed_writers_left(tmp_path):
    store = FileStore(tmp_path / "store")
    assert store.temporary_files() == []
    store.put_bytes("a/b.json", b"{}")
    left = tmp_path / "store" / "a" / ".b.json.tmp-0123"
    left.write_bytes(b"half")
    assert store.temporary_files() == [left] and store.list_keys() == ["a/b.json"]
