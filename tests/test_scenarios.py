"""Hostile paths, second instances, signals and re-exec, per worker class.

Each scenario runs the stock worker as the control, asserting what stock gunicorn does on
the installed version (``versions.py``), and ``safe_gthread.Worker`` (or
``safe_gthread.guard.install()`` in the config file, for the other worker classes).
"""
import os
import re
import signal
import socket
import stat
import uuid

import pytest

from safe_gthread.check import load as _load
from versions import (GUNICORN, HAS_REUSE_PORT, KERNEL_REFUSES_UNIX_REUSEPORT,
                      REUSE_PORT_BINDS_IN_WORKERS, STOCK_BINDS_ABSTRACT,
                      STOCK_CLASSES_LOSING_FILE, STOCK_WORKERS_UNLINK, incompatibility)

WORKER_BOOT_ERROR = 3


# -- helpers -------------------------------------------------------------------------------

def at(gunicorn_server, worker, path, wait=True, **settings):
    """A server bound to ``path`` (not the runner's default path)."""
    server = gunicorn_server(worker, wait=False, bind="unix:" + path, **settings)
    server.sock_path = path
    if wait:
        server.wait_ready()
    return server


def error_lines(server):
    # 27.x logs the arbiter's own halt at ERROR too.
    return [line for line in server.log().splitlines() if "[ERROR]" in line and not
            re.search(r"\[ERROR\] (Shutting down|Reason):|exited with code", line)]


def assert_refused(server, *needles, status=1):
    """Exited with ``status`` at once, one ERROR line naming all ``needles``, no traceback."""
    rc = server.wait_exit(15)
    log = server.log()
    assert rc == status, log
    assert "Traceback" not in log, log
    assert "Retrying" not in log, log
    errors = error_lines(server)
    assert len(errors) == 1, log
    for needle in needles:
        assert needle in errors[0], log
    return errors[0]


def identity(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino)


def stop(server):
    server.signal(signal.SIGTERM)
    return server.wait_exit()


def dead_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def pid_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# -- 1. start: a second instance, symlinks, files, bad paths ------------------------------

@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_second_instance_on_the_same_path(gunicorn_server, worker):
    first = gunicorn_server(worker)
    path, mine = first.sock_path, identity(first.sock_path)
    second = at(gunicorn_server, worker, path, wait=(worker == "stock"))
    if worker == "stock":
        # Silently replaced: the first server still runs, unreachable by path.
        theirs = identity(path)
        assert theirs != mine and first.proc.poll() is None
        # The first one's stop deletes the second one's file...
        stop(first)
        assert identity(path) is None, first.log()
        # ...and the second one's stop then fails on the missing file.
        stop(second)
        assert "FileNotFoundError" in second.log(), second.log()
        return
    assert_refused(second, path, "pid %d" % first.proc.pid, "SAFE_GTHREAD_REPLACE_LIVE")
    assert identity(path) == mine
    assert first.serves()
    assert stop(first) == 0
    assert identity(path) is None, first.log()
    assert first.tracebacks() == 0, first.log()


def test_deliberate_takeover(gunicorn_server, monkeypatch):
    """SAFE_GTHREAD_REPLACE_LIVE=1: the second takes over, the first's stop keeps its file."""
    first = gunicorn_server("safe")
    path = first.sock_path
    monkeypatch.setenv("SAFE_GTHREAD_REPLACE_LIVE", "1")
    second = at(gunicorn_server, "safe", path)
    monkeypatch.delenv("SAFE_GTHREAD_REPLACE_LIVE")
    assert re.search(r"\[WARNING\] Taking over unix:%s from a live listener \(pid %d\)"
                     % (re.escape(path), first.proc.pid), second.log()), second.log()
    theirs = identity(path)
    assert stop(first) == 0
    assert identity(path) == theirs, first.log()
    assert re.search(r"\[INFO\] Not removing %s: another file" % re.escape(path),
                     first.log()), first.log()
    assert second.serves()
    assert stop(second) == 0
    assert identity(path) is None
    assert first.tracebacks() == second.tracebacks() == 0, second.log()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_symlink_to_a_live_socket(gunicorn_server, tmp_path, worker):
    other = gunicorn_server("stock")
    link = str(tmp_path / "link.sock")
    os.symlink(other.sock_path, link)
    target = identity(other.sock_path)
    server = at(gunicorn_server, worker, link, wait=(worker == "stock"))
    if worker == "stock":
        # The link is silently replaced by a socket, and removed at stop.
        assert stat.S_ISSOCK(os.lstat(link).st_mode)
        stop(server)
        assert identity(link) is None
    else:
        assert_refused(server, link, "symbolic link", other.sock_path)
        assert os.readlink(link) == other.sock_path
    assert identity(other.sock_path) == target and other.serves()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_dangling_symlink(gunicorn_server, tmp_path, worker):
    link = str(tmp_path / "link.sock")
    os.symlink(str(tmp_path / "nowhere.sock"), link)
    server = at(gunicorn_server, worker, link, wait=False)
    if worker == "stock":
        # Five seconds of misleading "Connection in use" retries, then exit 1.
        assert server.wait_exit(20) != 0
        assert "Connection in use" in server.log() and "Can't connect" in server.log()
    else:
        assert_refused(server, link, "symbolic link", "does not exist")
    assert os.readlink(link) == str(tmp_path / "nowhere.sock")


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_not_a_socket(gunicorn_server, tmp_path, worker, kind):
    path = str(tmp_path / "occupied.sock")
    if kind == "file":
        with open(path, "w") as fh:
            fh.write("keep me")
    else:
        os.mkdir(path)
    before = identity(path)
    server = at(gunicorn_server, worker, path, wait=False)
    if worker == "stock":
        assert server.wait_exit(20) != 0
        assert "is not a socket" in server.log() and server.tracebacks() >= 1, server.log()
    else:
        assert_refused(server, path, "a regular file" if kind == "file" else "a directory")
    assert identity(path) == before
    if kind == "file":
        with open(path) as fh:
            assert fh.read() == "keep me"


