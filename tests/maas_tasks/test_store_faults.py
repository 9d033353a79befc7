"""Faults of the S3 store under the pipeline: an endpoint that dies in the middle of an export upload, and a
store that answers slowly, or more slowly than ``MAAS_S3_TIMEOUT``.

The store is moto's S3 server on loopback behind :class:`tests.fixtures.tcp_proxy.TcpProxy`, which adds the
latency or kills the endpoint; the client is the real S3Store (the minio SDK), the registry real PostgreSQL.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest

from maas_tasks.config import load_settings
from maas_tasks.export import export_registered_version, version_prefix
from maas_tasks.promote import PromotionError, promote_registered_version
from maas_tasks.registry import Registry
from maas_tasks.storage import (
    MANIFEST_NAME,
    S3_RETRIES,
    ObjectNotFound,
    StoreError,
    download_tree,
    open_store,
    read_manifest,
)
from tests.fixtures.invariants import assert_registry_invariants

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "faults"
TIMEOUT = 2.0  # MAAS_S3_TIMEOUT of the store behind the proxy


@pytest.fixture
def s3(s3_env, s3_endpoint, tcp_proxy):
    """``direct``: a store on moto's bucket; ``proxied``: the same bucket through a proxy (``proxy``)."""
    upstream = urlparse(s3_endpoint)
    proxy = tcp_proxy((upstream.hostname, upstream.port))
    proxied_env = {**s3_env, "MAAS_S3_ENDPOINT": proxy.url, "MAAS_S3_TIMEOUT": str(TIMEOUT)}
    return {
        "proxy": proxy,
        "env": proxied_env,
        "direct": open_store(settings=load_settings(s3_env)),
        "proxied": open_store(settings=load_settings(proxied_env)),
    }


@pytest.fixture
def registry(pg_dsn):
    with Registry.connect(pg_dsn) as reg:
        yield reg


def _copy_trained_model(trained_run: dict, target) -> str:
    """Put the session's trained model and its features in ``target``; returns the model's key."""
    source = trained_run["store"]
    for prefix in (trained_run["trained"]["key"], trained_run["features"]["key"]):
        for key in source.list_keys(prefix):
            target.put_bytes(key, source.get_bytes(key))
    return trained_run["trained"]["key"]


def test_an_endpoint_dying_mid_export_publishes_nothing_and_a_rerun_publishes_the_version(
    trained_run, s3, registry, tmp_path
):
    direct, proxied, proxy = s3["direct"], s3["proxied"], s3["proxy"]
    model_key = _copy_trained_model(trained_run, direct)
    version = registry.register_version(MODEL, status="candidate", dag_run_id="run-1")
    evaluation = {"model_name": MODEL, "version": version}
    prefix = version_prefix(MODEL, version)
    # The export task uploads its files in name order: the server dies 1 kB into the SavedModel's graph,
    # after the assets and the fingerprint went up.
    proxy.die_after(1000, marker=f"/{prefix}/saved_model.pb ".encode())

    started = time.monotonic()
    with pytest.raises(StoreError) as failure:
        export_registered_version(proxied, registry, model_key, evaluation)
    took = time.monotonic() - started

    assert proxy.killed.is_set()
    message = str(failure.value)
    assert message.startswith(f"uploading {proxied.uri(prefix + '/saved_model.pb')} failed: cannot reach {proxy.url}")
    assert "check MAAS_S3_ENDPOINT and that the server is up" in message
    assert failure.value.__cause__ is None and failure.value.__suppress_context__  # one line, no urllib3 chain
    assert took < 10, f"the dead endpoint took {took:.1f} s to be reported"
    # Part of the version is in the bucket, but not its manifest: nothing may read it as published.
    partial = direct.list_keys(prefix)
    assert f"{prefix}/fingerprint.pb" in partial and f"{prefix}/{MANIFEST_NAME}" not in partial
    assert not direct.exists(f"{prefix}.json")
    with pytest.raises(ObjectNotFound, match="has no MANIFEST.json: it was never published or its upload did not"):
        download_tree(direct, prefix, tmp_path / "partial")
    assert registry.get_version(MODEL, version).artifact_uri is None
    with pytest.raises(PromotionError, match="has no exported artifact"):
        promote_registered_version(load_settings(s3["env"]), direct, registry, MODEL, version)

    proxy.start()  # the endpoint is back, on the same address
    again = export_registered_version(proxied, registry, model_key, evaluation)

    files = download_tree(direct, prefix, tmp_path / "published")  # every file checked against the manifest
    published = [f"{prefix}/{rel}" for rel in files] + [f"{prefix}/{MANIFEST_NAME}"]
    assert direct.list_keys(prefix) == sorted(published)  # no file beside those published
    assert registry.get_version(MODEL, version).artifact_uri == again["uri"] == direct.uri(prefix)
    assert [e.kind for e in registry.list_events(model_name=MODEL, version=version)] == ["registered", "artifact_set"]
    assert_registry_invariants(registry)


