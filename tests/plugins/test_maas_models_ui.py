"""The Models page in the Airflow web UI, in headless Chromium, against the running local stack.

Against ``airflow standalone`` (see ``tests/fixtures/browser.py``): a user who is logged in opens **Models**
from the navigation, sees every version with its labels and gate decision, presses *Roll back to this* on
the earlier version, and watches the ``maas_rollback`` run the page triggered succeed under the stack's
scheduler and the stable version change in the registry, on the model server and on the page. The versions
are published straight into the stack's registry and store (exported SavedModels, no training run). The
screenshot is kept in ``test-artifacts/``; with ``MAAS_UPDATE_DOCS_IMAGES=1`` it also replaces
``docs/images/models-page.png``, the README's picture (a plain test run leaves the tracked tree alone).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.fixtures.browser import _wait_for_dag, save_screenshot

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "reviews"
README_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "models-page.png"


@pytest.fixture(scope="module")
def published(airflow_stack, tmp_path_factory):
    """reviews v1 and v2 exported and served by the stack's model server (v2 stable, v1 retired), and v3
    rejected by the gate."""
    from maas_tasks.promote import local_reconciler
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store
    from tests.fixtures.model_versions import export_saved_models, publish_version, record_snapshot

    settings = airflow_stack.settings
    store = open_store(settings=settings)
    models = export_saved_models(tmp_path_factory.mktemp("models-ui"))
    with Registry.connect(settings.registry_dsn) as registry:
        snapshot = record_snapshot(registry, store, rows=25_000, source="data/imdb_train.csv.gz")
        for n, accuracy in ((1, 0.89), (2, 0.9)):
            version = publish_version(registry, store, MODEL, accuracy=accuracy, snapshot_id=snapshot,
                                      dag_run_id=f"scheduled__2026-11-{n + 21}T00:00:00+00:00", saved_model=models[n],
                                      seed=n)
            registry.mark_serving(MODEL, version, grace_seconds=600)  # v1 stays loaded as previous for a while
        local_reconciler(settings, store, registry)()
        rejected = publish_version(registry, store, MODEL, accuracy=0.62, snapshot_id=snapshot,
                                   dag_run_id="manual__2026-11-24T09:30:00+00:00", saved_model=None, seed=3)
        assert (registry.serving_target(MODEL).stable, registry.get_version(MODEL, rejected).status) == (2, "rejected")
    _wait_for_dag(airflow_stack, "maas_rollback")
    return settings


def served_version(settings) -> int:
    from serving.client import predict_grpc

    return predict_grpc(["good"], model=MODEL, target=settings.grpc_target)[0]["version"]


def test_the_models_page_shows_the_versions_and_rolls_back_from_the_navigation(ui_page, airflow_stack, published):
    from maas_tasks.registry import Registry

    assert served_version(published) == 2
    ui_page.set_viewport_size({"width": 1440, "height": 1100})
    ui_page.get_by_role("link", name="Models", exact=True).click()
    ui_page.wait_for_url(re.compile(r"/plugin/models"))
    frame = ui_page.frame_locator("iframe[title=Models]")
    section = frame.locator(f'section[data-model="{MODEL}"]')
    section.locator("tr[data-version]").first.wait_for()
    assert section.locator("tr[data-version]").evaluate_all("rows => rows.map(r => r.dataset.version)") == ["3", "2", "1"]
    v1, v2, v3 = (section.locator(f'tr[data-version="{n}"]') for n in (1, 2, 3))
    assert "stable" in v2.locator(".label").all_inner_texts() and "serving" in v2.inner_text()
    assert "accuracy 0.6167 is below the minimum 0.7000" in v3.inner_text()  # why it was rejected, shown
    assert v1.get_by_role("button", name="Roll back to this").is_visible()
    assert v2.get_by_role("button").count() == 0 and v3.get_by_role("button").count() == 0

    v1.get_by_role("button", name="Roll back to this").click()  # asks first: "Serve reviews v1 instead of v2?"
    assert "Serve reviews v1 instead of v2?" in v1.inner_text()
    v1.get_by_role("button", name="Roll back to v1").click()
    banner = frame.locator("#triggered")
    banner.wait_for()
    assert "Rollback triggered" in banner.inner_text() and "rolling reviews back to v1" in banner.inner_text()
    run_id = re.search(r"maas_rollback run (\S+)", banner.inner_text()).group(1)
    # The page reloads itself while the run is queued or running; the scheduler runs it.
    run = airflow_stack.wait_for_run("maas_rollback", run_id, timeout=300)
    assert run["state"] == "success" and run["conf"] == {"model_name": MODEL, "version": 1}
    assert run["triggering_user_name"] == airflow_stack.username
    frame.locator("#triggered .run-state", has_text="success").wait_for(timeout=30_000)
    assert "stable" in frame.locator(f'section[data-model="{MODEL}"] tr[data-version="1"] .label').all_inner_texts()
    assert "previous" in frame.locator(f'section[data-model="{MODEL}"] tr[data-version="2"] .label').all_inner_texts()
    with Registry.connect(published.registry_dsn) as registry:
        assert registry.serving_target(MODEL).stable == 1
    assert served_version(published) == 1

    # The page is in a frame as tall as the window: make the window as tall as the page for the screenshot.
    height = frame.locator("body").evaluate("body => body.scrollHeight")
    ui_page.set_viewport_size({"width": 1440, "height": min(height + 32, 2400)})
    ui_page.wait_for_timeout(500)
    path = save_screenshot(ui_page, "models-page")
    if os.environ.get("MAAS_UPDATE_DOCS_IMAGES") == "1":
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_IMAGE)
    # The run's link on the page opens the run in the whole window, not inside the page's frame.
    frame.locator("#triggered a").click()
    ui_page.wait_for_url(re.compile(r"/dags/maas_rollback/runs/"))
