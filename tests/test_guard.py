"""Unit tests of ``safe_gthread.guard``: patching, the unlink decision, the start checks,
the re-exec hand-over."""
import errno
import json
import os
import socket

import pytest
from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock

from safe_gthread import _compat, _patch, guard
from versions import GUNICORN


class Log(object):
    def __init__(self):
        self.lines = []

    def _add(self, level, msg, *args):
        self.lines.append((level, msg % args))

    def info(self, msg, *args):
        self._add("info", msg, *args)

    def warning(self, msg, *args):
        self._add("warning", msg, *args)

    def error(self, msg, *args):
        self._add("error", msg, *args)

    def warnings(self):
        return [line for level, line in self.lines if level == "warning"]


class Listener(object):
    """What the guard needs of a gunicorn listener: ``log``, ``getsockname``, ``fileno``."""

    def __init__(self, sock, log=None):
        self.sock = sock
        self.log = log or Log()

    def getsockname(self):
        return self.sock.getsockname()

    def fileno(self):
        return self.sock.fileno()


def bound(path, listen=True):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listen:
        sock.listen(8)
    return sock


@pytest.fixture
def sockets():
    opened = []

    def make(path, listen=True):
        sock = bound(path, listen)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


@pytest.fixture
def pristine():
    """The guard uninstalled for the test, reinstalled afterwards if it was before."""
    was = guard.installed()
    guard.uninstall()
    yield
    guard.uninstall()
    if was:
        guard.install()


def _patched():
    names = [(gunicorn_sock.UnixSocket, "__init__"), (gunicorn_sock.UnixSocket, "bind"),
             (gunicorn_arbiter.Arbiter, "reexec")]
    if _compat.UNIX_CLOSE_UNLINKS:
        names.append((gunicorn_sock.UnixSocket, "close"))
    if _compat.HAS_CLOSE_SOCKETS:
        names.append((gunicorn_sock, "close_sockets"))
    return {(ns, name): vars(ns)[name] for ns, name in names}


# -- install / uninstall -------------------------------------------------------------------

def test_install_is_idempotent_and_uninstall_restores(pristine):
    before = _patched()
    assert guard.install() is True
    during = _patched()
    assert all(during[key] is not before[key] for key in before)
    assert guard.install() is False
    assert _patched() == during  # not wrapped twice
    assert guard.installed()
    assert guard.uninstall() is True
    assert _patched() == before
    assert guard.uninstall() is False
    assert not guard.installed()
    assert guard.install() is True
    assert all(getattr(value, "_safe_gthread_layer", None) is not None
               and value.__wrapped__ is before[key] for key, value in _patched().items())


def test_callers_look_the_names_up(pristine):
    # The arbiter calls ``sock.close_sockets`` and ``self.reexec`` through the module and
    # the class, so patching them there reaches every caller.
    guard.install()
    from safe_gthread import _arbiter
    guarded = _arbiter.wrapped("guard")
    assert gunicorn_arbiter.Arbiter.reexec._safe_gthread_layer is not None
    assert (gunicorn_arbiter.Arbiter, "reexec") in guarded
    if _compat.HAS_CLOSE_SOCKETS:
        wrapper = gunicorn_arbiter.sock.close_sockets
        assert wrapper._safe_gthread_layer is not None
        assert (gunicorn_arbiter.sock, "close_sockets") in guarded
        assert wrapper.__wrapped__ is _patch.original(gunicorn_arbiter.sock, "close_sockets")


def test_compat_flags_match_the_version():
    assert _compat.REUSE_PORT_BINDS_IN_WORKERS == (GUNICORN >= (24,))
    assert _compat.WORKER_BOOT_ERROR == 3
    assert _compat.UNIX_CLOSE_UNLINKS == (GUNICORN < (19, 7))


# -- unlink_decision -----------------------------------------------------------------------

def test_decision_without_an_owner():
    assert guard.unlink_decision(None, "/x", 1) == (False, "not bound by this process")


