"""Processes we started, by process group: never anything by name.

Every server safe-gthread starts (gunicorn, h2o, nginx) runs in a session of its own,
so its process group id is its leader's pid and takes its workers along.
"""
import os
import shutil
import signal
import time


def find_executable(name):
    """The path of the program ``name``, or None. Debian puts nginx in /usr/sbin, which a
    non-root PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def live_processes():
    """Yield ``(pid, ppid, pgid, sid)`` of every process that is not a zombie (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as fh:
                # After the command name, in parentheses: state, ppid, pgrp, session, ...
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2]), int(fields[3])


def children(ppid):
    """The live (not zombie) children of ``ppid``."""
    return sorted(pid for pid, parent, _, _ in live_processes() if parent == ppid)


def status_field(pid, name):
    """The values of field ``name`` in /proc/PID/status (``Uid``: real, effective, saved,
    filesystem), or None when ``pid`` is gone or has no such field."""
    prefix = name + ":"
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split()[1:]
    except OSError:
        return None
    return None


def caught_signals(pid):
    """The set of signal numbers ``pid`` has handlers for (``SigCgt`` in /proc), or None
    when it is gone."""
    values = status_field(pid, "SigCgt")
    if values is None:
        return None
    mask = int(values[0], 16)
    return {n + 1 for n in range(64) if mask >> n & 1}


def group_alive(proc, pgid):
    """True while a process of group ``pgid`` lives; reaps the leader ``proc`` first, since
    a zombie leader (or zombies reparented to init) still holds the group id."""
    proc.poll()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(group == pgid for _, _, group, _ in live_processes())


def stop_group(proc, pgid, grace):
    """SIGTERM the group, SIGKILL what is left after ``grace`` seconds; wait for the end."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc, pgid):
            time.sleep(0.05)
        if not group_alive(proc, pgid):
            break
    proc.poll()


def read_text(path):
    """A log file's text, or "" when it does not exist (yet)."""
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def tails(paths, limit=20000):
    """The last ``limit`` characters of each existing file, headed by its name: for failure
    messages."""
    return "\n".join("--- %s ---\n%s" % (os.path.basename(path), read_text(path)[-limit:])
                     for path in paths if os.path.exists(path))
