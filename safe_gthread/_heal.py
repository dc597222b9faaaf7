"""The self-healing socket path: while the arbiter that owns a unix socket runs, its path
names that socket again within a fraction of a second after anything removes it.

Why: a stock 19.6.0 worker from before a switch to the fix unlinks the path on its way out
(``UnixSocket.close()``, benoitc/gunicorn#1298), and so does an ``rm`` in a deploy script
or a cleanup job; the arbiter keeps listening, but nobody can reach it by path until a
full restart (gunicorn's maintainer in benoitc/gunicorn#1309: no way to handle it except
with systemd).

How: right after the arbiter binds (or adopts) a socket, it makes a hard link to the
socket's file in the same directory, ``.<name>.<arbiter pid>.sg-backup``. A hard link
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
  that path, only sockets, only when their pid is gone).

Opt out with ``SAFE_GTHREAD_HEAL=0`` (``enabled()``).
"""
import errno
import os
import re
import stat
import time

from . import _settings

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
    """
    if _configured["heal"] is not None:
        return bool(_configured["heal"])
    try:
        return parse_heal(environ.get(ENV_HEAL))
    except ValueError:
        return True


def set_enabled(value):
    """The hook for ``safe_gthread.configure(heal=...)``: True, False, or None (env)."""
    _configured["heal"] = None if value is None else bool(value)


# -- waking up when a name is removed -------------------------------------------------------

_IN_MOVED_FROM = 0x00000040
_IN_DELETE = 0x00000200


class Watcher(object):
    """An inotify descriptor (Linux, through ctypes) that becomes readable when a name is
    removed from, or renamed out of, a watched directory: the arbiter's wait selects on
    it, so an ``rm`` or a stock worker's unlink is noticed at once instead of at the next
    0.2 s check or the worker's exit. Where inotify is not available ``fd`` stays None
    and the periodic check is all there is."""

    def __init__(self):
        self.fd = None
        self.directories = set()
        self._libc = None

    def add(self, directory):
        # Adding a watched directory again only returns its watch: no set lookup, so a
        # directory removed and made again (its old watch is gone) is watched anew.
        try:
            if self.fd is None:
                import ctypes  # only where the arbiter heals a path
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd < 0:
                    return
                self._libc, self.fd = libc, fd
            if self._libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                            _IN_DELETE | _IN_MOVED_FROM) >= 0:
                self.directories.add(directory)
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
        self.directories.clear()


# -- the backup link -----------------------------------------------------------------------

def backup_path(path, pid):
    """Where the backup link of the socket ``path`` bound by ``pid`` lives."""
    directory, name = os.path.split(path)
    return os.path.join(directory, ".%s.%d%s" % (name, pid, BACKUP_SUFFIX))


def backup_pid(path, candidate):
    """The pid in ``candidate`` (a file name) if it is a backup name for ``path``."""
    name = os.path.basename(path)
    match = re.match(r"\A\.%s\.([1-9][0-9]{0,9})%s\Z" % (re.escape(name),
                                                        re.escape(BACKUP_SUFFIX)),
                     candidate)
    return int(match.group(1)) if match else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's live process
    return True


def _is_socket(path, ident=None):
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    return ident is None or (st.st_dev, st.st_ino) == tuple(ident)


def remove_stale(path, log, alive=_alive):
    """Remove backups of ``path`` left by arbiters that are gone (SIGKILL); return them.

    Only names of exactly our pattern for this path, only sockets, only dead pids: a live
    master's backup (the other half of a USR2 pair) is never touched.
    """
    directory = os.path.dirname(path) or "."
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = backup_pid(path, name)
        if pid is None or alive(pid):
            continue
        stale = os.path.join(directory, name)
        if not _is_socket(stale):
            continue
        try:
            os.unlink(stale)
        except OSError:
            continue
        removed.append(stale)
        log.info("Removed %s, the backup link of a gunicorn master (pid %d) that is gone.",
                 stale, pid)
    return removed


def remove_links_to(path, ident, log):
    """A deliberate takeover (``SAFE_GTHREAD_REPLACE_LIVE=1``): remove the backups of
    ``path`` that link to the socket ``ident`` being replaced, so the server giving the
    path up cannot link its socket back over the new one. Only our exact names for this
    path, only sockets, only that inode."""
    directory = os.path.dirname(path) or "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        if backup_pid(path, name) is None:
            continue
        backup = os.path.join(directory, name)
        if _is_socket(backup, ident) and remove_backup(backup, ident):
            removed.append(backup)
            log.info("Removed %s, the backup link of the socket being taken over.", backup)
    return removed


def make_backup(path, ident, pid):
    """Hard-link the socket file ``path`` (which must still be ``ident``) to its backup
    name; return the backup path. Raises OSError (with a readable ``strerror``)."""
    backup = backup_path(path, pid)
    if _is_socket(backup, ident):
        return backup  # already made (adopted twice, HUP)
    os.link(path, backup, follow_symlinks=False)
    if not _is_socket(backup, ident):
        # The path changed between the caller's lstat and link: not our socket.
        remove_backup(backup, None)
        raise OSError(errno.ESTALE, "the path no longer names the bound socket")
    return backup


def remove_backup(backup, ident):
    """Unlink ``backup`` if it is a socket (and ``ident``, when given); never else."""
    if backup and _is_socket(backup, ident):
        try:
            os.unlink(backup)
        except OSError:
            return False
        return True
    return False


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


def describe(state, detail):
    """A few words for the WARNING line about what was found at the path."""
    if state == SYMLINK:
        return "a symbolic link"
    if state == FOREIGN:
        mode = detail.st_mode
        for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                           (stat.S_ISSOCK, "another socket"),
                           (stat.S_ISFIFO, "a named pipe")):
            if test(mode):
                return "%s (inode %d)" % (kind, detail.st_ino)
        return "another file (inode %d)" % detail.st_ino
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
        self._said = set()  # keys of WARNING lines already logged
        self._missing_since = None  # when the path was first seen missing with no backup

    def say_once(self, key, msg, *args):
        if key in self._said:
            return
        self._said.add(key)
        self.log.warning(msg, *args)

    def start(self):
        """Remove stale backups of this path, then make ours (errors: one WARNING)."""
        remove_stale(self.path, self.log)
        try:
            self.backup = make_backup(self.path, self.ident, self.pid)
        except OSError as exc:
            self.say_once("backup", "Cannot make the backup link %s of unix:%s (%s): if "
                          "the path is removed, safe-gthread binds a new socket there "
                          "instead of restoring this one.",
                          backup_path(self.path, self.pid), self.path,
                          exc.strerror or exc)
        return self.backup

    def release(self):
        """Remove our backup (clean stop, hand-over, healing turned off)."""
        remove_backup(self.backup, self.ident)
        self.backup = None

    def backup_ok(self):
        return self.backup is not None and _is_socket(self.backup, self.ident)

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
            if self._said:
                self._said.clear()  # a later loss is news again
            return NOTHING
        action = plan(state, state == MISSING and self.backup_ok())
        if action == REBIND:
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

