"""Independent NBD clients against a real storaged NBD server on loopback (DESIGN §6).

qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh (libnbd) and fio's nbd engine each talk to a
server running in the test's trio loop over a real pool (ec:4+2 on sparse files). Every
test checks data byte for byte, not just exit codes. Invariants: 1 (flushed data is durable,
also across connections: multi-conn), 6 (trimmed/zeroed ranges read as zeros and are holes
in the allocation map), 9 (a read-only export refuses writes with EPERM and changes nothing).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import trio

from tests.kit.nbdharness import (
    POOL,
    Proc,
    nbdsh,
    open_pool,
    run,
    serve,
    served_pool,
)
from volumes import VolumeManager

KiB = 1024
MiB = 1024 * 1024


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def write_file(path: Path, data: bytes) -> None:
    await trio.Path(path).write_bytes(data)


async def sha256(path: Path) -> str:
    return hashlib.sha256(await trio.Path(path).read_bytes()).hexdigest()


def qemu_io_clean(p: Proc, *, expect_ops: int) -> None:
    """qemu-io ran every command without an I/O error or a pattern mismatch."""
    p.ok()
    text = p.stdout + p.stderr
    assert "Pattern verification failed" not in text, str(p)
    assert "failed" not in text.lower(), str(p)
    done = sum(1 for line in p.stdout.splitlines()
               if line.split(" ", 1)[0] in ("wrote", "read", "discard"))
    assert done == expect_ops, f"expected {expect_ops} completed ops:\n{p}"


async def test_qemu_img_convert_in_and_out_byte_exact(tmp_path: Path) -> None:
    """64 MiB of random data in with ``qemu-img convert -n``, out again, and ``qemu-img
    compare`` against the export; a one-byte change is then detected (compare is not
    vacuous)."""
    size = 64 * MiB
    img, out = tmp_path / "img.raw", tmp_path / "out.raw"
    await write_file(img, randbytes(size, 1))
    async with served_pool(tmp_path, {"vol": size}) as srv:
        url = srv.url()
        (await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, url])).ok()
        (await run(["qemu-img", "convert", "-O", "raw", "--image-opts", srv.qemu_opts(),
                    out])).ok()
        assert (await trio.Path(out).stat()).st_size == size
        assert await sha256(out) == await sha256(img)

        cmp = (await run(["qemu-img", "compare", "--image-opts",
                          f"driver=raw,file.driver=file,file.filename={img}",
                          srv.qemu_opts()])).ok()
        assert "Images are identical" in cmp.stdout, str(cmp)

        # Change one byte in the middle through the volume itself: compare must notice.
        vol = srv.vm.get("vol")
        old = await vol.read(size // 2, 1)
        await vol.write(size // 2, bytes([old[0] ^ 0xFF]))
        diff = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img, url])
        assert diff.returncode == 1, str(diff)
        assert f"Content mismatch at offset {size // 2}" in diff.stdout, str(diff)


async def test_qemu_io_patterns_discard_and_write_zeroes(tmp_path: Path) -> None:
    """Pattern writes and verified reads, discard and ``write -z`` read back as zeros
    (invariant 6), unaligned ranges inside blocks keep their neighbours; a second qemu-io
    (a new connection) sees everything the first one wrote."""
    async with served_pool(tmp_path, {"vol": 16 * MiB}) as srv:
        url = srv.url()
        cmds = [
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1M 128k",
            "write -P 0xef 1100k 3k",         # unaligned, inside one 64 KiB block
            "discard 0 512k",
            "read -P 0 0 512k",
            "read -P 0xab 512k 512k",
            "write -z 700k 100k",             # unaligned WRITE_ZEROES over two blocks
            "read -P 0 700k 100k",
            "read -P 0xab 512k 188k",
            "read -P 0xab 800k 224k",
            "read -P 0xcd 1M 76k",
            "read -P 0xef 1100k 3k",
            "read -P 0xcd 1103k 49k",
            "read -P 0 1152k 1M",             # never written: zeros
            "write -P 0x11 15M 1M",           # the last MiB of the export
            "flush",
        ]
        args: list[str | Path] = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        qemu_io_clean(await run([*args, url]), expect_ops=len(cmds) - 1)

        check = ["read -P 0 0 512k", "read -P 0xab 512k 188k", "read -P 0 700k 100k",
                 "read -P 0xab 800k 224k", "read -P 0xcd 1M 76k", "read -P 0xef 1100k 3k",
                 "read -P 0xcd 1103k 49k", "read -P 0 1152k 1M",
                 "read -P 0x11 15M 1M"]
        args = ["qemu-io", "-r", "-f", "raw"]
        for c in check:
            args += ["-c", c]
        qemu_io_clean(await run([*args, url]), expect_ops=len(check))

        # qemu-io must really report mismatches (guards the check above).
        bad = await run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 4k", url])
        assert "Pattern verification failed" in bad.stdout + bad.stderr, str(bad)


async def test_nbdinfo_list_and_allocation_map(tmp_path: Path) -> None:
    """``nbdinfo --list`` shows every volume as POOL/VOLUME; ``nbdinfo --map`` shows data
    as data and trimmed, zeroed and zero-written ranges as holes at exact offsets
    (base:allocation, invariant 6). ``write -z -u`` lets the server unmap (no
    NBD_CMD_FLAG_NO_HOLE)."""
    vols = {"vol": 8 * MiB, "alpha": 1 * MiB, "beta.2": 2 * MiB}
    async with served_pool(tmp_path, vols) as srv:
        listing = (await run(["nbdinfo", "--list", "--json", srv.url("")])).ok()
        exports = json.loads(listing.stdout)["exports"]
        assert sorted(e["export-name"] for e in exports) == sorted(
            f"{POOL}/{v}" for v in vols)
        for e in exports:
            assert e["export-size"] == vols[e["export-name"].split("/", 1)[1]]

        url = srv.url()
        args: list[str | Path] = ["qemu-io", "-f", "raw"]
        for c in ["write -P 0x5a 0 1M", "write -P 0x5b 2M 512k", "write -P 0 3M 128k",
                  "write -P 0x5c 4M 64k", "discard 256k 256k", "write -z -u 4M 64k",
                  "write -P 0x5d 8128k 64k"]:
            args += ["-c", c]
        qemu_io_clean(await run([*args, url]), expect_ops=7)

        m = (await run(["nbdinfo", "--map", "--json", url])).ok()
        got = [(e["offset"], e["length"], e["type"]) for e in json.loads(m.stdout)]
        data, hole = 0, 3
        assert got == [
            (0, 256 * KiB, data),
            (256 * KiB, 256 * KiB, hole),         # trimmed
            (512 * KiB, 512 * KiB, data),
            (1 * MiB, 1 * MiB, hole),             # never written
            (2 * MiB, 512 * KiB, data),
            (2 * MiB + 512 * KiB, 5 * MiB + 448 * KiB, hole),  # incl. zero-written/zeroed
            (8128 * KiB, 64 * KiB, data),         # the last block
        ], f"allocation map:\n{m.stdout}"
        text = (await run(["nbdinfo", "--map", url])).ok().stdout
        assert "hole,zero" in text and "data" in text, text


async def test_write_zeroes_with_no_hole_stays_provisioned(tmp_path: Path) -> None:
    """proto.md, NBD_CMD_WRITE_ZEROES: "the client MAY set the command flag
    NBD_CMD_FLAG_NO_HOLE to inform the server that the area MUST be fully provisioned".
    qemu sends NO_HOLE for ``write -z`` (without ``-u``): that range must read as zeros and
    must not be a hole in base:allocation; ``write -z -u`` (may unmap) becomes a hole and
    releases its space (invariant 6)."""
    async with served_pool(tmp_path, {"vol": 1 * MiB}) as srv:
        url = srv.url()
        qemu_io_clean(await run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 256k",
                                 "-c", "write -z 0 64k", "-c", "write -z -u 64k 64k",
                                 "-c", "read -P 0 0 128k", "-c", "read -P 0x33 128k 128k",
                                 url]), expect_ops=5)
        m = (await run(["nbdinfo", "--map", "--json", url])).ok()
        got = [(e["offset"], e["length"], e["type"]) for e in json.loads(m.stdout)]
        assert got[-1] == (256 * KiB, 768 * KiB, 3), m.stdout
        hole_at = {off: typ & 1 for off, n, typ in got[:-1] for off in range(off, off + n,
                                                                            64 * KiB)}
        assert hole_at == {0: 0, 64 * KiB: 1, 128 * KiB: 0, 192 * KiB: 0}, (
            f"NO_HOLE zeroing at 0+64k must stay allocated:\n{m.stdout}")


async def test_nbdcopy_in_and_out_byte_exact(tmp_path: Path) -> None:
    """nbdcopy file -> export and export -> file, byte-identical; the image has a zero
    run, and the export held other data before, so nbdcopy's zeroing must really zero."""
    size = 32 * MiB
    data = bytearray(randbytes(size, 2))
    data[8 * MiB:12 * MiB] = bytes(4 * MiB)           # a zero run nbdcopy sees as sparse
    data[20 * MiB + 100:20 * MiB + 5000] = bytes(4900)
    img, out = tmp_path / "img.raw", tmp_path / "out.raw"
    await write_file(img, bytes(data))
    async with served_pool(tmp_path, {"vol": size}) as srv:
        vol = srv.vm.get("vol")
        await vol.write(8 * MiB, b"\xee" * (4 * MiB))   # stale data nbdcopy must zero
        url = srv.url()
        (await run(["nbdcopy", "--flush", img, url])).ok()
        (await run(["nbdcopy", url, out])).ok()
        assert (await trio.Path(out).stat()).st_size == size
        assert await sha256(out) == await sha256(img)
        assert await vol.read(8 * MiB, 4 * MiB) == bytes(4 * MiB)


