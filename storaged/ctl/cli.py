"""storagectl: the admin CLI. Talks to the daemon over its control socket.

Exit codes: 0 done, 1 the daemon refused or failed the operation (one line on stderr),
2 bad usage (argparse) or the daemon is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from storaged.ctl import portable
from storaged.ctl.client import ControlError, call, default_socket
from storaged.ctl.progress import ProgressBar
from storaged.libvirt import (
    disk_xml,
    file_disk_xml,
    iscsi_disk_xml,
    secret_usage,
    secret_xml,
    unix_disk_xml,
)
from storaged.sizes import format_size
from storaged.version import VersionAction

if TYPE_CHECKING:
    from typing import TypeAlias

    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _pct(used: int, size: int) -> str:
    return f"{100 * used / size:.0f}%" if size else "-"


def show_pools(pools: list[dict[str, Any]]) -> str:
    """SIZE and AVAIL: what the pool stores under its default profile; RAW SIZE and RAW
    FREE: device extents (a mirror:2 pool of two 2G devices: SIZE 2G, RAW SIZE 4G)."""
    rows = [[p["name"], p["state"], p.get("profile", "-"),
             format_size(p.get("usable_size_bytes", 0)), format_size(p.get("avail_bytes", 0)),
             _pct(p.get("used_bytes", 0), p.get("size_bytes", 0)),
             str(p.get("volumes", "-")), f"{p.get('overcommit_ratio', 0):.2f}x",
             format_size(p.get("size_bytes", 0)), format_size(p.get("free_bytes", 0))]
            for p in pools]
    return _table(rows, ["NAME", "STATE", "PROFILE", "SIZE", "AVAIL", "CAP", "VOLUMES",
                         "OVERCOMMIT", "RAW_SIZE", "RAW_FREE"])


def show_import(r: dict[str, Any] | list[dict[str, Any]]) -> str:
    """An imported pool's status, or (no name given) the pools that could be imported."""
    if isinstance(r, dict):
        return show_pool_status(r)
    if not r:
        return "no pools found"
    lines = []
    for p in r:
        members = (f"{len(p['found'])} of {p['members']} members found"
                   if "members" in p else f"{len(p['found'])} members found")
        lines += [f"   pool: {p['name']}", f"   uuid: {p['uuid']}",
                  f"  state: {p['state']} ({members}"
                  + (f"; missing members {', '.join(map(str, p['missing']))}"
                     if p["missing"] else "") + ")",
                  f"  owner: {p['owner']}"]
        if p.get("error"):
            lines.append(f"  error: {p['error']}")
        lines += [f"         {path}" for path in p["found"]] + [""]
    return "\n".join(lines).rstrip()


def show_pool_statuses(pools: list[dict[str, Any]]) -> str:
    """``pool status`` without a name: every pool's status, a blank line between them."""
    if not pools:
        return "no pools"
    return "\n\n".join(show_pool_status(p) if "devices" in p
                       else f"pool {p['name']}: {p['state']}: {p.get('error', '')}"
                       for p in pools)


def show_pool_status(p: dict[str, Any]) -> str:
    out = [f"warning: {p['taken_over']}"] if p.get("taken_over") else []
    out += [show_pools([p])]
    if p.get("failed"):
        out.append(f"failed: {p['failed']}")
    out.append("")
    if p.get("rados") is not None:
        out += show_rados(p["rados"])      # no devices: the RADOS pool holds the data
    else:
        out.append(_table([[str(d["index"]), d["path"] or "-", d["state"],
                            format_size(d["size_bytes"]), format_size(d["free_bytes"]),
                            str(d["read_errors"]), str(d["write_errors"]),
                            str(d["checksum_errors"]), d.get("uuid", "-")]
                           for d in p["devices"]],
                          ["DEV", "PATH", "STATE", "SIZE", "FREE", "READ", "WRITE", "CKSUM",
                           "UUID"]))
    out += [f"member {d['index']} ({d['path'] or '?'}) {d['state']}: {d['why']}"
            for d in p["devices"] if d.get("why")]
    out += [f"left out: {path}: {why}" for path, why in p.get("left_out", {}).items()]
    c = p["counters"]
    if "data_bytes" in p:
        out.append("")
        out.append(f"data {format_size(p['data_bytes'])} in live records "
                   f"({format_size(p['shared_bytes'])} shared by snapshots/clones); "
                   f"extents hold {format_size(p['used_bytes'])} (the cleaner reclaims the "
                   f"difference)")
    out.append("")
    out.append(f"records read {c['records_read']}, written {c['records_written']}, "
               f"degraded reads {c['degraded_reads']}, repaired fragments "
               f"{c['repaired_fragments']}, unreadable {c['unreadable_records']}")
    if p.get("spares"):
        out.append(f"spares: {', '.join(p['spares'])}")
    if p.get("rebuild"):
        r = p["rebuild"]
        out.append(f"rebuild: members {', '.join(map(str, r['members']))}, "
                   f"{r['segments_left']} segment(s) left, " + _progress_text(
                       r["done_bytes"], r["total_bytes"], r["rate"], r["eta"]))
    if p.get("scrub"):
        out.append(show_scrub({"scrub": p["scrub"]}))
    out += [f"warning: {w}" for w in p.get("warnings", [])]
    return "\n".join(out)


def show_rados(r: dict[str, Any]) -> list[str]:
    """The RADOS lines of ``pool status``: where the pool lives, the cluster, the lock."""
    where = f"rados pool {r.get('pool', '?')}"
    if r.get("client"):
        where += f" as client.{r['client']}"
    if r.get("conf"):
        where += f" ({r['conf']})"
    lines = [f"backend: {where}",
             f"cluster: fsid {r.get('fsid', '?')}, health {r.get('health', '?')}",
             f"  owner: {r.get('lock_holder') or 'none (this daemon does not hold the lock)'}"]
    if r.get("fenced"):
        lines.append(f" fenced: {r['fenced']}")
    return lines


def _progress_text(done: int, total: int, rate: float, eta: float | None) -> str:
    pct = f"{100 * done / total:.1f}%" if total else "-"
    text = f"{format_size(done)} of {format_size(total)} ({pct})"
    if rate:
        text += f" at {format_size(int(rate))}/s"
    if eta is not None:
        text += f", ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
    return text


