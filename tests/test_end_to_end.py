"""End to end: the training DAG through Airflow on the real components, then predictions over REST and gRPC.

Real PostgreSQL (Airflow's metadata and the registry), the S3 API (moto's server, standing in for
MinIO), the embedded model server as a background process, and ``maas run`` (Airflow's
``dag.test()``) as a user runs it. Predictions go through the ``tensorflow-serving-api`` stubs and
plain HTTP, not through MaaS's own clients, so the served contract is checked from the outside.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from maas_tasks.config import load_settings
from tests.fixtures.postgres import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = ["A wonderful, moving film with superb acting.", "Dull and boring, a total waste of time."]


@pytest.fixture(scope="module")
def e2e(pg_cluster, s3_endpoint, tmp_path_factory):
    """Environment, settings and a running model server for the whole module; stopped at the end."""
    from maas_tasks import postgres, stack
    from maas_tasks.sample_data import generate_reviews
    from maas_tasks.storage import open_store

    root = tmp_path_factory.mktemp("e2e")
    suffix = uuid.uuid4().hex[:8]
    for db in (f"airflow_{suffix}", f"maas_{suffix}"):
        postgres.ensure_database(pg_cluster, db)
    env = {
        **os.environ,
        "MAAS_HOME": str(root / "maas"),
        "MAAS_STORE_URL": f"s3://maas-e2e-{suffix}",
        "MAAS_S3_ENDPOINT": s3_endpoint,
        "MAAS_S3_ACCESS_KEY": "e2e-access",
        "MAAS_S3_SECRET_KEY": "e2e-secret",
        "MAAS_REGISTRY_DSN": pg_cluster.dsn(f"maas_{suffix}"),
        "MAAS_GRPC_PORT": str(find_free_port()),
        "MAAS_REST_PORT": str(find_free_port()),
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_cluster.sqlalchemy_url(f"airflow_{suffix}"),
    }
    settings = load_settings(env)
    store = open_store(settings=settings)
    store.ensure_bucket()
    stack.migrate_airflow_db(settings, base_env=env)
    server = stack.start_model_server(settings, base_env=env)

    data = root / "reviews.csv"
    generate_reviews(320, seed=7).to_csv(data, index=False)
    try:
        yield {"env": env, "settings": settings, "store": store, "data": data, "root": root, "server": server}
    finally:
        stack.stop_model_server(settings)


def maas(e2e, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``maas`` CLI as a user would, in the e2e environment."""
    return subprocess.run(
        [sys.executable, "-m", "maas_tasks.cli", *args],
        env=e2e["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )


def registry(e2e):
    from maas_tasks.registry import Registry

    return Registry.connect(e2e["settings"].registry_dsn)


def task_log_events(path: Path) -> list[str]:
    """The messages of a task log file as Airflow's log reader parses it (JSON lines)."""
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]


def predict_grpc(e2e, texts: list[str]):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "sentiment"
    request.model_spec.signature_name = "serving_default"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    with grpc.insecure_channel(e2e["settings"].grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    return response.model_spec.version.value, outputs


def predict_rest(e2e, texts: list[str]) -> dict:
    body = json.dumps({"signature_name": "serving_default", "instances": texts}).encode()
    request = urllib.request.Request(
        f"{e2e['settings'].rest_url}/v1/models/sentiment:predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_first_run_trains_registers_and_serves_version_1(e2e):
    result = maas(e2e, "run", "--data", str(e2e["data"]), "--param", "epochs=4")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "sentiment v1 (serving)" in result.stdout
    assert "promoted   yes" in result.stdout
    # Progress a line per task; Airflow's own log lines go to a file, not the terminal.
    assert re.search(r"^  train_model +success +\d+\.\d s$", result.stdout, re.M)
    assert "[DAG TEST]" not in result.stdout + result.stderr and "Filling up the DagBag" not in result.stdout
    run_log = Path(re.search(r"Airflow's log: (\S+)\)", result.stdout).group(1))
    assert "[DAG TEST] starting task_id=train_model" in run_log.read_text()

    # The run's task logs are where the Airflow UI reads them, with training progress and the metrics.
    run_id = re.search(r"^run +(\S+): success$", result.stdout, re.M).group(1)
    logs = Path(e2e["env"]["AIRFLOW_HOME"]) / "logs" / "dag_id=maas_training" / f"run_id={run_id}"
    events = {task: task_log_events(logs / f"task_id={task}" / "attempt=1.log") for task in ("train_model", "evaluate_model")}
    epochs = [e for e in events["train_model"] if re.match(r"epoch \d/4: loss [\d.]+, accuracy", e)]
    assert epochs[0].startswith("epoch 1/4") and any(re.match(r"trained on .* epoch\(s\)", e) for e in events["train_model"])
    assert any(e.startswith("trained on /CPU:0: ") for e in events["train_model"])
    assert any(e.startswith("held-out metrics on ") for e in events["evaluate_model"])
    assert any(e.startswith("gate passed: ") for e in events["evaluate_model"])

    with registry(e2e) as reg:
        v1 = reg.get_version("sentiment", 1)
        assert v1.status == "serving"
        assert v1.metrics["accuracy"] >= 0.7
        assert {"precision", "recall", "f1", "roc_auc"} <= set(v1.metrics)
        assert v1.snapshot_id is not None and v1.dag_run_id.startswith("manual__")
        assert v1.artifact_uri.startswith("s3://")

    store = e2e["store"]
    assert store.exists("models/sentiment/1/MANIFEST.json")
    assert store.exists("models/sentiment/1.json")
    assert store.list_keys("staging") == []
    assert (e2e["settings"].serving_dir / "sentiment" / "1" / "saved_model.pb").is_file()

    version, outputs = predict_grpc(e2e, TEXTS)
    assert version == 1
    assert outputs["scores"].shape == (2, 2) and outputs["scores"].dtype.kind == "f"
    assert outputs["classes"].shape == (2, 2)
    classes = [c.decode() for c in outputs["classes"][0]]
    assert sorted(classes) == ["negative", "positive"]
    labels = [label.decode() for label in outputs["label"]]
    assert labels == ["positive", "negative"]

    rest = predict_rest(e2e, TEXTS)
    assert [p["label"] for p in rest["predictions"]] == labels
    assert rest["predictions"][0]["scores"] == pytest.approx(outputs["scores"][0].tolist(), abs=1e-5)


def test_second_run_serves_version_2_and_retires_version_1(e2e):
    result = maas(e2e, "run", "--data", str(e2e["data"]), "--param", "epochs=3")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "sentiment v2 (serving)" in result.stdout
    with registry(e2e) as reg:
        assert reg.serving_version("sentiment") == 2
        assert reg.get_version("sentiment", 1).status == "retired"
    version, _ = predict_grpc(e2e, TEXTS[:1])
    assert version == 2
    predict = maas(e2e, "predict", "--grpc", TEXTS[0])
    assert predict.returncode == 0, predict.stderr
    assert "sentiment v2: positive" in predict.stdout
    models = maas(e2e, "models", "--json")
    assert [(m["version"], m["status"]) for m in json.loads(models.stdout)] == [(2, "serving"), (1, "retired")]


@pytest.mark.parametrize(
    "content, stage, message",
    [
        ("review,label\nnice film,positive\nbad film,negative\n", "validate_data",
         "column 'text' (the text column) is missing; the file has columns: review, label; pass --text-col"),
        ("", "ingest_data", "bad.csv is empty: it has no header and no rows"),
    ],
    ids=["no-text-column", "empty-file"],
)
def test_bad_input_stops_before_training_and_leaves_nothing(e2e, tmp_path, content, stage, message):
    store = e2e["store"]
    with registry(e2e) as reg:
        before_versions = [(v.model_name, v.version) for v in reg.list_versions()]
    before_keys = [k for k in store.list_keys() if k.startswith(("staging/", "snapshots/", "models/"))]
    bad = tmp_path / "bad.csv"
    bad.write_text(content)

    result = maas(e2e, "run", "--data", str(bad))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"{stage}=failed" in output
    assert message in output and "Traceback" not in output
    # The failing task's own message is the last thing said, with its log.
    assert output.strip().splitlines()[-2].startswith(f"error      {stage} failed: ")
    assert "train_model=" in output and "train_model=success" not in output

    with registry(e2e) as reg:
        assert [(v.model_name, v.version) for v in reg.list_versions()] == before_versions
    assert [k for k in store.list_keys() if k.startswith(("staging/", "snapshots/", "models/"))] == before_keys


def test_a_model_below_the_gate_is_rejected_and_never_exported(e2e):
    result = maas(e2e, "run", "--data", str(e2e["data"]), "--param", "epochs=1", "--param", "min_accuracy=1.0")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "(rejected)" in result.stdout and "promoted   no" in result.stdout
    with registry(e2e) as reg:
        rejected = [v for v in reg.list_versions("sentiment") if v.status == "rejected"]
        assert len(rejected) == 1 and rejected[0].artifact_uri is None
        assert reg.serving_version("sentiment") == 2
    assert not e2e["store"].exists(f"models/sentiment/{rejected[0].version}/MANIFEST.json")
    version, _ = predict_grpc(e2e, TEXTS[:1])
    assert version == 2


def airflow_db(e2e):
    import psycopg2

    url = e2e["env"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://")
    return psycopg2.connect(url)


def test_a_killed_maas_run_is_marked_failed_by_the_next_one(e2e):
    import signal
    import time

    claims = e2e["settings"].home / "run" / "maas-run"
    killed = subprocess.Popen([sys.executable, "-m", "maas_tasks.cli", "run", "--data", str(e2e["data"])],
                              env=e2e["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = Path(e2e["env"]["AIRFLOW_HOME"]) / "logs" / "dag_id=maas_training"
    deadline = time.monotonic() + 300
    claim = None
    while time.monotonic() < deadline:  # kill it in the middle of the run: once training has begun
        claim = next(iter(claims.glob("*.json")), None)
        if claim and list(logs.glob(f"run_id={json.loads(claim.read_text())['run_id']}/task_id=train_model/*.log")):
            break
        time.sleep(0.2)
    run_id = json.loads(claim.read_text())["run_id"]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    with airflow_db(e2e) as conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM dag_run WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == "running"  # left behind by the dead process

    result = maas(e2e, "run", "--data", str(e2e["data"]), "--param", "epochs=2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"marked run {run_id} failed: the maas run that ran it was killed" in result.stdout
    with airflow_db(e2e) as conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM dag_run WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == "failed"
        cur.execute("SELECT count(*) FROM task_instance WHERE run_id = %s AND state IN ('running', 'queued')", (run_id,))
        assert cur.fetchone()[0] == 0
    assert list(claims.glob("*.json")) == []


def test_rollback_from_the_cli_drops_no_request_and_models_shows_who_serves_what(e2e):
    import threading

    from tests.fixtures.invariants import assert_registry_invariants

    with registry(e2e) as reg:
        before = reg.serving_target("sentiment")
    stop, failures, seen = threading.Event(), [], set()

    def client(use_rest: bool) -> None:
        while not stop.is_set():
            try:
                if use_rest:
                    predict_rest(e2e, TEXTS[:1])
                else:
                    seen.add(predict_grpc(e2e, TEXTS[:1])[0])  # the version that answered
            except Exception as exc:  # noqa: BLE001 - every failed request counts
                failures.append(repr(exc))

    clients = [threading.Thread(target=client, args=(rest,)) for rest in (True, False)]
    for thread in clients:
        thread.start()
    try:
        back = maas(e2e, "rollback")
        forth = maas(e2e, "rollback", "--to", str(before.stable))
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"sentiment v{before.previous} is stable on node(s) local; v{before.stable} is retired" in back.stdout
    assert forth.returncode == 0, forth.stdout + forth.stderr
    assert failures == [] and {before.previous, before.stable} <= seen

    models = json.loads(maas(e2e, "models", "--json").stdout)
    stable = next(m for m in models if m["desired"] == "stable")
    assert stable["version"] == before.stable and stable["observed"] == {"local": "AVAILABLE as stable"}
    table = maas(e2e, "models").stdout
    assert f"sentiment: desired stable v{before.stable}" in table and "node local" in table and "agrees" in table
    with registry(e2e) as reg:
        assert_registry_invariants(reg)
