"""The socket guard: only the process that bound a unix socket removes it, and a bind
never replaces anything but a dead socket.

gunicorn 19.6.0 unlinks the socket path in ``UnixSocket.close()``, so every worker that
restarts deletes the file its siblings and the proxy still use (benoitc/gunicorn#1298).
Later versions unlink from the arbiter's ``stop()``, but without checking what the path
names by then: a second server's socket, a symlink, or nothing at all. And every version
silently removes whatever socket is at the path before it binds, live or not.

Once installed in the arbiter (``install()``; ``safe_gthread.Worker`` does it when
gunicorn loads it), then

* **start**: an existing path is replaced only if it is a dead socket (connecting is
  refused). A live listener, a symlink, a regular file or a directory, a missing
  directory, a path too long for ``sockaddr_un``, no permission, or ``reuse_port`` on a
  kernel that refuses it on unix sockets: one clear line and exit 1, like gunicorn for a
  TCP port in use, nothing touched. ``SAFE_GTHREAD_REPLACE_LIVE=1`` takes over a live
  path on purpose (logged at WARNING).
* **stop**: the path is unlinked only by the process that bound it, when gunicorn itself
  decides to (its clean stop; not while a USR2 successor runs, not for systemd's sockets,
  not with ``reuse_port``), and only if it still names the socket it bound: ``lstat`` (no
  symlink followed), ``S_ISSOCK``, and the ``(st_dev, st_ino)`` recorded right after
  ``bind``. The check runs while the listener is still open: a bound unix socket holds
  its file's inode, so the inode number cannot have been reused by another file. A
  missing or foreign file is left alone and logged at INFO; it is never an error.
* **re-exec** (USR2): the identity travels to the new master in ``SAFE_GTHREAD_SOCKETS``
  beside gunicorn's ``GUNICORN_FD``, so the new master cleans up at its own stop.
* abstract names (``unix:\\0name``) are bound without ``stat``, ``chown`` or ``unlink``.

The request path is untouched: only binding, closing listeners and re-exec are wrapped.
"""
import errno
import json
import os
import socket
import stat
import struct
import threading

from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock

from . import _compat, _patch

__all__ = ["install", "uninstall", "installed"]

#: Attribute on a gunicorn listener: ``(pid, st_dev, st_ino)`` of the path it bound.
OWNER_ATTR = "_safe_gthread_owner"
#: Environment variable carrying ``[[path, st_dev, st_ino], ...]`` to a USR2 successor.
ENV_SOCKETS = "SAFE_GTHREAD_SOCKETS"
#: Set to 1 to take over a path a live server listens on (a deliberate hand-over).
ENV_REPLACE_LIVE = "SAFE_GTHREAD_REPLACE_LIVE"
#: How long the start probe waits for a listener to accept.
PROBE_TIMEOUT = 1.0

_lock = threading.Lock()
_installed = []  # the (namespace, name) pairs this install() wrapped
#: The registry key of the guard's layers (see ``_patch``).
PATCH_KEY = "safe_gthread.guard"


class Refused(Exception):
    """A bind that must not happen; the message is the one line to log."""


def is_filesystem_path(name):
    """True for a unix socket name that lives in the file system.

    TCP names are tuples; abstract names (``\\0name``) come back from ``getsockname``
    as bytes (or a str starting with NUL); an unbound socket's name is empty.
    """
    return isinstance(name, str) and name != "" and not name.startswith("\0")


def _shown(name):
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return "@" + name[1:] if name.startswith("\0") else name


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
    except (OSError, ValueError) as exc:
        return False, "it cannot be checked (%s)" % (getattr(exc, "strerror", None) or exc)
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
        return False, "another file has replaced the socket"
    return True, ""


# -- start: what is at the path before gunicorn replaces it ------------------------------

