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
* **heal** (``_heal``): while the arbiter runs, a removed path is linked back to the same
  listening socket from a backup hard link (or, with the backup gone too, a fresh socket
  is bound and the workers roll onto it); checked in the arbiter's loop every 0.2 s,
  whenever a worker exits and, on gunicorn <= 23, as soon as the socket file loses a name
  (inotify). Listeners bound before the guard existed (a HUP from the stock
  worker) or inherited without an identity (USR2 from a stock master) are adopted when
  the kernel (``_unixdiag``) proves that the path names the very socket they are.
* **who may connect**: one WARNING at boot if every local user can connect.

The request path is untouched: only binding, closing listeners, re-exec and the arbiter's
loop (``manage_workers``, its wait, ``stop``) are wrapped.
"""
import errno
import json
import os
import select
import socket
import stat
import sys
import threading
import time

from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock

from . import _compat, _heal, _patch, _settings, _unixdiag

__all__ = ["install", "uninstall", "installed"]

#: Attribute on a gunicorn listener: ``(pid, st_dev, st_ino)`` of the path it bound.
OWNER_ATTR = "_safe_gthread_owner"
#: Environment variable carrying ``[[path, st_dev, st_ino], ...]`` to a USR2 successor.
ENV_SOCKETS = "SAFE_GTHREAD_SOCKETS"
#: Set to 1 to take over a path a live server listens on (a deliberate hand-over).
ENV_REPLACE_LIVE = "SAFE_GTHREAD_REPLACE_LIVE"
#: Attribute on a listener: its ``_heal.Healer`` in the owning arbiter.
HEALER_ATTR = "_safe_gthread_healer"
#: Attribute on a listener built from an inherited fd: "fd" (USR2) or "systemd".
INHERITED_ATTR = "_safe_gthread_inherited"
#: Attribute on a listener: adoption was already considered.
ADOPT_ATTR = "_safe_gthread_adopt_tried"

_lock = threading.Lock()
_installed = []  # the (namespace, name) pairs this install() wrapped
_healers = []  # the _heal.Healer of every path this arbiter owns
_watcher = _heal.Watcher()  # wakes the <= 23 arbiter's sleep when the socket file is removed
_said = _patch.Once()
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
    state, detail = _heal.assess(path, (dev, ino), lstat)
    if state == _heal.MISSING:
        return False, "it is already gone"
    if state == _heal.UNKNOWN:
        return False, "it cannot be checked (%s)" % (getattr(detail, "strerror", None) or detail)
    if state != _heal.OURS:
        return False, "another file has replaced the socket"
    return True, ""


# -- start: what is at the path before gunicorn replaces it ------------------------------

#: Is a server listening on a unix socket file? ``(live, pid)`` (``_heal.probe``).
probe = _heal.probe


def check_path(path, log, environ=os.environ):
    """Raise ``Refused`` unless gunicorn may (remove and) bind the unix socket ``path``;
    for a deliberate takeover, return its marker (``_heal.mark_takeover``)."""
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
                      "another path." % (path, _heal.kind(st.st_mode, "not a socket")))
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
        # Its backup links go first, or a healing server links its socket back over ours;
        # the marker keeps it from binding the path anew before we do.
        marker = _heal.mark_takeover(path)
        _heal.remove_links_to(path, (st.st_dev, st.st_ino), log)
        return marker
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
    st = _heal.socket_stat(name) if is_filesystem_path(name) else None
    if st is None:
        return None
    owner = (os.getpid() if pid is None else pid, st.st_dev, st.st_ino)
    setattr(listener, OWNER_ATTR, owner)
    return owner


def _attr(listener, name):
    # Not getattr(): gunicorn's BaseSocket.__getattr__ forwards to ``self.sock``, which
    # does not exist yet while ``bind`` runs.
    return vars(listener).get(name)


def _unlink_if_owned(listener, path, pid=None):
    owner = _attr(listener, OWNER_ATTR)
    pid = os.getpid() if pid is None else pid
    allowed, reason = unlink_decision(owner, path, pid)
    if owner is not None and owner[0] == pid:
        _release(listener, pid)
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
        owner = _record_owner(listener, name, pid)
        if owner != (pid,) + tuple(handed[name]):
            setattr(listener, OWNER_ATTR, None)  # not the file that was handed over
        elif pid == os.getpid():
            _track(listener, name, owner)  # our own backup; the old master drops its own


def _handover(listeners, pid=None):
    owned = []
    for listener in listeners:
        owner = _attr(listener, OWNER_ATTR)
        if owner is not None and pid is None:
            pid = os.getpid()  # only then: gunicorn's reexec() counts on its own getpid calls
        if owner is not None and owner[0] == pid:
            owned.append([listener.getsockname(), owner[1], owner[2]])
    return json.dumps(owned) if owned else None


# -- who may connect -----------------------------------------------------------------------

def everyone_may_connect(path, stat_=os.stat, lstat=os.lstat):
    """True if every local user can connect to the socket file ``path``: others may write
    to it and search every directory above it (connect needs both)."""
    try:
        if not lstat(path).st_mode & stat.S_IWOTH:
            return False
        directory = os.path.dirname(os.path.abspath(path))
        while True:
            if not stat_(directory).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(directory)
            if parent == directory:
                return True
            directory = parent
    except OSError:
        return False


def warn_if_everyone_may_connect(path, log):
    if path in _said.keys or not everyone_may_connect(path):
        return
    _said.say(log, path, "unix:%s can be reached by every local user (socket mode %03o, "
              "and every directory above it lets others through): any local account can "
              "send requests to the app, past the proxy. Set umask = 0o007 in the "
              "gunicorn config and add the proxy's user to gunicorn's group, or bind in "
              "a directory only gunicorn and the proxy can reach.",
              path, stat.S_IMODE(os.lstat(path).st_mode))


# -- healing: backups, adoption, the arbiter's check ---------------------------------------

def _track(listener, name, owner):
    """In the owning arbiter: back the socket file up and check it from now on."""
    if _attr(listener, HEALER_ATTR) is not None:
        return _attr(listener, HEALER_ATTR)
    conf = _attr(listener, "conf")
    if not _heal.enabled() or getattr(conf, "reuse_port", False):
        return None  # reuse_port: gunicorn never unlinks, each worker may bind its own
    healer = _heal.Healer(listener, name, owner, listener.log)
    healer.start()
    setattr(listener, HEALER_ATTR, healer)
    _healers.append(healer)
    if _compat.ARBITER_WAIT == "sleep":  # >= 24 waits on a queue, not on descriptors
        _watcher.add(name)
    return healer


def _release(listener, pid=None):
    """Drop the backup of ``listener`` if this process made it."""
    healer = _attr(listener, HEALER_ATTR)
    if not healer or healer.pid != (os.getpid() if pid is None else pid):
        return
    healer.release()
    setattr(listener, HEALER_ATTR, None)
    if healer in _healers:
        _healers.remove(healer)


def _release_all():
    pid = os.getpid()
    for healer in list(_healers):
        if healer.pid == pid:
            _release(healer.listener, pid)
    if not _healers:
        _watcher.close()


def adoption_decision(bound, st, path):
    """May an arbiter own ``path``, whose ``lstat`` is ``st`` (None: missing), for a
    listener the kernel says is bound to the file ``bound`` (None: cannot tell)?
    Return ``(bool, reason)``."""
    if bound is None:
        return False, ("the kernel cannot tell which file the listener is bound to "
                       "(netlink unix_diag unavailable)")
    if st is None:
        return False, "the path is already gone"
    if not stat.S_ISSOCK(st.st_mode) or not _unixdiag.same_file(bound, st, path):
        return False, "the path names another file than the socket this master listens on"
    return True, ""


def _maybe_adopt(listener, log, pid, systemd=False, reuse_port=False):
    """A listener with no recorded owner: bound before the guard existed (a HUP from the
    stock worker) or inherited without an identity (USR2 from a stock master). Own its
    path only if the kernel proves the path names this very socket."""
    if _attr(listener, ADOPT_ATTR):
        return
    setattr(listener, ADOPT_ATTR, True)
    if systemd or _attr(listener, INHERITED_ATTR) == "systemd" or reuse_port:
        return  # systemd owns those paths; with reuse_port gunicorn never unlinks
    try:
        name = listener.getsockname()
        fd = listener.fileno()
    except (OSError, AttributeError):
        return
    if not is_filesystem_path(name):
        return
    try:
        st = os.lstat(name)
    except OSError:
        st = None
    allowed, reason = adoption_decision(_unixdiag.bound_file(fd), st, name)
    if not allowed:
        log.warning("Not adopting unix:%s (bound before safe-gthread was loaded): %s. It "
                    "is not restored if removed, nor removed at stop; a stop and start "
                    "makes it this server's own.", name, reason)
        return
    owner = (pid, st.st_dev, st.st_ino)
    setattr(listener, OWNER_ATTR, owner)
    log.info("Adopted unix:%s (bound before safe-gthread was loaded): restored if "
             "removed, removed at this master's stop.", name)
    _track(listener, name, owner)


def _check_paths(arbiter):
    """The arbiter's check of its paths (inside the "heal" layers: a fault turns healing
    off, never stops the arbiter)."""
    if not _heal.enabled():
        _release_all()
        return
    pid = os.getpid()
    listeners = list(getattr(arbiter, "LISTENERS", ()) or ())
    for listener in listeners:
        owner = _attr(listener, OWNER_ATTR)
        if owner is None:
            _maybe_adopt(listener, arbiter.log, pid, getattr(arbiter, "systemd", False),
                         getattr(getattr(arbiter, "cfg", None), "reuse_port", False))
            continue
        if owner[0] != pid:
            continue
        healer = _attr(listener, HEALER_ATTR)
        if healer is None:  # healing was turned back on (HUP)
            healer = _track(listener, listener.getsockname(), owner)
        if healer and healer.check() == _heal.REBIND:
            _rebind(arbiter, listener, healer)
    for healer in list(_healers):  # a reload to another address dropped these
        if healer.pid == pid and not any(healer.listener is l for l in listeners):
            _release(healer.listener, pid)


def _rebind(arbiter, listener, healer):
    """The path and its backup are both gone: bind a fresh socket at the path, hand it to
    newly spawned workers and let gunicorn's manage_workers TERM the old ones, as its
    own reload does (they finish what they accepted; nothing reaches their listener by
    path any more)."""
    path = healer.path
    fresh = gunicorn_sock.UnixSocket.__new__(gunicorn_sock.UnixSocket)
    try:
        _open(_patch.original(gunicorn_sock.UnixSocket, "__init__", key=PATCH_KEY),
              fresh, path, arbiter.cfg, arbiter.log)
    except Refused as refused:
        healer.say_once(("rebind", str(refused)), "unix:%s and its backup link were both "
                        "removed; binding a new socket there failed: %s", path, refused)
        return False
    arbiter.LISTENERS = [fresh if l is listener else l for l in arbiter.LISTENERS]
    _release(listener)
    setattr(listener, OWNER_ATTR, None)
    gunicorn_sock.BaseSocket.close(listener)  # our copy; never unlinks the new path
    arbiter.log.warning("unix:%s and its backup link were both removed; bound a new socket "
                        "there and moved the workers onto it (%d started on it; the old "
                        "ones retire as on a reload).", path, arbiter.num_workers)
    for _ in range(arbiter.num_workers):
        arbiter.spawn_worker()
    return True


# -- the wrappers installed into gunicorn ------------------------------------------------

def _open(original, self, addr, conf, log, **kwargs):
    """Check, then bind ``addr`` for the listener ``self``; raise ``Refused``."""
    _check_reuse_port(addr, conf)
    marker = check_path(addr, log) if is_filesystem_path(addr) else None
    try:
        if is_filesystem_path(addr):
            original(self, addr, conf, log, **kwargs)
        else:  # abstract: nothing to stat or remove
            gunicorn_sock.BaseSocket.__init__(self, addr, conf, log, **kwargs)
    except OSError as exc:
        raise Refused(_bind_failure(addr, exc))
    finally:
        _heal.unmark_takeover(marker)


def _init(original, self, addr, conf, log, fd=None, **kwargs):
    if fd is not None:  # GUNICORN_FD (USR2) or systemd: already bound, never probed
        original(self, addr, conf, log, fd=fd, **kwargs)
        # gunicorn 19.6.0 still has systemd's LISTEN_PID here (later ones record it in
        # ``Arbiter.systemd``): systemd's sockets are never adopted.
        systemd = os.environ.get("LISTEN_PID") == str(os.getpid())
        setattr(self, INHERITED_ATTR, "systemd" if systemd else "fd")
        _adopt(self)
        if not systemd and "GUNICORN_PID" in os.environ and _attr(self, OWNER_ATTR) is None:
            # USR2 from a master that handed over no identity (the stock worker's): at
            # once, before the old master's workers can unlink the path on their way out.
            # (Sockets from systemd come without GUNICORN_PID, but for a USR2 under
            # socket activation; gunicorn >= 19.7 then never unlinks them anyway.)
            _maybe_adopt(self, log, os.getpid(), reuse_port=getattr(conf, "reuse_port", False))
        return
    try:
        _open(original, self, addr, conf, log, **kwargs)
    except Refused as refused:
        log.error("%s", refused)
        raise SystemExit(_exit_status(conf))


def _bind(original, self, sock, *args, **kwargs):
    if isinstance(self.cfg_addr, str) and self.cfg_addr.startswith("\0"):
        sock.bind(self.cfg_addr)  # abstract: no file to chown
        return
    original(self, sock, *args, **kwargs)
    name = sock.getsockname()
    owner = _record_owner(self, name)
    if owner is not None:
        warn_if_everyone_may_connect(name, self.log)
        _track(self, name, owner)


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
    for listener in listeners:
        _release(listener)  # also when gunicorn keeps the path: a successor has its own
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


def _manage_workers(original, self, *args, **kwargs):
    # Every round of the arbiter's loop, and inside reload() before it TERMs the old
    # workers: on a HUP from the stock 19.6.0 worker the listeners are adopted (and
    # backed up) here, before those workers unlink the path on their way out.
    _check_paths(self)
    return original(self, *args, **kwargs)


def _sleep(original, self, *args, **kwargs):
    # gunicorn <= 23: ``select`` on the self-pipe for 1 s. Wait the same second in slices
    # and check the paths between them, and at once when a socket file loses a name
    # (inotify); a readable pipe (a signal, a worker's exit) goes to the
    # original at once, which drains it: no wakeup is ever swallowed or delayed.
    pipe = getattr(self, "PIPE", None)
    if not _healers or not pipe:
        return original(self, *args, **kwargs)
    deadline = time.monotonic() + 1.0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        watched = [_watcher.fd] if _watcher.fd is not None else []
        try:
            ready = select.select([pipe[0]] + watched, [], [],
                                  min(_heal.INTERVAL, remaining))[0]
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return None
            raise
        except KeyboardInterrupt:
            sys.exit()
        if pipe[0] in ready:
            return original(self, *args, **kwargs)
        if ready:
            _watcher.drain()
        _check_paths(self)


def _wait_for_signals(original, self, *args, **kwargs):
    # gunicorn >= 24 runs murder_workers and manage_workers (where the check is) after
    # every wait; a shorter wait is the whole change. A signal still returns at once.
    if _healers:
        if args and args[0] is not None:
            args = (min(args[0], _heal.INTERVAL),) + tuple(args[1:])
        elif not args:
            timeout = kwargs.get("timeout", 1.0)
            if timeout is not None:
                kwargs["timeout"] = min(timeout, _heal.INTERVAL)
    return original(self, *args, **kwargs)


_reloads = [0]


def reloads():
    """How many times this arbiter reloaded its configuration (HUP)."""
    return _reloads[0]


def _reload(original, self, *args, **kwargs):
    # HUP runs the config file again: what its configure() set before must not outlive
    # a config that no longer calls it (the environment and the defaults then apply).
    _settings.reset()
    _reloads[0] += 1  # the worker class's setup runs again for the new configuration
    return original(self, *args, **kwargs)


def _stop(original, self, *args, **kwargs):
    # Whatever gunicorn decided about the path (a USR2 successor keeps it), this master's
    # backup links go with it: the successor made its own.
    try:
        return original(self, *args, **kwargs)
    finally:
        _release_all()


def _targets():
    """What the guard wraps on this gunicorn: ``(namespace, name, impl, feature)``, the
    feature a fault in ``impl`` turns off (``_patch``)."""
    yield gunicorn_sock.UnixSocket, "__init__", _init, "guard"
    yield gunicorn_sock.UnixSocket, "bind", _bind, "guard"
    if _compat.UNIX_CLOSE_UNLINKS:
        # Not contained: 19.6.0's own close() is the bug (every worker unlinks the path).
        yield gunicorn_sock.UnixSocket, "close", _close, None
    if _compat.HAS_CLOSE_SOCKETS or not _compat.UNIX_CLOSE_UNLINKS:  # neither: warned
        yield gunicorn_sock, "close_sockets", _close_sockets, "guard"
    yield gunicorn_arbiter.Arbiter, "reexec", _reexec, "guard"
    yield gunicorn_arbiter.Arbiter, "reload", _reload, "guard"
    yield gunicorn_arbiter.Arbiter, "manage_workers", _manage_workers, "heal"
    yield gunicorn_arbiter.Arbiter, "stop", _stop, "heal"
    if _compat.ARBITER_WAIT == "wait_for_signals":
        yield gunicorn_arbiter.Arbiter, "wait_for_signals", _wait_for_signals, "heal"
    else:  # "sleep"; neither: named in the WARNING
        yield gunicorn_arbiter.Arbiter, "sleep", _sleep, "heal"


def install(log=None):
    """Install the guard in this process; return False if it was already installed.

    Call it in the arbiter before it binds (a gunicorn config file is the place);
    workers forked afterwards inherit it. A target missing on this gunicorn is left
    alone and named in one WARNING line.
    """
    with _lock:
        if _installed:
            return False
        try:
            _heal.parse_heal(os.environ.get(_heal.ENV_HEAL))
        except ValueError as exc:
            _settings.fail(str(exc), log)  # one line, exit 1, as for any bad setting
        _patch.on_disable("heal", _release_all)
        missing = []
        for namespace, name, impl, feature in _targets():
            if _patch.wrap(namespace, name, impl, key=PATCH_KEY, feature=feature):
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
        _release_all()
        return True


def installed():
    """True while the guard is installed in this process."""
    return bool(_installed)
