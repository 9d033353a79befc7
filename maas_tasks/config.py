"""MaaS settings: every default in one place, overridable by ``MAAS_*`` environment variables.

Settings are read when :func:`load_settings` is called, never at import time, so a test or a DAG task
can change the environment and get fresh values. Nothing here creates directories or opens
connections: callers decide when state is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "sentiment"
DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
DEFAULT_PG_PORT = 54320
DEFAULT_AIRFLOW_PORT = 8080
# Airflow's own defaults for its log servers; the local stack binds them to 127.0.0.1.
DEFAULT_AIRFLOW_WORKER_LOG_PORT = 8793
DEFAULT_AIRFLOW_TRIGGERER_LOG_PORT = 8794
DEFAULT_REDIS_PORT = 63790
# Seconds an S3 request may take to connect and between the bytes of its answer (maas_tasks.storage).
DEFAULT_S3_TIMEOUT = 60.0
EXECUTOR_CHOICES = ("local", "celery")
# The settings `maas stack up` records in MAAS_HOME/run/stack.json (see read_stack_state).
STACK_STATE_FIELDS = (
    "pg_port", "serving_host", "grpc_port", "rest_port", "airflow_port", "airflow_worker_log_port",
    "airflow_triggerer_log_port", "redis_port", "airflow_executor", "gateway_host", "gateway_grpc_port",
    "gateway_rest_port", "replica_grpc_port", "replica_rest_port",
)
# The API gateway (serving/gateway.py) and the local stack's second model server replica behind it.
DEFAULT_GATEWAY_GRPC_PORT = 8510
DEFAULT_GATEWAY_REST_PORT = 8511
DEFAULT_GATEWAY_RATE = 100  # requests per second per API key
DEFAULT_GATEWAY_BURST = 200  # requests above the rate a key may send at once
DEFAULT_GATEWAY_MAX_BODY = "16m"
DEFAULT_REPLICA_GRPC_PORT = 8502
DEFAULT_REPLICA_REST_PORT = 8503
DEVICE_CHOICES = ("auto", "cpu", "gpu")
# The model servers serve a model's canary as "<name>__canary" (serving.sync): names ending so are taken.
RESERVED_MODEL_SUFFIX = "__canary"
# A model's directory sits beside files the serving side owns (models.config, its .lock, temporary
# .tmp-* files): a name ending like those would collide with them at promotion.
RESERVED_MODEL_ENDINGS = (".config", ".lock", ".tmp")
# A model name is a directory on the serving volume and a key prefix in the store: keep it portable.
MODEL_NAME_PATTERN = (
    rf"^(?!.*{RESERVED_MODEL_SUFFIX}$)(?!.*\.(?:config|lock|tmp)$)[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"
)
# --label-map / the label_map Param: "raw=name" pairs, comma-separated.
LABEL_MAP_EXAMPLE = "0=negative,1=positive"


class ConfigError(ValueError):
    """A MAAS_* setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Resolved MaaS settings; see README "Settings" for each variable."""

    home: Path
    store_url: str
    s3_endpoint: str | None
    s3_access_key: str | None
    s3_secret_key: str | None = dataclasses.field(repr=False)  # secrets stay out of logs that print settings
    s3_region: str
    registry_dsn: str | None = dataclasses.field(repr=False)
    pg_port: int
    model_name: str
    serving_host: str
    grpc_port: int
    rest_port: int
    serving_dir: Path
    serving_config: Path
    serving_batching: str
    airflow_port: int
    device: str
    node_id: str | None = "local"
    airflow_worker_log_port: int = DEFAULT_AIRFLOW_WORKER_LOG_PORT
    airflow_triggerer_log_port: int = DEFAULT_AIRFLOW_TRIGGERER_LOG_PORT
    redis_port: int = DEFAULT_REDIS_PORT
    airflow_executor: str = "local"
    gateway_host: str = "127.0.0.1"
    gateway_grpc_port: int = DEFAULT_GATEWAY_GRPC_PORT
    gateway_rest_port: int = DEFAULT_GATEWAY_REST_PORT
    gateway_keys_file: Path | None = None
    gateway_rate: int = DEFAULT_GATEWAY_RATE
    gateway_burst: int = DEFAULT_GATEWAY_BURST
    gateway_max_body: str = DEFAULT_GATEWAY_MAX_BODY
    replica_grpc_port: int = DEFAULT_REPLICA_GRPC_PORT
    replica_rest_port: int = DEFAULT_REPLICA_REST_PORT
    s3_timeout: float = DEFAULT_S3_TIMEOUT

    @property
    def grpc_target(self) -> str:
        return f"{self.serving_host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.serving_host}:{self.rest_port}"

    @property
    def gateway_address(self) -> str:
        """Where clients on this machine reach the gateway: a gateway on every interface is on loopback too."""
        return "127.0.0.1" if self.gateway_host in ("0.0.0.0", "::") else self.gateway_host

    @property
    def gateway_grpc_target(self) -> str:
        return f"{self.gateway_address}:{self.gateway_grpc_port}"

    @property
    def gateway_rest_url(self) -> str:
        return f"http://{self.gateway_address}:{self.gateway_rest_port}"


def settings_environment(settings: Settings) -> dict[str, str]:
    """The ``MAAS_*`` variables that make :func:`load_settings` return ``settings`` in a child process."""
    from dataclasses import fields

    env = {}
    for field in fields(settings):
        value = getattr(settings, field.name)
        if value is not None or field.name == "node_id":
            env[f"MAAS_{field.name.upper()}"] = "" if value is None else str(value)
    return env


def project_root() -> Path:
    """The source checkout holding this package (where ``.maas/`` lives by default)."""
    return Path(__file__).resolve().parent.parent


def _default_home() -> Path:
    root = project_root()
    if (root / "pyproject.toml").is_file():
        return root / ".maas"
    return Path.cwd() / ".maas"


def _int_setting(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; set it to a port number such as {default}") from None
    if not 0 < value < 65536:
        raise ConfigError(f"{name}={value} is outside 1-65535; set it to a free TCP port such as {default}")
    return value


def check_model_name(name: str, source: str = "model name") -> str:
    """Return ``name`` if it is a valid model name.

    Raises:
        ConfigError: it is not; the message says what ``source`` (e.g. ``MAAS_MODEL_NAME``) must look like.
    """
    if name.endswith(RESERVED_MODEL_SUFFIX):
        raise ConfigError(
            f"{source} {name!r} ends with {RESERVED_MODEL_SUFFIX!r}, which the model servers use for canaries; "
            "choose another name"
        )
    if name.lower().endswith(RESERVED_MODEL_ENDINGS):
        raise ConfigError(
            f"{source} {name!r} ends with {name[name.rindex('.'):]!r}, like the files the model servers keep beside "
            "the model directories (models.config and its lock); choose another name"
        )
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ConfigError(
            f"{source} {name!r} is not a valid model name: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. sentiment or reviews-v2)"
        )
    return name


def parse_label_map(text: str | None, source: str = "--label-map") -> dict[str, str] | None:
    """``"0=negative,1=positive"`` as ``{"0": "negative", "1": "positive"}`` (None or blank: None).

    Raw values are the labels as written in the data (compared as class names, so ``1.0`` is ``1``); two raw
    values may name one class, and the classes (at least two) are what the served model answers.

    Raises:
        ConfigError: a pair is not ``raw=name``, a raw value repeats, a name is blank, or there is one class.
    """
    if text is None or not text.strip():
        return None
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        raw, sep, name = (part.strip() for part in pair.partition("="))
        if not sep or not raw or not name:
            raise ConfigError(f"{source} {text!r}: {pair.strip()!r} is not RAW=NAME (e.g. {LABEL_MAP_EXAMPLE})")
        if raw in mapping:
            raise ConfigError(f"{source} {text!r}: the label {raw!r} is mapped twice; map each raw label once")
        mapping[raw] = name
    if len(set(mapping.values())) < 2:
        raise ConfigError(f"{source} {text!r} names one class; a classifier needs at least two (e.g. {LABEL_MAP_EXAMPLE})")
    return mapping


# Retraining and housekeeping (README "Retraining and housekeeping"): when the DAGs run, what maas_ingest
# watches, what makes a new snapshot retrain, how many versions housekeeping keeps.
DEFAULT_TRAINING_SCHEDULE = "@weekly"
DEFAULT_INGEST_SCHEDULE = "*/5 * * * *"
DEFAULT_HOUSEKEEPING_SCHEDULE = "0 3 * * *"
DEFAULT_KEEP_VERSIONS = 5
MAX_KEEP_VERSIONS = 1000
RETRAIN_ON_CHOICES = ("new_data", "drift")
# A schedule setting with one of these values turns the cron off (the DAG runs when triggered, or on its Asset).
NO_SCHEDULE = ("none", "off")
# Airflow's cron presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS), accepted as they are.
CRON_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


@dataclass(frozen=True)
class RetrainingSettings:
    """When the MaaS DAGs run and what they watch and keep; read cheaply enough for a DAG file's parse."""

    model_name: str
    # Crons; None: no schedule (manual runs, and for maas_training its Asset, only).
    training_schedule: str | None
    ingest_schedule: str | None
    housekeeping_schedule: str | None
    # What maas_ingest watches: MAAS_INGEST_SOURCE, else the directory $MAAS_HOME/incoming.
    ingest_source: str
    retrain_on: str
    keep_versions: int


