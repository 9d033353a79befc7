"""Tests of what a benchmark result records beside its figures, and where it goes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from benchmarks.results import PACKAGES, RESULTS_DIR, code_commit, results_path, run_context, write_result
from maas_tasks.config import project_root


def test_results_are_named_by_their_utc_start_time(tmp_path):
    local = datetime(2026, 12, 2, 19, 30, 0, tzinfo=timezone(timedelta(hours=1)))
    assert results_path(tmp_path, local) == tmp_path / "20261202T183000Z.json"
    assert RESULTS_DIR.as_posix() == "bench/results"


def test_context_records_machine_packages_and_commit(tmp_path):
    context = run_context(project_root())
    machine = context["machine"]
    assert machine["cpus"] >= 1 and machine["memory_gib"] > 0 and machine["python"].count(".") == 2
    assert machine["platform"]
    assert list(context["packages"]) == list(PACKAGES)
    assert context["packages"]["numpy"] and context["packages"]["scikit-learn"] and context["packages"]["tensorflow"]
    code = context["code"]
    assert set(code) == {"commit", "dirty"}
    assert code["commit"] == "unknown" or (len(code["commit"]) == 40 and isinstance(code["dirty"], bool))
    assert code_commit(tmp_path) == {"commit": "unknown", "dirty": None}  # not a repository
    path = write_result({"a": 1, "when": datetime(2026, 1, 1)}, tmp_path / "deep" / "r.json")
    assert json.loads(path.read_text()) == {"a": 1, "when": "2026-01-01 00:00:00"}
