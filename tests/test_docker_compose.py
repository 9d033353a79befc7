"""Static checks of docker-compose.yaml, .env.example and the images they build, without Docker.

The compose file wires settings across containers that no unit test runs together: the Airflow tasks
must reach the store and the registry through the Connections the hooks read, each TF Serving replica's
agent must manage that replica's volume and no other, the gateway must balance over exactly the replicas
there are with files that exist, workers must scale, and every secret must come from the environment.
These tests parse the file (with ``${...}`` substituted the way ``docker compose`` does) and check those
contracts; Debian's ``docker-compose`` (no daemon needed) validates it as a real tool would.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from google.protobuf import text_format
from packaging.requirements import Requirement
from tensorflow_serving.config import model_server_config_pb2

from maas_tasks import config
from serving import gateway

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "docker" / "airflow.Dockerfile"
CUDA_REQUIREMENTS = ROOT / "docker" / "requirements-cuda.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"

WORKER_SERVICES = ("airflow-worker", "airflow-worker-gpu")
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    *WORKER_SERVICES,
)
# Replica name -> (its agent, its volume's init job). Replica 1 keeps the single-replica names.
REPLICAS = {
    "tf-serving": ("serving-sync", "serving-init"),
    "tf-serving-2": ("serving-sync-2", "serving-init-2"),
}
ONE_SHOT_SERVICES = ("airflow-init", "minio-init", *(init for _, init in REPLICAS.values()))
LONG_RUNNING_SERVICES = (
    "postgres",
    "redis",
    "minio",
    *REPLICAS,
    *(agent for agent, _ in REPLICAS.values()),
    "gateway",
    *(name for name in AIRFLOW_SERVICES if name != "airflow-init"),
)
# Test values for the required variables: distinct, so a value wired to the wrong place shows.
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "pg-admin-pw",
    "AIRFLOW_DB_PASSWORD": "airflow-db-pw",
    "REGISTRY_DB_PASSWORD": "registry-db-pw",
    "MINIO_ROOT_USER": "minio-root",
    "MINIO_ROOT_PASSWORD": "minio-root-password",
    "MAAS_S3_ACCESS_KEY": "maas-user",
    "MAAS_S3_SECRET_KEY": "maas-user-secret",
    "REDIS_PASSWORD": "redis-pw",
    "AIRFLOW_FERNET_KEY": "fernet-key",
    "AIRFLOW_API_SECRET_KEY": "api-secret",
    "AIRFLOW_JWT_SECRET": "jwt-secret",
    "AIRFLOW_ADMIN_PASSWORD": "admin-pw",
    "MAAS_GATEWAY_KEYS_FILE": "./gateway-keys",
}
# Compose-level settings that shape the stack but are read by no MaaS code.
COMPOSE_ONLY_MAAS_VARIABLES = {"MAAS_BIND", "MAAS_SERVING_BIND", "MAAS_S3_BUCKET", "MAAS_DATA_DIR"}
# Airflow's store/registry settings: in the Airflow services they come from the Connections only.
CONNECTION_BACKED_SETTINGS = {"MAAS_STORE_URL", "MAAS_S3_ENDPOINT", "MAAS_S3_ACCESS_KEY", "MAAS_S3_SECRET_KEY",
                              "MAAS_S3_REGION", "MAAS_REGISTRY_DSN"}
# Names of variables holding secrets (GATEWAY_KEYS_MAP or *_FILE name where one lives, not the secret).
SECRET_NAME = re.compile(r"(?:PASSWORD|SECRET|TOKEN|_KEY)(?:_|$)|AUTH$")

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


def _resolved_environment(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    values = SAMPLE_ENV if env is None else env
    return {key: _interpolate(value, values) for key, value in _environment(service).items()}


def _volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or host path, settings at their defaults) for a service's
    short-syntax volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = _interpolate(entry, {}).split(":")[:2]
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


def _env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file (as docker compose reads .env; no quoting is used in ours)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{path.name}: {line!r} is not NAME=value"
            assert name not in values, f"{path.name} sets {name} twice"
            values[name] = value
    return values


def _maas_names_in(path: Path) -> set[str]:
    return set(re.findall(r"\bMAAS_[A-Z0-9_]+", path.read_text()))


def _names_read_by_code() -> set[str]:
    """MAAS_* names the settings module and the DAG files read."""
    names = set(re.findall(r"\bMAAS_[A-Z0-9_]+", inspect.getsource(config)))
    for dag_file in (ROOT / "dags").glob("*.py"):
        names |= _maas_names_in(dag_file)
    return names


def _template_placeholders() -> set[str]:
    """``${NAME}`` placeholders on the non-comment lines of the gateway's nginx template."""
    lines = [line for line in gateway.TEMPLATE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", "\n".join(lines)))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _upstream_servers(text: str) -> dict[str, list[str]]:
    """upstream name -> its ``server`` addresses, from an nginx upstream include."""
    blocks = {}
    for name, body in re.findall(r"upstream\s+(\S+)\s*\{(.*?)\}", text, re.DOTALL):
        blocks[name] = re.findall(r"^\s*server\s+(\S+)", body, re.MULTILINE)
    return blocks


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """A process environment with nothing of this machine's compose or MaaS settings in it."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}


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
def worker_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The CPU worker's environment (where the CeleryExecutor runs the tasks) with .env values substituted."""
    return _resolved_environment(services["airflow-worker"])


@pytest.fixture(scope="module")
def connections(worker_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The Airflow Connections the tasks get, parsed from their AIRFLOW_CONN_* JSON."""
    found = {}
    for key, value in worker_env.items():
        if key.startswith("AIRFLOW_CONN_"):
            found[key.removeprefix("AIRFLOW_CONN_").lower()] = json.loads(value)
    return found


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert _interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}/${EMPTY-d}/$${SET}", env) == "x/d/d//${SET}"
    with pytest.raises(MissingVariable, match="set EMPTY"):
        _interpolate("${EMPTY:?set EMPTY}", env)


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    expected = {"postgres", "redis", "minio", "minio-init", "gateway", *AIRFLOW_SERVICES}
    for replica, (agent, init) in REPLICAS.items():
        expected |= {replica, agent, init}
    assert set(services) == expected


# --- docker-compose itself -------------------------------------------------------------------------------


def _docker_compose_config(tmp_path: Path, env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if not Path(DOCKER_COMPOSE).exists():
        pytest.fail("docker-compose is not installed: `make os-packages` installs Debian's docker-compose")
    return subprocess.run(
        [DOCKER_COMPOSE, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
         "--profile", "gpu", *extra, "config"],
        cwd=tmp_path, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=60, check=False,
    )


def test_docker_compose_config_accepts_the_file_with_the_example_settings(tmp_path: Path) -> None:
    result = _docker_compose_config(tmp_path, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"airflow-worker", "airflow-worker-gpu", "gateway", *REPLICAS}
    # The tool substitutes as the tests' _interpolate does.
    example = _env_file(ENV_EXAMPLE)
    ours = _interpolate(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["airflow-worker"]["environment"]
                        ["AIRFLOW__CELERY__BROKER_URL"], example)
    assert resolved["services"]["airflow-worker"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == ours
    store = json.loads(resolved["services"]["airflow-worker"]["environment"]["AIRFLOW_CONN_MAAS_STORE"])
    assert (store["login"], store["password"]) == (example["MAAS_S3_ACCESS_KEY"], example["MAAS_S3_SECRET_KEY"])
    devices = resolved["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_docker_compose_config_refuses_a_missing_secret(tmp_path: Path) -> None:
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SAMPLE_ENV.items() if k != "REDIS_PASSWORD"))
    result = _docker_compose_config(tmp_path, env_file)
    assert result.returncode != 0
    assert "set REDIS_PASSWORD in .env" in result.stderr


# --- settings: header, .env.example, no secrets ---------------------------------------------------------


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


def test_env_example_lists_every_setting_with_placeholders_and_the_defaults(compose_text: str) -> None:
    documented = _documented_defaults(_header_comment(compose_text))
    example = _env_file(ENV_EXAMPLE)
    assert set(example) == set(documented), "the header and .env.example must list the same settings"
    for name, default in documented.items():
        if default is not None:
            assert example[name] == default, f".env.example: {name}={example[name]}, the default is {default}"
        elif SECRET_NAME.search(name) and not name.endswith("_FILE"):
            assert example[name].startswith("change-me"), f".env.example must hold a placeholder for {name}"
    # The placeholders must be usable as they are (URL-safe, long enough for MinIO).
    for name in documented:
        if documented[name] is None:
            assert re.fullmatch(r"[A-Za-z0-9._~/-]+", example[name]), f".env.example: {name} would mangle a URL"
    assert len(example["MINIO_ROOT_PASSWORD"]) >= 8 and len(example["MAAS_S3_SECRET_KEY"]) >= 8


def test_secrets_stay_out_of_git_and_the_image() -> None:
    gitignored = subprocess.run(
        ["git", "check-ignore", "--no-index", ".env", "gateway-keys"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    )
    assert gitignored.stdout.split() == [".env", "gateway-keys"], ".gitignore must keep .env and the key file out"
    example = subprocess.run(["git", "check-ignore", "--no-index", "-q", ".env.example"], cwd=ROOT, check=False)
    assert example.returncode == 1, ".env.example belongs in git"


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
            if key.startswith("AIRFLOW_CONN_"):
                raw_password = json.loads(value)["password"]
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", raw_password), f"{name}.{key}: ${{VAR:?...}} only"
    for ref, op, _ in _references(compose_text):
        if SECRET_NAME.search(ref):
            assert op == ":?", f"${{{ref}}} must be required (:?), never defaulted"


def test_compose_refuses_to_start_without_the_required_secrets(services: dict[str, dict[str, Any]]) -> None:
    env = dict(SAMPLE_ENV)
    del env["AIRFLOW_JWT_SECRET"]
    with pytest.raises(MissingVariable, match="AIRFLOW_JWT_SECRET"):
        _resolved_environment(services["airflow-scheduler"], env)


def test_maas_variables_are_ones_the_code_reads(services: dict[str, dict[str, Any]], compose_text: str) -> None:
    known = _names_read_by_code()
    assert {"MAAS_STORE_URL", "MAAS_SERVING_CONFIG", "MAAS_TRAINING_QUEUE"} <= known, "scanning for MAAS_ names broke"
    template = _template_placeholders()
    for name, service in services.items():
        # The gateway's MAAS_GATEWAY_* fill the nginx template's placeholders.
        readers = known | template if name == "gateway" else known
        unknown = {key for key in _environment(service) if key.startswith("MAAS_")} - readers
        assert not unknown, f"{name} sets {sorted(unknown)}, which no MaaS code reads"
    referenced = {ref for ref, _, _ in _references(compose_text) if ref.startswith("MAAS_")}
    unknown = referenced - known - template - COMPOSE_ONLY_MAAS_VARIABLES - {"MAAS_GATEWAY_KEYS_FILE"}
    assert not unknown, f"{sorted(unknown)} are neither read by MaaS code nor compose-only settings"


def test_host_ports_are_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = {name: _published_ports(service, {}) for name, service in services.items()}
    assert all(address == "127.0.0.1" for ports in published.values() for address, _, _ in ports)
    assert {name for name, ports in published.items() if ports} == {"airflow-apiserver", "minio", "gateway"}
    assert {host for _, host, _ in published["airflow-apiserver"]} == {config.DEFAULT_AIRFLOW_PORT}
    opened = _published_ports(services["gateway"], {"MAAS_SERVING_BIND": "0.0.0.0"})
    assert {address for address, _, _ in opened} == {"0.0.0.0"}
    # Opening the model API to the network leaves Airflow and MinIO on loopback.
    assert {a for a, _, _ in _published_ports(services["minio"], {"MAAS_SERVING_BIND": "0.0.0.0"})} == {"127.0.0.1"}


# --- healthchecks and start order -----------------------------------------------------------------------


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
    assert "healthcheck" not in services[name]


def test_dependency_conditions_match_service_kinds(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a plain list"
        # Only the data services and the volume jobs need nothing started before them.
        if name not in ("postgres", "redis", "minio", *(init for _, init in REPLICAS.values())):
            assert depends_on, f"{name} starts before what it needs"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert "profiles" not in services[dependency], f"{name} depends on {dependency}, which a profile gates"
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
        *[(s, "redis", "service_healthy") for s in AIRFLOW_SERVICES],
        *[(s, "minio-init", "service_completed_successfully") for s in AIRFLOW_SERVICES],
        *[(s, "airflow-init", "service_completed_successfully") for s in AIRFLOW_SERVICES if s != "airflow-init"],
        # Tasks call the execution API from their first line.
        *[(s, "airflow-apiserver", "service_healthy") for s in (*WORKER_SERVICES, "airflow-triggerer")],
        ("minio-init", "minio", "service_healthy"),
        *[(replica, init, "service_completed_successfully") for replica, (_, init) in REPLICAS.items()],
        *[(agent, init, "service_completed_successfully") for agent, init in REPLICAS.values()],
        *[(agent, "postgres", "service_healthy") for agent, _ in REPLICAS.values()],
        *[(agent, "minio-init", "service_completed_successfully") for agent, _ in REPLICAS.values()],
        *[("gateway", replica, "service_healthy") for replica in REPLICAS],
    ],
)
def test_service_waits_for_its_dependency(
    services: dict[str, dict[str, Any]], name: str, dependency: str, condition: str
) -> None:
    assert services[name]["depends_on"][dependency]["condition"] == condition


# --- Airflow on Celery ----------------------------------------------------------------------------------


def _option_catalogue() -> dict[str, Any]:
    """Airflow's option catalogue: core's config.yml plus the Celery provider's, read without importing
    airflow (which writes AIRFLOW_HOME/airflow.cfg as a side effect)."""
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.submodule_search_locations, "apache-airflow is not installed"
    package = Path(next(iter(spec.submodule_search_locations)))
    catalogue = yaml.safe_load((package / "config_templates" / "config.yml").read_text())
    provider_info = package / "providers" / "celery" / "get_provider_info.py"
    assert provider_info.exists(), "apache-airflow-providers-celery is not installed (requirements.txt pins it)"
    module_spec = importlib.util.spec_from_file_location("_celery_provider_info", provider_info)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for section, body in module.get_provider_info()["config"].items():
        catalogue.setdefault(section, {}).setdefault("options", {}).update(body["options"])
    return catalogue


def test_airflow_options_exist_in_airflow_config(services: dict[str, dict[str, Any]]) -> None:
    catalogue = _option_catalogue()
    for name in AIRFLOW_SERVICES:
        for key in _environment(services[name]):
            if not key.startswith("AIRFLOW__"):
                continue
            section, option = key.removeprefix("AIRFLOW__").lower().split("__", 1)
            assert option in catalogue.get(section, {}).get("options", {}), f"{name}: {key} is not an Airflow option"


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


def test_every_airflow_service_runs_the_celery_executor_on_the_same_broker(
    services: dict[str, dict[str, Any]], worker_env: dict[str, str]
) -> None:
    for name in AIRFLOW_SERVICES:
        env = _resolved_environment(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        for key in ("AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__FERNET_KEY",
                    "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
            assert env[key] == worker_env[key], f"{name}: {key} differs from the workers'"
    broker = urlsplit(worker_env["AIRFLOW__CELERY__BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    assert broker.password == SAMPLE_ENV["REDIS_PASSWORD"]
    backend = urlsplit(worker_env["AIRFLOW__CELERY__RESULT_BACKEND"])
    metadata = urlsplit(worker_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert backend.scheme == "db+postgresql"
    assert (backend.hostname, backend.port, backend.path, backend.username) == (
        metadata.hostname, metadata.port, metadata.path, metadata.username
    )


def test_airflow_core_settings(worker_env: dict[str, str], services: dict[str, dict[str, Any]]) -> None:
    assert worker_env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    metadata_db = urlsplit(worker_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert metadata_db.scheme == "postgresql+psycopg2"
    assert (metadata_db.hostname, metadata_db.path) == ("postgres", "/airflow")
    execution_api = urlsplit(worker_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.hostname == "airflow-apiserver" and execution_api.path == "/execution/"
    apiserver_ports = [container for _, _, container in _published_ports(services["airflow-apiserver"], {})]
    assert execution_api.port in apiserver_ports


def test_redis_requires_the_password_and_keeps_it_off_the_command_line(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    env = _resolved_environment(redis)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == SAMPLE_ENV["REDIS_PASSWORD"]
    script = redis["command"][-1]
    assert "requirepass $${REDIS_PASSWORD}" in script and "--requirepass" not in script, "keep it off argv"
    # Through the image's entrypoint, which drops root for the redis user.
    assert "exec docker-entrypoint.sh redis-server -" in script
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert "REDIS_PASSWORD" not in " ".join(redis["healthcheck"]["test"])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (make os-packages)")
def test_redis_command_sets_the_password_without_showing_it(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # The service's own script and healthcheck, run on Debian's redis-server: only the image's entrypoint
    # is left out, and the listener is put on a free loopback port.
    from tests.fixtures.postgres import find_free_port

    port = find_free_port()
    local = f"redis-server - --port {port} --bind 127.0.0.1 --save '' --dir {tmp_path}"
    script = _interpolate(services["redis"]["command"][-1], {}).replace("docker-entrypoint.sh redis-server -", local)
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": SAMPLE_ENV["REDIS_PASSWORD"]}
    server = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = services["redis"]["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
    authorised = {**env, "REDISCLI_AUTH": SAMPLE_ENV["REDIS_PASSWORD"]}
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["sh", "-c", health], env=authorised, check=False).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "redis did not start from the command"
            time.sleep(0.1)
        # Without the password the same healthcheck fails: the password is really required.
        assert subprocess.run(["sh", "-c", health], env={"PATH": env["PATH"]}, check=False).returncode != 0
        # exec: the shell became redis-server, and its arguments do not hold the password.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert "redis-server" in cmdline and SAMPLE_ENV["REDIS_PASSWORD"] not in cmdline
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_scale_out(services: dict[str, dict[str, Any]], name: str) -> None:
    worker = services[name]
    # A fixed name, hostname or host port would make a second copy collide.
    assert not {"container_name", "hostname", "ports"} & set(worker), f"{name} cannot be scaled"
    assert worker["command"].split()[:2] == ["celery", "worker"]
    check = " ".join(worker["healthcheck"]["test"])
    assert "inspect ping" in check and 'celery@$${HOSTNAME}' in check, "ping this worker, not any worker"
    assert worker["environment"]["DUMB_INIT_SETSID"] == "0", "celery needs the SIGTERM for its warm shutdown"
    assert worker.get("stop_grace_period"), "a running task needs time to finish on shutdown"
    assert "airflow-logs" in _volume_mounts(worker).values(), "the UI reads the workers' logs from the shared volume"


def test_no_service_has_a_fixed_container_name(services: dict[str, dict[str, Any]]) -> None:
    assert not [name for name, service in services.items() if "container_name" in service]


def test_cpu_workers_consume_the_queue_training_goes_to_by_default(
    services: dict[str, dict[str, Any]], compose_text: str, worker_env: dict[str, str]
) -> None:
    documented = _documented_defaults(_header_comment(compose_text))
    assert worker_env["MAAS_TRAINING_QUEUE"] == documented["MAAS_TRAINING_QUEUE"] == "default"
    assert _queues(services["airflow-worker"]) == ["default"]
    assert _queues(services["airflow-worker-gpu"]) == ["gpu"]


def _queues(worker: dict[str, Any]) -> list[str]:
    args = worker["command"].split()
    return args[args.index("--queues") + 1].split(",")


def test_the_dag_routes_training_to_the_configured_queue(tmp_path: Path) -> None:
    # Parsed as the dag-processor parses it: MAAS_TRAINING_QUEUE is read at parse time.
    script = textwrap.dedent(
        f"""
        import json, os
        from airflow.dag_processing.dagbag import DagBag
        queues = {{}}
        for value in ("gpu", ""):
            os.environ["MAAS_TRAINING_QUEUE"] = value
            bag = DagBag(dag_folder={str(ROOT / "dags" / "maas_training.py")!r})
            assert not bag.import_errors, bag.import_errors
            queues[value] = {{t.task_id: t.queue for t in bag.dags["maas_training"].tasks}}
        print(json.dumps(queues))
        """
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    queues = json.loads(result.stdout.strip().splitlines()[-1])
    routed, unset = queues["gpu"], queues[""]
    assert routed["train_model"] == "gpu"
    assert {queue for task, queue in routed.items() if task != "train_model"} == {"default"}
    assert set(unset.values()) == {"default"}


# --- the gpu profile ------------------------------------------------------------------------------------


def test_gpu_worker_reserves_nvidia_gpus_and_runs_the_cuda_build(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert [name for name, service in services.items() if "profiles" in service] == ["airflow-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert _interpolate(str(device["count"]), {}) == "all"
    assert _interpolate(str(device["count"]), {"AIRFLOW_GPU_COUNT": "1"}) == "1"
    env = _resolved_environment(gpu)
    assert config.load_settings(env).device == "gpu"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    # Its own image: the CPU workers' image stays without CUDA's libraries.
    assert gpu["build"]["args"] == {"TENSORFLOW_VARIANT": "and-cuda"}
    assert _interpolate(gpu["image"], {}) != _interpolate(services["airflow-worker"]["image"], {})
    assert "args" not in services["airflow-worker"]["build"]
    dockerfile = DOCKERFILE.read_text()
    assert "ARG TENSORFLOW_VARIANT=cpu" in dockerfile
    runs = [rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN"]
    run = next(rest for rest in runs if "TENSORFLOW_VARIANT" in rest)
    install = "pip install --no-cache-dir -c /opt/maas/requirements.txt -r /opt/maas/requirements-cuda.txt"
    assert f"and-cuda) {install}" in run
    assert "exit 1" in run, "an unknown variant must fail the build"


def test_cuda_requirements_pin_what_tensorflows_and_cuda_extra_needs() -> None:
    pins = {}
    for line in CUDA_REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{CUDA_REQUIREMENTS.name}: pin {line} exactly"
            pins[requirement.name.lower()] = (spec.version, requirement.extras)
    base = re.search(r"^tensorflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert base and pins.pop("tensorflow") == (base.group(1), {"and-cuda"})
    base_pins = {
        line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    }
    assert not set(pins) & base_pins, "-c requirements.txt already pins these"
    metadata = importlib.metadata.metadata("tensorflow")
    assert metadata["Version"] == base.group(1)
    needed = {}
    for text in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker and marker.evaluate({"extra": "and-cuda"}) and not marker.evaluate({"extra": ""}):
            needed[requirement.name.lower()] = requirement.specifier
    assert needed and set(needed) == set(pins), "pin exactly the libraries of tensorflow's and-cuda extra"
    for name, specifier in needed.items():
        assert specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} is outside tensorflow's {specifier}"


# --- Airflow Connections --------------------------------------------------------------------------------


def test_the_tasks_get_the_store_and_registry_as_connections_only(
    services: dict[str, dict[str, Any]], connections: dict[str, dict[str, Any]]
) -> None:
    assert set(connections) == {"maas_store", "maas_registry"}
    for name in AIRFLOW_SERVICES:
        env = _resolved_environment(services[name])
        doubled = CONNECTION_BACKED_SETTINGS & set(env)
        assert not doubled, f"{name} sets {sorted(doubled)} beside the Connections: one source for each secret"
        assert {k for k in env if k.startswith("AIRFLOW_CONN_")} == {
            "AIRFLOW_CONN_MAAS_STORE", "AIRFLOW_CONN_MAAS_REGISTRY"
        }


def test_store_connection_is_minio_through_the_maas_user(
    services: dict[str, dict[str, Any]], connections: dict[str, dict[str, Any]]
) -> None:
    store = connections["maas_store"]
    assert store["conn_type"] == "aws"
    assert (store["login"], store["password"]) == (SAMPLE_ENV["MAAS_S3_ACCESS_KEY"], SAMPLE_ENV["MAAS_S3_SECRET_KEY"])
    extra = store["extra"]
    endpoint = urlsplit(extra["endpoint_url"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)
    assert endpoint.hostname in services
    assert 9000 in [container for _, _, container in _published_ports(services["minio"], {})]
    assert extra["bucket"] == "maas" and extra["region_name"] == "us-east-1"
    assert set(extra) <= {"endpoint_url", "bucket", "prefix", "region_name"}
    # The bucket setting reaches the connection, the agents and the bucket job alike.
    env = {**SAMPLE_ENV, "MAAS_S3_BUCKET": "team-models"}
    worker = _resolved_environment(services["airflow-worker"], env)
    assert json.loads(worker["AIRFLOW_CONN_MAAS_STORE"])["extra"]["bucket"] == "team-models"
    assert _resolved_environment(services["minio-init"], env)["BUCKET"] == "team-models"
    for agent, _ in REPLICAS.values():
        assert config.load_settings(_resolved_environment(services[agent], env)).store_url == "s3://team-models"


def test_registry_connection_is_the_maas_database(
    services: dict[str, dict[str, Any]], connections: dict[str, dict[str, Any]]
) -> None:
    registry = connections["maas_registry"]
    assert registry["conn_type"] == "postgres"
    assert (registry["host"], int(registry["port"])) == ("postgres", 5432)
    assert (registry["schema"], registry["login"], registry["password"]) == (
        "maas", "maas", SAMPLE_ENV["REGISTRY_DB_PASSWORD"]
    )
    assert registry["host"] in services


def test_the_agents_use_the_connections_store_and_registry(
    services: dict[str, dict[str, Any]], connections: dict[str, dict[str, Any]]
) -> None:
    store, registry = connections["maas_store"], connections["maas_registry"]
    for agent, _ in REPLICAS.values():
        settings = config.load_settings(_resolved_environment(services[agent]))
        assert settings.store_url == f"s3://{store['extra']['bucket']}"
        assert settings.s3_endpoint == store["extra"]["endpoint_url"]
        assert (settings.s3_access_key, settings.s3_secret_key) == (store["login"], store["password"])
        assert settings.s3_region == store["extra"]["region_name"]
        dsn = urlsplit(settings.registry_dsn or "")
        assert (dsn.hostname, dsn.port, dsn.path.lstrip("/"), dsn.username, dsn.password) == (
            registry["host"], int(registry["port"]), registry["schema"], registry["login"], registry["password"]
        )


def test_the_hooks_give_the_tasks_the_agents_store_and_registry(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tasks' side, as Airflow hands it over: the AIRFLOW_CONN_* variables, read by plugins/maas_hooks.py.
    import maas_hooks
    from psycopg2.extensions import parse_dsn

    worker = _resolved_environment(services["airflow-worker"])
    for key in ("AIRFLOW_CONN_MAAS_STORE", "AIRFLOW_CONN_MAAS_REGISTRY"):
        monkeypatch.setenv(key, worker[key])
    tasks = maas_hooks.task_settings({k: v for k, v in worker.items() if k.startswith("MAAS_")})
    assert tasks.node_id is None and tasks.device == "cpu"
    for agent, _ in REPLICAS.values():
        node = config.load_settings(_resolved_environment(services[agent]))
        assert (tasks.store_url, tasks.s3_endpoint, tasks.s3_access_key, tasks.s3_secret_key, tasks.s3_region) == (
            node.store_url, node.s3_endpoint, node.s3_access_key, node.s3_secret_key, node.s3_region
        )
        assert parse_dsn(tasks.registry_dsn) == parse_dsn(node.registry_dsn)


def test_minio_root_credentials_stay_with_minio_and_its_init_job(services: dict[str, dict[str, Any]]) -> None:
    def referenced(service: dict[str, Any]) -> set[str]:
        return {ref for value in _environment(service).values() for ref, _, _ in _references(value)}

    root = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    holders = {name for name, service in services.items() if root & referenced(service)}
    assert holders == {"minio", "minio-init"}


def test_minio_init_creates_the_bucket_and_a_user_limited_to_it(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]
    script = init["command"][0]
    assert 'mc mb --ignore-existing "maas/$${BUCKET}"' in script, "the bucket job must be idempotent"
    assert 'mc admin user add maas "$${MAAS_S3_ACCESS_KEY}" "$${MAAS_S3_SECRET_KEY}"' in script
    assert "mc admin policy attach maas maas-bucket --user" in script and "already in effect" in script
    # Run the policy's printf (shell built-ins) and read what MinIO would get.
    printf = re.search(r"^(printf '\{.*?> /tmp/maas-bucket\.json)$", _interpolate(script, {}), re.DOTALL | re.MULTILINE)
    assert printf, "minio-init should write the bucket policy with printf"
    policy_file = "/tmp/maas-bucket.json"
    command = printf.group(1).replace(policy_file, "/dev/stdout")
    result = subprocess.run(["sh", "-c", command], env={"BUCKET": "team-models", "PATH": os.environ["PATH"]},
                            capture_output=True, text=True, check=True)
    policy = json.loads(result.stdout)
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::team-models", "arn:aws:s3:::team-models/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert "s3:*" not in actions and not any(a.startswith("admin:") for a in actions)
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions
    assert f"mc admin policy create maas maas-bucket {policy_file}" in script


# --- serving replicas, their agents and the gateway -----------------------------------------------------


@pytest.mark.parametrize("replica", REPLICAS)
def test_each_replica_has_its_own_agent_and_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], replica: str
) -> None:
    agent_name, init_name = REPLICAS[replica]
    server, agent, init = services[replica], services[agent_name], services[init_name]
    env = _resolved_environment(agent)
    settings = config.load_settings(env)
    assert settings.node_id == replica and settings.serving_host == replica
    flags = _flags(server["command"])
    assert (int(flags["port"]), int(flags["rest_api_port"])) == (settings.grpc_port, settings.rest_port)
    serving_dir = env["MAAS_SERVING_DIR"]
    volume = _volume_mounts(agent)[serving_dir]
    assert volume in compose["volumes"], "the model directory must be a named volume"
    assert _volume_mounts(server)[serving_dir] == volume == _volume_mounts(init)[serving_dir]
    assert flags["model_config_file"] == env["MAAS_SERVING_CONFIG"]
    assert Path(flags["model_config_file"]).parent == Path(serving_dir) == settings.serving_dir
    assert flags["model_config_file_poll_wait_seconds"] == "0"
    assert agent["entrypoint"] == ["python", "-m", "serving.sync", "--loop"]
    assert agent["healthcheck"]["test"] == ["CMD", "python", "-m", "serving.sync", "--check"]
    assert (ROOT / agent["build"]["context"] / agent["build"]["dockerfile"]).resolve() == DOCKERFILE
    # It must be able to repair the volume while TF Serving cannot start, so it never waits for it.
    assert replica not in agent["depends_on"]
    # Replicas sit behind the gateway: interchangeable, no name or port of their own on the host.
    assert not {"container_name", "hostname", "ports"} & set(server)
    for path in flags.values():
        if path.startswith("/etc/maas/serving/"):
            source = _volume_mounts(server)["/etc/maas/serving"]
            assert (ROOT / source / Path(path).name).is_file(), f"{replica} reads {path}, which is not in {source}"


def test_replicas_are_distinct_nodes(services: dict[str, dict[str, Any]]) -> None:
    volumes = [_volume_mounts(services[replica])["/models"] for replica in REPLICAS]
    assert len(set(volumes)) == len(REPLICAS), "two servers on one volume would fight over its config"
    agents = [services[agent] for agent, _ in REPLICAS.values()]
    assert len({a["environment"]["MAAS_NODE_ID"] for a in agents}) == len(REPLICAS)
    for name, service in services.items():  # promotion only changes the registry; the agents write the volumes
        if name in AIRFLOW_SERVICES:
            assert not set(volumes) & set(_volume_mounts(service).values())


def test_serving_init_writes_a_valid_empty_model_config(services: dict[str, dict[str, Any]]) -> None:
    for agent_name, init_name in REPLICAS.values():
        env = _resolved_environment(services[agent_name])
        script = services[init_name]["command"][-1]
        assert f"[ ! -f {env['MAAS_SERVING_CONFIG']} ]" in script, "an existing config must be kept"
        content = re.search(r"printf '([^']*)'", script)
        assert content, "serving-init should printf the initial config"
        parsed = text_format.Parse(content.group(1).replace("\\n", "\n"), model_server_config_pb2.ModelServerConfig())
        assert parsed.WhichOneof("config") == "model_config_list"
        assert list(parsed.model_config_list.config) == []
        assert services[init_name]["command"] == services["serving-init"]["command"]


def test_gateway_balances_over_exactly_the_replicas(services: dict[str, dict[str, Any]]) -> None:
    upstreams = _upstream_servers(gateway.COMPOSE_UPSTREAMS.read_text())
    assert set(upstreams) == {"maas_rest", "maas_grpc"}
    for upstream, flag in (("maas_rest", "rest_api_port"), ("maas_grpc", "port")):
        expected = {f"{replica}:{_flags(services[replica]['command'])[flag]}" for replica in REPLICAS}
        assert set(upstreams[upstream]) == expected, f"{gateway.COMPOSE_UPSTREAMS.name}: {upstream}"
    assert set(services["gateway"]["depends_on"]) == set(REPLICAS)


def test_gateway_mounts_the_gateway_files_where_its_image_reads_them(services: dict[str, dict[str, Any]]) -> None:
    gw = services["gateway"]
    env = _resolved_environment(gw)
    mounts = {target: (ROOT / source).resolve() for target, source in _volume_mounts(gw).items()}
    template_target = next(t for t, s in mounts.items() if s == gateway.TEMPLATE)
    # The image's envsubst step renders /etc/nginx/templates/X.template to $NGINX_ENVSUBST_OUTPUT_DIR/X.
    assert Path(template_target).parent == Path("/etc/nginx/templates")
    rendered = Path(env["NGINX_ENVSUBST_OUTPUT_DIR"]) / Path(template_target).name.removesuffix(".template")
    assert rendered == Path("/etc/nginx/nginx.conf"), "nginx must start from the rendered template"
    assert mounts[env["GATEWAY_UPSTREAMS"]] == gateway.COMPOSE_UPSTREAMS
    script_target = next(t for t, s in mounts.items() if s == gateway.COMPOSE_KEYS_SCRIPT)
    assert Path(script_target).parent == Path("/docker-entrypoint.d") and script_target.endswith(".sh")
    # The image's entrypoint runs only executable hooks; a bind mount keeps the file's mode.
    assert gateway.COMPOSE_KEYS_SCRIPT.stat().st_mode & stat.S_IXUSR
    # The key file is a compose secret, mounted where the hook reads it by default.
    default_keys = re.search(r'\$\{MAAS_GATEWAY_KEYS_FILE:-([^}]+)\}', gateway.COMPOSE_KEYS_SCRIPT.read_text())
    assert default_keys and gw["secrets"] == ["maas_api_keys"]
    assert default_keys.group(1) == "/run/secrets/maas_api_keys"
    assert "MAAS_GATEWAY_KEYS_FILE" not in env
    assert gw["command"] == ["nginx", "-g", "daemon off; user nginx;"]


def test_gateway_environment_fills_every_template_placeholder(services: dict[str, dict[str, Any]]) -> None:
    env = _resolved_environment(services["gateway"])
    placeholders = _template_placeholders()
    missing = placeholders - set(env)
    assert not missing, f"the gateway's environment lacks {sorted(missing)}, which nginx.conf.template uses"
    rendered = gateway.render_template(gateway.TEMPLATE.read_text(), env)
    assert "${" not in "\n".join(l for l in rendered.splitlines() if not l.lstrip().startswith("#"))
    unused = {k for k in env if k.startswith(("MAAS_GATEWAY_", "GATEWAY_"))} - placeholders - {"GATEWAY_KEYS_MAP"}
    assert not unused, f"the gateway sets {sorted(unused)}, which nothing reads"
    assert "GATEWAY_KEYS_MAP" in gateway.COMPOSE_KEYS_SCRIPT.read_text()


def test_gateway_ports_agree_with_its_config(services: dict[str, dict[str, Any]]) -> None:
    gw = services["gateway"]
    env = _resolved_environment(gw)
    published = {host: container for _, host, container in _published_ports(gw, {})}
    assert published == {8510: int(env["MAAS_GATEWAY_GRPC_PORT"]), 8511: int(env["MAAS_GATEWAY_REST_PORT"])}
    moved_env = {"MAAS_GATEWAY_GRPC_PORT": "9510", "MAAS_GATEWAY_REST_PORT": "9511"}
    moved = {host for _, host, _ in _published_ports(gw, moved_env)}
    assert moved == {9510, 9511}
    check = gw["healthcheck"]["test"]
    health = urlsplit(check[-1])
    assert (health.port, health.path) == (int(env["MAAS_GATEWAY_REST_PORT"]), "/healthz")
    assert "location = /healthz" in gateway.TEMPLATE.read_text()
    # Inside its own network namespace it listens on the container's interfaces; the host side is loopback.
    assert env["MAAS_GATEWAY_BIND"] == "0.0.0.0"


def test_retraining_defaults_are_the_codes(services: dict[str, dict[str, Any]], compose_text: str) -> None:
    documented = _documented_defaults(_header_comment(compose_text))
    assert documented["MAAS_TRAINING_SCHEDULE"] == config.DEFAULT_TRAINING_SCHEDULE
    assert documented["MAAS_INGEST_SCHEDULE"] == config.DEFAULT_INGEST_SCHEDULE
    assert documented["MAAS_HOUSEKEEPING_SCHEDULE"] == config.DEFAULT_HOUSEKEEPING_SCHEDULE
    assert documented["MAAS_KEEP_VERSIONS"] == str(config.DEFAULT_KEEP_VERSIONS)
    assert documented["MAAS_RETRAIN_ON"] == config.RETRAIN_ON_CHOICES[0]
    for name in AIRFLOW_SERVICES:
        retraining = config.load_retraining_settings(_resolved_environment(services[name]))
        assert retraining.training_schedule == config.DEFAULT_TRAINING_SCHEDULE
    # The watched place is inside the read-only data mount, so files dropped on the host are seen.
    worker = services["airflow-worker"]
    source = Path(config.load_retraining_settings(_resolved_environment(worker)).ingest_source)
    data_mount = next(Path(target) for target, source in _volume_mounts(worker).items() if source == "./data")
    assert source.is_relative_to(data_mount)


def test_gateway_defaults_are_the_local_stacks(compose_text: str) -> None:
    settings = config.load_settings({})
    documented = _documented_defaults(_header_comment(compose_text))
    for name in ("MAAS_GATEWAY_GRPC_PORT", "MAAS_GATEWAY_REST_PORT", "MAAS_GATEWAY_RATE", "MAAS_GATEWAY_BURST",
                 "MAAS_GATEWAY_MAX_BODY"):
        field = name.removeprefix("MAAS_").lower()
        assert hasattr(settings, field), f"maas_tasks.config has no {field} setting for {name}"
        assert documented[name] == str(getattr(settings, field)), f"{name}: compose and the local stack differ"


@pytest.mark.skipif(not Path(gateway.NGINX).exists(), reason="nginx is not installed (make os-packages)")
def test_the_gateway_config_compose_renders_passes_nginx_t(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # What the nginx image does at start, with the container's paths moved under tmp_path and the
    # replicas' names (resolvable only inside compose's network) replaced by loopback addresses.
    env = _resolved_environment(services["gateway"])
    keys_file = tmp_path / "keys"
    keys_file.write_text("team-a:" + "a" * 32 + "\n")
    keys_file.chmod(0o600)
    paths = {"GATEWAY_UPSTREAMS": tmp_path / "upstreams.conf", "GATEWAY_KEYS_MAP": tmp_path / "keys.conf",
             "GATEWAY_PID_FILE": tmp_path / "nginx.pid", "GATEWAY_TEMP_DIR": tmp_path / "temp"}
    env.update({k: str(v) for k, v in paths.items()})
    env.update(GATEWAY_ERROR_LOG=str(tmp_path / "error.log"), GATEWAY_ACCESS_LOG=str(tmp_path / "access.log"),
               MAAS_GATEWAY_BIND="127.0.0.1")
    upstreams = gateway.COMPOSE_UPSTREAMS.read_text()
    for replica in REPLICAS:
        upstreams = re.sub(rf"\b{re.escape(replica)}:", "127.0.0.1:", upstreams)
    paths["GATEWAY_UPSTREAMS"].write_text(upstreams)
    paths["GATEWAY_TEMP_DIR"].mkdir()  # the image has /var/cache/nginx; nginx makes the directories in it
    hook_env = {"PATH": os.environ["PATH"], "MAAS_GATEWAY_KEYS_FILE": str(keys_file),
                "GATEWAY_KEYS_MAP": env["GATEWAY_KEYS_MAP"]}
    hook = subprocess.run(
        ["sh", str(gateway.COMPOSE_KEYS_SCRIPT)], env=hook_env, capture_output=True, text=True, check=False
    )
    assert hook.returncode == 0, hook.stderr
    assert "a" * 32 not in hook.stdout + hook.stderr, "the hook must not log keys"
    conf = tmp_path / "nginx.conf"
    conf.write_text(gateway.render_template(gateway.TEMPLATE.read_text(), env))
    result = subprocess.run([gateway.NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_every_host_file_a_service_mounts_exists(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    for name, service in services.items():
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which the repository lacks"
            else:
                assert source.startswith("${") or source in compose["volumes"], f"{name}: unknown volume {source}"
    # Every named volume is used.
    used = {entry.split(":")[0] for service in services.values() for entry in service.get("volumes", [])}
    assert set(compose["volumes"]) <= used


# --- PostgreSQL and Airflow's init ----------------------------------------------------------------------


def test_postgres_init_creates_the_databases_the_services_use(
    services: dict[str, dict[str, Any]], worker_env: dict[str, str], connections: dict[str, dict[str, Any]]
) -> None:
    postgres = services["postgres"]
    init_scripts = {
        source: target
        for entry in postgres["volumes"]
        for source, target in [entry.split(":")[:2]]
        if target.startswith("/docker-entrypoint-initdb.d/")
    }
    assert len(init_scripts) == 1
    script = (ROOT / next(iter(init_scripts))).read_text()
    registry = connections["maas_registry"]
    metadata = urlsplit(worker_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    for database, role in ((metadata.path.lstrip("/"), metadata.username), (registry["schema"], registry["login"])):
        assert f"CREATE DATABASE {database} OWNER {role};" in script
        assert f"CREATE ROLE {role} LOGIN PASSWORD" in script
    for variable in re.findall(r'\$\{([A-Z_]+):\?', script):
        assert variable in _environment(postgres), f"the init script needs {variable} in the postgres environment"
    healthcheck = postgres["healthcheck"]["test"]
    assert "pg_isready" in healthcheck and "127.0.0.1" in healthcheck


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_postgres_init_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(ROOT / "docker" / "postgres-init.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_airflow_init_migrates_and_writes_the_admin_password(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    init = services["airflow-init"]
    script = init["command"][-1]
    assert "airflow db migrate" in script
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.DOTALL)
    assert snippet, "airflow-init should write the password file with an embedded Python snippet"
    env = _resolved_environment(init)
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


# --- the image ------------------------------------------------------------------------------------------


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
    assert copies["docker/requirements-cuda.txt"] == "/opt/maas/requirements-cuda.txt"
    assert {"maas_tasks", "serving", "pyproject.toml"} <= set(copies)
    project_dir = copies["pyproject.toml"].rstrip("/")
    assert f"pip install --no-cache-dir --no-deps {project_dir}" in runs
    cuda = next(i for i, run in enumerate(runs) if "requirements-cuda.txt" in run)
    assert runs.index(f"pip install --no-cache-dir -r {requirements}") < cuda < runs.index(
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
    for private in (".env", ".env.example", ".git", ".venv", ".maas", "gateway-keys"):
        assert ignored(private), f".dockerignore must keep {private} out of the image"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("name", [*ONE_SHOT_SERVICES, "redis"])
def test_service_script_is_valid_shell(services: dict[str, dict[str, Any]], name: str) -> None:
    script = _interpolate(services[name]["command"][-1], SAMPLE_ENV)
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{name}: {result.stderr}"