def _cron_setting(env: dict[str, str], name: str, default: str) -> str | None:
    raw = " ".join((env.get(name) or "").split())
    if not raw:
        return default
    if raw.lower() in NO_SCHEDULE:
        return None
    if raw in CRON_PRESETS:
        return raw
    from croniter import croniter

    if not croniter.is_valid(raw):
        raise ConfigError(
            f"{name}={raw!r} is not a cron expression; use five fields such as '*/5 * * * *', a preset "
            f"({', '.join(CRON_PRESETS)}), or none to turn the schedule off"
        )
    return raw


def load_retraining_settings(env: dict[str, str] | None = None) -> RetrainingSettings:
    """Read the retraining settings (``MAAS_TRAINING_SCHEDULE``, ``MAAS_INGEST_SCHEDULE``,
    ``MAAS_HOUSEKEEPING_SCHEDULE``, ``MAAS_INGEST_SOURCE``, ``MAAS_RETRAIN_ON``, ``MAAS_KEEP_VERSIONS``, and the
    model name their Asset is named after) from ``env`` (default: the process environment).

    Raises:
        ConfigError: a value is malformed; the message names the variable and how to fix it.
    """
    env = dict(os.environ if env is None else env)
    home = Path(env.get("MAAS_HOME") or _default_home()).expanduser().resolve()
    retrain_on = (env.get("MAAS_RETRAIN_ON") or RETRAIN_ON_CHOICES[0]).strip().lower()
    if retrain_on not in RETRAIN_ON_CHOICES:
        raise ConfigError(
            f"MAAS_RETRAIN_ON={retrain_on!r} is not one of {', '.join(RETRAIN_ON_CHOICES)}: new_data retrains on "
            "every new snapshot, drift only on one whose drift is flagged"
        )
    raw_keep = (env.get("MAAS_KEEP_VERSIONS") or "").strip()
    try:
        keep = int(raw_keep) if raw_keep else DEFAULT_KEEP_VERSIONS
    except ValueError:
        keep = 0
    if not 1 <= keep <= MAX_KEEP_VERSIONS:
        raise ConfigError(
            f"MAAS_KEEP_VERSIONS={raw_keep!r} is not a whole number from 1 to {MAX_KEEP_VERSIONS}: how many of "
            f"each model's newest versions housekeeping keeps (default {DEFAULT_KEEP_VERSIONS})"
        )
    return RetrainingSettings(
        model_name=check_model_name(_str_setting(env, "MAAS_MODEL_NAME") or DEFAULT_MODEL_NAME, "MAAS_MODEL_NAME"),
        training_schedule=_cron_setting(env, "MAAS_TRAINING_SCHEDULE", DEFAULT_TRAINING_SCHEDULE),
        ingest_schedule=_cron_setting(env, "MAAS_INGEST_SCHEDULE", DEFAULT_INGEST_SCHEDULE),
        housekeeping_schedule=_cron_setting(env, "MAAS_HOUSEKEEPING_SCHEDULE", DEFAULT_HOUSEKEEPING_SCHEDULE),
        ingest_source=_str_setting(env, "MAAS_INGEST_SOURCE") or str(home / "incoming"),
        retrain_on=retrain_on,
        keep_versions=keep,
    )


