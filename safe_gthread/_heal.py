"""The self-healing socket path: while the arbiter that owns a unix socket runs, its path
names that socket again within a fraction of a second after anything removes it.

Why: a stock 19.6.0 worker from before a switch to the fix unlinks the path on its way out
(``UnixSocket.close()``, benoitc/gunicorn#1298), and so does an ``rm`` in a deploy script
or a cleanup job; the arbiter keeps listening, but nobody can reach it by path until a
full restart (gunicorn's maintainer in benoitc/gunicorn#1309: no way to handle it except
with systemd).

How: right after the arbiter binds (or adopts) a socket, it makes a hard link to the
socket's file in the same directory, ``.<name>.<random token>.sg-backup``. A hard link
shares the inode, so it has the socket's own mode and owner and grants no access the
path does not: a process needs the same directory search permission and write permission
on the same inode to connect through either name. ``link(2)`` needs the same file system,
hence the same directory. If the path disappears, ``link(backup, path)`` puts the very
listening socket back: the workers keep serving, the queued connections stay queued.

Rules (see ``assess`` and ``plan``, pure functions with unit tests):

* the path still names our socket (``lstat``: ``S_ISSOCK`` and the recorded
  ``(st_dev, st_ino)``): nothing to do; one ``lstat`` per owned path and check.
* missing: ``link(backup, path)``, which fails with ``EEXIST`` if anything appeared
  there meanwhile: nothing is ever replaced. One WARNING line per restoration.
* a symlink, a regular file, another socket at the path: left alone, one WARNING per
  foreign inode. Symlinks are never followed (``lstat``, ``link`` without
  ``AT_SYMLINK_FOLLOW``).
* the backup is gone too (or is no longer our socket): the arbiter binds a fresh socket
  at the path and rolls its workers onto it (see ``guard``).
* a clean stop removes the backup; a SIGKILLed arbiter leaves at most its backup, which
  the next start of the same socket path removes (only names of exactly our pattern for
  that path, only sockets, never a link to its own socket, only when connecting to it is
  refused: a backup of a live server is never touched).
* a deliberate takeover (``SAFE_GTHREAD_REPLACE_LIVE=1``) puts a marker beside the path
  while it removes the old server's backups and the path and binds: the old server does
  not bind the path back meanwhile.

Opt out with ``SAFE_GTHREAD_HEAL=0`` (``enabled()``).
"""
import binascii
import errno
import os
import re
import socket
import stat
import struct
import time

from . import _patch, _settings

#: Environment variable: ``0`` turns healing off (no backup link, no checks).
ENV_HEAL = "SAFE_GTHREAD_HEAL"
#: Seconds between two checks of the owned paths while the arbiter sleeps.
INTERVAL = 0.2
BACKUP_SUFFIX = ".sg-backup"

#: Set by ``safe_gthread.configure(heal=...)``; None: the environment decides.
_configured = {"heal": None}


def parse_heal(value):
    """``SAFE_GTHREAD_HEAL``'s value as a bool (unset or empty: on); ValueError
    (``_settings.SettingsError``) if bad."""
    if value is None or value.strip() == "":
        return True
    return _settings.parse_bool(ENV_HEAL, value)


def enabled(environ=os.environ):
    """Is healing on? ``configure(heal=...)`` first, then ``SAFE_GTHREAD_HEAL``.

    A bad environment value reads as on here; ``guard.install`` refuses it at boot.
    Off, too, once a fault of ours turned it off in this process (``_patch``).
    """
    if _patch.feature_disabled("heal"):
        return False
    if _configured["heal"] is not None:
        return bool(_configured["heal"])
    try:
        return parse_heal(environ.get(ENV_HEAL))
    except ValueError:
        return True


def set_enabled(value):
    """The hook for ``safe_gthread.configure(heal=...)``: True, False, or None (env)."""
    _configured["heal"] = None if value is None else bool(value)


# -- waking up when the socket file loses a name ------------------------------------------

_IN_ATTRIB = 0x00000004       # its link count changed: a name of it was removed
_IN_MOVE_SELF = 0x00000800    # it was renamed away
_IN_DONT_FOLLOW = 0x02000000  # never watch what a symlink at the path points to


