"""``safe_gthread.Worker``: gunicorn's gthread worker that keeps the socket, every request
and its capacity across restarts."""
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import traceback

try:
    import resource  # peak_rss(), on the request path: imported once, here
except ImportError:  # not on every platform
    resource = None

from gunicorn.workers.gthread import ThreadWorker

from . import _boot, _compat, _mold, _patch, _retire, _schedule, _settings


#: The retirement this gunicorn's gthread loop needs, chosen once (``_retire``).
_Retirement = _retire.for_generation()

#: How often a worker with ``max_worker_memory`` reads its RSS (/proc/self/statm, ~10 us):
#: at 1 MiB leaked per request and 200 requests a second a worker grows 4 MiB between
#: two samples.
MEMORY_SAMPLE_INTERVAL = 0.02

#: Within this share of ``max_worker_memory`` a worker samples every 5 ms instead.
MEMORY_CLOSE_SHARE = 0.75
MEMORY_CLOSE_INTERVAL = 0.005

#: A worker asks for its successor once its RSS reaches this share of
#: ``max_worker_memory`` (and keeps serving meanwhile); at the limit itself it stops
#: accepting at once.
MEMORY_SOFT_SHARE = 0.9

#: ``max_worker_lifetime`` is spread by +-this share per worker, so workers started
#: together do not all retire together.
LIFETIME_SPREAD = 0.1

#: How long a worker waits for its successor when gunicorn's ``timeout`` is 0 (off).
DEFAULT_HANDOFF_WAIT = 30.0

#: A worker asks for its successor this much earlier than the measured handoff time
#: (request to ready) says it must, at its current request rate, for the successor to be
#: ready when it reaches its limit; plus the arbiter's reaction time.
LEAD_FACTOR = 2.0
LEAD_SLACK = 0.05

#: While it serves toward ``max_requests``, a worker measures its request rate this often
#: (one clock read per loop iteration); the rate is a moving average of these windows.
LOOK_EVERY = 0.05
RATE_WEIGHT = 0.3

