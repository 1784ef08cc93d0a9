"""Portable volumes end to end: storagectl send | storagectl receive between pools of the
real daemon (full, incremental, interrupted and resumed), and image import/export through
qemu-img against the daemon's NBD export, checked with qemu-img compare and map."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

from pool.iovec import advance
from storaged.wire import MAX_FRAME
from tests.kit.daemonkit import BIN, Daemon, _qemu_io

CTL = str(BIN / "storagectl")


def _sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          text=True, timeout=120, check=False)


def _compare(a: str, b: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _map(target: str, fmt: str = "raw") -> list[tuple[int, int, bool]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, target],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    runs: list[tuple[int, int, bool]] = []
    for e in json.loads(out):
        data = bool(e["data"])
        if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], data)
        else:
            runs.append((e["start"], e["length"], data))
    return runs


def _pools(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("pool", "create", "tank", str(tmp_path / "t0"), "--extent-size", "4M",
              "--file-size", "256M")
    daemon.ok("pool", "create", "backup", *(str(tmp_path / f"b{i}") for i in range(3)),
              "--profile", "ec:2+1", "--extent-size", "4M", "--file-size", "256M")


def test_send_receive_pipes_between_pools_incremental_and_resume(
        daemon: Daemon, tmp_path: Path) -> None:
    _pools(daemon, tmp_path)
    daemon.ok("volume", "create", "tank/vm", "--size", "32M")
    _qemu_io(daemon.url("tank/vm"), "write -P 0x11 0 3M", "write -P 0x22 9M 64K",
             "write -P 0x33 31M 1M", "flush")
    daemon.ok("snapshot", "create", "tank/vm@s1")
    ctl = f"{CTL} --socket {daemon.sock}"
    r = _sh(f"{ctl} volume send tank/vm@s1 | {ctl} volume receive backup/vm")
    assert r.returncode == 0, r.stderr
    assert "received volume backup/vm@s1" in r.stdout
    _compare(daemon.url("tank/vm@s1"), daemon.url("backup/vm"))
    assert _map(daemon.url("backup/vm")) == _map(daemon.url("tank/vm@s1"))
    snaps = daemon.json("snapshot", "list", "backup/vm")
    assert isinstance(snaps, list) and [s["snapshot"] for s in snaps] == ["s1"]

    # Incremental: only the change travels.
    _qemu_io(daemon.url("tank/vm"), "write -P 0x44 1M 128K", "discard 9M 64K", "flush")
    daemon.ok("snapshot", "create", "tank/vm@s2")
    inc = tmp_path / "inc.stream"
    daemon.ok("volume", "send", "tank/vm@s2", "--from", "@s1", "-o", str(inc))
    assert inc.stat().st_size < 160 << 10
    # The wrong base (s2 onto a volume at s1, sent from s2 to s3 later) is refused first.
    daemon.ok("snapshot", "create", "tank/vm@s3")
    wrong = tmp_path / "wrong.stream"
    daemon.ok("volume", "send", "tank/vm@s3", "--from", "@s2", "-o", str(wrong))
    r = daemon.ctl("volume", "receive", "backup/vm", "-i", str(wrong))
    assert r.returncode == 1 and "applies onto @s2" in r.stderr, r.stderr
    daemon.ok("volume", "receive", "backup/vm", "-i", str(inc))
    _compare(daemon.url("tank/vm@s2"), daemon.url("backup/vm"))
    _compare(daemon.url("tank/vm@s2"), daemon.url("backup/vm@s2"))

    # An interrupted resumable receive continues from where it stopped.
    _qemu_io(daemon.url("tank/vm"), "write -P 0x55 4M 20M", "flush")
    daemon.ok("snapshot", "create", "tank/vm@s4")
    full = tmp_path / "full.stream"
    daemon.ok("volume", "send", "tank/vm@s4", "-o", str(full))
    cut = tmp_path / "cut.stream"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size * 7 // 10])
    r = daemon.ctl("volume", "receive", "backup/copy", "--resumable", "-i", str(cut))
    assert r.returncode == 1 and "send again with --resume" in r.stderr, r.stderr
    seq = int(r.stderr.split("--resume ")[1].split()[0])
    assert seq > 0
    assert "backup/copy" not in daemon.ok("volume", "list")
    r = daemon.ctl("volume", "receive", "backup/copy", "-i", str(full))
    assert r.returncode == 1 and "continue it with --resume" in r.stderr
    r = _sh(f"{ctl} volume send tank/vm@s4 --resume {seq} | "
            f"{ctl} --json volume receive backup/copy --resume")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["applied_bytes"] < 24 << 20
    _compare(daemon.url("tank/vm@s4"), daemon.url("backup/copy"))

    # A corrupted stream is refused; the pool is as it was.
    bad = bytearray(full.read_bytes())
    bad[len(bad) // 2] ^= 1
    (tmp_path / "bad.stream").write_bytes(bad)
    before = daemon.ok("volume", "list")
    r = daemon.ctl("volume", "receive", "backup/other", "-i", str(tmp_path / "bad.stream"))
    assert r.returncode == 1 and "corrupted" in r.stderr, r.stderr
    assert daemon.ok("volume", "list") == before
    r = daemon.ctl("volume", "send", "tank/vm@nope")
    assert r.returncode == 1 and "no snapshot 'nope'" in r.stderr


def _raw_receive(daemon: Daemon, name: str) -> tuple[socket.socket, io.BufferedReader]:
    """A control connection that has asked for volume.receive into ``name`` and been
    answered "ready"."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(daemon.sock)
    s.sendall(json.dumps({"method": "volume.receive", "params": {"name": name}}).encode()
              + b"\n")
    f = s.makefile("rb")
    assert "ready" in json.loads(f.readline())
    return s, f