class Watcher(object):
    """An inotify descriptor (Linux, through ctypes) that becomes readable when an owned
    socket file loses a name: the arbiter's wait selects on it, so an ``rm`` or a stock
    worker's unlink is noticed at once instead of at the next 0.2 s check or the worker's
    exit. Where inotify is not available ``fd`` stays None and the periodic check is all
    there is.

    The watch is on the socket's own inode, not on its directory: in a shared directory
    such as /tmp any local user can create and remove names all day, and a directory
    watch woke the arbiter for every one. An event on the inode needs a change to the
    socket file itself (its owner's chmod, or a link or unlink of one of its names), so
    no rate limit is needed. A restored path is the same inode (its watch stays); a
    rebound one is watched anew (``add``).

    The descriptor is closed in every child forked from the arbiter (``guard``): gunicorn
    forks workers without exec, so close-on-exec would not keep it out of them."""

    def __init__(self):
        self.fd = None
        self._libc = None

    def add(self, path):
        try:
            if self.fd is None:
                import ctypes  # only where the arbiter heals a path
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd < 0:
                    return
                self._libc, self.fd = libc, fd
            self._libc.inotify_add_watch(self.fd, os.fsencode(path),
                                         _IN_ATTRIB | _IN_MOVE_SELF | _IN_DONT_FOLLOW)
        except (OSError, AttributeError, ValueError, TypeError):
            return

    def drain(self):
        try:
            while os.read(self.fd, 65536):
                pass
        except (OSError, TypeError):
            pass  # EAGAIN: nothing left

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None


# -- the backup link -----------------------------------------------------------------------

def backup_path(path, token=None):
    """A backup name for the socket ``path``: ``.<name>.<token>.sg-backup`` beside it. The
    token is random (a new one per backup): in a shared directory nobody can take the
    name first, and a master that restarts with the same pid (PID 1 in a container)
    never mistakes a dead master's backup for its own."""
    directory, name = os.path.split(path)
    token = token or binascii.hexlify(os.urandom(8)).decode("ascii")
    return os.path.join(directory, ".%s.%s%s" % (name, token, BACKUP_SUFFIX))


def is_backup_name(path, candidate):
    """Is ``candidate`` (a file name) a backup name for ``path``? A token, or the pid
    that named backups before 0.3 (left by a master killed then)."""
    return re.match(r"\A\.%s\.(?:[0-9a-f]{16}|[1-9][0-9]{0,9})%s\Z" % (
        re.escape(os.path.basename(path)), re.escape(BACKUP_SUFFIX)), candidate) is not None