def test_every_stage_completes_on_a_slow_store(s3, registry, tmp_path):
    from maas_tasks.clean import clean_snapshots, training_batches
    from maas_tasks.evaluate import evaluate_model
    from maas_tasks.export import export_model
    from maas_tasks.features import build_features
    from maas_tasks.ingest import ingest_data
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.train import train_model
    from maas_tasks.validate import validate_staged_snapshot

    store, proxy = s3["proxied"], s3["proxy"]
    proxy.latency = 0.05  # before every chunk of every answer (a few seconds in all), well within the timeout
    source = tmp_path / "reviews.csv"
    generate_reviews(200, seed=11).to_csv(source, index=False)
    columns = {"text_col": "text", "label_col": "label", "group_col": "movie_id"}

    staged = ingest_data(store, registry, str(source), run_id="slow")
    snapshot = validate_staged_snapshot(store, registry, staged, **columns, dag_run_id="slow")
    cleaned = clean_snapshots(store, training_batches(store, registry, snapshot), **columns)
    features = build_features(store, cleaned["key"], max_tokens=2000)
    trained = train_model(store, features["key"], epochs=1, batch_size=64, device="cpu")
    evaluation = evaluate_model(store, trained["key"], features["key"])
    exported = export_model(store, trained["key"], model_name=MODEL, version=1, metadata={"slow": True})

    assert proxy.chunks_down >= 50, "the stages did not go through the slow proxy"
    assert 0.5 < evaluation["accuracy"] <= 1
    files = download_tree(s3["direct"], exported["prefix"], tmp_path / "model")  # each file checked
    assert files == read_manifest(store, exported["prefix"])


def test_a_store_slower_than_its_timeout_fails_naming_the_object_and_one_just_within_it_answers(s3):
    from maas_tasks.features import build_features

    direct, proxy = s3["direct"], s3["proxy"]
    timeout = 0.5
    store = open_store(settings=load_settings({**s3["env"], "MAAS_S3_TIMEOUT": str(timeout)}))
    direct.put_bytes("cleaned/abc/data.parquet", b"not a table")
    # The timeout bounds each wait for the server's next bytes, not the whole answer: one of several chunks
    # each a little under the timeout arrives.
    proxy.latency = 0.7 * timeout
    assert store.get_bytes("cleaned/abc/data.parquet") == b"not a table"

    proxy.latency = 3 * timeout
    # Each attempt waits `timeout` for an answer; every retry is another attempt, after a short backoff.
    bound = (1 + S3_RETRIES) * (timeout + 0.5) + 1
    for call, what, key in (
        (lambda: build_features(store, "cleaned/abc/data.parquet"), "reading", "cleaned/abc/data.parquet"),
        (lambda: store.put_bytes("features/abc/vectorizer.json", b"{}"), "writing", "features/abc/vectorizer.json"),
    ):
        started = time.monotonic()
        with pytest.raises(StoreError) as failure:
            call()
        took = time.monotonic() - started
        message = str(failure.value)
        expected = f"{what} {store.uri(key)} timed out after {timeout:g} s at {proxy.url} (gave up after "
        assert message.startswith(expected), message
        assert message.endswith("the store is slow or unreachable: raise MAAS_S3_TIMEOUT or check the server")
        assert (1 + S3_RETRIES) * timeout <= took < bound, f"{what} {key} failed after {took:.1f} s"
