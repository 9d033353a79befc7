"""Tests of the per-stage memory sampler: it sees a block's own peak, and the children's memory."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.memory import PeakMemory, rss_mb

MIB = 2**20


def test_peak_covers_memory_allocated_and_freed_inside_the_block():
    with PeakMemory(interval=0.005) as memory:
        block = bytearray(200 * MIB)  # zero-filled: every page touched
        time.sleep(0.05)
        del block
    summary = memory.summary()
    assert summary["delta_mb"] >= 150 and summary["peak_mb"] >= summary["start_mb"] + 150
    with PeakMemory() as idle:
        time.sleep(0.05)
    assert idle.delta_mb < 50  # a block that allocates nothing has no peak of its own


def test_children_count():
    before = rss_mb()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(150 * 2**20); "
                              "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert rss_mb() - before >= 140
    finally:
        child.kill()
        child.wait()


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        PeakMemory(interval=0)