#: getrusage's peak and /proc's current RSS come from counters the kernel keeps apart
#: (per-thread caches): the peak may read a little under the current RSS. The request
#: path reads the current RSS once the peak is within this share of the limit.
PEAK_RSS_SHARE = 0.95

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_rss():
    """This process's resident set size in bytes, or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def peak_rss():
    """This process's highest RSS so far in bytes (getrusage: one syscall, no file), or 0
    where the platform does not say. Linux reports ``ru_maxrss`` in KiB; a forked worker
    starts from its RSS at the fork."""
    if resource is None:
        return 0
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (OSError, ValueError):
        return 0


def lifetime_for(age, lifetime):
    """``lifetime`` spread by +-10 %, the same for the same worker generation (``age``)."""
    if not lifetime:
        return None
    return lifetime * (1.0 + LIFETIME_SPREAD * (2.0 * random.Random(age).random() - 1.0))


def describe_failure(exc):
    """One line for a failed app load: ``ImportError: no module named x (web.py:3)``."""
    text = "%s: %s" % (type(exc).__name__, exc)
    try:
        frames = traceback.extract_tb(exc.__traceback__)
    except Exception:
        frames = []
    if frames:
        last = frames[-1]
        text += " (%s:%s)" % (os.path.basename(last[0]), last[1])
    return " ".join(text.split())


def _ignore_sigterm():
    """The loop is over: a later SIGTERM has nothing to stop. gunicorn 21 - 23 send every
    old worker a SIGTERM at each pass of manage_workers during a HUP; one that lands
    while the interpreter shuts down (its Python handlers already reset to SIG_DFL)
    kills the worker, and gunicorn logs "Worker (pid:N) was sent SIGTERM!" at ERROR on
    an ordinary deploy (benoitc/gunicorn#3050, fixed in 24.0). SIG_IGN outlives that
    reset; gunicorn's timeout still ends a worker that hangs in its exit (SIGKILL)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError):
        pass  # not the main thread: nothing to protect


def fmt_mib(nbytes):
    return "n/a" if nbytes is None else "%.1f MiB" % (nbytes / 1048576.0)


class Worker(_Retirement, ThreadWorker):
    """gunicorn's threaded worker (``gthread``) that neither deletes the unix socket nor
    drops a request nor leaves a slot empty when it restarts.

    Use it with ``worker_class = "safe_gthread.Worker"`` or ``-k safe_gthread.Worker``;
    every gthread setting (``threads``, ``keepalive``, ``max_requests``,
    ``graceful_timeout``) means what it means for the stock worker.

    - When gunicorn loads the class (in the arbiter, before it binds), it installs
      :mod:`safe_gthread.guard`: only the arbiter that bound the socket removes it,
      at its own stop, and only if the path is still that socket.
    - A worker that must retire (``max_requests`` + jitter, ``max_worker_memory``,
      ``max_worker_lifetime``: :func:`safe_gthread.configure`) keeps serving until the
      arbiter has booted its successor (``safe_gthread._schedule``), then retires.
    - A worker that retires (handoff, HUP, TERM) stops accepting at once, finishes what
      it accepted and answers one more request on each kept-alive connection with
      ``Connection: close``. gunicorn 27.0.1 and later do this themselves; on 19.x -
      27.0.0 the worker's own retirement does it.
    """

    # Class-level defaults: a worker built by a test without __init__ still works.
    _safe_retire_after = None
    _safe_look_at = 0.0
    _safe_rate = None
    _safe_handoff_estimate = None
    _safe_lead_seconds = None
    _safe_ready_at = None
    _safe_rate_mark = None
    _safe_due = False
    _safe_reason = None
    _safe_drain_started = False
    _safe_settings = None
    _safe_sampler = None
    _safe_lifetime_at = None
    _safe_requested_at = None
    _safe_fallback_at = None
    _safe_stopped_by = None
    _safe_handoff_wait = DEFAULT_HANDOFF_WAIT
    _safe_memory_limit = 0
    _safe_guarded_boot = False
    _safe_hold_look_at = None
    _safe_held = False
    _safe_max_requests = None
    _safe_next_nr = 0  # 0: the first notify() looks (``_safe_next``)
    _safe_next_at = 0.0
    _safe_changes = 0  # raised by every change of what ``_safe_next`` reads
    _safe_scheduled = None  # the arbiter ran a scheduler when it made this worker

    @classmethod
    def setup(cls):
        parent = getattr(super(Worker, cls), "setup", None)
        if parent is not None:
            parent()
        _boot.setup_once(logging.getLogger("gunicorn.error"))

    def __init__(self, *args, **kwargs):
        # In the arbiter, before fork. gunicorn has drawn max_requests + jitter, and its
        # own check (``handle_request``) stops the worker there, as stock: max_requests
        # keeps its meaning. We only ask for the successor ahead of it, so that the
        # successor is ready when the worker stops.
        super().__init__(*args, **kwargs)
        # Also here, not only after fork: gunicorn's own tests drive a worker's notify()
        # and run() without init_process (tests/test_upstream.py).
        self._safe_lock = threading.Lock()
        self._safe_born = self._safe_created = time.monotonic()
        # Forked while other workers serve: a failure to load the app must not halt
        # gunicorn (``_deploy``). At first start nothing serves: gunicorn's own halt.
        self._safe_guarded_boot = _schedule.serving()
        self._safe_scheduled = _schedule.installed()  # in the arbiter: its faults count
        if (self._safe_scheduled and getattr(self.cfg, "max_requests", 0) > 0
                and self.max_requests < sys.maxsize):
            self._safe_retire_after = self.max_requests
            self._safe_handoff_estimate = _schedule.handoff_estimate()
        # A spawn through the mold (``_mold``) sends this object's plain attributes there.
        _mold.constructed(self)

    # -- after fork ------------------------------------------------------------------
    def init_process(self):
        _patch.forked()  # Python 3.6: close what the arbiter holds (its inotify fd)
        _schedule.close_siblings(self.tmp)
        # The rest of the per-process state starts from the class defaults and the lock
        # made in __init__: nothing sets it in the arbiter before the fork.
        self._safe_born = time.monotonic()
        self._safe_drain_started = None  # None: the drain's start is recorded from now on
        try:
            settings = _settings.current()
        except _settings.SettingsError:
            settings = None  # the arbiter refused to boot with it; never here
        self._safe_settings = settings
        lifetime = lifetime_for(self.age, settings.max_worker_lifetime if settings else 0)
        self._safe_lifetime_at = None if lifetime is None else self._safe_born + lifetime
        timeout = getattr(self.cfg, "timeout", 0) or DEFAULT_HANDOFF_WAIT
        self._safe_handoff_wait = float(timeout)
        if not self._safe_guarded_boot:
            return super().init_process()
        # Guarded: whatever fails before the worker has booted (the app's import or load,
        # post_worker_init, the loop's setup) exits with 0 after telling the arbiter, so
        # gunicorn does not halt (it halts on 3, WORKER_BOOT_ERROR, and 4). Past the boot,
        # gunicorn's own handling (exit -1, no halt).
        try:
            return super().init_process()
        except Exception as exc:
            if self.booted:
                raise
            cause = describe_failure(exc)
            # The arbiter logs the one ERROR (once per attempt, or per reload); the
            # traceback is here. gunicorn sets ``wsgi`` once the app has loaded.
            self.log.info("safe-gthread: worker %s %s (%s); the previous workers keep serving",
                          self.pid, "cannot boot" if getattr(self, "wsgi", None) is not None
                          else "cannot load the app", cause, exc_info=True)
            if not _schedule.send_boot_failure(self, cause):
                raise  # no channel to the arbiter: the stock way
        # gunicorn does not halt on 0 (3 and 4 halt it); a SystemExit is how a stock
        # worker exits too ("Worker exiting", worker_exit run).
        sys.exit(0)

    def run(self):
        # Booted: app loaded, post_worker_init run, about to enter the loop. How long
        # that took (from the arbiter's fork) estimates our own successor's boot, until
        # the arbiter has measured a handoff.
        self._safe_ready_at = time.monotonic()
        self._safe_lead_seconds = LEAD_FACTOR * max(
            self._safe_handoff_estimate or 0.0,
            self._safe_ready_at - self._safe_created) + LEAD_SLACK
        _schedule.send(self, _schedule.READY)
        if self._safe_scheduled:
            self._safe_hold_look_at = 0.0
        if self._safe_retire_after is not None:
            self.log.debug("safe-gthread: worker %s ready %.2fs after its fork; it asks for "
                           "its successor %.2fs ahead of its limit (%s requests)", self.pid,
                           self._safe_ready_at - self._safe_created, self._safe_lead_seconds,
                           self._safe_retire_after)
        self._start_memory_sampler()
        try:
            return super().run()
        finally:
            sampler = self._safe_sampler
            if sampler is not None:
                sampler.set()
            self._log_retirement()
            _ignore_sigterm()

    # -- triggers ----------------------------------------------------------------------
    def notify(self):
        super().notify()
        # The loop calls notify every turn: while nothing is due, one count and one
        # clock comparison (``_safe_next``).
        if self.nr < self._safe_next_nr and time.monotonic() < self._safe_next_at:
            return
        changes = self._safe_changes
        self._safe_look()
        self._safe_next_nr, self._safe_next_at = self._safe_next()
        if self._safe_changes != changes:
            # Another thread (the memory sampler, a request's HOLD look) changed the
            # state while this one computed from it: look again next turn.
            self._safe_next_at = 0.0

    def _safe_next(self):
        """The request count and the time at which ``_safe_look`` has something to do
        next (a request limit to ask or stop at, a rate look, a lifetime, a fallback)."""
        if not self.alive:
            return sys.maxsize, float("inf")
        nr, at = sys.maxsize, [float("inf")]
        if self._safe_hold_look_at is not None:
            at.append(self._safe_hold_look_at)
        if self._safe_reason is None:
            if self._safe_retire_after is not None:
                nr = self._safe_retire_after if self.nr else 1
                at.append(self._safe_look_at if self.nr else float("inf"))
            if self._safe_lifetime_at is not None:
                at.append(self._safe_lifetime_at)
        elif not self._safe_due:
            if self._safe_retire_after is not None:
                nr = self._safe_retire_after
        elif self._safe_fallback_at is not None and not self._safe_held:
            at.append(self._safe_fallback_at)
        return nr, min(at)

    def _safe_look(self):
        if not self.alive:
            return  # stopping already (our retirement, HUP, TERM): nothing to ask for
        if self._safe_hold_look_at is not None:
            now = time.monotonic()
            if now >= self._safe_hold_look_at:
                self._safe_hold_look_at = now + LOOK_EVERY
                self._look_for_hold(now)
        if self._safe_reason is None:
            if self._safe_retire_after is not None and (
                    self.nr >= self._safe_retire_after
                    or (self.nr and time.monotonic() >= self._safe_look_at)):
                self._plan_retirement()
            elif self._safe_lifetime_at is not None and time.monotonic() >= self._safe_lifetime_at:
                self._retire("max_worker_lifetime", due=True)
        elif not self._safe_due:
            if self._safe_retire_after is not None and self.nr >= self._safe_retire_after:
                self._retire(self._safe_reason, due=True)
        elif (self._safe_fallback_at is not None and not self._safe_held
              and time.monotonic() >= self._safe_fallback_at):
            self.log.info("safe-gthread: no successor ready %.0fs after worker %s reached "
                          "its limit (%s): retiring without one", self._safe_handoff_wait,
                          self.pid, self._safe_reason)
            self._safe_stopped_by = "fallback"
            self.alive = False

    def _look_for_hold(self, now):
        """The arbiter says whether new workers cannot boot (HOLD): then availability
        wins over max_requests, and this worker serves on past its limit (gunicorn's own
        check reads ``max_requests``) until a successor boots again."""
        held = _schedule.held(self)
        # The loop's thread and a request's (``_handle_request_checked``) may both look:
        # one of them changes max_requests, never both from the same reading.
        with self._safe_lock:
            if held == self._safe_held:
                return
            self._safe_held = held
            if held:
                self._safe_max_requests = self.max_requests
                self.max_requests = sys.maxsize
            else:
                limit = self._safe_max_requests
                if limit is not None and self.nr < limit:
                    self.max_requests = limit
                elif self._safe_due:
                    # Past its limit: its successor comes from the queue; it waits for
                    # it as at the limit, at most the usual wait.
                    self._safe_fallback_at = now + self._safe_handoff_wait
                else:
                    self.max_requests = limit if limit is not None else self.max_requests
            self._changed()
        if held:
            self.log.info("safe-gthread: worker %s serves on past max_requests while new "
                          "workers cannot boot", self.pid)

    def _changed(self):
        """What ``_safe_next`` reads has changed: the next notify() looks."""
        self._safe_changes += 1
        self._safe_next_at = 0.0

    def _plan_retirement(self):
        """Ask for the successor once the requests left before the limit are about what
        this worker serves during a handoff, at its request rate: the moving average of
        ``LOOK_EVERY`` windows, or the last window where that is higher (a burst)."""
        left = self._safe_retire_after - self.nr
        if left <= 0:
            self._retire("max_requests", due=True)
            return
        if self._safe_lead_seconds is None:
            return  # not serving yet (a test driving notify() directly)
        now = time.monotonic()
        mark, self._safe_rate_mark = self._safe_rate_mark, (self.nr, now)
        self._safe_look_at = now + LOOK_EVERY
        if mark is None or now <= mark[1]:
            return  # the first look (at the first request) only starts the clock
        window = (self.nr - mark[0]) / (now - mark[1])
        rate = self._safe_rate = window if self._safe_rate is None else (
            RATE_WEIGHT * window + (1 - RATE_WEIGHT) * self._safe_rate)
        if left <= max(rate, window) * self._safe_lead_seconds:
            self.log.debug("safe-gthread: worker %s asks for its successor: %s requests "
                           "left at %.0f/s", self.pid, left, rate)
            self._retire("max_requests", eta=left / max(rate, 1e-3))

    def _retire(self, reason, now_=False, due=False, eta=0.0):
        """Ask the arbiter for a successor (``eta``: seconds to the limit); ``due``: at
        the limit (stop me once it is ready); ``now_``: stop accepting at once too."""
        with self._safe_lock:
            first = self._safe_reason is None
            if first:
                self._safe_reason = reason
                self._safe_requested_at = time.monotonic()
                if self._safe_hold_look_at is not None:
                    self.handle_request = self._handle_request_checked  # near its limit
            newly_due = (due or now_) and not self._safe_due
            if newly_due:
                self._safe_due = True
                self._safe_fallback_at = time.monotonic() + self._safe_handoff_wait
                # From the limit on, each response closes its connection (as gunicorn
                # 27.0.1 does at max_requests, benoitc/gunicorn#3821): by the time the
                # successor is ready, few kept-alive connections are left to be served
                # one more request each, so the requests past the limit stay few.
                shed = getattr(super(), "_stop_keeping_alive", None)
                if shed is not None:
                    shed()
            elif not first and not now_:
                return
            if now_:
                self._safe_stopped_by = "limit"
                self._safe_fallback_at = None
                self.alive = False
            self._changed()  # after the changes: a notify() computing meanwhile looks again
            kind = (_schedule.LEAVING if now_ else
                    _schedule.DUE if self._safe_due else _schedule.RETIRE)
            if not _schedule.send(self, kind, reason, eta) and self._safe_due and not now_:
                # No scheduler to hand off to: retire the stock way.
                self._safe_stopped_by = "fallback"
                self.alive = False

    def _stop_keeping_alive(self):
        # ``alive`` has just turned False (``_retire._common._WatchAlive``). At the limit,
        # gunicorn's own max_requests check did it: tell the arbiter the slot is free
        # (its successor is ready by now, or it boots into the empty slot, as stock).
        parent = getattr(super(), "_stop_keeping_alive", None)
        if parent is not None:
            parent()
        if (self._safe_retire_after is not None and self._safe_stopped_by is None
                and self.nr >= self.max_requests):
            self._safe_stopped_by = "max_requests"
            if self._safe_reason is None:  # reached it between two looks
                self._safe_reason = "max_requests"
                self._safe_requested_at = time.monotonic()
            _schedule.send(self, _schedule.LEAVING, self._safe_reason)

    def _handle_request_checked(self, *args, **kwargs):
        # Bound as the worker's handle_request only while there is something to check
        # before a request (gunicorn's own runs otherwise, with nothing added):
        # - the worker has asked for its successor: the request that would reach its
        #   limit first looks whether the arbiter has just said HOLD (new workers cannot
        #   boot, or a HUP's are booting), rather than stop in the 50 ms before the next
        #   periodic look;
        # - max_worker_memory is on: the limit is checked before every request, since a
        #   sampler thread that wakes late (a CPU-starved machine, a busy GIL) would let a
        #   fast leak run past it (seen in CI: 1.27x the limit). getrusage's peak is a
        #   cheap first test; the current RSS decides (an import may have peaked above
        #   the limit at boot).
        if (self._safe_hold_look_at is not None and not self._safe_held
                and self.nr + 1 >= self.max_requests):
            self._look_for_hold(time.monotonic())
        limit = self._safe_memory_limit
        if limit and self.alive and peak_rss() >= PEAK_RSS_SHARE * limit:
            rss = read_rss()
            if rss is not None and rss >= limit:
                self._stop_at_memory_limit(rss, None, limit)
        return super().handle_request(*args, **kwargs)

    def _stop_at_memory_limit(self, rss, growth, limit):
        """``growth``: since the sampler's last reading, or None from the request path."""
        self.log.info("safe-gthread: worker %s at %s%s, max_worker_memory %s: it stops "
                      "accepting now", self.pid, fmt_mib(rss),
                      "" if growth is None else " (+%s since the last sample)" % fmt_mib(growth),
                      fmt_mib(limit))
        self._retire("max_worker_memory", now_=True)

    def _start_memory_sampler(self):
        settings = self._safe_settings
        limit = settings.max_worker_memory if settings else 0
        if not limit:
            return
        rss = read_rss()
        if rss is None:
            self.log.warning("safe-gthread: cannot read this process's RSS "
                             "(/proc/self/statm): max_worker_memory is off")
            return
        if rss >= limit:
            self.log.error("safe-gthread: max_worker_memory (%s) is below worker %s's RSS "
                           "right after boot (%s): the limit is off for it",
                           fmt_mib(limit), self.pid, fmt_mib(rss))
            return
        self._safe_memory_limit = limit
        self.handle_request = self._handle_request_checked
        stop = self._safe_sampler = threading.Event()
        thread = threading.Thread(target=self._sample_memory, args=(stop, limit),
                                  name="safe-gthread-rss")
        thread.daemon = True
        thread.start()

    def _sample_memory(self, stop, limit):
        soft = int(limit * MEMORY_SOFT_SHARE)
        close = int(limit * MEMORY_CLOSE_SHARE)
        interval, previous = MEMORY_SAMPLE_INTERVAL, None
        while not stop.wait(interval):
            if not self.alive:
                return  # stopping anyway: nothing more to decide
            rss = read_rss()
            if rss is None:
                continue
            # Growth since the last sample: a worker that would cross the limit before
            # the next two samples stops now (a fast leak), not once it is over.
            growth = 0 if previous is None else max(rss - previous, 0)
            previous = rss
            if rss >= limit or (rss >= soft and rss + 2 * growth >= limit):
                self._stop_at_memory_limit(rss, growth, limit)
                return
            if rss >= soft and self._safe_reason is None:
                self._retire("max_worker_memory", due=True)
            interval = MEMORY_CLOSE_INTERVAL if rss >= close else MEMORY_SAMPLE_INTERVAL

    # -- visibility --------------------------------------------------------------------
    def _log_retirement(self):
        reason = self._safe_reason
        if reason is None:
            return  # stopped by the arbiter (HUP, TTOU, TERM): not a retirement of ours
        now = time.monotonic()
        drain_started = self._safe_drain_started
        requested = self._safe_requested_at
        wait = (None if drain_started is None or requested is None
                else max(drain_started - requested, 0.0))
        drain = None if drain_started is None else now - drain_started
        how = {"fallback": "no successor ready in time",
               "max_requests": "stopped at its limit (%d)" % self.max_requests,
               "limit": "stopped at once at the limit"}.get(self._safe_stopped_by,
                                                            "successor ready")
        self.log.info(
            "Worker retired (pid: %s, reason: %s): %s requests, RSS %s, age %.1fs, "
            "%s after %s, drained in %s",
            self.pid, reason, self.nr, fmt_mib(read_rss()), now - self._safe_born, how,
            "n/a" if wait is None else "%.2fs" % wait,
            "n/a" if drain is None else "%.2fs" % drain)
        if getattr(self.cfg, "statsd_host", None):
            # gunicorn's statsd logger sends a metric for any log call that carries one,
            # and logs nothing when the message is empty; timers go out as "|ms".
            self.log.info("", extra={"metric": "safe_gthread.retirements.%s" % reason,
                                     "value": 1, "mtype": "counter"})
            for name, seconds in (("handoff_wait", wait), ("drain", drain)):
                if seconds is not None:
                    # Whole milliseconds, rounded up: gunicorn drops a metric whose value
                    # is 0 (``if metric and value and typ``).
                    self.log.info("", extra={"metric": "safe_gthread.%s" % name,
                                             "value": max(int(math.ceil(seconds * 1000)), 1),
                                             "mtype": _compat.STATSD_TIMER_TYPE})
