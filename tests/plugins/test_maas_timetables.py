"""The training schedule: a missed slot is skipped, not caught up, and the timetable survives serialization."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from airflow.timetables.base import DataInterval, TimeRestriction

from maas_timetables import NextSlotCronTimetable

SUNDAY = datetime(2026, 11, 22, tzinfo=timezone.utc)  # a Sunday, 00:00 UTC
NO_CATCHUP = TimeRestriction(earliest=datetime(2026, 1, 1, tzinfo=timezone.utc), latest=None, catchup=False)


@pytest.fixture
def now(monkeypatch):
    """Set the clock the timetable reads."""

    def set_now(moment: datetime) -> None:
        monkeypatch.setattr("airflow.timetables.trigger.utcnow", lambda: moment)

    return set_now


def next_start(timetable, last=None, restriction=NO_CATCHUP):
    info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
    return info.run_after if info else None


def test_unpausing_days_after_a_slot_waits_for_the_next_one(now):
    now(SUNDAY + timedelta(days=2))
    weekly = NextSlotCronTimetable("@weekly")
    assert next_start(weekly) == SUNDAY + timedelta(weeks=1)
    # Even with runs in the past: last week's run does not make this week's missed slot due.
    last = DataInterval(SUNDAY - timedelta(weeks=1), SUNDAY - timedelta(weeks=1))
    assert next_start(weekly, last) == SUNDAY + timedelta(weeks=1)


def test_a_slot_that_passed_within_the_grace_still_runs(now):
    now(SUNDAY + timedelta(minutes=3))  # e.g. the scheduler was busy at 00:00
    weekly = NextSlotCronTimetable("@weekly")
    last = DataInterval(SUNDAY - timedelta(weeks=1), SUNDAY - timedelta(weeks=1))
    assert next_start(weekly, last) == SUNDAY


def test_after_a_run_the_next_slot_follows(now):
    now(SUNDAY + timedelta(seconds=5))
    weekly = NextSlotCronTimetable("@weekly")
    assert next_start(weekly, DataInterval(SUNDAY, SUNDAY)) == SUNDAY + timedelta(weeks=1)


def test_catchup_behaves_like_the_cron_trigger_timetable(now):
    from airflow.timetables.trigger import CronTriggerTimetable

    now(SUNDAY + timedelta(days=2))
    restriction = TimeRestriction(earliest=SUNDAY - timedelta(weeks=3), latest=None, catchup=True)
    ours, theirs = NextSlotCronTimetable("@weekly"), CronTriggerTimetable("@weekly", timezone="UTC")
    assert next_start(ours, restriction=restriction) == next_start(theirs, restriction=restriction)


def test_serialization_round_trip_through_the_registered_plugin():
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    timetable = NextSlotCronTimetable("0 3 * * 1", timezone="UTC", run_immediately=timedelta(minutes=30))
    restored = decode_timetable(encode_timetable(timetable))
    # Airflow's plugin manager loads plugins/ files as modules of their own, so compare by import path.
    assert f"{type(restored).__module__}.{type(restored).__qualname__}" == "maas_timetables.NextSlotCronTimetable"
    assert restored.serialize() == timetable.serialize()
    assert "missed run is skipped" in restored.description
