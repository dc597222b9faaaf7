"""``reuse_port`` on TCP: the arbiter keeps one listener per worker slot.

From gunicorn 24.0, ``reuse_port = True`` makes each worker bind its own listener
(``sock.create_sockets`` in the child branch of ``Arbiter.spawn_worker``), and the kernel
spreads new connections over one accept queue per worker. When a worker exits, its
listener closes with it, and the kernel resets every connection still queued on it,
unless the host has ``net.ipv4.tcp_migrate_req = 1`` (Linux 5.14+, off by default): under
``max_requests`` churn a proxy in front answers 502 at every restart (mozilla/sumo#3323;
benoitc/gunicorn#3612 and #3397 try to drain the queue on the way out instead).

Here the arbiter binds the listeners itself, with gunicorn's own ``sock.create_sockets``
(so SO_REUSEPORT and every other option are gunicorn's), one set per worker slot, and
gives each worker it forks a duplicate of its slot's listeners in place of a fresh bind.
A worker's exit then only closes its copy: the slot's accept queue outlives it, and the
connections queued there wait for the next worker of the slot instead of being reset.

- The slot for a spawn (:func:`choose_slot`, pure) is the one that most needs a worker:
  a slot nobody uses (a worker died); else a new one while there are fewer slots than
  ``workers`` (boot, TTIN); else the slot with the fewest workers that stay (live and
  not retiring), the retiring worker's own slot first on a tie (HUP: each new worker
  shares a slot with one old worker until that one leaves). Never "the predecessor's
  slot" alone: when gunicorn's replacement for a worker that left lands in a retiring
  worker's slot, that slot is covered and another is not; the next successors must go
  there, or that slot's queue waits with nobody accepting until gunicorn's next spawn.
- A slot is closed only when it has no live user and there are more slots than
  ``workers`` (TTOU) or it is for an address no longer configured (HUP with a new bind).
  So the group keeps exactly ``workers`` listeners, each with a worker accepting on it.
- The arbiter's copies are close-on-exec (a USR2 master must not inherit listeners it
  would never accept on); a worker closes every slot's copy but its own duplicate, and
  any other child of the arbiter (gunicorn 27's dirty arbiter) closes them all.

Only where it applies: gunicorn binds in workers (``_compat.REUSE_PORT_BINDS_IN_WORKERS``),
``reuse_port`` is on and every bind is a TCP address. Anything else passes straight
through to gunicorn.
"""
import os
import socket
import threading

from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock

from . import _compat, _patch, _schedule

#: The kernel's own remedy: move the queued connections of a closing listener to another
#: listener of its reuseport group (Linux 5.14+). Per network namespace.
MIGRATE_REQ_PATH = "/proc/sys/net/ipv4/tcp_migrate_req"

_lock = threading.RLock()


class _Slot(object):
    """One worker slot: the listeners for the configured addresses, and the pids of the
    workers given them (the live ones are those still in ``Arbiter.WORKERS``)."""

    __slots__ = ("address", "listeners", "users")

    def __init__(self, address, listeners, users=()):
        self.address = address
        self.listeners = listeners
        self.users = list(users)

    def live_users(self, workers):
        return [pid for pid in self.users if pid in workers]

    def forget_dead(self, workers):
        self.users = self.live_users(workers)

    def close(self):
        for listener in self.listeners:
            _close_listener(listener)
        self.listeners = []

    def fds(self):
        return [listener.fileno() for listener in self.listeners]


def _close_listener(listener):
    # gunicorn's BaseSocket: close the real socket (19.x - 23.x UnixSocket.close would
    # unlink, but slots are TCP only).
    inner = getattr(listener, "sock", listener)
    try:
        inner.close()
    except OSError:
        pass