def show_clean(r: dict[str, Any]) -> str:
    return (f"pool {r['name']}: cleaner emptied {r['segments_emptied']} segment(s), moved "
            f"{r['records_moved']} record(s)")


def show_scrub(r: dict[str, Any]) -> str:
    s = r.get("scrub")
    if not s:
        return "scrub: never run"
    lines = [f"scrub {s['state']}: " + _progress_text(s["done"], s["total"], s["rate"],
                                                      s["eta"]),
             f"  found {s['found']} bad, repaired {s['repaired']}, unrecoverable "
             f"{s['unrecoverable']}"]
    lines += [f"  unrecoverable: {x}" for x in s.get("problems", [])]
    return "\n".join(lines)


def show_volumes(vols: list[dict[str, Any]]) -> str:
    return _table([[v["name"], format_size(v["size_bytes"]), format_size(v["block_size"]),
                    v["profile"], v["compression"], format_size(v["mapped_bytes"]),
                    format_size(v["used_bytes"])] for v in vols],
                  ["NAME", "SIZE", "BLOCK", "PROFILE", "COMPRESSION", "MAPPED", "USED"])


def _clients(clients: list[dict[str, str]]) -> str:
    """'NBD 127.0.0.1:40112, FUSE 1 open handle' (or '-')."""
    names = {"nbd": "NBD", "iscsi": "iSCSI", "fuse": "FUSE"}
    return ", ".join(f"{names.get(c['protocol'], c['protocol'])} {c['client']}"
                     for c in clients) or "-"


def show_volume(v: dict[str, Any]) -> str:
    def fmt(k: str, val: Any) -> str:
        if k == "clients":
            return _clients(val)
        return format_size(val) if k.endswith("bytes") or k == "block_size" else str(val)
    return "\n".join(f"{k:<14}{fmt(k, val)}" for k, val in v.items() if k != "warning")


def show_snapshots(snaps: list[dict[str, Any]]) -> str:
    return _table([[s["name"], format_size(s["size_bytes"]),
                    format_size(s["referenced_bytes"]), format_size(s["unique_bytes"]),
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])),
                    ",".join(s["clones"]) or "-"] for s in snaps],
                  ["NAME", "SIZE", "REFER", "UNIQUE", "CREATED", "CLONES"])


def show_snapshots_one(s: dict[str, Any]) -> str:
    return show_snapshots([s])


def show_diff(d: dict[str, Any]) -> str:
    lines = [f"{d['from']} -> {d['to']}: {format_size(d['changed_bytes'])} changed in "
             f"{len(d['ranges'])} range(s)"]
    lines += [f"  {r['offset']:>16} {r['length']:>12}" for r in d["ranges"]]
    return "\n".join(lines)


def show_exports(items: list[dict[str, Any]]) -> str:
    """The exports' table, then the libvirt ``<disk>`` element of each NBD export and of
    each FUSE file (iSCSI, whose ``<auth>`` depends on the volume's policy: ``storagectl
    export iscsi NAME``)."""
    out = [_table([[e["name"], "ro" if e["read_only"] else "rw",
                    e.get("nbd") or e.get("nbd_unix") or "-",
                    _clients(e.get("clients", []))]
                   for e in items], ["EXPORT", "MODE", "NBD", "CLIENTS"])]
    for e in items:
        if m := re.fullmatch(r"nbd://\[?([^\]]+?)\]?:([0-9]+)/(.+)", e.get("nbd", "")):
            disk = disk_xml(m.group(1), int(m.group(2)), m.group(3), read_only=e["read_only"])
            out.append(f"\n{e['name']} (libvirt):\n{disk}")
        if m := re.fullmatch(r"nbd\+unix:///(.+)\?socket=(.+)", e.get("nbd_unix", "")):
            disk = unix_disk_xml(m.group(2), m.group(1), read_only=e["read_only"])
            out.append(f"\n{e['name']} (libvirt, NBD on the Unix socket):\n{disk}")
        if e.get("fuse"):
            disk = file_disk_xml(e["fuse"], read_only=e["read_only"])
            out.append(f"\n{e['name']} (libvirt, FUSE file):\n{disk}")
    return "\n".join(out)


def show_check(r: dict[str, Any]) -> str:
    head = f"pool {r['name']}: {r['segments']} segments, {r['records']} records"
    if r["fragments_checked"]:
        head += f", {r['fragments_checked']} fragments read"
    if r["ok"]:
        return head + ": no problems found"
    return "\n".join([head + f": {len(r['problems'])} problem(s)",
                      *(f"  - {p}" for p in r["problems"])])


def show_status(s: dict[str, Any]) -> str:
    out = [] if s.get("ready", True) else [
        "STARTING: the daemon is not serving everything yet (FUSE mount, metrics)", ""]
    out += ["POOLS", show_pools([p for p in s["pools"] if "size_bytes" in p])]
    out += [f"  {p['name']}: unavailable: {p['error']}" for p in s["pools"]
            if "size_bytes" not in p]
    out += ["", "VOLUMES", show_volumes(s["volumes"])]
    if s.get("nbd"):
        n = s["nbd"]
        where = " and ".join(w for w in (n.get("listen"), n.get("socket") and
                                         f"unix:{n['socket']}") if w)
        out += ["", f"NBD on {where}: {n['connections']} connection(s) open, "
                    f"{n['connections_total']} since start"]
    return "\n".join(out)


def show_iscsi_policy(r: dict[str, Any]) -> str:
    lines = [f"{r['name']}: {r['access']}"
             + (" (iscsi.default_acl)" if r["source"] == "default" else "")]
    if r["allow"]:
        lines.append("  initiators: " + ", ".join(r["allow"]))
    if r["chap_user"]:
        lines.append(f"  CHAP user: {r['chap_user']}")
    if r["mutual_chap_user"]:
        lines.append(f"  mutual CHAP user: {r['mutual_chap_user']}")
    if r.get("iscsi"):
        lines.append(f"  {r['iscsi']}")
        if m := re.fullmatch(r"iscsi://\[?([^\]]+?)\]?:([0-9]+)/(.+)/([0-9]+)", r["iscsi"]):
            iqn, usage = m.group(3), secret_usage(r["name"])
            lines += ["", "libvirt:", iscsi_disk_xml(
                m.group(1), int(m.group(2)), iqn, lun=int(m.group(4)),
                chap_user=r["chap_user"], secret_usage=usage)]
            if r["chap_user"]:
                lines += ["", "libvirt secret (virsh secret-define FILE, then virsh "
                          "secret-set-value UUID --file SECRET-FILE):",
                          secret_xml(usage, f"CHAP secret of storaged volume {r['name']}")]
    return "\n".join(lines)


