"""The daemon's side of pools on Ceph RADOS (issue 24), at its edges and without a
cluster: the ``[[rados_pool]]`` config tables, storagectl's ``--rados`` options, the
control API's refusals, pools.json entries, and the RADOS metrics through the real
Prometheus's promtool. Every refusal is checked to change nothing (DESIGN invariant 9;
storaged.registry R1-R3). The end-to-end tests against a real cluster are in
tests/rados/test_daemon_*.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pool.errors import InvalidArgument, StorageError
from pool.rados.conn import BUCKETS, OpLatency, RadosStatistics
from pool.rados.target import RadosTarget
from storaged import config
from storaged.api import ControlAPI
from storaged.ctl import cli
from storaged.ctl.client import ControlError
from storaged.metrics import rados_metrics
from storaged.registry import Registry


# ---- config: [[rados_pool]] --------------------------------------------------------------
def _load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "storaged.toml"
    path.write_text(text)
    return config.load(str(path))


def test_config_declares_rados_pools_to_import(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
[[rados_pool]]
name = "rp"
rados_pool = "sd"

[[rados_pool]]
name = "rp2"
rados_pool = "other"
ceph_conf = "/etc/ceph/c2.conf"
ceph_id = "client.storaged"
""")
    assert cfg.rados_pools == (
        config.RadosPoolConfig("rp", RadosTarget("sd", None, "admin")),
        config.RadosPoolConfig("rp2", RadosTarget("other", "/etc/ceph/c2.conf", "storaged")))
    assert config.load(None).rados_pools == ()