async def test_fio_nbd_engine_verify(tmp_path: Path) -> None:
    """fio's nbd engine: random 4 KiB writes at queue depth 16 and sequential 1 MiB
    writes, two jobs on two connections at once, each verified with crc32c."""
    async with served_pool(tmp_path, {"vol": 32 * MiB}) as srv:
        out = tmp_path / "fio.json"
        p = (await run(["fio", "--output-format=json", f"--output={out}",
                        "--ioengine=nbd", f"--uri={srv.url()}", "--verify=crc32c",
                        "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                        "--name=rand", "--rw=randwrite", "--bs=4k", "--size=16m",
                        "--offset=0", "--iodepth=16",
                        "--name=seq", "--rw=write", "--bs=1m", "--size=16m",
                        "--offset=16m", "--iodepth=4"], cwd=tmp_path)).ok()
        report = json.loads(await trio.Path(out).read_text())
        jobs = {j["jobname"]: j for j in report["jobs"]}
        assert set(jobs) == {"rand", "seq"}, str(p)
        for name, j in jobs.items():
            assert j["error"] == 0, f"fio job {name} error {j['error']}:\n{p}"
            assert j["write"]["io_bytes"] == 16 * MiB, f"{name}: {j['write']}"
            # The verify phase read back everything it wrote.
            assert j["read"]["io_bytes"] == 16 * MiB, f"{name}: {j['read']}"
        assert "verify" not in p.stderr.lower(), str(p)


