"""The arbiter schedules retirements: a worker that must retire keeps serving until its
successor is ready.

Stock gunicorn forks a replacement only after the old worker has exited, so a worker
slot stays empty for the whole drain plus the successor's boot (benoitc/gunicorn#2422,
#3199): under ``max_requests`` churn with an app that takes a second to import, that is
40 % of the capacity. Here:

1. A worker that reaches a trigger (``max_requests`` + jitter, ``max_worker_memory``,
   ``max_worker_lifetime``; ``safe_gthread._worker``) writes "retire me (reason)" at
   the start of its heartbeat file, wakes the arbiter with SIGCHLD, and **keeps
   serving**.
2. The arbiter queues the request. While fewer than ``max_retiring`` retirements are in
   flight, it forks a successor for the first in the queue (so worker processes stay
   within ``workers .. workers + max_retiring``).
3. The successor writes "ready" in its own heartbeat file once booted (app loaded, ``post_worker_init`` run, entering
   its loop); the arbiter then sends the old worker SIGTERM: gunicorn's graceful stop,
   which our retirement (``safe_gthread._retire``) makes lose nothing.
4. If no successor is ready within gunicorn's ``timeout``, the old worker retires
   itself the stock way. A worker over ``max_worker_memory`` does not wait: it stops
   accepting at once (LEAVING) and gets its successor as soon as a slot is free.

While its successor exists, the old worker is left out of what gunicorn's own
``manage_workers`` counts (``_Discounted``), so gunicorn neither spawns for it nor TERMs
the oldest worker to get back to ``workers``. The view is only ever seen by the
arbiter's main thread inside that call: ``spawn_worker`` runs with the real
``WORKERS`` (a fork closes every sibling's heartbeat file, gunicorn >= 19.9), and other
threads (gunicorn >= 25's control socket, ``show workers``) always see every worker.

The channel is each worker's heartbeat file (gunicorn's ``WorkerTmp``, opened by the
arbiter before fork and shared with the worker; the heartbeat itself only changes its
timestamps): ``os.pwrite`` at offset 0 in the worker, ``os.pread`` in the arbiter. So a
worker holds no more fds than a stock one,
and a state belongs to a worker object, never to a pid: a pid reaped and reused is a
new ``WORKERS`` entry with a new file. The bookkeeping still checks each entry's
``age`` (gunicorn's spawn counter) against ``WORKERS[pid].age``. TTIN, TTOU and stops are
never turned into handoffs; a HUP forgets every pending retirement, and its new workers
replace the old ones as they get ready (``safe_gthread._deploy``).

gunicorn reaps in its SIGCHLD handler up to 23.x (19.x - 23.x run ``reap_workers`` in the
handler, which can interrupt ``manage_workers``); from 24.0 the handler only queues the
signal for the main loop. Either way the view never pops anything: lookups, stores and
removals reach the real dict.
"""
import collections
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import KeysView, MutableMapping

from gunicorn import arbiter as gunicorn_arbiter

from . import _deploy, _patch, _settings

#: What a worker writes at the start of its heartbeat file: a magic, "ready", what it
#: wants (0 nothing, RETIRE, DUE, LEAVING), why (an index in REASONS), and with RETIRE
#: in how many hundredths of a second it expects to reach its limit.
_STATE = struct.Struct("=2sBBBH")
_ETA_MAX = 65535
_MAGIC = b"sg"
#: RETIRE: "boot my successor" (asked ahead of the limit, keep serving); DUE: "at my
#: limit: stop me as soon as the successor is ready"; LEAVING: "stopped accepting" (at
#: the memory limit, or at the request cap with no successor ready: the stock way).
#: READY is a flag of its own, never a want.
RETIRE, DUE, LEAVING, READY = 1, 2, 3, 4
#: BOOT_FAILED: a guarded worker (forked while others serve) cannot load the app; the
#: cause follows at CAUSE_OFFSET (``_deploy``). It exits once the arbiter has acked.
BOOT_FAILED = 5
#: Bytes the *arbiter* writes in a worker's heartbeat file, past the worker's message:
#: HOLD (1: serve on past max_requests, successors cannot boot; 0: not any more) and ACK
#: (the BOOT_FAILED message was read).
HOLD_OFFSET, ACK_OFFSET = 16, 17
CAUSE_OFFSET, CAUSE_MAX = 32, 400
_CAUSE_LEN = struct.Struct("=H")
#: A worker that said BOOT_FAILED waits this long at most for the ack, then exits anyway.
ACK_WAIT = 2.0
REASONS = ("", "max_requests", "max_worker_memory", "max_worker_lifetime")

