"""Faults at every step of a promotion, and a corrupt served version across a model server restart: after
each, one reconciliation leaves the registry, the node and its clients agreeing on one version.

The model server runs as its own process (as in the local stack) and the promotion in another, which
the test kills with SIGKILL at a chosen step; the registry is real PostgreSQL and the store a FileStore.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from maas_tasks.registry import Registry
from maas_tasks.storage import FileStore, upload_tree
from serving.client import predict_grpc
from serving.sync import Node, reconcile_node
from tests.fixtures.invariants import assert_registry_invariants
from tests.fixtures.postgres import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEASE_TIMEOUT = 3.0  # the killed promotion's phase timeout: its canary lease is twice that

# Runs one promotion, then kills itself with SIGKILL at the step named by argv[2].
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from maas_tasks.registry import Registry
    from maas_tasks.storage import FileStore
    from serving import client, rollout, sync

    spec = json.loads(sys.argv[1])
    step = sys.argv[2]
    model, candidate = spec["model"], spec["candidate"]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=False, when=lambda *a, **k: True):
        original = getattr(owner, name)
        def wrapper(*args, **kwargs):
            hit = when(*args, **kwargs)
            if hit and before:
                die()
            result = original(*args, **kwargs)
            if hit:
                die()
            return result
        setattr(owner, name, wrapper)

    is_candidate = lambda store, prefix, *a, **k: prefix == f"models/{model}/{candidate}"
    has_canary = lambda target, config, **k: any(e.name.endswith("__canary") for e in config.model_config_list.config)
    if step == "before-install":
        wrap(sync, "ensure_installed", before=True, when=is_candidate)
    elif step == "after-install":
        wrap(sync, "ensure_installed", when=is_candidate)
    elif step == "after-reload":
        wrap(client, "reload_config_grpc", when=has_canary)
    elif step == "before-commit":
        wrap(Registry, "commit_canary", before=True)
    elif step == "after-commit":
        wrap(Registry, "commit_canary")

    node = sync.Node(spec["node_id"], __import__("pathlib").Path(spec["serving_dir"]),
                     __import__("pathlib").Path(spec["config"]), spec["grpc"])
    store = FileStore(__import__("pathlib").Path(spec["store"]))
    with Registry.connect(spec["dsn"]) as registry:
        rollout.move_stable(registry, model, candidate, expected_stable=spec["stable"], timeout=spec["timeout"],
                            reconcile_local=lambda: sync.reconcile_node(node, registry, store, timeout=spec["timeout"]))
    print("finished without being killed")
    """
)


@pytest.fixture(scope="module")
def server_node(tmp_path_factory, pg_cluster):
    """A model server process (as ``maas stack up`` starts it), its node, a registry and a store."""
    from maas_tasks import postgres, stack
    from maas_tasks.config import load_settings

    root = tmp_path_factory.mktemp("faults")
    db = f"faults_{uuid.uuid4().hex[:8]}"
    postgres.ensure_database(pg_cluster, db)
    env = {**os.environ, "MAAS_HOME": str(root / "maas"), "MAAS_REGISTRY_DSN": pg_cluster.dsn(db),
           "MAAS_GRPC_PORT": str(find_free_port()), "MAAS_REST_PORT": str(find_free_port()),
           "MAAS_STORE_URL": f"file://{root / 'store'}"}
    settings = load_settings(env)
    stack.start_model_server(settings, base_env=env)
    node = Node("local", settings.serving_dir, settings.serving_config, settings.grpc_target, settings.rest_url)
    try:
        yield {"settings": settings, "env": env, "node": node, "dsn": pg_cluster.dsn(db),
               "store": FileStore(root / "store")}
    finally:
        stack.stop_model_server(settings)


@pytest.fixture
def model(server_node, saved_models, tmp_path):
    """A fresh model name with v1 stable on the node, and v2 published (with golden requests)."""
    from maas_tasks.export import write_golden_requests

    name = f"m{uuid.uuid4().hex[:8]}"
    with Registry.connect(server_node["dsn"]) as registry:
        for source in (1, 2):
            version = registry.register_version(name)
            local = tmp_path / str(version)
            shutil.copytree(saved_models[source], local)
            write_golden_requests(local, ["good", "awful"])
            upload_tree(server_node["store"], local, f"models/{name}/{version}")
            registry.set_artifact(name, version, server_node["store"].uri(f"models/{name}/{version}"))
        registry.mark_serving(name, 1)
        reconcile_node(server_node["node"], registry, server_node["store"])
    return name


def served(server_node, model: str) -> int:
    return predict_grpc(["good"], model=model, target=server_node["node"].grpc_target)[0]["version"]


def converge_and_check(server_node, model: str, expected: int) -> None:
    """One reconciliation (as the agent's next pass or `maas stack up`); then everyone agrees."""
    with Registry.connect(server_node["dsn"]) as registry:
        report = reconcile_node(server_node["node"], registry, server_node["store"])
        target = registry.serving_target(model)
        assert (target.stable, target.canary) == (expected, None)
        assert report["models"][model]["stable"] == {"version": expected, "state": "AVAILABLE", "error": ""}
        assert "canary" not in report["models"][model]
        assert_registry_invariants(registry)
    assert served(server_node, model) == expected
    config = server_node["node"].config_path.read_text()
    assert f"{model}__canary" not in config


@pytest.mark.parametrize(
    "step, stable_after",
    [("before-install", 1), ("after-install", 1), ("after-reload", 1), ("before-commit", 1), ("after-commit", 2)],
)
def test_a_promotion_killed_at_any_step_converges_on_one_version(server_node, model, step, stable_after):
    node = server_node["node"]
    spec = {"model": model, "candidate": 2, "stable": 1, "timeout": LEASE_TIMEOUT, "dsn": server_node["dsn"],
            "node_id": node.node_id, "serving_dir": str(node.serving_dir), "config": str(node.config_path),
            "grpc": node.grpc_target, "store": str(server_node["store"].root)}
    killed = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec), step], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # Whatever the step, clients were never sent to v2 before the registry said so.
    assert served(server_node, model) == 1 or stable_after == 2
    if stable_after == 1:
        time.sleep(2 * LEASE_TIMEOUT)  # the dead promotion's lease on the canary slot runs out
    converge_and_check(server_node, model, stable_after)


def test_a_corrupt_served_version_is_repaired_after_a_server_restart(server_node, model):
    from maas_tasks import stack

    settings, node = server_node["settings"], server_node["node"]
    variables = next((node.serving_dir / model / "1" / "variables").glob("variables.data-*"))
    stack.stop_model_server(settings)
    variables.write_bytes(b"corrupted while the server was down")
    stack.start_model_server(settings, base_env=server_node["env"])  # starts anyway: other models serve
    with pytest.raises(Exception, match="Servable not found|NOT_FOUND"):
        served(server_node, model)
    assert stack.sync_local_node(settings).startswith("node local: ")  # what `maas stack up` runs
    converge_and_check(server_node, model, 1)
    assert variables.read_bytes() == (server_node["store"].root / f"models/{model}/1" / variables.relative_to(
        node.serving_dir / model / "1")).read_bytes()
