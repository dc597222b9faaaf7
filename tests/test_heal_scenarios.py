"""The self-healing path on real gunicorn: an ``rm`` under load, twice, of the
backup too; foreign files put at the path; a clean stop; a SIGKILLed arbiter; switching a
running server from the stock worker to ``safe_gthread.Worker`` with HUP and with USR2.

A probe client sends GET / on a fresh connection every ~10 ms through the unix socket;
an outage is a run of failed probes, measured from the last answered probe before it to
the first one after it. The stock worker is the control: it never heals, and on 19.6.0 a
stock-to-stock reload loses the path for good.
"""
import os
import re
import signal
import stat
import threading
import time

import pytest

from safe_gthread.check import load as _load, procs as _procs
from safe_gthread.check.runner import Gunicorn
from test_scenarios import identity, pid_gone as _gone, stop
from versions import STOCK_WORKERS_UNLINK

#: The contract (DESIGN.md invariant 7): the path serves again within 1 s.
MAX_OUTAGE = 1.0
_LISTENING = re.compile(r"Listening at: \S+ \((\d+)\)")


class Probe(threading.Thread):
    """GET / on a fresh connection every ``interval`` seconds until stopped."""

    def __init__(self, path, interval=0.01):
        super(Probe, self).__init__()
        self.daemon = True
        self.path = path
        self.interval = interval
        self.records = []  # (monotonic time, answered)
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                ok = _load.request(self.path, timeout=2.0)[0] == 200
            except (OSError, EOFError, ValueError):
                ok = False
            self.records.append((started, ok))
            self._halt.wait(self.interval)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._halt.set()
        self.join(10)

    def failed(self):
        return sum(1 for _, ok in self.records if not ok)

    def outages(self):
        """``[(seconds, failed probes)]``, one per run of failures between answers."""
        found, last_ok, failed = [], None, 0
        for when, ok in self.records:
            if ok:
                if failed:
                    found.append((when - (last_ok if last_ok is not None else when), failed))
                last_ok, failed = when, 0
            else:
                failed += 1
        if failed:  # never answered again
            found.append((float("inf"), failed))
        return found

    def longest(self):
        return max([seconds for seconds, _ in self.outages()] or [0.0])

    def answered_since(self, moment):
        return sum(1 for when, ok in self.records if ok and when > moment)


def backups(server):
    return sorted(name for name in os.listdir(server.directory) if name.endswith(".sg-backup"))


def listing(server):
    """The directory without the logs gunicorn writes."""
    return sorted(name for name in os.listdir(server.directory)
                  if name not in ("gunicorn.log", "gunicorn.out"))


def warnings(server, phrase):
    return [line for line in server.errorlog().splitlines()
            if "[WARNING]" in line and phrase in line]


def still_missing(server, seconds=1.5):
    """True if the path stays missing for ``seconds`` (the control: nothing heals it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.lexists(server.sock_path):
            return False
        time.sleep(0.05)
    return True


def stays(path, ident, seconds=1.0):
    """True if ``path`` keeps naming ``ident`` for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if identity(path) != ident:
            return False
        time.sleep(0.05)
    return True


def settle(probe, server, answers=20, timeout=20):
    """Wait until the probe has ``answers`` more answers after now."""
    now = time.monotonic()
    server.wait_for(lambda: probe.answered_since(now) >= answers, timeout,
                    "%d answered probes" % answers)


def report(probe):
    # Benchmarks print timings; tests print them too, for the record.
    print("probes %d, failed %d, outages %s" % (
        len(probe.records), probe.failed(),
        ["%.3fs/%d" % outage for outage in probe.outages()]))


def assert_one_short_outage(probe, server):
    report(probe)
    outages = probe.outages()
    assert probe.longest() < MAX_OUTAGE, (outages, server.log())
    assert sum(failed for _, failed in outages) == probe.failed()


# -- rm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_rm_under_load(gunicorn_server, worker):
    server = gunicorn_server(worker)
    mine = identity(server.sock_path)
    with Probe(server.sock_path) as probe:
        settle(probe, server)
        os.unlink(server.sock_path)
        if worker == "stock":
            assert still_missing(server), server.log()
            assert not server.serves()
            return
        server.wait_for(lambda: identity(server.sock_path) == mine, 10, "the path restored")
        settle(probe, server)
    assert_one_short_outage(probe, server)
    assert len(warnings(server, "restored it")) == 1, server.log()
    assert server.tracebacks() == 0, server.log()


def test_rm_twice(gunicorn_server):
    server = gunicorn_server("safe")
    mine = identity(server.sock_path)
    with Probe(server.sock_path) as probe:
        for _ in range(2):
            settle(probe, server)
            os.unlink(server.sock_path)
            server.wait_for(lambda: identity(server.sock_path) == mine, 10,
                            "the path restored")
        settle(probe, server)
    assert_one_short_outage(probe, server)
    assert len(warnings(server, "restored it")) == 2, server.log()
    assert stop(server) == 0
    assert listing(server) == ["gunicorn_conf.py"], server.log()