#: A ready successor whose predecessor has not reached its limit yet (it asked early,
#: and the boot was faster than predicted) waits until LATE x the time the old worker
#: said it would take to reach its limit, at least READY_WAIT_MIN and at most
#: READY_WAIT_MAX seconds after it was ready, then the old worker is stopped anyway.
LATE = 1.5
READY_WAIT_MIN, READY_WAIT_MAX = 0.2, 10.0

#: Weight of the newest measurement in the handoff time's moving average.
EWMA_WEIGHT = 0.3

#: The WARNING that retirements outpace boots is said at most this often (seconds).
WARN_EVERY = 60.0

_log = logging.getLogger("gunicorn.error")


class _Retirement(object):
    """One worker that asked to retire, in the arbiter."""

    __slots__ = ("pid", "age", "reason", "eta", "due", "leaving", "since", "successor",
                 "successor_age", "spawned_at", "ready_at", "termed", "fallback")

    def __init__(self, pid, age, reason, now, eta=0.0):
        self.pid = pid
        self.age = age
        self.reason = reason
        self.eta = eta  # seconds to its limit, as it said when it asked
        self.due = False
        self.leaving = False
        self.since = now
        self.successor = None
        self.successor_age = None
        self.spawned_at = None
        self.ready_at = None
        self.termed = False
        self.fallback = False


def _same(workers, pid, age):
    """True while ``pid`` in ``workers`` is still the worker of generation ``age``."""
    worker = workers.get(pid)
    return worker is not None and getattr(worker, "age", None) == age


