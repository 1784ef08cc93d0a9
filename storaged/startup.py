"""What the daemon makes sure of before it touches any pool (issue 20 item 8, issue 21 "the
daemon itself").

Invariants:
D1. One daemon per state directory: ``lock_state_dir`` takes an exclusive flock on
    STATE_DIR/storaged.pid (holding the daemon's pid) before any pool is imported, and the
    daemon holds it until it exits (the kernel drops it then, even on kill -9). A second
    daemon on the same directory stops there, naming the first one's pid, having read or
    written nothing else.
D2. A control socket that answers belongs to a running daemon and is never unlinked
    (``check_control_socket``); only one that refuses connections (left by a daemon that
    died) is replaced.
D4. The same holds for every Unix socket the daemon listens on (the control socket,
    ``nbd.socket``): ``bind_unix`` refuses a path another process serves, replaces only a
    dead one, and ``unlink_unix`` removes at exit only the socket this daemon made (same
    inode), never one a later daemon put there.
D3. Every start-up failure is a ``StartupError`` (or another StorageError) with one line
    that names the config key or the file at fault; the daemon exits 1 with that line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat

import trio

from pool.errors import StorageError

PID_FILE = "storaged.pid"


class StartupError(StorageError):
    """The daemon cannot start; the message says why in one line."""


def lock_state_dir(state_dir: str) -> int:
    """Take the state directory for this process (D1); the returned descriptor holds the
    lock and must stay open for the daemon's lifetime."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, PID_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StartupError(f"state_dir {state_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(f"state_dir {state_dir}: cannot lock {path}: "
                               f"{e.strerror or e}") from None
        who = f"storaged pid {holder}" if holder else "another storaged"
        raise StartupError(f"state_dir {state_dir} is in use by {who} (it holds the lock "
                           f"on {path}); stop it first, or give this one another "
                           f"--state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def socket_is_live(path: str) -> bool:
    """Whether a daemon answers on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def check_control_socket(path: str) -> None:
    """Refuse a control socket path that a running daemon serves (D2)."""
    if os.path.exists(path) and socket_is_live(path):
        raise StartupError(f"socket {path} is served by another running storaged; stop "
                           f"it first, or give this one another --socket")


def check_unix_socket(key: str, path: str) -> None:
    """Refuse a Unix socket path (``nbd.socket``) that another process serves, or that
    is something other than a socket (D4)."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise StartupError(f"{key} {path}: exists and is not a socket; remove it or give "
                           f"another path")
    if os.path.exists(path) and socket_is_live(path):
        raise StartupError(f"{key} {path} is served by another running process (another "
                           f"storaged?); stop it first, or give this one another path")


async def bind_unix(key: str, path: str, mode: int = 0o660
                    ) -> tuple[trio.SocketListener, os.stat_result]:
    """A listening Unix socket at ``path`` (its directory made, a dead socket there
    replaced, a live one refused: D4), with ``mode``; returns it and its file's stat, for
    ``unlink_unix``."""
    where = trio.Path(path)
    try:
        await where.parent.mkdir(parents=True, exist_ok=True)
        if await where.exists() or await where.is_symlink():
            if not await where.is_socket():
                raise StartupError(f"{key} {path}: exists and is not a socket; remove it "
                                   f"or give another path")
            if await trio.to_thread.run_sync(socket_is_live, path):
                raise StartupError(f"{key} {path} is served by another running process "
                                   f"(another storaged?); stop it first, or give this one "
                                   f"another path")
            await where.unlink()        # a stale socket of a dead daemon
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            await where.chmod(mode)
            sock.listen(128)
            st = await where.stat()
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise listen_error(key, path, e) from None
    return trio.SocketListener(sock), st


async def unlink_unix(path: str, st: os.stat_result) -> None:
    """Remove the socket ``bind_unix`` made, unless another one has replaced it (D4)."""
    with trio.CancelScope(shield=True), contextlib.suppress(OSError):
        now = await trio.Path(path).stat()
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            await trio.Path(path).unlink()


def check_listen(key: str, host: str, port: int) -> None:
    """Fail now, before any pool is imported, on an address that cannot be listened on
    (in use, not an address of this machine); the real listener may still fail later,
    with the same one line (D3)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        raise StartupError(f"{key} {host}:{port}: {e.strerror or e}") from None
    for family, kind, protocol, _name, addr in infos:
        with socket.socket(family, kind, protocol) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise listen_error(key, f"{host}:{port}", e) from None


def listen_error(key: str, address: str, e: OSError) -> StartupError:
    return StartupError(f"{key} {address}: cannot listen: {e.strerror or e}")
