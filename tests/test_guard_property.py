"""Property: for any order of binds, replacements, renames, deletions, hand-overs and stops
across processes, a process never unlinks a path that is not the socket it holds, and the
owner of a socket still at its path does remove it.

Processes are modelled as pids; files are real, in a temporary directory, with real
AF_UNIX binds (on ext4 a freed inode number comes back at once: a socket is closed
once no process holds it, and only then can its inode number name another file). The
ground truth is the model's own record of what each path
names, never the guard's ``(st_dev, st_ino)``.
"""
import itertools
import os
import shutil
import socket
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from safe_gthread import guard
from test_guard import Listener  # a gunicorn listener as far as the guard cares

PATHS = 2
PIDS = (101, 102, 103)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class Sockets(RuleBasedStateMachine):
    def __init__(self):
        super(Sockets, self).__init__()
        self.dir = tempfile.mkdtemp(prefix="sg-prop-")
        self.paths = [os.path.join(self.dir, "p%d.sock" % i) for i in range(PATHS)]
        self.truth = {}          # path -> ("sock", k) | ("other", n); absent: nothing
        self.held = []           # [listener, pid, k, stopped]
        self.sockets = {}        # k -> the real socket (shared by hand-overs)
        self.others = []         # foreign sockets kept open
        self.counter = itertools.count()

    def teardown(self):
        for sock in list(self.sockets.values()) + self.others:
            sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what happens to the files ---------------------------------------------------------
    @rule(pid=st.sampled_from(PIDS), i=st.integers(0, PATHS - 1))
    def bind(self, pid, i):
        path = self.paths[i]
        _remove(path)  # gunicorn replaces a (dead) socket; here anything
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(1)
        k = next(self.counter)
        self.sockets[k] = sock
        listener = Listener(sock)
        guard._record_owner(listener, path, pid=pid)
        self.held.append([listener, pid, k, False])
        self.truth[path] = ("sock", k)

    @rule(i=st.integers(0, PATHS - 1),
          kind=st.sampled_from(["file", "dir", "symlink", "dangling", "socket"]))
    def replace(self, i, kind):
        path = self.paths[i]
        other = self.paths[(i + 1) % PATHS]
        _remove(path)
        if kind == "file":
            open(path, "w").close()
        elif kind == "dir":
            os.mkdir(path)
        elif kind == "symlink":  # to whatever the other path names, maybe our socket
            os.symlink(other, path)
        elif kind == "dangling":
            os.symlink(os.path.join(self.dir, "nowhere"), path)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            self.others.append(sock)
        self.truth[path] = ("other", next(self.counter))

    @rule(src=st.integers(0, PATHS - 1), dst=st.integers(0, PATHS - 1))
    def rename(self, src, dst):
        a, b = self.paths[src], self.paths[dst]
        if src == dst or not os.path.lexists(a):
            return
        _remove(b)
        os.rename(a, b)
        self.truth[b] = self.truth.pop(a)

    @rule(i=st.integers(0, PATHS - 1))
    def delete(self, i):
        _remove(self.paths[i])
        self.truth.pop(self.paths[i], None)

    # -- processes -------------------------------------------------------------------------
    @rule(data=st.data(), new_pid=st.sampled_from(PIDS))
    def reexec(self, data, new_pid):
        """USR2: the holder hands its sockets to a new master (same socket, new pid)."""
        live = [entry for entry in self.held if not entry[3]]
        if not live:
            return
        listener, pid, k, _ = data.draw(st.sampled_from(live))
        if new_pid == pid:
            return
        environ = {}
        handed = guard._handover([listener], pid=pid)
        if handed:
            environ[guard.ENV_SOCKETS] = handed
        heir = Listener(self.sockets[k])  # the same socket, inherited through GUNICORN_FD
        guard._adopt(heir, environ=environ, pid=new_pid)
        self.held.append([heir, new_pid, k, False])

    @rule(data=st.data(), as_owner=st.booleans(), stranger=st.sampled_from(PIDS))
    def stop(self, data, as_owner, stranger):
        """A process closes a listener: its holder (a master's stop) or another one (a
        worker, a fork) that inherited it."""
        live = [entry for entry in self.held if not entry[3]]
        if not live:
            return
        entry = data.draw(st.sampled_from(live))
        listener, pid, k, _ = entry
        closer = pid if as_owner else stranger
        name = listener.getsockname()
        before = self.truth.get(name)
        owner = vars(listener).get(guard.OWNER_ATTR)
        removed = guard._unlink_if_owned(listener, name, pid=closer)
        if removed:
            # The property: only the socket this listener holds, and only by its holder.
            assert before == ("sock", k), (before, k)
            assert closer == pid and owner is not None
            del self.truth[name]
        else:
            assert os.path.lexists(name) == (before is not None)
            # Liveness: the holder of a socket still at its path does remove it.
            assert not (closer == pid and owner is not None and before == ("sock", k)), \
                (before, k, owner)
        if closer == pid:
            entry[3] = True
            if not any(e[2] == k and not e[3] for e in self.held):
                self.sockets.pop(k).close()  # the last holder closes it, after the check

    @invariant()
    def the_model_matches_the_disk(self):
        for path in self.paths:
            assert os.path.lexists(path) == (path in self.truth)


Sockets.TestCase.settings = settings(max_examples=150, stateful_step_count=25,
                                     deadline=None)
test_no_process_unlinks_what_it_does_not_hold = Sockets.TestCase