@pytest.mark.parametrize("case", ["missing directory", "too long"])
def test_bad_paths_get_one_line(gunicorn_server, tmp_path, case):
    if case == "missing directory":
        path, needle = str(tmp_path / "absent" / "gunicorn.sock"), "does not exist"
    else:
        path, needle = str(tmp_path / ("x" * 120) / "gunicorn.sock"), "too long"
        os.mkdir(os.path.dirname(path))
    server = at(gunicorn_server, "safe", path, wait=False)
    assert_refused(server, path, needle)
    assert not os.path.exists(path)


def test_a_dead_socket_is_replaced(gunicorn_server, tmp_path):
    path = str(tmp_path / "stale.sock")
    dead_socket(path)
    pin = os.open(path, os.O_PATH | os.O_NOFOLLOW)  # keeps ext4 from reusing the inode
    try:
        stale = identity(path)
        server = at(gunicorn_server, "safe", path)
        assert identity(path) not in (None, stale)
        assert stop(server) == 0 and identity(path) is None
    finally:
        os.close(pin)


# -- 4. reuse_port and abstract names ------------------------------------------------------

@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_reuse_port_on_a_unix_socket(gunicorn_server, worker):
    if not HAS_REUSE_PORT or not KERNEL_REFUSES_UNIX_REUSEPORT:
        # 19.6.0 ignores the name; a kernel that allows it: both just serve.
        server = gunicorn_server(worker, reuse_port=True, workers=1)
        assert server.serves()
        assert stop(server) == 0
        return
    server = gunicorn_server(worker, wait=False, reuse_port=True, workers=1)
    if worker == "stock" and REUSE_PORT_BINDS_IN_WORKERS:
        # Workers crash-loop and never serve.
        server.wait_for(lambda: server.booted() >= 3, 30, "workers to crash-loop")
        assert server.proc.poll() is None and not server.serves()
        return
    if worker == "stock":
        assert server.wait_exit(20) != 0
        assert "Retrying" in server.log() or "Can't connect" in server.log()
        return
    status = WORKER_BOOT_ERROR if REUSE_PORT_BINDS_IN_WORKERS else 1
    assert_refused(server, server.sock_path, "reuse_port", status=status)


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_abstract_name(gunicorn_server, tmp_path, worker):
    name = "\0safe-gthread-test-%s" % uuid.uuid4().hex
    server = at(gunicorn_server, worker, name, wait=False)
    if worker == "stock" and not STOCK_BINDS_ABSTRACT:
        assert server.wait_exit(20) != 0
        assert "embedded null" in server.log(), server.log()
        return
    server.wait_ready()
    assert _load.request(name, timeout=5.0)[0] == 200
    rc = stop(server)
    if worker == "stock":
        assert "embedded null" in server.log(), server.log()
        return
    assert rc == 0 and server.tracebacks() == 0, server.log()
    assert sorted(os.listdir(server.directory)) == sorted(
        ["gunicorn.log", "gunicorn.out", "gunicorn_conf.py"])


# -- 3. re-exec: USR2, then TERM the old master ---------------------------------------------

_LISTENING = re.compile(r"Listening at: \S+ \((\d+)\)")