class _Scheduler(object):
    """The arbiter's bookkeeping. Only the arbiter's main thread calls it.

    ``handoff_time`` is the moving average of "a worker asked" to "its successor is
    ready" (queueing for a slot included): new workers read it (``Worker.__init__``, in
    the arbiter) to ask that far ahead of their limit.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.queue = collections.OrderedDict()  # pid -> _Retirement, waiting for a slot
        self.handoffs = {}  # old pid -> _Retirement with a successor (or leaving)
        self.reload_age = 0  # workers of this age or older belong to a HUP: not ours
        self.spawning_for = None
        self.booting = {}  # successor pid -> (its age, when its predecessor asked)
        self.handoff_time = None
        self.fallbacks = 0  # workers that retired the stock way (cap or timeout)
        self.warned_at = None
        self.queued_sent = None  # the last queue length sent to statsd
        self.deploy = _deploy.Deploys(clock, writer=_write_hold)

    # -- messages --------------------------------------------------------------------
    def receive(self, arbiter, messages):
        workers = arbiter.WORKERS
        now = self.clock()
        for kind, reason, pid, age, eta in messages:
            if not _same(workers, pid, age):
                continue  # gone, or its pid reused by a newer worker
            if kind == READY:
                self._deploy("on_ready", arbiter, pid, age)
                self._successor_ready(arbiter, pid, age, now)
                continue
            if kind == BOOT_FAILED:
                _write_flag(arbiter, pid, ACK_OFFSET, 1)
                self._deploy("on_boot_failed", arbiter, pid, age, eta)
                continue
            if kind not in (RETIRE, DUE, LEAVING) or age <= self.reload_age:
                continue
            rec = self.handoffs.get(pid) or self.queue.get(pid)
            if rec is None:
                rec = _Retirement(pid, age, REASONS[reason] if reason < len(REASONS) else "?",
                                  now, eta)
                self.queue[pid] = rec
            if kind == LEAVING and not rec.leaving:
                rec.leaving = True  # it stops by itself: never TERMed
                if pid in self.queue:
                    # It has stopped accepting with no successor: its slot is empty now.
                    self.queue.move_to_end(pid, last=False)
                if rec.ready_at is None and rec.reason == "max_requests":
                    self._fell_back(arbiter, rec, "max_requests")
            if kind >= DUE and not rec.due:
                rec.due = True
                if rec.ready_at is not None:
                    self._term(arbiter, rec)

    def _deploy(self, name, *args):
        """Call the deploy state; a fault there turns it off (one ERROR with its
        traceback): gunicorn's own behaviour from then on."""
        deploy = self.deploy
        if deploy is None:
            return None
        try:
            return getattr(deploy, name)(*args)
        except Exception:
            self.deploy = None
            _log.error("safe-gthread: deploy protection failed and is off from now on "
                       "(gunicorn's own behaviour: a worker that cannot boot halts it)",
                       exc_info=True)
            _drop(deploy)
            return None

    def _successor_ready(self, arbiter, pid, age, now):
        # Measured whether or not the old worker is still there (it may have reached its
        # cap and left): this is what the next workers must ask ahead by.
        booting = self.booting.pop(pid, None)
        if booting is not None and booting[0] == age:
            took = now - booting[1]
            self.handoff_time = took if self.handoff_time is None else (
                EWMA_WEIGHT * took + (1 - EWMA_WEIGHT) * self.handoff_time)
        for rec in self.handoffs.values():
            if rec.successor == pid and rec.successor_age == age and rec.ready_at is None:
                rec.ready_at = now
                _log.debug("safe-gthread: worker %s ready %.3fs after worker %s asked (%s)",
                           pid, now - rec.since, rec.pid, rec.reason)
                if rec.due or rec.leaving:
                    self._term(arbiter, rec)
                return

    def _term(self, arbiter, rec):
        """Stop the old worker gracefully, the way gunicorn stops one (``kill_worker``:
        its bookkeeping for a worker that is gone already runs too)."""
        if rec.termed:
            return
        rec.termed = True
        if rec.leaving:
            return  # it stops by itself
        try:
            arbiter.kill_worker(rec.pid, signal.SIGTERM)
        except OSError:
            pass  # gone meanwhile: the reap forgets it

    def _fell_back(self, arbiter, rec, why):
        """A worker past its limit retires without a ready successor: say so (a WARNING
        at most every ``WARN_EVERY`` seconds, a statsd counter each time)."""
        if rec.fallback:
            return
        rec.fallback = True
        self.fallbacks += 1
        metric(arbiter, "safe_gthread.fallbacks", 1, "counter")
        now = self.clock()
        if self.warned_at is None or now - self.warned_at >= WARN_EVERY:
            self.warned_at = now
            _log.warning(
                "safe-gthread: retirements outpace successor boots: worker %s stopped at "
                "%s before its successor was ready, its slot empty meanwhile, as with the "
                "stock worker (%d so far); to boot more successors at once, raise "
                "max_retiring (now %d; safe_gthread.configure(max_retiring=...) or "
                "SAFE_GTHREAD_MAX_RETIRING)", rec.pid, why, self.fallbacks, max_retiring())

    # -- every manage_workers ----------------------------------------------------------
    def prune(self, arbiter):
        workers = arbiter.WORKERS
        now = self.clock()
        self._deploy("prune", arbiter)
        doomed = self.deploy.doomed if self.deploy is not None else {}
        for pid, (age, _) in list(self.booting.items()):
            if not _same(workers, pid, age):
                del self.booting[pid]
        for pid, rec in list(self.queue.items()):
            if not _same(workers, pid, rec.age):
                del self.queue[pid]  # left with no successor: gunicorn replaces it
                if rec.due:
                    self._fell_back(arbiter, rec, "the end of its wait (gunicorn's timeout)")
        for pid, rec in list(self.handoffs.items()):
            if not _same(workers, pid, rec.age):
                del self.handoffs[pid]  # the old worker has left: retirement done
            elif rec.ready_at is None and not rec.leaving and (
                    rec.successor in doomed or not _same(workers, rec.successor,
                                                         rec.successor_age)):
                # The successor could not boot, or died before it was ready (``_deploy``
                # logs it and sets the backoff): forget the pairing. The old worker keeps
                # serving (told to serve past its limit); its request still stands in its
                # heartbeat file, so it queues again for the next attempt.
                del self.handoffs[pid]
            elif rec.ready_at is not None and not rec.termed:
                # Ready before the old worker reached its limit: it serves on until about
                # when it said it would get there, not for ever.
                wait = min(max(rec.since + LATE * rec.eta - rec.ready_at, READY_WAIT_MIN),
                           READY_WAIT_MAX)
                if now - rec.ready_at >= wait:
                    self._term(arbiter, rec)

    def spawn_successors(self, arbiter, max_retiring):
        workers = arbiter.WORKERS
        deploy = self.deploy
        while self.queue and len(self.handoffs) < max_retiring:
            if deploy is not None and (deploy.backing_off() or (
                    deploy.failing() and deploy.booting_guarded())):
                break  # boots fail: one attempt at a time, after the backoff
            counted = len(workers) - len(self.handoffs)
            if len(workers) >= arbiter.num_workers + max_retiring or counted > arbiter.num_workers:
                break
            pid, rec = self.queue.popitem(last=False)
            before = set(workers)
            self.spawning_for = pid
            try:
                arbiter.spawn_worker()
            finally:
                self.spawning_for = None
            # list(): one step; gunicorn <= 23 reaps in its SIGCHLD handler, which can
            # run between two steps of a loop over the dict and change its size.
            born = [new for new in list(workers) if new not in before]
            if not born:
                self.queue[pid] = rec
                self.queue.move_to_end(pid, last=False)
                break
            rec.successor = born[0]
            rec.successor_age = getattr(workers[born[0]], "age", None)
            rec.spawned_at = self.clock()
            self.handoffs[pid] = rec
            self.booting[rec.successor] = (rec.successor_age, rec.since)
            _log.debug("safe-gthread: worker %s retiring (%s): successor %s", pid,
                       rec.reason, rec.successor)
        if len(self.queue) != (self.queued_sent or 0):
            self.queued_sent = len(self.queue)
            metric(arbiter, "safe_gthread.retirements.queued", len(self.queue), "gauge")

    def discounted(self):
        hidden = set(self.handoffs)
        if self.deploy is not None:
            hidden.update(self._deploy("hidden") or ())
        return frozenset(hidden)

    def forget_all(self, arbiter):
        """HUP: every worker now running is gunicorn's to replace, not ours."""
        self._deploy("reload_starts", arbiter, self.reload_age, reload_batch())
        self.queue.clear()
        self.handoffs.clear()
        self.booting.clear()
        self.reload_age = getattr(arbiter, "worker_age", 0)

    def retiring(self):
        return set(self.queue) | set(self.handoffs)