def test_rm_of_the_path_and_the_backup(gunicorn_server):
    """Nothing to link back: a fresh socket at the path, the workers rolled onto it."""
    server = gunicorn_server("safe")
    mine = identity(server.sock_path)
    old_workers = set(server.worker_pids())
    (backup,) = backups(server)
    with Probe(server.sock_path) as probe:
        settle(probe, server)
        os.unlink(os.path.join(server.directory, backup))
        os.unlink(server.sock_path)
        server.wait_for(lambda: identity(server.sock_path) not in (None, mine), 10,
                        "a fresh socket at the path")
        server.wait_for(lambda: not old_workers.intersection(server.worker_pids()), 30,
                        "the old workers to retire")
        server.wait_for(server._workers_listen_to_signals, 20, "the new workers")
        settle(probe, server)
    assert_one_short_outage(probe, server)
    assert len(warnings(server, "bound a new socket")) == 1, server.log()
    assert len(backups(server)) == 1
    assert server.tracebacks() == 0, server.log()
    assert stop(server) == 0
    assert listing(server) == ["gunicorn_conf.py"], server.log()


@pytest.mark.parametrize("what", ["file", "socket", "symlink"])
def test_a_foreign_file_put_at_the_path_is_never_replaced(gunicorn_server, tmp_path, what):
    server = gunicorn_server("safe")
    path = server.sock_path
    spare = str(tmp_path / "spare")
    foreign = None
    if what == "file":
        with open(spare, "w") as fh:
            fh.write("keep me")
    elif what == "socket":
        foreign = gunicorn_server("stock")  # another server, moved onto our path below
        spare = foreign.sock_path
    else:
        os.symlink(os.path.join(server.directory, backups(server)[0]), spare)
    # rm and put, in one step: rename() replaces the path atomically, so the healer
    # never sees it missing.
    os.rename(spare, path)
    theirs = identity(path)
    server.wait_for(lambda: warnings(server, "never replaced"), 10, "the warning")
    assert stays(path, theirs), server.log()
    if what == "socket":
        assert _load.request(path, timeout=5.0)[0] == 200  # the foreign server serves
    assert len(warnings(server, "never replaced")) == 1, server.log()
    assert stop(server) == 0
    assert identity(path) == theirs, server.log()  # its stop leaves it too
    assert backups(server) == []
    if what == "file":
        with open(path) as fh:
            assert fh.read() == "keep me"
    if foreign is not None:
        foreign.sock_path = path
        assert foreign.serves()


# -- stops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGQUIT"])
def test_a_clean_stop_leaves_the_directory_as_it_found_it(gunicorn_server, sig):
    server = gunicorn_server("safe")
    assert len(backups(server)) == 1
    server.reload()
    os.unlink(server.sock_path)
    server.wait_for(server.serves, 10, "the path restored")
    server.signal(getattr(signal, sig))
    assert server.wait_exit() == 0
    assert listing(server) == ["gunicorn_conf.py"], server.log()


def test_sigkill_of_the_arbiter_is_cleaned_by_the_next_start(gunicorn_server):
    server = gunicorn_server("safe")
    server.signal(signal.SIGKILL)
    # The orphaned workers notice their parent is gone and leave.
    server.wait_for(lambda: not _procs.group_alive(server.proc, server.proc.pid), 60,
                    "the orphaned workers to exit")
    server.stop()
    stale = backups(server)
    left = set(listing(server)) - set(stale)
    assert left <= {"gunicorn_conf.py", "gunicorn.sock", "gunicorn.ctl"}, listing(server)
    assert len(stale) <= 1, stale
    again = Gunicorn(server.directory, "safe")
    try:
        again.start()
        assert len(backups(again)) == 1 and not set(stale) & set(backups(again)), again.log()
        assert stop(again) == 0
    finally:
        again.stop()
    assert listing(again) == ["gunicorn_conf.py"], again.log()


# -- switching a running server onto the fix -----------------------------------------------

def _switch_config(server, worker_class):
    with open(server.config_path) as fh:
        text = fh.read()
    text, count = re.subn(r"(?m)^worker_class = .*$", "worker_class = %r" % worker_class,
                          text)
    assert count == 1
    with open(server.config_path, "w") as fh:
        fh.write(text)