def read_secret(path: str) -> str:
    """A CHAP secret from a file (one trailing newline is not part of it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError as e:
        raise SystemExit(f"storagectl: cannot read the secret file {path}: "
                         f"{e.strerror}") from e
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise SystemExit(f"storagectl: the secret in {path} is not UTF-8 text") from e


def iscsi_policy_params(args: argparse.Namespace) -> dict[str, Any]:
    for user, file, what in ((args.chap_user, args.chap_secret_file, "--chap"),
                             (args.mutual_chap_user, args.mutual_chap_secret_file,
                              "--mutual-chap")):
        if (user is None) != (file is None):
            raise SystemExit(f"storagectl: {what}-user and {what}-secret-file go together")
    params: dict[str, Any] = {"name": args.name, "allow": args.allow_initiator}
    if args.open:
        params["open"] = True
    if args.chap_user is not None:
        params["chap_user"] = args.chap_user
        params["chap_secret"] = read_secret(args.chap_secret_file)
    if args.mutual_chap_user is not None:
        params["mutual_chap_user"] = args.mutual_chap_user
        params["mutual_chap_secret"] = read_secret(args.mutual_chap_secret_file)
    return params


def _done(r: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in r.items())


GROUPS = {"pool": "pools: create, import, status, repair", "volume": "volumes: create, "
          "resize, send/receive, import/export images", "snapshot": "snapshots and clones",
          "export": "exports (NBD URIs, iSCSI access policies)",
          "qos": "QoS: groups (shared limits), pool defaults, every volume's settings",
          "status": "one-screen overview", "completion": "print a shell completion script"}
# Shell completion of file names (shtab.FILE, spelt out so that storagectl does not import
# shtab unless it prints a completion script).
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
_JSON_HELP = "print JSON for scripts (before or after the command)"
_SOCKET_HELP = "control socket (default: $STORAGED_SOCKET or /run/storaged/control.sock)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``only``, the subcommands of that group alone
    (argparse spends about 0.1 ms per argument, and storagectl's start-up is part of
    every send and receive), the other groups listed but empty.

    ``--json`` and ``--socket`` are taken before the command and after it: every command's
    parser has them too, with a SUPPRESS default so that one given before the command is
    not reset by the command's parser."""
    ap = argparse.ArgumentParser(prog="storagectl", description="storaged admin CLI "
                                 "(run 'storagectl GROUP -h' for a group's commands)")
    ap.add_argument("--socket", default=None, help=_SOCKET_HELP)
    ap.add_argument("--json", action="store_true", help=_JSON_HELP)
    ap.add_argument("--version", action=VersionAction)
    top = ap.add_subparsers(dest="group", metavar="GROUP", title="command groups")
    for group, text in GROUPS.items():
        sub = top.add_parser(group, help=text, description=text)
        if group == "status":
            _common_options(sub)
        elif group == "completion":
            sub.add_argument("shell", choices=["bash", "zsh"], help="the shell")
        elif only in (None, group):
            cmds = sub.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
            _SUBCOMMANDS[group](cmds)
            for leaf in cmds.choices.values():
                _common_options(leaf)
    return ap


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=_JSON_HELP)
    p.add_argument("--socket", default=argparse.SUPPRESS, help=_SOCKET_HELP)


def _group_of(argv: Sequence[str]) -> str | None:
    """The command group ``argv`` names (its first word that is not an option or the
    value of --socket), or None where it names none (then every group is built, for
    help and errors)."""
    words = iter(argv)
    for word in words:
        if word == "--socket":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in GROUPS else None
        elif word in ("-h", "--help"):
            return None
    return None


def _file(action: argparse.Action) -> None:
    """Complete this argument with file names."""
    action.complete = _FILE  # type: ignore[attr-defined]


_POOL = "pool name"
_MEMBER = "member number, device path or UUID (see pool status)"
_FILE_SIZE = "create a missing device file as a sparse file of this size"


def _rados_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--rados", metavar="RADOS_POOL",
                   help="the pool lives in this Ceph RADOS pool (no devices)")
    _file(c.add_argument("--ceph-conf", metavar="FILE",
                         help="with --rados: ceph.conf (default: $CEPH_CONF or "
                              "/etc/ceph/ceph.conf)"))
    c.add_argument("--ceph-id", metavar="NAME",
                   help="with --rados: the cephx client id (default admin)")


def _bad(message: str) -> ControlError:
    """A command line the daemon would refuse, refused before it is asked."""
    return ControlError(message, "InvalidArgument")


def rados_params(args: argparse.Namespace, devices: str) -> dict[str, Any]:
    """The ``rados`` parameter of pool create/import ({} without --rados); refuses
    devices beside --rados, and the Ceph options or --takeover without it."""
    if args.rados is None:
        given = [o for o, v in (("--ceph-conf", args.ceph_conf), ("--ceph-id", args.ceph_id),
                                ("--takeover", getattr(args, "takeover", False))) if v]
        if given:
            raise _bad(f"{', '.join(given)} only go with --rados RADOS_POOL")
        return {}
    if getattr(args, "devices", None):
        raise _bad(f"{devices} and --rados exclude each other: a pool lives on "
                           f"devices or in a RADOS pool")
    if getattr(args, "file_size", None):
        raise _bad("--file-size does not go with --rados (a RADOS pool has no "
                           "device files)")
    if getattr(args, "force", False):
        raise _bad("--force does not go with --rados" + (
            " (--takeover takes a pool held by another daemon)"
            if args.cmd == "import" else ""))
    target: dict[str, Any] = {"pool": args.rados}
    if args.ceph_conf:
        target["conf"] = _path(args.ceph_conf)
    if args.ceph_id:
        target["client"] = args.ceph_id
    return {"rados": target}


