"""The mold (``mold=True``): workers forked from a warm per-generation template.

In process: the protocol (messages and descriptors over a SOCK_SEQPACKET socketpair),
the arbiter's side of a spawn against a fake mold (answered, timed out, gone, an error,
a bug of ours), and the molds' lifecycle (start, ready, failure and backoff, a new
configuration). End to end, on the gunicorn versions the mold supports: the workers it
forks are the arbiter's children (reaped by it), never import the app, are ready in a
fork's time, serve, and a clean stop leaves no process behind; elsewhere the setting is
refused with one line.
"""
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from gunicorn import arbiter as gunicorn_arbiter

from safe_gthread import _compat, _deploy, _mold, _patch, _schedule
from safe_gthread.check import load as _load, procs as _procs
from conftest import require_root
from test_fds import fd_table

SUPPORTED = _mold.unsupported() is None


# -- the protocol --------------------------------------------------------------------------
@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_message_carries_fields_and_descriptors(pair):
    ours, theirs = pair
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as tmp:
        _mold.send(ours, "spawn", {"age": 7, "attrs": {"max_requests": 512}},
                   fds=[tmp.fileno(), read_end])
        kind, fields, fds = _mold.receive(theirs, timeout=1.0)
        try:
            assert kind == "spawn" and fields == {"age": 7, "attrs": {"max_requests": 512}}
            assert len(fds) == 2 and not set(fds) & {tmp.fileno(), read_end}
            # The same open files: the heartbeat file, and the "adopted" pipe.
            os.pwrite(fds[0], b"sg", 0)
            assert os.pread(tmp.fileno(), 2, 0) == b"sg"
            os.write(write_end, b"1")
            assert os.read(fds[1], 1) == b"1"
        finally:
            _mold.close_fds(fds + [read_end, write_end])


def test_eof_timeout_and_garbage(pair):
    ours, theirs = pair
    with pytest.raises(_mold.Unavailable):
        _mold.receive(theirs, timeout=0.05)
    read_end, write_end = os.pipe()
    ours.sendmsg([b"not json"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  __import__("array").array("i", [read_end]).tobytes())])
    with pytest.raises(_mold.ProtocolError):
        _mold.receive(theirs, timeout=1.0)
    os.close(read_end)
    # The descriptor that came with the garbage was closed: the pipe has no reader left.
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"x")
    os.close(write_end)
    ours.close()
    assert _mold.receive(theirs, timeout=1.0) is None


class ReadOnlyPid(object):
    @property
    def pid(self):  # gunicorn 19.x: a property
        return os.getpid()


def test_worker_attributes_are_the_plain_ones():
    worker = ReadOnlyPid()
    worker.age, worker.max_requests, worker.timeout = 3, 517, 15.0
    worker.booted, worker.wsgi, worker.tmp, worker.note = False, None, object(), "x"
    attrs = _mold.worker_attrs(worker)
    assert attrs == {"age": 3, "max_requests": 517, "timeout": 15.0, "booted": False,
                     "wsgi": None, "note": "x"}
    other = ReadOnlyPid()
    _mold.apply_attrs(other, dict(attrs, pid=99))
    assert other.max_requests == 517 and other.pid == os.getpid()


# -- the arbiter's side of a spawn, against a fake mold ----------------------------------------
class FakeWorker(object):
    def __init__(self, age):
        self.age = age
        self.max_requests = 100 + age
        self.tmp = tempfile.TemporaryFile()


class FakeArbiter(object):
    """gunicorn's spawn_worker, in the shape that matters: build the worker (which tells
    the molds), pre_fork, ``os.fork()`` looked up on gunicorn.arbiter, record the pid."""

    def __init__(self):
        self.cfg = object()
        self.LISTENERS = [object()]
        self.WORKERS = {}
        self.worker_age = 0
        self.timeout = 30

    def spawn_worker(self):
        self.worker_age += 1
        worker = FakeWorker(self.worker_age)
        _mold.constructed(worker)
        pid = gunicorn_arbiter.os.fork()
        assert pid != 0, "a unit test must never really fork"
        self.WORKERS[pid] = worker
        return pid


class FakeMold(threading.Thread):
    """Answers one SPAWN as told: ("spawned", pid), ("error", cause), "hang", "exit"."""

    def __init__(self, sock, answer):
        super().__init__()
        self.daemon = True
        self.sock, self.answer = sock, answer
        self.request = None
        self.adopted = None

    def run(self):
        message = _mold.receive(self.sock, timeout=5.0)
        kind, fields, fds = message
        self.request = (kind, fields)
        tmp_fd, go_fd = fds
        os.pwrite(tmp_fd, b"mold", 0)  # the worker writes to the arbiter's own file
        if self.answer == "exit":
            self.sock.close()
        elif self.answer == "hang":
            time.sleep(0.3)
        else:
            _mold.send(self.sock, self.answer[0], self.answer[1])
        self.adopted = os.read(go_fd, 1)  # the arbiter's word, or b"" (EOF)
        _mold.close_fds(fds)


@pytest.fixture
def molds(monkeypatch, caplog):
    """Molds with a ready fake mold process; real forks and kills replaced."""
    monkeypatch.setattr(_patch, "_process", [None])
    monkeypatch.setattr(_patch, "_on_disable", {})
    monkeypatch.setattr(_mold, "SPAWN_TIMEOUT", 0.1)
    monkeypatch.setattr(_mold, "wanted", lambda: True)
    caplog.set_level(logging.INFO, logger="gunicorn.error")
    forks, kills = [], []
    arbiter = FakeArbiter()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    now = [100.0]

    starts, kept = [], []

    def start(arbiter_, theirs_, mine_):
        kept.append(theirs_.dup())  # the mold's end, as a forked mold would hold it
        starts.append(arbiter_)
        return 4000 + len(starts)
    state = _mold.Molds(clock=lambda: now[0], fork=lambda: forks.append(1) or 777,
                        start=start,
                        kill=lambda pid, sig: kills.append((pid, sig)))
    state.mold = _mold._MoldRef(4000, ours, arbiter.cfg, list(arbiter.LISTENERS), now[0], 1)
    state.mold.ready_at = now[0]
    monkeypatch.setattr(_patch.here(), "molds", state)
    yield {"state": state, "arbiter": arbiter, "theirs": theirs, "forks": forks,
           "kills": kills, "now": now, "starts": starts, "caplog": caplog, "kept": kept}
    theirs.close()
    ours.close()
    for sock in kept:
        sock.close()
    assert gunicorn_arbiter.os is os


