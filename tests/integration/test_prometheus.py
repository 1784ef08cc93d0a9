"""The monitoring kit in contrib/ against the real thing: the alert rules through promtool
(check and unit tests), the Grafana dashboard and the rules naming only series a running
storaged exports (a real scrape), and Debian's Prometheus scraping a running storaged,
evaluating the rules on its series and answering queries over its HTTP API.

Metrics are read-only views (DESIGN invariant 1 is not in play); the scrub's 'last' record
(pool/scrub.py, ``last_completed``) is what the scrub metrics and the overdue alerts read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.daemonkit import Daemon, _free_port, _qemu_io

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
RULES = CONTRIB / "prometheus" / "storaged-alerts.yml"
RULE_TESTS = [CONTRIB / "prometheus" / "storaged-alerts.test.yml",
              CONTRIB / "prometheus" / "storaged-alerts-days.test.yml"]
DASHBOARD = CONTRIB / "grafana" / "storaged-dashboard.json"
# Series names in PromQL: ours, prometheus_client's process collector, Prometheus' own `up`.
NAME = re.compile(r"\b((?:storaged|process)_[a-z_]+)\b")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's prometheus package (make test does)"
    return path


def _scrape_names(daemon: Daemon) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                timeout=10) as resp:
        text = resp.read().decode()
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        # A family with no sample yet (iSCSI commands before any iSCSI traffic) is still
        # declared by its # TYPE line.
        names |= {f"{fam.name}{suffix}" for suffix in {
            "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "info": ("_info",)}.get(fam.type, ("",))}
    return names


def _busy_pool(daemon: Daemon, tmp_path: Path) -> None:
    """A pool with a volume that has seen reads, writes and a flush over NBD, and a scrub
    that ran to its end: every series the dashboard and the rules name has a sample."""
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "64M")
    daemon.ok("volume", "create", "tank/v", "--size", "8M")
    _qemu_io(daemon.url("tank/v"), "write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M")
    daemon.ok("pool", "scrub", "tank", "--wait")


def _rule_exprs() -> list[str]:
    # The rules file is YAML; every expr sits on one `expr:` line (kept so on purpose).
    return [line.split("expr:", 1)[1].strip() for line in RULES.read_text().splitlines()
            if line.strip().startswith("expr:")]


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dash["templating"]["list"]]


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0 and "SUCCESS: 10 rules found" in check.stdout, \
        check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", *map(str, RULE_TESTS)],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=RULES.parent)
    assert unit.returncode == 0 and unit.stdout.count("SUCCESS") == 2, \
        unit.stdout + unit.stderr
    # Every alert in the rules file is exercised by a unit test.
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tested = {n for f in RULE_TESTS for n in re.findall(r"alertname: (\w+)", f.read_text())}
    assert alerts == tested


def test_dashboard_and_rules_name_only_exported_metrics(daemon: Daemon,
                                                        tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    targets = [t for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert targets and all(t["expr"] and t["datasource"]["uid"] == "${DS_PROMETHEUS}"
                           for t in targets)
    _busy_pool(daemon, tmp_path)
    exported = _scrape_names(daemon)
    named = {n for e in _dashboard_exprs(dash) for n in NAME.findall(e)}
    assert named - exported == set(), "the dashboard names series storaged does not export"
    # It covers pools, volumes and latency.
    assert {"storaged_pool_size_bytes", "storaged_volume_written_bytes_total",
            "storaged_volume_request_duration_seconds_bucket"} <= named
    in_rules = {n for e in _rule_exprs() for n in NAME.findall(e)}
    assert len(in_rules) >= 6 and in_rules - exported == set()
    # Every dashboard query is valid PromQL: promtool parses it as a recording rule (with
    # Grafana's variables given values).
    rules = tmp_path / "dashboard-rules.yml"
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*")
             .replace("$pool", ".*").replace("$volume", ".*")
             for e in _dashboard_exprs(dash) if not e.startswith("label_values(")]
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    check = subprocess.run([_tool("promtool"), "check", "rules", str(rules)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture
def prometheus(daemon: Daemon, tmp_path: Path) -> Iterator[str]:
    """Debian's Prometheus on a loopback port, scraping the daemon every 250 ms with the
    alert rules loaded; yields its base URL."""
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": "250ms", "evaluation_interval": "250ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "storaged", "static_configs": [
            {"targets": [f"127.0.0.1:{daemon.metrics_port}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={cfg}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def _until(what: str, probe: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except OSError:                 # Prometheus not listening yet
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_real_prometheus_scrapes_storaged_and_evaluates_the_rules(
        daemon: Daemon, prometheus: str, tmp_path: Path) -> None:
    daemon.ok("pool", "create", "tank", str(tmp_path / "d0"), "--file-size", "64M")
    status = daemon.json("pool", "status", "tank")
    assert isinstance(status, dict)

    def query(q: str) -> list[dict[str, Any]]:
        return list(_api(prometheus, "query", query=q)["result"])
    size = _until("a scrape of storaged",
                  lambda: query('storaged_pool_size_bytes{job="storaged", pool="tank"}'))
    assert float(size[0]["value"][1]) == status["size_bytes"]
    assert float(query('up{job="storaged"}')[0]["value"][1]) == 1
    build = query("storaged_build_info")[0]["metric"]
    assert build["version"] and build["python"]
    assert float(query("process_resident_memory_bytes")[0]["value"][1]) > 1 << 20
    dev = query("storaged_device_state == 1")[0]["metric"]
    assert (dev["path"], dev["state"]) == (str(tmp_path / "d0"), "online")

    # The rules load and run on the daemon's series: the new pool has never been scrubbed
    # (pending: the alert waits 7 days), and a finished scrub clears it.
    groups = _until("the rules evaluated", lambda: [
        g for g in _api(prometheus, "rules")["groups"]
        if all(r["health"] == "ok" for r in g["rules"]) and g["lastEvaluation"][:4] != "0001"])
    assert len(groups[0]["rules"]) == 10

    def never_scrubbed() -> list[dict[str, Any]]:
        return [a for a in _api(prometheus, "alerts")["alerts"]
                if a["labels"]["alertname"] == "StoragedNeverScrubbed"]
    pending = _until("StoragedNeverScrubbed pending", never_scrubbed)
    assert pending[0]["state"] == "pending" and pending[0]["labels"]["pool"] == "tank"
    daemon.ok("pool", "scrub", "tank", "--wait")
    _until("the last scrub's end time scraped",
           lambda: query("storaged_pool_scrub_last_end_timestamp_seconds"))
    _until("StoragedNeverScrubbed cleared", lambda: not never_scrubbed())
    result = query("storaged_pool_scrub_last_result == 1")[0]["metric"]
    assert result["result"] == "clean"

    # The dashboard against the real thing: after I/O over NBD every panel's query is
    # answered with data (Grafana's variables given values), but the iSCSI command panels
    # (no iSCSI client here; their names are checked against the exposition above), and
    # every template variable lists a value.
    daemon.ok("volume", "create", "tank/v", "--size", "8M")
    _qemu_io(daemon.url("tank/v"), "write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M")
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
             .replace("$pool", ".*").replace("$volume", ".*")
             for p in dash["panels"] for t in p.get("targets", [])]
    idle = [e for e in exprs if "storaged_iscsi_commands_total" in e
            or "storaged_iscsi_check_conditions_total" in e]
    assert len(idle) == 2
    _until("the volume's reads scraped",
           lambda: query('storaged_volume_reads_total{volume="v"} > 0'))
    deadline = time.monotonic() + 10
    while empty := [e for e in exprs if e not in idle and not query(e)]:
        assert time.monotonic() < deadline, f"dashboard queries without data: {empty}"
        time.sleep(0.5)
    for e in idle:
        query(e)                        # still valid PromQL to Prometheus
    for var in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
        assert m, var["definition"]
        series = m.group(1).replace("$instance", ".*").replace("$pool", ".*")
        values = _api(prometheus, f"label/{m.group(2)}/values", **{"match[]": series})
        assert values, var["name"]
