"""The arbiter's listener slots for reuse_port on TCP, in-process.

The choice of a slot and the closing of slots are pure functions; the wrappers are
driven here with gunicorn's own Config and ``sock.create_sockets`` and a stand-in
arbiter whose ``spawn_worker`` forks like gunicorn's, so the child side (a worker gets
its slot's listener and no other) is checked on real sockets. End-to-end runs under
load are in tests/load/test_reuseport.py.
"""
import os
import socket

import pytest

from safe_gthread import _arbiter, _compat, _patch, _reuseport
from safe_gthread.check.proxy import free_port
from safe_gthread.check.runner import count_listeners


class Slot(object):
    def __init__(self, users, address=("127.0.0.1", 8000)):
        self.users = list(users)
        self.address = address


A = ("127.0.0.1", 8000)
B = ("127.0.0.1", 9000)


def choose(slots, workers, num_workers, predecessor=None, retiring=()):
    return _reuseport.choose_slot(slots, set(workers), num_workers, A, predecessor, retiring)


# -- choose_slot --------------------------------------------------------------------------

def test_boot_creates_one_slot_per_worker():
    slots = []
    for pid in (11, 12, 13):
        assert choose(slots, [s for slot in slots for s in slot.users], 3) is None
        slots.append(Slot([pid]))
    assert len(slots) == 3


def test_the_predecessors_slot_first():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    assert choose(slots, [1, 2, 3], 3, predecessor=2) == 1


def test_a_slot_whose_worker_died_is_taken_before_anything_else():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    assert choose(slots, [1, 3], 3) == 1
    # even while there are fewer slots than workers (a TTIN came meanwhile)
    assert choose(slots, [1, 3], 4) == 1


def test_a_slot_of_retiring_workers_when_the_predecessor_is_unknown():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    assert choose(slots, [1, 2, 3], 3, retiring={3}) == 2


def test_hup_new_workers_share_a_slot_each_with_one_old_worker():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    workers = {1, 2, 3}
    taken = []
    for new in (21, 22, 23):
        index = choose(slots, workers, 3)
        assert index is not None  # never a fourth listener
        slots[index].users.append(new)
        workers.add(new)
        taken.append(index)
    assert sorted(taken) == [0, 1, 2]


def test_ttin_adds_a_slot():
    slots = [Slot([1]), Slot([2])]
    assert choose(slots, [1, 2], 3) is None


def test_slots_for_an_address_no_longer_bound_are_never_chosen():
    slots = [Slot([], address=B), Slot([2])]
    assert choose(slots, [2], 2) is None
    assert choose(slots, [2], 1) == 1


def test_dead_pids_do_not_count():
    slots = [Slot([1, 4]), Slot([2])]
    # 4 is gone: slot 0 has one live user, as slot 1; the lowest index wins the tie.
    assert choose(slots, [1, 2, 5], 2) == 0


def test_an_empty_slot_before_the_predecessors_own():
    # Seen under max_requests churn (gunicorn 24.1.1, 5 workers): gunicorn's replacement
    # for a worker that left went to a retiring worker's slot (0) while the leaver's slot
    # (4) still showed its exiting, unreaped pid; the next successor of slot 0's worker
    # must take the slot nobody accepts on, not join the replacement in slot 0.
    slots = [Slot([56, 62]), Slot([43, 64]), Slot([63]), Slot([66]), Slot([35])]
    workers = {56, 62, 43, 64, 63, 66}  # 35 reaped
    assert choose(slots, workers, 5, predecessor=56, retiring={43, 56, 63, 66}) == 4


def test_the_slot_without_a_staying_worker_before_the_predecessors_covered_one():
    # slot 0: the predecessor and a replacement that stays; slot 2: only a retiring worker.
    slots = [Slot([1, 6]), Slot([2]), Slot([3])]
    assert choose(slots, [1, 2, 3, 6], 3, predecessor=1, retiring={1, 3}) == 2
    # with every slot covered as well as the next, the predecessor's slot
    assert choose(slots, [1, 2, 3, 6], 3, predecessor=1, retiring={1}) == 0