def spawn(m):
    arbiter = m["arbiter"]
    return m["state"].spawn(lambda self: self.spawn_worker(), arbiter)


def test_a_spawn_through_the_mold(molds):
    mold = FakeMold(molds["theirs"], ("spawned", {"pid": 4242}))
    mold.start()
    assert spawn(molds) == 4242
    mold.join(5)
    kind, fields = mold.request
    worker = molds["arbiter"].WORKERS[4242]
    assert kind == "spawn" and fields["age"] == 1 and fields["attrs"]["max_requests"] == 101
    assert os.pread(worker.tmp.fileno(), 4, 0) == b"mold"
    assert mold.adopted == b"1"  # told it was recorded: it may serve
    assert molds["forks"] == [] and molds["state"].forked == 1
    assert molds["state"].mold is not None


@pytest.mark.parametrize("answer, cause", [
    ("hang", "no answer within"), ("exit", "the mold exited"),
    (("error", {"cause": "OSError: fork"}), "could not fork: OSError: fork")])
def test_a_mold_that_cannot_answer_boots_the_worker_the_normal_way(molds, answer, cause):
    mold = FakeMold(molds["theirs"], answer)
    mold.start()
    assert spawn(molds) == 777  # the real fork's pid: gunicorn's own spawn goes on
    mold.join(5)
    assert molds["forks"] == [1] and 777 in molds["arbiter"].WORKERS
    assert mold.adopted == b""  # a late worker from that mold is told to leave
    state = molds["state"]
    assert state.mold is None
    assert molds["kills"] == [(4000, signal.SIGTERM)] and 4000 in state.stubborn
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and cause in errors[0] and "a new mold in 1s" in errors[0]
    # Backing off: no new mold until the second has passed, then one.
    state.tick(molds["arbiter"])
    assert molds["starts"] == []
    molds["now"][0] += 1.5
    state.tick(molds["arbiter"])
    assert len(molds["starts"]) == 1 and state.mold.pid == 4001 and state.mold.ready_at is None


