"""The server's TF Serving flags and what they switch on: Prometheus metrics, batching, gRPC on a Unix
socket, channel arguments, file:// base paths, config-file polling, and clear errors for bad files."""

from __future__ import annotations

import time
import urllib.request

import pytest

from serving.client import get_model_status_grpc, predict_grpc, predict_rest
from serving.model_config import parse_model_config, single_model_config, write_model_config
from serving.server import ModelServer, build_arg_parser, main, parse_channel_arguments, server_from_args

pytestmark = pytest.mark.integration


def _args(*argv: str):
    return build_arg_parser().parse_args(list(argv))


def test_tf_serving_flags_are_accepted_and_applied(tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 16 } num_batch_threads { value: 2 }")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics/here" }')
    server = server_from_args(
        _args(
            "--port=0", "--rest_api_port=0", f"--model_base_path=file://{tmp_path}/m", "--model_name=m",
            "--rest_api_timeout_in_ms=2500", "--rest_api_num_threads=7", f"--grpc_socket_path={tmp_path}/g.sock",
            "--grpc_channel_arguments=grpc.max_concurrent_streams=100,grpc.http2.max_pings_without_data=0",
            "--grpc_max_threads=9", "--model_config_file_poll_wait_seconds=30", "--enable_batching",
            f"--batching_parameters_file={batching}", f"--monitoring_config_file={monitoring}",
            "--tensorflow_intra_op_parallelism=2", "--tensorflow_inter_op_parallelism=1", "--saved_model_tags=serve",
            "--enable_model_warmup=false", "--num_load_threads=4", "--max_num_load_retries=5", "--flush_filesystem_caches=true",
        )
    )
    try:
        assert server.front_end.rest_timeout_seconds == 2.5 and server.front_end.rest_threads == 7
        assert server.front_end.grpc_socket_path == f"{tmp_path}/g.sock" and server.front_end.grpc_max_threads == 9
        assert dict(server.front_end.grpc_channel_arguments) == {
            "grpc.max_concurrent_streams": 100,
            "grpc.http2.max_pings_without_data": 0,
        }
        assert server.metrics_path == "/metrics/here"
        assert server._batcher is not None and server._batcher.options.max_batch_size == 16
        assert server.manager._load_options.intra_op_threads == 2 and not server.manager._load_options.warmup
        assert server.grpc_port is None and server.rest_port is None  # port 0 disables, as in TF Serving
    finally:
        server.stop()


@pytest.mark.parametrize(
    "flag, text, message",
    [
        ("--batching_parameters_file", "max_batch_size: 3", "Error parsing text-format tensorflow.serving.BatchingParameters"),
        ("--monitoring_config_file", "prometheus { }", "Error parsing text-format tensorflow.serving.MonitoringConfig"),
        ("--model_config_file", "model_config_list { nope: 1 }", "Error parsing text-format tensorflow.serving.ModelServerConfig"),
    ],
)
def test_a_bad_config_file_stops_the_server_with_tf_servings_message(tmp_path, caplog, flag, text, message):
    path = tmp_path / "file.config"
    path.write_text(text)
    extra = [] if flag == "--model_config_file" else [f"--model_base_path={tmp_path}"]
    assert main([f"{flag}={path}", "--port=0", "--rest_api_port=0", "--enable_batching", *extra]) == 2
    assert message in caplog.text


def test_channel_arguments_must_be_pairs():
    assert parse_channel_arguments("a=1, b=x") == (("a", 1), ("b", "x"))
    with pytest.raises(ValueError, match="not key=value"):
        parse_channel_arguments("a")


def test_metrics_count_requests_per_model_version_api_and_entrypoint(tmp_path, install_model, start_server):
    base = tmp_path / "sentiment"
    install_model(base, 1)
    server = start_server(single_model_config("sentiment", base), metrics_path="/monitoring/prometheus/metrics")
    predict_rest(["good"], model="sentiment", rest_url=server.rest_url)
    predict_grpc(["good", "bad"], model="sentiment", target=server.grpc_target)
    with pytest.raises(Exception):
        predict_rest(["good"], model="missing", rest_url=server.rest_url)
    with urllib.request.urlopen(server.rest_url + "/monitoring/prometheus/metrics", timeout=10) as response:
        text = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
    lines = text.splitlines()

    def has(*parts: str) -> bool:
        return any(all(p in line for p in parts) for line in lines if not line.startswith("#"))

    assert has("maas_serving_requests_total", 'model_name="sentiment"', 'model_version="1"', 'API="Predict"', 'entrypoint="REST"', 'status="OK"')
    assert has("maas_serving_requests_total", 'entrypoint="GRPC"', 'status="OK"')
    assert has("maas_serving_requests_total", 'model_name="missing"', 'status="NOT_FOUND"')
    assert has(":tensorflow:serving:request_latency_bucket", 'API="Predict"', 'entrypoint="REST"')
    assert has(":tensorflow:serving:request_count{", 'model_name="sentiment"', 'status="OK"')
    assert has(":tensorflow:serving:model_version_state", 'model_name="sentiment"', 'state="AVAILABLE"')