def test_stream_frames_of_any_size_and_bad_framing(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon takes a stream in frames of any size, however the bytes are split into
    writes; a frame above the limit is refused with a clear error, nothing is created,
    and the daemon keeps serving."""
    _pools(daemon, tmp_path)
    daemon.ok("volume", "create", "tank/vm", "--size", "16M")
    _qemu_io(daemon.url("tank/vm"), "write -P 0x61 0 5M", "write -P 0x62 11M 192K", "flush")
    daemon.ok("snapshot", "create", "tank/vm@s1")
    full = tmp_path / "full.stream"
    daemon.ok("volume", "send", "tank/vm@s1", "-o", str(full))
    data = full.read_bytes()

    s, f = _raw_receive(daemon, "backup/framed")
    with s:
        sizes = [1, 7, 4, (1 << 16) + 3, (3 << 20) + 1]
        pos = 0
        for i, n in enumerate([*sizes, len(data)]):
            part = data[pos:pos + n]
            pos += len(part)
            frame = struct.pack(">I", len(part)) + part
            if i % 2:     # the length and the body split across writes, with a pause
                s.sendall(frame[:3])
                time.sleep(0.05)
                s.sendall(frame[3:])
            else:
                s.sendall(frame)
            if pos == len(data):
                break
        s.sendall(struct.pack(">I", 0))
        answer = json.loads(f.readline())
    assert "result" in answer, answer
    _compare(daemon.url("tank/vm@s1"), daemon.url("backup/framed"))

    before = daemon.ok("volume", "list")
    s, f = _raw_receive(daemon, "backup/toobig")
    with s:
        s.sendall(struct.pack(">I", MAX_FRAME + 1))
        answer = json.loads(f.readline())
    assert "bad framing" in answer["error"]["message"], answer
    assert "too large" in answer["error"]["message"], answer
    assert daemon.ok("volume", "list") == before


def _request(daemon: Daemon, method: str, params: dict[str, object],
             fd: int | None = None) -> tuple[socket.socket, io.BufferedReader]:
    """A control connection that has sent one request (with ``fd`` passed along)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(daemon.sock)
    line = json.dumps({"method": method, "params": params}).encode() + b"\n"
    if fd is None:
        s.sendall(line)
    else:
        socket.send_fds(s, [line], [fd])
    return s, s.makefile("rb")


def _last(f: io.BufferedReader) -> dict[str, object]:
    """The reply's last line (after any progress lines)."""
    while True:
        msg = json.loads(f.readline())
        assert isinstance(msg, dict)
        if "progress" not in msg:
            return msg


def _one(daemon: Daemon, method: str, params: dict[str, object],
         fd: int | None = None) -> dict[str, object]:
    """The answer to one request on a connection of its own (``fd`` passed along, then
    closed here)."""
    try:
        s, f = _request(daemon, method, params, fd)
        with s:
            return _last(f)
    finally:
        if fd is not None:
            os.close(fd)


def test_streams_through_a_passed_descriptor_and_framed_are_the_same(
        daemon: Daemon, tmp_path: Path) -> None:
    """What storagectl does (the output file's descriptor passed with the request; the
    daemon writes it and reports progress) and the framed stream on the connection give
    the same bytes. A descriptor that cannot be used, or a request that says it passes one
    and does not, is refused with a clear error, and the daemon keeps serving; a client
    that hangs up mid-send stops the send."""
    _pools(daemon, tmp_path)
    image = tmp_path / "random.img"
    image.write_bytes(os.urandom(20 << 20))       # incompressible: a stream of 20 MiB
    daemon.ok("volume", "import", "tank/vm", str(image), "--format", "raw")
    daemon.ok("snapshot", "create", "tank/vm@s1")
    params: dict[str, object] = {"name": "tank/vm@s1"}

    out = tmp_path / "passed.stream"
    answer = _one(daemon, "volume.send", {**params, "fd": True},
                  os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    assert answer["result"] == {"bytes": out.stat().st_size}, answer

    s, f = _request(daemon, "volume.send", params)
    framed = bytearray()
    with s:
        assert "stream" in json.loads(f.readline())
        while n := struct.unpack(">I", f.read(4))[0]:
            framed += f.read(n)
        assert "result" in json.loads(f.readline())
    # The same records (the JSON headers differ only in when each was sent).
    passed = out.read_bytes()
    header = 16 + int.from_bytes(passed[12:16], "big") + 8
    assert framed[:8] == passed[:8] == b"STGDSTRM"
    assert bytes(framed[16 + int.from_bytes(framed[12:16], "big") + 8:]) == passed[header:]

    answer = _one(daemon, "volume.send", {**params, "fd": True}, os.open(out, os.O_RDONLY))
    assert "not open for writing" in str(answer["error"]), answer
    answer = _one(daemon, "volume.send", {**params, "fd": True})
    assert "none came with it" in str(answer["error"]), answer
    # A descriptor belongs to the request it came with: one passed with a request that
    # takes none is not used by the next.
    spare = os.open(out, os.O_WRONLY)
    try:
        s, f = _request(daemon, "status", {}, spare)
        with s:
            assert "result" in _last(f)
            s.sendall(json.dumps({"method": "volume.send",
                                  "params": {**params, "fd": True}}).encode() + b"\n")
            answer = _last(f)
    finally:
        os.close(spare)
    assert "none came with it" in str(answer["error"]), answer

    # A client that goes away mid-send: into a pipe nobody reads, so the send waits
    # with the pipe full; hanging up ends it, and the daemon lets go of the pipe having
    # written only part of the stream (and answers the next client).
    r, w = os.pipe()
    try:
        s, f = _request(daemon, "volume.send", {**params, "fd": True}, w)
        os.close(w)
        assert select.select([r], [], [], 60)[0]   # it started (and will fill the pipe)
        time.sleep(0.2)
        f.close()                                  # (the socket stays open while it is)
        s.close()
        time.sleep(0.5)
        got = 0
        while data := os.read(r, 1 << 20):         # ends when the daemon closes its end
            got += len(data)
        assert 0 < got < out.stat().st_size
    finally:
        os.close(r)
    assert "tank/vm" in daemon.ok("volume", "list")


def test_a_stream_never_goes_to_or_comes_from_a_terminal(tmp_path: Path) -> None:
    """send with stdout on a terminal and receive with stdin on one are refused before
    anything is asked of the daemon (none runs here), saying what to use instead."""
    main, tty = pty.openpty()
    try:
        sock = str(tmp_path / "none.sock")
        send = subprocess.run([CTL, "--socket", sock, "volume", "send", "tank/vm@s1"],
                              stdout=tty, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
        assert send.returncode == 2, send.stderr
        assert "to a terminal (use -o FILE" in send.stderr
        receive = subprocess.run([CTL, "--socket", sock, "volume", "receive", "tank/copy"],
                                 stdin=tty, stderr=subprocess.PIPE, text=True, timeout=60,
                                 check=False)
        assert receive.returncode == 2, receive.stderr
        assert "from a terminal (use -i FILE" in receive.stderr
    finally:
        os.close(main)
        os.close(tty)


def test_advance_over_partly_sent_pieces() -> None:
    # pool.iovec invariant 1.
    views = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh")]
    assert [bytes(v) for v in advance(views, 0)] == [b"abc", b"", b"defgh"]
    assert [bytes(v) for v in advance(views, 2)] == [b"c", b"", b"defgh"]
    assert [bytes(v) for v in advance(views, 3)] == [b"defgh"]
    assert [bytes(v) for v in advance(views, 4)] == [b"efgh"]
    assert advance(views, 8) == []


def test_image_import_and_export_through_qemu_img(daemon: Daemon, tmp_path: Path) -> None:
    _pools(daemon, tmp_path)
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "48M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 2M",
                    "-c", "write -P 0x62 17M 320K", "-c", "write -P 0x63 47M 1M", str(src)],
                   check=True, capture_output=True)
    r = daemon.ctl("volume", "import", "tank/img", str(src))
    assert r.returncode == 0, r.stderr
    assert daemon.json("volume", "info", "tank/img")["size_bytes"] == 48 << 20  # type: ignore[index]
    url = daemon.url("tank/img")
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), url],
                          check=False, capture_output=True, timeout=120).returncode == 0
    data = [(s, n) for s, n, d in _map(url) if d]
    assert sum(n for _s, n in data) <= 4 << 20          # holes stayed holes
    daemon.ok("snapshot", "create", "tank/img@s1")
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out.{fmt}"
        r = daemon.ctl("volume", "export", "tank/img@s1", str(out), "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(src),
                               str(out)], check=False, capture_output=True,
                              timeout=120).returncode == 0
        assert [(s, n) for s, n, d in _map(str(out), fmt) if d] == data
    r = daemon.ctl("volume", "export", "tank/img", str(tmp_path / "out.raw"))
    assert r.returncode == 1 and "exists" in r.stderr
    r = daemon.ctl("volume", "import", "tank/bad", str(tmp_path / "missing.qcow2"))
    assert r.returncode == 1 and "no image file" in r.stderr
    (tmp_path / "junk.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    r = daemon.ctl("volume", "import", "tank/junk", str(tmp_path / "junk.qcow2"),
                   "--format", "qcow2")
    assert r.returncode == 1 and "cannot read" in r.stderr
    assert "tank/junk" not in daemon.ok("volume", "list")