def simulate_churn(seed, num_workers=5, steps=400, max_retiring=2):
    """max_requests churn as the arbiter sees it (``_schedule``), with the slot choice
    under test. Workers ask to retire and queue; up to ``max_retiring`` at a time get a
    successor (the predecessor is known). A queued worker may reach its limit first and
    stop (the stock way); it still gets its successor if one is spawned before it is
    reaped, else gunicorn replaces it once reaped (no predecessor). A successor may
    itself retire at once (short lives), and an exited worker stays in ``workers`` until
    it is reaped, a few turns later. Returns each slot's live users whenever the arbiter
    is at rest (nothing queued, handed off or exited)."""
    import random
    rng = random.Random(seed)
    slots, workers, queue, handoffs, exited = [], set(), [], {}, {}
    next_pid = [100]

    def spawn(predecessor=None):
        retiring = set(queue) | set(handoffs)
        index = _reuseport.choose_slot(slots, workers, num_workers, A, predecessor, retiring)
        if index is None:
            slots.append(Slot([], address=A))
            index = len(slots) - 1
        next_pid[0] += 1
        slots[index].users.append(next_pid[0])
        workers.add(next_pid[0])
        return next_pid[0]

    def leave(pid):
        exited.setdefault(pid, rng.randint(1, 3))

    for _ in range(num_workers):
        spawn()
    rest = []
    for _ in range(steps):
        event = rng.random()
        serving = sorted(workers - set(queue) - set(handoffs) - set(exited))
        if event < 0.35 and serving:
            queue.append(rng.choice(serving))  # asks to retire
        elif event < 0.55 and queue:
            leave(rng.choice(queue))  # at its limit before any successor: stops
        elif event < 0.8 and handoffs:
            leave(rng.choice(sorted(handoffs)))  # its successor is ready: TERMed
        while queue and len(handoffs) < max_retiring:  # spawn_successors
            pid = queue.pop(0)
            handoffs[pid] = spawn(predecessor=pid)
        for pid in sorted(exited):  # the reap, some turns later
            exited[pid] -= 1
            if exited[pid] > 0:
                continue
            del exited[pid]
            workers.discard(pid)
            if pid in queue:
                queue.remove(pid)
            handoffs.pop(pid, None)
            if len(workers) - len(handoffs) < num_workers:
                spawn()  # gunicorn's manage_workers
        if not queue and not handoffs and not exited:
            rest.append([[p for p in slot.users if p in workers] for slot in slots])
    return rest


@pytest.mark.parametrize("seed", range(40))
def test_churn_leaves_no_slot_without_a_worker(seed):
    quiet = simulate_churn(seed)
    assert quiet, "the simulation never came to rest"
    for users in quiet:
        assert len(users) == 5 and all(len(u) == 1 for u in users), users


# -- slots_to_close -----------------------------------------------------------------------

def test_nothing_closes_while_every_slot_has_a_user():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    assert _reuseport.slots_to_close(slots, {1, 2, 3}, 2, A) == []


def test_an_unused_slot_stays_while_it_is_needed():
    # A worker died: its queue must wait for the next worker, not be reset.
    slots = [Slot([1]), Slot([2])]
    assert _reuseport.slots_to_close(slots, {1}, 2, A) == []


def test_ttou_closes_the_unused_slot_beyond_workers():
    slots = [Slot([1]), Slot([2]), Slot([3])]
    assert _reuseport.slots_to_close(slots, {1, 3}, 2, A) == [1]
    assert _reuseport.slots_to_close(slots, {3}, 1, A) == [0, 1]


def test_a_slot_for_an_old_address_closes_once_unused():
    slots = [Slot([1], address=B), Slot([2])]
    assert _reuseport.slots_to_close(slots, {1, 2}, 2, A) == []
    assert _reuseport.slots_to_close(slots, {2}, 2, A) == [0]


# -- the wrappers, with gunicorn's own sockets --------------------------------------------

