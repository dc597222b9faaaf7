"""Start and stop a real gunicorn, for ``safe-gthread check`` and the tests.

Each server runs in a new session on a unix socket in its own directory (or, with
``tcp=True``, on a free 127.0.0.1 port), with a generated config file; readiness is a
real request against a monotonic deadline; failures carry the server's log; teardown ends the whole process group (SIGTERM,
then SIGKILL), never anything by name.
"""
import os
import re
import signal
import subprocess
import sys
import time

import gunicorn

from . import load as _load, procs as _procs
from .proxy import free_port


def count_listeners(port):
    """Sockets in LISTEN state on ``port`` of 127.0.0.1 or any address (IPv4)."""
    wanted = {"0100007F:%04X" % port, "00000000:%04X" % port}
    count = 0
    try:
        with open("/proc/net/tcp") as fh:
            lines = fh.readlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] in wanted and fields[3] == "0A":  # 0A: LISTEN
            count += 1
    return count


class ServerError(RuntimeError):
    """gunicorn did not start, answer or stop as expected; the message ends with its log."""


WORKER_CLASSES = {
    "stock": "gthread",
    "safe": "safe_gthread.Worker",
}

_BOOTING = re.compile(r"Booting worker with pid: (\d+)")
_EXITING = re.compile(r"Worker exiting \(pid: (\d+)\)")


def gunicorn_script():
    return os.path.join(os.path.dirname(sys.executable), "gunicorn")


def gunicorn_command():
    """The gunicorn of this environment: its script, or (installed without one, e.g. a
    ``--user`` install run from elsewhere) its entry point; ``python -m gunicorn`` only
    exists from 20.1."""
    script = gunicorn_script()
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from gunicorn.app.wsgiapp import run; run()"]


#: gunicorn 25.1.0 runs its control socket's asyncio loop in a thread of the arbiter while
#: it forks workers, and a new worker can hang for good while it logs "Booting worker"
#: (benoitc/gunicorn#3509, #3529; 25.2.0 stops that thread around each fork, PR #3520).
#: Seen here in CI. The servers started here turn the control socket off on 25.1.x.
CONTROL_SOCKET_FORK_DEADLOCK = tuple(getattr(gunicorn, "version_info", ())[:2]) == (25, 1)