def usr2(server):
    """USR2 the master; return the new master's pid once its workers have booted."""
    server.signal(signal.SIGUSR2)
    server.wait_for(lambda: len(_LISTENING.findall(server.log())) >= 2, 20, "the new master")
    new_master = int(_LISTENING.findall(server.log())[-1])
    server.wait_for(lambda: server.booted() >= 2 * server.settings["workers"], 20,
                    "the new master's workers")
    return new_master


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_usr2_then_term_old_master(gunicorn_server, worker):
    server = gunicorn_server(worker)
    inode = server.inode()
    new_master = usr2(server)
    stop(server)  # TERM to the old master
    if worker == "stock" and STOCK_WORKERS_UNLINK:
        # Its workers delete the file on the way out: the new master serves nobody.
        server.wait_for(lambda: server.inode() is None, 10, "the control to lose the file")
        assert pid_gone(new_master) is False
        return
    server.wait_for(lambda: "Master has been promoted" in server.log(), 20, "promotion")
    assert server.inode() == inode, server.log()
    server.wait_for(server.serves, 10, "the new master to answer")
    # The new master cleans up at its own stop: it was handed the socket's identity.
    os.kill(new_master, signal.SIGTERM)
    server.wait_for(lambda: pid_gone(new_master), 30, "the new master to exit")
    assert server.inode() is None, server.log()
    if worker == "safe":
        assert server.tracebacks() == 0, server.log()


# Stock keeps the file from 19.7: there the control could only pass, so it does not run.
@pytest.mark.parametrize("worker", ["stock", "safe"] if STOCK_WORKERS_UNLINK else ["safe"])
def test_usr2_then_term_new_master(gunicorn_server, worker):
    """A rollback: the new master goes, the old one keeps serving and still cleans up."""
    server = gunicorn_server(worker)
    inode = server.inode()
    new_master = usr2(server)
    os.kill(new_master, signal.SIGTERM)
    # Reaped, not only exited: until the old master has reaped its re-exec'd child it
    # still holds the socket for it and leaves the file at its stop (gunicorn's
    # ``reexec_pid``). Python runs pending handlers by signal number, so a TERM sent
    # right after the child's exit is handled before its SIGCHLD.
    server.wait_for(lambda: not os.path.exists("/proc/%d" % new_master), 30,
                    "the old master to reap the new one")
    if worker == "stock":
        server.wait_for(lambda: server.inode() is None, 10, "the control to lose the file")
        return
    assert server.inode() == inode, server.log()
    assert server.serves()
    assert stop(server) == 0
    assert server.inode() is None and server.tracebacks() == 0, server.log()


# -- 5. every built-in worker class keeps the file with guard.install() --------------------

def _cannot_run(worker_class, message):
    """Skip ``worker_class`` on this cell: only for a known incompatibility
    (``versions.KNOWN_INCOMPATIBLE``) under CI; on a laptop also when it is not installed."""
    reason = incompatibility(worker_class)
    if reason:
        pytest.skip("%s worker: %s" % (worker_class, reason))
    message = "%s (not a known incompatibility in tests/versions.py)" % message
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _worker_class_available(name):
    if incompatibility(name):
        _cannot_run(name, "")
    module = {"gevent": "gevent", "eventlet": "eventlet"}.get(name)
    if module is None:
        return
    try:
        __import__(module)
    except Exception as exc:  # not installable for this Python, or broken
        _cannot_run(name, "%s is not importable here: %s" % (module, exc))


#: The stock control runs only for the classes that lose the file on this gunicorn: with
#: the others it could only pass, and would prove nothing.
WORKER_CLASS_CASES = [(worker_class, guarded)
                      for worker_class in ("sync", "gthread", "gevent", "eventlet")
                      for guarded in (False, True)
                      if guarded or worker_class in STOCK_CLASSES_LOSING_FILE]


@pytest.mark.parametrize("worker_class,guarded", WORKER_CLASS_CASES, ids=[
    "%s-%s" % ("guard" if guarded else "stock", worker_class)
    for worker_class, guarded in WORKER_CLASS_CASES])
def test_worker_class_keeps_the_file(gunicorn_server, worker_class, guarded):
    _worker_class_available(worker_class)
    threads = 2 if worker_class == "gthread" else 1
    server = gunicorn_server(worker_class, wait=False, guard=guarded, threads=threads,
                             graceful_timeout=3)
    try:
        server.wait_ready()
    except Exception:
        # A guarded worker that crashes at boot is a failure of the guard, never a skip.
        if not guarded and worker_class in ("gevent", "eventlet") and "Traceback" in server.log():
            reason = [line for line in server.log().splitlines() if "Error" in line]
            _cannot_run(worker_class, "the stock %s worker does not boot on gunicorn %s "
                        "here: %s" % (worker_class, ".".join(map(str, GUNICORN)), reason[-1:]))
        raise
    inode = server.inode()
    server.reload()
    if not guarded:
        server.wait_for(lambda: server.inode() is None, 10, "the control to lose the file")
        return
    assert server.inode() == inode, server.log()
    server.wait_for(server.serves, 10, "the server to answer")
    assert stop(server) == 0
    assert server.inode() is None, server.log()
    assert server.tracebacks() == 0, server.log()
