"""The socket-close guard: only the process that bound a unix socket removes it.

gunicorn 19.6.0 unlinks the socket path in ``UnixSocket.close()``, so every worker that
restarts deletes the file its siblings and the proxy still use (benoitc/gunicorn#1298).
Later versions unlink from the arbiter's ``stop()``, but without checking what the path
names by then: a second server's socket, a symlink, or nothing at all.

Once installed in the arbiter (``install()``; ``safe_gthread.Worker`` does it when
gunicorn loads it), the path is unlinked only

1. by the process that bound it (workers, forks and re-exec'd masters never do),
2. when gunicorn itself decides to (its clean stop; not while a USR2 successor runs,
   not for systemd's sockets, not with ``reuse_port``),
3. and only if the path still names the socket it bound: ``lstat`` (no symlink
   followed), ``S_ISSOCK``, and the ``(st_dev, st_ino)`` recorded right after ``bind``.

A missing or foreign file is left alone and logged at INFO; it is never an error.
The request path is untouched: only ``bind`` and the closing of listeners are wrapped.
"""
import os
import stat
import threading

from gunicorn import sock as gunicorn_sock

from . import _compat

__all__ = ["install", "uninstall", "installed", "unlink_decision"]

#: Attribute on a gunicorn listener: ``(pid, st_dev, st_ino)`` of the path it bound.
OWNER_ATTR = "_safe_gthread_owner"

_lock = threading.Lock()
_originals = {}  # (namespace, name) -> the object gunicorn had there


def is_filesystem_path(name):
    """True for a unix socket name that lives in the file system.

    TCP names are tuples; abstract names (``\\0name``) come back from ``getsockname``
    as bytes (or a str starting with NUL); an unbound socket's name is empty.
    """
    return isinstance(name, str) and name != "" and not name.startswith("\0")


def unlink_decision(owner, path, pid, lstat=os.lstat):
    """Decide whether process ``pid`` may unlink ``path``; return ``(bool, reason)``.

    ``owner`` is the ``(pid, st_dev, st_ino)`` recorded when a process bound the
    socket, or None when this listener was never bound here (inherited fds, systemd).
    The reason is empty when the answer is yes.
    """
    if owner is None:
        return False, "not bound by this process"
    owner_pid, dev, ino = owner
    if owner_pid != pid:
        return False, "bound by pid %d" % owner_pid
    try:
        st = lstat(path)
    except FileNotFoundError:
        return False, "it is already gone"
    except OSError as exc:
        return False, "it cannot be checked (%s)" % exc.strerror
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
        return False, "another file has replaced the socket"
    return True, ""


def _record_owner(listener, sock):
    name = sock.getsockname()
    if not is_filesystem_path(name):
        return
    try:
        st = os.lstat(name)
    except OSError:
        return
    setattr(listener, OWNER_ATTR, (os.getpid(), st.st_dev, st.st_ino))


def _unlink_if_owned(listener, path):
    owner = getattr(listener, OWNER_ATTR, None)
    pid = os.getpid()
    allowed, reason = unlink_decision(owner, path, pid)
    if allowed:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    elif owner is not None and owner[0] == pid:
        # Only the owner speaks: workers close the listener on every restart.
        listener.log.info("Not removing %s: %s.", path, reason)
    if owner is not None and owner[0] == pid:
        # Closing twice is harmless and says nothing the second time.
        setattr(listener, OWNER_ATTR, None)


# -- the wrappers installed into gunicorn.sock ------------------------------------------

def _bind(self, sock):
    _originals[(gunicorn_sock.UnixSocket, "bind")](self, sock)
    _record_owner(self, sock)


def _close(self):
    # gunicorn <= 19.6.0's UnixSocket.close() unlinks first, in any process.
    if self.sock is None:
        return
    _unlink_if_owned(self, self.cfg_addr)
    gunicorn_sock.BaseSocket.close(self)


def _close_sockets(listeners, unlink=True):
    # gunicorn >= 19.7.0: the arbiter's stop() and reload() call this; ``unlink`` is
    # gunicorn's own decision (False with a USR2 successor, systemd or reuse_port).
    names = [(listener, listener.getsockname()) for listener in listeners]
    _originals[(gunicorn_sock, "close_sockets")](listeners, False)
    if unlink:
        for listener, name in names:
            if is_filesystem_path(name):
                _unlink_if_owned(listener, name)


def _targets():
    yield gunicorn_sock.UnixSocket, "bind", _bind
    if _compat.UNIX_CLOSE_UNLINKS:
        yield gunicorn_sock.UnixSocket, "close", _close
    if _compat.HAS_CLOSE_SOCKETS:
        yield gunicorn_sock, "close_sockets", _close_sockets


def install():
    """Install the guard in this process; return False if it was already installed.

    Call it in the arbiter before it binds (a gunicorn config file is the place);
    workers forked afterwards inherit it.
    """
    with _lock:
        if _originals:
            return False
        for namespace, name, wrapper in _targets():
            _originals[(namespace, name)] = vars(namespace)[name]
            setattr(namespace, name, wrapper)
        return True


def uninstall():
    """Put back what gunicorn had; return False if the guard was not installed."""
    with _lock:
        if not _originals:
            return False
        for (namespace, name), original in _originals.items():
            setattr(namespace, name, original)
        _originals.clear()
        return True


def installed():
    """True while the guard is installed in this process."""
    return bool(_originals)
