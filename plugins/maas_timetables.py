"""A cron timetable that never runs a missed slot: unpausing a DAG waits for its next scheduled time.

With ``catchup=False``, Airflow's ``CronTriggerTimetable`` still runs the most recent slot that has
passed, so unpausing a weekly DAG on a Wednesday starts last Sunday's run at once. For a training
pipeline that is a surprise: ticking "Unpause on trigger" in the trigger form gives two runs (the manual
one and last week's) and two model versions. This timetable runs the most recent slot only if it passed
less than ``grace`` ago (a scheduler that was busy at the exact minute still runs it); otherwise the first
run is the next slot in the future. With ``catchup=True`` it behaves exactly like ``CronTriggerTimetable``.

Airflow loads custom timetables from plugins, so the scheduler, the API server and ``dag.test()`` can
rebuild it from the serialized DAG; this module registers it.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DagRunInfo
from airflow.timetables.trigger import CronTriggerTimetable

if TYPE_CHECKING:
    from airflow.timetables.base import DataInterval, TimeRestriction

DEFAULT_GRACE = datetime.timedelta(minutes=10)


class NextSlotCronTimetable(CronTriggerTimetable):
    """Runs on a cron schedule; with catchup off, a slot that passed more than ``grace`` ago is skipped.

    Args:
        cron: the cron expression (or preset such as ``@weekly``).
        timezone: the time zone the expression is read in.
        interval: the length of each run's data interval (ending at the slot).
        run_immediately: the grace: how late a slot may still start (default 10 minutes). It is the
            argument CronTriggerTimetable uses the same way for a DAG's very first run, so the parent's
            serialization round-trips this class unchanged.
    """

    def __init__(
        self,
        cron: str,
        *,
        timezone: Any = "UTC",
        interval: datetime.timedelta = datetime.timedelta(),
        run_immediately: bool | datetime.timedelta = DEFAULT_GRACE,
    ) -> None:
        super().__init__(cron, timezone=timezone, interval=interval, run_immediately=run_immediately)
        self.description = f"{self.description}; a missed run is skipped, never caught up"

    def next_dagrun_info(
        self, *, last_automated_data_interval: DataInterval | None, restriction: TimeRestriction
    ) -> DagRunInfo | None:
        if restriction.catchup:
            return super().next_dagrun_info(
                last_automated_data_interval=last_automated_data_interval, restriction=restriction
            )
        # The latest slot if it passed within the grace period, else the next one; never before the slot
        # after the last run, nor before the DAG's start date.
        candidates = [self._calc_first_run()]
        if last_automated_data_interval is not None:
            candidates.append(self._get_next(last_automated_data_interval.end))
        if restriction.earliest is not None:
            candidates.append(self._align_to_next(restriction.earliest))
        start = max(candidates)
        if restriction.latest is not None and restriction.latest < start:
            return None
        return DagRunInfo.interval(start - self._interval, start)


class MaasTimetablesPlugin(AirflowPlugin):
    """Registers MaaS's timetables so serialized DAGs that use them can be read back."""

    name = "maas_timetables"
    timetables = [NextSlotCronTimetable]
