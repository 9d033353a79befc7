"""The API gateway in front of the model server replicas: nginx, configured from ``serving/gateway/``.

The model servers speak TF Serving's open APIs and check nobody. The gateway adds what a shared endpoint
needs, for REST and gRPC alike: API keys (401 / UNAUTHENTICATED without a valid one), a request rate per
key (429 with ``Retry-After`` / RESOURCE_EXHAUSTED), balancing over the replicas with passive health
checks and one retry on another replica, a body size limit (413) and an access log naming the key, never
quoting it. nginx does all of it, from ``serving/gateway/nginx.conf.template``, the same file the compose
stack's nginx image fills from its environment.

This module is the local stack's side: it reads and creates the key file (``name:key`` per line, 0600),
renders the template, the replicas' upstream blocks and the key map into ``$MAAS_HOME/gateway/conf/``
(0600: the map holds the keys; the nginx master reads it as root or as its owner), checks the result with
``nginx -t`` and builds the command line the stack's process manager runs (``maas_tasks.stack``).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas_tasks.stack import write_private

GATEWAY_DIR = Path(__file__).resolve().parent / "gateway"
TEMPLATE = GATEWAY_DIR / "nginx.conf.template"
COMPOSE_UPSTREAMS = GATEWAY_DIR / "upstreams.compose.conf"
# The compose stack's twin of render_keys_map (the nginx image has no Python).
COMPOSE_KEYS_SCRIPT = GATEWAY_DIR / "40-maas-api-keys.sh"
NGINX = "/usr/sbin/nginx"  # Debian's nginx package

# Key names appear in the access log and the rate limiter; keys go into the map as regexes, so both are
# kept to characters that need no quoting or escaping there.
KEY_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
KEY_PATTERN = r"[A-Za-z0-9_-]{16,256}"
DEFAULT_KEY_NAME = "default"
# Passive health checks: one failed request (refused, reset, timed out) takes a replica out of the
# rotation for FAIL_TIMEOUT, after which one request tries it again.
MAX_FAILS = 1
FAIL_TIMEOUT = "10s"
UPSTREAM_KEEPALIVE = 16
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class GatewayError(RuntimeError):
    """The gateway cannot be configured or started; the message says what to fix and where."""


@dataclass(frozen=True)
class ApiKey:
    """One entry of the key file. The key itself is left out of ``repr`` so that it never lands in a log."""

    name: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class GatewayLayout:
    """Where the local gateway keeps its files: nginx's prefix (``-p``) is ``root``."""

    root: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def conf_file(self) -> Path:
        return self.conf_dir / "nginx.conf"

    @property
    def upstreams(self) -> Path:
        return self.conf_dir / "upstreams.conf"

    @property
    def keys_map(self) -> Path:
        return self.conf_dir / "api_keys.conf"

    @property
    def pid_file(self) -> Path:
        return self.root / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.root / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.root / "logs" / "access.log"

    @property
    def temp_dir(self) -> Path:
        return self.root / "temp"


def gateway_layout(home: Path) -> GatewayLayout:
    """The local gateway's files under the stack's ``MAAS_HOME``."""
    return GatewayLayout(Path(home) / "gateway")


# --- the key file ---------------------------------------------------------------------------------------


def read_api_keys(path: Path) -> list[ApiKey]:
    """The keys of a key file: one ``name:key`` per line; blank lines and ``#`` comments are skipped.

    Raises:
        GatewayError: the file is missing, readable by others than its owner, holds a malformed line or a
            repeated key or name, or no key at all (the message gives the line number, never a key).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayError(f"cannot read the API key file {path}: {exc.strerror}; create it (name:key per line, mode 0600)") from None
    if mode & 0o077:
        raise GatewayError(f"the API key file {path} is readable by others (mode {mode:04o}); run chmod 600 {path}")
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep or not re.fullmatch(KEY_NAME_PATTERN, name) or not re.fullmatch(KEY_PATTERN, key):
            raise GatewayError(
                f"{path} line {number} is not name:key (name: 1 to 64 letters, digits, '.', '_' or '-'; "
                "key: 16 to 256 letters, digits, '_' or '-')"
            )
        if any(k.name == name for k in keys) or any(k.key == key for k in keys):
            raise GatewayError(f"{path} line {number} repeats a key name or a key; give each client its own")
        keys.append(ApiKey(name, key))
    if not keys:
        raise GatewayError(f"the API key file {path} holds no key; add a line name:key")
    return keys


def ensure_keys_file(path: Path, name: str = DEFAULT_KEY_NAME) -> bool:
    """Create the key file with one random key named ``name`` (mode 0600) unless it exists.

    Returns:
        True when the file was created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("# MaaS API gateway keys: one name:key per line. The name is what the access log shows.\n")
        handle.write(f"{name}:{secrets.token_urlsafe(32)}\n")
    return True


def first_api_key(path: Path) -> str | None:
    """The first key of the key file, or None when there is no usable file (for local clients)."""
    try:
        return read_api_keys(path)[0].key
    except GatewayError:
        return None


# --- rendering ------------------------------------------------------------------------------------------


def render_keys_map(keys: list[ApiKey]) -> str:
    """The map entries from each key to its name. nginx matches plain map strings ignoring case, so each
    key is an anchored, case-sensitive regex (the key's characters need no escaping)."""
    lines = ["# Rendered by serving/gateway.py from the API key file: edit that file, not this one."]
    lines += [f'"~^{k.key}$" {k.name};' for k in keys]
    return "\n".join(lines) + "\n"