def test_dirty_bitmap_meta_context_lists_exactly_the_changed_ranges(
        daemon: Daemon, tmp_path: Path) -> None:
    _pools(daemon, tmp_path)
    daemon.ok("volume", "create", "tank/vm", "--size", "16M")
    url = daemon.url("tank/vm")
    _qemu_io(url, "write -P 0x11 0 8M", "flush")
    daemon.ok("snapshot", "create", "tank/vm@s1")
    _qemu_io(url, "write -P 0x22 1M 64K", "write -P 0x33 4M 100K", "discard 6M 128K",
             "write -P 0x44 12M 4K", "flush")

    def changed(export: str, bitmap: str) -> list[tuple[int, int]]:
        out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}",
                              daemon.url(export)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        return [(e["offset"], e["length"]) for e in json.loads(out.stdout)
                if e["type"] & 1]

    k64 = 64 << 10
    want = [(1 << 20, k64), (4 << 20, 2 * k64), (6 << 20, 2 * k64), (12 << 20, k64)]
    assert changed("tank/vm", "s1") == want
    daemon.ok("snapshot", "create", "tank/vm@s2")
    assert changed("tank/vm@s2", "s1") == want        # a snapshot export, against an older
    assert changed("tank/vm", "s2") == []
    listed = subprocess.run(["nbdinfo", "--list", "--content", url.rsplit("/", 2)[0]],
                            capture_output=True, text=True, timeout=60, check=False)
    contexts = subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                              timeout=60, check=False)
    assert listed.returncode == 0
    exp = json.loads(contexts.stdout)["exports"][0]
    assert {"base:allocation", "qemu:dirty-bitmap:s1",
            "qemu:dirty-bitmap:s2"} <= set(exp["contexts"])
    r = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:nope", url],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
