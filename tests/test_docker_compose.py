"""Static checks of docker-compose.yaml and the images it builds, without Docker.

The compose file wires settings across containers that no unit test runs together: the Airflow tasks
must reach TF Serving on the ports and paths it really uses, read only MAAS_* variables that
``maas_tasks.config`` knows, and get every secret from the environment. These tests parse the file
(with ``${...}`` substituted the way ``docker compose`` does) and check those contracts.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from maas_tasks import config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "docker" / "airflow.Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
ONE_SHOT_SERVICES = ("airflow-init", "minio-init", "serving-init")
LONG_RUNNING_SERVICES = (
    "postgres",
    "minio",
    "tf-serving",
    "serving-sync",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
# Values a user would put in .env; every required variable must be here.
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "pg-admin-pw",
    "AIRFLOW_DB_PASSWORD": "airflow-db-pw",
    "REGISTRY_DB_PASSWORD": "registry-db-pw",
    "MINIO_ROOT_USER": "minio-user",
    "MINIO_ROOT_PASSWORD": "minio-password",
    "AIRFLOW_FERNET_KEY": "fernet-key",
    "AIRFLOW_API_SECRET_KEY": "api-secret",
    "AIRFLOW_JWT_SECRET": "jwt-secret",
    "AIRFLOW_ADMIN_PASSWORD": "admin-pw",
}
# Compose-level settings that shape the stack but are not passed to load_settings.
COMPOSE_ONLY_MAAS_VARIABLES = {"MAAS_BIND", "MAAS_SERVING_BIND", "MAAS_S3_BUCKET", "MAAS_DATA_DIR"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY|TOKEN")

_REFERENCE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` reference met an unset variable, as ``docker compose`` would refuse."""


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Substitute ``${...}`` references in ``value`` the way docker compose does."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", ":?"):
            current = current or None
        if current is not None:
            return current
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return ""

    return _REFERENCE.sub(replace, value)


def _references(text: str) -> list[tuple[str, str | None, str]]:
    """Every ``${NAME<op><arg>}`` in ``text`` as (name, op, arg); ``$$`` escapes are skipped."""
    found = []
    for match in _REFERENCE.finditer(text):
        if match.group("name"):
            found.append((match.group("name"), match.group("op"), match.group("arg") or ""))
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment so entries merge across services"
    return {key: str(value) for key, value in env.items()}


def _volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or host path) for a service's short-syntax volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[target] = source
    return mounts


def _published_ports(service: dict[str, Any], env: dict[str, str]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    published = []
    for entry in service.get("ports", []):
        address, host_port, container_port = _interpolate(entry, env).split(":")
        published.append((address, int(host_port), int(container_port)))
    return published


def _flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments of a command as {name: value}."""
    flags = {}
    for arg in command:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            flags[name] = value
    return flags


def _header_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _documented_defaults(header: str) -> dict[str, str | None]:
    """NAME -> default ("[...]" ending its description) or None for the required variables."""
    entries: dict[str, str] = {}
    current = None
    for line in header.splitlines():
        item = re.match(r"#\s+([A-Z][A-Z0-9_]+)\s+- (.*)", line)
        if item:
            current = item.group(1)
            entries[current] = item.group(2)
        elif current and re.match(r"#\s{4,}\S", line):
            entries[current] += " " + line.lstrip("# ").strip()
        else:
            current = None
    defaults: dict[str, str | None] = {}
    for name, description in entries.items():
        default = re.search(r"\[([^\]]*)\]$", description.strip())
        defaults[name] = default.group(1) if default else None
    return defaults


def _names_read_by_load_settings() -> set[str]:
    return set(re.findall(r"\bMAAS_[A-Z0-9_]+", inspect.getsource(config)))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def airflow_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The scheduler's environment (where LocalExecutor runs the tasks) with .env values substituted."""
    raw = _environment(services["airflow-scheduler"])
    return {key: _interpolate(value, SAMPLE_ENV) for key, value in raw.items()}


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert _interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}/${EMPTY-d}/$${SET}", env) == "x/d/d//${SET}"
    with pytest.raises(MissingVariable, match="set EMPTY"):
        _interpolate("${EMPTY:?set EMPTY}", env)


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    expected = {"postgres", "minio", "minio-init", "serving-init", "tf-serving", "serving-sync", *AIRFLOW_SERVICES}
    assert set(services) == expected