def _pool_commands(pool: SubParsers) -> None:
    c = pool.add_parser("create", help="create a pool from devices, or on a Ceph RADOS "
                        "pool (--rados)")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("devices", nargs="*", metavar="DEVICE",
                         help="block device or file (relative to the current directory)"))
    _rados_options(c)
    c.add_argument("--profile", default="plain",
                   help="redundancy: plain | mirror:N | ec:K+M (default plain; on RADOS "
                        "plain only: Ceph's pool gives the redundancy)")
    c.add_argument("--extent-size", default="16M", help="allocation unit (default 16M)")
    c.add_argument("--file-size", default=None, help=_FILE_SIZE + "s")
    c.add_argument("--force", action="store_true", help="overwrite labelled devices")
    c = pool.add_parser("import", help="import a pool from its devices (no name: list the "
                        "pools that could be imported, changing nothing)")
    c.add_argument("name", nargs="?", help=_POOL)
    _file(c.add_argument("--device", action="append", default=[], dest="devices",
                         metavar="DEVICE", help="look at this device (repeatable; default: "
                         "the devices the daemon remembers)"))
    c.add_argument("--force", action="store_true",
                   help="take over a pool its last owner did not export, once its "
                        "heartbeat has been silent for the activity interval")
    _rados_options(c)
    c.add_argument("--takeover", action="store_true",
                   help="with --rados: take the pool from the daemon that holds it, "
                        "blocklisting (fencing) that daemon's RADOS client first")
    c = pool.add_parser("export", help="close a pool (pool import brings it back); refused "
                        "while its volumes have clients")
    c.add_argument("name", help=_POOL)
    c.add_argument("--force", action="store_true",
                   help="disconnect the clients of its volumes first")
    c = pool.add_parser("destroy", help="destroy an empty pool (wipes its labels; on RADOS "
                        "deletes its objects)")
    c.add_argument("name", help=_POOL)
    _rados_options(c)
    pool.add_parser("status", help="devices, space, repair counters (no name: every "
                    "pool)").add_argument("name", nargs="?", help=_POOL)
    pool.add_parser("list", help="one line per pool")
    c = pool.add_parser("add-device", help="grow a pool by a device")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("device", help="block device or file"))
    c.add_argument("--file-size", default=None, help=_FILE_SIZE)
    c = pool.add_parser("scrub", help="verify and repair every record and metadata copy")
    c.add_argument("name", help=_POOL)
    g = c.add_mutually_exclusive_group()
    for flag, text in (("pause", "pause the running scrub"),
                       ("resume", "resume a paused scrub"),
                       ("cancel", "stop the scrub"), ("status", "show its progress only")):
        g.add_argument(f"--{flag}", action="store_const", const=flag, dest="action",
                       help=text)
    c.add_argument("--wait", action="store_true", help="wait until it is done")
    c = pool.add_parser("clean", help="run the segment cleaner now (reclaim overwritten "
                        "space)")
    c.add_argument("name", help=_POOL)
    c.add_argument("--threshold", type=float, default=1.0,
                   help="move segments less than this fraction live (default 1: any)")
    c.add_argument("--max-segments", type=int, default=8,
                   help="empty at most this many segments (default 8)")
    c = pool.add_parser("replace-device", help="rebuild a member onto another device")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("old", metavar="OLD", help=_MEMBER))
    _file(c.add_argument("new", metavar="NEW", help="the device or file to rebuild onto"))
    c.add_argument("--file-size", default=None, help=_FILE_SIZE)
    c.add_argument("--wait", action="store_true", help="wait until the rebuild is done")
    c = pool.add_parser("add-spare", help="keep a device to replace a faulted member")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("device", help="block device or file"))
    c.add_argument("--file-size", default=None, help=_FILE_SIZE)
    c = pool.add_parser("offline", help="stop using a member (maintenance)")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("device", help=_MEMBER))
    c = pool.add_parser("online", help="take a member back; resilvers what it missed")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("device", help=_MEMBER))
    _file(c.add_argument("--path", default=None, help="where the member's device is now"))
    c.add_argument("--wait", action="store_true", help="wait until the resilver is done")
    c = pool.add_parser("remove-device", help="move all data off a member and detach it")
    c.add_argument("name", help=_POOL)
    _file(c.add_argument("device", help=_MEMBER))
    c = pool.add_parser("check", help="verify all metadata and references (fsck)")
    c.add_argument("name", help=_POOL)
    c.add_argument("--deep", action="store_true", help="also read every fragment")
    c = pool.add_parser("set", help="set pool properties: qos.KEY=VALUE, the QoS new "
                        "volumes get (as 'qos defaults'; qos.iops=0 clears a limit)")
    c.add_argument("name", help=_POOL)
    c.add_argument("properties", nargs="+", metavar="PROPERTY=VALUE",
                   help="qos.iops, qos.read_iops, qos.write_iops, qos.bps, qos.read_bps, "
                   "qos.write_bps, qos.burst_iops, qos.burst_bps, qos.burst_seconds, "
                   "qos.iops_size, qos.weight, qos.group")


_FORCE = "disconnect the clients (NBD, iSCSI, FUSE) using it first"
_VOL = "the volume"
_SNAP = "the snapshot"


_QOS_OPTIONS = (("--iops", "N", "IOs per second, reads and writes together (0: no limit)"),
                ("--read-iops", "N", "read IOs per second"),
                ("--write-iops", "N", "write IOs per second"),
                ("--bps", "SIZE", "bytes per second, reads and writes together (100M)"),
                ("--read-bps", "SIZE", "bytes read per second"),
                ("--write-bps", "SIZE", "bytes written per second"),
                ("--burst-iops", "N", "IOPS allowed for --burst-seconds from idle"),
                ("--burst-bps", "SIZE", "bytes/s allowed for --burst-seconds from idle"),
                ("--burst-seconds", "S", "how long a burst lasts (default 1)"),
                ("--iops-size", "SIZE", "count a larger request as size/SIZE IOs"))