def max_retiring():
    try:
        return _settings.current().max_retiring
    except _settings.SettingsError:
        return _settings.REGISTRY["max_retiring"][0]


def reload_batch():
    try:
        return _settings.current().reload_batch
    except (_settings.SettingsError, AttributeError):
        return 0


def metric(arbiter, name, value, mtype):
    """A statsd metric through gunicorn's logger, where ``statsd_host`` is set (its
    statsd logger sends any log call that carries one; an empty message logs nothing)."""
    if getattr(getattr(arbiter, "cfg", None), "statsd_host", None):
        arbiter.log.info("", extra={"metric": name, "value": value, "mtype": mtype})


class _Discounted(MutableMapping):
    """``Arbiter.WORKERS`` as manage_workers should count it: workers whose successor
    exists left out, for the arbiter's main thread only (other threads see them all).

    Counting and iterating skip them; lookups, stores and removals (reaping, spawning,
    killing) reach the real dict, so a worker reaped meanwhile is really gone.
    """

    def __init__(self, workers, hidden, thread_ident=None, pad=0):
        self._workers = workers
        self._hidden = frozenset(hidden)
        self._ident = threading.get_ident() if thread_ident is None else thread_ident
        # Added to the count only (never to iteration): workers booting that gunicorn
        # must not spawn for (a HUP's, hidden), and empty slots held back during a
        # backoff (``_deploy``). gunicorn spawns when the count is below num_workers
        # and kills from the sorted list of what it iterates: padding only holds spawns.
        self._pad = pad

    def _hiding(self):
        return self._hidden and threading.get_ident() == self._ident

    def __getitem__(self, pid):
        return self._workers[pid]

    def __setitem__(self, pid, worker):
        self._workers[pid] = worker

    def __delitem__(self, pid):
        del self._workers[pid]

    def __contains__(self, pid):
        return pid in self._workers

    def __iter__(self):
        pids = list(self._workers)
        if not self._hiding():
            return iter(pids)
        return iter([pid for pid in pids if pid not in self._hidden])

    # Snapshots taken in one step, unlike the Mapping mixins (which list the pids, then
    # look each one up): gunicorn <= 23 reaps in its SIGCHLD handler, which can remove a
    # worker between the two, and manage_workers' ``sorted(self.WORKERS.items())`` then
    # raised KeyError out of the arbiter's main loop (seen once in a 10,000-restart soak
    # on 19.6.0).
    def items(self):
        pairs = list(self._workers.items())
        if not self._hiding():
            return pairs
        return [(pid, worker) for pid, worker in pairs if pid not in self._hidden]

    def keys(self):
        # gunicorn 19.x counts ``len(self.WORKERS.keys())``: the view's own count,
        # padding included (a list of the pids left the padding out, and a backoff's
        # empty slot was refilled at once: a respawn loop of failing boots).
        return KeysView(self)

    def values(self):
        return [worker for _, worker in self.items()]

    def __len__(self):
        if self._ident != threading.get_ident():
            return len(self._workers)
        return (len(self._workers) - len(self._hidden.intersection(list(self._workers)))
                + self._pad)


