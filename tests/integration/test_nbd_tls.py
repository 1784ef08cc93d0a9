"""TLS (NBD_OPT_STARTTLS) and the client allow-list, with real clients.

A CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost) are made with openssl in
tmp_path. Clients verify the server against the CA: qemu reads ``ca-cert.pem`` from the
``dir`` of a ``tls-creds-x509`` object, libnbd from the ``tls-certificates`` directory of an
``nbds://`` URI. Invariant 9: a plain client on a TLS-only server is refused before any
export is reached (NBD_REP_ERR_TLS_REQD), and a peer outside the allow-list gets nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from nbd import proto
from nbd.server import Network, tls_server_context
from tests.kit.nbdharness import OPT_HDR, POOL, RawClient, Served, run, served_pool, wait_idle

MiB = 1024 * 1024
SUBJ_CA = "/CN=storaged test CA"


@dataclass
class PKI:
    server_cert: Path
    server_key: Path
    client_dir: Path      # holds only ca-cert.pem: what both qemu and libnbd look for


async def make_ca(where: Path, subject: str = SUBJ_CA) -> tuple[Path, Path]:
    await trio.Path(where).mkdir(parents=True, exist_ok=True)
    key, cert = where / "ca-key.pem", where / "ca-cert.pem"
    (await run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                "-days", "2", "-subj", subject, "-addext",
                "basicConstraints=critical,CA:TRUE", "-addext",
                "keyUsage=critical,keyCertSign,cRLSign"])).ok()
    return key, cert


async def make_pki(where: Path) -> PKI:
    ca_key, ca_cert = await make_ca(where / "ca")
    srv = where / "server"
    await trio.Path(srv).mkdir(parents=True)
    key, csr, cert, ext = (srv / "server-key.pem", srv / "server.csr",
                           srv / "server-cert.pem", srv / "ext.cnf")
    (await run(["openssl", "req", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", csr,
                "-subj", "/CN=127.0.0.1"])).ok()
    await trio.Path(ext).write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    (await run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert])).ok()
    client = where / "client"
    await trio.Path(client).mkdir()
    await trio.Path(client / "ca-cert.pem").write_bytes(await trio.Path(ca_cert).read_bytes())
    return PKI(cert, key, client)


def tls_object(pki_dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={pki_dir},endpoint=client"]


def nbds(srv: Served, pki_dir: Path, name: str = f"{POOL}/vol") -> str:
    return srv.url(name, scheme="nbds", query=f"tls-certificates={pki_dir}")


async def sha256(path: Path) -> str:
    return hashlib.sha256(await trio.Path(path).read_bytes()).hexdigest()


async def test_tls_on_qemu_img_and_nbdinfo(tmp_path: Path) -> None:
    """TLS ON: qemu-img writes and reads back byte-exact over TLS; nbdinfo with an nbds://
    URI negotiates TLS; a plain client is still allowed in this mode."""
    pki = await make_pki(tmp_path / "pki")
    ctx = tls_server_context(str(pki.server_cert), str(pki.server_key))
    size = 8 * MiB
    img, out = tmp_path / "img.raw", tmp_path / "out.raw"
    await trio.Path(img).write_bytes(random.Random(7).randbytes(size))
    async with served_pool(tmp_path, {"vol": size}, tls=proto.TLSMode.ON,
                           tls_context=ctx) as srv:
        opts = srv.qemu_opts(tls_creds="tls0")
        (await run(["qemu-img", "convert", "-n", "-f", "raw", *tls_object(pki.client_dir),
                    "--target-image-opts", img, opts])).ok()
        (await run(["qemu-img", "convert", "-O", "raw", *tls_object(pki.client_dir),
                    "--image-opts", opts, out])).ok()
        assert await sha256(out) == await sha256(img)
        cmp = (await run(["qemu-img", "compare", *tls_object(pki.client_dir),
                          "--image-opts", f"driver=raw,file.driver=file,file.filename={img}",
                          opts])).ok()
        assert "Images are identical" in cmp.stdout, str(cmp)

        info = json.loads((await run(["nbdinfo", "--json", nbds(srv, pki.client_dir)]))
                          .ok().stdout)
        assert info["TLS"] is True
        assert info["exports"][0]["export-name"] == f"{POOL}/vol"
        plain = json.loads((await run(["nbdinfo", "--json", srv.url()])).ok().stdout)
        assert plain["TLS"] is False


async def test_tls_require_refuses_plain_clients(tmp_path: Path) -> None:
    """TLS REQUIRE: plain nbdinfo and qemu-img fail, the server answering
    NBD_REP_ERR_TLS_REQD (seen on a raw socket too); TLS clients work, and NBD_OPT_LIST
    works after STARTTLS on the raw socket wrapped in TLS."""
    pki = await make_pki(tmp_path / "pki")
    ctx = tls_server_context(str(pki.server_cert), str(pki.server_key))
    async with served_pool(tmp_path, {"vol": 4 * MiB}, tls=proto.TLSMode.REQUIRE,
                           tls_context=ctx) as srv:
        p = await run(["nbdinfo", srv.url()], env=debug_env())
        assert p.returncode != 0, str(p)
        assert "this server requires TLS" in p.stderr, str(p)   # the server's TLS_REQD text
        q = await run(["qemu-img", "info", "-f", "raw", srv.url()])
        assert q.returncode != 0, str(q)

        # What the server actually answers, option by option.
        c = await RawClient.connect(srv.port)
        await c.start()
        for option, data in [(proto.OPT_LIST, b""), (proto.OPT_STRUCTURED_REPLY, b""),
                             (proto.OPT_GO, RawClient.go_data(f"{POOL}/vol")),
                             (proto.OPT_INFO, RawClient.go_data(f"{POOL}/vol"))]:
            (r,) = await c.option(option, data)
            assert (r.option, r.rtype) == (option, proto.REP_ERR_TLS_REQD), r
        await c.send(OPT_HDR.pack(proto.IHAVEOPT, proto.OPT_EXPORT_NAME, 8) + b"tank/vol")
        assert await c.read_to_eof() == b"", "EXPORT_NAME before TLS must just close"
        await c.aclose()

        # STARTTLS, then the same options succeed inside TLS.
        c = await RawClient.connect(srv.port)
        await c.start()
        (r,) = await c.option(proto.OPT_STARTTLS)
        assert r.rtype == proto.REP_ACK, r
        client_ctx = ssl.create_default_context(cafile=str(pki.client_dir / "ca-cert.pem"))
        tls = trio.SSLStream(c.stream, client_ctx, server_hostname="127.0.0.1")
        with trio.fail_after(10):
            await tls.do_handshake()
        names = await raw_list_over(tls)
        assert names == [f"{POOL}/vol"]
        await tls.aclose()

        info = json.loads((await run(["nbdinfo", "--json", nbds(srv, pki.client_dir)]))
                          .ok().stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
        io = (await run(["qemu-io", *tls_object(pki.client_dir), "--image-opts",
                         "-c", "write -P 0x3c 0 1M", "-c", "read -P 0x3c 0 1M",
                         srv.qemu_opts(tls_creds="tls0")])).ok()
        assert "failed" not in (io.stdout + io.stderr).lower(), str(io)
        assert await srv.vm.get("vol").read(0, MiB) == b"\x3c" * MiB
        await wait_idle(srv.server)


def debug_env() -> dict[str, str]:
    return {**os.environ, "LIBNBD_DEBUG": "1"}


async def raw_list_over(stream: trio.abc.Stream) -> list[str]:
    """NBD_OPT_LIST over an already established (TLS) stream."""
    await stream.send_all(OPT_HDR.pack(proto.IHAVEOPT, proto.OPT_LIST, 0))
    buf = bytearray()
    names: list[str] = []
    with trio.fail_after(10):
        while True:
            while len(buf) < 20:
                chunk = await stream.receive_some(65536)
                assert chunk, "server closed during NBD_OPT_LIST"
                buf += chunk
            magic, option, rtype, n = struct.unpack_from(">QIII", buf)
            while len(buf) < 20 + n:
                chunk = await stream.receive_some(65536)
                assert chunk, "server closed during NBD_OPT_LIST"
                buf += chunk
            data = bytes(buf[20:20 + n])
            del buf[:20 + n]
            assert magic == proto.REPLY_MAGIC and option == proto.OPT_LIST
            if rtype == proto.REP_ACK:
                return names
            assert rtype == proto.REP_SERVER, hex(rtype)
            (ln,) = struct.unpack_from(">I", data)
            names.append(data[4:4 + ln].decode())


async def test_tls_client_rejects_a_server_it_cannot_verify(tmp_path: Path) -> None:
    """With an unrelated CA the TLS clients refuse the server: the certificate check is
    real, so the successes above really ran over verified TLS."""
    pki = await make_pki(tmp_path / "pki")
    other = tmp_path / "other"
    await make_ca(other, "/CN=somebody else")
    ctx = tls_server_context(str(pki.server_cert), str(pki.server_key))
    async with served_pool(tmp_path, {"vol": 1 * MiB}, tls=proto.TLSMode.REQUIRE,
                           tls_context=ctx) as srv:
        p = await run(["nbdinfo", nbds(srv, other)])
        assert p.returncode != 0, str(p)
        q = await run(["qemu-img", "info", *tls_object(other), "--image-opts",
                       srv.qemu_opts(tls_creds="tls0")])
        assert q.returncode != 0, str(q)
        await wait_idle(srv.server)


async def test_starttls_on_a_server_without_tls_is_refused(tmp_path: Path) -> None:
    async with served_pool(tmp_path, {"vol": 1 * MiB}) as srv:
        c = await RawClient.connect(srv.port)
        await c.start()
        (r,) = await c.option(proto.OPT_STARTTLS)
        assert r.rtype == proto.REP_ERR_POLICY, r
        assert await c.list_exports() == [f"{POOL}/vol"]      # the session goes on
        await c.aclose()
        p = await run(["nbdinfo", srv.url(scheme="nbds")])
        assert p.returncode != 0, str(p)


async def test_allow_list_refuses_a_loopback_client(tmp_path: Path) -> None:
    """allow=(10.0.0.0/8,): a client from 127.0.0.1 gets no greeting, just a close."""
    allow: tuple[Network, ...] = (ipaddress.ip_network("10.0.0.0/8"),)
    async with served_pool(tmp_path, {"vol": 1 * MiB}, allow=allow) as srv:
        c = await RawClient.connect(srv.port)
        assert await c.read_to_eof() == b""
        await c.aclose()
        p = await run(["nbdinfo", srv.url()])
        assert p.returncode != 0, str(p)
        q = await run(["qemu-img", "info", "-f", "raw", srv.url()])
        assert q.returncode != 0, str(q)
        assert srv.server.stats.refused == 3
        assert srv.server.stats.connections == 0
        assert srv.vm.get("vol").statistics().reads == 0

    allow = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"))
    async with served_pool(tmp_path / "2", {"vol": 1 * MiB}, allow=allow) as srv:
        (await run(["nbdinfo", srv.url()])).ok()
        assert srv.server.stats.refused == 0