class Gunicorn(object):
    def __init__(self, directory, worker_class="safe_gthread.Worker", app="safe_gthread.check.app:app",
                 guard=False, tcp=False, **settings):
        self.directory = str(directory)
        self.sock_path = os.path.join(self.directory, "gunicorn.sock")
        self.tcp_address = ("127.0.0.1", free_port()) if tcp else None
        self.log_path = os.path.join(self.directory, "gunicorn.log")
        self.config_path = os.path.join(self.directory, "gunicorn_conf.py")
        self.app = app
        bind = "%s:%d" % self.tcp_address if tcp else "unix:" + self.sock_path
        config = {"bind": bind, "workers": 2, "threads": 2,
                  "worker_class": WORKER_CLASSES.get(worker_class, worker_class),
                  "errorlog": self.log_path, "loglevel": "info", "graceful_timeout": 10,
                  "timeout": 30, "keepalive": 2,
                  # gunicorn >= 27 opens a control socket in $HOME by default, shared by
                  # every server of the user; older versions ignore the name.
                  "control_socket": os.path.join(self.directory, "gunicorn.ctl")}
        if CONTROL_SOCKET_FORK_DEADLOCK:
            config["control_socket_disable"] = True
        config.update(settings)
        with open(self.config_path, "w") as fh:
            if guard:
                fh.write("import safe_gthread.guard\nsafe_gthread.guard.install()\n")
            for name, value in sorted(config.items()):
                fh.write("%s = %r\n" % (name, value))
        self.settings = config
        self.proc = None

    @property
    def address(self):
        """Where it serves: ("127.0.0.1", port) with ``tcp``, else the unix socket's path
        (read each time: tests point ``sock_path`` elsewhere after construction)."""
        return getattr(self, "tcp_address", None) or self.sock_path

    # -- lifecycle -------------------------------------------------------------------
    def start(self, wait=True, timeout=20.0):
        self._out = open(os.path.join(self.directory, "gunicorn.out"), "wb")
        try:
            self.proc = subprocess.Popen(
                gunicorn_command() + ["-c", self.config_path, "--chdir", self.directory,
                                      self.app],
                cwd=self.directory, stdout=self._out, stderr=subprocess.STDOUT,
                start_new_session=True)
        except BaseException:
            self._out.close()
            raise
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20.0):
        self.wait_for(self._serves, timeout, "gunicorn to answer on %s" % (self.address,))
        self.wait_for(lambda: self.booted() >= self.settings["workers"], timeout,
                      "all workers to boot")
        self.wait_for(self._workers_listen_to_signals, timeout,
                      "the workers to install their signal handlers")

    def _workers_listen_to_signals(self):
        """True once every worker runs its own signal handlers. A worker forks with the
        arbiter's handlers and swaps them in ``init_signals`` (SIGHUP back to default,
        SIGTERM its own): a SIGTERM before that is queued in the worker's copy of the
        arbiter and lost, and one during the swap ends it silently (no "Worker exiting"
        line), so a test that signals right after start would measure that stock race, not
        the behaviour it is about."""
        for pid in self.worker_pids():
            caught = _procs.caught_signals(pid)
            if caught is not None and (signal.SIGHUP in caught or signal.SIGTERM not in caught):
                return False
        return True

    def _serves(self):
        if self.proc.poll() is not None:
            raise ServerError("gunicorn exited with %s\n%s" % (self.proc.returncode, self.log()))
        try:
            return _load.request(self.address, timeout=2.0)[0] == 200
        except (OSError, EOFError, ValueError):
            return False

    def serves(self):
        try:
            return _load.request(self.address, timeout=5.0)[0] == 200
        except (OSError, EOFError, ValueError):
            return False

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise ServerError("timed out after %ss waiting for %s\n%s" % (timeout, what, self.log()))

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def reload(self, timeout=20.0):
        """SIGHUP, then wait until a new set of workers has booted, every old one is gone
        (by pid: a worker ended by a signal logs no "Worker exiting"), and the new ones
        listen to signals."""
        booted, old = self.booted(), set(self.worker_pids())
        self.signal(signal.SIGHUP)
        self.wait_for(lambda: self.booted() >= booted + self.settings["workers"], timeout,
                      "new workers after HUP")
        self.wait_for(lambda: not old.intersection(self.worker_pids()), timeout,
                      "the old workers %s to exit after HUP" % sorted(old))
        self.wait_for(self._workers_listen_to_signals, timeout,
                      "the new workers to install their signal handlers")

    def wait_exit(self, timeout=30.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError("gunicorn did not exit in %ss\n%s" % (timeout, self.log()))

    def stop(self, grace=15.0):
        """End the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds.
        Safe to call twice."""
        if self.proc is None:
            return
        # The group is the session gunicorn was started in: its pgid is its own pid.
        _procs.stop_group(self.proc, self.proc.pid, grace)
        self._out.close()

    # -- what it did ---------------------------------------------------------------------
    def log(self):
        return _procs.tails([os.path.join(self.directory, name)
                             for name in ("gunicorn.log", "gunicorn.out")])

    def booted(self):
        return len(_BOOTING.findall(self.errorlog()))

    def worker_pids(self):
        """The workers alive now: the arbiter's children that logged their boot (a USR2
        master is a child too, but logs no "Booting worker")."""
        booted = {int(pid) for pid in _BOOTING.findall(self.errorlog())}
        return [pid for pid in _procs.children(self.proc.pid) if pid in booted]

    def exited(self):
        return len(_EXITING.findall(self.errorlog()))

    def restarts(self):
        return max(self.booted() - self.settings["workers"], 0)

    def tracebacks(self):
        """Tracebacks in the whole of both logs (``log()`` keeps only their tails)."""
        return sum(_procs.read_text(os.path.join(self.directory, name))
                   .count("Traceback (most recent call last)")
                   for name in ("gunicorn.log", "gunicorn.out"))

    def errorlog(self):
        """The whole of gunicorn's error log (``log()`` is for failure messages: tails)."""
        return _procs.read_text(self.log_path)

    def listeners(self):
        """How many sockets LISTEN on this server's TCP port (/proc/net/tcp): with
        ``reuse_port`` on gunicorn >= 24, the size of its reuseport group."""
        if not getattr(self, "tcp_address", None):
            return None
        return count_listeners(self.tcp_address[1])

    def inode(self):
        if getattr(self, "tcp_address", None):
            return None  # TCP: no file to keep
        try:
            st = os.lstat(self.sock_path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)
