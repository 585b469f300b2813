"""Scheduler: the monthly refresh fires once a month and coalesces after downtime (fake clock)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from daemon.scheduler import Scheduler, fire_times, missed_fire_time

UTC = timezone.utc
CRON = "0 3 1 * *"


def test_monthly_refresh_fires_once_per_month_for_a_year():
    start = datetime(2026, 1, 15, tzinfo=UTC)
    times = fire_times(CRON, "UTC", start, start + timedelta(days=365))
    assert len(times) == 12
    assert all(t.day == 1 and t.hour == 3 and t.minute == 0 for t in times)
    assert len({(t.year, t.month) for t in times}) == 12


def test_fire_times_respect_the_time_zone():
    start = datetime(2026, 6, 15, tzinfo=UTC)
    (t,) = fire_times(CRON, "Europe/Berlin", start, start + timedelta(days=20))
    assert t.astimezone(UTC).hour == 1  # 03:00 CEST is 01:00 UTC


def test_downtime_coalesces_into_one_run_within_grace():
    last = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    # Down from mid-January to 30 minutes after the April fire time: February, March and April were missed.
    now = datetime(2026, 4, 1, 3, 30, tzinfo=UTC)
    assert len(fire_times(CRON, "UTC", last, now)) == 3
    assert missed_fire_time(CRON, "UTC", last, now, grace_seconds=3600) == datetime(2026, 4, 1, 3, 0, tzinfo=UTC)


def test_missed_run_beyond_grace_is_dropped_not_replayed():
    last = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    now = datetime(2026, 4, 10, tzinfo=UTC)
    assert missed_fire_time(CRON, "UTC", last, now, grace_seconds=3600) is None
    assert missed_fire_time(CRON, "UTC", last, now, grace_seconds=86400 * 30) == datetime(2026, 4, 1, 3, tzinfo=UTC)


def test_nothing_missed_when_up_to_date_or_never_installed():
    now = datetime(2026, 4, 1, 3, 30, tzinfo=UTC)
    assert missed_fire_time(CRON, "UTC", now - timedelta(minutes=20), now, grace_seconds=3600) is None
    assert missed_fire_time(CRON, "UTC", None, now, grace_seconds=3600) is None
    assert missed_fire_time(CRON, "UTC", None, now, grace_seconds=3600,
                            installed=datetime(2026, 3, 20, tzinfo=UTC)) == datetime(2026, 4, 1, 3, tzinfo=UTC)


def test_jobs_never_overlap_and_coalesce():
    calls = []
    s = Scheduler(timezone_name="UTC", drift_minutes=60, monthly_cron=CRON, misfire_grace_seconds=600,
                  on_drift_check=lambda: calls.append("drift"), on_monthly_refresh=lambda: calls.append("monthly"))
    s.start()
    try:
        jobs = {j["id"]: j for j in s.jobs()}
        assert set(jobs) == {"drift_check", "monthly_refresh"}
        for j in jobs.values():
            assert (j["max_instances"], j["coalesce"], j["misfire_grace_time"]) == (1, True, 600)
        nxt = datetime.fromisoformat(jobs["monthly_refresh"]["next_run"])
        assert nxt.day == 1 and nxt.hour == 3
    finally:
        s.shutdown()
    assert calls == []


@pytest.mark.parametrize("field, names", [
    ("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"), ("*/2", "sun,tue,thu,sat"),
    ("5-7", "sun,fri,sat"), ("1,3/1", "mon,wed"),
])
def test_cron_weekdays_are_standard_numbers_read_as_names(field, names):
    from daemon.scheduler import weekdays_by_name

    assert weekdays_by_name(field) == names


def test_a_sunday_cron_fires_on_sundays_and_seven_is_sunday_too():
    from daemon.scheduler import fire_times

    start = datetime(2026, 12, 1, tzinfo=timezone.utc)   # a Tuesday
    for expr in ("0 3 * * 0", "0 3 * * 7"):
        (first, *_) = fire_times(expr, "UTC", start, start + timedelta(days=8))
        assert first.strftime("%a %H:%M") == "Sun 03:00", expr
