"""An operator's wrong commands, run against the real daemon, change nothing (DESIGN
invariant 9: bad input gets a clear error and changes nothing; invariant 10 for members of
a live pool; volumes/openers 3).

One table: each row is a storagectl (or storaged) command line that must be refused with
one line on stderr and a non-zero exit code. After each row:
- STRICT rows: the members are byte-identical (the owner heartbeat block masked), and so
  are `pool status`, `volume list` and `snapshot list` (JSON, counters included), and no
  file appeared or vanished in the test's directory (a refused create, add-device,
  add-spare or send leaves none behind, and never truncates an existing one);
- UNDONE rows (a stream or an image is only found bad while it is being written, as with
  `zfs receive`): what they wrote is undone, so the JSON state is identical but for the
  commit counters and txg, and no file appeared.
At the end the pool's deep check is clean and the volume reads back byte-exact.
"""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storaged.ctl.client import call
from tests.kit.daemonkit import BIN, Daemon, _qemu_io, member_digests

KiB = 1024

# (argv after `storagectl`, words the error must contain); TMP is the test directory, BAD
# the name "bad name".
STRICT: list[tuple[str, str]] = [
    # volume names, sizes, block sizes, profiles
    ("volume create tank/BAD --size 1M", "invalid volume name"),
    ("volume create tank/x/y --size 1M", "invalid volume name"),
    ("volume create tank --size 1M", "is not POOL/VOLUME"),
    ("volume create tank/x --size 0", "positive multiple of 512"),
    ("volume create tank/x --size lots", "not a size"),
    ("volume create tank/x --size 1M --block-size 3K", "block size"),
    ("volume create tank/x --size 1024T --block-size 4K", "can be at most"),
    ("volume create tank/x --size 1M --profile mirror:1", "mirror:N needs"),
    ("volume create tank/x --size 1M --profile ec:5+1", "needs 6 devices"),
    ("volume create tank/x --size 1M --profile bogus", "unknown redundancy profile"),
    ("volume create tank/v --size 1M", "already exists"),
    ("volume create nope/x --size 1M", "no pool named 'nope'"),
    ("volume rename tank/v BAD", "invalid volume name"),
    ("volume rename tank/v w", "already exists"),
    ("volume rename tank/missing z", "no volume 'missing'"),
    ("volume rename tank/v other/z", "another pool"),
    ("volume resize tank/missing --size 1M", "no volume 'missing'"),
    ("volume resize tank/w --size 1000", "positive multiple of 512"),
    ("volume resize tank/w --size 1M", "--allow-shrink"),
    ("volume resize tank/w --size=-1M", "--allow-shrink"),
    ("volume delete tank/missing", "no volume 'missing'"),
    ("volume delete tank/v", "snapshot(s)"),
    ("volume delete tank/v -r", "has clones"),
    # snapshots and clones of what is not there
    ("snapshot create tank/missing@s", "no volume 'missing'"),
    ("snapshot create tank/v@s", "already has a snapshot"),
    ("snapshot create tank/v@BAD", "invalid"),
    ("snapshot create tank/v", "POOL/VOLUME@SNAPSHOT"),
    ("snapshot delete tank/v@missing", "no snapshot 'missing'"),
    ("snapshot delete tank/v@s", "has clones"),
    ("snapshot rollback tank/v@missing", "no snapshot 'missing'"),
    ("snapshot clone tank/v@missing tank/n", "no snapshot 'missing'"),
    ("snapshot clone tank/v@s tank/w", "already exists"),
    ("snapshot clone tank/v@s tank/BAD", "invalid volume name"),
    ("snapshot clone tank/v@s other/n", "lives in its snapshot's pool"),
    ("snapshot diff tank/v@missing", "no snapshot 'missing'"),
    ("volume send tank/v@missing -o TMP/out.stream", "no snapshot 'missing'"),
    ("volume send tank/v@s --from @missing -o TMP/out.stream", "no snapshot 'missing'"),
    ("volume send tank/v@missing -o TMP/old.stream", "no snapshot 'missing'"),
    ("volume receive tank/r -i TMP/garbage.stream", "bad magic"),
    ("volume receive tank/v -i TMP/full.stream", "already exists"),
    ("volume receive tank/r -i TMP/full.stream --profile ec:5+1", "needs 6 devices"),
    ("volume receive tank/r --resume -i TMP/full.stream", "no interrupted receive"),
    ("volume import tank/x TMP/damaged.qcow2", "--format raw"),
    ("volume import tank/v TMP/full.stream --format raw", "already exists"),
    ("volume export tank/v@missing TMP/out.raw", "no export"),
    ("volume export tank/v TMP/old.stream", "exists"),
    # devices: too small, a directory, missing, a member, a second path to a member
    ("pool add-device tank TMP/tiny.img", "too small"),
    ("pool add-device tank TMP/new.img --file-size 1M", "too small"),
    ("pool add-device tank TMP/disk0", "same device as member 0"),
    ("pool add-device tank TMP/link0", "same device as member 0"),
    ("pool add-device tank TMP/adir", "Is a directory"),
    ("pool add-device tank TMP/nofile", "no such device or file"),
    ("pool add-device tank TMP/nodir/x.img --file-size 64M", "No such file"),
    ("pool add-spare tank TMP/new.img --file-size 1M", "too small"),
    ("pool add-spare tank TMP/disk1", "same device as member 1"),
    ("pool replace-device tank 7 TMP/new.img --file-size 64M", "no member '7'"),
    ("pool replace-device tank 0 TMP/new.img --file-size 1M", "too small"),
    ("pool remove-device tank 0", "needs 3"),
    ("pool online tank 0 --path TMP/tiny.img", "is online"),
    ("pool online tank 0 --path TMP/disk1", "same device as member 1"),
    ("pool create tank2 TMP/disk0 --force", "same device as member 0"),
    ("pool create tank2 TMP/p0.img TMP/disk2 --file-size 64M", "same device as member 2"),
    ("pool create tank2 TMP/p0.img TMP/adir --file-size 64M", "Is a directory"),
    ("pool create tank2 TMP/p0.img TMP/p0.img --file-size 64M", "listed twice"),
    ("pool create BAD TMP/p0.img --file-size 64M", "invalid pool name"),
    ("pool create tank2 TMP/p0.img --file-size 64M --profile ec:5+1", "needs 6 devices"),
    ("pool create tank2 TMP/p0.img --file-size 64M --extent-size 3M", "extent size"),
    ("pool create tank2 TMP/p0.img --file-size 1M", "too small"),
    ("pool create tank TMP/p0.img --file-size 64M", "already exists"),
    ("pool import tank --device TMP/disk0", "already imported"),
    ("pool export nope", "no pool named 'nope'"),
    ("pool destroy tank", "still has volumes"),
    ("pool scrub tank --pause", "no scrub"),
    ("pool clean tank --threshold 7", "threshold"),
    ("export iscsi tank/missing --open", "no volume 'missing'"),
    ("export iscsi tank/v@s --open", "is not POOL/VOLUME"),
    ("export iscsi tank/v --allow-initiator bogus", "not an iSCSI initiator name"),
    ("export iscsi tank/v --chap-user x --chap-secret-file TMP/nofile", "secret file"),
]

