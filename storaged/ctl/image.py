"""storagectl volume import / export: ``qemu-img convert`` against the daemon's own NBD
export, so every image format qemu knows works, sparse both ways (qemu-img asks the export
for its allocation, and a new volume is known to read as zeros: ``--target-is-zero``).

A module of its own so that send and receive, which need no subprocess, do not pay for
importing it at start-up (about 8 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from storaged.ctl.client import ControlError, call
from storaged.ctl.progress import ProgressBar


def _bar(show: bool, tty: bool) -> ProgressBar | None:
    return ProgressBar(sys.stderr, tty=tty) if show else None


def nbd_uri(path: str, name: str) -> str:
    for item in call(path, "export.list", {}):
        if item["name"] == name:
            uri = item.get("nbd") or item.get("nbd_unix")
            if uri is None:
                raise ControlError("the daemon serves no NBD listener (needed to import "
                                   "and export images)", "InvalidArgument")
            return str(uri)
    raise ControlError(f"no export {name!r} (see storagectl export list)", "NotFound")


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ControlError("qemu-img is not installed (Debian package qemu-utils)",
                           "InvalidArgument")
    return exe


def _convert(cmd: list[str], bar: ProgressBar | None, verb: str, size: int) -> None:
    """Run qemu-img convert. With a bar, its percentages (-p writes "    (12.00/100%)\\r"
    to stdout) drive our bar, in bytes of the ``size``-byte image."""
    if bar is not None:
        cmd.insert(2, "-p")
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if bar else subprocess.DEVNULL,
                                stderr=errors)
        with proc:
            if bar is not None and proc.stdout is not None:
                bar.update(verb, 0, size)
                for pct in _percentages(proc.stdout.fileno()):
                    bar.update(verb, int(size * pct / 100), size)
        if bar is not None:
            if proc.returncode == 0:
                bar.update(verb, size, size, final=True)
            bar.close()
        if proc.returncode != 0:
            errors.seek(0)
            text = errors.read().decode(errors="replace").strip()
            raise ControlError(f"qemu-img convert failed: {text}", "IOError")


def _percentages(fd: int) -> Iterator[float]:
    """The numbers of qemu-img's "(12.34/100%)" progress marks, as they come."""
    buf = b""
    while chunk := os.read(fd, 4096):
        *marks, buf = re.split(rb"[\r\n]", buf + chunk)
        for mark in marks:
            if m := re.search(rb"\(([0-9.]+)/100%\)", mark):
                yield float(m.group(1))


# Headers of the image formats qemu-img knows, at offset 0.
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"QED\0", "qed"), (b"KDMV", "vmdk"),
          (b"# Disk DescriptorFile", "vmdk"), (b"conectix", "vpc"), (b"vhdxfile", "vhdx"),
          (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
          (b"<<< Sun VirtualBox Disk Image >>>", "vdi"))


def _image_magic(image: str) -> str | None:
    """The format whose header ``image`` starts with, if any."""
    try:
        with open(image, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def import_image(args: argparse.Namespace, path: str, show: bool,
                 tty: bool = False) -> dict[str, Any]:
    exe = _qemu_img()
    if not os.path.exists(args.image):
        raise ControlError(f"no image file {args.image}", "NotFound")
    info_cmd = [exe, "info", "--output=json"]
    if args.format:
        info_cmd += ["-f", args.format]
    proc = subprocess.run([*info_cmd, args.image], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise ControlError(f"qemu-img cannot read {args.image}: {proc.stderr.strip()}",
                           "InvalidArgument")
    info = json.loads(proc.stdout)
    fmt, size = args.format or info["format"], int(info["virtual-size"])
    if args.format is None and fmt == "raw":
        damaged = _image_magic(args.image)
        if damaged is not None:
            # qemu-img probes a format only from a valid header and falls back to raw: a
            # damaged qcow2 would be imported as its own bytes.
            raise ControlError(f"{args.image} starts like a {damaged} image but qemu-img "
                               f"does not read it as one (damaged?); give --format raw to "
                               f"import its bytes as they are", "InvalidArgument")
    size = -(-size // 512) * 512
    params: dict[str, Any] = {"name": args.name, "size": size}
    if args.profile:
        params["profile"] = args.profile
    call(path, "volume.create", params)
    try:
        uri = nbd_uri(path, args.name)
        # The new volume reads as zeros: qemu-img writes only the image's data.
        _convert([exe, "convert", "-n", "--target-is-zero", "-f", fmt, "-O", "raw",
                  args.image, uri], _bar(show, tty), "importing", size)
        call(path, "volume.flush", {"name": args.name})
    except BaseException:
        call(path, "volume.delete", {"name": args.name})
        raise
    return {"name": args.name, "size_bytes": size, "format": fmt, "image": args.image}


def _export_size(path: str, name: str) -> int:
    """The size of volume or snapshot ``name`` (what the progress bar counts to)."""
    vol, _at, snap = name.partition("@")
    if not snap:
        return int(call(path, "volume.info", {"name": vol})["size_bytes"])
    for s in call(path, "snapshot.list", {"volume": vol}):
        if s["name"] in (snap, name):
            return int(s["size_bytes"])
    return 0


def export_image(args: argparse.Namespace, path: str, show: bool,
                 tty: bool = False) -> dict[str, Any]:
    exe = _qemu_img()
    uri = nbd_uri(path, args.name)
    if os.path.exists(args.image):
        raise ControlError(f"{args.image} exists; export writes a new image",
                           "AlreadyExists")
    try:
        size = _export_size(path, args.name) if show else 0
        _convert([exe, "convert", "-f", "raw", "-O", args.format, uri, args.image],
                 _bar(show, tty), "exporting", size)
    except BaseException:
        if os.path.exists(args.image):
            os.unlink(args.image)
        raise
    size = json.loads(subprocess.run([exe, "info", "--output=json", args.image],
                                     capture_output=True, text=True,
                                     check=True).stdout)["virtual-size"]
    return {"name": args.name, "size_bytes": size, "format": args.format,
            "image": args.image}
