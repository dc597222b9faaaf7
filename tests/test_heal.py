"""Unit tests of the self-healing socket path: the kernel's answer about a
socket's file (``_unixdiag``), the backup link, what is at the path and what may be done
(``_heal``), adoption and the arbiter's loop wrappers (``guard``). In-process, on real
sockets in ``tmp_path``; the end-to-end cells are in ``test_heal_scenarios.py``."""
import errno
import logging
import os
import re
import select
import socket
import stat
import time

import pytest

from safe_gthread import _arbiter, _heal, _patch, _unixdiag, guard  # noqa: F401 (_arbiter: its fork hooks)
from test_guard import Listener, Log


@pytest.fixture
def sockets():
    opened = []

    def make(path, listen=True):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        if listen:
            sock.listen(8)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


def ident(path):
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def connects(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(2)
    try:
        client.connect(path)
        return True
    except OSError:
        return False
    finally:
        client.close()


def healer_for(path, sock, log=None):
    owner = (os.getpid(),) + ident(path)
    healer = _heal.Healer(Listener(sock), path, owner, log or Log())
    return healer


# -- _unixdiag -----------------------------------------------------------------------------

def kernel_bound_file(sock):
    """The file the kernel says `sock` is bound to; skips where unix_diag is missing."""
    bound = _unixdiag.bound_file(sock.fileno())
    if bound is None:
        pytest.skip("netlink unix_diag is not available on this kernel")
    return bound


def test_the_kernel_names_the_bound_file(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    bound = kernel_bound_file(sock)
    assert bound[2] == path and _unixdiag.same_file(bound, os.lstat(path), path)
    # The path unlinked and reused by another server's socket: no longer the same file.
    os.unlink(path)
    sockets(path)
    assert not _unixdiag.same_file(_unixdiag.bound_file(sock.fileno()), os.lstat(path), path)


def test_the_kernel_sees_through_a_hard_link(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    kernel_bound_file(sock)
    os.link(path, str(tmp_path / "backup"))
    os.unlink(path)
    os.link(str(tmp_path / "backup"), path)
    assert _unixdiag.same_file(_unixdiag.bound_file(sock.fileno()), os.lstat(path), path)
    assert connects(path)


def test_unbound_abstract_and_non_sockets_answer_none(tmp_path):
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0safe-gthread-unixdiag-%d" % os.getpid())
    try:
        assert _unixdiag.bound_file(unbound.fileno()) is None
        assert _unixdiag.bound_file(abstract.fileno()) is None
        with open(str(tmp_path / "f"), "w") as fh:
            assert _unixdiag.bound_file(fh.fileno()) is None
        assert _unixdiag.bound_file(-1) is None
    finally:
        unbound.close()
        abstract.close()


@pytest.mark.parametrize("data", [b"", b"\x00" * 3, b"\xff" * 40,
                                  _unixdiag._NLMSGHDR.pack(20, 2, 0, 1, 0) + b"\0" * 4])
def test_garbage_replies_answer_none(data):
    assert _unixdiag.parse(data, 1234) is None


def test_kernel_dev_encoding():
    assert _unixdiag.kernel_dev((254 << 20) | 3) == os.makedev(254, 3)
    assert _unixdiag.same_file((os.makedev(8, 1), 5, "/s"), os.stat_result(
        (stat.S_IFSOCK, (1 << 32) + 5, os.makedev(8, 1), 1, 0, 0, 0, 0, 0, 0)), "/s")


def _reply(sockfs_ino, vfs_ino, vfs_dev, name):
    attrs = b""
    for kind, value in ((_unixdiag.UNIX_DIAG_NAME, name),
                        (_unixdiag.UNIX_DIAG_VFS, _unixdiag._VFS.pack(vfs_ino, vfs_dev))):
        attr = _unixdiag._RTATTR.pack(_unixdiag._RTATTR.size + len(value), kind) + value
        attrs += attr + b"\0" * (-len(attr) % 4)
    body = _unixdiag._MESSAGE.pack(socket.AF_UNIX, 1, 10, 0, sockfs_ino, 0, 0) + attrs
    return _unixdiag._NLMSGHDR.pack(_unixdiag._NLMSGHDR.size + len(body),
                                    _unixdiag.SOCK_DIAG_BY_FAMILY, 0, 1, 0) + body


def test_the_name_the_kernel_gives_is_held_to_the_path():
    """Issue 18 i: the kernel gives 32 bits of the inode; on a file system with 64-bit
    inode numbers another socket at the path could share them. The bound name, which
    was asked for and ignored, must match too."""
    bound = _unixdiag.parse(_reply(1234, 5, (8 << 20) | 1, b"/run/a.sock"), 1234)
    assert bound == (os.makedev(8, 1), 5, "/run/a.sock")
    st = os.stat_result((stat.S_IFSOCK, (1 << 32) + 5, os.makedev(8, 1), 1, 0, 0, 0, 0, 0, 0))
    assert _unixdiag.same_file(bound, st, "/run/a.sock")
    assert not _unixdiag.same_file(bound, st, "/run/b.sock")


# -- the setting ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, True), ("", True), ("1", True), ("true", True), (" On ", True),
    ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_parse_heal(value, expected):
    assert _heal.parse_heal(value) is expected


def test_a_bad_value_is_one_line():
    with pytest.raises(ValueError) as exc:
        _heal.parse_heal("maybe")
    assert "SAFE_GTHREAD_HEAL" in str(exc.value) and "\n" not in str(exc.value)


def test_enabled_reads_configure_first():
    try:
        assert _heal.enabled({}) is True
        assert _heal.enabled({_heal.ENV_HEAL: "0"}) is False
        _heal.set_enabled(True)
        assert _heal.enabled({_heal.ENV_HEAL: "0"}) is True
        _heal.set_enabled(False)
        assert _heal.enabled({}) is False
    finally:
        _heal.set_enabled(None)


# -- the backup link -----------------------------------------------------------------------

def test_backup_names_match_only_their_path():
    path = "/run/app/gunicorn.sock"
    backup = _heal.backup_path(path)
    assert re.match(r"\A/run/app/\.gunicorn\.sock\.[0-9a-f]{16}\.sg-backup\Z", backup)
    assert _heal.backup_path(path) != backup  # a new token every time
    assert _heal.is_backup_name(path, os.path.basename(backup))
    assert _heal.is_backup_name(path, ".gunicorn.sock.4242.sg-backup")  # before 0.3: a pid
    for other in (".gunicorn.sock.x.sg-backup", ".gunicorn.sock.4242.sg-backup~",
                  "gunicorn.sock.4242.sg-backup", ".gunicorn.sockX4242.sg-backup",
                  ".other.sock.4242.sg-backup", ".gunicorn.sock.0.sg-backup",
                  ".gunicorn.sock..sg-backup", "gunicorn.sock",
                  ".gunicorn.sock.0123456789ABCDEF.sg-backup"):
        assert not _heal.is_backup_name(path, other), other


def test_make_and_remove_backup(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sockets(path)
    backup = _heal.make_backup(path, ident(path))
    assert ident(backup) == ident(path)
    assert stat.S_IMODE(os.lstat(backup).st_mode) == stat.S_IMODE(os.lstat(path).st_mode)
    assert _heal.remove_backup(backup, ident(path)) is True
    assert not os.path.lexists(backup)
    assert _heal.remove_backup(backup, ident(path)) is False


def test_remove_backup_never_touches_anything_else(tmp_path):
    path = str(tmp_path / ".x.sock.5.sg-backup")
    with open(path, "w") as fh:
        fh.write("keep")
    assert _heal.remove_backup(path, None) is False
    os.unlink(path)
    os.symlink("/nowhere", path)
    assert _heal.remove_backup(path, None) is False
    assert os.path.islink(path)


def dead_socket(path):
    """A socket file nobody listens on any more (its server was SIGKILLed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_remove_stale_only_dead_sockets_of_our_pattern(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sockets(path)
    ours = str(tmp_path / ".s.sock.999991.sg-backup")
    os.link(path, ours)  # a link to our own socket (a USR2 pair's): kept
    dead = _heal.backup_path(path)
    dead_socket(dead)
    live = _heal.backup_path(path)
    sockets(live)  # another server's, alive: kept
    regular = str(tmp_path / ".s.sock.999993.sg-backup")
    with open(regular, "w") as fh:
        fh.write("not a socket")
    other = str(tmp_path / ".other.sock.999991.sg-backup")
    dead_socket(other)
    log = Log()
    assert _heal.remove_stale(path, ident(path), log) == [dead]
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        os.path.basename(p) for p in (path, ours, live, regular, other))
    assert len(log.lines) == 1 and dead in log.lines[0][1]


def test_a_long_backup_name_is_still_probed(tmp_path, sockets):
    """A backup name is longer than its socket's path: past sockaddr_un's 108 bytes a
    connect by name fails, and a dead backup looked alive (never removed)."""
    directory = tmp_path / ("d" * max(100 - len(str(tmp_path)), 1))
    directory.mkdir()
    path = str(directory / "s")
    sockets(path)
    live, dead = _heal.backup_path(path), _heal.backup_path(path)
    assert len(live) > 108
    os.link(path, live)
    assert _heal.listening(live)
    dead_socket(path + "2")
    os.rename(path + "2", dead)
    assert not _heal.listening(dead)
    assert _heal.remove_stale(path, (0, 0), Log()) == [dead]


def test_a_master_with_a_dead_masters_pid_heals(tmp_path, sockets):
    """Issue 18 b: PID 1 in a container, restarted after a SIGKILL with its socket
    directory on a volume, finds the backup the dead master made under its own pid. It
    must remove it and make its own (before: taken for its own, never removed, and its
    own backup failed with EEXIST: no healing)."""
    path = str(tmp_path / "s.sock")
    stale = str(tmp_path / (".s.sock.%d.sg-backup" % os.getpid()))
    dead_socket(stale)
    sock = sockets(path)
    healer = healer_for(path, sock)
    assert healer.start() is not None and healer.backup != stale
    assert not os.path.lexists(stale)
    os.unlink(path)
    assert healer.check() == _heal.RESTORE and ident(path) == healer.ident


def test_a_name_taken_first_does_not_stop_the_backup(tmp_path, sockets, monkeypatch):
    """Issue 18 g: in a shared directory a local user could create our backup name first;
    now the name cannot be guessed, and a taken one only means drawing another."""
    path = str(tmp_path / "s.sock")
    sockets(path)
    taken = str(tmp_path / ".s.sock.0000000000000000.sg-backup")
    open(taken, "w").close()
    tokens = iter([b"\0" * 8, b"\1" * 8])
    monkeypatch.setattr(_heal.os, "urandom", lambda n: next(tokens))
    backup = _heal.make_backup(path, ident(path))
    assert backup.endswith(".0101010101010101.sg-backup") and ident(backup) == ident(path)
    assert open(taken).read() == ""


# -- what is at the path, what may be done -------------------------------------------------

@pytest.mark.parametrize("state, backup_ok, action", [
    (_heal.OURS, True, _heal.NOTHING), (_heal.OURS, False, _heal.NOTHING),
    (_heal.MISSING, True, _heal.RESTORE), (_heal.MISSING, False, _heal.REBIND),
    (_heal.SYMLINK, True, _heal.LEAVE), (_heal.FOREIGN, True, _heal.LEAVE),
    (_heal.FOREIGN, False, _heal.LEAVE), (_heal.UNKNOWN, True, _heal.LEAVE)])
def test_plan(state, backup_ok, action):
    assert _heal.plan(state, backup_ok) == action


@pytest.mark.parametrize("what, state", [
    ("ours", _heal.OURS), ("missing", _heal.MISSING), ("file", _heal.FOREIGN),
    ("directory", _heal.FOREIGN), ("socket", _heal.FOREIGN), ("symlink", _heal.SYMLINK),
    ("dangling", _heal.SYMLINK)])
def test_assess(tmp_path, sockets, what, state):
    path = str(tmp_path / "s.sock")
    sockets(path)
    mine = ident(path)
    keep = str(tmp_path / "kept.sock")
    os.link(path, keep)  # pins the inode: never reused in this test
    if what != "ours":
        os.unlink(path)
    if what == "file":
        open(path, "w").close()
    elif what == "directory":
        os.mkdir(path)
    elif what == "socket":
        sockets(path)
    elif what == "symlink":  # even a link to the very socket: not followed
        os.symlink(keep, path)
    elif what == "dangling":
        os.symlink(str(tmp_path / "nowhere"), path)
    assert _heal.assess(path, mine)[0] == state


def test_assess_when_it_cannot_check():
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied")
    state, detail = _heal.assess("/x", (1, 2), lstat=denied)
    assert state == _heal.UNKNOWN and "Permission denied" in _heal.describe(state, detail)


# -- the Healer ----------------------------------------------------------------------------

def test_restore_after_rm_reaches_the_same_listener(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    log = Log()
    healer = healer_for(path, sock, log)
    assert healer.start() is not None and ident(healer.backup) == ident(path)
    assert healer.check() == _heal.NOTHING and log.lines == []
    for _ in range(2):  # rm twice
        os.unlink(path)
        assert healer.check() == _heal.RESTORE
        assert ident(path) == healer.ident
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        conn, _ = sock.accept()  # the very listener
        conn.close()
        client.close()
    assert len(log.warnings()) == 2 and "restored" in log.warnings()[0]
    healer.release()
    assert sorted(os.listdir(str(tmp_path))) == ["s.sock"]


@pytest.mark.parametrize("what", ["file", "socket", "symlink"])
def test_a_foreign_file_is_never_replaced_and_said_once(tmp_path, sockets, what):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    log = Log()
    healer = healer_for(path, sock, log)
    healer.start()
    os.unlink(path)
    if what == "file":
        with open(path, "w") as fh:
            fh.write("keep me")
    elif what == "socket":
        sockets(path)
    else:
        os.symlink(healer.backup, path)
    before = os.lstat(path)
    for _ in range(3):
        assert healer.check() == _heal.LEAVE
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert len(log.warnings()) == 1 and "never replaced" in log.warnings()[0]
    # Removed again: restored, and a later foreign file is news again.
    os.unlink(path)
    assert healer.check() == _heal.RESTORE
    healer.release()


def test_a_file_appearing_between_check_and_link_wins(tmp_path, sockets, monkeypatch):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    healer = healer_for(path, sock)
    healer.start()
    os.unlink(path)
    real_link = os.link

    def racing_link(src, dst, **kwargs):
        open(dst, "w").close()  # someone else got there first
        return real_link(src, dst, **kwargs)
    monkeypatch.setattr(os, "link", racing_link)
    assert healer.check() == _heal.NOTHING
    assert stat.S_ISREG(os.lstat(path).st_mode)
    monkeypatch.undo()
    healer.release()


def test_backup_gone_too_asks_for_a_rebind(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    healer = healer_for(path, sock)
    healer.start()
    os.unlink(healer.backup)
    os.unlink(path)
    # Not at once: a deliberate takeover gets INTERVAL seconds to bind its own socket.
    assert healer.check(now=100.0) == _heal.NOTHING
    assert healer.check(now=100.0 + _heal.INTERVAL / 2) == _heal.NOTHING
    assert healer.check(now=100.0 + _heal.INTERVAL) == _heal.REBIND
    assert not os.path.lexists(path)


def test_a_takeover_after_the_backup_went_is_left_alone(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    log = Log()
    healer = healer_for(path, sock, log)
    healer.start()
    assert _heal.remove_links_to(path, ident(path), Log()) == [healer.backup]
    os.unlink(path)
    assert healer.check(now=100.0) == _heal.NOTHING
    sockets(path)  # the new owner binds
    assert healer.check(now=101.0) == _heal.LEAVE
    assert len(log.warnings()) == 1 and "never replaced" in log.warnings()[0]


def test_remove_links_to_only_that_socket(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sockets(path)
    mine = _heal.backup_path(path)
    os.link(path, mine)
    other = str(tmp_path / "o.sock")
    sockets(other)
    theirs = _heal.backup_path(path)
    os.link(other, theirs)  # our name, another inode
    assert _heal.remove_links_to(path, ident(path), Log()) == [mine]
    assert os.path.lexists(theirs)


def test_healing_never_binds_in_a_takeovers_way(tmp_path, sockets, monkeypatch):
    """Issue 18 f: between a deliberate takeover's removal of the path and its bind, the
    old server's healing must not bind the path anew (the newcomer would get
    EADDRINUSE)."""
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    healer = healer_for(path, sock)
    healer.start()
    monkeypatch.setenv(guard.ENV_REPLACE_LIVE, "1")
    marker = guard.check_path(path, Log())  # the newcomer: its backups go
    os.unlink(path)  # gunicorn's own removal; its bind is slow to come
    assert healer.check(now=100.0) == _heal.NOTHING
    assert healer.check(now=101.0) == _heal.NOTHING  # before: REBIND
    sockets(path)  # the newcomer binds
    _heal.unmark_takeover(marker)
    assert healer.check(now=102.0) == _heal.LEAVE
    assert sorted(os.listdir(str(tmp_path))) == ["s.sock"]


def test_a_dead_newcomers_marker_holds_nothing_back(tmp_path, sockets, monkeypatch):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    healer = healer_for(path, sock)
    marker = _heal.mark_takeover(path)
    past = time.time() - _heal.TAKEOVER_HOLD - 1
    os.utime(marker, (past, past))
    os.unlink(path)
    healer.check(now=100.0)
    assert healer.check(now=101.0) == _heal.REBIND


def test_a_replaced_backup_is_never_linked_back(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    healer = healer_for(path, sock)
    healer.start()
    os.unlink(healer.backup)
    sockets(healer.backup)  # someone else's socket under our backup's name
    os.unlink(path)
    healer.check(now=100.0)
    assert healer.check(now=101.0) == _heal.REBIND
    healer.release()  # leaves that socket alone: it is not ours
    assert len([n for n in os.listdir(str(tmp_path)) if n.endswith(".sg-backup")]) == 1


def test_no_backup_possible_is_one_warning(tmp_path, sockets, monkeypatch):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    log = Log()
    healer = healer_for(path, sock, log)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(_heal.os, "link", denied)
    assert healer.start() is None
    assert len(log.warnings()) == 1 and "Cannot make a backup link" in log.warnings()[0]


# -- adoption and who may connect ----------------------------------------------------------

def test_adoption_decision(tmp_path, sockets):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    bound = kernel_bound_file(sock)
    assert guard.adoption_decision(bound, os.lstat(path), path) == (True, "")
    assert guard.adoption_decision(None, os.lstat(path), path)[0] is False
    assert guard.adoption_decision(bound, None, path) == (False, "the path is already gone")
    os.unlink(path)
    sockets(path)  # another server's socket now
    allowed, reason = guard.adoption_decision(bound, os.lstat(path), path)
    assert not allowed and "another file" in reason


def test_everyone_may_connect(tmp_path, sockets):
    directory = tmp_path / "d"
    directory.mkdir()
    path = str(directory / "s.sock")
    sockets(path)
    chain = [str(directory)] + [p for p in map(str, directory.parents)]
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in chain}
    try:
        for p in chain:
            os.chmod(p, modes[p] | 0o001)
        os.chmod(path, 0o777)
        assert guard.everyone_may_connect(path)
        os.chmod(path, 0o770)
        assert not guard.everyone_may_connect(path)
        os.chmod(path, 0o777)
        os.chmod(str(directory), 0o750)
        assert not guard.everyone_may_connect(path)
    finally:
        for p in chain:
            os.chmod(p, modes[p])
    assert not guard.everyone_may_connect(str(tmp_path / "missing"))


# -- the arbiter's loop --------------------------------------------------------------------

class FakeArbiter(object):
    def __init__(self, listeners=()):
        self.PIPE = os.pipe()
        self.LISTENERS = list(listeners)
        self.log = Log()
        self.ticks = 0

    def close(self):
        for fd in self.PIPE:
            os.close(fd)


@pytest.fixture
def ticking(monkeypatch):
    """guard._check_paths counted, with one (fake) path owned so the wrappers engage."""
    counted = []
    monkeypatch.setattr(guard, "_check_paths",
                        lambda arbiter: counted.append(time.monotonic()))
    monkeypatch.setattr(_patch.here(), "healers", [object()])
    return counted


def test_sleep_checks_between_slices_and_never_sleeps_longer(ticking):
    arbiter = FakeArbiter()
    calls = []

    def original(self):
        calls.append(select.select([self.PIPE[0]], [], [], 0)[0])
    try:
        started = time.monotonic()
        guard._sleep(original, arbiter)
        elapsed = time.monotonic() - started
        assert calls == []  # a timeout: nothing to drain
        assert elapsed < 1.5 and len(ticking) >= 2
    finally:
        arbiter.close()


def test_sleep_hands_a_wakeup_to_the_original_at_once(ticking):
    arbiter = FakeArbiter()
    drained = []

    def original(self):
        drained.append(os.read(self.PIPE[0], 10))
    try:
        os.write(arbiter.PIPE[1], b".")
        guard._sleep(original, arbiter)
        assert drained == [b"."] and ticking == []
    finally:
        arbiter.close()


def test_wait_for_signals_waits_less(ticking):
    seen = []

    def original(self, timeout=1.0):
        seen.append(timeout)
        return []
    guard._wait_for_signals(original, object(), timeout=1.0)
    guard._wait_for_signals(original, object(), 1.0)
    guard._wait_for_signals(original, object(), timeout=0.05)
    guard._wait_for_signals(original, object())
    assert seen == [_heal.INTERVAL, _heal.INTERVAL, 0.05, _heal.INTERVAL]


def test_wait_for_signals_unchanged_without_a_path(monkeypatch):
    monkeypatch.setattr(_patch.here(), "healers", [])
    seen = []
    guard._wait_for_signals(lambda self, timeout=1.0: seen.append(timeout), object(),
                            timeout=1.0)
    assert seen == [1.0]


def test_the_check_never_raises_into_the_arbiter(monkeypatch, caplog):
    """A fault in the check turns healing off (one ERROR with its traceback, the backups
    released) and the arbiter's own manage_workers still runs, then and afterwards."""
    def broken(arbiter):
        raise RuntimeError("boom")
    monkeypatch.setattr(guard, "_check_paths", broken)
    released = []
    monkeypatch.setattr(guard, "_release_all", lambda: released.append(1))
    monkeypatch.setattr(_patch, "_on_disable", {})
    monkeypatch.setattr(_patch, "_process", [None])
    _patch.on_disable("heal", lambda: guard._release_all())

    class Arbiter(object):
        def manage_workers(self):
            managed.append(1)
            return "managed"
    managed = []
    assert _patch.wrap(Arbiter, "manage_workers", guard._manage_workers,
                       key="tests.heal", feature="heal")
    with caplog.at_level(logging.ERROR, logger="gunicorn.error"):
        assert Arbiter().manage_workers() == "managed"
        assert Arbiter().manage_workers() == "managed"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "heal failed" in errors[0].getMessage()
    assert "boom" in str(errors[0].exc_info[1])
    assert managed == [1, 1] and released == [1] and _patch.feature_disabled("heal")
    _patch.unwrap(Arbiter, "manage_workers", key="tests.heal")


def test_the_arbiter_wait_is_detected():
    from safe_gthread import _compat
    from versions import GUNICORN
    assert _compat.ARBITER_WAIT == ("wait_for_signals" if GUNICORN >= (24,) else "sleep")


# -- adoption in the arbiter's check -------------------------------------------------------

@pytest.fixture
def fresh_guard_state(monkeypatch):
    monkeypatch.setattr(_patch.here(), "healers", [])
    yield _patch.here().healers
    guard._release_all()


def test_the_check_adopts_a_listener_bound_before_the_guard(tmp_path, sockets,
                                                            fresh_guard_state):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    kernel_bound_file(sock)
    arbiter = FakeArbiter([Listener(sock)])
    try:
        guard._check_paths(arbiter)
        owner = vars(arbiter.LISTENERS[0])[guard.OWNER_ATTR]
        assert owner == (os.getpid(),) + ident(path)
        assert [n for n in os.listdir(str(tmp_path)) if _heal.is_backup_name(path, n)]
        assert any("Adopted unix:%s" % path in line for _, line in arbiter.log.lines)
        os.unlink(path)
        guard._check_paths(arbiter)  # restored
        assert ident(path) == owner[1:]
        guard._release_all()
        assert sorted(os.listdir(str(tmp_path))) == ["s.sock"]
    finally:
        arbiter.close()


def test_the_check_never_adopts_another_servers_path(tmp_path, sockets, fresh_guard_state):
    path = str(tmp_path / "s.sock")
    sock = sockets(path)
    os.unlink(path)
    sockets(path)  # another server took the path over
    arbiter = FakeArbiter([Listener(sock)])
    try:
        guard._check_paths(arbiter)
        guard._check_paths(arbiter)
        assert vars(arbiter.LISTENERS[0]).get(guard.OWNER_ATTR) is None
        assert len(arbiter.log.warnings()) == 1 and "Not adopting" in arbiter.log.warnings()[0]
        assert sorted(os.listdir(str(tmp_path))) == ["s.sock"]
    finally:
        arbiter.close()


def test_systemd_and_tcp_listeners_are_never_adopted(tmp_path, sockets, fresh_guard_state):
    path = str(tmp_path / "s.sock")
    unix = Listener(sockets(path))
    tcp = Listener(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    tcp.sock.bind(("127.0.0.1", 0))
    arbiter = FakeArbiter([unix, tcp])
    arbiter.systemd = True
    try:
        guard._check_paths(arbiter)
        assert vars(unix).get(guard.OWNER_ATTR) is None
        assert vars(tcp).get(guard.OWNER_ATTR) is None
        assert arbiter.log.lines == []
        assert sorted(os.listdir(str(tmp_path))) == ["s.sock"]
    finally:
        tcp.sock.close()
        arbiter.close()


def test_the_watcher_wakes_only_for_the_socket_file(tmp_path, sockets):
    """Issue 18 d: a directory watch woke the arbiter for every name anybody removed in
    the socket's directory (/tmp: any local user); only the socket's own names count."""
    path = str(tmp_path / "s.sock")
    sockets(path)
    keep = str(tmp_path / "keep")
    os.link(path, keep)
    watcher = _heal.Watcher()
    try:
        watcher.add(path)
        if watcher.fd is None:
            pytest.skip("inotify is not available here")
        open(str(tmp_path / "f"), "w").close()
        os.unlink(str(tmp_path / "f"))
        assert select.select([watcher.fd], [], [], 0.2)[0] == []  # someone else's name
        os.unlink(path)
        assert select.select([watcher.fd], [], [], 2)[0] == [watcher.fd]
        watcher.drain()
        assert select.select([watcher.fd], [], [], 0)[0] == []
        os.link(keep, path)  # restored: the same inode, still watched
        watcher.drain()
        os.rename(path, str(tmp_path / "moved"))
        assert select.select([watcher.fd], [], [], 2)[0] == [watcher.fd]
    finally:
        watcher.close()
    assert watcher.fd is None


def in_forked_child(check):
    """Run ``check()`` in a forked child (as gunicorn forks a worker: no exec, then our
    worker's init); return what it answered."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            getattr(_patch, "forked", lambda: None)()  # (absent before the fix)
            os.write(write, b"1" if check() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_workers_do_not_inherit_the_watcher(tmp_path, sockets, monkeypatch):
    """Issue 18 c: the arbiter's inotify fd was inherited by every worker (<= 23)."""
    path = str(tmp_path / "s.sock")
    sockets(path)
    watcher = _heal.Watcher()
    watcher.add(path)
    if watcher.fd is None:
        pytest.skip("inotify is not available here")
    monkeypatch.setattr(_patch.here(), "watcher", watcher)
    fd = watcher.fd

    def closed():
        try:
            os.fstat(fd)
        except OSError:
            return True
        return False
    try:
        assert in_forked_child(closed)
        assert not closed() and watcher.fd == fd  # the arbiter keeps its own
    finally:
        watcher.close()


def test_sleep_wakes_on_a_removal_and_checks(ticking, tmp_path, monkeypatch, sockets):
    path = str(tmp_path / "s.sock")
    sockets(path)
    os.link(path, str(tmp_path / "keep"))
    watcher = _heal.Watcher()
    watcher.add(path)
    if watcher.fd is None:
        pytest.skip("inotify is not available here")
    monkeypatch.setattr(_patch.here(), "watcher", watcher)
    monkeypatch.setattr(_heal, "INTERVAL", 0.9)  # without the wakeup: one check at 0.9 s
    arbiter = FakeArbiter()
    try:
        os.unlink(path)
        started = time.monotonic()
        guard._sleep(lambda self: None, arbiter)
        assert ticking and ticking[0] - started < 0.9  # at once, not a slice later
    finally:
        watcher.close()
        arbiter.close()