def socket_stat(path, ident=None):
    """``os.lstat(path)`` if ``path`` is a socket (no symlink followed) and, when given,
    the socket ``ident`` = ``(st_dev, st_ino)``; else None. The one identity check."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return st if ident is None or (st.st_dev, st.st_ino) == tuple(ident) else None


def backups(path):
    """``(backup path, lstat)`` of every socket named as a backup of ``path``."""
    directory = os.path.dirname(path) or "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [os.path.join(directory, name) for name in names if is_backup_name(path, name)]
    return [(backup, st) for backup, st in ((b, socket_stat(b)) for b in found) if st]


def probe(path, timeout=1.0):
    """Is a server listening on the unix socket file ``path``? Return ``(live, pid)``.

    Live: the connection is accepted (``pid`` from ``SO_PEERCRED`` where the kernel
    tells, else None), the backlog is full (``EAGAIN``) or the connect times out.
    Dead: refused. Anything else (no permission, ...) raises ``OSError``. A name too
    long for ``sockaddr_un`` spelled out (a backup's can be) is reached through its
    directory's fd.
    """
    dirfd = None
    if len(os.fsencode(path)) >= 100 and os.path.isdir("/proc/self/fd"):
        directory, name = os.path.split(path)
        dirfd = os.open(directory or ".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY)
        path = "/proc/self/fd/%d/%s" % (dirfd, name)
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
        if dirfd is not None:
            os.close(dirfd)


def _peer_pid(client):
    try:
        creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0] or None
    except (OSError, AttributeError):  # no SO_PEERCRED here
        return None


def listening(path):
    """Does a server accept on the socket file ``path``? Only a refused connect says no:
    never guess a socket dead."""
    try:
        return probe(path, timeout=0.2)[0]
    except OSError:
        return True


def remove_stale(path, ident, log):
    """Remove backups of ``path`` that dead masters left (SIGKILL); return them. Only
    sockets with our names for this path, never a link to ``ident`` (ours, or a USR2
    pair's), never a socket anybody listens on."""
    removed = []
    for backup, st in backups(path):
        if (st.st_dev, st.st_ino) == tuple(ident) or listening(backup):
            continue
        try:
            os.unlink(backup)
        except OSError:
            continue
        removed.append(backup)
        log.info("Removed %s, the backup link of a gunicorn master that is gone.", backup)
    return removed


def remove_links_to(path, ident, log):
    """A deliberate takeover (``SAFE_GTHREAD_REPLACE_LIVE=1``): remove the backups of
    ``path`` that link to the socket ``ident`` being replaced, so the server giving the
    path up cannot link its socket back over the new one."""
    removed = []
    for backup, st in backups(path):
        if (st.st_dev, st.st_ino) == tuple(ident) and remove_backup(backup, ident):
            removed.append(backup)
            log.info("Removed %s, the backup link of the socket being taken over.", backup)
    return removed


def make_backup(path, ident):
    """Hard-link the socket file ``path`` (which must still be ``ident``) to a new backup
    name; return the backup path. ``link`` itself refuses a name that exists: nothing is
    checked first. Raises OSError (with a readable ``strerror``)."""
    for _ in range(3):
        backup = backup_path(path)
        try:
            os.link(path, backup, follow_symlinks=False)
        except FileExistsError:
            continue  # 64 random bits taken: someone made a name of ours; draw again
        if socket_stat(backup, ident) is None:
            # The path changed between the caller's lstat and link: not our socket.
            os.unlink(backup)  # the name we just made, whatever it links to
            raise OSError(errno.ESTALE, "the path no longer names the bound socket")
        return backup
    raise OSError(errno.EEXIST, "every backup name drawn was taken")


def remove_backup(backup, ident):
    """Unlink ``backup`` if it is a socket (and ``ident``, when given); never else."""
    if backup and socket_stat(backup, ident) is not None:
        try:
            os.unlink(backup)
        except OSError:
            return False
        return True
    return False


# -- a deliberate takeover -----------------------------------------------------------------

TAKEOVER_SUFFIX = ".sg-takeover"
#: A takeover removes the path and binds within microseconds; a marker older than this
#: was left by a newcomer that died, and holds nothing back.
TAKEOVER_HOLD = 5.0


def _marker(path):
    directory, name = os.path.split(path)
    return os.path.join(directory, ".%s%s" % (name, TAKEOVER_SUFFIX))


def mark_takeover(path):
    """A newcomer taking ``path`` over: say so beside it before it removes the old
    server's backups and the path, so the old server's healing does not bind the path
    back in between (the newcomer's bind would fail with EADDRINUSE). Returns the
    marker to pass to ``unmark_takeover`` once bound, or None."""
    marker = _marker(path)
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError:
        return None  # another takeover's marker, or no permission: the old ways
    return marker


def unmark_takeover(marker):
    if marker is not None:
        try:
            os.unlink(marker)
        except OSError:
            pass


def takeover_underway(path):
    try:
        st = os.lstat(_marker(path))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and abs(time.time() - st.st_mtime) < TAKEOVER_HOLD


# -- what is at the path, what may be done -------------------------------------------------

OURS, MISSING, SYMLINK, FOREIGN, UNKNOWN = "ours", "missing", "symlink", "foreign", "unknown"
NOTHING, RESTORE, REBIND, LEAVE = "nothing", "restore", "rebind", "leave"


def assess(path, ident, lstat=os.lstat):
    """What ``path`` names now: ``(state, detail)``.

    ``OURS`` (the socket ``ident`` = ``(st_dev, st_ino)``), ``MISSING``, ``SYMLINK``,
    ``FOREIGN`` (anything else: a file, a directory, another socket), with the
    ``os.stat_result`` as detail; ``UNKNOWN`` (cannot tell), with the OSError.
    """
    try:
        st = lstat(path)
    except FileNotFoundError:
        return MISSING, None
    except OSError as exc:
        return UNKNOWN, exc
    if stat.S_ISLNK(st.st_mode):
        return SYMLINK, st
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == tuple(ident):
        return OURS, st
    return FOREIGN, st


def plan(state, backup_ok):
    """What the arbiter may do about ``state``: ``NOTHING``, ``RESTORE`` (link the
    backup back), ``REBIND`` (a fresh socket, then roll the workers) or ``LEAVE``
    (something else is there or we cannot tell: never replaced, say so once)."""
    if state == OURS:
        return NOTHING
    if state == MISSING:
        return RESTORE if backup_ok else REBIND
    return LEAVE


def kind(mode, other="another file"):
    """A few words for the type of file ``mode`` describes."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "another socket"),
                       (stat.S_ISFIFO, "a named pipe")):
        if test(mode):
            return name
    return other


def describe(state, detail):
    """A few words for the WARNING line about what was found at the path."""
    if state == SYMLINK:
        return "a symbolic link"
    if state == FOREIGN:
        return "%s (inode %d)" % (kind(detail.st_mode), detail.st_ino)
    if state == UNKNOWN:
        return "nothing it can check (%s)" % (getattr(detail, "strerror", None) or detail)
    return state


class Healer(object):
    """One owned path in the arbiter: its identity, its backup, what was said about it."""

    def __init__(self, listener, path, owner, log):
        self.listener = listener
        self.path = path
        self.pid, dev, ino = owner
        self.ident = (dev, ino)
        self.log = log
        self.backup = None
        self._said = _patch.Once()  # WARNING lines already logged
        self._missing_since = None  # when the path was first seen missing with no backup

    def say_once(self, key, msg, *args):
        self._said.say(self.log, key, msg, *args)

    def start(self):
        """Remove stale backups of this path, then make ours (errors: one WARNING)."""
        remove_stale(self.path, self.ident, self.log)
        try:
            self.backup = self.backup or make_backup(self.path, self.ident)
        except OSError as exc:
            self.say_once("backup", "Cannot make a backup link of unix:%s in its "
                          "directory (%s): if the path is removed, safe-gthread binds a "
                          "new socket there instead of restoring this one.", self.path,
                          exc.strerror or exc)
        return self.backup

    def release(self):
        """Remove our backup (clean stop, hand-over, healing turned off)."""
        remove_backup(self.backup, self.ident)
        self.backup = None

    def backup_ok(self):
        return socket_stat(self.backup, self.ident) is not None if self.backup else False

    def check(self, now=None):
        """Look at the path once; restore it if it is missing and we can.

        Returns the plan's action (``REBIND`` is left to the caller, which owns the
        arbiter), after doing ``RESTORE`` and saying ``LEAVE``. ``REBIND`` comes only
        once the path has been missing, with no backup, for ``INTERVAL`` seconds: a
        deliberate takeover (another server removing the path and its backups, then
        binding) is done by then, and its socket is left alone.
        """
        state, detail = assess(self.path, self.ident)
        if state != MISSING:
            self._missing_since = None
        if state == OURS:
            self._said.keys.clear()  # a later loss is news again
            return NOTHING
        action = plan(state, state == MISSING and self.backup_ok())
        if action == REBIND:
            if takeover_underway(self.path):
                self._missing_since = None
                return NOTHING  # the newcomer binds there next: never in its way
            now = time.monotonic() if now is None else now
            if self._missing_since is None:
                self._missing_since = now
            if now - self._missing_since < INTERVAL:
                return NOTHING
            self._missing_since = None
        if action == RESTORE:
            try:
                os.link(self.backup, self.path, follow_symlinks=False)
            except FileExistsError:
                return NOTHING  # something appeared meanwhile: the next check sees it
            except OSError as exc:
                self.say_once(("link", exc.errno), "unix:%s was removed and cannot be "
                              "restored from %s (%s).", self.path, self.backup,
                              exc.strerror or exc)
                return LEAVE
            self.log.warning("unix:%s was removed by another process (a worker from "
                             "before the switch to safe-gthread, an rm, a cleanup job); "
                             "restored it: the same listening socket, linked back from "
                             "%s.", self.path, self.backup)
            return RESTORE
        if action == LEAVE:
            key = (state, getattr(detail, "st_dev", None), getattr(detail, "st_ino", None),
                   getattr(detail, "errno", None))
            self.say_once(key, "unix:%s no longer names this server's socket: found %s. "
                          "Leaving it alone (never replaced); requests by path do not "
                          "reach this server until it is removed.", self.path,
                          describe(state, detail))
        return action

