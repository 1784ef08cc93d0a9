"""The libvirt ``<disk>`` element that attaches an NBD export to a guest.

``discard='unmap'`` passes the guest's TRIM/discard through qemu to the export, so space
the guest frees returns to the pool (invariant 6); without it qemu drops discards.
"""

from __future__ import annotations

from xml.sax.saxutils import escape


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"


def disk_xml(host: str, port: int, name: str, *, read_only: bool = False,
             target: str = "vda") -> str:
    """The ``<disk>`` element for export ``name`` (POOL/VOL or POOL/VOL@SNAP)."""
    discard = "" if read_only else " discard='unmap'"
    lines = ["<disk type='network' device='disk'>",
             f"  <driver name='qemu' type='raw' cache='none'{discard}/>",
             f"  <source protocol='nbd' name={_attr(name)}>",
             f"    <host name={_attr(host)} port='{port}'/>",
             "  </source>",
             f"  <target dev={_attr(target)} bus='virtio'/>"]
    if read_only:
        lines.append("  <readonly/>")
    return "\n".join([*lines, "</disk>"])