async def test_multi_conn_flush_on_one_connection_covers_the_others(tmp_path: Path) -> None:
    """can_multi_conn is advertised, and it is honest: writes on connections 1 and 3 that
    were never flushed there are durable once connection 2's FLUSH returns (invariant 1).

    Durability is checked on a copy of the devices taken right after, while the server
    still runs: that is the pool as a crashed daemon (kill -9) would leave it."""
    async with served_pool(tmp_path, {"vol": 8 * MiB}) as srv:
        url = srv.url()
        info = json.loads((await run(["nbdinfo", "--json", url])).ok().stdout)
        assert info["exports"][0]["can_multi_conn"] is True
        assert info["exports"][0]["can_flush"] is True

        script = f"""
h2 = nbd.NBD(); h2.connect_uri({url!r})
h3 = nbd.NBD(); h3.connect_uri({url!r})
a = bytes([0x5a]) * 65536
b = bytes(range(256)) * 64
h.pwrite(a, 1 << 20)
h3.pwrite(b, 3 * 65536 + 100)
h2.flush()
assert h2.pread(65536, 1 << 20) == a
assert h.pread(len(b), 3 * 65536 + 100) == b
h4 = nbd.NBD(); h4.connect_uri({url!r})
assert h4.pread(65536, 1 << 20) == a
assert h4.pread(len(b), 3 * 65536 + 100) == b
print("multi-conn ok", h.can_multi_conn(), h2.can_multi_conn())
"""
        p = (await nbdsh(tmp_path, script, uri=url)).ok()
        assert "multi-conn ok True True" in p.stdout, str(p)

        crash = tmp_path / "crash"
        await trio.Path(crash).mkdir()
        for dev in sorted((tmp_path / "devs").iterdir()):
            (await run(["cp", "--sparse=always", dev, crash / dev.name])).ok()

    pool = await open_pool(crash)
    try:
        vol = VolumeManager(pool).get("vol")
        assert await vol.read(1 << 20, 65536) == b"\x5a" * 65536
        assert await vol.read(3 * 65536 + 100, 16384) == bytes(range(256)) * 64
    finally:
        await pool.close()


