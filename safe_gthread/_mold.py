"""Successors forked from a warm per-generation template: the mold (opt-in, ``mold``).

With ``safe_gthread.configure(mold=True)`` (or ``SAFE_GTHREAD_MOLD=1``) the arbiter forks
one *mold* process per configuration generation. The mold imports the app once
(``app.wsgi()``, as ``preload_app`` does in the arbiter) and never serves. A worker is
then forked from the mold instead of from the arbiter, so it is ready in a fork's time,
not an import's. docs/mold.md describes the process model, what is built and what is not.

How a worker is spawned (all of it inside gunicorn's own ``Arbiter.spawn_worker``):

1. The arbiter runs gunicorn's ``spawn_worker`` unchanged, except that for this one call
   ``gunicorn.arbiter.os`` is a stand-in whose ``fork()`` asks the mold. gunicorn builds
   the worker object (its heartbeat file is opened here, in the arbiter) and runs
   ``pre_fork`` in the arbiter, as always; ``Worker.__init__`` hands us the object.
2. The stand-in ``fork()`` sends the mold a SPAWN message over a SOCK_SEQPACKET
   socketpair: the worker's age and its plain attributes (numbers, strings: the
   ``max_requests`` jitter gunicorn drew, the scheduler's decisions), and, by SCM_RIGHTS,
   the worker's heartbeat file and the read end of an "adopted" pipe.
3. The mold runs gunicorn's own ``spawn_worker`` on its copy of the arbiter with its own
   stand-in: the worker class builds the object there and takes the arbiter's heartbeat
   file in place of its own (``dup2``), the attributes are copied, ``pre_fork`` is not
   run again, and ``fork()`` forks twice: the middle process exits at once, so the worker
   is re-parented to the arbiter, a child subreaper (``PR_SET_CHILD_SUBREAPER``). The mold
   answers SPAWNED with the worker's pid.
4. The arbiter's stand-in returns that pid to gunicorn, whose parent branch records the
   worker in ``WORKERS`` as for any fork. The arbiter then writes one byte on the
   "adopted" pipe. The worker, which waited for that byte, runs gunicorn's own child
   branch: "Booting worker", ``post_fork``, ``init_process`` (the app is already loaded:
   ``load_wsgi`` returns the mold's), the loop, ``worker_exit``; it is reaped by the
   arbiter's own ``reap_workers``, and its timeout is gunicorn's.

Any failure on the way (no mold ready yet, the mold died, no answer within
``SPAWN_TIMEOUT``, an error reply) makes the stand-in call the real ``os.fork()``: the
worker boots the normal way (fork + import), with one ERROR for a failed mold, which is
started again with a backoff. A Python exception of ours turns the feature off for this
arbiter (``_patch``: one ERROR with the traceback), the same way.
"""
import array
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from gunicorn import arbiter as gunicorn_arbiter

from . import _compat, _patch

FEATURE = "mold"

#: prctl(2) options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

#: The gunicorn versions the mold has been run end to end on (tests/test_mold.py, one
#: matrix cell each): every line from the original report's 19.6.0 to the newest. A
#: version between the oldest and the newest is allowed (its ``spawn_worker`` must still
#: have the shape checked in :func:`unsupported`); a newer one runs with one WARNING
#: (upgrading gunicorn must not stop a server from starting); an older one is refused.
TESTED_GUNICORN = ("19.6.0", "19.9.0", "20.1.0", "21.2.0", "23.0.0", "24.1.1", "25.1.0",
                   "26.2.0", "27.0.0", "27.0.1")


def _version(text):
    parts = []
    for part in str(text).split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


#: The arbiter waits this long for the mold's answer to a SPAWN (a fork of a big process
#: takes tens of milliseconds), then boots that worker the normal way.
SPAWN_TIMEOUT = 5.0
#: A worker forked from the mold waits at most this long for the arbiter's "adopted" byte
#: (the arbiter writes it, or closes the pipe, right after the mold's answer).
ADOPT_TIMEOUT = 30.0
#: A mold that dies or cannot load the app is started again after 1 s, doubling to 60 s.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
#: A failed mold that a SIGTERM did not end within this many seconds gets SIGKILL.
KILL_AFTER = 5.0
#: A mold not ready within gunicorn's ``timeout`` (or this, when that is 0) is killed.
DEFAULT_LOAD_TIMEOUT = 120.0

MAX_MESSAGE = 65536
MAX_FDS = 4

_log = logging.getLogger("gunicorn.error")
_lock = threading.RLock()


class ProtocolError(Exception):
    """A message that is not one of ours (too long, truncated, not JSON)."""


class Unavailable(Exception):
    """The mold cannot fork this worker (the message says why); not a bug of ours."""


# -- prctl ------------------------------------------------------------------------------
def _prctl(option, value):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def set_child_subreaper(on=True):
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def is_child_subreaper():
    import ctypes
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return bool(value.value)