def _read(workers):
    """(kind, reason, pid, age, eta) for what every worker's heartbeat file says now."""
    messages = []
    for pid, worker in list(workers.items()):
        try:
            data = os.pread(worker.tmp.fileno(), _STATE.size, 0)
        except (AttributeError, OSError, ValueError):
            continue  # closed meanwhile (reaped), or not a gunicorn worker object
        if len(data) != _STATE.size:
            continue
        magic, ready, want, reason, eta = _STATE.unpack(data)
        if magic != _MAGIC:
            continue
        age = getattr(worker, "age", None)
        if ready:
            messages.append((READY, 0, pid, age, 0.0))
        if want in (RETIRE, DUE, LEAVING):
            messages.append((want, reason, pid, age, eta / 100.0))
        elif want == BOOT_FAILED:
            messages.append((want, 0, pid, age, _read_cause(worker)))  # the cause
    return messages


def _read_cause(worker):
    try:
        fd = worker.tmp.fileno()
        size = _CAUSE_LEN.unpack(os.pread(fd, _CAUSE_LEN.size, CAUSE_OFFSET))[0]
        text = os.pread(fd, min(size, CAUSE_MAX), CAUSE_OFFSET + _CAUSE_LEN.size)
        return text.decode("utf-8", "replace") or None
    except (AttributeError, OSError, ValueError, struct.error):
        return None


