"""Let a retiring worker's successor boot while the old one drains.

Stock gunicorn forks a replacement only after the old worker has exited, so a worker
slot stays empty for the whole drain plus the successor's boot: under ``max_requests``
churn that is most of the throughput lost to restarts. Here a worker that retires
because it reached ``max_requests`` announces its pid on a pipe created by the
arbiter; while that worker drains, the arbiter's ``manage_workers`` does not count it,
so it spawns exactly one successor for it, at once. At most ``workers`` retiring workers
are discounted at a time (a successor that retires before its predecessor has left
waits for it, as with stock gunicorn), so there are never more than twice ``workers``
worker processes. The retiring worker stays in
``Arbiter.WORKERS`` for everything else: it is still signalled on stop, reaped, and
killed if it stops notifying for ``timeout`` seconds.

Nothing else changes: ``workers``, ``preload_app`` and the user's hooks are left as they
are; HUP, TTOU and stops are not announced, so the arbiter never replaces a worker that
it asked to go away.
"""
import errno
import os
import signal
import struct
import threading
from collections.abc import MutableMapping

from gunicorn import arbiter as gunicorn_arbiter

_PID = struct.Struct("=i")  # one pid per write: less than PIPE_BUF, so never torn

_lock = threading.Lock()
_state = {}  # "pipe": (read_fd, write_fd), "manage_workers": the original, "retiring": [pid]


def install():
    """In the arbiter: open the announcement pipe and wrap ``manage_workers`` (idempotent)."""
    with _lock:
        if _state:
            return False
        read_fd, write_fd = os.pipe()  # close-on-exec: a re-exec'd master opens its own
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        _state["pipe"] = (read_fd, write_fd)
        _state["retiring"] = []  # in the order they announced
        original = _state["manage_workers"] = gunicorn_arbiter.Arbiter.manage_workers

        def manage_workers(self):
            retiring = _state["retiring"]
            retiring.extend(_read_announcements(read_fd))
            retiring[:] = [pid for pid in retiring if pid in self.WORKERS]  # forget the reaped
            if not retiring:
                return original(self)
            # Never pop the retiring from WORKERS: before 27, gunicorn reaps workers in
            # its SIGCHLD handler, which may run at any point in here. They are only
            # left out of what manage_workers counts, for the length of the call.
            workers = self.WORKERS
            self.WORKERS = _Discounted(workers, retiring[:self.num_workers])
            try:
                return original(self)
            finally:
                self.WORKERS = workers

        manage_workers.__wrapped__ = original
        gunicorn_arbiter.Arbiter.manage_workers = manage_workers
        return True


def uninstall():
    """Restore ``Arbiter.manage_workers`` and close the pipe; False if not installed."""
    with _lock:
        if not _state:
            return False
        gunicorn_arbiter.Arbiter.manage_workers = _state["manage_workers"]
        for fd in _state["pipe"]:
            os.close(fd)
        _state.clear()
        return True


class _Discounted(MutableMapping):
    """``Arbiter.WORKERS`` as manage_workers should count it: the retiring left out.

    Counting and iterating skip them; lookups, stores and removals (reaping, spawning,
    killing) reach the real dict, so a worker reaped meanwhile is really gone.
    """

    def __init__(self, workers, retiring):
        self._workers = workers
        self._retiring = frozenset(retiring)

    def __getitem__(self, pid):
        return self._workers[pid]

    def __setitem__(self, pid, worker):
        self._workers[pid] = worker

    def __delitem__(self, pid):
        del self._workers[pid]

    def __iter__(self):
        return iter([pid for pid in list(self._workers) if pid not in self._retiring])

    def __len__(self):
        return len(self._workers) - len(self._retiring.intersection(list(self._workers)))


def _read_announcements(read_fd):
    pids = []
    while True:
        try:
            data = os.read(read_fd, _PID.size * 64)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                break
            raise
        if not data:
            break
        for (pid,) in _PID.iter_unpack(data[:len(data) - len(data) % _PID.size]):
            if pid not in pids:
                pids.append(pid)
    return pids


def announce_retirement(worker):
    """In a worker leaving for ``max_requests``: ask the arbiter for a successor now.

    Does nothing for any other reason to stop, or when the arbiter side is not
    installed. SIGCHLD wakes the arbiter's loop the way a child's exit does; its
    handler only reaps, and finds no one.
    """
    if not _state or worker.nr < worker.max_requests:
        return False
    try:
        os.write(_state["pipe"][1], _PID.pack(os.getpid()))
        os.kill(worker.ppid, signal.SIGCHLD)
    except OSError:
        return False  # a full pipe or a gone parent: the stock path still replaces us
    return True