async def test_read_only_export_refuses_writes_with_eperm(tmp_path: Path) -> None:
    """A read-only export (stand-in for a snapshot export until snapshots land) advertises
    READ_ONLY; the server itself answers WRITE, TRIM and WRITE_ZEROES with EPERM (libnbd's
    strict mode is off so the requests really reach it), reads still work, nothing changed
    (invariant 9)."""
    async with served_pool(tmp_path, {"vol": 4 * MiB, "ro": 4 * MiB}) as srv:
        ro = srv.vm.get("ro")
        pattern = bytes(range(256)) * 256
        await ro.write(64 * KiB, pattern)
        await ro.flush()
        ro.read_only = True
        url = srv.url(f"{POOL}/ro")

        info = json.loads((await run(["nbdinfo", "--json", url])).ok().stdout)
        assert info["exports"][0]["is_read_only"] is True
        assert info["exports"][0]["can_trim"] is False

        script = f"""
h.set_strict_mode(0)
h.connect_uri({url!r})
for what, call in [("pwrite", lambda: h.pwrite(b"x" * 4096, 65536)),
                   ("trim", lambda: h.trim(65536, 65536)),
                   ("zero", lambda: h.zero(65536, 65536)),
                   ("fua-write", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FUA))]:
    try:
        call()
        print(what, "SUCCEEDED")
    except nbd.Error as e:
        print(what, "refused:", e)
assert h.pread(65536, 65536) == bytes(range(256)) * 256
print("read ok")
"""
        p = (await nbdsh(tmp_path, script)).ok()
        for what in ("pwrite", "trim", "zero", "fua-write"):
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith(what + " ")),
                        "")
            assert "refused:" in line and "Operation not permitted" in line, str(p)
        assert "read ok" in p.stdout, str(p)

        # qemu-io: a read-write open is refused, a read-only one reads the data.
        w = await run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", url])
        assert w.returncode != 0, str(w)
        qemu_io_clean(await run(["qemu-io", "-r", "-f", "raw", "-c",
                                 "read -P 0 0 64k", url]), expect_ops=1)
        assert await ro.read(0, 128 * KiB) == bytes(64 * KiB) + pattern


async def test_flushed_data_survives_pool_close_and_reimport(tmp_path: Path) -> None:
    """Written over NBD (qemu-img convert, which flushes; qemu-io with an explicit flush),
    then the pool is closed and imported again from its devices: a new server on the
    re-imported pool returns every byte (invariant 1)."""
    size = 16 * MiB
    img = tmp_path / "img.raw"
    await write_file(img, randbytes(size, 3))
    async with served_pool(tmp_path, {"vol": size, "other": 4 * MiB}) as srv:
        (await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img,
                    srv.url()])).ok()
        qemu_io_clean(await run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 1000k 300k",
                                 "-c", "flush", srv.url(f"{POOL}/other")]), expect_ops=1)

    pool = await open_pool(tmp_path / "devs")
    try:
        async with serve({POOL: VolumeManager(pool)}, tmp_path) as srv2:
            out = tmp_path / "out.raw"
            (await run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                        srv2.qemu_opts(), out])).ok()
            assert await sha256(out) == await sha256(img)
            qemu_io_clean(await run(["qemu-io", "-r", "-f", "raw",
                                     "-c", "read -P 0 0 1000k",
                                     "-c", "read -P 0x77 1000k 300k",
                                     "-c", "read -P 0 1300k 2796k",
                                     srv2.url(f"{POOL}/other")]), expect_ops=3)
    finally:
        await pool.close()
