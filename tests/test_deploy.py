"""Deployment artefacts against real components: promtool, a real Prometheus server scraping a
running `lorad run`, and the Grafana dashboard type-checked against Grafana's published schema."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lorad.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI: the Makefile's setup must install it")
        pytest.skip(f"{tool} not installed (make setup installs Debian's prometheus package)")
    return path


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["target"]["expr"] for a in d["annotations"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\b((?:lorad|process)_[a-z0-9_]+)\b", e))
    return names


# ----------------------------------------------------------------------------- static checks


def test_dashboard_structure():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "lorad-main"
    assert d["templating"]["list"][0]["type"] == "datasource"
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Data inflow", "Drift", "Training", "Evaluation and promotion", "Serving"]
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    for e in dashboard_exprs():
        for fn in ("rate(", "increase("):
            if fn in e:
                assert "[$__rate_interval]" in e or "[2m]" in e, e
    names = {a["name"] for a in d["annotations"]["list"]}
    assert names == {"Promotions", "Rollbacks"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_matches_grafana_schema(tmp_path):
    """tsc --noEmit with the dashboard typed as @grafana/schema's Dashboard."""
    need("npm")
    check = ROOT / "tests" / "grafana"
    if not (check / "node_modules" / "@grafana" / "schema").is_dir():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=check, check=True, timeout=300)
    head = (check / "check.head.ts").read_text()
    (check / "check.gen.ts").write_text(head + " " + DASHBOARD.read_text() + ";\n")
    res = subprocess.run([str(check / "node_modules" / ".bin" / "tsc"), "--noEmit", "-p", str(check / "tsconfig.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # The check can fail: a panel with a misspelt key is refused.
    broken = json.loads(DASHBOARD.read_text())
    broken["panels"][1]["gridPos"] = {"h": 8, "w": 8, "x": 0, "y": "top"}
    (check / "check.gen.ts").write_text(head + " " + json.dumps(broken) + ";\n")
    res = subprocess.run([str(check / "node_modules" / ".bin" / "tsc"), "--noEmit", "-p", str(check / "tsconfig.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, "tsc accepted a dashboard with a string grid position"


def test_alert_rules_check_and_unit_tests():
    promtool = need("promtool")
    res = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text()))
    defined = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert defined == tested, f"alerts without a unit test: {defined - tested}"


def test_compose_and_systemd_are_wired_to_these_files():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"lorad", "prometheus", "grafana"} <= set(services)
    mounts = " ".join(v for s in services.values() for v in s.get("volumes", []) if isinstance(v, str))
    for needed in ("./prometheus/prometheus.yml", "./prometheus/alerts.yml", "./grafana/provisioning",
                   "./grafana/dashboards"):
        assert needed in mounts, needed
    unit = (DEPLOY / "lorad.service").read_text()
    stop = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))
    from daemon.config import ServeConfig

    assert stop > ServeConfig().drain_timeout_seconds + 30, "systemd must outwait the drain"
    assert "Restart=on-failure" in unit and "KillSignal=SIGTERM" in unit


# ----------------------------------------------------------------------------- real Prometheus


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on 127.0.0.1, scraping whatever `targets` the test writes, every second."""
    binary = need("prometheus")
    port = free_port()
    procs = []

    def start(targets: list[str]) -> str:
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(ALERTS)],
               "scrape_configs": [{"job_name": "lorad", "static_configs": [{"targets": targets}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/-/ready")
        return base

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


@pytest.mark.integration
def test_every_panel_query_is_valid_promql(prometheus):
    base = prometheus([])
    for e in dashboard_exprs():
        res = prom_query(base, e.replace("$__rate_interval", "1m"))
        assert res["status"] == "success", (e, res)
    res = prom_query(base, "rate(lorad_x[")  # the check can fail
    assert res["status"] == "error"


@pytest.mark.integration
def test_prometheus_scrapes_every_metric_dashboards_and_alerts_use(prometheus, tmp_path, tiny_llama_dir):
    port = free_port()
    state = tmp_path / "state"
    env = {**os.environ, "LORAD_MODEL__BASE_MODEL": str(tiny_llama_dir), "LORAD_METRICS__LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--state", str(state), "--inbox",
                             str(tmp_path / "inbox"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            exposition = r.read()
        promtool = need("promtool")
        lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

        base = prometheus([f"127.0.0.1:{port}"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = prom_query(base, 'up{job="lorad"}')["data"]["result"]
            if up and up[0]["value"][1] == "1":
                break
            time.sleep(0.5)
        else:
            raise AssertionError("Prometheus never scraped lorad")
        time.sleep(2.5)
        missing = []
        for name in sorted(metric_names(dashboard_exprs() + alert_exprs())):
            if not prom_query(base, f'{{__name__="{name}"}}')["data"]["result"]:
                missing.append(name)
        assert not missing, f"metrics used by dashboards/alerts but not exported: {missing}"
        rules = json.loads(urllib.request.urlopen(base + "/api/v1/rules", timeout=10).read())
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {"LoradDown", "LoradTimeToFirstTokenSLO"} <= loaded
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_docs_metrics_table_matches_the_catalogue():
    from monitors.metrics import catalogue_markdown

    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    start, end = "<!-- metrics-catalogue:start -->\n", "<!-- metrics-catalogue:end -->"
    assert doc[doc.index(start) + len(start):doc.index(end)].strip() == catalogue_markdown().strip(), \
        "regenerate docs/metrics.md's table with: make docs"