def _qos_options(c: argparse.ArgumentParser, *, volume: bool) -> None:
    for flag, meta, text in _QOS_OPTIONS:
        c.add_argument(flag, metavar=meta, help=text)
    if volume:
        c.add_argument("--weight", metavar="W",
                       help="share under contention, 1-10000 (default 100)")
        c.add_argument("--group", metavar="NAME", dest="qos_group",
                       help="also draw from this QoS group's limits ('' to leave it)")
    c.add_argument("--clear", action="store_true",
                   help="start from no limits (then apply the options given)")


def qos_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``set`` of a QoS command: the options given, as numbers (sizes stay text for
    the daemon to parse); a bad number is refused here in one line."""
    out: dict[str, Any] = {}
    for flag, _meta, _text in (*_QOS_OPTIONS, ("--weight", "", ""), ("--group", "", "")):
        key = flag[2:].replace("-", "_")
        v = getattr(args, "qos_group" if key == "group" else key, None)
        if v is None:
            continue
        if key == "group":
            out[key] = v or None
        elif key == "burst_seconds":
            try:
                out[key] = float(v)
            except ValueError:
                raise ControlError(f"{flag} must be a number of seconds, "
                                   f"not {v!r}", "InvalidArgument") from None
        elif key.endswith("bps") or key == "iops_size":
            out[key] = v
        else:
            try:
                out[key] = int(v)
            except ValueError:
                raise ControlError(f"{flag} must be a whole number, not {v!r}",
                                   "InvalidArgument") from None
    return out


def pool_properties(args: argparse.Namespace) -> dict[str, Any]:
    """``pool set``'s PROPERTY=VALUE words as a QoS ``set`` (qos.* is all there is)."""
    options: list[str] = []
    for word in args.properties:
        key, sep, value = word.partition("=")
        if not sep or not key.startswith("qos.") or not value:
            raise ControlError(f"{word!r} is not qos.KEY=VALUE (pool set takes the QoS "
                               f"new volumes get, e.g. qos.iops=1000)", "InvalidArgument")
        options += [f"--{key.removeprefix('qos.').replace('_', '-')}", value]
    parsed = argparse.Namespace(**{k: None for k in (
        "iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps", "burst_iops",
        "burst_bps", "burst_seconds", "iops_size", "weight", "qos_group")})
    flags = {f for f, _m, _t in _QOS_OPTIONS} | {"--weight", "--group"}
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if flag not in flags:
            raise ControlError(f"unknown pool property qos.{flag[2:].replace('-', '_')}",
                               "InvalidArgument")
        setattr(parsed, "qos_group" if flag == "--group" else flag[2:].replace("-", "_"),
                value)
    return qos_params(parsed)


def _rate(n: float) -> str:
    return f"{n:.0f}" if n < 10_000 else f"{n / 1000:.0f}k"


def show_qos(r: dict[str, Any]) -> str:
    q = r["qos"]
    rows = []
    for key in ("iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps",
                "burst_iops", "burst_bps", "burst_seconds", "iops_size", "weight", "group"):
        if key not in q:
            continue
        v = q[key]
        if key.endswith("bps") or key == "iops_size":
            text = f"{format_size(v)}/s" if v and key != "iops_size" else (
                format_size(v) if v else "-")
        elif key == "group":
            text = v or "-"
        elif key in ("weight", "burst_seconds"):
            text = f"{v:g}"
        else:
            text = str(v) if v else "-"
        rows.append([key.replace("_", "-"), text])
    return f"{r['name']}\n" + _table(rows, ["SETTING", "VALUE"])


def show_qos_list(r: dict[str, Any]) -> str:
    rows = []
    for pool, q in sorted(r.items()):
        if q["defaults"]:
            rows.append([f"{pool} (defaults)", "defaults", _limits(q["defaults"])])
        for g, info in q["groups"].items():
            rows.append([f"{pool}/{g}", "group", _limits(info["limits"])
                         + (f"  members: {', '.join(info['members'])}"
                            if info["members"] else "")])
        for v, s in q["volumes"].items():
            rows.append([f"{pool}/{v}", "volume", _limits(s)])
    return _table(rows, ["NAME", "KIND", "SETTINGS"])


def _limits(s: dict[str, Any]) -> str:
    if not s:
        return "-"
    return " ".join(f"{k.replace('_', '-')}={format_size(v) if k.endswith('bps') else v}"
                    for k, v in s.items())


def top_rows(before: list[dict[str, Any]], after: list[dict[str, Any]],
             seconds: float) -> list[dict[str, Any]]:
    """``volume top``'s rows from two samples ``seconds`` apart, busiest first: IOPS,
    bytes/s, p99 latency of the requests in between (the upper bound of its histogram
    bucket), and the share of the time the volume's requests spent waiting for its QoS
    limits (summed over requests, so it may pass 100% with many requests waiting)."""
    old = {s["name"]: s for s in before}
    rows = []
    for s in after:
        o = old.get(s["name"])
        if o is None:
            continue
        reads, writes = s["reads"] - o["reads"], s["writes"] - o["writes"]
        counts = [0] * len(s["latency_bounds"]) + [0]
        for op in ("read", "write"):
            for i, (a, b) in enumerate(zip(s["latency"][op], o["latency"][op],
                                           strict=True)):
                counts[i] += a - b
        total, p99 = sum(counts), None
        if total:
            seen = 0
            for i, n in enumerate(counts):
                seen += n
                if seen >= 0.99 * total:
                    bounds = s["latency_bounds"]
                    p99 = bounds[i] if i < len(bounds) else float("inf")
                    break
        rows.append({"name": s["name"], "read_iops": reads / seconds,
                     "write_iops": writes / seconds,
                     "read_bps": (s["bytes_read"] - o["bytes_read"]) / seconds,
                     "write_bps": (s["bytes_written"] - o["bytes_written"]) / seconds,
                     "p99_seconds": p99,
                     "throttled": (s["throttled_seconds"] - o["throttled_seconds"])
                     / seconds, "waiting": s["waiting"]})
    rows.sort(key=lambda r: -(r["read_iops"] + r["write_iops"]))
    return rows