def _write_flag(arbiter, pid, offset, value):
    """The arbiter writes one byte in worker ``pid``'s heartbeat file, keeping the
    file's timestamps (gunicorn >= 22 reads the heartbeat from its mtime)."""
    worker = _real(arbiter.WORKERS).get(pid)
    try:
        fd = worker.tmp.fileno()
        before = os.fstat(fd)
        os.pwrite(fd, bytes(bytearray([value])), offset)
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
    except (AttributeError, OSError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def _write_hold(arbiter, pid, hold):
    _write_flag(arbiter, pid, HOLD_OFFSET, 1 if hold else 0)


def _real(workers):
    return workers._workers if isinstance(workers, _Discounted) else workers


# -- the patches (arbiter side) -------------------------------------------------------
def _manage_workers(original, self, *args, **kwargs):
    scheduler = _patch.here().scheduler
    if scheduler is None or isinstance(self.WORKERS, _Discounted):
        return original(self, *args, **kwargs)
    scheduler.receive(self, _read(_real(self.WORKERS)))
    scheduler.prune(self)
    scheduler._deploy("roll", self)
    scheduler.spawn_successors(self, max_retiring())
    hidden = scheduler.discounted()
    workers = self.WORKERS
    pad = 0
    if scheduler.deploy is not None:
        visible = len(workers) - len(hidden.intersection(list(workers)))
        pad = scheduler._deploy("pad", self, visible) or 0
    if not hidden and not pad:
        return original(self, *args, **kwargs)
    self.WORKERS = _Discounted(workers, hidden, pad=pad)
    after = workers
    try:
        result = original(self, *args, **kwargs)
        deploy = scheduler.deploy
        if deploy is not None and deploy.reloading is not None:
            # Inside a HUP: gunicorn >= 27.0.1 now waits up to graceful_timeout for
            # every worker of the previous generation to exit. They serve until the new
            # ones are ready: let it see only the new ones (``_reload`` restores).
            before = deploy.reloading.age_before
            after = _Discounted(workers, [pid for pid, worker in list(workers.items())
                                          if getattr(worker, "age", 0) <= before])
        return result
    finally:
        self.WORKERS = after


def _spawn_worker(original, self, *args, **kwargs):
    # The child closes every sibling's heartbeat file it finds in WORKERS (gunicorn >=
    # 19.9): it must find them all, so the fork runs with the real dict. Before 19.9 the
    # child closes none: it finds them in its parent's ``siblings`` (``close_siblings``).
    process = _patch.here()
    scheduler = process.scheduler
    if scheduler is not None and scheduler._deploy("hold_spawn"):
        return None  # a rolling reload's batch is full: forked later (``_deploy.roll``)
    view = self.WORKERS
    real = _real(view)
    process.siblings = [getattr(worker, "tmp", None) for worker in list(real.values())]
    self.WORKERS = real
    before = set(real)
    try:
        pid = original(self, *args, **kwargs)
    finally:
        self.WORKERS = view
        process.siblings = None
    # In the arbiter only (a child never returns here): note a guarded boot.
    if scheduler is not None and scheduler.deploy is not None:
        for new in [p for p in list(real) if p not in before]:
            predecessor = scheduler.spawning_for
            scheduler._deploy("spawned", self, new, real[new],
                              _deploy.SUCCESSOR if predecessor else _deploy.REPLACEMENT,
                              predecessor)
    return pid


def close_siblings(own_tmp):
    """In a new worker: close the heartbeat files of the siblings it was forked beside
    (gunicorn < 19.9 leaves them open in every worker for its whole life)."""
    parent = _patch.here().parent
    for tmp in (parent.siblings if parent is not None else None) or ():
        if tmp is not None and tmp is not own_tmp:
            try:
                tmp.close()
            except (OSError, ValueError):
                pass


class _ConfigFailed(Exception):
    pass


def _reload(original, self, *args, **kwargs):
    """HUP. A configuration file that fails to load makes stock gunicorn exit (its
    ``do_load_config`` calls ``sys.exit(1)`` inside the reload, no worker stopped: the
    site is down, on 19.6.0 - 27.0.1 alike). Here the running configuration and workers
    stay, with one ERROR; the next HUP tries again."""
    scheduler = _patch.here().scheduler
    if scheduler is None:
        return original(self, *args, **kwargs)
    app = getattr(self, "app", None)
    app_reload = getattr(app, "reload", None)
    environ = dict(os.environ)
    if callable(app_reload) and "reload" not in getattr(app, "__dict__", {"reload": 1}):
        def checked_reload(*a, **kw):
            cfg = getattr(app, "cfg", None)
            try:
                app_reload(*a, **kw)
            except SystemExit as exc:
                app.cfg = cfg
                raise _ConfigFailed(exc.code)
            scheduler.forget_all(self)  # the new configuration loaded: a reload it is
        app.reload = checked_reload
    else:
        app = None
        scheduler.forget_all(self)
    try:
        return original(self, *args, **kwargs)
    except _ConfigFailed as exc:
        os.environ.clear()
        os.environ.update(environ)
        metric(self, "safe_gthread.reload_failed", 1, "counter")
        _log.error("safe-gthread: reload failed: the configuration did not load (exit "
                   "status %s; its error is on gunicorn's stderr); keeping the running "
                   "configuration and its %d workers (stock gunicorn exits here)",
                   exc.args[0], len(_real(self.WORKERS)))
        return None
    finally:
        if app is not None:
            try:
                del app.reload
            except AttributeError:
                pass
        self.WORKERS = _real(self.WORKERS)
        scheduler._deploy("reload_ends")


def install():
    """In the arbiter: start the scheduler (idempotent). False when already running or
    when the arbiter's shape is not recognised (``_arbiter``). Also in a process forked
    after an install (``--daemon`` forks before the arbiter starts): its own scheduler."""
    from . import _arbiter
    _arbiter.install(("scheduler",))
    process = _patch.here()
    if process.scheduler is not None or not _arbiter.enabled("scheduler"):
        return False
    process.scheduler = _Scheduler()
    return True


def forget():
    """A fault turned the scheduler off: nothing may read its state any more (new
    workers' boots are not guarded, reuse_port gets no hints, held workers are
    released): gunicorn's own."""
    process = _patch.here()
    scheduler, process.scheduler = process.scheduler, None
    if scheduler is not None and scheduler.deploy is not None:
        _drop(scheduler.deploy)


def _drop(deploy):
    try:
        deploy.drop()
    except Exception:  # the state that just failed: what is left is at most a hold
        _log.debug("safe-gthread: releasing the held workers failed", exc_info=True)


def uninstall():
    """Stop the scheduler; False if it was not installed."""
    from . import _arbiter
    _patch.here().scheduler = None
    return _arbiter.uninstall(("scheduler",))


def installed():
    """True while the scheduler runs here: not after a fault turned it off (workers then
    retire the stock way)."""
    from . import _arbiter
    return _arbiter.enabled("scheduler")


# -- for other parts of safe-gthread (arbiter side) -------------------------------------
def predecessor_of_spawn():
    """In the arbiter, during a ``spawn_worker`` we started: the pid of the worker the
    new one replaces; None otherwise."""
    scheduler = _patch.here().scheduler
    return scheduler.spawning_for if scheduler is not None else None


def retiring_pids():
    """In the arbiter: the pids of workers that asked to retire and have not left yet."""
    scheduler = _patch.here().scheduler
    return scheduler.retiring() if scheduler is not None else set()


# -- worker side -----------------------------------------------------------------------
def send(worker, kind, reason="", eta=0.0):
    """In a worker: tell the arbiter (``worker.ppid``) we are READY, or want to RETIRE
    (keep serving; at our limit in about ``eta`` seconds), are DUE (at the limit) or
    LEAVING (stopped accepting). False when that is not possible (no scheduler in this
    arbiter, no heartbeat file, a gone parent): the caller falls back to the stock way."""
    # The arbiter's word, taken when it made the worker (a fault there may have turned
    # its scheduler off since; this process's own faults are its own).
    scheduled = getattr(worker, "_safe_scheduled", None)
    if not (installed() if scheduled is None else scheduled):
        return False
    process = _patch.here()
    mine = process.message = process.message or [0, 0, 0, 0]
    if kind == READY:
        mine[0] = 1
    else:
        mine[1] = max(mine[1], kind)
        mine[2] = REASONS.index(reason) if reason in REASONS else 0
        mine[3] = min(max(int(eta * 100), 0), _ETA_MAX)
    try:
        tmp = worker.tmp
        os.pwrite(tmp.fileno(), _STATE.pack(_MAGIC, *mine), 0)
        # A write stamps the file's mtime with the wall clock; gunicorn >= 22 stamps
        # it with time.monotonic() and compares the two, so a worker would look fresh
        # (never timed out) until its next heartbeat. Stamp it gunicorn's way again.
        tmp.notify()
        os.kill(worker.ppid, signal.SIGCHLD)
    except (AttributeError, OSError, TypeError, ValueError, struct.error):
        return False  # TypeError: a heartbeat file that is not a file (a test's mock)
    return True


def serving():
    """In the arbiter (``Worker.__init__``, before the fork): True once some worker has
    served, so a new worker that cannot boot must not halt gunicorn (``_deploy``)."""
    scheduler = _patch.here().scheduler
    deploy = scheduler.deploy if scheduler is not None else None
    return bool(deploy is not None and deploy.guards_boots())


def send_boot_failure(worker, cause, wait=ACK_WAIT):
    """In a guarded worker that cannot load the app: write BOOT_FAILED and the cause,
    wake the arbiter and wait (at most ``wait`` seconds) until it has read them. False
    when there is no channel (then the caller fails the stock way)."""
    data = cause.encode("utf-8", "replace")[:CAUSE_MAX]
    try:
        fd = worker.tmp.fileno()
        os.pwrite(fd, _CAUSE_LEN.pack(len(data)) + data, CAUSE_OFFSET)
        os.pwrite(fd, b"\0", ACK_OFFSET)
        os.pwrite(fd, _STATE.pack(_MAGIC, 0, BOOT_FAILED, 0, 0), 0)
        worker.tmp.notify()
        os.kill(worker.ppid, signal.SIGCHLD)
    except (AttributeError, OSError, TypeError, ValueError, struct.error):
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if os.pread(fd, 1, ACK_OFFSET) == b"\1":
                return True
        except OSError:
            return True
        time.sleep(0.01)
    return True


def held(worker):
    """In a worker: has the arbiter told it to serve on past max_requests?"""
    try:
        return os.pread(worker.tmp.fileno(), 1, HOLD_OFFSET) == b"\1"
    except (AttributeError, OSError, TypeError, ValueError):
        return False


def handoff_estimate():
    """In the arbiter: seconds from a worker's request to its successor being ready,
    as measured lately (None before the first handoff, or without a scheduler)."""
    scheduler = _patch.here().scheduler
    return scheduler.handoff_time if scheduler is not None else None


def stopped_accepting(worker):
    """Called by the retirement mixins (``_retire``) when the loop stops accepting:
    the drain starts now (for the retirement log line)."""
    started = getattr(worker, "_safe_drain_started", False)
    if started is None:
        worker._safe_drain_started = time.monotonic()
