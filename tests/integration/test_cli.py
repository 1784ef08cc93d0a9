"""storagectl's conventions (issue 22): --json before or after every command, --version, a
bare storagectl prints its help, pool status of every pool, relative paths resolved in
the caller's directory, a closed pipe ends quietly, a help line for everything, and shell
completion. The parser tests are generated from storagectl's own parser, so a command
added later is covered without touching this file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from storaged.ctl import cli
from tests.kit.daemonkit import BIN, Daemon, _qemu_io

DAEMON_COMMANDS = ("pool", "volume", "snapshot", "export", "status")


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser] | None:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def _commands(p: argparse.ArgumentParser, words: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree with the words that reach it (the top one included)."""
    yield words, p
    sub = _subparsers(p)
    if sub is not None:
        for name, child in sub.choices.items():
            yield from _commands(child, (*words, name))


def _leaves() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [(w, p) for w, p in _commands(cli.build_parser())
            if w and w[0] in DAEMON_COMMANDS and _subparsers(p) is None]


def _minimal_argv(p: argparse.ArgumentParser) -> list[str]:
    """The positionals and required options a command needs, with plausible values."""
    out: list[str] = []
    for a in p._actions:
        value = (str(next(iter(a.choices))) if a.choices
                 else "1G" if a.dest == "size" else "x")
        if not a.option_strings and a.nargs != "?":
            out.append(value)
        elif a.option_strings and a.required:
            out += [a.option_strings[0], value]
    return out


LEAVES = _leaves()


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(w) for w, _p in LEAVES}
    assert len(names) >= 34
    assert {"status", "pool status", "pool replace-device", "volume send",
            "snapshot diff", "export iscsi"} <= names


@pytest.mark.parametrize("words,parser", LEAVES, ids=[" ".join(w) for w, _p in LEAVES])
def test_json_and_socket_before_or_after_every_command(
        words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    argv = [*words, *_minimal_argv(parser)]
    for only in (None, words[0]):       # the full parser and the lazily built one
        ap = cli.build_parser(only)
        assert ap.parse_args(argv).json is False
        assert ap.parse_args(["--json", *argv]).json is True
        assert ap.parse_args([*argv, "--json"]).json is True
        assert ap.parse_args([*argv, "--socket", "/s"]).socket == "/s"
        assert ap.parse_args(["--socket", "/s", *argv]).socket == "/s"
        # One given before the command is not reset by the command's own option.
        assert ap.parse_args(["--json", "--socket", "/s", *argv]).socket == "/s"


def test_every_command_and_option_has_a_help_line() -> None:
    missing = []
    for words, p in _commands(cli.build_parser()):
        where = " ".join(("storagectl", *words))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helped = {c.dest for c in a._choices_actions if (c.help or "").strip()}
                missing += [f"{where} {n}" for n in a.choices if n not in helped]
            elif not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{where} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def _ctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "storagectl"), *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


