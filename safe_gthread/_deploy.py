"""Deploys that cannot take the site down: readiness-gated HUP and boots that may fail.

Stock gunicorn halts the whole server when a worker exits with ``WORKER_BOOT_ERROR`` (3)
or ``APP_LOAD_ERROR`` (4) (``Arbiter.reap_workers`` raises ``HaltServer``), even when
other workers are serving: broken code on disk plus a HUP, or a ``max_requests``
successor that cannot import, takes the site down. And a HUP TERMs the old workers as
soon as the new ones are forked, so every request waits for the new workers' import.

Here, in the arbiter (the scheduler, ``safe_gthread._schedule``, calls this object):

* A worker forked while other workers are serving (``serving()``, asked in
  ``Worker.__init__``, before the fork) is *guarded*: if it cannot load the app it writes
  BOOT_FAILED and the cause in its heartbeat file, waits for the arbiter's ack and exits
  with 0, which gunicorn does not halt on. At first start, with nothing serving, nothing
  changes: gunicorn's own halt stays.
* A failed boot is logged once (ERROR, with its cause), counted (statsd), and retried
  with a backoff (1 s doubling to 60 s): meanwhile gunicorn's own ``manage_workers``
  is held back from filling the empty slot (the count it sees is padded), and every
  serving worker is told to serve on past ``max_requests`` (HOLD, a byte the arbiter
  writes in its heartbeat file): availability wins over ``max_requests``. The first
  guarded worker that is ready ends that state.
* A HUP's new workers are hidden from ``manage_workers``' count until they are ready:
  each ready one lets gunicorn TERM one old worker (a lossless retirement). If one of
  them cannot boot (or dies before it is ready: gunicorn's ``timeout`` kills a worker
  that hangs in its boot), the reload failed: one ERROR, a statsd counter, and the
  previous generation keeps serving (and retiring, with successors retried as above);
  the next HUP tries again.
* ``reload_batch`` (a setting; 0, the default: all at once) makes a HUP roll: at most
  that many new workers boot at a time, the next ones forked as those are ready, so a
  memory-tight host runs at most ``workers + reload_batch`` booted processes (plus the
  old ones still draining) instead of 2 x ``workers``.
"""
import logging
import signal
import time

from . import _patch

_log = logging.getLogger("gunicorn.error")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0

#: Where a guarded boot came from (for the log line).
SUCCESSOR, RELOAD, REPLACEMENT = "successor", "reload", "replacement"


def _same(workers, pid, age):
    worker = workers.get(pid)
    return worker is not None and getattr(worker, "age", None) == age


class _Reload(object):
    __slots__ = ("age_before", "reload_age_before", "booting", "ready", "failed", "cause",
                 "batch", "pending", "spawned", "settled")

    def __init__(self, age_before, reload_age_before, batch=0):
        self.age_before = age_before  # workers of this age or older: the previous generation
        self.reload_age_before = reload_age_before
        self.booting = {}  # pid -> age, hidden from manage_workers until ready
        self.ready = 0
        self.failed = False
        self.cause = None
        self.batch = batch  # reload_batch: new workers booting at once (0: all)
        self.pending = 0  # new workers still to fork (a rolling reload)
        self.spawned = 0
        self.settled = False

    def full(self):
        """A rolling reload with a full batch booting: the next spawn waits."""
        return bool(self.batch) and len(self.booting) >= self.batch


