"""TF Serving's model config file (``--model_config_file``): read, edit and write it safely.

The file is a text-format ``tensorflow.serving.ModelServerConfig``. Both the real TF Serving and
:mod:`serving.server` read it, and promotion rewrites one model's entry in it, so the file is
written atomically (temporary file + rename): a server or a concurrent reader never sees half a
config.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig

TENSORFLOW_PLATFORM = "tensorflow"


class ModelConfigError(ValueError):
    """A model config file cannot be read or does not describe a usable config."""


def parse_model_config(text: str, source: str = "<string>") -> ModelServerConfig:
    """Parse text-format ``ModelServerConfig``.

    Args:
        text: the file content.
        source: where the text came from, for error messages.

    Raises:
        ModelConfigError: the text is not a valid ``ModelServerConfig``; the message names
            ``source`` and the parser's line:column message.
    """
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(
            f"Error parsing text-format tensorflow.serving.ModelServerConfig from {source}: {exc}"
        ) from None
    return config


def format_model_config(config: ModelServerConfig) -> str:
    """Render ``config`` as text format, as TF Serving's ``--model_config_file`` expects."""
    return text_format.MessageToString(config)


def read_model_config(path: Path, *, missing_ok: bool = False) -> ModelServerConfig:
    """Read a model config file.

    Args:
        path: the file.
        missing_ok: return an empty config instead of failing when the file does not exist.

    Raises:
        ModelConfigError: the file is missing (unless ``missing_ok``), unreadable or malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return ModelServerConfig()
        raise ModelConfigError(f"model config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"cannot read model config file {path}: {exc}") from None
    return parse_model_config(text, source=str(path))


def write_model_config(path: Path, config: ModelServerConfig) -> None:
    """Write ``config`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, format_model_config(config))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see either the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def get_model_entry(config: ModelServerConfig, name: str) -> ModelConfig | None:
    """Return the entry for model ``name`` (a copy), or None when the config has none."""
    for entry in config.model_config_list.config:
        if entry.name == name:
            copy = ModelConfig()
            copy.CopyFrom(entry)
            return copy
    return None


def set_model_entry(
    config: ModelServerConfig,
    name: str,
    base_path: str | Path,
    versions: Iterable[int],
    *,
    platform: str = TENSORFLOW_PLATFORM,
) -> ModelServerConfig:
    """Return a copy of ``config`` whose entry for ``name`` serves exactly ``versions``.

    The entry gets ``base_path``, ``model_platform`` and ``model_version_policy { specific { ... } }``.
    Other models' entries are kept as they are, and so are this entry's other fields, except version
    labels pointing to versions no longer served (TF Serving would reject them).

    Raises:
        ModelConfigError: ``versions`` is empty, or ``config`` is a custom (non-list) config.
    """
    versions = sorted({int(v) for v in versions})
    if not versions:
        raise ModelConfigError(f"no versions given for model {name!r}: a specific policy needs at least one")
    if config.WhichOneof("config") == "custom_model_config":
        raise ModelConfigError("the model config uses custom_model_config; only model_config_list can be edited")
    new = ModelServerConfig()
    new.CopyFrom(config)
    entries = new.model_config_list.config
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        entry = entries.add()
        entry.name = name
    entry.base_path = str(base_path)
    entry.model_platform = platform
    entry.model_version_policy.specific.versions[:] = versions
    for label in [label for label, v in entry.version_labels.items() if v not in versions]:
        del entry.version_labels[label]
    return new


def single_model_config(name: str, base_path: str | Path) -> ModelServerConfig:
    """The config TF Serving builds from ``--model_name``/``--model_base_path``: one model, latest version."""
    config = ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = name
    entry.base_path = str(base_path)
    entry.model_platform = TENSORFLOW_PLATFORM
    return config
