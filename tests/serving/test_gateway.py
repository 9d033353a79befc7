"""The API gateway with real traffic: a real nginx (the OS's) on free loopback ports in front of two real
model server processes serving a test model, called over REST and gRPC.

A bad or missing key is refused (401 / UNAUTHENTICATED), a burst beyond a key's rate is limited (429 with
Retry-After / RESOURCE_EXHAUSTED), a body over the limit gets 413, requests are spread over both
replicas, and a replica killed with SIGKILL mid-traffic costs no request that the client's one retry does
not save. ``nginx -t`` passes on the local config and on the compose template as the nginx image
renders it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from maas_tasks.config import load_settings
from serving import gateway
from serving.client import (
    ServingClientError,
    get_model_status_rest,
    predict_grpc,
    predict_rest,
)
from serving.model_config import single_model_config, write_model_config
from tests.fixtures.postgres import find_free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "alice": "alice-key-0123456789abcdefABCDEF",
    "bob": "bob-key-0123456789abcdefABCDEFGH",
    "carol": "carol-key-0123456789abcdefABCDEF",
}


def _write_keys(path: Path, keys: dict[str, str]) -> Path:
    path.write_text("# test keys\n" + "".join(f"{name}:{key}\n" for name, key in keys.items()))
    path.chmod(0o600)
    return path


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # not up (or not there) yet
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, install_model):
    """Two model server processes (as the stack runs them) serving the test model ``sentiment`` v1.

    Module-scoped to pay their start-up once; the last test of the module kills one of them.
    """
    root = tmp_path_factory.mktemp("replicas")
    install_model(root / "sentiment", 1)
    config = root / "models.config"
    write_model_config(config, single_model_config("sentiment", root / "sentiment"))
    started = []
    for index in range(2):
        grpc_port, rest_port = find_free_port(), find_free_port()
        log = open(root / f"server-{index}.log", "wb")  # noqa: SIM115 - closed at teardown
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--host=127.0.0.1", f"--port={grpc_port}",
             f"--rest_api_port={rest_port}", f"--model_config_file={config}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        started.append({"proc": proc, "log": log, "grpc": f"127.0.0.1:{grpc_port}", "rest": f"127.0.0.1:{rest_port}"})
    try:
        for replica in started:
            _wait_until(
                lambda r=replica: get_model_status_rest("sentiment", rest_url=f"http://{r['rest']}", retries=0)[0]["state"]
                == "AVAILABLE",
                120, f"model server {replica['rest']}",
            )
        yield started
    finally:
        for replica in started:
            if replica["proc"].poll() is None:
                os.killpg(replica["proc"].pid, signal.SIGKILL)
            replica["proc"].wait(10)
            replica["log"].close()


class RunningGateway:
    """nginx started from a config rendered by serving.gateway for some settings and replicas."""

    def __init__(self, root: Path, replicas: list[dict], keys_file: Path, **overrides: str) -> None:
        env = {
            "MAAS_HOME": str(root / "home"),
            "MAAS_GATEWAY_GRPC_PORT": str(find_free_port()),
            "MAAS_GATEWAY_REST_PORT": str(find_free_port()),
            "MAAS_GATEWAY_KEYS_FILE": str(keys_file),
            **overrides,
        }
        self.settings = load_settings(env)
        self.layout = gateway.gateway_layout(self.settings.home)
        assert gateway.write_config(self.settings, self.layout, [r["grpc"] for r in replicas], [r["rest"] for r in replicas])
        gateway.check_config(self.layout)
        self.proc = subprocess.Popen(gateway.nginx_argv(self.layout), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.rest_url = self.settings.gateway_rest_url
        self.grpc_target = self.settings.gateway_grpc_target
        _wait_until(lambda: urllib.request.urlopen(f"{self.rest_url}/healthz", timeout=2).status == 200, 20, "gateway")

    def log(self) -> list[dict]:
        return gateway.read_access_log(self.layout.access_log)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        self.proc.wait(20)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    return _write_keys(tmp_path_factory.mktemp("keys") / "api_keys", KEYS)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, replicas, keys_file):
    """``main``: limits no test reaches; ``strict``: 1 request/s per key, a burst of 2, bodies up to 64 KiB."""
    running = {
        "main": RunningGateway(
            tmp_path_factory.mktemp("gw-main"), replicas, keys_file, MAAS_GATEWAY_RATE="100000",
            MAAS_GATEWAY_BURST="100000",
        ),
        "strict": RunningGateway(
            tmp_path_factory.mktemp("gw-strict"), replicas, keys_file,
            MAAS_GATEWAY_RATE="1", MAAS_GATEWAY_BURST="2", MAAS_GATEWAY_MAX_BODY="64k",
        ),
    }
    yield running
    for gw in running.values():
        gw.stop()


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def _predict_url(gw: RunningGateway) -> str:
    return f"{gw.rest_url}/v1/models/sentiment:predict"


PREDICT_BODY = json.dumps({"instances": ["good"]}).encode()


# --- configuration ----------------------------------------------------------------------------------------


def test_the_key_file_is_created_private_and_checked(tmp_path):
    path = tmp_path / "gw" / "api_keys"
    assert gateway.ensure_keys_file(path) is True
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    assert gateway.ensure_keys_file(path) is False and path.read_text() == first  # never replaced
    (key,) = gateway.read_api_keys(path)
    assert key.name == "default" and re.fullmatch(gateway.KEY_PATTERN, key.key)
    assert key.key not in repr(key)  # a logged ApiKey does not leak the key

    path.chmod(0o644)
    with pytest.raises(gateway.GatewayError, match="chmod 600"):
        gateway.read_api_keys(path)
    path.chmod(0o600)
    for bad in ("alice:short", "al ice:0123456789abcdef0123", "no-colon-0123456789abcdef", "x:0123456789abcdef0123$"):
        path.write_text(f"ok:0123456789abcdef0123\n{bad}\n")
        with pytest.raises(gateway.GatewayError, match="line 2 is not name:key") as error:
            gateway.read_api_keys(path)
        assert "0123456789abcdef" not in str(error.value)  # the error never quotes a key
    path.write_text("a:0123456789abcdef0123\nb:0123456789abcdef0123\n")
    with pytest.raises(gateway.GatewayError, match="line 2 repeats"):
        gateway.read_api_keys(path)


def test_the_rendered_local_config_passes_nginx_t(tmp_path, keys_file):
    settings = load_settings({"MAAS_HOME": str(tmp_path / "home"), "MAAS_GATEWAY_KEYS_FILE": str(keys_file)})
    layout = gateway.gateway_layout(settings.home)
    targets = ["127.0.0.1:18500", "127.0.0.1:18502", "127.0.0.1:18504"]
    assert gateway.write_config(settings, layout, targets, ["127.0.0.1:18501", "127.0.0.1:18503", "127.0.0.1:18505"])
    gateway.check_config(layout)
    assert gateway.write_config(settings, layout, targets, ["127.0.0.1:18501", "127.0.0.1:18503", "127.0.0.1:18505"]) is False
    conf = layout.conf_file.read_text()
    assert "${" not in conf
    assert f"listen 127.0.0.1:{settings.gateway_grpc_port} http2;" in conf
    assert f"listen 127.0.0.1:{settings.gateway_rest_port};" in conf
    assert f"rate={settings.gateway_rate}r/s" in conf and f"burst={settings.gateway_burst} nodelay" in conf
    upstreams = layout.upstreams.read_text()
    assert all(f"server {t} max_fails=1 fail_timeout=10s;" in upstreams for t in targets)
    # The map holds the keys: only the owner reads it (and nginx's master, as root or the owner).
    assert layout.conf_dir.stat().st_mode & 0o777 == 0o700
    for path in (layout.conf_file, layout.upstreams, layout.keys_map):
        assert path.stat().st_mode & 0o777 == 0o600
    assert all(key in layout.keys_map.read_text() for key in KEYS.values())

    keys_file.chmod(0o640)
    try:
        with pytest.raises(gateway.GatewayError, match="readable by others"):
            gateway.write_config(settings, layout, targets, targets)
    finally:
        keys_file.chmod(0o600)


def test_the_compose_template_passes_nginx_t_as_the_nginx_image_renders_it(tmp_path, keys_file):
    """The nginx image's entrypoint substitutes every variable of the container's environment with
    envsubst and runs the scripts of /docker-entrypoint.d/: do the same here, with the compose upstream
    file. nginx -t resolves upstream host names, and the compose services' names exist only on the compose
    network, so they are the one thing replaced (by 127.0.0.1); container paths become temporary ones."""
    env = {
        "PATH": os.environ["PATH"],
        "MAAS_GATEWAY_BIND": "0.0.0.0", "MAAS_GATEWAY_GRPC_PORT": "8510", "MAAS_GATEWAY_REST_PORT": "8511",
        "MAAS_GATEWAY_RATE": "100", "MAAS_GATEWAY_BURST": "200", "MAAS_GATEWAY_MAX_BODY": "16m",
        "GATEWAY_PID_FILE": str(tmp_path / "nginx.pid"), "GATEWAY_ERROR_LOG": str(tmp_path / "error.log"),
        "GATEWAY_ACCESS_LOG": str(tmp_path / "access.log"), "GATEWAY_TEMP_DIR": str(tmp_path / "temp"),
        "GATEWAY_UPSTREAMS": str(tmp_path / "maas" / "upstreams.conf"),
        "GATEWAY_KEYS_MAP": str(tmp_path / "maas" / "api_keys.conf"),
        "MAAS_GATEWAY_KEYS_FILE": str(keys_file),
    }
    defined = " ".join(f"${{{name}}}" for name in env)
    rendered = subprocess.run(
        ["envsubst", defined], input=gateway.TEMPLATE.read_text(), env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "${" not in rendered and "$maas_key_name" in rendered  # nginx's own variables are left alone
    (tmp_path / "nginx.conf").write_text(rendered)
    (tmp_path / "temp").mkdir()

    hook = subprocess.run(["sh", str(gateway.COMPOSE_KEYS_SCRIPT)], env=env, capture_output=True, text=True, check=False)
    assert hook.returncode == 0, hook.stderr
    assert not any(key in hook.stdout + hook.stderr for key in KEYS.values())
    # The shell twin renders exactly the entries the local stack renders.
    entries = [line for line in gateway.render_keys_map(gateway.read_api_keys(keys_file)).splitlines() if line[0] != "#"]
    assert Path(env["GATEWAY_KEYS_MAP"]).read_text().splitlines() == entries

    upstreams = gateway.COMPOSE_UPSTREAMS.read_text()
    Path(env["GATEWAY_UPSTREAMS"]).write_text(re.sub(r"server [a-z0-9-]+:", "server 127.0.0.1:", upstreams))
    result = subprocess.run(
        [gateway.nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
         "-g", gateway.global_directives()],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_compose_upstreams_name_the_compose_replicas():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]
    named = set(re.findall(r"server ([a-z0-9-]+):(\d+)", gateway.COMPOSE_UPSTREAMS.read_text()))
    assert {host for host, _ in named} <= set(services), "upstreams.compose.conf names a service compose lacks"
    assert len({host for host, _ in named}) >= 2


# --- keys ------------------------------------------------------------------------------------------------


def test_rest_needs_a_valid_key(gateways, monkeypatch):
    gw = gateways["main"]
    url = _predict_url(gw)
    for headers in ({}, {"X-API-Key": "not-a-key-0123456789abcdef"}, {"X-API-Key": KEYS["alice"].upper()},
                    {"Authorization": f"Basic {KEYS['alice']}"}):
        status, _, body = _post(url, PREDICT_BODY, headers)
        assert status == 401 and "API key" in body["error"], headers
    for headers in ({"X-API-Key": KEYS["alice"]}, {"Authorization": f"Bearer {KEYS['alice']}"}):
        status, _, body = _post(url, PREDICT_BODY, headers)
        assert status == 200 and body["predictions"][0]["label"] == "positive"

    assert urllib.request.urlopen(f"{gw.rest_url}/healthz", timeout=5).status == 200  # no key needed
    # The replicas' metrics are not published through the gateway, key or not.
    request = urllib.request.Request(f"{gw.rest_url}/monitoring/prometheus/metrics", headers={"X-API-Key": KEYS["alice"]})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 404

    with pytest.raises(ServingClientError) as refused:
        predict_rest(["good"], model="sentiment", rest_url=gw.rest_url, api_key="wrong-key-0123456789abcdef", retries=0)
    assert refused.value.code == "UNAUTHENTICATED"
    monkeypatch.setenv("MAAS_API_KEY", KEYS["alice"])  # what clients use when given no key
    assert predict_rest(["good"], model="sentiment", rest_url=gw.rest_url)[0]["version"] == 1


def test_grpc_needs_a_valid_key(gateways, monkeypatch):
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    gw = gateways["main"]
    for key in (None, "not-a-key-0123456789abcdef"):
        monkeypatch.delenv("MAAS_API_KEY", raising=False)
        with pytest.raises(ServingClientError) as refused:
            predict_grpc(["good"], model="sentiment", target=gw.grpc_target, api_key=key, retries=0)
        assert refused.value.code == "UNAUTHENTICATED" and "x-api-key" in refused.value.message
    [answer] = predict_grpc(["good"], model="sentiment", target=gw.grpc_target, api_key=KEYS["alice"])
    assert (answer["label"], answer["version"]) == ("positive", 1)
    monkeypatch.setenv("MAAS_API_KEY", KEYS["alice"])
    assert predict_grpc(["bad"], model="sentiment", target=gw.grpc_target)[0]["label"] == "negative"

    # Reloading a replica's model config is its agent's business, never a client's.
    with grpc.insecure_channel(gw.grpc_target) as channel, pytest.raises(grpc.RpcError) as denied:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(), timeout=5, metadata=(("x-api-key", KEYS["alice"]),)
        )
    assert denied.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_maas_predict_gateway_sends_the_key(gateways, keys_file, monkeypatch, capsys):
    from maas_tasks import cli

    gw = gateways["main"]
    monkeypatch.setenv("MAAS_HOME", str(gw.settings.home))
    monkeypatch.setenv("MAAS_GATEWAY_REST_PORT", str(gw.settings.gateway_rest_port))
    monkeypatch.setenv("MAAS_GATEWAY_GRPC_PORT", str(gw.settings.gateway_grpc_port))
    monkeypatch.setenv("MAAS_GATEWAY_KEYS_FILE", str(keys_file))
    monkeypatch.delenv("MAAS_API_KEY", raising=False)
    before = len(gw.log())
    # Without MAAS_API_KEY the local key file's first key (alice's) is used; MAAS_API_KEY wins over it.
    assert cli.main(["predict", "good", "--gateway", "--version", "1"]) == 0
    monkeypatch.setenv("MAAS_API_KEY", KEYS["carol"])
    assert cli.main(["predict", "bad", "--gateway", "--grpc"]) == 0
    out = capsys.readouterr().out
    assert "[REST via gateway] sentiment v1: positive" in out and "[gRPC via gateway] sentiment v1: negative" in out
    _wait_until(lambda: len(gw.log()) >= before + 2, 5, "access log")  # nginx logs a stream as it closes
    assert [(e["api"], e["key_name"]) for e in gw.log()[before:]] == [("rest", "alice"), ("grpc", "carol")]
    monkeypatch.setenv("MAAS_API_KEY", "not-a-key-0123456789abcdef")
    assert cli.main(["predict", "good", "--gateway", "--retries", "0"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- limits ----------------------------------------------------------------------------------------------


def test_a_burst_beyond_a_keys_rate_is_limited(gateways):
    gw = gateways["strict"]  # 1 request/s and a burst of 2 per key
    before = len(gw.log())
    answers = [_post(_predict_url(gw), PREDICT_BODY, {"X-API-Key": KEYS["alice"]}) for _ in range(8)]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429} and 3 <= statuses.count(200) <= 4, statuses
    for status, headers, body in answers:
        if status == 429:
            assert headers["Retry-After"] == "1" and "rate limit" in body["error"]
    # Each key has its own budget: bob is not limited by alice's burst.
    assert _post(_predict_url(gw), PREDICT_BODY, {"X-API-Key": KEYS["bob"]})[0] == 200

    codes = []
    for _ in range(8):
        try:
            predict_grpc(["good"], model="sentiment", target=gw.grpc_target, api_key=KEYS["bob"], retries=0)
            codes.append("OK")
        except ServingClientError as exc:
            codes.append(exc.code)
            assert "rate limit" in exc.message
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes[-1] == "RESOURCE_EXHAUSTED", codes
    _wait_until(lambda: len(gw.log()) >= before + 17, 5, "access log")
    limited = [e for e in gw.log()[before:] if e["status"] == 429]
    assert {e["key_name"] for e in limited} == {"alice", "bob"} and {e["api"] for e in limited} == {"rest", "grpc"}


def test_a_body_over_the_limit_gets_413(gateways):
    gw = gateways["strict"]  # bodies up to 64 KiB
    headers = {"X-API-Key": KEYS["carol"]}
    within = json.dumps({"instances": ["good " * 10_000]}).encode()  # 50 kB: passes to a replica
    assert len(within) < 64 * 1024 and _post(_predict_url(gw), within, headers)[0] == 200
    status, _, body = _post(_predict_url(gw), json.dumps({"instances": ["good " * 14_000]}).encode(), headers)
    assert status == 413 and "64k" in body["error"]
    time.sleep(1.0)  # carol's rate budget (1/s) refills
    with pytest.raises(ServingClientError) as too_large:
        predict_grpc(["good " * 14_000], model="sentiment", target=gw.grpc_target, api_key=KEYS["carol"], retries=0)
    assert too_large.value.code == "RESOURCE_EXHAUSTED" and "larger than" in too_large.value.message


# --- balancing and a replica's death ---------------------------------------------------------------------


def test_traffic_is_balanced_over_both_replicas(gateways, replicas):
    gw = gateways["main"]
    before = len(gw.log())
    for _ in range(20):
        predict_rest(["good"], model="sentiment", rest_url=gw.rest_url, version=1, api_key=KEYS["bob"], retries=0)
        predict_grpc(["good"], model="sentiment", target=gw.grpc_target, api_key=KEYS["bob"], retries=0)
    _wait_until(lambda: len(gw.log()) >= before + 40, 5, "access log")
    entries = gw.log()[before:]
    for api, kind in (("rest", "rest"), ("grpc", "grpc")):
        served = [e["upstream"] for e in entries if e["api"] == api and e["status"] == 200]
        assert len(served) == 20
        assert all(served.count(r[kind]) >= 8 for r in replicas), served  # round robin, shared by the workers
    assert all(e["key_name"] == "bob" and e["request_time"] >= 0 for e in entries)
    raw = gw.layout.access_log.read_text() + gw.layout.error_log.read_text()
    assert not any(key in raw for key in KEYS.values())  # the log names keys, never quotes them


@pytest.mark.slow
def test_a_replica_killed_mid_traffic_costs_no_request_after_one_retry(gateways, replicas):
    """REST and gRPC clients call without pause, each retrying a failed call once (no more); one replica
    is killed with SIGKILL under them. Runs last: the module's replicas are one fewer afterwards."""
    gw = gateways["main"]
    victim, survivor = replicas
    stop = threading.Event()
    results: dict[str, list] = {"rest": [], "grpc": []}

    def traffic(api: str) -> None:
        while not stop.is_set():
            try:
                if api == "rest":
                    predict_rest(["good"], model="sentiment", rest_url=gw.rest_url, version=1, api_key=KEYS["alice"],
                                 retries=1)
                else:
                    predict_grpc(["good"], model="sentiment", target=gw.grpc_target, api_key=KEYS["alice"], retries=1)
                results[api].append((time.monotonic(), None))
            except ServingClientError as exc:
                results[api].append((time.monotonic(), exc))

    threads = [threading.Thread(target=traffic, args=(api,)) for api in results]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        os.killpg(victim["proc"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim["proc"].wait(10)
        time.sleep(2.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    for api, calls in results.items():
        failures = [exc for _, exc in calls if exc is not None]
        assert failures == [], f"{api}: {failures[:3]}"
        assert sum(1 for at, _ in calls if at > killed_at) >= 10, f"{api}: too little traffic after the kill"
    # After the kill the survivor answers everything (nginx retried the victim's calls on it).
    late = [e for e in gw.log() if e["key_name"] == "alice" and e["status"] == 200][-10:]
    assert {e["upstream"].split(", ")[-1] for e in late} <= {survivor["rest"], survivor["grpc"]}