def probe(path, timeout=PROBE_TIMEOUT):
    """Is a server listening on the unix socket ``path``? Return ``(live, pid)``.

    Live: the connection is accepted (``pid`` from ``SO_PEERCRED`` where the kernel
    tells, else None), the backlog is full (``EAGAIN``) or the connect times out.
    Dead: refused. Anything else (no permission, ...) raises ``OSError``.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False, None
    except (socket.timeout, BlockingIOError):
        return True, None
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True, None
        raise
    else:
        return True, _peer_pid(client)
    finally:
        client.close()


def _peer_pid(client):
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0] or None
    except OSError:
        return None


def _kind(mode):
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe")):
        if test(mode):
            return kind
    return "not a socket"


def check_path(path, log, environ=os.environ):
    """Raise ``Refused`` unless gunicorn may (remove and) bind the unix socket ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # a missing directory shows up at bind, with its own line
    except OSError as exc:
        raise Refused(_bind_failure(path, exc))
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        dangling = "" if os.path.exists(path) else ", which does not exist"
        raise Refused("Not replacing unix:%s: it is a symbolic link (to %s%s), not a "
                      "socket; remove it or bind another path." % (path, target, dangling))
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused("Not replacing unix:%s: it is %s, not a socket; remove it or bind "
                      "another path." % (path, _kind(st.st_mode)))
    try:
        live, pid = probe(path)
    except OSError as exc:
        raise Refused("Not replacing unix:%s: cannot tell whether a server listens on it "
                      "(%s)." % (path, exc.strerror or exc))
    if not live:
        return  # a dead socket: gunicorn removes it, as it always did
    holder = "pid %d" % pid if pid else "another server"
    if environ.get(ENV_REPLACE_LIVE) == "1":
        log.warning("Taking over unix:%s from a live listener (%s): %s=1 is set.",
                    path, holder, ENV_REPLACE_LIVE)
        return
    raise Refused("Connection in use: unix:%s is served by a live listener (%s); not "
                  "replacing it. Stop that server first, or set %s=1 to take the path "
                  "over." % (path, holder, ENV_REPLACE_LIVE))


def _bind_failure(path, exc):
    shown = _shown(path)
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT:
        return "Can't bind unix:%s: the directory %s does not exist." % (
            shown, os.path.dirname(os.path.abspath(path)))
    if code in (errno.EACCES, errno.EPERM):
        return "Can't bind unix:%s: permission denied." % shown
    if code == errno.ENOTDIR:
        return "Can't bind unix:%s: a part of the path is not a directory." % shown
    if code == errno.EADDRINUSE:
        return "Connection in use: unix:%s is bound by another socket." % shown
    if code is None and "too long" in str(exc):
        return "Can't bind unix:%s: the path is %d bytes, too long for a unix socket " \
               "address." % (shown, len(os.fsencode(path)))
    return "Can't bind unix:%s: %s." % (shown, getattr(exc, "strerror", None) or exc)


def _check_reuse_port(path, conf):
    # ``is True``: the setting is a bool; anything else (a test's Mock config) is not set.
    if not (getattr(conf, "reuse_port", False) is True and hasattr(socket, "SO_REUSEPORT")):
        return
    scratch = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        scratch.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):  # those gunicorn ignores
            raise Refused("Can't bind unix:%s: reuse_port is set, but this kernel refuses "
                          "SO_REUSEPORT on unix sockets (%s); remove reuse_port."
                          % (_shown(path), exc.strerror))
    finally:
        scratch.close()


def _exit_status(conf):
    if getattr(conf, "reuse_port", False) and _compat.REUSE_PORT_BINDS_IN_WORKERS:
        return _compat.WORKER_BOOT_ERROR  # in a worker: halts the arbiter
    return 1


# -- owning the bound file ---------------------------------------------------------------

def _record_owner(listener, name, pid=None):
    """Remember the file ``name`` that ``listener`` has just bound."""
    if not is_filesystem_path(name):
        return
    try:
        st = os.lstat(name)
    except OSError:
        return
    if stat.S_ISSOCK(st.st_mode):
        setattr(listener, OWNER_ATTR, (os.getpid() if pid is None else pid,
                                       st.st_dev, st.st_ino))


def _attr(listener, name):
    # Not getattr(): gunicorn's BaseSocket.__getattr__ forwards to ``self.sock``, which
    # does not exist yet while ``bind`` runs.
    return vars(listener).get(name)


def _unlink_if_owned(listener, path, pid=None):
    owner = _attr(listener, OWNER_ATTR)
    pid = os.getpid() if pid is None else pid
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
    return allowed


def _adopt(listener, environ=os.environ, pid=None):
    """A USR2 successor: own the inherited listener's file if it is the one handed over."""
    raw = environ.get(ENV_SOCKETS)
    name = listener.getsockname()
    if not raw or not is_filesystem_path(name):
        return
    try:
        handed = dict((path, (dev, ino)) for path, dev, ino in json.loads(raw))
    except (ValueError, TypeError):
        return
    if name in handed:
        pid = os.getpid() if pid is None else pid
        _record_owner(listener, name, pid)
        if _attr(listener, OWNER_ATTR) != (pid,) + tuple(handed[name]):
            setattr(listener, OWNER_ATTR, None)  # not the file that was handed over