def show_top(rows: list[dict[str, Any]]) -> str:
    def lat(p: float | None) -> str:
        if p is None:
            return "-"
        if p == float("inf"):
            return ">10s"
        return f"{p * 1e6:.0f}us" if p < 1e-3 else f"{p * 1e3:g}ms"
    return _table([[r["name"], _rate(r["read_iops"]), _rate(r["write_iops"]),
                    f"{format_size(int(r['read_bps']))}/s",
                    f"{format_size(int(r['write_bps']))}/s", lat(r["p99_seconds"]),
                    f"{100 * r['throttled']:.0f}%", str(r["waiting"])] for r in rows],
                  ["VOLUME", "R_IOPS", "W_IOPS", "R_BW", "W_BW", "P99", "THROTTLED",
                   "WAITING"])


def run_top(args: argparse.Namespace, path: str) -> int:
    """``volume top``: a table every --interval seconds (``--once``: one, then exit)."""
    params = {"pool": args.pool} if args.pool else {}
    before = call(path, "volume.top", params, lambda _p: None)
    at = time.monotonic()
    while True:
        time.sleep(args.interval)
        after = call(path, "volume.top", params, lambda _p: None)
        now = time.monotonic()
        rows = top_rows(before, after, now - at)
        before, at = after, now
        if args.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
        else:
            if not args.once and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(show_top(rows))
        sys.stdout.flush()
        if args.once:
            return 0


def _qos_commands(qos: SubParsers) -> None:
    qos.add_parser("list", help="the QoS of every volume, group and pool default").add_argument(
        "pool", nargs="?", help="only this pool's")
    c = qos.add_parser("group", help="create or change a group: limits its volumes share "
                       "(no option: show it)")
    c.add_argument("name", metavar="POOL/GROUP", help="the group")
    _qos_options(c, volume=False)
    c.add_argument("--delete", action="store_true", help="delete the group (no members)")
    c = qos.add_parser("defaults", help="the QoS new volumes of a pool get (no option: "
                       "show it)")
    c.add_argument("pool", help=_POOL)
    _qos_options(c, volume=True)


def _volume_commands(vol: SubParsers) -> None:
    c = vol.add_parser("qos", help="set (or show) a volume's QoS limits and weight")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    _qos_options(c, volume=True)
    c = vol.add_parser("top", help="the busiest volumes, live: IOPS, bandwidth, p99, "
                       "throttled")
    c.add_argument("pool", nargs="?", help="only this pool's")
    c.add_argument("--once", action="store_true", help="one table, then exit")
    c.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between tables (default 1)")
    c = vol.add_parser("create", help="create a thin volume")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    c.add_argument("--size", required=True, help="virtual size (10G)")
    c.add_argument("--block-size", default="64K", help="block size (default 64K)")
    c.add_argument("--profile", default=None,
                   help="redundancy profile (default: the pool's)")
    c.add_argument("--compression", choices=["lz4", "off"], default="lz4",
                   help="compression of its blocks (default lz4)")
    vol.add_parser("list", help="the volumes (of one pool)").add_argument(
        "pool", nargs="?", help="only this pool's")
    vol.add_parser("info", help="a volume's sizes, space and clients").add_argument(
        "name", metavar="POOL/VOL", help=_VOL)
    c = vol.add_parser("resize", help="grow (or shrink) a volume")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    c.add_argument("--size", required=True,
                   help="new size (10G), or relative to the current one: +10G, -1G")
    c.add_argument("--allow-shrink", action="store_true",
                   help="allow a smaller size (the data past the new end is discarded)")
    c = vol.add_parser("delete", help="delete a volume")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    c.add_argument("--recursive", "-r", action="store_true",
                   help="also delete the volume's snapshots")
    c.add_argument("--force", action="store_true", help=_FORCE)
    c = vol.add_parser("rename", help="rename a volume (its snapshots follow it)")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    c.add_argument("new_name", metavar="NEWNAME", help="its new name (in the same pool)")
    c.add_argument("--force", action="store_true", help=_FORCE)
    c = vol.add_parser("send", help="write a snapshot as a stream (stdout by default)")
    c.add_argument("name", metavar="POOL/VOL@SNAP", help=_SNAP)
    c.add_argument("--from", dest="base", metavar="@BASE",
                   help="incremental: only what changed since this older snapshot")
    _file(c.add_argument("-o", "--output", metavar="FILE",
                         help="write here instead of stdout"))
    c.add_argument("--resume", type=int, default=0, metavar="N",
                   help="start at record N (what an interrupted receive asks for)")
    c = vol.add_parser("receive", help="create a volume (or apply an increment) from a "
                       "stream (stdin by default)")
    c.add_argument("name", metavar="POOL/VOL", help=_VOL)
    _file(c.add_argument("-i", "--input", metavar="FILE",
                         help="read here instead of stdin"))
    c.add_argument("--profile", help="redundancy profile of a new volume (default: the "
                   "pool's)")
    c.add_argument("--resumable", "-s", action="store_true",
                   help="keep what arrived if the stream breaks off, for --resume")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted resumable receive")
    c.add_argument("--abort", action="store_true",
                   help="discard an interrupted receive instead")
    c.add_argument("--force", "-F", action="store_true",
                   help="apply an increment even if the volume was written after its base "
                        "(those writes are discarded) or has clients (they are "
                        "disconnected)")
    c = vol.add_parser("import", help="create a volume from a disk image (via qemu-img)")
    c.add_argument("name", metavar="POOL/VOL", help="the new volume")
    _file(c.add_argument("image", help="the image file"))
    c.add_argument("--format", "-f", help="image format (qcow2, raw, vmdk, vdi, ...; "
                   "default: detected)")
    c.add_argument("--profile", help="redundancy profile (default: the pool's)")
    c = vol.add_parser("export", help="write a volume or snapshot to a disk image")
    c.add_argument("name", metavar="POOL/VOL[@SNAP]", help="the volume or snapshot")
    _file(c.add_argument("image", help="the new image file"))
    c.add_argument("--format", "-f", default="raw", choices=["raw", "qcow2", "vmdk", "vdi",
                                                              "vpc", "vhdx"],
                   help="image format (default raw)")