def test_batching_serves_concurrent_requests_and_reports_batch_sizes(tmp_path, install_model, start_server):
    from concurrent.futures import ThreadPoolExecutor

    from serving.batching import BatchingOptions

    base = tmp_path / "sentiment"
    install_model(base, 1)
    server = start_server(
        single_model_config("sentiment", base),
        batching=BatchingOptions(max_batch_size=32, num_batch_threads=1, batch_timeout_micros=2000),
        metrics_path="/metrics",
    )
    texts = [f"good {'bad ' * (i % 3)}" for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: predict_rest([t], model="sentiment", rest_url=server.rest_url)[0], texts))
    alone = [predict_grpc([t], model="sentiment", target=server.grpc_target)[0] for t in texts[:3]]
    assert [a["label"] for a in answers[:3]] == [a["label"] for a in alone]
    for batched, single in zip(answers[:3], alone):
        assert batched["scores"] == pytest.approx(single["scores"], abs=1e-6)
    with urllib.request.urlopen(server.rest_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    count = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith(":tensorflow:serving:batching_session:processed_batch_size_count"))
    assert 0 < count < 48 + 3 + 1  # fewer session runs than requests (warm-up aside)


def test_grpc_over_a_unix_socket_and_file_uri_base_paths(tmp_path, install_model):
    from serving.server import FrontEndOptions

    base = tmp_path / "sentiment"
    install_model(base, 1)
    socket_path = tmp_path / "grpc.sock"
    with ModelServer(
        single_model_config("sentiment", f"file://{base}"), grpc_port=None, rest_port=None, poll_wait_seconds=0,
        front_end=FrontEndOptions(grpc_socket_path=str(socket_path)),
    ):
        rows = get_model_status_grpc("sentiment", target=f"unix:{socket_path}")
        assert rows[0]["state"] == "AVAILABLE"
        assert predict_grpc(["good"], model="sentiment", target=f"unix:{socket_path}")[0]["label"] == "positive"


def test_the_config_file_is_re_read_when_polling_is_on(tmp_path, install_model):
    base = tmp_path / "sentiment"
    install_model(base, 1)
    other = tmp_path / "other"
    install_model(other, 2)
    config_path = tmp_path / "models.config"
    write_model_config(config_path, single_model_config("sentiment", base))
    with ModelServer(
        single_model_config("sentiment", base), grpc_port=0, rest_port=0, poll_wait_seconds=0,
        config_file=config_path, config_poll_seconds=0.2,
    ) as server:
        config = parse_model_config(
            f'model_config_list {{ config {{ name: "sentiment" base_path: "{base}" }} '
            f'config {{ name: "other" base_path: "{other}" }} }}'
        )
        write_model_config(config_path, config)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if get_model_status_grpc("other", target=server.grpc_target)[0]["state"] == "AVAILABLE":
                    break
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.1)
        assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 2
        config_path.write_text("this is { not a config")  # a bad edit keeps the config in force
        time.sleep(0.6)
        assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 2


def test_a_removed_model_reports_its_versions_in_end(tmp_path, install_model, start_server):
    from serving.client import reload_config_grpc

    base, other = tmp_path / "sentiment", tmp_path / "other"
    install_model(base, 1)
    install_model(other, 1)
    two = parse_model_config(
        f'model_config_list {{ config {{ name: "sentiment" base_path: "{base}" }} config {{ name: "other" base_path: "{other}" }} }}'
    )
    server = start_server(two)
    reload_config_grpc(server.grpc_target, single_model_config("sentiment", base))
    assert [(r["version"], r["state"]) for r in get_model_status_grpc("other", target=server.grpc_target)] == [(1, "END")]
    with pytest.raises(Exception, match="NOT_FOUND"):
        predict_grpc(["good"], model="other", target=server.grpc_target)
    reload_config_grpc(server.grpc_target, two)  # added back: loaded again
    assert predict_grpc(["good"], model="other", target=server.grpc_target)[0]["version"] == 1