needs_binding_workers = pytest.mark.skipif(
    not _compat.REUSE_PORT_BINDS_IN_WORKERS,
    reason="gunicorn %s binds reuse_port listeners in the arbiter, not per worker"
           % _compat.GUNICORN_VERSION)


class _Log(object):
    def __init__(self):
        self.lines = []

    def _add(self, level):
        def log(msg, *args, **kwargs):
            self.lines.append((level, msg % args if args else msg))
        return log

    def __getattr__(self, level):
        return self._add(level)


class FakeArbiter(object):
    """What the wrappers read of gunicorn's Arbiter; ``spawn_worker`` forks like it does:
    the child calls ``sock.create_sockets`` and reports the sockets it holds."""

    def __init__(self, cfg, num_workers):
        self.cfg = cfg
        self.log = _Log()
        self.num_workers = num_workers
        self.WORKERS = {}
        self.children = {}

    def spawn_worker(self):
        from gunicorn import sock
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read_fd)
                listeners = sock.create_sockets(self.cfg, self.log)
                open_sockets = [_inode(fd) for fd in _socket_fds()]
                report = "%s|%s" % (",".join(str(_inode(l.fileno())) for l in listeners),
                                    ",".join(str(i) for i in open_sockets))
                os.write(write_fd, report.encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        data = b""
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            data += chunk
        os.close(read_fd)
        os.waitpid(pid, 0)
        own, held = data.decode().split("|")
        self.children[pid] = ([int(i) for i in own.split(",") if i],
                              [int(i) for i in held.split(",") if i])
        self.WORKERS[pid] = object()
        return pid


def _inode(fd):
    return os.fstat(fd).st_ino


def _socket_fds():
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/%s" % name).startswith("socket:"):
                fds.append(int(name))
        except OSError:
            pass
    return fds


@pytest.fixture
def arbiter():
    from gunicorn import arbiter as gunicorn_arbiter
    from gunicorn.config import Config
    cfg = Config()
    cfg.set("bind", "127.0.0.1:%d" % free_port())
    cfg.set("reuse_port", True)
    _reuseport.uninstall()
    # Wrap the stand-in's methods the way install() wraps gunicorn's Arbiter.
    from safe_gthread import _patch
    assert _reuseport.install()
    _patch.wrap(FakeArbiter, "spawn_worker", _reuseport._spawn_worker, key="tests")
    fake = FakeArbiter(cfg, 2)
    try:
        yield fake
    finally:
        _patch.unwrap(FakeArbiter, "spawn_worker", key="tests")
        _reuseport.uninstall()
        assert not _arbiter.enabled("reuse_port") and not _patch.here().slots


def _slot_inodes():
    return [[_inode(fd) for fd in slot.fds()] for slot in _patch.here().slots]


@needs_binding_workers
def test_each_worker_gets_its_slots_listener_and_no_other(arbiter):
    first, second = arbiter.spawn_worker(), arbiter.spawn_worker()
    slots = _slot_inodes()
    assert len(slots) == 2 and _reuseport.listener_count() == 2
    assert arbiter.children[first][0] == slots[0]
    assert arbiter.children[second][0] == slots[1]
    for pid, (own, held) in arbiter.children.items():
        others = set(i for slot in slots for i in slot) - set(own)
        assert not others.intersection(held), (pid, own, held, slots)
    assert count_listeners(arbiter.cfg.address[0][1]) == 2
    assert any("keeps one listener per worker" in line for _, line in arbiter.log.lines)


@needs_binding_workers
def test_a_successor_takes_the_slot_of_the_worker_that_left(arbiter):
    first = arbiter.spawn_worker()
    arbiter.spawn_worker()  # the other slot
    before = _slot_inodes()
    del arbiter.WORKERS[first]  # reaped
    third = arbiter.spawn_worker()
    assert _slot_inodes() == before  # the same listener: its queue was never closed
    assert arbiter.children[third][0] == before[0]
    assert count_listeners(arbiter.cfg.address[0][1]) == 2


@needs_binding_workers
def test_ttou_closes_the_extra_listener_once_its_worker_is_gone(arbiter):
    arbiter.num_workers = 3  # TTIN
    pids = [arbiter.spawn_worker() for _ in range(3)]
    assert _reuseport.listener_count() == 3
    port = arbiter.cfg.address[0][1]
    arbiter.num_workers = 2  # TTOU: the arbiter stops one worker
    _reuseport._prune(arbiter)
    assert _reuseport.listener_count() == 3  # not while that worker still runs
    del arbiter.WORKERS[pids[1]]
    _reuseport._prune(arbiter)
    assert _reuseport.listener_count() == 2
    assert count_listeners(port) == 2


@needs_binding_workers
def test_other_children_of_the_arbiter_hold_no_slot(arbiter):
    """Issue 18 e: gunicorn 27's dirty arbiter is a plain fork of the arbiter; holding
    the slots' listeners, it kept a closed slot in the reuseport group with nobody
    accepting on it."""
    from test_heal import in_forked_child
    arbiter.spawn_worker()
    arbiter.spawn_worker()
    slots = set(i for slot in _slot_inodes() for i in slot)
    assert in_forked_child(lambda: not slots & set(_inode(fd) for fd in _socket_fds()))
    assert set(i for slot in _slot_inodes() for i in slot) == slots  # the arbiter's stay


@needs_binding_workers
def test_the_arbiters_copies_are_not_inherited_across_exec(arbiter):
    arbiter.spawn_worker()
    for fd in _patch.here().slots[0].fds():
        assert not os.get_inheritable(fd)


def test_not_applied_without_reuse_port_or_on_unix_binds():
    from gunicorn.config import Config
    cfg = Config()
    cfg.set("bind", "127.0.0.1:8000")
    assert not _reuseport.applies(cfg)
    if not hasattr(socket, "SO_REUSEPORT"):
        return
    try:
        cfg.set("reuse_port", True)
    except AttributeError:  # gunicorn < 19.8 has no such setting
        return
    assert _reuseport.applies(cfg) == _compat.REUSE_PORT_BINDS_IN_WORKERS
    cfg.set("bind", ["127.0.0.1:8000", "unix:/tmp/x.sock"])
    assert not _reuseport.applies(cfg)


# -- the boot lines and the compat flags ------------------------------------------------------

class _Cfg(object):
    address = [("127.0.0.1", 8000)]


class _Arbiter(object):
    def __init__(self):
        self.cfg = _Cfg()
        self.log = _Log()
        self.num_workers = 3


@pytest.mark.parametrize("active,kernel,level,phrase", [
    (True, 0, "info", "keeps one listener per worker"),
    (False, 0, "warning", "net.ipv4.tcp_migrate_req = 1"),
    (False, None, "warning", "net.ipv4.tcp_migrate_req = 1"),
    (False, 1, "info", "net.ipv4.tcp_migrate_req = 1 moves"),
])
def test_one_boot_line_saying_how_queued_connections_are_kept(monkeypatch, active, kernel,
                                                              level, phrase):
    monkeypatch.setattr(_patch.here(), "announced", False)
    monkeypatch.setattr(_reuseport, "migrate_req", lambda: kernel)
    arbiter = _Arbiter()
    _reuseport._announce(arbiter, active)
    _reuseport._announce(arbiter, active)  # once per arbiter
    assert len(arbiter.log.lines) == 1, arbiter.log.lines
    got_level, line = arbiter.log.lines[0]
    assert got_level == level and phrase in line and "127.0.0.1:8000" in line, line


def test_compat_flags():
    from versions import GUNICORN, REUSE_PORT_BINDS_IN_WORKERS
    assert _compat.REUSE_PORT_BINDS_IN_WORKERS == REUSE_PORT_BINDS_IN_WORKERS
    if GUNICORN >= (19, 9):
        assert _compat.CREATE_SOCKETS_TAKES_FDS
    if GUNICORN < (19, 7):
        assert not _compat.CREATE_SOCKETS_TAKES_FDS
        assert not _reuseport.install()  # nothing to do where the arbiter binds