@pytest.mark.parametrize(("text", "said"), [
    ('[[rados_pool]]\nname = "rp"\nrados_pool = "sd"\ncephconf = "x"\n',
     "rados_pool[0]: unknown key 'cephconf'"),
    ('[[rados_pool]]\nname = "rp"\nrados_pool = 3\n',
     "rados_pool[0].rados_pool must be a non-empty string"),
    ('[[rados_pool]]\nname = "rp"\nrados_pool = "sd"\nceph_id = ""\n',
     "rados_pool[0].ceph_id must be a non-empty string"),
    ('[[rados_pool]]\nrados_pool = "sd"\n', "rados_pool[0]: missing key 'name'"),
    ('[[rados_pool]]\nname = "rp"\n', "rados_pool[0]: missing key 'rados_pool'"),
    ('[[rados_pool]]\nname = "no/slash"\nrados_pool = "sd"\n',
     "rados_pool[0]: invalid pool name 'no/slash'"),
    ('[[rados_pool]]\nname = "rp"\nrados_pool = "sd"\nceph_id = ".x"\n',
     "rados_pool[0]: bad Ceph client id '.x'"),
    ('[[rados_pool]]\nname = "rp"\nrados_pool = "sd"\n'
     '[[rados_pool]]\nname = "rp"\nrados_pool = "sd2"\n',
     "rados_pool[1]: pool 'rp' is declared twice"),
    ('rados_pool = "sd"\n', "rados_pool must be an array of tables"),
])
def test_config_refuses_a_bad_rados_pool_table_naming_the_key(tmp_path: Path, text: str,
                                                              said: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        _load(tmp_path, text)
    assert said in e.value.message and "\n" not in e.value.message


# ---- storagectl ----------------------------------------------------------------------------
def _request(*argv: str) -> tuple[str, dict[str, Any]]:
    method, params, _render = cli.request(cli.parse(cli.build_parser(), list(argv)))
    return method, params


def test_cli_create_and_import_on_rados(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.chdir(tmp_path)
    assert _request("pool", "create", "rp", "--rados", "sd") == (
        "pool.create", {"name": "rp", "profile": "plain", "extent_size": "16M",
                        "rados": {"pool": "sd"}})
    # A relative ceph.conf is the caller's, as device paths are.
    assert _request("pool", "create", "rp", "--rados", "sd", "--ceph-conf", "c.conf",
                    "--ceph-id", "storaged", "--profile", "ec:4+2")[1]["rados"] == {
        "pool": "sd", "conf": str(tmp_path / "c.conf"), "client": "storaged"}
    assert _request("pool", "import", "rp", "--rados", "sd", "--takeover") == (
        "pool.import", {"name": "rp", "takeover": True, "rados": {"pool": "sd"}})
    assert _request("pool", "import", "rp", "--rados", "sd")[1]["takeover"] is False
    # Pools on devices as before, options anywhere among the devices, order kept.
    assert _request("pool", "create", "t", "d0")[1]["devices"] == [str(tmp_path / "d0")]
    for argv in (("t", "--profile", "mirror:2", "m0", "m1"), ("t", "m0", "--profile",
                                                              "mirror:2", "m1"),
                 ("t", "m0", "m1", "--profile", "mirror:2")):
        params = _request("pool", "create", *argv)[1]
        assert params["devices"] == [str(tmp_path / "m0"), str(tmp_path / "m1")]
        assert params["profile"] == "mirror:2"
    assert "rados" not in _request("pool", "import", "t")[1]
    # destroy: --rados finishes an interrupted destroy of a pool not imported here.
    assert _request("pool", "destroy", "rp") == ("pool.destroy", {"name": "rp"})
    assert _request("pool", "destroy", "rp", "--rados", "sd", "--ceph-id", "x") == (
        "pool.destroy", {"name": "rp", "rados": {"pool": "sd", "client": "x"}})


@pytest.mark.parametrize(("argv", "said"), [
    (("pool", "create", "rp", "d0", "--rados", "sd"), "DEVICEs and --rados exclude"),
    (("pool", "import", "rp", "--device", "d0", "--rados", "sd"),
     "--device and --rados exclude"),
    (("pool", "import", "rp", "--takeover"), "--takeover only go with --rados"),
    (("pool", "create", "rp", "d0", "--ceph-id", "x"), "--ceph-id only go with --rados"),
    (("pool", "create", "rp", "--rados", "sd", "--file-size", "1G"),
     "--file-size does not go with --rados"),
    (("pool", "import", "rp", "--rados", "sd", "--force"), "--takeover takes a pool"),
    (("pool", "import", "--rados", "sd"), "needs the pool's NAME"),
    (("pool", "create", "rp"), "needs at least one DEVICE, or --rados"),
    (("pool", "destroy", "rp", "--ceph-conf", "c"), "--ceph-conf only go with --rados"),
])
def test_cli_refuses_mixed_options_before_asking_the_daemon(argv: tuple[str, ...],
                                                            said: str) -> None:
    with pytest.raises(ControlError) as e:
        _request(*argv)
    assert said in e.value.message


def test_cli_still_refuses_unknown_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["pool", "create", "t", "d0", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pool", "status", "t", "extra"])
    assert "unrecognized arguments: extra" in capsys.readouterr().err


def test_cli_exits_1_with_one_line_and_no_daemon_needed(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    rc = cli.main(["--socket", str(tmp_path / "none.sock"), "pool", "create", "rp", "d0",
                   "--rados", "sd"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "exclude each other" in err


def test_shell_completion_knows_the_rados_options() -> None:
    from storaged.ctl.completion import script  # noqa: PLC0415 - shtab, as storagectl does
    bash = script(cli.build_parser(), "bash")
    for option in ("--rados", "--ceph-conf", "--ceph-id", "--takeover"):
        assert option in bash
    # --ceph-conf completes file names; --rados (a RADOS pool's name) does not.
    zsh = script(cli.build_parser(), "zsh")
    conf = [line for line in zsh.splitlines() if "--ceph-conf" in line]
    rados = [line for line in zsh.splitlines() if '"--rados[' in line]
    assert conf and all("_files" in line for line in conf)
    assert rados and not any("_files" in line for line in rados)


def test_pool_status_text_shows_the_rados_backend_and_a_fenced_pool() -> None:
    status: dict[str, Any] = {
        "name": "rp", "state": "failed", "profile": "plain", "usable_size_bytes": 1 << 30,
        "avail_bytes": 1 << 29, "used_bytes": 0, "size_bytes": 1 << 30, "volumes": 1,
        "overcommit_ratio": 0.5, "free_bytes": 1 << 29, "backend": "rados",
        "failed": "fenced: client.4123 was blocklisted by a takeover",
        "rados": {"pool": "sd", "client": "admin", "conf": "/etc/ceph/ceph.conf",
                  "fsid": "f-s-i-d", "health": "HEALTH_OK", "lock_holder": "host a, pid 7",
                  "fenced": "client.4123 was blocklisted"},
        "devices": [], "left_out": {}, "counters": {
            "records_read": 0, "records_written": 0, "degraded_reads": 0,
            "repaired_fragments": 0, "unreadable_records": 0}}
    text = cli.show_pool_status(status)
    assert "rp    failed" in text.splitlines()[1]
    assert "failed: fenced: client.4123 was blocklisted by a takeover" in text
    assert "backend: rados pool sd as client.admin (/etc/ceph/ceph.conf)" in text
    assert "cluster: fsid f-s-i-d, health HEALTH_OK" in text
    assert "owner: host a, pid 7" in text and "fenced: client.4123" in text
    assert "DEV" not in text          # no device table for a pool without devices


# ---- the control API's edge ----------------------------------------------------------------
async def _nothing(_p: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(("method", "params", "said"), [
    ("pool.create", {"name": "rp", "devices": ["/tmp/x"], "rados": {"pool": "sd"}},
     "devices and a RADOS pool exclude each other"),
    ("pool.create", {"name": "rp", "rados": {"pool": "sd"}, "force": True},
     "parameter 'force' does not go with a RADOS pool"),
    ("pool.create", {"name": "rp", "rados": {"pool": "sd"}, "file_size": "1G"},
     "parameter 'file_size' does not go with a RADOS pool"),
    ("pool.create", {"name": "rp", "rados": "sd"}, "parameter 'rados' must be"),
    ("pool.create", {"name": "rp", "rados": {"pool": "sd", "keyring": "k"}},
     "parameter 'rados' must be"),
    ("pool.create", {"name": "rp", "rados": {"pool": ""}},
     "parameter 'pool' must be a non-empty string"),
    ("pool.create", {"name": "rp", "rados": {"pool": "sd", "client": ".bad"}},
     "bad Ceph client id"),
    ("pool.import", {"name": "rp", "rados": {"pool": "sd"}, "force": True},
     "parameter 'force' does not go with a RADOS pool"),
    ("pool.import", {"rados": {"pool": "sd"}}, "needs the pool's name"),
    ("pool.import", {"name": "rp", "takeover": True}, "takeover goes with a RADOS pool"),
    ("pool.destroy", {"name": "rp", "rados": {"pool": "sd", "keyring": "k"}},
     "parameter 'rados' must be"),
    ("pool.import", {"name": "rp", "rados": {"pool": "sd"}, "takeover": "yes"},
     "parameter 'takeover' must be true or false"),
])
async def test_api_refuses_bad_rados_requests_changing_nothing(
        tmp_path: Path, method: str, params: dict[str, Any], said: str) -> None:
    registry = Registry(str(tmp_path / "state"))
    api = ControlAPI(registry, None, None)
    with pytest.raises(InvalidArgument) as e:
        await api.call(method, params, _nothing)
    assert said in e.value.message
    assert registry.pools == {} and registry.failed == {}        # R3
    assert not (tmp_path / "state" / "pools.json").exists()


# ---- pools.json -----------------------------------------------------------------------------
async def test_a_damaged_rados_entry_fails_alone_and_stays_remembered(tmp_path: Path
                                                                      ) -> None:
    """R1/R3: a pools.json RADOS entry without a valid target is reported like any failed
    import (named, with the reason) and kept for the next start; the file is otherwise
    unchanged."""
    state = tmp_path / "state"
    state.mkdir()
    cache = {"pools": [{"name": "rp", "uuid": "u1", "backend": "rados",
                        "rados": {"pool": "", "conf": None, "client": "admin"}},
                       {"name": "rq", "uuid": "u2", "backend": "rados"}]}
    (state / "pools.json").write_text(json.dumps(cache))
    registry = Registry(str(state))
    await registry.load()
    assert registry.pools == {}
    assert "bad RADOS pool name ''" in registry.failed["rp"]
    assert "no valid RADOS target" in registry.failed["rq"]
    assert json.loads((state / "pools.json").read_text()) == cache
    # `pool import rq` (no devices) retries the remembered RADOS target, not a device scan.
    with pytest.raises(StorageError, match="no valid RADOS target"):
        await registry.import_pool("rq", [])
    assert registry.pools == {} and json.loads((state / "pools.json").read_text()) == cache


def test_rados_target_json_round_trip() -> None:
    for t in (RadosTarget("sd"), RadosTarget("p", "/etc/ceph/x.conf", "storaged")):
        assert RadosTarget.from_json(json.loads(json.dumps(t.to_json()))) == t


# ---- metrics ---------------------------------------------------------------------------------
def _latency(count: int, failed: int, fast: int) -> OpLatency:
    """``count`` calls, ``fast`` of them within 1 ms, the rest within 0.1 s."""
    cumulative = tuple(fast if bound < 0.1 and bound >= 0.001 else
                       (0 if bound < 0.001 else count) for bound in BUCKETS)
    return OpLatency(count, failed, 0.0005 * fast + 0.08 * (count - fast), cumulative)


class _Fixed(Collector):
    def __init__(self, stats: list[tuple[str, RadosStatistics]]) -> None:
        self.stats = stats

    def collect(self) -> Any:
        return rados_metrics(self.stats)


def test_rados_metrics_are_valid_prometheus_histograms(tmp_path: Path) -> None:
    stats = [("rp", RadosStatistics("sd", "fsid-1", {
        "read": _latency(10, 0, 7), "write": _latency(4, 1, 0),
        "lock": _latency(2, 0, 2), "command": _latency(0, 0, 0)}, None)),
             ("rq", RadosStatistics("sd", "fsid-1", {"write": _latency(3, 3, 3)},
                                    "client.12 was blocklisted"))]
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed(stats))
    text = generate_latest(reg).decode()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]
    assert value("storaged_rados_op_seconds_count", pool="rp", kind="read") == 10
    assert value("storaged_rados_op_seconds_bucket", pool="rp", kind="read", le="0.001") == 7
    assert value("storaged_rados_op_seconds_bucket", pool="rp", kind="read", le="+Inf") == 10
    assert value("storaged_rados_op_seconds_sum", pool="rp", kind="write") == \
        pytest.approx(0.32)
    assert value("storaged_rados_op_failures_total", pool="rp", kind="write") == 1
    assert value("storaged_rados_op_failures_total", pool="rq", kind="write") == 3
    assert value("storaged_rados_fenced", pool="rp") == 0
    assert value("storaged_rados_fenced", pool="rq") == 1
