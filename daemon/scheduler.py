"""Timed jobs: the periodic drift check and the monthly refresh (APScheduler 3.x, UTC by default).

Every job is ``max_instances=1, coalesce=True`` with a misfire grace time, so a slow job never
overlaps itself and downtime never causes a burst of runs. APScheduler's memory job store
forgets across restarts, so the monthly refresh also keeps its last fire time in the store:
at startup ``missed_fire_time`` finds a fire time lost while the daemon was down and, when it
is within the grace time, it runs once (all missed fire times coalesce into that one run).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

log = logging.getLogger("lorad.scheduler")


WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def weekdays_by_name(field: str) -> str:
    """A standard cron weekday field (0-7, 0 and 7 = Sunday) as the day names APScheduler reads.

    APScheduler 3 numbers days from Monday = 0, so a standard ``0 3 * * 0`` (Sundays) would fire on
    Mondays if its numbers were passed through; names mean the same to both. The field has passed
    ``daemon.config``'s cron check (numbers, *, ranges, lists, steps).
    """
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.split(","):
        span, _, step = item.partition("/")
        lo, hi = (0, 6) if span == "*" else (int(span.split("-")[0]), int(span.split("-")[-1]))
        days.update(d % 7 for d in range(lo, hi + 1, int(step or 1)))
    return ",".join(WEEKDAYS[d] for d in sorted(days))


def cron_trigger(expr: str, tz: str):
    from apscheduler.triggers.cron import CronTrigger

    minute, hour, day, month, weekday = expr.split()
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=weekdays_by_name(weekday),
                       timezone=tz)


def fire_times(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time of a cron expression in (start, end], computed without waiting."""
    trigger = cron_trigger(expr, tz)
    out, prev = [], None
    now = start + timedelta(microseconds=1)
    while True:
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None or nxt > end:
            return out
        out.append(nxt)
        prev, now = nxt, nxt + timedelta(microseconds=1)


def missed_fire_time(expr: str, tz: str, last_fired: datetime | None, now: datetime,
                     grace_seconds: float, installed: datetime | None = None) -> datetime | None:
    """The latest fire time missed since ``last_fired`` (or since ``installed``), if within the grace time.

    All earlier missed fire times coalesce into this one; a fire time older than the grace time is
    dropped (it was missed, and the next one comes on schedule).
    """
    since = last_fired or installed
    if since is None:
        return None
    missed = fire_times(expr, tz, since, now)
    if not missed:
        return None
    latest = missed[-1]
    return latest if (now - latest).total_seconds() <= grace_seconds else None


class Scheduler:
    """Owns the APScheduler instance; callbacks run in its thread pool, one instance of each at a time."""

    def __init__(self, *, timezone_name: str, drift_minutes: int, monthly_cron: str, misfire_grace_seconds: int,
                 on_drift_check: Callable[[], Any], on_monthly_refresh: Callable[[], Any]):
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        self._sched = BackgroundScheduler(timezone=timezone_name, job_defaults={
            "max_instances": 1, "coalesce": True, "misfire_grace_time": misfire_grace_seconds})
        self._sched.add_job(on_drift_check, IntervalTrigger(minutes=drift_minutes, timezone=timezone_name),
                            id="drift_check", name="periodic drift check")
        self._sched.add_job(on_monthly_refresh, cron_trigger(monthly_cron, timezone_name),
                            id="monthly_refresh", name="monthly refresh")

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=False)

    def jobs(self) -> list[dict]:
        """Next fire time of every job, for `lorad status`."""
        out = []
        for job in self._sched.get_jobs():
            nxt = getattr(job, "next_run_time", None)
            out.append({"id": job.id, "name": job.name, "next_run": nxt.isoformat() if nxt else None,
                        "max_instances": job.max_instances, "coalesce": job.coalesce,
                        "misfire_grace_time": job.misfire_grace_time})
        return out

    def job(self, job_id: str):
        return self._sched.get_job(job_id)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)