def unsupported():
    """Why the mold cannot run in this process (one line), or None."""
    if not sys.platform.startswith("linux"):
        return "it needs Linux (PR_SET_CHILD_SUBREAPER); this is %s" % sys.platform
    version = _version(_compat.GUNICORN_VERSION)
    if not version or version < _version(TESTED_GUNICORN[0]):
        return ("it is not supported on gunicorn %s (supported: %s - %s)"
                % (_compat.GUNICORN_VERSION, TESTED_GUNICORN[0], TESTED_GUNICORN[-1]))
    spawn = _innermost(getattr(gunicorn_arbiter.Arbiter, "spawn_worker", None))
    names = _compat._names_used(spawn)
    missing = [name for name in ("fork", "worker_class", "pre_fork") if name not in names]
    if missing:
        return ("gunicorn %s's Arbiter.spawn_worker is not the shape it knows (no %s)"
                % (_compat.GUNICORN_VERSION, ", ".join(missing)))
    if not hasattr(socket, "SCM_RIGHTS") or not hasattr(socket.socket, "sendmsg"):
        return "this Python cannot pass file descriptors (SCM_RIGHTS)"
    try:
        was = is_child_subreaper()
        set_child_subreaper(True)
        if not was:
            set_child_subreaper(False)
    except (OSError, AttributeError) as exc:
        return "prctl(PR_SET_CHILD_SUBREAPER) failed: %s" % exc
    return None


def _innermost(function):
    """gunicorn's own function under our layers (``_patch`` wrappers carry
    ``_safe_gthread_layer`` and ``__wrapped__``)."""
    for _ in range(32):
        if function is None or not hasattr(function, "_safe_gthread_layer"):
            return function
        function = getattr(function, "__wrapped__", None)
    return function


# -- the protocol -------------------------------------------------------------------------
def send(sock, kind, fields=None, fds=()):
    """One message: a JSON object with ``kind``, and ``fds`` passed by SCM_RIGHTS."""
    payload = dict(fields or {})
    payload["kind"] = kind
    data = json.dumps(payload, sort_keys=True).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too long (%d bytes)" % len(data))
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          array.array("i", list(fds)).tobytes()))
    sock.sendmsg([data], ancillary)


