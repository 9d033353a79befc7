"""MaaS settings: every default in one place, overridable by ``MAAS_*`` environment variables.

Settings are read when :func:`load_settings` is called, never at import time, so a test or a DAG task
can change the environment and get fresh values. Nothing here creates directories or opens
connections: callers decide when state is touched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "sentiment"
DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
DEFAULT_PG_PORT = 54320
DEFAULT_AIRFLOW_PORT = 8080
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
    s3_secret_key: str | None
    s3_region: str
    registry_dsn: str | None
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

    @property
    def grpc_target(self) -> str:
        return f"{self.serving_host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.serving_host}:{self.rest_port}"


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


def _str_setting(env: dict[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the MAAS_* settings from ``env`` (default: the process environment).

    Raises:
        ConfigError: a value is malformed; the message names the variable and how to fix it.
    """
    env = dict(os.environ if env is None else env)
    home = Path(env.get("MAAS_HOME") or _default_home()).expanduser().resolve()
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
    )