@pytest.mark.parametrize("target", ["stock", "safe"])
def test_hup_switch_from_the_stock_worker(gunicorn_server, target):
    server = gunicorn_server("stock")
    _switch_config(server, "gthread" if target == "stock" else "safe_gthread.Worker")
    with Probe(server.sock_path) as probe:
        settle(probe, server)
        server.reload()
        if target == "stock":
            if STOCK_WORKERS_UNLINK:  # the control: the path is gone for good
                assert still_missing(server), server.log()
                assert not server.serves()
                return
        settle(probe, server)
    assert_one_short_outage(probe, server)
    if target == "safe":
        assert re.search(r"\[INFO\] Adopted unix:", server.errorlog()), server.log()
        assert len(backups(server)) == 1
    assert stop(server) == 0
    assert listing(server) == ["gunicorn_conf.py"], server.log()


def _new_master(server):
    server.wait_for(lambda: len(_LISTENING.findall(server.errorlog())) >= 2, 30,
                    "the new master")
    return int(_LISTENING.findall(server.errorlog())[-1])


@pytest.mark.parametrize("target", ["stock", "safe"])
def test_usr2_switch_from_the_stock_worker(gunicorn_server, target):
    """USR2, then TERM the old master (19.6.0 ignores WINCH unless daemonized)."""
    server = gunicorn_server("stock")
    workers = server.settings["workers"]
    old_workers = set(server.worker_pids())
    _switch_config(server, "gthread" if target == "stock" else "safe_gthread.Worker")
    with Probe(server.sock_path) as probe:
        settle(probe, server)
        server.signal(signal.SIGUSR2)
        new_master = _new_master(server)
        server.wait_for(lambda: server.booted() >= 2 * workers, 30, "the new workers")
        server.signal(signal.SIGTERM)  # the old master, and through it its workers
        server.wait_for(lambda: all(_gone(pid) for pid in old_workers), 30,
                        "the old workers to exit")
        server.wait_for(lambda: _gone(server.proc.pid) or server.proc.poll() is not None,
                        30, "the old master to exit")
        if target == "stock" and STOCK_WORKERS_UNLINK:
            assert still_missing(server), server.log()
            os.kill(new_master, signal.SIGTERM)
            return
        settle(probe, server)
    assert_one_short_outage(probe, server)
    if target == "safe":
        assert re.search(r"\[INFO\] Adopted unix:", server.errorlog()), server.log()
    os.kill(new_master, signal.SIGTERM)
    server.wait_for(lambda: _gone(new_master), 30, "the new master to exit")
    if target == "safe":
        assert listing(server) == ["gunicorn_conf.py"], server.log()


# -- any worker class, the opt-out, who may connect ----------------------------------------

@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_the_guard_heals_under_any_worker_class(gunicorn_server, worker_class):
    server = gunicorn_server(worker_class, guard=True,
                             threads=2 if worker_class == "gthread" else 1)
    mine = identity(server.sock_path)
    os.unlink(server.sock_path)
    server.wait_for(lambda: identity(server.sock_path) == mine, 10, "the path restored")
    assert server.serves()
    assert stop(server) == 0
    assert listing(server) == ["gunicorn_conf.py"], server.log()


def test_heal_off(gunicorn_server, monkeypatch):
    monkeypatch.setenv("SAFE_GTHREAD_HEAL", "0")
    server = gunicorn_server("safe")
    monkeypatch.delenv("SAFE_GTHREAD_HEAL")
    assert backups(server) == []
    os.unlink(server.sock_path)
    assert still_missing(server), server.log()
    assert stop(server) == 0 and server.tracebacks() == 0, server.log()


def test_a_bad_heal_setting_is_one_line_at_boot(gunicorn_server, monkeypatch):
    monkeypatch.setenv("SAFE_GTHREAD_HEAL", "maybe")
    server = gunicorn_server("safe", wait=False)
    monkeypatch.delenv("SAFE_GTHREAD_HEAL")
    assert server.wait_exit(30) != 0
    assert "SAFE_GTHREAD_HEAL: 'maybe' is not a boolean" in server.log(), server.log()
    assert not os.path.lexists(server.sock_path)


@pytest.mark.parametrize("umask", [0, 0o007])
def test_a_socket_everyone_may_connect_to_is_named_once(gunicorn_server, tmp_path, umask):
    # Let others through every directory above the socket, as /tmp does.
    chain, directory = [], str(tmp_path)
    while directory != os.path.dirname(directory):
        chain.append((directory, stat.S_IMODE(os.stat(directory).st_mode)))
        directory = os.path.dirname(directory)
    try:
        for path, mode in chain:
            os.chmod(path, mode | 0o001)
        server = gunicorn_server("safe", wait=False, umask=umask)
        os.chmod(server.directory, 0o755)
        server.wait_ready()
        found = warnings(server, "can be reached by every local user")
        if umask == 0:
            assert len(found) == 1 and "umask = 0o007" in found[0], server.log()
        else:
            assert found == [], server.log()
        server.reload()
        assert len(warnings(server, "can be reached by every local user")) == len(found)
    finally:
        for path, mode in chain:
            os.chmod(path, mode)