def wait_readable(sock, timeout):
    """True when ``sock`` has a message or EOF within ``timeout`` seconds (None: wait)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        events = poller.poll(None if remaining is None else int(remaining * 1000))
        if events:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def receive(sock, timeout=None):
    """``(kind, fields, fds)``; None at EOF (the other side closed); raises
    :class:`Unavailable` when nothing came within ``timeout`` seconds."""
    if timeout is not None and not wait_readable(sock, timeout):
        raise Unavailable("no answer within %gs" % timeout)
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * 4))
    fds = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(cdata[:len(cdata) - len(cdata) % numbers.itemsize])
            fds.extend(numbers)
    if not data and not fds:
        return None
    try:
        if flags & (getattr(socket, "MSG_TRUNC", 0) | getattr(socket, "MSG_CTRUNC", 0)):
            raise ProtocolError("truncated message")
        try:
            fields = json.loads(data.decode("utf-8"))
            kind = fields.pop("kind")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ProtocolError("not a message of ours: %r" % data[:80])
    except ProtocolError:
        close_fds(fds)
        raise
    return kind, fields, fds


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


#: Plain values a worker object carries from the arbiter to the mold's copy of it.
_PLAIN = (type(None), bool, int, float, str)
#: Set by gunicorn in each process itself.
_NOT_COPIED = frozenset(["pid"])


def worker_attrs(worker):
    """The worker object's plain attributes (numbers, strings, None), as the arbiter set
    them: gunicorn's drawn ``max_requests``, ``age``, ``ppid``, our scheduler's state."""
    return dict((name, value) for name, value in vars(worker).items()
                if isinstance(value, _PLAIN) and name not in _NOT_COPIED)


def apply_attrs(worker, attrs):
    for name, value in attrs.items():
        if name in _NOT_COPIED:
            continue
        try:
            setattr(worker, name, value)
        except (AttributeError, TypeError):
            pass  # a read-only property on this gunicorn


class _OsWithFork(object):
    """``gunicorn.arbiter.os`` for one ``spawn_worker`` call: ``os`` but for ``fork``."""

    def __init__(self, fork):
        self.fork = fork

    def __getattr__(self, name):
        return getattr(os, name)


class _NoPreFork(object):
    """The mold's ``arbiter.cfg`` while it runs gunicorn's ``spawn_worker``: the arbiter ran
    ``pre_fork`` already; every other setting is the configuration's own."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)

    def pre_fork(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(self._cfg, name)


# -- the mold process -----------------------------------------------------------------------
class Mold(object):
    """The mold process: loads the app, then forks workers on request. :meth:`run` never
    returns in the mold (it ``os._exit``s); in a worker forked from it, what ends the
    worker (gunicorn's ``sys.exit``) propagates the way it does in a stock worker."""

    def __init__(self, arbiter, sock, generation, arbiter_pid):
        self.arbiter = arbiter
        self.sock = sock
        self.generation = generation
        self.arbiter_pid = arbiter_pid
        self.pid = None
        self.reopen = False
        self.spawn = _innermost(gunicorn_arbiter.Arbiter.spawn_worker)

    def run(self):
        self.pid = os.getpid()
        log = getattr(self.arbiter, "log", None) or _log
        ending = None
        try:
            self._prepare()
            if not self._load(log):
                return
            while True:
                message = receive(self.sock)
                if message is None:
                    return  # the arbiter closed its end: this generation is over
                kind, fields, fds = message
                if self.reopen:  # USR1 (log rotation): the workers forked next log here
                    self.reopen = False
                    self.arbiter.log.reopen_files()
                if kind == "spawn":
                    self._spawn(fields, fds, log)
                else:
                    close_fds(fds)
                    if kind == "stop":
                        return
        except BaseException as exc:
            if os.getpid() != self.pid:
                # A worker forked from here ends as gunicorn ends it (``sys.exit``).
                if not isinstance(exc, SystemExit):
                    raise
                ending = exc
            else:
                try:
                    log.error("safe-gthread: mold %s failed", self.pid, exc_info=True)
                except Exception:
                    pass
        finally:
            if os.getpid() == self.pid:
                os._exit(0)  # never 3 or 4: gunicorn <= 19.x halts on those from any child
        # A worker, out of the except clause: an error in its atexit handlers is shown as
        # Python's own exit shows it, not as raised while handling the SystemExit. Where
        # Python lacks the exit steps, the SystemExit goes on as gunicorn raised it.
        exit_without_teardown(ending)
        raise ending

    def _prepare(self):
        _patch.forked()  # Python 3.6: close what the arbiter holds
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        arbiter = self.arbiter
        for number in list(getattr(arbiter, "SIGNALS", ())) + [signal.SIGCHLD]:
            signal.signal(number, signal.SIG_IGN if number != signal.SIGCHLD else signal.SIG_DFL)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(number, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, AttributeError):
            pass
        # The workers' heartbeat files the arbiter held at our fork: not ours. All of
        # them: inside the scheduler's manage_workers, WORKERS is a view that hides the
        # retiring ones from this (the main) thread.
        workers = getattr(arbiter, "WORKERS", {})
        workers = getattr(workers, "_workers", workers)
        for worker in list(workers.values()):
            try:
                worker.tmp.close()
            except (AttributeError, OSError, ValueError):
                pass
        arbiter.WORKERS = {}
        try:
            from gunicorn import util
            util._setproctitle("safe-gthread mold [%s]" % getattr(arbiter, "proc_name", ""))
        except Exception:
            pass

    def _on_usr1(self, signum, frame):
        self.reopen = True

    def _on_stop(self, signum, frame):
        if os.getpid() == self.pid:
            os._exit(0)

    def _load(self, log):
        started = time.monotonic()
        log.info("safe-gthread: mold %s loading the app (generation %s)", self.pid,
                 self.generation)
        try:
            self.arbiter.app.wsgi()
        except BaseException as exc:
            from ._worker import describe_failure
            cause = describe_failure(exc)
            log.info("safe-gthread: mold %s cannot load the app: %s", self.pid, cause,
                     exc_info=True)
            send(self.sock, "failed", {"cause": cause})
            return False
        # Threads do not survive a fork: one the import started runs in the mold only,
        # and a lock it held at a fork stays held in that worker (docs/mold.md, "Is
        # your app safe for it?"). Said once per mold, before any worker is forked.
        others = [thread.name for thread in threading.enumerate()
                  if thread is not threading.main_thread()]
        if others:
            log.warning("safe-gthread: mold %s: the app's import started %d thread(s) (%s); "
                        "workers forked from the mold do not have them: start them in "
                        "post_fork or on first use (see the mold's documentation)",
                        self.pid, len(others), ", ".join(sorted(others)[:5]))
        # What the import left as garbage goes now, once, not in every worker; the rest is
        # frozen before each spawn (_spawn), where Python can.
        gc.collect()
        send(self.sock, "ready", {"pid": self.pid, "took": time.monotonic() - started})
        return True

    def _spawn(self, fields, fds, log):
        if len(fds) != 2:
            close_fds(fds)
            send(self.sock, "error", {"cause": "expected 2 descriptors, got %d" % len(fds)})
            return
        tmp_fd, go_fd = fds
        if _compat.GC_FREEZE:
            # Before the fork, as the gc module's documentation advises: the worker's
            # collections then never write to the objects it shares with the mold. Not
            # what this spawn builds (the worker object): the mold drops it after the
            # fork, and frozen it could never be collected. Nor what earlier spawns left:
            # the collection visits only what was made since the last freeze.
            gc.collect()
            _compat.GC_FREEZE()
        arbiter = self.arbiter
        real_class, real_cfg = arbiter.worker_class, arbiter.cfg
        quiet_cfg = _NoPreFork(real_cfg)
        attrs = dict(fields.get("attrs") or {})
        made = []

        def build(*args, **kwargs):
            args = [real_cfg if value is quiet_cfg else value for value in args]
            kwargs = dict((k, real_cfg if v is quiet_cfg else v) for k, v in kwargs.items())
            worker = real_class(*args, **kwargs)
            # The arbiter's heartbeat file in place of the one just made here.
            os.dup2(tmp_fd, worker.tmp.fileno())
            apply_attrs(worker, attrs)
            made.append(worker)
            return worker

        child = _ChildFork(self, tmp_fd, go_fd, real_class, real_cfg)
        arbiter.worker_age = int(fields["age"]) - 1
        arbiter.worker_class = build
        arbiter.cfg = quiet_cfg
        gunicorn_arbiter.os = _OsWithFork(child.fork)
        try:
            pid = self.spawn(arbiter)
        except Exception as exc:
            if os.getpid() != self.pid:
                raise
            close_fds([tmp_fd, go_fd])
            send(self.sock, "error", {"cause": "%s: %s" % (type(exc).__name__, exc)})
            return
        finally:
            gunicorn_arbiter.os = os
            arbiter.worker_class, arbiter.cfg = real_class, real_cfg
        # The mold: forget the worker gunicorn recorded in our copy of WORKERS.
        worker = arbiter.WORKERS.pop(pid, None)
        if worker is not None:
            try:
                worker.tmp.close()
            except (AttributeError, OSError, ValueError):
                pass
        close_fds([tmp_fd, go_fd])
        send(self.sock, "spawned", {"pid": pid})


class _ChildFork(object):
    """The mold's ``fork()`` for gunicorn's ``spawn_worker``: fork twice, so the worker
    is re-parented to the arbiter (a child subreaper) when the middle process exits."""

    def __init__(self, mold, tmp_fd, go_fd, real_class, real_cfg):
        self.mold = mold
        self.tmp_fd = tmp_fd
        self.go_fd = go_fd
        self.real_class = real_class
        self.real_cfg = real_cfg

    def fork(self):
        read_end, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:
            try:
                os.close(read_end)
                pid = os.fork()
            except BaseException:
                os._exit(1)
            if pid == 0:
                os.close(write_end)
                self._become_worker()
                return 0
            try:
                os.write(write_end, str(pid).encode("ascii"))
            finally:
                os._exit(0)
        os.close(write_end)
        data = b""
        try:
            while True:
                chunk = os.read(read_end, 32)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(read_end)
        _wait_for(middle)
        if not data:
            raise OSError(errno.EAGAIN, "the mold's double fork failed")
        return int(data)

    def _become_worker(self):
        """In the new worker, before gunicorn's child branch: the real ``os`` and
        configuration again, default signal handlers (the worker installs its own), no
        mold socket, and the arbiter's word that it recorded us."""
        mold = self.mold
        gunicorn_arbiter.os = os
        mold.arbiter.worker_class, mold.arbiter.cfg = self.real_class, self.real_cfg
        try:
            mold.sock.close()
        except OSError:
            pass
        for number in list(getattr(mold.arbiter, "SIGNALS", ())) + [signal.SIGCHLD]:
            signal.signal(number, signal.SIG_DFL)
        word = b""
        try:
            if select.select([self.go_fd], [], [], ADOPT_TIMEOUT)[0]:
                word = os.read(self.go_fd, 1)
        except (OSError, ValueError):
            word = b""
        close_fds([self.go_fd, self.tmp_fd])
        if word != b"1" or os.getppid() != mold.arbiter_pid:
            os._exit(0)  # not recorded by the arbiter (it gave up on the mold): leave


def exit_without_teardown(exc):
    """End this process for ``exc`` (a ``SystemExit``) as Python's own exit would, but
    without the interpreter's teardown; returns only where that cannot be done.

    Python's exit joins the non-daemon threads (after threading's own exit calls, which
    stop idle ``concurrent.futures`` threads), runs the ``atexit`` handlers (``logging``
    flushes and closes its handlers there), flushes stdout and stderr, and then frees
    every object. A worker forked from the mold shares almost all its objects with the
    mold, copy-on-write: freeing them copies their pages first. That teardown was most of
    what a restart cost with the mold: 34 ms of CPU per worker on the bundled app, against
    2 ms here (docs/mold.md, "Measured"). Instagram's servers skip it the same way
    ("Dismissing Python Garbage Collection at Instagram", 2017). What is skipped:
    finalizers (``__del__``) of objects still alive, which Python does not promise at
    exit either.
    """
    if not _compat.EXIT_WITHOUT_TEARDOWN:
        return
    code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:  # as Python does: the object on stderr, status 1
        try:
            sys.stderr.write("%s\n" % (code,))
        except Exception:
            pass
        status = 1
    join_threads, run_atexit = _compat.EXIT_STEPS
    try:
        join_threads()
    except BaseException:  # Python reports it and exits all the same
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:
            pass
    try:
        run_atexit()
    except BaseException:  # 3.6 - 3.9 re-raise the last handler's error, already shown
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _wait_for(pid):
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _still_our_mold(arbiter, pid, current):
    """Is ``pid`` still a retired mold of this arbiter (alive, our child, no worker, not
    the current mold, not a USR2 master)? Its pid may have been reaped and reused."""
    if pid in getattr(arbiter, "WORKERS", {}) or pid == getattr(arbiter, "reexec_pid", 0):
        return False
    if current is not None and current.pid == pid:
        return False
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


# -- the arbiter's side ---------------------------------------------------------------------
class _MoldRef(object):
    """One mold process, as the arbiter sees it."""

    __slots__ = ("pid", "sock", "cfg", "listeners", "started", "ready_at", "generation",
                 "awaited")

    def __init__(self, pid, sock, cfg, listeners, started, generation):
        self.pid = pid
        self.sock = sock
        self.cfg = cfg
        self.listeners = listeners
        self.started = started
        self.ready_at = None
        self.generation = generation
        self.awaited = False  # a spawn has waited for it to load (once per mold)

    def matches(self, arbiter):
        """Made for the configuration and the listeners the arbiter has now? A HUP loads
        a new configuration object; healing or a reload to a new address new listeners."""
        listeners = list(getattr(arbiter, "LISTENERS", ()) or ())
        return (getattr(arbiter, "cfg", None) is self.cfg
                and len(listeners) == len(self.listeners)
                and all(a is b for a, b in zip(listeners, self.listeners)))


class _Request(object):
    """One ``spawn_worker`` through the mold, in the arbiter."""

    def __init__(self, molds, mold, arbiter):
        self.molds = molds
        self.mold = mold
        self.arbiter = arbiter
        self.arbiter_pid = os.getpid()
        self.thread = threading.get_ident()
        self.worker = None
        self.used = False
        self.go = None
        self.pid = None

    def fork(self):
        """gunicorn's ``os.fork()`` during this spawn. Never raises: whatever goes wrong,
        the real fork (the worker boots the normal way)."""
        if self.used or threading.get_ident() != self.thread or os.getpid() != self.arbiter_pid:
            return self.molds.fork()
        self.used = True
        try:
            self.pid = self._ask()
            return self.pid
        except Unavailable as exc:
            self.molds.failed(self.arbiter, self.mold, str(exc), fallback=True)
        except Exception:
            _patch.disable(FEATURE)
        self._close_go()
        return self._plain_fork()

    def _plain_fork(self):
        pid = self.molds.fork()
        if pid == 0:
            gunicorn_arbiter.os = os
        else:
            self.molds.fallbacks += 1
        return pid

    def _ask(self):
        worker = self.worker
        if worker is None:
            raise Unavailable("no worker object of ours to send")
        attrs = worker_attrs(worker)
        go_read, self.go = os.pipe()
        try:
            send(self.mold.sock, "spawn", {"age": getattr(worker, "age", 0), "attrs": attrs},
                 fds=[worker.tmp.fileno(), go_read])
        except OSError as exc:
            raise Unavailable("cannot reach the mold: %s" % exc)
        finally:
            os.close(go_read)
        try:
            reply = receive(self.mold.sock, timeout=SPAWN_TIMEOUT)
        except OSError as exc:
            raise Unavailable("cannot reach the mold: %s" % exc)
        if reply is None:
            raise Unavailable("the mold exited")
        kind, fields, fds = reply
        close_fds(fds)
        if kind == "spawned":
            return int(fields["pid"])
        if kind == "error":
            raise Unavailable("the mold could not fork: %s" % fields.get("cause"))
        raise Unavailable("unexpected answer %r" % kind)

    def finish(self, workers):
        """After gunicorn's spawn_worker: tell the worker it was recorded (or, by closing
        the pipe unwritten, that it was not: it then exits)."""
        if os.getpid() != self.arbiter_pid:
            return
        if self.pid is not None and self.pid in workers:
            # Logged before the worker may run: this line comes before its own lines.
            _log.debug("safe-gthread: worker %s forked from mold %s", self.pid, self.mold.pid)
            self.molds.forked += 1
            try:
                os.write(self.go, b"1")
            except OSError:
                pass
        self._close_go()

    def _close_go(self):
        if self.go is not None:
            close_fds([self.go])
            self.go = None


class Molds(object):
    """The arbiter's molds: at most one current, for the configuration in force. Only the
    arbiter's main thread calls it."""

    def __init__(self, clock=time.monotonic, fork=None, start=None, kill=None):
        self.clock = clock
        self.fork = fork or os.fork
        self.kill = kill or os.kill
        self._start_process = start or self._fork_mold
        self.mold = None
        self.generation = 0
        self.failures = 0
        self.retry_at = None
        self.request = None
        self.forked = 0
        self.fallbacks = 0
        self.stubborn = {}  # pid -> when to SIGKILL a retired mold that is still there
        self.off = None  # why the mold is off for this configuration (said once)
        self.off_cfg = None
        # A mold could not load the app and the deploy state took that as a failed boot
        # or reload: the next spawn attempt (paced by the deploy's backoff) starts the
        # next mold and waits for it; tick does not start one on its own meanwhile.
        self.handed = False

    # -- every manage_workers ----------------------------------------------------------------
    def tick(self, arbiter):
        if not wanted():
            self.stop()  # turned off by a HUP's configuration
            return
        if self.stubborn:
            self._kill_stubborn(arbiter)
        if self._refused(arbiter):
            return
        mold = self.mold
        if mold is not None:
            cause = self._poll(arbiter, mold)
            if cause is not None:
                self.failed(arbiter, mold, "it cannot load the app: %s" % cause)
        mold = self._current(arbiter)
        if mold is not None and mold.ready_at is None:
            timeout = self.load_timeout(arbiter)
            if self.clock() - mold.started > timeout:
                self.failed(arbiter, mold, "not ready within %gs" % timeout)
        if self.mold is None and not self.backing_off() and not self.handed:
            self._start(arbiter)

    def _refused(self, arbiter):
        """Settings of this configuration the mold cannot serve: one ERROR, then off."""
        cfg = getattr(arbiter, "cfg", None)
        if cfg is not None and cfg is self.off_cfg:
            return self.off is not None
        self.off_cfg, self.off = cfg, None
        if getattr(cfg, "reload", False):
            self.off = ("gunicorn's reload (the code reloader) imports the app in each "
                        "worker")
        elif getattr(cfg, "reuse_port", False):
            self.off = "reuse_port is not supported with the mold yet"
        if self.off is not None:
            _log.error("safe-gthread: mold is off: %s; workers boot the normal way",
                       self.off)
            self.stop()
            return True
        return False

    def _current(self, arbiter):
        """The mold for the arbiter's generation, or None: one of another configuration
        or other listeners is retired first (and its failures forgotten)."""
        mold = self.mold
        if mold is not None and not mold.matches(arbiter):
            _log.info("safe-gthread: mold %s retired (a new configuration or new "
                      "listeners)", mold.pid)
            self._retire(mold)
            self.failures, self.retry_at = 0, None
            mold = None
        return mold

    def backing_off(self):
        return self.retry_at is not None and self.clock() < self.retry_at

    def _poll(self, arbiter, mold, timeout=0.0):
        """Read what the mold said; with ``timeout``, wait that long for its first word
        (ready, failed, or its exit). Returns the cause when the mold said it cannot load
        the app (FAILED), without calling :meth:`failed`: the caller decides whose
        failure that is (a spawn's, see :meth:`_for_spawn`); None otherwise."""
        while True:
            try:
                if not wait_readable(mold.sock, timeout):
                    return
                timeout = 0.0
                message = receive(mold.sock)
            except (OSError, ProtocolError, Unavailable) as exc:
                self.failed(arbiter, mold, "its channel failed: %s" % exc)
                return
            if message is None:
                self.failed(arbiter, mold, "it exited")
                return
            kind, fields, fds = message
            close_fds(fds)
            if kind == "ready" and mold.ready_at is None:
                mold.ready_at = self.clock()
                self.failures, self.retry_at, self.handed = 0, None, False
                _log.info("safe-gthread: mold %s ready (the app loaded in %.2fs): new "
                          "workers are forked from it", mold.pid,
                          float(fields.get("took") or 0.0))
            elif kind == "failed":
                return str(fields.get("cause"))

    def _start(self, arbiter):
        self.generation += 1
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self._start_process(arbiter, theirs, mine)
        finally:
            theirs.close()
        self.mold = _MoldRef(pid, mine, getattr(arbiter, "cfg", None),
                             list(getattr(arbiter, "LISTENERS", ()) or ()), self.clock(),
                             self.generation)
        return self.mold

    def _fork_mold(self, arbiter, theirs, mine):
        arbiter_pid = os.getpid()
        pid = self.fork()
        if pid == 0:
            mine.close()
            self.close_all()
            Mold(arbiter, theirs, self.generation, arbiter_pid).run()
        return pid

    def failed(self, arbiter, mold, cause, fallback=False):
        """The mold cannot serve: one ERROR, stop it, start another after the backoff."""
        if mold is not self.mold:
            return
        self.failures += 1
        backoff = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.retry_at = self.clock() + backoff
        _log.error("safe-gthread: mold %s failed: %s; workers boot the normal way (fork + "
                   "import)%s; a new mold in %.0fs", mold.pid, cause,
                   ", this one included" if fallback else "", backoff)
        self._retire(mold, kill=True)

    def _load_failed(self, arbiter, mold, cause):
        """A spawn waited for this mold and it cannot load the app. While workers serve,
        that *is* the boot attempt's failure, so no worker is forked to import the same
        code again (each would fail, each with its own ERROR): inside a HUP the reload
        failed before any new worker started; otherwise this successor's boot failed.
        The deploy state (``_deploy.Deploys.mold_failed``) logs the one ERROR, holds the
        serving workers past ``max_requests`` and sets the next attempt's backoff, and
        that attempt starts a new mold (:meth:`tick` does not, while ``handed``).
        Returns True when it took the failure (the spawn is skipped); False at first
        start (nothing serves): the mold's ERROR and the normal boot, whose failure
        halts gunicorn as stock does."""
        scheduler = _patch.here().scheduler
        handled = bool(scheduler is not None and scheduler._deploy(
            "mold_failed", arbiter, "the app cannot be loaded: %s" % cause))
        if not handled:
            self.failed(arbiter, mold, "it cannot load the app: %s" % cause, fallback=True)
            return False
        _log.info("safe-gthread: mold %s cannot load the app: %s", mold.pid, cause)
        self.handed = True
        self._retire(mold, kill=True)
        self.failures, self.retry_at = 0, None
        return True

    def _retire(self, mold, kill=False):
        """Close the mold's socket (it reads EOF and exits) and TERM it (it exits with
        0 at once: gunicorn <= 23 logs an ERROR for any child that a signal killed, as if
        it were a worker). ``kill``: SIGKILL it if it is still there ``KILL_AFTER``
        seconds later (hung in the app's import, or not answering)."""
        if mold is self.mold:
            self.mold = None
        try:
            mold.sock.close()
        except OSError:
            pass
        try:
            self.kill(mold.pid, signal.SIGTERM)
        except OSError:
            return  # gone already (gunicorn's reap_workers reaps it: an unknown child)
        if kill:
            self.stubborn[mold.pid] = self.clock() + KILL_AFTER

    def _kill_stubborn(self, arbiter):
        now = self.clock()
        for pid, deadline in list(self.stubborn.items()):
            if now < deadline:
                continue
            del self.stubborn[pid]
            if _still_our_mold(arbiter, pid, self.mold):
                try:
                    self.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def stop(self, wait=0.0):
        """The arbiter stops (or the feature is off): end the mold."""
        mold = self.mold
        if mold is None:
            return
        self._retire(mold)
        deadline = self.clock() + wait
        while wait and self.clock() < deadline:
            try:
                pid, _ = os.waitpid(mold.pid, os.WNOHANG)
            except ChildProcessError:
                return  # reaped (by gunicorn) or not ours
            if pid:
                return
            time.sleep(0.01)

    def signal(self, number):
        mold = self.mold
        if mold is not None:
            try:
                self.kill(mold.pid, number)
            except OSError:
                pass

    def close_all(self):
        """In any child of the arbiter: the arbiter's end of the mold's socket is not
        ours (a worker holding it would keep the mold from seeing the arbiter go)."""
        mold = self.mold
        if mold is not None:
            try:
                mold.sock.close()
            except OSError:
                pass

    # -- Arbiter.spawn_worker ------------------------------------------------------------
    def spawn(self, original, arbiter, *args, **kwargs):
        mold = self._for_spawn(arbiter)
        if mold is _SKIP:
            return None  # a failed boot attempt, logged and paced by the deploy state
        if mold is None:
            return original(arbiter, *args, **kwargs)
        request = self.request = _Request(self, mold, arbiter)
        gunicorn_arbiter.os = _OsWithFork(request.fork)
        try:
            return original(arbiter, *args, **kwargs)
        finally:
            gunicorn_arbiter.os = os
            self.request = None
            workers = getattr(arbiter, "WORKERS", {})
            request.finish(workers)

    def _for_spawn(self, arbiter):
        """The ready mold this spawn goes through, or None (gunicorn's own spawn).

        A new generation's first spawn (at start, or inside gunicorn's reload, which
        spawns before the next ``manage_workers``) starts the generation's mold if need
        be and waits for it to load, at most its load timeout: the arbiter waits as long
        as one import, and the generation's workers are then forks of the mold instead of
        importing each. Later spawns do not wait: a mold that is not ready (restarting
        after a failure) means the normal boot."""
        if not wanted() or self._refused(arbiter):
            return None
        reloading = _reloading()
        if reloading is not None and reloading.failed:
            return _SKIP  # this HUP's mold could not load the new code: no new worker
        mold = self._current(arbiter)
        if mold is None and not self.backing_off():
            mold = self._start(arbiter)
        if mold is None:
            return None
        if mold.ready_at is None and not mold.awaited:
            mold.awaited = True
            wait = self.load_timeout(arbiter) - (self.clock() - mold.started)
            cause = self._poll(arbiter, mold, timeout=wait) if wait > 0 else None
            if cause is not None and mold is self.mold:
                return _SKIP if self._load_failed(arbiter, mold, cause) else None
            if mold is self.mold and mold.ready_at is None:
                self.failed(arbiter, mold, "not ready within %gs" % self.load_timeout(arbiter),
                            fallback=True)
        if mold is not self.mold or mold.ready_at is None:
            return None
        return mold

    @staticmethod
    def load_timeout(arbiter):
        return float(getattr(arbiter, "timeout", 0) or 0) or DEFAULT_LOAD_TIMEOUT

    def constructed(self, worker):
        request = self.request
        if request is not None and request.worker is None and (
                threading.get_ident() == request.thread):
            request.worker = worker


#: gunicorn 19.6 - 25.x's ``reap_workers`` reads the exit status of every child that
#: ``waitpid(-1)`` returns before it looks the pid up in ``WORKERS``: exit status 3 or 4
#: from *any* child raises HaltServer (the whole server stops), and 20.x - 25.x log an
#: ERROR or WARNING naming it a "Worker". As a child subreaper the arbiter also reaps
#: orphans the app leaves behind (a daemon that double-forks, a grandchild whose parent
#: exited), so with the mold such an orphan's exit status could halt the server.
#: gunicorn 26.0 and later skip unknown children ("Reaped unknown child process").
REAPS_ANY_CHILD_AS_WORKER = (26,)


def _own_child(arbiter, pid):
    """A child gunicorn tracks: a worker, the USR2 master, 25.x's dirty arbiter."""
    if pid in getattr(arbiter, "WORKERS", {}):
        return True
    return pid in (getattr(arbiter, "reexec_pid", 0), getattr(arbiter, "dirty_arbiter_pid", 0))


class _OwnChildrenOs(object):
    """``gunicorn.arbiter.os`` during one ``reap_workers`` call on gunicorn < 26:
    ``waitpid(-1, ...)`` reaps children gunicorn does not track here (with a DEBUG line,
    as gunicorn 26 does) and returns only its own, so an orphan's exit status never
    reaches gunicorn's checks. Everything else is the ``os`` it wraps."""

    def __init__(self, arbiter, inner):
        self._arbiter = arbiter
        self._inner = inner

    def waitpid(self, pid, options):
        while True:
            wpid, status = self._inner.waitpid(pid, options)
            if pid != -1 or not wpid or _own_child(self._arbiter, wpid):
                return wpid, status
            _log.debug("safe-gthread: reaped unknown child process (pid:%s, status:%s)",
                       wpid, status)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _reap_workers(original, self, *args, **kwargs):
    if _patch.here().molds is None or (
            _version(_compat.GUNICORN_VERSION) >= REAPS_ANY_CHILD_AS_WORKER):
        return original(self, *args, **kwargs)
    # Saved and restored, not reset to ``os``: on gunicorn <= 23 this runs in the SIGCHLD
    # handler, which can interrupt a spawn while ``os`` is the spawn's stand-in.
    previous = gunicorn_arbiter.os
    gunicorn_arbiter.os = _OwnChildrenOs(self, previous)
    try:
        return original(self, *args, **kwargs)
    finally:
        gunicorn_arbiter.os = previous


#: What ``Molds._for_spawn`` returns for a spawn that must not happen at all.
_SKIP = object()


def _reloading():
    """The HUP whose new workers gunicorn's reload is spawning now (``_deploy``'s record:
    only while something serves), or None."""
    scheduler = _patch.here().scheduler
    deploy = getattr(scheduler, "deploy", None)
    return getattr(deploy, "reloading", None)


# -- the patches (arbiter side) -------------------------------------------------------------
def _manage_workers(original, self, *args, **kwargs):
    molds = _patch.here().molds
    if molds is not None:
        molds.tick(self)
    return original(self, *args, **kwargs)


def _spawn_worker(original, self, *args, **kwargs):
    molds = _patch.here().molds
    if molds is None:
        return original(self, *args, **kwargs)
    return molds.spawn(original, self, *args, **kwargs)


def _stop(original, self, *args, **kwargs):
    molds = _patch.here().molds
    if molds is not None:
        molds.stop(wait=1.0)
    return original(self, *args, **kwargs)


def _handle_usr1(original, self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    molds = _patch.here().molds
    if molds is not None:
        molds.signal(signal.SIGUSR1)  # reopen the log files the next workers inherit
    return result


def wanted():
    """The ``mold`` setting in force (a HUP may turn it off)."""
    from . import _settings
    try:
        return bool(_settings.current().mold)
    except _settings.SettingsError:
        return False


def constructed(worker):
    """``Worker.__init__`` (in the arbiter, inside ``spawn_worker``): the object gunicorn
    is about to fork for; nothing to do unless a spawn through the mold is under way."""
    molds = _patch.here().molds
    if molds is not None and molds.request is not None:
        molds.constructed(worker)


def _after_fork(parent):
    # Any child of the arbiter (the mold, a worker forked the normal way, a hook's
    # subprocess) closes the arbiter's ends of the molds' sockets.
    molds = parent.molds if parent is not None else None
    if molds is not None:
        molds.close_all()


def _on_disable():
    molds = _patch.here().molds
    if molds is not None:
        molds.stop()
        molds.off = "a fault turned it off"
    if gunicorn_arbiter.os is not os:
        gunicorn_arbiter.os = os
    try:
        set_child_subreaper(False)  # orphans go to init again, as without the mold
    except (OSError, AttributeError):
        pass


def install(log=None, first=True):
    """In the arbiter, when ``mold`` is on: patch the arbiter (idempotent). A platform or
    gunicorn the mold does not support: at first start one line and exit 1 (a bad
    setting), at a HUP one ERROR and the mold stays off."""
    from . import _settings
    log = log or _log
    from . import _arbiter
    with _lock:
        process = _patch.here()
        if process.molds is not None:
            return False
        reason = unsupported()
        if reason is not None:
            message = "mold: %s; remove mold=True / SAFE_GTHREAD_MOLD" % reason
            if first:
                _settings.fail(message, log)
            log.error("safe-gthread: %s; the mold stays off", message)
            return False
        if _version(_compat.GUNICORN_VERSION) > _version(TESTED_GUNICORN[-1]):
            log.warning("safe-gthread: mold: not tested on gunicorn %s (tested: %s - %s); "
                        "its spawn_worker has the shape the mold needs, so it is on",
                        _compat.GUNICORN_VERSION, TESTED_GUNICORN[0], TESTED_GUNICORN[-1])
        _arbiter.install((FEATURE,), log)
        if not _arbiter.enabled(FEATURE):
            return False  # a shape the mold does not know: named in one WARNING
        set_child_subreaper(True)
        process.molds = Molds()
        return True


def uninstall():
    from . import _arbiter
    with _lock:
        process = _patch.here()
        molds, process.molds = process.molds, None
        if molds is None:
            return False
        molds.stop()
        _arbiter.uninstall((FEATURE,))
        return True


def installed():
    return _patch.here().molds is not None and not _patch.feature_disabled(FEATURE)


def current():
    """The arbiter's Molds (tests, the boot line), or None."""
    return _patch.here().molds