def _snapshot_commands(snap: SubParsers) -> None:
    snap.add_parser("create", help="snapshot a volume (O(1), consistent)").add_argument(
        "name", metavar="POOL/VOL@SNAP", help="the new snapshot")
    snap.add_parser("list", help="the snapshots (of one volume)").add_argument(
        "volume", nargs="?", metavar="POOL/VOL", help="only this volume's")
    for cmd, text in (("delete", "delete a snapshot"),
                      ("rollback", "bring a volume back to a snapshot")):
        c = snap.add_parser(cmd, help=text)
        c.add_argument("name", metavar="POOL/VOL@SNAP", help=_SNAP)
        c.add_argument("--force", action="store_true", help=_FORCE)
    c = snap.add_parser("clone", help="a writable volume from a snapshot")
    c.add_argument("name", metavar="POOL/VOL@SNAP", help=_SNAP)
    c.add_argument("target", metavar="POOL/NEWVOL", help="the new volume")
    c = snap.add_parser("diff", help="block ranges that changed (for incremental backup)")
    c.add_argument("base", metavar="POOL/VOL@A", help="the older snapshot")
    c.add_argument("other", nargs="?", metavar="POOL/VOL@B",
                   help="default: the live volume")


def _export_commands(exp: SubParsers) -> None:
    exp.add_parser("list", help="the NBD URI and clients of every volume and snapshot")
    c = exp.add_parser("iscsi", help="set (or show) a volume's iSCSI access policy")
    c.add_argument("name", metavar="POOL/VOLUME", help=_VOL)
    c.add_argument("--allow-initiator", action="append", default=[], metavar="IQN",
                   help="only this initiator may see and log in (repeatable)")
    c.add_argument("--chap-user", metavar="USER", help="initiators must log in with CHAP")
    _file(c.add_argument("--chap-secret-file", metavar="FILE",
                         help="file holding the CHAP secret (read here, never printed)"))
    c.add_argument("--mutual-chap-user", metavar="USER",
                   help="the target proves itself to the initiator (mutual CHAP)")
    _file(c.add_argument("--mutual-chap-secret-file", metavar="FILE",
                         help="file holding the mutual CHAP secret"))
    c.add_argument("--open", action="store_true",
                   help="clear the policy: every initiator, no authentication")


_SUBCOMMANDS = {"pool": _pool_commands, "volume": _volume_commands,
                "snapshot": _snapshot_commands, "export": _export_commands,
                "qos": _qos_commands}


def request(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any]:
    """The API method, its params and the renderer for a parsed command line."""
    g, cmd = args.group, getattr(args, "cmd", None)
    if g == "pool":
        if cmd == "create":
            rados = rados_params(args, "DEVICEs")
            if rados:
                return ("pool.create", {"name": args.name, "profile": args.profile,
                                        "extent_size": args.extent_size, **rados},
                        show_pool_status)
            if not args.devices:
                raise _bad("pool create needs at least one DEVICE, or --rados "
                                   "RADOS_POOL")
            params = {"name": args.name, "devices": [_path(d) for d in args.devices],
                      "profile": args.profile,
                      "extent_size": args.extent_size, "force": args.force}
            if args.file_size:
                params["file_size"] = args.file_size
            return "pool.create", params, show_pool_status
        if cmd == "import":
            rados = rados_params(args, "--device")
            if rados:
                if args.name is None:
                    raise _bad("pool import --rados needs the pool's NAME")
                return ("pool.import", {"name": args.name, "takeover": args.takeover,
                                        **rados}, show_import)
            params = {"name": args.name, "devices": [_path(d) for d in args.devices]}
            if args.force:
                params["force"] = True
            return "pool.import", params, show_import
        if cmd == "list":
            return "pool.list", {}, show_pools
        if cmd == "status":
            if args.name is None:
                return "pool.status", {}, show_pool_statuses
            return "pool.status", {"name": args.name}, show_pool_status
        if cmd == "add-device":
            params = {"name": args.name, "device": _path(args.device)}
            if args.file_size:
                params["file_size"] = args.file_size
            return "pool.add_device", params, show_pool_status
        if cmd == "check":
            return "pool.check", {"name": args.name, "deep": args.deep}, show_check
        if cmd == "scrub":
            return ("pool.scrub", {"name": args.name, "action": args.action or "start",
                                   "wait": args.wait}, show_scrub)
        if cmd == "clean":
            return ("pool.clean", {"name": args.name, "threshold": args.threshold,
                                   "max_segments": args.max_segments}, show_clean)
        if cmd == "replace-device":
            params = {"name": args.name, "old": _member(args.old), "new": _path(args.new),
                      "wait": args.wait}
            if args.file_size:
                params["file_size"] = args.file_size
            return "pool.replace_device", params, show_pool_status
        if cmd == "add-spare":
            params = {"name": args.name, "device": _path(args.device)}
            if args.file_size:
                params["file_size"] = args.file_size
            return "pool.add_spare", params, show_pool_status
        if cmd in ("offline", "online", "remove-device"):
            params = {"name": args.name, "device": _member(args.device)}
            if cmd == "online":
                params["wait"] = args.wait
                if args.path:
                    params["path"] = _path(args.path)
            return f"pool.{cmd.replace('-', '_')}", params, show_pool_status
        if cmd == "export":
            return "pool.export", {"name": args.name, "force": args.force}, _done
        if cmd == "set":
            return ("qos.defaults", {"pool": args.name, "set": pool_properties(args)},
                    show_qos)
        if cmd == "destroy":
            # --rados: finish an interrupted destroy of a pool not imported here
            params = {"name": args.name, **rados_params(args, "")}
            return "pool.destroy", params, _done
        return f"pool.{cmd}", {"name": args.name}, _done
    if g == "volume":
        if cmd == "create":
            params = {"name": args.name, "size": args.size, "block_size": args.block_size,
                      "compression": args.compression}
            if args.profile:
                params["profile"] = args.profile
            return "volume.create", params, show_volume
        if cmd == "list":
            return "volume.list", {"pool": args.pool} if args.pool else {}, show_volumes
        if cmd == "info":
            return "volume.info", {"name": args.name}, show_volume
        if cmd == "qos":
            return ("volume.qos", {"name": args.name, "set": qos_params(args),
                                   "clear": args.clear}, show_qos)
        if cmd == "resize":
            return "volume.resize", {"name": args.name, "size": args.size,
                                     "allow_shrink": args.allow_shrink}, show_volume
        if cmd == "rename":
            return ("volume.rename", {"name": args.name, "new_name": args.new_name,
                                      "force": args.force}, show_volume)
        return "volume.delete", {"name": args.name, "recursive": args.recursive,
                                 "force": args.force}, _done
    if g == "snapshot":
        if cmd == "create":
            return "snapshot.create", {"name": args.name}, show_snapshots_one
        if cmd == "list":
            return ("snapshot.list", {"volume": args.volume} if args.volume else {},
                    show_snapshots)
        if cmd == "rollback":
            return ("snapshot.rollback", {"name": args.name, "force": args.force},
                    show_volume)
        if cmd == "clone":
            return "snapshot.clone", {"name": args.name, "target": args.target}, show_volume
        if cmd == "diff":
            params = {"from": args.base}
            if args.other:
                params["to"] = args.other
            return "snapshot.diff", params, show_diff
        return "snapshot.delete", {"name": args.name, "force": args.force}, _done
    if g == "qos":
        if cmd == "group":
            return ("qos.group", {"name": args.name, "set": qos_params(args),
                                  "clear": args.clear, "delete": args.delete},
                    lambda r: _done(r) if r.get("deleted") else show_qos(r))
        if cmd == "defaults":
            return ("qos.defaults", {"pool": args.pool, "set": qos_params(args),
                                     "clear": args.clear}, show_qos)
        return "qos.list", {"pool": args.pool} if args.pool else {}, show_qos_list
    if g == "export":
        if cmd == "iscsi":
            return "export.iscsi", iscsi_policy_params(args), show_iscsi_policy
        return "export.list", {}, show_exports
    return "status", {}, show_status