def test_a_bug_of_ours_turns_the_mold_off(molds, monkeypatch):
    monkeypatch.setattr(_mold, "worker_attrs", lambda worker: 1 / 0)
    assert spawn(molds) == 777
    assert _patch.feature_disabled(_mold.FEATURE)
    errors = [r for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "mold failed and is off" in errors[0].getMessage()
    assert errors[0].exc_info is not None


def test_no_ready_mold_means_gunicorn_own_spawn(molds):
    state = molds["state"]
    state.mold.ready_at = None
    state.mold.awaited = True  # a later spawn: it does not wait for the mold
    calls = []
    assert state.spawn(lambda self: calls.append(gunicorn_arbiter.os) or 5, molds["arbiter"]) == 5
    assert calls == [os]


def test_a_new_generation_first_spawn_waits_for_its_mold(molds):
    """At start, and inside gunicorn's reload (which spawns before any manage_workers):
    the first spawn starts the generation's mold and waits for it to load."""
    state, arbiter = molds["state"], molds["arbiter"]
    arbiter.cfg = object()  # a HUP's new configuration
    answered = []

    def mold_process():
        deadline = time.monotonic() + 5
        while not molds["kept"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # loading the app
        sock = molds["kept"][0]
        _mold.send(sock, "ready", {"pid": 4001, "took": 0.1})
        fake = FakeMold(sock, ("spawned", {"pid": 5151}))
        fake.run()
        answered.append(fake)
    thread = threading.Thread(target=mold_process)
    thread.start()
    assert spawn(molds) == 5151
    thread.join(5)
    assert molds["kills"] == [(4000, signal.SIGTERM)]  # the previous generation's mold
    assert state.mold.pid == 4001 and state.mold.cfg is arbiter.cfg
    assert answered and answered[0].adopted == b"1" and molds["forks"] == []


class FakeScheduler(object):
    """The scheduler as ``_mold`` sees it: a real deploy state behind ``_deploy``."""

    def __init__(self, clock):
        self.reload_age = 0
        self.holds = []
        self.deploy = _deploy.Deploys(clock, writer=lambda arbiter, pid, hold:
                                      self.holds.append((pid, hold)))

    def _deploy(self, name, *args):
        return getattr(self.deploy, name)(*args)


def _failing_mold(molds, cause):
    """The next mold started says FAILED (the app cannot be loaded)."""
    index = len(molds["kept"])

    def mold_process():
        deadline = time.monotonic() + 5
        while len(molds["kept"]) <= index and time.monotonic() < deadline:
            time.sleep(0.01)
        _mold.send(molds["kept"][index], "failed", {"cause": cause})
    thread = threading.Thread(target=mold_process)
    thread.start()
    return thread


def test_a_hup_whose_mold_cannot_load_the_code_is_a_failed_reload(molds, monkeypatch):
    """Broken code and a HUP: the new generation's mold cannot import it. That is the
    failed reload itself: no new worker is forked (each would import the same code and
    fail), one ERROR naming the cause, the previous generation held serving. The next
    attempt (a successor, after the deploy's backoff) starts a new mold and waits for it;
    meanwhile no mold is started on a timer (each would fail with an ERROR of its own)."""
    state, arbiter, now = molds["state"], molds["arbiter"], molds["now"]
    scheduler = FakeScheduler(lambda: now[0])
    monkeypatch.setattr(_patch.here(), "scheduler", scheduler)
    deploy = scheduler.deploy
    arbiter.num_workers = 2
    for pid in (301, 302):
        arbiter.worker_age += 1
        arbiter.WORKERS[pid] = FakeWorker(arbiter.worker_age)
        deploy.on_ready(arbiter, pid, arbiter.worker_age)
    cause = "RuntimeError: broken deploy (web.py:6)"

    arbiter.cfg = object()  # the HUP's new configuration
    deploy.reload_starts(arbiter, 0)
    thread = _failing_mold(molds, cause)
    assert spawn(molds) is None  # the first new worker: not forked at all
    thread.join(5)
    assert spawn(molds) is None  # nor the second, and no second mold either
    deploy.reload_ends()
    assert len(molds["starts"]) == 1 and molds["forks"] == []
    assert sorted(arbiter.WORKERS) == [301, 302]
    assert molds["kills"][0] == (4000, signal.SIGTERM)  # the previous mold
    assert molds["kills"][1][1] == signal.SIGTERM and state.mold is None
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(
        "safe-gthread: reload failed: the app cannot be loaded: " + cause), errors
    assert deploy.reload.failed and deploy.reload_failures == 1
    assert sorted(scheduler.holds) == [(301, 1), (302, 1)]  # serve past max_requests

    # No mold on a timer meanwhile; the next attempt (after the deploy's backoff) waits
    # for a new mold, which still cannot load the code: one more ERROR, still no fork.
    now[0] += 10
    state.tick(arbiter)
    assert len(molds["starts"]) == 1
    thread = _failing_mold(molds, cause)
    assert spawn(molds) is None
    thread.join(5)
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and errors[1].startswith(
        "safe-gthread: a new worker cannot boot: the app cannot be loaded: " + cause)
    assert len(molds["starts"]) == 2 and molds["forks"] == []


def test_a_mold_that_cannot_load_at_first_start_leaves_gunicorn_own_boot(molds, monkeypatch):
    """Nothing serves yet: the mold's ERROR and the stock boot (whose failure halts
    gunicorn, as stock)."""
    state, arbiter = molds["state"], molds["arbiter"]
    monkeypatch.setattr(_patch.here(), "scheduler", FakeScheduler(lambda: molds["now"][0]))
    arbiter.cfg = object()
    thread = _failing_mold(molds, "ImportError: no module named web")
    assert state.spawn(lambda self: "stock", arbiter) == "stock"  # gunicorn's own spawn
    thread.join(5)
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot load the app: ImportError" in errors[0]
    assert not state.handed


def test_a_new_configuration_retires_the_mold(molds):
    state, arbiter = molds["state"], molds["arbiter"]
    arbiter.cfg = object()  # what a HUP does
    state.tick(arbiter)
    assert molds["kills"] == [(4000, signal.SIGTERM)]
    assert len(molds["starts"]) == 1 and state.mold.cfg is arbiter.cfg
    # So do new listeners (healing rebound the socket).
    state.mold.ready_at = molds["now"][0]
    arbiter.LISTENERS = [object()]
    state.tick(arbiter)
    assert len(molds["starts"]) == 2 and state.mold.listeners == arbiter.LISTENERS


def test_ready_failed_and_load_timeout(molds):
    state, arbiter, theirs = molds["state"], molds["arbiter"], molds["theirs"]
    state.mold.ready_at = None
    _mold.send(theirs, "ready", {"pid": 4000, "took": 1.5})
    state.tick(arbiter)
    assert state.mold.ready_at == molds["now"][0]
    state.mold.ready_at = None
    _mold.send(theirs, "failed", {"cause": "ImportError: no module named web (web.py:1)"})
    state.tick(arbiter)
    assert state.mold is None and molds["kills"] == [(4000, signal.SIGTERM)]
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert "cannot load the app: ImportError" in errors[-1]
    molds["now"][0] += 1.5
    state.tick(arbiter)  # a new one, after the backoff
    molds["now"][0] += arbiter.timeout + 1
    state.tick(arbiter)
    assert "not ready within 30s" in molds["caplog"].records[-1].getMessage()


def test_a_failed_mold_that_stays_gets_sigkill(molds, monkeypatch):
    state, arbiter = molds["state"], molds["arbiter"]
    monkeypatch.setattr(_mold, "_still_our_mold", lambda arbiter, pid, current: pid == 4000)
    state.failed(arbiter, state.mold, "no answer within 5s")
    assert molds["kills"] == [(4000, signal.SIGTERM)]
    molds["now"][0] += _mold.KILL_AFTER - 0.1
    state.tick(arbiter)
    assert (4000, signal.SIGKILL) not in molds["kills"]
    molds["now"][0] += 0.2
    state.tick(arbiter)
    assert molds["kills"][-1] == (4000, signal.SIGKILL) and not state.stubborn


def test_reload_turns_the_mold_off_with_one_line(molds):
    class Cfg(object):
        reload = True
        reuse_port = False
    state, arbiter = molds["state"], molds["arbiter"]
    arbiter.cfg = Cfg()
    state.tick(arbiter)
    state.tick(arbiter)
    errors = [r.getMessage() for r in molds["caplog"].records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "mold is off: gunicorn's reload" in errors[0]
    assert state.mold is None and molds["starts"] == []


def test_unsupported_says_why_in_one_line(monkeypatch):
    reason = _mold.unsupported()
    if _compat.GUNICORN_VERSION in _mold.TESTED_GUNICORN and os.uname()[0] == "Linux":
        assert reason is None
    else:
        assert reason and "\n" not in reason
    # Older than the oldest tested: refused, naming the version. Between the tested
    # ones, or newer (with a WARNING at install): allowed, the shape permitting.
    monkeypatch.setattr(_compat, "GUNICORN_VERSION", "19.5.0")
    assert "gunicorn 19.5.0 (supported: 19.6.0 - 27.0.1)" in _mold.unsupported()
    for version in ("22.0.0", "28.1.0b1"):
        monkeypatch.setattr(_compat, "GUNICORN_VERSION", version)
        assert _mold.unsupported() == reason
    assert _mold._version("28.1.0b1") == (28, 1, 0) and _mold._version("x") == ()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the mold needs Linux")
def test_a_spawn_worker_of_another_shape_is_refused(monkeypatch):
    def spawn_worker(self):
        return self.start_worker()  # a future gunicorn that spawns some other way
    monkeypatch.setattr(gunicorn_arbiter.Arbiter, "spawn_worker", spawn_worker)
    reason = _mold.unsupported()
    assert "Arbiter.spawn_worker is not the shape it knows (no fork, worker_class, " \
        "pre_fork)" in reason


# -- a forked worker's exit ----------------------------------------------------------------
_EXIT = '''import atexit, os, sys, threading, time
from safe_gthread import _mold

notes, code, how, failing = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"


def note(text, os=os, notes=notes):  # bound: the teardown clears modules and builtins
    fd = os.open(notes, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, text.encode() + b"\\n")
    os.close(fd)


class Finalized(object):
    def __del__(self, note=note):
        note("teardown")


def fail():
    raise RuntimeError("an atexit handler fails")


kept = Finalized()
atexit.register(note, "atexit")
if failing:
    atexit.register(fail)  # runs first (last in, first out); the others run all the same
threading.Thread(target=lambda: (time.sleep(0.1), note("thread"))).start()
sys.stdout.write("buffered")  # a pipe: block-buffered until the exit flushes it
ending = None
try:
    sys.exit(None if code == "none" else int(code) if code.lstrip("-").isdigit() else code)
except SystemExit as exc:
    if how == "python":
        raise
    ending = exc
_mold.exit_without_teardown(ending)  # as the mold calls it: out of the except clause
'''


@pytest.mark.parametrize("code, failing", [("0", False), ("3", False), ("-1", False),
                                           ("none", False), ("a message", False),
                                           ("4", True)])
def test_exit_without_teardown_is_python_exit_but_the_teardown(tmp_path, code, failing):
    script = tmp_path / "exits.py"
    script.write_text(_EXIT)
    ran = {}
    for how in ("python", "ours"):
        notes = tmp_path / how
        proc = subprocess.run([sys.executable, str(script), str(notes), code, how,
                               "1" if failing else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        stderr = re.sub(rb" at 0x[0-9a-f]+", b"", proc.stderr)  # the function's address
        ran[how] = (proc.returncode, proc.stdout, stderr, notes.read_text().split())
    # The same status, output (a failing handler's traceback once) and exit steps (the
    # thread joined, then atexit)...
    assert ran["ours"][:3] == ran["python"][:3]
    assert (b"an atexit handler fails" in ran["python"][2]) == failing
    assert ran["python"][1] == b"buffered"
    assert ran["python"][3][:2] == ran["ours"][3] == ["thread", "atexit"], ran
    # ...but no teardown: the control shows the finalizer Python's own exit runs.
    assert ran["python"][3][2:] == ["teardown"], ran


def test_exit_without_teardown_returns_where_python_lacks_the_steps(monkeypatch):
    monkeypatch.setattr(_compat, "EXIT_WITHOUT_TEARDOWN", False)
    assert _mold.exit_without_teardown(SystemExit(0)) is None


# -- end to end ------------------------------------------------------------------------------
MOLD_CONFIG = ["import safe_gthread", "safe_gthread.configure(mold=True)"]
_FORKED = re.compile(r"worker (\d+) forked from mold (\d+)")
_READY_AFTER_FORK = re.compile(r"worker (\d+) ready ([\d.]+)s after its fork")
_MOLD_READY = re.compile(r"mold (\d+) ready")


def _state_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError):
        return None, None


def _group(pgid):
    return sorted(pid for pid, _, group, _ in _procs.live_processes() if group == pgid)


def _mold_ready(server):
    """The pid of the server's first mold, once it has said it is ready."""
    server.wait_for(lambda: _MOLD_READY.search(server.errorlog()), 20, "the mold to be ready")
    return int(_MOLD_READY.search(server.errorlog()).group(1))


def _failed_requests(server, count):
    """``count`` requests one after another: how many got no 200."""
    failed = 0
    for _ in range(count):
        try:
            failed += _load.request(server.address, timeout=5.0)[0] != 200
        except (OSError, EOFError, ValueError):
            failed += 1
    return failed


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_workers_forked_from_the_mold(gunicorn_server, tmp_path, monkeypatch):
    imported = tmp_path / "imported"
    imported.mkdir()
    monkeypatch.setenv("SAFE_GTHREAD_APP_BOOT_SLEEP", "2")
    monkeypatch.setenv("SAFE_GTHREAD_APP_READY_DIR", str(imported))
    server = gunicorn_server("safe", max_requests=15, loglevel="debug", config=MOLD_CONFIG)
    arbiter = server.proc.pid
    mold = _mold_ready(server)
    assert _state_of(mold)[1] == arbiter

    assert _failed_requests(server, 80) == 0
    server.wait_for(lambda: len(_FORKED.findall(server.errorlog())) >= 4, 10,
                    "four workers forked from the mold")
    forked = [int(pid) for pid, source in _FORKED.findall(server.errorlog())
              if int(source) == mold]
    assert len(forked) >= 4

    def ready_times():
        return dict((int(pid), float(took))
                    for pid, took in _READY_AFTER_FORK.findall(server.errorlog()))
    server.wait_for(lambda: set(forked) <= set(ready_times()), 10, "the forked workers to be ready")
    ready = ready_times()
    log = server.errorlog()
    for pid in forked:
        assert "Booting worker with pid: %d" % pid in log
        # Never imported the app (the mold did, once), ready in a fork's time, not an
        # import's (2 s here: the first workers took that long).
        assert not (imported / str(pid)).exists()
        assert ready[pid] < 1.0, (pid, ready[pid])
        state, parent = _state_of(pid)
        assert state is None or parent == arbiter, (pid, state, parent)
    assert (imported / str(mold)).exists()
    # Descriptors: a forked worker holds its own heartbeat file only (no sibling's, not
    # the mold's socket), the mold none, once no spawn is under way (during one, the mold
    # and the new worker briefly hold the received descriptor and its dup2 copy).
    def beats(pid):
        return [t for t in fd_table(pid).values() if "wgunicorn-" in t]

    def settled():
        return not beats(mold) and all(
            len(beats(pid)) == 1 or _state_of(pid)[0] in (None, "Z") for pid in forked)
    server.wait_for(settled, 10, "the mold to hold no heartbeat file, each worker its own only")
    mold_sockets = set(t for t in fd_table(mold).values() if t.startswith("socket:"))
    listeners = set(t for t in fd_table(arbiter).values() if t.startswith("socket:"))
    for pid in forked:
        private = mold_sockets - listeners  # the mold's end of its socketpair
        assert not private & set(fd_table(pid).values()), pid

    # The workers that retired were reaped by the arbiter (no zombies left behind).
    exited = [int(pid) for pid in re.findall(r"Worker exiting \(pid: (\d+)\)", log)]
    assert set(forked) & set(exited)
    server.wait_for(lambda: all(_state_of(pid)[0] is None for pid in exited), 10,
                    "the retired workers to be reaped")
    assert server.tracebacks() == 0
    assert not re.search(r"\[ERROR\]", log), log

    # A clean stop: the arbiter, its workers and the mold are all gone.
    server.signal(signal.SIGTERM)
    server.wait_exit(30)
    server.wait_for(lambda: not _group(arbiter), 10, "every process of the group to exit")


_EXITING = '''import atexit
import os
import threading
import time

NOTES = os.environ["EXIT_NOTES"]


# Bound as defaults: the interpreter's teardown clears modules and builtins.
def note(text, path=NOTES, getpid=os.getpid, open_=os.open, write=os.write, close=os.close,
         flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT):
    fd = open_("%s/%d" % (path, getpid()), flags)
    write(fd, text.encode() + b"\\n")
    close(fd)


class Finalized(object):
    def __del__(self, note=note):
        note("teardown")


kept = Finalized()
atexit.register(note, "atexit")


def after_the_exit_hook():
    # Work that ends only once the worker is exiting (its worker_exit hook has run): the
    # exit must wait for it.
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open("%s/%d" % (NOTES, os.getpid())) as fh:
                if "worker_exit" in fh.read():
                    break
        except OSError:
            pass
        time.sleep(0.02)
    note("thread")


def app(environ, start_response):
    threading.Thread(target=after_the_exit_hook, daemon=False).start()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
@pytest.mark.parametrize("mold", [True, False], ids=["mold", "control"])
def test_a_forked_worker_exits_without_the_teardown(gunicorn_server, tmp_path, monkeypatch,
                                                    mold):
    notes = tmp_path / "notes"
    notes.mkdir()
    monkeypatch.setenv("EXIT_NOTES", str(notes))
    source = tmp_path / "exiting.py"
    source.write_text(_EXITING)
    hook = ["def worker_exit(server, worker):",
            "    import os",
            "    fd = os.open(os.path.join(os.environ['EXIT_NOTES'], str(os.getpid())),",
            "                 os.O_WRONLY | os.O_APPEND | os.O_CREAT)",
            "    os.write(fd, b'worker_exit\\n')",
            "    os.close(fd)"]
    server = gunicorn_server("safe", app="exiting:app", files=[str(source)], max_requests=4,
                             workers=1, config=(MOLD_CONFIG if mold else []) + hook)
    first = server.worker_pids()
    assert _failed_requests(server, 4) == 0
    exited = [int(pid) for pid in first]
    server.wait_for(lambda: all((notes / str(pid)).exists() and "atexit" in
                                (notes / str(pid)).read_text() for pid in exited) and
                    all(_state_of(pid)[0] is None for pid in exited), 15,
                    "the first worker to exit and be reaped")
    time.sleep(0.5)  # a teardown, if any, is over by now
    steps = (notes / str(exited[0])).read_text().split()
    # gunicorn's hook, then Python's exit steps in order: the requests' threads joined
    # (each finishes only after the hook), atexit; the teardown (a module global's
    # finalizer) only without the mold.
    threads = steps.count("thread")
    assert threads >= 1, steps
    assert steps == ["worker_exit"] + ["thread"] * threads + ["atexit"] + (
        [] if mold else ["teardown"]), steps
    assert server.serves()
    log = server.errorlog()
    assert server.tracebacks() == 0 and not re.search(r"\[ERROR\]", log), log
    assert "exited with code" not in log, log


_FROZEN = """import gc

IMPORTED = ["made at import"]  # a list: always tracked by the cyclic collector
FROZEN_AT_IMPORT = gc.get_freeze_count()  # not 0 everywhere: 3.12 freezes its startup's


def app(environ, start_response):
    visited = any(obj is IMPORTED for obj in gc.get_objects())
    frozen_since = gc.get_freeze_count() - FROZEN_AT_IMPORT
    body = ("%d %s" % (frozen_since, "visited" if visited else "frozen")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
@pytest.mark.skipif(not _compat.GC_FREEZE, reason="gc.freeze() is Python >= 3.7")
@pytest.mark.parametrize("mold", [True, False], ids=["mold", "control"])
def test_the_app_imported_in_the_mold_is_frozen_in_its_workers(gunicorn_server, tmp_path, mold):
    """A worker forked from the mold never visits the objects the app made at import in
    its cyclic collections (``gc.freeze()`` before the fork): they stay on pages shared
    with the mold. The control (the safe worker without the mold) imports the app itself,
    and its collector visits them."""
    source = tmp_path / "frozen.py"
    source.write_text(_FROZEN)
    server = gunicorn_server("safe", app="frozen:app", files=[str(source)], max_requests=3,
                             config=MOLD_CONFIG if mold else [])
    # Across restarts: the first workers and successors forked from the mold.
    answers = set(body for body in _versions(server, 12))
    server.wait_for(lambda: server.restarts() >= 2, 10, "two restarts")
    answers |= set(_versions(server, 6))
    assert all(isinstance(body, bytes) for body in answers), (answers, server.log())
    counts = set(int(body.split()[0]) for body in answers)  # frozen since the import
    states = set(body.split()[1] for body in answers)
    if mold:
        assert states == {b"frozen"} and min(counts) > 0, (answers, server.log())
    else:
        assert states == {b"visited"} and counts == {0}, (answers, server.log())
    assert server.tracebacks() == 0, server.log()


_CYCLIC = """import safe_gthread


class CyclicWorker(safe_gthread.Worker):
    # Built in the mold at every spawn: a reference cycle the mold drops after the fork.
    def __init__(self, *args, **kwargs):
        super(CyclicWorker, self).__init__(*args, **kwargs)
        self.cycle = [self]
"""


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
@pytest.mark.skipif(not _compat.GC_FREEZE, reason="gc.freeze() is Python >= 3.7")
def test_what_a_spawn_leaves_behind_is_collected_not_frozen(gunicorn_server, tmp_path):
    """Each spawn builds a worker object in the mold, here one in a reference cycle. The
    mold collects before it freezes, so the cycles of earlier spawns are freed, not frozen
    for the mold's life: what a worker inherits frozen stays the same from spawn to
    spawn."""
    for name, text in (("frozen.py", _FROZEN), ("cyclic.py", _CYCLIC)):
        (tmp_path / name).write_text(text)
    server = gunicorn_server("safe", app="frozen:app", max_requests=2, workers=1,
                             loglevel="debug",
                             files=[str(tmp_path / "frozen.py"), str(tmp_path / "cyclic.py")],
                             config=MOLD_CONFIG + [
                                 # gunicorn 19.x loads the worker class before it puts its
                                 # directory on sys.path.
                                 "import os, sys",
                                 "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))",
                                 'worker_class = "cyclic.CyclicWorker"'])
    counts = []
    for _ in range(30):  # about 15 spawns
        status, _, body = _load.request(server.address, timeout=5.0)
        assert status == 200, server.log()
        counts.append(int(body.split()[0]))
    assert "forked from mold" in server.errorlog() and server.restarts() >= 10, server.log()
    # Not growing from spawn to spawn (a cycle frozen at each spawn added about 9 objects
    # to every later worker's count); what happens to be alive at a freeze varies by one.
    assert max(counts[4:]) - min(counts[4:]) <= 3, ("%r" % counts, server.log())
    assert server.tracebacks() == 0, server.log()


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_a_killed_mold_is_replaced(gunicorn_server, monkeypatch):
    monkeypatch.setenv("SAFE_GTHREAD_APP_BOOT_SLEEP", "0.5")
    server = gunicorn_server("safe", max_requests=15, loglevel="debug", config=MOLD_CONFIG)
    first = _mold_ready(server)
    # Under load (8 clients, restarts every 15 requests a worker): the mold is killed,
    # workers boot the normal way until its replacement is ready, nothing fails.
    replaced = lambda: len(set(_MOLD_READY.findall(server.errorlog()))) >= 2
    result = []
    loader = threading.Thread(target=lambda: result.append(_load.run_load(
        server.address, seconds=20, concurrency=8, stop=replaced)))
    loader.start()
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    loader.join(30)
    molds = [int(pid) for pid in _MOLD_READY.findall(server.errorlog())]
    assert len(set(molds)) >= 2 and molds[-1] != first, server.log()
    assert result[0].requests > 0 and result[0].failed == 0, (result[0].as_dict(), server.log())
    # gunicorn <= 23 adds its own ERROR for any child a signal ended ("Worker (pid:...)
    # was sent SIGKILL!"): ours is the one that names the mold.
    errors = re.findall(r"\[ERROR\] (safe-gthread: .*)", server.errorlog())
    # Seen by the next look at its socket ("it exited"), or by a spawn that asked it
    # ("the mold exited", "cannot reach the mold"): either way one line.
    assert len(errors) == 1 and "mold %d failed: " % first in errors[0], errors
    assert server.tracebacks() == 0


def test_the_setting_is_refused_in_one_line_where_unsupported(gunicorn_server):
    """Every cell runs a gunicorn the mold supports: the config file makes this one look
    older than the oldest, which the arbiter refuses when it loads the worker class."""
    server = gunicorn_server("safe", wait=False, config=[
        "import safe_gthread._compat", "safe_gthread._compat.GUNICORN_VERSION = '19.5.0'"]
        + MOLD_CONFIG)
    assert server.wait_exit(30) == 1
    lines = [line for line in server.log().splitlines() if "safe-gthread: mold:" in line]
    assert lines and lines[0].endswith(
        "Error: safe-gthread: mold: it is not supported on gunicorn 19.5.0 (supported: "
        "19.6.0 - 27.0.1); remove mold=True / SAFE_GTHREAD_MOLD"), lines
    assert server.tracebacks() == 0
    assert not os.path.exists(server.sock_path)  # refused before it bound


_WEB = '''import os
import time

time.sleep(1.0)
VERSION = %r
if os.path.exists("broken"):
    raise RuntimeError("broken deploy")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(VERSION)))])
    return [VERSION]