def _batching_setting(env: dict[str, str]) -> str:
    raw = (env.get("MAAS_SERVING_BATCHING") or "").strip()
    if not raw:
        return str(Path(__file__).resolve().parent.parent / "serving" / "config" / "batching_parameters.config")
    if raw.lower() == "off":
        return "off"
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"MAAS_SERVING_BATCHING={raw!r} is not a file; give a text-format TF Serving BatchingParameters "
            "file, or off to serve without batching"
        )
    return str(path)


def _executor_setting(env: dict[str, str]) -> str:
    executor = (env.get("MAAS_AIRFLOW_EXECUTOR") or "local").strip().lower()
    if executor not in EXECUTOR_CHOICES:
        raise ConfigError(f"MAAS_AIRFLOW_EXECUTOR={executor!r} is not one of {', '.join(EXECUTOR_CHOICES)}")
    return executor


def _count_setting(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} is not a whole number of at least 1; set it to e.g. {default}")
    return int(raw)


def _seconds_setting(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name}={raw!r} is not a positive number of seconds; set it to e.g. {default:g}")
    return value


def _size_setting(env: dict[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or default).strip()
    if not re.fullmatch(r"[1-9][0-9]*[kKmM]?", raw):
        raise ConfigError(f"{name}={raw!r} is not a size such as 512k or {default} (bytes, k or m)")
    return raw


def api_key_setting(env: dict[str, str] | None = None) -> str | None:
    """``MAAS_API_KEY``, the key clients send to the gateway, or None.

    It is kept out of :class:`Settings` so that :func:`settings_environment` never hands a secret to the
    processes the stack starts.
    """
    return _str_setting(dict(os.environ if env is None else env), "MAAS_API_KEY")


def _str_setting(env: dict[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def stack_state_file(home: Path) -> Path:
    """Where ``maas stack up`` records the settings the local stack under ``home`` was started with."""
    return home / "run" / "stack.json"


def read_stack_state(home: Path) -> dict[str, str]:
    """The ``MAAS_*`` values the local stack under ``home`` was started with; {} when none is recorded.

    ``maas stack up`` writes them and ``maas stack down`` removes them, so that a shell without the same
    variables still reaches this stack's servers rather than whatever listens on the default ports.

    Raises:
        ConfigError: the file cannot be read or is not what ``maas stack up`` writes.
    """
    path = stack_state_file(home)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} (the settings the local stack was started with) is unreadable: {exc}; "
            "if no stack runs from this MAAS_HOME, delete the file"
        ) from None
    names = {f"MAAS_{field.upper()}" for field in STACK_STATE_FIELDS}
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold the stack's settings; if no stack runs from this MAAS_HOME, delete it")
    return {name: str(value) for name, value in state.items() if name in names}


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the MAAS_* settings from ``env`` (default: the process environment).

    A stack setting (``STACK_STATE_FIELDS``) left unset takes the value the local stack under ``MAAS_HOME``
    was started with, when one is recorded (:func:`read_stack_state`).

    Raises:
        ConfigError: a value is malformed; the message names the variable and how to fix it.
    """
    env = dict(os.environ if env is None else env)
    home = Path(env.get("MAAS_HOME") or _default_home()).expanduser().resolve()
    # A variable left unset takes the value this home's stack was started with (maas stack up).
    for name, value in read_stack_state(home).items():
        if not env.get(name, "").strip():
            env[name] = value
    store_url = _str_setting(env, "MAAS_STORE_URL") or f"file://{home / 'store'}"
    if not (store_url.startswith("file://") or store_url.startswith("s3://")):
        raise ConfigError(
            f"MAAS_STORE_URL={store_url!r} is not supported; use file:///absolute/dir or s3://bucket[/prefix]"
        )
    device = (env.get("MAAS_DEVICE") or "auto").strip().lower()
    if device not in DEVICE_CHOICES:
        raise ConfigError(f"MAAS_DEVICE={device!r} is not one of {', '.join(DEVICE_CHOICES)}")
    serving_dir = Path(env.get("MAAS_SERVING_DIR") or home / "serving" / "models").expanduser().resolve()
    serving_config = Path(env.get("MAAS_SERVING_CONFIG") or serving_dir / "models.config").expanduser().resolve()
    return Settings(
        home=home,
        store_url=store_url,
        s3_endpoint=_str_setting(env, "MAAS_S3_ENDPOINT"),
        s3_access_key=_str_setting(env, "MAAS_S3_ACCESS_KEY"),
        s3_secret_key=_str_setting(env, "MAAS_S3_SECRET_KEY"),
        s3_region=_str_setting(env, "MAAS_S3_REGION") or "us-east-1",
        registry_dsn=_str_setting(env, "MAAS_REGISTRY_DSN"),
        pg_port=_int_setting(env, "MAAS_PG_PORT", DEFAULT_PG_PORT),
        model_name=check_model_name(_str_setting(env, "MAAS_MODEL_NAME") or DEFAULT_MODEL_NAME, "MAAS_MODEL_NAME"),
        serving_host=_str_setting(env, "MAAS_SERVING_HOST") or "127.0.0.1",
        grpc_port=_int_setting(env, "MAAS_GRPC_PORT", DEFAULT_GRPC_PORT),
        rest_port=_int_setting(env, "MAAS_REST_PORT", DEFAULT_REST_PORT),
        serving_dir=serving_dir,
        serving_config=serving_config,
        serving_batching=_batching_setting(env),
        airflow_port=_int_setting(env, "MAAS_AIRFLOW_PORT", DEFAULT_AIRFLOW_PORT),
        device=device,
        # The serving node this machine manages (its agent reconciles it); empty: none (e.g. an Airflow
        # worker in compose, where each model server has its own sync sidecar).
        node_id=env.get("MAAS_NODE_ID", "local").strip() or None,
        airflow_worker_log_port=_int_setting(env, "MAAS_AIRFLOW_WORKER_LOG_PORT", DEFAULT_AIRFLOW_WORKER_LOG_PORT),
        airflow_triggerer_log_port=_int_setting(
            env, "MAAS_AIRFLOW_TRIGGERER_LOG_PORT", DEFAULT_AIRFLOW_TRIGGERER_LOG_PORT
        ),
        redis_port=_int_setting(env, "MAAS_REDIS_PORT", DEFAULT_REDIS_PORT),
        airflow_executor=_executor_setting(env),
        gateway_host=_str_setting(env, "MAAS_GATEWAY_HOST") or "127.0.0.1",
        gateway_grpc_port=_int_setting(env, "MAAS_GATEWAY_GRPC_PORT", DEFAULT_GATEWAY_GRPC_PORT),
        gateway_rest_port=_int_setting(env, "MAAS_GATEWAY_REST_PORT", DEFAULT_GATEWAY_REST_PORT),
        gateway_keys_file=Path(env.get("MAAS_GATEWAY_KEYS_FILE") or home / "gateway" / "api_keys").expanduser().resolve(),
        gateway_rate=_count_setting(env, "MAAS_GATEWAY_RATE", DEFAULT_GATEWAY_RATE),
        gateway_burst=_count_setting(env, "MAAS_GATEWAY_BURST", DEFAULT_GATEWAY_BURST),
        gateway_max_body=_size_setting(env, "MAAS_GATEWAY_MAX_BODY", DEFAULT_GATEWAY_MAX_BODY),
        replica_grpc_port=_int_setting(env, "MAAS_REPLICA_GRPC_PORT", DEFAULT_REPLICA_GRPC_PORT),
        replica_rest_port=_int_setting(env, "MAAS_REPLICA_REST_PORT", DEFAULT_REPLICA_REST_PORT),
        s3_timeout=_seconds_setting(env, "MAAS_S3_TIMEOUT", DEFAULT_S3_TIMEOUT),
    )