def test_decision_in_another_process(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sockets(path)
    st = os.lstat(path)
    assert guard.unlink_decision((1, st.st_dev, st.st_ino), path, 2) == (
        False, "bound by pid 1")
    assert guard.unlink_decision((2, st.st_dev, st.st_ino), path, 2) == (True, "")


def test_decision_when_missing(tmp_path):
    allowed, reason = guard.unlink_decision((5, 1, 2), str(tmp_path / "gone"), 5)
    assert not allowed and reason == "it is already gone"


@pytest.mark.parametrize("replacement", ["file", "directory", "symlink", "socket"])
def test_decision_when_replaced(tmp_path, sockets, replacement):
    path = str(tmp_path / "s.sock")
    sockets(path)
    st = os.lstat(path)
    owner = (7, st.st_dev, st.st_ino)
    keep = os.open(path, os.O_PATH | os.O_NOFOLLOW)  # no inode reuse in this test
    try:
        os.rename(path, str(tmp_path / "moved.sock"))
        if replacement == "file":
            open(path, "w").close()
        elif replacement == "directory":
            os.mkdir(path)
        elif replacement == "symlink":  # even a link to the very socket it bound
            os.symlink(str(tmp_path / "moved.sock"), path)
        else:
            sockets(path)
        assert guard.unlink_decision(owner, path, 7) == (
            False, "another file has replaced the socket")
    finally:
        os.close(keep)


def test_decision_when_it_cannot_check():
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied")
    allowed, reason = guard.unlink_decision((1, 2, 3), "/x", 1, lstat=denied)
    assert not allowed and "Permission denied" in reason


def test_abstract_and_tcp_names_are_not_paths():
    assert not guard.is_filesystem_path("\0abstract")
    assert not guard.is_filesystem_path(b"\0abstract")
    assert not guard.is_filesystem_path(("127.0.0.1", 80))
    assert not guard.is_filesystem_path("")
    assert guard.is_filesystem_path("/tmp/x.sock")
    assert guard.is_filesystem_path("@name")  # gunicorn binds that as a relative file


# -- owning, pinning, closing twice ------------------------------------------------------

def test_owner_unlinks_once_and_quietly(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    listener = Listener(sockets(path))
    guard._record_owner(listener, path)
    assert guard._unlink_if_owned(listener, path) is True
    assert not os.path.exists(path)
    assert guard._unlink_if_owned(listener, path) is False
    assert listener.log.lines == []


def test_a_worker_never_unlinks_and_says_nothing(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    listener = Listener(sockets(path))
    guard._record_owner(listener, path, pid=os.getpid() + 1)  # bound by "the arbiter"
    assert guard._unlink_if_owned(listener, path) is False
    assert os.path.exists(path) and listener.log.lines == []


def test_a_foreign_file_is_left_with_one_info_line(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    listener = Listener(sockets(path))
    guard._record_owner(listener, path)
    os.unlink(path)
    sockets(path)  # a second server's socket
    assert guard._unlink_if_owned(listener, path) is False
    assert os.path.exists(path)
    assert listener.log.lines == [
        ("info", "Not removing %s: another file has replaced the socket." % path)]


def test_an_open_listener_keeps_its_inode_number(tmp_path, sockets):
    """ext4 hands a freed inode number to the next file at once; while the bound socket
    is open its inode is not freed, which is why the guard checks before closing."""
    path = str(tmp_path / "s.sock")
    listener = Listener(sockets(path))
    guard._record_owner(listener, path)
    for _ in range(20):
        os.unlink(path)
        sockets(path).close()
        allowed, _ = guard.unlink_decision(vars(listener)[guard.OWNER_ATTR], path,
                                           os.getpid())
        assert not allowed


# -- start: probe and checks ---------------------------------------------------------------

def test_probe_live_and_dead(tmp_path, sockets):
    live = str(tmp_path / "live.sock")
    sockets(live)
    assert guard.probe(live) == (True, os.getpid())
    dead = str(tmp_path / "dead.sock")
    sockets(dead, listen=False)
    assert guard.probe(dead) == (False, None)
    full = str(tmp_path / "full.sock")
    server = sockets(full)
    server.listen(0)
    clients = []
    try:  # fill the backlog: the next connect gets EAGAIN or times out: still live
        for _ in range(4):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            clients.append(client)
            try:
                client.connect(full)
            except BlockingIOError:
                break
        assert guard.probe(full, timeout=0.2)[0] is True
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("kind, phrase", [
    ("file", "it is a regular file, not a socket"),
    ("directory", "it is a directory, not a socket"),
    ("symlink", "it is a symbolic link (to "),
    ("dangling", "which does not exist"),
    ("fifo", "it is a named pipe, not a socket"),
])
def test_check_refuses_what_is_not_a_socket(tmp_path, sockets, kind, phrase):
    path = str(tmp_path / "x.sock")
    if kind == "file":
        open(path, "w").close()
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "symlink":
        target = str(tmp_path / "target.sock")
        sockets(target)
        os.symlink(target, path)
    elif kind == "dangling":
        os.symlink(str(tmp_path / "nowhere"), path)
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    with pytest.raises(guard.Refused) as refused:
        guard.check_path(path, Log())
    assert phrase in str(refused.value) and path in str(refused.value)
    assert "\n" not in str(refused.value)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_check_refuses_a_live_listener_unless_told(tmp_path, sockets):
    path = str(tmp_path / "live.sock")
    sockets(path)
    with pytest.raises(guard.Refused) as refused:
        guard.check_path(path, Log(), environ={})
    assert "pid %d" % os.getpid() in str(refused.value)
    log = Log()
    guard.check_path(path, log, environ={guard.ENV_REPLACE_LIVE: "1"})
    assert log.lines[0][0] == "warning" and path in log.lines[0][1]


def test_check_passes_a_dead_socket_and_a_free_path(tmp_path, sockets):
    path = str(tmp_path / "dead.sock")
    sockets(path, listen=False).close()
    guard.check_path(path, Log(), environ={})
    guard.check_path(str(tmp_path / "free.sock"), Log(), environ={})


@pytest.mark.parametrize("exc, phrase", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "does not exist"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "not a directory"),
    (OSError(errno.EADDRINUSE, "Address already in use"), "Connection in use"),
    (OSError("AF_UNIX path too long"), "too long"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
])
def test_bind_failures_read_as_one_line(exc, phrase):
    line = guard._bind_failure("/run/app/gunicorn.sock", exc)
    assert phrase in line and "/run/app/gunicorn.sock" in line and "\n" not in line


def test_a_real_too_long_path_raises_what_we_match(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError) as exc:
            sock.bind("/tmp/" + "x" * 200)
    finally:
        sock.close()
    assert "too long" in guard._bind_failure("/tmp/" + "x" * 200, exc.value)


# -- re-exec hand-over ---------------------------------------------------------------------

def test_handover_and_adopt(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    old = Listener(sockets(path))
    guard._record_owner(old, path)
    handed = guard._handover([old])
    assert json.loads(handed) == [[path] + list(vars(old)[guard.OWNER_ATTR][1:])]
    new = Listener(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM,
                                  fileno=os.dup(old.sock.fileno())))
    try:
        guard._adopt(new, environ={guard.ENV_SOCKETS: handed})
        assert vars(new)[guard.OWNER_ATTR] == vars(old)[guard.OWNER_ATTR]
    finally:
        new.sock.close()


def test_adopt_refuses_a_file_that_was_replaced(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    old = Listener(sockets(path))
    guard._record_owner(old, path)
    handed = guard._handover([old])
    os.unlink(path)
    sockets(path)
    new = Listener(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM,
                                  fileno=os.dup(old.sock.fileno())))
    try:
        guard._adopt(new, environ={guard.ENV_SOCKETS: handed})
        assert vars(new).get(guard.OWNER_ATTR) is None
    finally:
        new.sock.close()


def test_only_own_sockets_are_handed_over(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    inherited = Listener(sockets(path))
    guard._record_owner(inherited, path, pid=os.getpid() + 1)
    assert guard._handover([inherited]) is None
    assert guard._handover([Listener(sockets(str(tmp_path / "t.sock")))]) is None


def test_adopt_ignores_garbage(tmp_path, sockets):
    listener = Listener(sockets(str(tmp_path / "s.sock")))
    for raw in ("", "not json", "[1, 2]", "[[1]]", "{}", json.dumps([["/elsewhere", 1, 2]])):
        guard._adopt(listener, environ={guard.ENV_SOCKETS: raw})
        assert vars(listener).get(guard.OWNER_ATTR) is None