class Deploys(object):
    """The arbiter's deploy state. Only the arbiter's main thread calls it (gunicorn
    <= 23 reaps in its SIGCHLD handler, which only pops ``WORKERS``; nothing here)."""

    def __init__(self, clock=time.monotonic, writer=None):
        self.clock = clock
        self.write = writer  # (arbiter, pid, hold) -> None: the HOLD byte
        self.ready = {}  # pid -> age: workers that said READY
        self.guarded = {}  # pid -> [age, kind, predecessor]: guarded boots not ready yet
        self.doomed = {}  # pid -> age: failed or superseded boots, hidden until reaped
        self.reload = None  # the last HUP's _Reload
        self.reloading = None  # during Arbiter.reload only
        self.failures = 0  # consecutive failed boots
        self.retry_at = None
        self.held = {}  # pid -> age: told to serve past max_requests
        self.holder = None  # the arbiter whose workers are held (``drop``)
        self.boot_failures = 0  # all time
        self.served = False  # some worker has been ready since this arbiter started
        self.reload_failures = 0

    # -- what the others ask --------------------------------------------------------------
    def serving(self):
        return bool(self.ready)

    def guards_boots(self):
        """Must a new worker that cannot boot leave gunicorn running? Once anything has
        served: a site that served must not halt on a deploy, even if every worker of
        the previous generation has left meanwhile (then it retries with the backoff
        until the code is fixed). At first start, gunicorn's own halt."""
        return self.served

    def backing_off(self):
        return self.retry_at is not None and self.clock() < self.retry_at

    def failing(self):
        return self.failures > 0

    def booting_guarded(self):
        return len(self.guarded)

    def hidden(self):
        """Workers manage_workers must not count: a HUP's new workers until ready, and
        boots that failed or were superseded, until reaped."""
        hidden = set(self.doomed)
        if self.reload is not None:
            hidden.update(self.reload.booting)
        return hidden

    def pad(self, arbiter, visible):
        """How many workers manage_workers' count must add to what it sees, so that it
        spawns none for a HUP's booting workers nor, during a backoff, for an empty slot."""
        booting = len(self.reload.booting) if self.reload is not None else 0
        pad = booting
        if self.backing_off():
            pad = max(pad, getattr(arbiter, "num_workers", 0) - visible)
        return max(pad, 0)

    # -- events ---------------------------------------------------------------------------
    def spawned(self, arbiter, pid, worker, kind, predecessor=None):
        age = getattr(worker, "age", None)
        if self.reloading is not None:
            self.reloading.booting[pid] = age
            self.reloading.spawned += 1
            kind = RELOAD
        if getattr(worker, "_safe_guarded_boot", False):
            self.guarded[pid] = [age, kind, predecessor, self.clock()]

    def on_ready(self, arbiter, pid, age):
        if pid in self.doomed:
            return  # superseded or failed: never counted again
        self.ready[pid] = age
        self.served = True
        if pid in self.guarded and self.guarded[pid][0] == age:
            del self.guarded[pid]
            if self.failures:
                _log.info("safe-gthread: worker %s booted: new workers boot again after %d "
                          "failed attempt(s)", pid, self.failures)
                self.failures = 0
                self.retry_at = None
                self._release_holds(arbiter)
        rec = self.reload
        if rec is not None and rec.booting.get(pid) == age:
            del rec.booting[pid]
            rec.ready += 1
            self._settle(arbiter)

    def _settle(self, arbiter):
        """Once a HUP's new workers are all ready or gone: say so, and if some of the
        previous generation stay (the reload failed, or new workers left before they
        were seen ready), they are ours to retire again, at max_requests as usual."""
        rec = self.reload
        if rec is None or rec.settled or rec.booting or rec.pending:
            return
        rec.settled = True
        if rec.failed or rec.ready < rec.spawned:
            scheduler = _patch.here().scheduler
            if scheduler is not None:
                scheduler.reload_age = min(scheduler.reload_age, rec.reload_age_before)
        if not rec.failed:
            _log.info("safe-gthread: reload: %d new workers ready; the previous "
                      "generation retires", rec.ready)
        if not self.failures:
            self._release_holds(arbiter)

    def on_boot_failed(self, arbiter, pid, age, cause):
        """A guarded worker said it cannot load the app (it exits once acked; its
        message stays readable until it is reaped: counted once)."""
        if self.doomed.get(pid) == age:
            return
        self.doomed[pid] = age
        self._failed(arbiter, pid, age, cause)

    def prune(self, arbiter, scheduler=None):
        workers = arbiter.WORKERS
        for pid, age in list(self.ready.items()):
            if not _same(workers, pid, age):
                del self.ready[pid]
        for pid, age in list(self.held.items()):
            if not _same(workers, pid, age):
                del self.held[pid]
        for pid, age in list(self.doomed.items()):
            if not _same(workers, pid, age):
                del self.doomed[pid]
        timeout = getattr(arbiter, "timeout", 0) or 0
        now = self.clock()
        rec = self.reload
        for pid, (age, _, _, since) in list(self.guarded.items()):
            if not _same(workers, pid, age):
                # Gone before we read READY: it may have booted, served its few
                # requests and left between two looks (max_requests churn), or died: no
                # failure is counted without its own word (BOOT_FAILED) or a timeout.
                del self.guarded[pid]
                if rec is not None:
                    rec.booting.pop(pid, None)
            elif timeout and now - since > timeout:
                self.doomed[pid] = age  # gunicorn's timeout kills it
                self._failed(arbiter, pid, age, "no READY within gunicorn's timeout "
                                                "(%ss)" % timeout)
        if rec is not None:
            for pid, age in list(rec.booting.items()):
                if not _same(workers, pid, age):
                    del rec.booting[pid]  # unguarded (nothing served at the HUP)
            self._settle(arbiter)

    def _failed(self, arbiter, pid, age, cause):
        entry = self.guarded.pop(pid, None)
        kind, predecessor = (entry[1], entry[2]) if entry else (REPLACEMENT, None)
        cause = cause or "exited before it was ready"
        self.boot_failures += 1
        self.failures += 1
        backoff = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.retry_at = self.clock() + backoff
        serving = len([p for p, a in self.ready.items() if _same(arbiter.WORKERS, p, a)])
        serving = min(serving, getattr(arbiter, "num_workers", serving) or serving)
        rec = self.reload
        from . import _schedule  # the metric helper; imported late (it imports us)
        if rec is not None and pid in rec.booting:
            del rec.booting[pid]
            rec.pending = 0  # a rolling reload stops at its first failure
            if rec.failed:
                return  # one ERROR per reload
            rec.failed, rec.cause = True, cause
            self.reload_failures += 1
            _schedule.metric(arbiter, "safe_gthread.reload_failed", 1, "counter")
            _log.error("safe-gthread: reload failed: new workers exited with %s; keeping "
                       "%d workers of the previous generation (the next HUP tries again)",
                       cause, serving)
            self._settle(arbiter)
        else:
            _schedule.metric(arbiter, "safe_gthread.boot_failures", 1, "counter")
            _log.error("safe-gthread: a new worker (pid %s, %s) cannot boot: %s; %d workers "
                       "keep serving, past max_requests if need be; next attempt in %.0fs",
                       pid, kind if predecessor is None else
                       "successor of worker %s" % predecessor, cause, serving, backoff)
        self._hold_all(arbiter)

    def mold_failed(self, arbiter, cause):
        """The mold (``_mold``) a spawn waited for cannot load the app: that is the
        boot attempt's failure, before any worker was forked for it. Inside a HUP the
        reload failed (no new worker is started: each would import the same code and
        fail); otherwise a successor or replacement could not boot. One ERROR, the
        backoff and the holds as for a worker that said BOOT_FAILED. Returns False
        when nothing is guarded (first start: the caller boots the stock way, and
        gunicorn's own halt stays)."""
        rec = self.reloading
        if rec is None and not self.guards_boots():
            return False
        self.failures += 1
        backoff = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.retry_at = self.clock() + backoff
        serving = len([p for p, a in self.ready.items() if _same(arbiter.WORKERS, p, a)])
        serving = min(serving, getattr(arbiter, "num_workers", serving) or serving)
        from . import _schedule  # the metric helper; imported late (it imports us)
        if rec is not None:
            rec.pending = 0
            if not rec.failed:
                rec.failed, rec.cause = True, cause
                self.reload_failures += 1
                _schedule.metric(arbiter, "safe_gthread.reload_failed", 1, "counter")
                _log.error("safe-gthread: reload failed: %s; no new worker was started; "
                           "keeping %d workers of the previous generation (the next HUP "
                           "tries again)", cause, serving)
            self._hold_all(arbiter)
            self._settle(arbiter)
            return True
        self.boot_failures += 1
        _schedule.metric(arbiter, "safe_gthread.boot_failures", 1, "counter")
        _log.error("safe-gthread: a new worker cannot boot: %s; %d workers keep serving, "
                   "past max_requests if need be; next attempt in %.0fs", cause, serving,
                   backoff)
        self._hold_all(arbiter)
        return True

    # -- HOLD: serve past max_requests while successors cannot boot ------------------------
    def _hold_all(self, arbiter):
        self.holder = arbiter
        for pid, age in list(self.ready.items()):
            if pid not in self.held and _same(arbiter.WORKERS, pid, age):
                self.held[pid] = age
                if self.write is not None:
                    self.write(arbiter, pid, 1)

    def _release_holds(self, arbiter):
        for pid, age in list(self.held.items()):
            if _same(arbiter.WORKERS, pid, age) and self.write is not None:
                self.write(arbiter, pid, 0)
        self.held.clear()

    def drop(self):
        """A fault of ours drops this state: no worker may stay held past max_requests
        by a state nobody reads any more (gunicorn's own ``max_requests`` again)."""
        if self.held and self.holder is not None:
            self._release_holds(self.holder)

    # -- HUP -------------------------------------------------------------------------------
    def hold_spawn(self):
        """During gunicorn's reload: skip this spawn (a rolling reload's batch is
        full; ``roll`` forks it later)?"""
        rec = self.reloading
        if rec is None or not rec.full():
            return False
        rec.pending += 1
        return True

    def roll(self, arbiter):
        """Every manage_workers: fork the next new workers of a rolling reload, as the
        batch's earlier ones become ready."""
        rec = self.reload
        while rec is not None and rec.pending and not rec.failed and not rec.full():
            rec.pending -= 1
            self.reloading = rec
            try:
                arbiter.spawn_worker()
            finally:
                self.reloading = None

    def reload_starts(self, arbiter, reload_age_before, batch=0):
        """Before gunicorn's reload spawns the new generation."""
        previous = self.reload
        if previous is not None:
            # A HUP while the previous one's workers boot: those are superseded.
            for pid, age in list(previous.booting.items()):
                if _same(arbiter.WORKERS, pid, age):
                    self.doomed[pid] = age
                    self.guarded.pop(pid, None)
                    try:
                        arbiter.kill_worker(pid, signal.SIGTERM)
                    except OSError:
                        pass
            previous.booting.clear()
        self.reload = None
        if not self.serving():
            return None  # nothing serves: gunicorn's own reload, as stock
        self.reload = self.reloading = _Reload(getattr(arbiter, "worker_age", 0),
                                               reload_age_before, batch)
        # The previous generation serves until the new one is ready, past max_requests
        # if need be: a worker at its cap now would leave a slot nobody refills (the
        # new workers are on their way), or nothing serving if the new code is broken.
        self._hold_all(arbiter)
        return self.reload

    def reload_ends(self):
        self.reloading = None
