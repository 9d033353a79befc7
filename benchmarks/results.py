"""Where a benchmark result is kept, and what it records about the run beside its figures.

Every run writes ``bench/results/<UTC timestamp>.json`` under the project root (run outputs: ignored by
git, never committed). Figures only compare with figures from the same machine, packages and code, so the
file also holds the machine (cores, memory, Python, platform), the versions of the packages that do the work
and the commit the code was at, with whether the tree had uncommitted changes.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# Relative to the project root.
RESULTS_DIR = Path("bench") / "results"
PACKAGES = (
    "tensorflow", "keras", "scikit-learn", "numpy", "pandas", "pyarrow", "grpcio", "apache-airflow",
    "great_expectations", "psutil",
)
UNKNOWN = "unknown"


def results_path(directory: Path, now: datetime | None = None) -> Path:
    """``directory/<YYYYmmddTHHMMSSZ>.json`` for ``now`` (default: the current UTC time); the default
    directory is :data:`RESULTS_DIR` under the project root."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return directory / f"{now:%Y%m%dT%H%M%SZ}.json"


def total_memory_bytes() -> int | None:
    """The machine's physical memory (psutil; ``/proc/meminfo`` when psutil is missing; None if neither)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """``cpus`` (logical), ``memory_gib``, ``python``, ``platform`` and ``processor``."""
    memory = total_memory_bytes()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_commit(root: Path) -> dict[str, Any]:
    """``commit`` (as the model card records it, :func:`maas_tasks.export.code_version`; ``unknown`` without git
    or a repository) and ``dirty`` (uncommitted changes; None when unknown)."""
    from maas_tasks.export import code_version

    found = code_version(root)
    if not found["commit"]:
        return {"commit": UNKNOWN, "dirty": None}
    return {"commit": found["commit"], "dirty": found["dirty"]}


def run_context(root: Path) -> dict[str, Any]:
    """What a result records beside its figures: ``machine``, ``packages`` and ``code``."""
    return {"machine": machine_info(), "packages": package_versions(), "code": code_commit(root)}


def write_result(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` (its directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