@pytest.mark.parametrize("name", LONG_RUNNING_SERVICES)
def test_long_running_service_has_healthcheck_and_restarts(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    test = service.get("healthcheck", {}).get("test")
    assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} needs a healthcheck command"
    assert service.get("restart") in ("always", "unless-stopped"), f"{name} should come back after a crash"


@pytest.mark.parametrize("name", ONE_SHOT_SERVICES)
def test_one_shot_service_is_not_restarted(services: dict[str, dict[str, Any]], name: str) -> None:
    # A restart policy would re-run the job forever and never report completion.
    assert services[name].get("restart", "no") == "no"


def test_dependency_conditions_match_service_kinds(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a plain list"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s missing healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dependency}: {condition}"
                assert dependency in ONE_SHOT_SERVICES, f"{name} waits for long-running {dependency} to exit"


@pytest.mark.parametrize(
    ("name", "dependency", "condition"),
    [
        *[(s, "postgres", "service_healthy") for s in AIRFLOW_SERVICES],
        *[(s, "minio", "service_healthy") for s in AIRFLOW_SERVICES],
        *[(s, "airflow-init", "service_completed_successfully") for s in AIRFLOW_SERVICES if s != "airflow-init"],
        ("minio-init", "minio", "service_healthy"),
        ("tf-serving", "serving-init", "service_completed_successfully"),
        ("serving-sync", "serving-init", "service_completed_successfully"),
        ("serving-sync", "postgres", "service_healthy"),
        ("serving-sync", "minio-init", "service_completed_successfully"),
        ("airflow-scheduler", "airflow-apiserver", "service_healthy"),
    ],
)
def test_service_waits_for_its_dependency(
    services: dict[str, dict[str, Any]], name: str, dependency: str, condition: str
) -> None:
    assert services[name]["depends_on"][dependency]["condition"] == condition


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_runs_the_project_image_with_dags_and_plugins(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounts = _volume_mounts(service)
    for folder in ("dags", "plugins"):
        assert Path(mounts[f"/opt/airflow/{folder}"]) == Path(f"./{folder}")
        assert (ROOT / folder).is_dir()
    assert service["user"].endswith(":0"), "the official image expects group 0"


def test_airflow_core_settings(airflow_env: dict[str, str], services: dict[str, dict[str, Any]]) -> None:
    assert airflow_env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert airflow_env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    metadata_db = urlsplit(airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert metadata_db.scheme == "postgresql+psycopg2"
    assert (metadata_db.hostname, metadata_db.path) == ("postgres", "/airflow")
    execution_api = urlsplit(airflow_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.hostname == "airflow-apiserver" and execution_api.path == "/execution/"
    apiserver_ports = [container for _, _, container in _published_ports(services["airflow-apiserver"], {})]
    assert execution_api.port in apiserver_ports


def test_airflow_options_exist_in_airflow_config(services: dict[str, dict[str, Any]]) -> None:
    # Read the option catalogue from the installed package without importing airflow (which writes
    # AIRFLOW_HOME/airflow.cfg as a side effect).
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.submodule_search_locations, "apache-airflow is not installed"
    catalogue_file = Path(next(iter(spec.submodule_search_locations))) / "config_templates" / "config.yml"
    catalogue = yaml.safe_load(catalogue_file.read_text())
    for name in AIRFLOW_SERVICES:
        for key in _environment(services[name]):
            if not key.startswith("AIRFLOW__"):
                continue
            section, option = key.removeprefix("AIRFLOW__").lower().split("__", 1)
            assert option in catalogue.get(section, {}).get("options", {}), f"{name}: {key} is not an Airflow option"


def test_maas_variables_are_ones_load_settings_reads(services: dict[str, dict[str, Any]], compose_text: str) -> None:
    known = _names_read_by_load_settings()
    assert {"MAAS_STORE_URL", "MAAS_SERVING_CONFIG"} <= known, "scanning config.py for MAAS_ names broke"
    for name, service in services.items():
        unknown = {key for key in _environment(service) if key.startswith("MAAS_")} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which maas_tasks.config.load_settings never reads"
    referenced = {ref for ref, _, _ in _references(compose_text) if ref.startswith("MAAS_")}
    unknown = referenced - known - COMPOSE_ONLY_MAAS_VARIABLES
    assert not unknown, f"{sorted(unknown)} are neither read by load_settings nor compose-only settings"


def test_load_settings_accepts_the_airflow_environment(airflow_env: dict[str, str]) -> None:
    settings = config.load_settings(airflow_env)
    assert settings.store_url == "s3://maas"
    assert settings.s3_endpoint == "http://minio:9000"
    assert (settings.s3_access_key, settings.s3_secret_key) == (
        SAMPLE_ENV["MINIO_ROOT_USER"],
        SAMPLE_ENV["MINIO_ROOT_PASSWORD"],
    )
    assert (settings.grpc_port, settings.rest_port) == (config.DEFAULT_GRPC_PORT, config.DEFAULT_REST_PORT)
    assert settings.serving_host == "tf-serving"
    assert settings.node_id is None  # the tasks manage no model server; serving-sync does
    registry = urlsplit(settings.registry_dsn or "")
    assert (registry.hostname, registry.path, registry.password) == (
        "postgres",
        "/maas",
        SAMPLE_ENV["REGISTRY_DB_PASSWORD"],
    )


def test_bucket_setting_reaches_the_store_url_and_the_bucket_job(services: dict[str, dict[str, Any]]) -> None:
    env = {**SAMPLE_ENV, "MAAS_S3_BUCKET": "team-models"}
    scheduler_env = {k: _interpolate(v, env) for k, v in _environment(services["airflow-scheduler"]).items()}
    assert config.load_settings(scheduler_env).store_url == "s3://team-models"
    init_env = {k: _interpolate(v, env) for k, v in _environment(services["minio-init"]).items()}
    assert init_env["BUCKET"] == "team-models"
    script = services["minio-init"]["command"][0]
    assert 'mc mb --ignore-existing "maas/$${BUCKET}"' in script, "the bucket job must be idempotent"


def test_s3_credentials_are_the_minio_root_credentials(services: dict[str, dict[str, Any]]) -> None:
    minio_env = _environment(services["minio"])
    scheduler_env = _environment(services["airflow-scheduler"])
    assert scheduler_env["MAAS_S3_ACCESS_KEY"] == minio_env["MINIO_ROOT_USER"]
    assert scheduler_env["MAAS_S3_SECRET_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert urlsplit(scheduler_env["MAAS_S3_ENDPOINT"]).hostname == "minio"
    assert urlsplit(scheduler_env["MAAS_S3_ENDPOINT"]).port == 9000


def test_tf_serving_ports_match_the_settings(services: dict[str, dict[str, Any]], airflow_env: dict[str, str]) -> None:
    serving = services["tf-serving"]
    settings = config.load_settings(airflow_env)
    flags = _flags(serving["command"])
    assert (int(flags["port"]), int(flags["rest_api_port"])) == (settings.grpc_port, settings.rest_port)
    published = _published_ports(serving, {})
    assert sorted((host, container) for _, host, container in published) == [
        (config.DEFAULT_GRPC_PORT, settings.grpc_port),
        (config.DEFAULT_REST_PORT, settings.rest_port),
    ]
    assert settings.serving_host in services


@pytest.fixture(scope="module")
def sync_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment of tf-serving's agent, with .env values substituted."""
    return {key: _interpolate(value, SAMPLE_ENV) for key, value in _environment(services["serving-sync"]).items()}


def test_tf_serving_reads_the_model_volume_its_agent_writes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], sync_env: dict[str, str]
) -> None:
    settings = config.load_settings(sync_env)
    serving_dir = sync_env["MAAS_SERVING_DIR"]
    volume = _volume_mounts(services["serving-sync"])[serving_dir]
    assert volume in compose["volumes"], "the model directory must be a named volume"
    assert _volume_mounts(services["tf-serving"])[serving_dir] == volume
    flags = _flags(services["tf-serving"]["command"])
    assert flags["model_config_file"] == sync_env["MAAS_SERVING_CONFIG"]
    assert Path(flags["model_config_file"]).parent == Path(serving_dir) == settings.serving_dir
    assert flags["model_config_file_poll_wait_seconds"] == "0"
    for name in AIRFLOW_SERVICES:  # promotion only changes the registry; the agent writes the volume
        assert serving_dir not in _volume_mounts(services[name])


def test_the_agent_manages_tf_serving_with_the_tasks_store_and_registry(
    services: dict[str, dict[str, Any]], sync_env: dict[str, str], airflow_env: dict[str, str]
) -> None:
    agent, tasks = config.load_settings(sync_env), config.load_settings(airflow_env)
    assert agent.node_id == "tf-serving" and agent.serving_host == "tf-serving"
    assert (agent.grpc_port, agent.rest_port) == (tasks.grpc_port, tasks.rest_port)
    assert (agent.store_url, agent.s3_endpoint, agent.registry_dsn) == (tasks.store_url, tasks.s3_endpoint, tasks.registry_dsn)
    assert (agent.s3_access_key, agent.s3_secret_key) == (tasks.s3_access_key, tasks.s3_secret_key)
    sync = services["serving-sync"]
    assert sync["entrypoint"] == ["python", "-m", "serving.sync", "--loop"]
    assert sync["healthcheck"]["test"] == ["CMD", "python", "-m", "serving.sync", "--check"]
    assert (ROOT / sync["build"]["context"] / sync["build"]["dockerfile"]).resolve() == DOCKERFILE
    # It must be able to repair the volume while TF Serving cannot start, so it never waits for it.
    assert "tf-serving" not in sync["depends_on"]


def test_serving_init_writes_a_valid_empty_model_config(
    services: dict[str, dict[str, Any]], sync_env: dict[str, str]
) -> None:
    init = services["serving-init"]
    serving_dir = sync_env["MAAS_SERVING_DIR"]
    assert _volume_mounts(init)[serving_dir] == _volume_mounts(services["serving-sync"])[serving_dir]
    script = init["command"][-1]
    assert f"[ ! -f {sync_env['MAAS_SERVING_CONFIG']} ]" in script, "an existing config must be kept"
    content = re.search(r"printf '([^']*)'", script)
    assert content, "serving-init should printf the initial config"
    parsed = text_format.Parse(content.group(1).replace("\\n", "\n"), model_server_config_pb2.ModelServerConfig())
    assert parsed.WhichOneof("config") == "model_config_list"
    assert list(parsed.model_config_list.config) == []


def test_host_ports_are_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = {name: _published_ports(service, {}) for name, service in services.items()}
    assert all(address == "127.0.0.1" for ports in published.values() for address, _, _ in ports)
    assert {host for _, host, _ in published["airflow-apiserver"]} == {config.DEFAULT_AIRFLOW_PORT}
    assert "postgres" not in {name for name, ports in published.items() if ports}
    opened = _published_ports(services["tf-serving"], {"MAAS_SERVING_BIND": "0.0.0.0"})
    assert {address for address, _, _ in opened} == {"0.0.0.0"}


def test_no_secret_has_a_literal_or_default_value(services: dict[str, dict[str, Any]], compose_text: str) -> None:
    for name, service in services.items():
        for key, value in _environment(service).items():
            # A *_FILE setting names where a secret lives, not the secret.
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}.{key} must be ${{VAR:?...}}"
            # Substituted first: the "?" of ${VAR:?message} would end a URL's host part.
            resolved = _interpolate(value, SAMPLE_ENV)
            password = urlsplit(resolved).password if "://" in resolved else None
            if password is not None:
                assert password in SAMPLE_ENV.values(), f"{name}.{key} embeds a literal password"
    for ref, op, _ in _references(compose_text):
        if SECRET_NAME.search(ref):
            assert op == ":?", f"${{{ref}}} must be required (:?), never defaulted"


def test_every_variable_is_documented_with_its_default(compose_text: str) -> None:
    documented = _documented_defaults(_header_comment(compose_text))
    body = compose_text[len(_header_comment(compose_text)) :]
    for ref, op, arg in _references(body):
        assert ref in documented, f"${{{ref}}} is not documented in the header"
        if op == ":-":
            assert documented[ref] == arg, f"{ref}: header says [{documented[ref]}], file uses {arg!r}"
        else:
            assert op == ":?" and documented[ref] is None, f"{ref} must be required everywhere or nowhere"
    assert set(SAMPLE_ENV) == {name for name, default in documented.items() if default is None}
    unused = set(documented) - {ref for ref, _, _ in _references(body)}
    assert not unused, f"header documents unused settings {sorted(unused)}"


def test_compose_refuses_to_start_without_the_required_secrets(services: dict[str, dict[str, Any]]) -> None:
    env = dict(SAMPLE_ENV)
    del env["AIRFLOW_JWT_SECRET"]
    with pytest.raises(MissingVariable, match="AIRFLOW_JWT_SECRET"):
        for value in _environment(services["airflow-scheduler"]).values():
            _interpolate(value, env)


def test_postgres_init_creates_the_databases_the_services_use(
    services: dict[str, dict[str, Any]], airflow_env: dict[str, str]
) -> None:
    postgres = services["postgres"]
    init_scripts = {
        source: target
        for entry in postgres["volumes"]
        for source, target in [entry.split(":")[:2]]
        if target.startswith("/docker-entrypoint-initdb.d/")
    }
    assert len(init_scripts) == 1
    script_path = ROOT / next(iter(init_scripts))
    script = script_path.read_text()
    for dsn in (airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], airflow_env["MAAS_REGISTRY_DSN"]):
        parts = urlsplit(dsn)
        database, role = parts.path.lstrip("/"), parts.username
        assert f"CREATE DATABASE {database} OWNER {role};" in script
        assert f"CREATE ROLE {role} LOGIN PASSWORD" in script
    for variable in re.findall(r'\$\{([A-Z_]+):\?', script):
        assert variable in _environment(postgres), f"the init script needs {variable} in the postgres environment"
    healthcheck = postgres["healthcheck"]["test"]
    assert "pg_isready" in healthcheck and "127.0.0.1" in healthcheck


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_postgres_init_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "docker" / "postgres-init.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_airflow_init_migrates_and_writes_the_admin_password(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    init = services["airflow-init"]
    script = init["command"][-1]
    assert "airflow db migrate" in script
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.DOTALL)
    assert snippet, "airflow-init should write the password file with an embedded Python snippet"
    env = {key: _interpolate(value, SAMPLE_ENV) for key, value in _environment(init).items()}
    password_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert str(password_file.parent) in _volume_mounts(services["airflow-apiserver"])
    local_file = tmp_path / password_file.name
    run_env = {**os.environ, **env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(local_file)}
    subprocess.run([sys.executable, "-c", snippet.group(1)], env=run_env, check=True, capture_output=True)
    assert json.loads(local_file.read_text()) == {"admin": SAMPLE_ENV["AIRFLOW_ADMIN_PASSWORD"]}
    assert stat.S_IMODE(local_file.stat().st_mode) == 0o600
    username = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(":")[0]
    assert username == env["AIRFLOW_ADMIN_USERNAME"] == "admin"
    # The image creates the directory so the named volume mounted there is writable by the airflow user.
    assert any(
        keyword == "RUN" and "mkdir" in rest and str(password_file.parent) in rest
        for keyword, rest in _dockerfile_instructions()
    )


