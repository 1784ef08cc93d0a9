"""The libvirt ``<disk>`` elements that attach a storaged volume to a guest, one per export
path, and the ``<secret>`` that holds an iSCSI volume's CHAP secret.

``discard='unmap'`` passes the guest's TRIM/discard through qemu to the export, so space
the guest frees returns to the pool (invariant 6); without it qemu drops discards. The FUSE
file gets none: the mount cannot punch holes (pyfuse3 has no fallocate), so trim goes
over NBD or iSCSI. Every element here is checked against libvirt's own schema
(``virt-xml-validate``) in tests/integration/test_vm_libvirt.py.
"""

from __future__ import annotations

import hashlib
import re
from xml.sax.saxutils import escape


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"


def _driver(read_only: bool, *, discard: bool = True) -> str:
    extra = "" if read_only or not discard else " discard='unmap'"
    return f"  <driver name='qemu' type='raw' cache='none'{extra}/>"


def _target(target: str, bus: str, read_only: bool) -> list[str]:
    lines = [f"  <target dev={_attr(target)} bus={_attr(bus)}/>"]
    if read_only:
        lines.append("  <readonly/>")
    return lines


def _nbd_disk(host: str, name: str, read_only: bool, target: str) -> str:
    lines = ["<disk type='network' device='disk'>",
             _driver(read_only),
             f"  <source protocol='nbd' name={_attr(name)}>",
             f"    {host}",
             "  </source>",
             *_target(target, "virtio", read_only)]
    return "\n".join([*lines, "</disk>"])


def disk_xml(host: str, port: int, name: str, *, read_only: bool = False,
             target: str = "vda") -> str:
    """The ``<disk>`` element for NBD export ``name`` (POOL/VOL or POOL/VOL@SNAP)."""
    return _nbd_disk(f"<host name={_attr(host)} port='{port}'/>", name, read_only, target)


def unix_disk_xml(socket: str, name: str, *, read_only: bool = False,
                  target: str = "vda") -> str:
    """The ``<disk>`` element for NBD export ``name`` over the Unix socket ``socket``
    (``nbd.socket``: a guest on the storage node itself)."""
    return _nbd_disk(f"<host transport='unix' socket={_attr(socket)}/>", name, read_only,
                     target)


def iscsi_disk_xml(host: str, port: int, iqn: str, *, lun: int = 0,
                   chap_user: str | None = None, secret_usage: str | None = None,
                   read_only: bool = False, target: str = "sda") -> str:
    """The ``<disk>`` element for an iSCSI target (qemu's libiscsi driver). With CHAP,
    ``<auth>`` names the libvirt secret (by usage) that holds the CHAP secret."""
    lines = ["<disk type='network' device='disk'>",
             _driver(read_only),
             f"  <source protocol='iscsi' name={_attr(f'{iqn}/{lun}')}>",
             f"    <host name={_attr(host)} port='{port}'/>"]
    if chap_user is not None:
        usage = secret_usage or iqn
        lines += [f"    <auth username={_attr(chap_user)}>",
                  f"      <secret type='iscsi' usage={_attr(usage)}/>",
                  "    </auth>"]
    lines += ["  </source>", *_target(target, "scsi", read_only)]
    return "\n".join([*lines, "</disk>"])


def secret_usage(name: str) -> str:
    """The usage name of volume ``name``'s CHAP secret in libvirt: ``storaged-POOL-VOL``.
    libvirt allows only ``[A-Za-z0-9_+-]`` there; a name with other characters gets a
    short hash of itself appended, so two volumes never share a usage."""
    pool, _, vol = name.partition("/")
    safe = [re.sub(r"[^A-Za-z0-9_+-]", "_", part) for part in (pool, vol)]
    usage = "storaged-" + "-".join(safe)
    if safe != [pool, vol]:
        usage += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return usage


def secret_xml(usage: str, description: str) -> str:
    """The ``<secret>`` to define (``virsh secret-define``) for a CHAP secret; its value
    is set apart (``virsh secret-set-value --file``), never written in XML."""
    return "\n".join(["<secret ephemeral='no' private='yes'>",
                      f"  <description>{escape(description)}</description>",
                      "  <usage type='iscsi'>",
                      f"    <target>{escape(usage)}</target>",
                      "  </usage>",
                      "</secret>"])


def file_disk_xml(path: str, *, read_only: bool = False, target: str = "vdb") -> str:
    """The ``<disk>`` element for a volume's file in the FUSE mount (a raw file). The
    guest's flushes reach the volume as fsync (invariant 1); cache='none' keeps qemu from
    caching what the mount already serves uncached."""
    lines = ["<disk type='file' device='disk'>",
             _driver(read_only, discard=False),
             f"  <source file={_attr(path)}/>",
             *_target(target, "virtio", read_only)]
    return "\n".join([*lines, "</disk>"])