def render_upstreams(grpc_targets: list[str], rest_targets: list[str]) -> str:
    """The ``maas_rest`` and ``maas_grpc`` upstream blocks for replicas at ``host:port`` addresses, in the
    form of ``serving/gateway/upstreams.compose.conf``."""
    if not grpc_targets or not rest_targets:
        raise GatewayError("the gateway needs at least one model server replica (gRPC and REST address)")
    blocks = [
        (
            "# Rendered by serving/gateway.py for the local stack's replicas. Health checks are passive (nginx OSS\n"
            "# has no active ones): a replica that fails a request is left out for fail_timeout, then tried again.\n"
            "# Each upstream's zone gives all worker processes one view of the replicas' health."
        )
    ]
    for name, targets in (("maas_rest", rest_targets), ("maas_grpc", grpc_targets)):
        servers = "".join(f"    server {t} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT};\n" for t in targets)
        blocks.append(
            f"upstream {name} {{\n    zone {name} 64k;\n{servers}    keepalive {UPSTREAM_KEEPALIVE};\n"
            "    keepalive_timeout 30s;  # below the replicas' idle timeout\n}"
        )
    return "\n\n".join(blocks) + "\n"


def render_template(text: str, values: dict[str, Any]) -> str:
    """``text`` with each ``${NAME}`` replaced by ``values[NAME]``, as the nginx image's envsubst does.

    Raises:
        GatewayError: a placeholder has no value.
    """
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise GatewayError(f"{TEMPLATE.name} needs values for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def template_values(settings: Any, layout: GatewayLayout) -> dict[str, str]:
    """The template's placeholders for the local stack: the ``MAAS_GATEWAY_*`` settings and the layout."""
    return {
        "MAAS_GATEWAY_BIND": settings.gateway_host,
        "MAAS_GATEWAY_GRPC_PORT": str(settings.gateway_grpc_port),
        "MAAS_GATEWAY_REST_PORT": str(settings.gateway_rest_port),
        "MAAS_GATEWAY_RATE": str(settings.gateway_rate),
        "MAAS_GATEWAY_BURST": str(settings.gateway_burst),
        "MAAS_GATEWAY_MAX_BODY": settings.gateway_max_body,
        "GATEWAY_PID_FILE": str(layout.pid_file),
        "GATEWAY_ERROR_LOG": str(layout.error_log),
        "GATEWAY_ACCESS_LOG": str(layout.access_log),
        "GATEWAY_TEMP_DIR": str(layout.temp_dir),
        "GATEWAY_UPSTREAMS": str(layout.upstreams),
        "GATEWAY_KEYS_MAP": str(layout.keys_map),
    }


def write_config(settings: Any, layout: GatewayLayout, grpc_targets: list[str], rest_targets: list[str]) -> bool:
    """Render the gateway's config for ``settings`` and these replicas into ``layout`` (files 0600).

    The keys come from ``settings.gateway_keys_file``, which must exist (:func:`ensure_keys_file`).

    Returns:
        True when a file changed (a running nginx must reload to see it).

    Raises:
        GatewayError: the key file is unusable (see :func:`read_api_keys`) or a value is missing.
    """
    files = {
        layout.keys_map: render_keys_map(read_api_keys(settings.gateway_keys_file)),
        layout.upstreams: render_upstreams(grpc_targets, rest_targets),
        layout.conf_file: render_template(TEMPLATE.read_text(encoding="utf-8"), template_values(settings, layout)),
    }
    for folder in (layout.conf_dir, layout.error_log.parent, layout.temp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    layout.conf_dir.chmod(0o700)
    changed = False
    for path, text in files.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        write_private(path, text)
        changed = True
    return changed


def config_digest(layout: GatewayLayout) -> str:
    """A digest of the rendered files, to tell whether a running gateway serves the current config."""
    digest = hashlib.sha256()
    for path in (layout.conf_file, layout.upstreams, layout.keys_map):
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


# --- running nginx --------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """Debian's nginx, else the one on PATH.

    Raises:
        GatewayError: there is none.
    """
    found = NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")
    if not found:
        raise GatewayError("nginx is not installed; install it (Debian/Ubuntu: apt-get install nginx) to run the gateway")
    return found


def global_directives(daemon: bool = False) -> str:
    """The directives given on nginx's command line: foreground for the process manager and, when the
    master runs as root, an unprivileged user for the workers (only a root master may name one)."""
    directives = [] if daemon else ["daemon off;"]
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise GatewayError("nginx runs as root and needs an unprivileged user for its workers; there is no user 'nobody'") from None
        directives.append(f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};")
    return " ".join(directives)


def nginx_argv(layout: GatewayLayout, *, check: bool = False) -> list[str]:
    """The command line running (or, with ``check``, testing) the gateway rendered into ``layout``."""
    argv = [nginx_binary(), "-p", f"{layout.root}/", "-c", str(layout.conf_file), "-g", global_directives()]
    return argv + ["-t", "-q"] if check else argv


def check_config(layout: GatewayLayout) -> None:
    """Run ``nginx -t`` on the rendered config.

    Raises:
        GatewayError: nginx refuses it; the message quotes nginx.
    """
    result = subprocess.run(nginx_argv(layout, check=True), capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise GatewayError(f"nginx -t refused {layout.conf_file}:\n{(result.stderr or result.stdout).strip()}")


def read_access_log(path: Path) -> list[dict[str, Any]]:
    """The gateway's access log as dicts (one JSON object per request); [] when there is none yet."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