def _path(path: str) -> str:
    """A device or file path as the daemon must see it: relative to the caller's
    directory, not the daemon's (under systemd, /)."""
    return os.path.abspath(path)


_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")


def _member(ref: str) -> str:
    """A member reference (number, path or UUID) with a path made absolute."""
    if ref.isdigit() or _UUID.fullmatch(ref):
        return ref
    return _path(ref)


def _group_parser(parser: argparse.ArgumentParser, group: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[group]
            return sub
    raise AssertionError("storagectl's parser has no command groups")


def _relative_sizes(argv: Sequence[str]) -> list[str]:
    """``--size -10G`` as ``--size=-10G`` (argparse takes a lone ``-10G`` for an option)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--size" and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"--size={arg}"
        else:
            out.append(arg)
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but for ``pool create``'s devices: its DEVICE
    positional takes none (``--rados``) or more, and argparse (3.11) hands such a
    positional nothing when an option comes between it and the name (``pool create tank
    --profile mirror:2 d0 d1``), leaving d0 d1 over; those are its devices, in order."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if (args.group == "pool" and getattr(args, "cmd", None) == "create"
                and not any(word.startswith("-") for word in extra)):
            args.devices = [*args.devices, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """storagectl's entry point. A reader that goes away (``storagectl status | head -1``)
    ends it quietly with status 141, as SIGPIPE ends other tools; SIGPIPE itself stays
    ignored, so that a daemon closing the control socket is an error message."""
    try:
        rc = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Nothing more can be written; point stdout at /dev/null so that the interpreter's
        # own flush at exit does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    return rc


def _usage(parser: argparse.ArgumentParser) -> int:
    """A bare ``storagectl`` (or ``storagectl pool``): its help on stdout, status 2 (a
    command is missing, as for any usage error)."""
    parser.print_help()
    return 2


def _main(argv: Sequence[str]) -> int:
    argv = _relative_sizes(argv)
    parser = build_parser(_group_of(argv))
    args = parse(parser, argv)
    if args.group is None:
        return _usage(parser)
    if args.group == "completion":
        from storaged.ctl.completion import script  # noqa: PLC0415 - shtab only when asked
        print(script(build_parser(), args.shell), end="")
        return 0
    if args.group != "status" and getattr(args, "cmd", None) is None:
        return _usage(_group_parser(parser, args.group))
    path = args.socket or default_socket()
    tty = sys.stderr.isatty()
    if args.group == "volume" and args.cmd in ("send", "receive", "import", "export"):
        if args.cmd in ("import", "export"):
            args.image = _path(args.image)
        try:
            return portable.run(args, path, not args.json, tty)
        except ControlError as e:
            if tty:
                print(file=sys.stderr)
            print(f"storagectl: {e.message}", file=sys.stderr)
            return 1
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if getattr(e, "filename", None) not in (None, path):
                print(f"storagectl: {e}", file=sys.stderr)
                return 1
            print(f"storagectl: the storaged daemon is not running (no socket at {path}; "
                  f"use --socket or STORAGED_SOCKET)", file=sys.stderr)
            return 2
        except (OSError, ConnectionError) as e:
            print(f"storagectl: {e}", file=sys.stderr)
            return 1
    try:
        if args.group == "volume" and args.cmd == "top":
            return run_top(args, path)
        method, params, render = request(args)
    except ControlError as e:
        print(f"storagectl: {e.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"storagectl: the storaged daemon is not running (no socket at {path}; "
              f"use --socket or STORAGED_SOCKET)", file=sys.stderr)
        return 2
    # A bar on a terminal; elsewhere a line per step, for the commands that wait.
    bar = (ProgressBar(sys.stderr, tty=tty) if not args.json and (tty or params.get("wait"))
           else None)

    def progress(p: dict[str, Any]) -> None:
        if bar is not None:
            bar.unit = p.get("unit", "steps")
            rate = p.get("rate")
            bar.update(str(p.get("phase", "")), int(p.get("done", 0)), int(p.get("total", 0)),
                       rate=float(rate) if rate else None, eta=p.get("eta"))
    try:
        result = call(path, method, params, progress)
    except ControlError as e:
        if bar is not None:
            bar.close()
        print(f"storagectl: {e.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"storagectl: the storaged daemon is not running (no socket at {path}; "
              f"use --socket or STORAGED_SOCKET)", file=sys.stderr)
        return 2
    except PermissionError:
        print(f"storagectl: permission denied on {path}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    if isinstance(result, dict) and result.get("warning"):
        print(f"storagectl: warning: {result['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