def test_dockerfile_installs_the_pinned_requirements_then_the_project() -> None:
    instructions = _dockerfile_instructions()
    airflow_pin = re.search(r"^apache-airflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert airflow_pin
    assert instructions[0] == ("FROM", f"apache/airflow:{airflow_pin.group(1)}-python3.11")
    copies = {}
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, destination = [arg for arg in rest.split() if not arg.startswith("--")]
            for source in sources:
                copies[source] = destination
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    requirements = copies["requirements.txt"]
    assert f"pip install --no-cache-dir -r {requirements}" in runs
    assert {"maas_tasks", "serving", "pyproject.toml"} <= set(copies)
    project_dir = copies["pyproject.toml"].rstrip("/")
    assert f"pip install --no-cache-dir --no-deps {project_dir}" in runs
    assert runs.index(f"pip install --no-cache-dir -r {requirements}") < runs.index(
        f"pip install --no-cache-dir --no-deps {project_dir}"
    )
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copies, "setuptools needs the readme pyproject.toml names to build the project"


def test_build_context_keeps_what_the_dockerfile_copies_and_drops_secrets() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)

    copied = [
        source
        for keyword, rest in _dockerfile_instructions()
        if keyword == "COPY"
        for source in [arg for arg in rest.split() if not arg.startswith("--")][:-1]
    ]
    for source in copied:
        assert not ignored(source), f".dockerignore drops {source}, which the Dockerfile copies"
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"
    for private in (".env", ".git", ".venv", ".maas"):
        assert ignored(private), f".dockerignore must keep {private} out of the image"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("name", ONE_SHOT_SERVICES)
def test_one_shot_script_is_valid_shell(services: dict[str, dict[str, Any]], name: str) -> None:
    script = _interpolate(services[name]["command"][-1], SAMPLE_ENV)
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, f"{name}: {result.stderr}"