def _handover(listeners, pid=None):
    owned = []
    for listener in listeners:
        owner = _attr(listener, OWNER_ATTR)
        if owner is not None and pid is None:
            pid = os.getpid()  # only then: gunicorn's reexec() counts on its own getpid calls
        if owner is not None and owner[0] == pid:
            owned.append([listener.getsockname(), owner[1], owner[2]])
    return json.dumps(owned) if owned else None


# -- the wrappers installed into gunicorn ------------------------------------------------

def _init(original, self, addr, conf, log, fd=None, **kwargs):
    if fd is not None:  # GUNICORN_FD (USR2) or systemd: already bound, never probed
        original(self, addr, conf, log, fd=fd, **kwargs)
        _adopt(self)
        return
    try:
        _check_reuse_port(addr, conf)
        if is_filesystem_path(addr):
            check_path(addr, log)
        try:
            if is_filesystem_path(addr):
                original(self, addr, conf, log, **kwargs)
            else:  # abstract: nothing to stat or remove
                gunicorn_sock.BaseSocket.__init__(self, addr, conf, log, **kwargs)
        except OSError as exc:
            raise Refused(_bind_failure(addr, exc))
    except Refused as refused:
        log.error("%s", refused)
        raise SystemExit(_exit_status(conf))


def _bind(original, self, sock, *args, **kwargs):
    if isinstance(self.cfg_addr, str) and self.cfg_addr.startswith("\0"):
        sock.bind(self.cfg_addr)  # abstract: no file to chown
        return
    original(self, sock, *args, **kwargs)
    _record_owner(self, sock.getsockname())


def _close(original, self, *args, **kwargs):
    # gunicorn <= 19.6.0's UnixSocket.close() unlinks first, in any process: never call it.
    if self.sock is None:
        return
    if is_filesystem_path(self.cfg_addr):
        _unlink_if_owned(self, self.cfg_addr)
    gunicorn_sock.BaseSocket.close(self)


def _close_sockets(original, listeners, unlink=True, *args, **kwargs):
    # gunicorn >= 19.7.0: the arbiter's stop() and reload() call this; ``unlink`` is
    # gunicorn's own decision (False with a USR2 successor, systemd or reuse_port).
    # Checked before closing: while the listener is open its file's inode cannot be
    # freed, so its number cannot belong to another file yet.
    if unlink:
        for listener in listeners:
            try:
                name = listener.getsockname()
            except OSError:
                continue  # already closed
            if is_filesystem_path(name):
                _unlink_if_owned(listener, name)
    original(listeners, False, *args, **kwargs)


def _reexec(original, self, *args, **kwargs):
    env = self.cfg.env_orig
    saved = env.pop(ENV_SOCKETS, None)
    handed = _handover(self.LISTENERS)
    if handed:
        env[ENV_SOCKETS] = handed
    try:
        return original(self, *args, **kwargs)
    finally:
        env.pop(ENV_SOCKETS, None)
        if saved is not None:
            env[ENV_SOCKETS] = saved


def _targets():
    """What the guard wraps on this gunicorn: ``(namespace, name, impl)``."""
    yield gunicorn_sock.UnixSocket, "__init__", _init
    yield gunicorn_sock.UnixSocket, "bind", _bind
    if _compat.UNIX_CLOSE_UNLINKS:
        yield gunicorn_sock.UnixSocket, "close", _close
    if _compat.HAS_CLOSE_SOCKETS or not _compat.UNIX_CLOSE_UNLINKS:  # neither: warned
        yield gunicorn_sock, "close_sockets", _close_sockets
    yield gunicorn_arbiter.Arbiter, "reexec", _reexec


def install(log=None):
    """Install the guard in this process; return False if it was already installed.

    Call it in the arbiter before it binds (a gunicorn config file is the place);
    workers forked afterwards inherit it. A target missing on this gunicorn is left
    alone and named in one WARNING line.
    """
    with _lock:
        if _installed:
            return False
        missing = []
        for namespace, name, impl in _targets():
            if _patch.wrap(namespace, name, impl, key=PATCH_KEY):
                _installed.append((namespace, name))
            elif not _patch.is_wrapped(namespace, name, key=PATCH_KEY):
                missing.append("%s.%s" % (getattr(namespace, "__name__", namespace), name))
        if missing:
            _compat.warn_unrecognised("the socket guard", missing, log)
        return True


def uninstall():
    """Remove the guard's own wrappers (only ours); False if it was not installed."""
    with _lock:
        if not _installed:
            return False
        for namespace, name in reversed(_installed):
            _patch.unwrap(namespace, name, key=PATCH_KEY)
        del _installed[:]
        return True


def installed():
    """True while the guard is installed in this process."""
    return bool(_installed)
