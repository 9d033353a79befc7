"""Suite-wide set-up: isolate every test run from the developer's own stack and register the fixtures.

MAAS_HOME and AIRFLOW_HOME point into a throwaway directory before anything imports Airflow or reads
settings, so tests never touch ``.maas/`` or ``~/airflow``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.s3", "tests.fixtures.browser", "tests.fixtures.tcp_proxy"]

_SESSION_HOME = tempfile.mkdtemp(prefix="maas-tests-")
os.environ["MAAS_HOME"] = os.path.join(_SESSION_HOME, "maas")
os.environ["AIRFLOW_HOME"] = os.path.join(_SESSION_HOME, "airflow")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# The DAG imports its timetable from plugins/, as every Airflow process of the stack does; Airflow puts
# the folder on sys.path when imported, tests of plugins/ modules may import them first.
_PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = _PLUGINS
sys.path.append(_PLUGINS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MAAS_CONFORMANCE_* point the conformance suite at another server (tests/serving/conformance): kept.
for _name in [k for k in os.environ if k.startswith("MAAS_") and k != "MAAS_HOME" and not k.startswith("MAAS_CONFORMANCE_")]:
    del os.environ[_name]


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