def choose_slot(slots, workers, num_workers, address=None, predecessor=None, retiring=()):
    """The index in ``slots`` for the next worker, or None for a new slot.

    ``slots``: objects with ``address`` and ``users`` (pids); ``workers``: the live worker
    pids (a container); ``predecessor``: the pid this spawn replaces, when known;
    ``retiring``: pids that are on their way out. Slots for another ``address`` (a HUP
    changed the bind) are never chosen.
    """
    eligible = [i for i, slot in enumerate(slots) if address is None or slot.address == address]
    live = dict((i, [pid for pid in slots[i].users if pid in workers]) for i in eligible)
    for i in eligible:
        if not live[i]:
            return i
    if len(eligible) < num_workers:
        return None

    def need(i):
        staying = [pid for pid in live[i] if pid not in retiring]
        return len(staying), predecessor not in live[i], len(live[i]), i
    return min(eligible, key=need)


def slots_to_close(slots, workers, num_workers, address=None):
    """The indexes of the slots to close now: unused and beyond ``num_workers`` (newest
    first), or unused and for an address no longer configured."""
    unused = [i for i, slot in enumerate(slots)
              if not any(pid in workers for pid in slot.users)]
    stale = [i for i in unused if address is not None and slots[i].address != address]
    current = [i for i in range(len(slots)) if i not in stale]
    excess = max(len(current) - num_workers, 0)
    surplus = [i for i in reversed(unused) if i not in stale][:excess]
    return sorted(stale + surplus)


def applies(cfg):
    """True when this gunicorn and these settings make each worker bind its own TCP
    listeners with SO_REUSEPORT: the case the slots are for."""
    # The socket module gunicorn's arbiter tests SO_REUSEPORT on (27.0.1 binds in the
    # arbiter without it), so the answer is gunicorn's even where a test removed it.
    arbiter_socket = getattr(gunicorn_arbiter, "socket", socket)
    if not (_compat.REUSE_PORT_BINDS_IN_WORKERS and hasattr(arbiter_socket, "SO_REUSEPORT")):
        return False
    if not getattr(cfg, "reuse_port", False):
        return False
    addresses = list(getattr(cfg, "address", None) or [])
    return bool(addresses) and all(isinstance(a, tuple) for a in addresses)


def migrate_req():
    """The kernel's ``net.ipv4.tcp_migrate_req`` here (0/1), or None when unreadable."""
    try:
        with open(MIGRATE_REQ_PATH) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _scheduler_hints():
    """(the pid of the worker this spawn replaces or None, the pids now retiring), from
    the arbiter's scheduler (``_schedule``)."""
    return _schedule.predecessor_of_spawn(), set(_schedule.retiring_pids())


def _address(cfg):
    return tuple(cfg.address)


def _new_slot(arbiter):
    listeners = gunicorn_sock.create_sockets(arbiter.cfg, arbiter.log)
    for listener in listeners:
        # fork copies them; exec (USR2's new master) must not: a listener nobody accepts
        # on would still take its share of the group's connections.
        inner = getattr(listener, "sock", listener)
        if hasattr(inner, "set_inheritable"):
            inner.set_inheritable(False)
    return _Slot(_address(arbiter.cfg), listeners)


def _prune(arbiter):
    slots = _patch.here().slots
    if not slots:
        return
    workers = arbiter.WORKERS
    for i in reversed(slots_to_close(slots, workers, arbiter.num_workers,
                                     _address(arbiter.cfg))):
        slots.pop(i).close()
    for slot in slots:
        slot.forget_dead(workers)


def _announce(arbiter, active):
    process = _patch.here()
    if process.announced:
        return
    process.announced = True
    log = arbiter.log
    where = ", ".join("%s:%s" % a[:2] for a in _address(arbiter.cfg))
    if active:
        log.info("safe-gthread: reuse_port on %s: the arbiter keeps one listener per worker "
                 "(%d), so the connections queued on a restarting worker's listener wait "
                 "for its successor instead of being reset.", where, arbiter.num_workers)
        return
    if migrate_req() == 1:
        log.info("safe-gthread: reuse_port on %s: each worker binds its own listener; "
                 "net.ipv4.tcp_migrate_req = 1 moves a restarting worker's queued "
                 "connections to the other listeners.", where)
        return
    log.warning("safe-gthread: reuse_port on %s: each worker binds its own listener and "
                "this gunicorn %s cannot hand it over, so a restarting worker resets the "
                "connections queued on it; set net.ipv4.tcp_migrate_req = 1 (Linux 5.14+) "
                "to have the kernel move them to another listener.",
                where, _compat.GUNICORN_VERSION)