UNDONE: list[tuple[str, str]] = [
    ("volume receive tank/r -i TMP/truncated.stream", "truncated"),
    ("volume receive tank/r -i TMP/flipped.stream", "checksum mismatch"),
    ("volume import tank/x TMP/damaged.qcow2 --format qcow2", "qemu-img"),
]


@pytest.fixture
def setup(daemon: Daemon, tmp_path: Path) -> Iterator[Daemon]:
    d = daemon
    disks = [tmp_path / f"disk{i}" for i in range(3)]
    d.ok("pool", "create", "tank", *map(str, disks), "--profile", "ec:2+1",
         "--extent-size", "4M", "--file-size", "64M")
    d.ok("volume", "create", "tank/v", "--size", "16M")
    d.ok("volume", "create", "tank/w", "--size", "8M")
    _qemu_io(d.url("tank/v"), "write -P 0x3c 0 4M", "flush")
    d.ok("snapshot", "create", "tank/v@s")
    d.ok("snapshot", "clone", "tank/v@s", "tank/c")
    d.ok("volume", "send", "tank/v@s", "-o", str(tmp_path / "full.stream"))
    raw = (tmp_path / "full.stream").read_bytes()
    (tmp_path / "truncated.stream").write_bytes(raw[:len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tmp_path / "flipped.stream").write_bytes(bytes(flipped))
    (tmp_path / "garbage.stream").write_bytes(b"garbage" * 1000)
    (tmp_path / "old.stream").write_bytes(b"an older backup")
    (tmp_path / "damaged.qcow2").write_bytes(b"QFI\xfb" + bytes(4 * KiB - 4))
    (tmp_path / "tiny.img").write_bytes(bytes(64 * KiB))
    (tmp_path / "adir").mkdir()
    (tmp_path / "link0").symlink_to(disks[0])
    yield d


def _state(d: Daemon, tmp_path: Path, *, strict: bool) -> dict[str, Any]:
    status = call(d.sock, "pool.status", {"name": "tank"})
    if not strict:
        status = copy.deepcopy(status)
        status.pop("txg", None)
        status.pop("counters", None)
    return {"members": member_digests(sorted(tmp_path.glob("disk*"))) if strict else None,
            "status": status, "volumes": call(d.sock, "volume.list", {}),
            "snapshots": call(d.sock, "snapshot.list", {}),
            "files": {p.name: p.stat().st_size for p in tmp_path.iterdir()
                      if p.name not in ("daemon.log", "state", "ctl.sock")}}


def _refused(d: Daemon, tmp_path: Path, line: str, word: str, strict: bool) -> str | None:
    """None if ``line`` was refused in one line and changed nothing, else what went
    wrong."""
    argv = [a.replace("TMP", str(tmp_path)).replace("BAD", "bad name")
            for a in line.split(" ")]
    before = _state(d, tmp_path, strict=strict)
    r = d.ctl(*argv)
    after = _state(d, tmp_path, strict=strict)
    lines = r.stderr.strip().splitlines()
    if r.returncode == 0:
        return f"accepted: {r.stdout.strip()[:200]}"
    if len(lines) != 1 or not lines[0].startswith("storagectl: ") or word not in lines[0]:
        return f"exit {r.returncode}, stderr {r.stderr!r} (wanted one line with {word!r})"
    changed = [k for k in before if before[k] != after[k]]
    return f"changed {changed}: {lines[0]}" if changed else None


@pytest.mark.slow   # about 80 commands, each a storagectl process: 13-35 s on 2 shared cores
def test_wrong_commands_are_one_line_and_change_nothing(setup: Daemon,
                                                        tmp_path: Path) -> None:
    d = setup
    failures = [f"{line}: {why}" for rows, strict in ((STRICT, True), (UNDONE, False))
                for line, word in rows
                if (why := _refused(d, tmp_path, line, word, strict)) is not None]
    assert not failures, "\n".join(failures)
    assert (tmp_path / "old.stream").read_bytes() == b"an older backup"
    check = d.json("pool", "check", "tank", "--deep")
    assert isinstance(check, dict) and check["ok"], check
    _qemu_io(d.url("tank/v"), "read -P 0x3c 0 4M", "read -P 0 4M 12M", read_only=True)
    _qemu_io(d.url("tank/c"), "read -P 0x3c 0 4M", read_only=True)


def test_a_config_with_a_bad_key_is_one_line_and_leaves_the_running_daemon(
        setup: Daemon, tmp_path: Path) -> None:
    """A second storaged given a bad config (unknown key, wrong type, bad value) on the
    running daemon's state directory stops at the config, in one line naming the key,
    before it takes the state directory's lock: the pid file still names the running
    daemon, which serves on unchanged."""
    d = setup
    assert d.proc is not None
    pid_file = tmp_path / "state" / "storaged.pid"
    before = _state(d, tmp_path, strict=True)
    for text, key in (("nosuchkey = 1\n", "nosuchkey"),
                      ("[nbd]\nmax_connections = \"many\"\n", "nbd.max_connections"),
                      ("[fuse]\nmode = 0o7777\n", "fuse.mode")):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        r = subprocess.run(
            [str(BIN / "storaged"), "--config", str(cfg), "--state-dir",
             str(tmp_path / "state"), "--socket", d.sock],
            capture_output=True, text=True, timeout=60, check=False)
        cfg.unlink()
        assert r.returncode == 1 and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and key in r.stderr, r.stderr
        assert pid_file.read_text().strip() == str(d.proc.pid)
        assert _state(d, tmp_path, strict=True) == before
    _qemu_io(d.url("tank/v"), "read -P 0x3c 0 4M", read_only=True)
    assert os.path.exists(d.sock) and d.up()