'''


def _versions(server, count=6):
    seen = []
    for _ in range(count):
        status, _, body = _load.request(server.address, timeout=5.0)
        seen.append(body if status == 200 else status)
    return seen


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_a_hup_loads_the_new_code_in_a_new_mold(gunicorn_server, tmp_path):
    source = tmp_path / "web.py"
    source.write_text(_WEB % b"v1")
    server = gunicorn_server("safe", app="web:app", files=[str(source)], loglevel="debug",
                             config=MOLD_CONFIG)
    assert set(_versions(server)) == {b"v1"}
    first = _mold_ready(server)

    with open(os.path.join(server.directory, "web.py"), "w") as fh:
        fh.write(_WEB % b"v2")
    server.reload()
    assert set(_versions(server)) == {b"v2"}
    molds = [int(pid) for pid in _MOLD_READY.findall(server.errorlog())]
    second = molds[-1]
    assert second != first
    server.wait_for(lambda: _state_of(first)[0] is None, 10, "the first mold to exit")
    new_workers = server.worker_pids()
    forked = dict((int(pid), int(mold)) for pid, mold in _FORKED.findall(server.errorlog()))
    assert new_workers and all(forked.get(pid) == second for pid in new_workers)

    # Broken code on disk and a HUP: the new mold cannot load it. That is the failed
    # reload itself: one ERROR naming the cause, no new worker forked or booted the
    # normal way (each would import the broken code and fail), the workers of the
    # previous generation keep serving v2.
    server.wait_for(lambda: len(server.worker_pids()) == 2, 10, "the first generation gone")
    server.wait_for(lambda: all(_state_of(pid)[0] is None for pid, mold in forked.items()
                      if mold == first), 10,
          "the first generation reaped")
    serving = sorted(server.worker_pids())
    before = len(server.errorlog())
    booted = server.errorlog().count("Booting worker")
    open(os.path.join(server.directory, "broken"), "w").close()
    with open(os.path.join(server.directory, "web.py"), "w") as fh:
        fh.write(_WEB % b"v3")
    server.signal(signal.SIGHUP)
    server.wait_for(lambda: "reload failed" in server.errorlog(), 20, "the failed reload")
    assert set(_versions(server, 20)) == {b"v2"}
    assert server.proc.poll() is None
    log = server.errorlog()
    errors = re.findall(r"\[ERROR\] (.*)", log[before:])
    assert len(errors) == 1 and errors[0].startswith(
        "safe-gthread: reload failed: the app cannot be loaded: RuntimeError: broken "
        "deploy"), errors
    assert "no new worker was started" in errors[0]
    assert log.count("Booting worker") == booted  # nobody tried the broken code
    assert "cannot load the app (" not in log  # no worker's own failed import
    assert sorted(server.worker_pids()) == serving


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_a_fault_of_ours_leaves_gunicorn_spawning_as_stock(gunicorn_server, monkeypatch):
    monkeypatch.setenv(_patch.ENV_TEST_FAULT, "mold")
    server = gunicorn_server("safe", max_requests=10, config=MOLD_CONFIG)
    assert set(_versions(server, 40)) == {b"Hello World"}
    # Two workers, 40 requests, max_requests 10: restarts go on (the last one may still
    # be booting when the requests end).
    server.wait_for(lambda: server.restarts() >= 2, 10, "two restarts")
    errors = re.findall(r"\[ERROR\] (.*)", server.errorlog())
    assert len(errors) == 1 and "mold failed and is off" in errors[0], errors
    assert "forked from mold" not in server.errorlog()


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_gunicorn_timeout_ttin_ttou_and_quit_reach_forked_workers(gunicorn_server):
    server = gunicorn_server("safe", timeout=2, loglevel="debug", config=MOLD_CONFIG)
    arbiter = server.proc.pid
    forked = lambda: [int(pid) for pid, _ in _FORKED.findall(server.errorlog())]
    assert sorted(forked()) == sorted(server.worker_pids()), server.log()  # the first too

    # A worker whose heartbeat stops (SIGSTOP) is killed by gunicorn's timeout.
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    server.wait_for(lambda: "WORKER TIMEOUT (pid:%d)" % victim in server.errorlog(), 15,
                    "gunicorn's timeout")
    server.wait_for(lambda: _state_of(victim)[0] is None and len(server.worker_pids()) == 2, 15,
                    "the hung worker reaped and replaced")
    assert set(server.worker_pids()) <= set(forked()), server.log()

    # TTIN forks one more from the mold; TTOU takes one away.
    server.signal(signal.SIGTTIN)
    server.wait_for(lambda: len(server.worker_pids()) == 3, 10, "a third worker")
    assert set(server.worker_pids()) <= set(forked()), server.log()
    server.signal(signal.SIGTTOU)
    server.wait_for(lambda: len(server.worker_pids()) == 2, 10, "back to two workers")
    assert server.serves()

    # QUIT: a quick stop; nothing of the group is left.
    server.signal(signal.SIGQUIT)
    server.wait_exit(30)
    server.wait_for(lambda: not _group(arbiter), 10, "every process of the group to exit")
    assert server.tracebacks() == 0


# -- the subreaper and gunicorn's reap_workers -------------------------------------------------
class FakeOs(object):
    def __init__(self, reaped):
        self.reaped = list(reaped)
        self.sep = os.sep

    def waitpid(self, pid, options):
        if not self.reaped:
            raise ChildProcessError(10, "No child processes")
        return self.reaped.pop(0)


def test_reap_workers_sees_only_gunicorn_own_children(caplog):
    """gunicorn < 26 reads any reaped child's exit status as a worker's (3 or 4 halt the
    server): with the mold (the arbiter a subreaper) an orphan the app left behind must
    never reach it."""
    caplog.set_level(logging.DEBUG, logger="gunicorn.error")
    arbiter = FakeArbiter()
    arbiter.WORKERS = {11: object()}
    arbiter.reexec_pid = 12
    arbiter.dirty_arbiter_pid = 0
    stand_in = _mold._OwnChildrenOs(arbiter, FakeOs([(90, 4 << 8), (11, 0), (91, 3 << 8),
                                                      (12, 0), (0, 0)]))
    assert stand_in.waitpid(-1, os.WNOHANG) == (11, 0)
    assert stand_in.waitpid(-1, os.WNOHANG) == (12, 0)
    assert stand_in.waitpid(-1, os.WNOHANG) == (0, 0)
    with pytest.raises(ChildProcessError):
        stand_in.waitpid(-1, os.WNOHANG)
    assert stand_in.sep == os.sep  # everything else is the wrapped os
    unknown = [r.getMessage() for r in caplog.records if "unknown child" in r.getMessage()]
    assert len(unknown) == 2 and "pid:90" in unknown[0] and "pid:91" in unknown[1]
    # A specific pid is passed through as asked.
    assert _mold._OwnChildrenOs(arbiter, FakeOs([(95, 0)])).waitpid(95, 0) == (95, 0)


_ORPHANS = '''import os
import time