def test_version_of_both_programs() -> None:
    v = version("storaged")
    r = _ctl("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"storagectl {v}\n", "")
    r = subprocess.run([str(BIN / "storaged"), "--version"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert (r.returncode, r.stdout) == (0, f"storaged {v}\n")


def test_bare_storagectl_and_bare_group_print_their_help(tmp_path: Path) -> None:
    r = _ctl("--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and r.stderr == ""
    assert r.stdout.startswith("usage: storagectl")
    assert all(f"    {g}" in r.stdout for g in cli.GROUPS)
    r = _ctl("pool")
    assert r.returncode == 2 and r.stderr == ""
    assert r.stdout.startswith("usage: storagectl pool")
    assert "replace-device" in r.stdout and "rebuild a member" in r.stdout


def test_member_references_keep_numbers_and_uuids() -> None:
    uuid = "0b8e3c1e-95a4-4c54-8d1c-3f0b53f6f2aa"
    assert cli._member("2") == "2"
    assert cli._member(uuid) == uuid
    assert cli._member("disk2.img") == os.path.join(os.getcwd(), "disk2.img")
    assert cli._member("../d/x") == os.path.abspath("../d/x")


def test_completion_scripts(tmp_path: Path) -> None:
    bash = _ctl("completion", "bash")
    assert bash.returncode == 0 and "replace-device" in bash.stdout
    (tmp_path / "c.bash").write_text(bash.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "c.bash")],
                          check=False).returncode == 0
    # The script completes: a subcommand, the --json of a command, a device's file name.
    (tmp_path / "disk0.img").touch()
    probe = (f"source {tmp_path / 'c.bash'}; cd {tmp_path}; complete() {{ COMP_WORDS=(\"$@\");"
             " COMP_CWORD=$(($# - 1)); COMPREPLY=(); _shtab_storagectl;"
             " echo \"${COMPREPLY[*]}\"; }; complete storagectl pool replace-;"
             " complete storagectl volume list --js; complete storagectl pool create t dis")
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30,
                       check=False)
    assert r.stdout.splitlines() == ["replace-device", "--json", "disk0.img"], r
    zsh = _ctl("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef storagectl")
    assert "remove-device" in zsh.stdout


def _closed_pipe(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """storagectl writing into a pipe nobody reads any more (what `| head -1` becomes)."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        return subprocess.run([str(BIN / "storagectl"), "--socket", d.sock, *args],
                              stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    finally:
        os.close(w_fd)


def test_cli_conventions_against_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"        # the caller's directory; the daemon runs in pytest's
    work.mkdir()

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return _ctl("--socket", daemon.sock, *args, cwd=work)

    def ok_json(*args: str) -> Any:
        r = ctl(*args, "--json")     # --json after the command
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    # Relative device paths are the caller's.
    tank = ok_json("pool", "create", "tank", "d0", "sub/../d1", "--profile", "mirror:2",
                   "--file-size", "64M")
    assert isinstance(tank, dict)
    assert [d["path"] for d in tank["devices"]] == [str(work / "d0"), str(work / "d1")]
    assert (work / "d0").exists() and not (Path.cwd() / "d0").exists()

    # Refused commands with --file-size leave no file behind, and change nothing.
    before = os.listdir(work)
    for args, words in (
            (("pool", "create", "bad", "e0", "--profile", "raid5", "--file-size", "64M"),
             "unknown redundancy profile"),
            (("pool", "add-device", "ghost", "e0", "--file-size", "64M"), "no pool"),
            (("pool", "add-spare", "tank", "e0", "--file-size", "1M"), "too small"),
            (("pool", "replace-device", "tank", "d0", "e0", "--file-size", "1M"), "too small")):
        r = ctl(*args)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("storagectl: ") and r.stderr.count("\n") == 1
        assert sorted(os.listdir(work)) == sorted(before), args
    st = ok_json("pool", "status", "tank")
    assert isinstance(st, dict)
    assert [d["state"] for d in st["devices"]] == ["online", "online"] and not st["spares"]
    assert "no problems found" in ctl("pool", "check", "tank", "--deep").stdout
    # A member named by its relative path.
    r = ctl("pool", "offline", "tank", "d1")
    assert r.returncode == 0, r.stderr
    assert ok_json("pool", "online", "tank", "./d1", "--wait")["devices"][1][
        "state"] == "online"

    # pool status without a name: every pool.
    ok_json("pool", "create", "lab", "l0", "--file-size", "64M")
    every = ok_json("pool", "status")
    assert isinstance(every, list)
    assert [p["name"] for p in every] == ["lab", "tank"]
    assert all("data_bytes" in p and p["devices"] for p in every)
    text = ctl("pool", "status").stdout
    assert text.count("NAME") == 2 and str(work / "l0") in text and str(work / "d1") in text

    # --json after a handful more commands, end to end.
    assert ok_json("volume", "create", "tank/v", "--size", "16M")["name"] == "tank/v"
    assert [v["name"] for v in ok_json("volume", "list")] == ["tank/v"]
    ok_json("snapshot", "create", "tank/v@s")
    assert [s["name"] for s in ok_json("snapshot", "list", "tank/v")] == ["tank/v@s"]
    assert {e["name"] for e in ok_json("export", "list")} == {"tank/v", "tank/v@s"}
    status = ok_json("status")
    assert [p["name"] for p in status["pools"]] == ["lab", "tank"]
    assert status["ready"] is True          # everything is up (READY=1)
    assert "STARTING" not in ctl("status").stdout

    # Images: relative to the caller too (qemu-img runs here, the result names the file).
    _qemu_io(daemon.url("tank/v"), "write -P 0x5a 1M 64K")
    out = ok_json("volume", "export", "tank/v", "v.raw")
    assert isinstance(out, dict) and out["image"] == str(work / "v.raw")
    with open(work / "v.raw", "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    r = ctl("volume", "export", "tank/ghost", "g.raw")
    assert r.returncode == 1 and not (work / "g.raw").exists()
    # send -o and receive -i: the caller's files; a refused send leaves none.
    ok_json("snapshot", "create", "tank/v@s2")
    ok_json("volume", "send", "tank/v@s2", "-o", "s.stream")
    assert ok_json("volume", "receive", "lab/w", "-i", "s.stream")["volume"] == "lab/w"
    _qemu_io(daemon.url("lab/w"), "read -P 0x5a 1M 64K", "read -P 0 0 1M", read_only=True)
    r = ctl("volume", "send", "tank/v@ghost", "-o", "g.stream")
    assert r.returncode == 1 and not (work / "g.stream").exists(), r.stderr
    # import --device relative.
    ok_json("pool", "export", "lab")
    assert ok_json("pool", "import", "lab", "--device", "l0")["state"] == "online"

    # A reader that went away: quiet, status 141 (as SIGPIPE), no traceback.
    for cmd in (("--json", "status"), ("pool", "status", "tank"), ("pool", "status")):
        r = _closed_pipe(daemon, *cmd)
        assert (r.returncode, r.stderr) == (141, ""), (cmd, r.stderr)
    r = subprocess.run(["bash", "-c", f"{BIN / 'storagectl'} --socket {daemon.sock} --json "
                        "status | head -1"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert (r.stdout, r.stderr) == ("{\n", "")