def _spawn_worker(original, arbiter, *args, **kwargs):
    cfg = arbiter.cfg
    if not applies(cfg):
        return original(arbiter, *args, **kwargs)
    from . import _arbiter
    if not _arbiter.in_effect(gunicorn_sock, "create_sockets", "reuse_port"):
        _announce(arbiter, False)
        return original(arbiter, *args, **kwargs)
    process = _patch.here()
    with _lock:
        slots = process.slots
        _prune(arbiter)
        predecessor, retiring = _scheduler_hints()
        index = choose_slot(slots, arbiter.WORKERS, arbiter.num_workers, _address(cfg),
                            predecessor, retiring)
        if index is None:
            slots.append(_new_slot(arbiter))
            index = len(slots) - 1
        slot = slots[index]
        _announce(arbiter, True)
        before = set(arbiter.WORKERS)
        process.pending_slot = slot
    try:
        pid = original(arbiter, *args, **kwargs)
    finally:
        # Only the arbiter gets here: the child leaves spawn_worker with sys.exit.
        process.pending_slot = None
    if not isinstance(pid, int):
        new = [p for p in list(arbiter.WORKERS) if p not in before]
        pid = new[0] if len(new) == 1 else None
    if pid is not None:
        slot.users.append(pid)
    return pid


def _create_sockets(original, conf, log, *args, **kwargs):
    parent = _patch.here().parent  # in a freshly forked worker: the arbiter at its fork
    slot = parent.pending_slot if parent is not None else None
    if slot is None or args or kwargs.get("fds"):
        return original(conf, log, *args, **kwargs)
    # Its slot's listeners, duplicated (gunicorn wraps and closes the fd it is given),
    # and none of the other slots' copies.
    fds = [os.dup(fd) for fd in slot.fds()]
    _drop_slots(parent)
    kwargs["fds"] = fds
    return original(conf, log, **kwargs)


def _manage_workers(original, arbiter, *args, **kwargs):
    # Runs on every turn of the arbiter's loop: close what a TTOU or a new bind left.
    if _patch.here().slots:
        with _lock:
            _prune(arbiter)
    return original(arbiter, *args, **kwargs)


def install():
    """In the arbiter: keep the slots (idempotent; ``_arbiter``). Does nothing on a
    gunicorn whose arbiter binds the listeners itself (< 24)."""
    from . import _arbiter
    return _compat.REUSE_PORT_BINDS_IN_WORKERS and bool(_arbiter.install(("reuse_port",)))


def uninstall():
    """Stop keeping slots and close them (tests)."""
    from . import _arbiter
    removed = _arbiter.uninstall(("reuse_port",))
    _close_slots()
    return removed


def _close_slots():
    with _lock:
        _drop_slots(_patch.here())


def _drop_slots(process):
    for slot in process.slots:
        slot.close()
    process.slots = []
    process.pending_slot = None


def _after_fork(parent):
    # A child that is not a worker of ours (gunicorn 27's dirty arbiter, a hook's
    # subprocess: plain forks) must not keep the slots' listeners: one that never
    # accepts still gets its share of the group's connections, reset when it exits. A
    # worker's fork leaves them to _create_sockets. No lock: the forking thread may hold
    # it, and the child has no other thread.
    if parent is not None and parent.pending_slot is None:
        _drop_slots(parent)


def listener_count():
    """How many slots the arbiter holds (tests, soak)."""
    return len(_patch.here().slots)