def app(environ, start_response):
    # A grandchild orphaned at once (its parent exits), as a daemon that double-forks
    # is; it exits later with status 4, gunicorn's APP_LOAD_ERROR.
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(4)
        os._exit(0)
    os.waitpid(child, 0)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_an_orphan_exiting_with_status_4_does_not_halt_the_server(gunicorn_server, tmp_path):
    source = tmp_path / "orphans.py"
    source.write_text(_ORPHANS)
    server = gunicorn_server("safe", app="orphans:app", files=[str(source)],
                             loglevel="debug", config=MOLD_CONFIG)
    workers = sorted(server.worker_pids())
    for _ in range(3):
        assert _load.request(server.address, timeout=5.0)[0] == 200
    server.wait_for(lambda: server.errorlog().count("unknown child process") >= 3, 10,
                    "the arbiter to reap the three orphans")
    time.sleep(0.5)
    assert server.proc.poll() is None and server.serves()
    assert sorted(server.worker_pids()) == workers
    log = server.errorlog()
    assert "Shutting down" not in log and "App failed to load" not in log
    assert not re.search(r"\[ERROR\]", log), log


_THREADED = '''import threading
import time

# A background thread started at import time: it runs in the mold only.
threading.Thread(target=time.sleep, args=(3600,), name="exporter", daemon=True).start()


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_threads_started_at_import_are_named_in_one_warning(gunicorn_server, tmp_path):
    source = tmp_path / "threaded.py"
    source.write_text(_THREADED)
    server = gunicorn_server("safe", app="threaded:app", files=[str(source)],
                             config=MOLD_CONFIG)
    assert server.serves()
    warnings = re.findall(r"\[WARNING\] (.*)", server.errorlog())
    assert len(warnings) == 1 and "the app's import started 1 thread(s) (exporter)" in \
        warnings[0], warnings


_LISTENING = re.compile(r"Listening at: \S+ \((\d+)\)")


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_usr2_then_int_with_the_mold(gunicorn_server):
    """USR2 as with stock gunicorn: the new master starts a mold of its own and its
    workers are that mold's forks; TERM to the old master leaves the new one serving;
    INT to the new master stops it, and nothing of either group is left."""
    server = gunicorn_server("safe", loglevel="debug", config=MOLD_CONFIG)
    old = server.proc.pid
    first_mold = _mold_ready(server)
    server.signal(signal.SIGUSR2)
    server.wait_for(lambda: len(_LISTENING.findall(server.errorlog())) >= 2, 20, "the new master")
    new = int(_LISTENING.findall(server.errorlog())[-1])
    assert new != old

    def new_molds():
        return set(int(pid) for pid in _MOLD_READY.findall(server.errorlog())) - {first_mold}

    def new_forks():
        return [int(pid) for pid, mold in _FORKED.findall(server.errorlog())
                if int(mold) in new_molds()]
    server.wait_for(lambda: len(new_forks()) >= server.settings["workers"], 30,
                    "the new master's workers, forked from its own mold")
    for mold in new_molds():
        assert _state_of(mold)[1] == new, (mold, _state_of(mold))

    server.signal(signal.SIGTERM)  # the old master goes
    server.wait_exit(30)
    server.wait_for(lambda: _state_of(first_mold)[0] is None, 10, "the old mold to exit")
    assert server.serves(), server.log()
    os.kill(new, signal.SIGINT)
    server.wait_for(lambda: not _group(old), 20, "every process of the group to exit")
    assert server.tracebacks() == 0, server.log()


def _uid(pid):
    """The effective uid of ``pid``, or None once it has exited."""
    uids = _procs.status_field(pid, "Uid")
    return None if uids is None else int(uids[1])


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_usr1_reopens_the_logs_of_workers_forked_later(gunicorn_server):
    """A log rotation (rename, then USR1): the arbiter reopens its files and forwards the
    signal to the mold, which reopens its own before its next spawn. Workers forked after
    the rotation write to the new file, not to the renamed one they would otherwise
    inherit from the mold."""
    server = gunicorn_server("safe", max_requests=10, loglevel="debug", config=MOLD_CONFIG)
    _mold_ready(server)
    rotated = server.log_path + ".1"
    os.rename(server.log_path, rotated)
    server.signal(signal.SIGUSR1)
    server.wait_for(lambda: os.path.exists(server.log_path), 10, "the arbiter to reopen the log")
    assert _failed_requests(server, 60) == 0  # 2 workers x 10 requests each: restarts
    server.wait_for(lambda: len(_FORKED.findall(server.errorlog())) >= 2, 20,
                    "workers forked after the rotation")
    after = [int(pid) for pid, _ in _FORKED.findall(server.errorlog())]
    # "Booting worker" is the worker's own first line, written by the forked process.
    server.wait_for(lambda: all("Booting worker with pid: %d" % pid in server.errorlog()
                                for pid in after), 10, "their own lines in the new file")
    old_text = _procs.read_text(rotated)
    assert not any("Booting worker with pid: %d" % pid in old_text for pid in after)
    assert server.tracebacks() == 0, server.log()


@pytest.mark.skipif(not SUPPORTED, reason="the mold is refused here: %s" % _mold.unsupported())
def test_user_and_group_drop_privileges_in_forked_workers(gunicorn_server):
    """``user``/``group`` with the mold: the mold imports the app as the arbiter's user
    (root), as preload_app does; every worker forked from it runs as ``user``, serves,
    and restarts (max_requests) keep forking from the mold."""
    require_root()
    import pwd
    nobody = pwd.getpwnam("nobody")
    # This machine's pyenv Pythons live under /root (mode 0700): a module gunicorn imports
    # lazily after the worker dropped privileges (hashlib, by util.seed) is imported in
    # the arbiter first. Nothing else here depends on where Python is installed.
    server = gunicorn_server("safe", max_requests=10, loglevel="debug", user="nobody",
                             group=str(nobody.pw_gid), config=["import hashlib"] + MOLD_CONFIG)
    mold = _mold_ready(server)
    assert _uid(mold) == 0
    assert _failed_requests(server, 60) == 0, server.log()
    server.wait_for(lambda: len(_FORKED.findall(server.errorlog())) >= 4, 20,
                    "restarts forked from the mold")
    # At max_requests 10 both workers may be between a retirement and its successor, and
    # gunicorn logs "Booting worker" before the worker drops privileges (init_process):
    # wait for two workers that both run as nobody. Were they never to drop, this times out.
    def both_serve_as_nobody():
        workers = server.worker_pids()
        return len(workers) == 2 and all(_uid(pid) == nobody.pw_uid for pid in workers)
    server.wait_for(both_serve_as_nobody, 10, "both workers to run as nobody")
    workers = server.worker_pids()
    assert set(workers) <= set(int(pid) for pid, _ in _FORKED.findall(server.errorlog()))
    assert server.tracebacks() == 0, server.log()
    assert not re.search(r"\[ERROR\]", server.errorlog()), server.log()
