"""The checks a config field can carry, and the parsers of the values that need one (endpoints, maps)."""

from __future__ import annotations

import os
import re
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """Raised with every problem found in a config; ``problems`` holds one line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


def _f(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, lt: float | None = None,
       check: typing.Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field carrying its doc and its checks (range, choices, custom)."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _check_keys(value: list[str]) -> str | None:
    short = sum(1 for k in value if len(k) < 16)
    return f"{short} of the keys are shorter than 16 characters; use long random keys" if short else None


def _check_regex(value: list[str]) -> str | None:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            return f"invalid regular expression {pattern!r}: {e}"
    return None


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


_CRON_NAMES = ["minute", "hour", "day of month", "month", "day of week"]


def _check_cron(value: str) -> str | None:
    """Validate a standard 5-field cron expression (numbers, *, ranges, lists, steps)."""
    parts = value.split()
    if len(parts) != 5:
        return f"cron expression needs 5 fields (minute hour day month weekday), got {len(parts)}"
    for part, (lo, hi), name in zip(parts, _CRON_RANGES, _CRON_NAMES):
        for item in part.split(","):
            m = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", item)
            if not m:
                return f"cron {name} field {part!r} is not *, N, N-M, */S or a list of those"
            if m.group(2) is not None and int(m.group(2)) == 0:
                return f"cron {name} step must be > 0 in {part!r}"
            if m.group(1) != "*":
                for n in (int(x) for x in m.group(1).split("-")):
                    if not lo <= n <= hi:
                        return f"cron {name} value {n} out of range {lo}-{hi}"
    return None


def _check_timezone(value: str) -> str | None:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(value)
    except Exception:
        return f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')"
    return None


def _check_lora_targets(value: str) -> str | None:
    if value in ("all-linear", "attention"):
        return None
    names = [n.strip() for n in value.split(",")]
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n) for n in names):
        return "must be 'all-linear', 'attention' or a comma-separated list of module names"
    return None


def parse_category_weights(items: typing.Sequence[str]) -> dict[str, float]:
    """``["contract=2", "chat=0.5"]`` -> {"contract": 2.0, "chat": 0.5}; raises ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = str(item).rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not weight >= 0 or weight == float("inf"):
            raise ValueError(f"category weight {item!r} must look like 'category=weight' with a weight >= 0")
        if name.strip() in out:
            raise ValueError(f"category {name.strip()!r} is weighted twice")
        out[name.strip()] = weight
    return out


SCORE_KINDS = ("choice", "label", "extraction", "free")   # pipelines/scoring.py's KINDS


PRIMARY_METRICS = ("loss", "accuracy", "f1", "rouge_l")


def parse_category_map(items: typing.Sequence[str], allowed: typing.Sequence[str]) -> dict[str, str]:
    """``["contract=f1"]`` -> {"contract": "f1"}; raises ValueError naming the bad item and what is allowed."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = str(item).rpartition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or value not in allowed:
            raise ValueError(f"{item!r} must look like 'category=value' with a value in {', '.join(allowed)}")
        if name in out:
            raise ValueError(f"category {name!r} is given twice")
        out[name] = value
    return out


def _check_map(allowed: typing.Sequence[str]) -> typing.Callable[[list[str]], str | None]:
    def check(value: list[str]) -> str | None:
        try:
            parse_category_map(value, allowed)
        except ValueError as e:
            return str(e)
        return None
    return check


def _check_category_weights(value: list[str]) -> str | None:
    try:
        parse_category_weights(value)
    except ValueError as e:
        return str(e)
    return None


def parse_endpoint(value: str) -> tuple[str, int]:
    """``"node0.example:29400"`` / ``"[fd00::1]:29400"`` -> (host, port); raises ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port in 1-65535 (e.g. 'node0.example:29400'); got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", host):
        raise ValueError(f"host {host!r} must be a host name or an IP address")
    return host, int(port)


def _check_endpoint(value: str) -> str | None:
    if value == "":
        return None
    try:
        parse_endpoint(value)
    except ValueError as e:
        return str(e)
    return None


def _check_rdzv_id(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", value):
        return None
    return f"must be 1-128 letters, digits, '_', '.' or '-' (or empty = the run's id); got {value!r}"


def _base_url(value: str) -> str | None:
    """Why ``value`` is not an http(s) base URL (scheme and host, no query or fragment), or None."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(value)
        u.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        return f"{value!r} is not a URL: {e}"
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment or u.username or u.password:
        return f"{value!r} must be an http:// or https:// base URL such as 'http://10.0.0.7:8000' (no query, " \
               f"fragment or credentials)"
    if value.endswith("/"):
        return f"{value!r} must not end with '/'"
    return None


def _check_urls(value: list[str]) -> str | None:
    for url in value:
        if (err := _base_url(url)) is not None:
            return err
    if len(set(value)) != len(value):
        return "a replica is listed twice"
    return None


def _check_url_or_empty(value: str) -> str | None:
    return _base_url(value) if value else None


def _check_abs_dirs(value: list[str]) -> str | None:
    bad = [p for p in value if not os.path.isabs(p)]
    return f"must be absolute folders, got {bad}" if bad else None
