"""The arbiter schedules retirements, and keeps its count of workers right while it does.

End to end, against real gunicorn: a worker that must retire keeps serving until its
successor is ready, so serving processes never drop below ``workers`` and never exceed
``workers + max_retiring``; the stock worker is the control (it drops below ``workers``
for every restart of a slow-booting app). In process: the scheduler's bookkeeping
(messages, pid reuse, the discounted view, max_retiring queueing, HUP).
"""
import os
import re
import signal
import threading
import time

import pytest

from safe_gthread import _mold, _patch, _schedule, _worker
from safe_gthread.check import load as _load, procs as _procs
from versions import STOCK_WORKERS_UNLINK


# -- in process: the bookkeeping ---------------------------------------------------------
class FakeWorker(object):
    def __init__(self, age):
        self.age = age


class FakeArbiter(object):
    def __init__(self, workers=3):
        self.num_workers = workers
        self.worker_age = 0
        self.WORKERS = {}
        self.cfg = None  # no statsd_host
        for _ in range(workers):
            self.spawn_worker()

    def kill_worker(self, pid, sig):
        raise AssertionError("the kills fixture replaces this")

    def spawn_worker(self):
        self.worker_age += 1
        pid = 1000 + self.worker_age
        self.WORKERS[pid] = FakeWorker(self.worker_age)
        return pid


def retire(pid, age, kind=_schedule.DUE, reason=1, eta=0.0):
    return (kind, reason, pid, age, eta)


def ready(pid, age):
    return (_schedule.READY, 0, pid, age, 0.0)


@pytest.fixture
def kills(monkeypatch):
    """What the scheduler stopped, through gunicorn's ``kill_worker`` (never os.kill)."""
    sent = []
    monkeypatch.setattr(FakeArbiter, "kill_worker",
                        lambda self, pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(_schedule.os, "kill", lambda pid, sig: pytest.fail("os.kill"))
    return sent


class Clock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_one_retirement_in_flight_spawns_one_successor_and_terms_on_ready(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1), retire(1002, 2)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    assert sorted(arbiter.WORKERS) == [1001, 1002, 1003, 1004]  # workers + max_retiring
    assert list(scheduler.queue) == [1002] and set(scheduler.handoffs) == {1001}
    assert scheduler.discounted() == {1001}
    assert _schedule.retiring_pids() == set()  # not the installed scheduler
    assert kills == []  # the old worker keeps serving until its successor is ready
    scheduler.receive(arbiter, [ready(1004, 4)])
    assert kills == [(1001, signal.SIGTERM)]
    scheduler.spawn_successors(arbiter, max_retiring=1)
    assert len(arbiter.WORKERS) == 4  # the old one has not left yet: 1002 waits
    del arbiter.WORKERS[1001]  # reaped
    scheduler.prune(arbiter)
    scheduler.spawn_successors(arbiter, max_retiring=1)
    assert sorted(arbiter.WORKERS) == [1002, 1003, 1004, 1005]
    assert set(scheduler.handoffs) == {1002} and not scheduler.queue


def test_max_retiring_two_allows_two_in_flight(kills):
    arbiter, scheduler = FakeArbiter(4), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(pid, pid - 1000) for pid in (1001, 1002, 1003)])
    scheduler.spawn_successors(arbiter, max_retiring=2)
    assert len(arbiter.WORKERS) == 6 and list(scheduler.queue) == [1003]


def test_leaving_worker_jumps_the_queue_and_is_not_termed(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1), retire(1002, 2, kind=_schedule.LEAVING, reason=2)])
    assert list(scheduler.queue) == [1002, 1001]
    assert scheduler.queue[1002].reason == "max_worker_memory"
    scheduler.spawn_successors(arbiter, max_retiring=1)
    scheduler.receive(arbiter, [ready(1004, 4)])
    assert kills == []  # it stopped accepting already


def test_an_early_ask_waits_for_the_limit_then_terms(kills):
    """A worker asks ahead of its limit (RETIRE); its ready successor does not stop it
    before it is DUE, and the handoff time is measured for the next workers."""
    clock = Clock()
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler(clock)
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.RETIRE)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    clock.now += 0.4
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.RETIRE), ready(1004, 4)])
    assert kills == [] and scheduler.handoff_time == pytest.approx(0.4)
    clock.now += 0.1
    scheduler.prune(arbiter)
    assert kills == []
    scheduler.receive(arbiter, [retire(1001, 1), ready(1004, 4)])  # DUE now
    assert kills == [(1001, signal.SIGTERM)]
    scheduler.receive(arbiter, [retire(1001, 1), ready(1004, 4)])
    assert kills == [(1001, signal.SIGTERM)]  # once


def test_a_ready_successor_waits_about_as_long_as_the_old_worker_said(kills):
    """Asked 2 s ahead of its limit, successor ready after 1 s: the old worker serves on
    until LATE x 2 s after it asked if it does not say DUE first, then is stopped."""
    clock = Clock()
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler(clock)
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.RETIRE, eta=2.0)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    clock.now += 1.0
    scheduler.receive(arbiter, [ready(1004, 4)])
    clock.now += _schedule.LATE * 2.0 - 1.0 - 0.05
    scheduler.prune(arbiter)
    assert kills == []
    clock.now += 0.1
    scheduler.prune(arbiter)
    assert kills == [(1001, signal.SIGTERM)]


def test_a_ready_successor_waits_at_most_ready_wait_max(kills):
    clock = Clock()
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler(clock)
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.RETIRE, eta=600.0)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    scheduler.receive(arbiter, [ready(1004, 4)])
    clock.now += _schedule.READY_WAIT_MAX
    scheduler.prune(arbiter)
    assert kills == [(1001, signal.SIGTERM)]


def test_the_heartbeat_file_keeps_gunicorns_clock(tmp_path):
    """Our message is written into gunicorn's heartbeat file; the file's timestamp must
    still be what gunicorn's own notify() makes it (gunicorn >= 22: time.monotonic()),
    or the arbiter's worker timeout check is off until the next heartbeat."""
    from gunicorn.config import Config
    from gunicorn.workers.workertmp import WorkerTmp
    cfg = Config()
    cfg.set("worker_tmp_dir", str(tmp_path))
    tmp = WorkerTmp(cfg)
    try:
        tmp.notify()
        stamped = tmp.last_update()
        clock = min((time.monotonic, time.time), key=lambda c: abs(c() - stamped))
        worker = type("W", (), {"tmp": tmp, "ppid": os.getpid()})()
        with_sigchld = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        installed = _schedule.installed
        _schedule.installed = lambda: True  # as in a worker of a scheduling arbiter
        try:
            assert _schedule.send(worker, _schedule.DUE, "max_requests")
        finally:
            signal.signal(signal.SIGCHLD, with_sigchld)
            _schedule.installed = installed
            _patch.here().message = None
        assert abs(clock() - tmp.last_update()) < 5, (clock, tmp.last_update())
        assert _schedule._read({1: type("Wk", (), {"tmp": tmp, "age": 1})()}) == [
            (_schedule.DUE, 1, 1, 1, 0.0)]
    finally:
        tmp.close()


def test_the_handoff_time_is_a_moving_average(kills):
    clock = Clock()
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler(clock)
    for pid, took in ((1001, 1.0), (1002, 2.0)):
        scheduler.receive(arbiter, [retire(pid, pid - 1000)])
        scheduler.spawn_successors(arbiter, max_retiring=1)
        successor = scheduler.handoffs[pid].successor
        clock.now += took
        scheduler.receive(arbiter, [ready(successor, arbiter.WORKERS[successor].age)])
        del arbiter.WORKERS[pid]
        scheduler.prune(arbiter)
    assert scheduler.handoff_time == pytest.approx(
        _schedule.EWMA_WEIGHT * 2.0 + (1 - _schedule.EWMA_WEIGHT) * 1.0)


def test_stock_way_retirements_are_counted_and_warned_about_once_a_minute(kills, caplog):
    """Retirements that outpace one boot slot: the queued workers reach their limit and
    retire the stock way; each is counted, the WARNING names max_retiring, rate-limited."""
    clock = Clock()
    arbiter, scheduler = FakeArbiter(4), _schedule._Scheduler(clock)
    scheduler.receive(arbiter, [retire(pid, pid - 1000) for pid in (1001, 1002, 1003)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    assert list(scheduler.queue) == [1002, 1003]
    with caplog.at_level("WARNING", logger="gunicorn.error"):
        scheduler.receive(arbiter, [retire(1003, 3, kind=_schedule.LEAVING)])  # its limit
        assert list(scheduler.queue) == [1003, 1002]  # its slot is empty: first
        del arbiter.WORKERS[1002]  # the timeout fallback: left with no successor
        scheduler.prune(arbiter)
        clock.now += _schedule.WARN_EVERY
        scheduler.receive(arbiter, [retire(1004, 4)])
        del arbiter.WORKERS[1004]
        scheduler.prune(arbiter)
    assert scheduler.fallbacks == 3
    warnings = [r.getMessage() for r in caplog.records if "outpace" in r.getMessage()]
    assert len(warnings) == 2 and "max_retiring" in warnings[0], warnings


def test_a_worker_at_its_limit_counts_as_stock_way_only_before_its_successor_is_ready(kills):
    arbiter, scheduler = FakeArbiter(4), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.RETIRE),
                                retire(1002, 2, kind=_schedule.RETIRE)])
    scheduler.spawn_successors(arbiter, max_retiring=2)
    scheduler.receive(arbiter, [ready(1005, 5)])  # 1001's successor is ready
    scheduler.receive(arbiter, [retire(1001, 1, kind=_schedule.LEAVING),
                                retire(1002, 2, kind=_schedule.LEAVING)])
    assert scheduler.fallbacks == 1  # 1002: its successor 1006 still boots
    assert kills == []  # both stop by themselves


def test_a_worker_that_only_asked_and_left_is_no_fallback(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1)])
    scheduler.receive(arbiter, [retire(1002, 2, kind=_schedule.RETIRE)])  # asked early
    scheduler.spawn_successors(arbiter, max_retiring=1)
    del arbiter.WORKERS[1002]  # TTOU'd, say, before its limit: no stock-way retirement
    scheduler.prune(arbiter)
    assert scheduler.fallbacks == 0


def test_message_from_a_reused_pid_is_dropped(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    # 1001 asked, was reaped, and a newer worker got the same pid before we read it.
    arbiter.WORKERS[1001] = FakeWorker(age=9)
    scheduler.receive(arbiter, [retire(1001, 1)])
    assert not scheduler.queue
    # Queued, then reaped and reused: pruned, never discounted.
    scheduler.receive(arbiter, [retire(1002, 2)])
    arbiter.WORKERS[1002] = FakeWorker(age=10)
    scheduler.prune(arbiter)
    assert not scheduler.queue and not scheduler.discounted()


def test_successor_crash_forgets_the_pairing(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    del arbiter.WORKERS[1004]  # the successor crashed before it was ready
    scheduler.prune(arbiter)
    assert not scheduler.handoffs and not scheduler.queue  # 1001 keeps its fallback
    assert kills == []


def test_hup_forgets_pending_retirements_and_ignores_its_old_workers(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    scheduler.receive(arbiter, [retire(1001, 1)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    scheduler.forget_all(arbiter)
    assert not scheduler.handoffs and not scheduler.queue
    scheduler.receive(arbiter, [retire(1002, 2)])  # an old worker: gunicorn replaces it
    assert not scheduler.queue


def test_no_successor_while_gunicorn_has_more_workers_than_it_wants(kills):
    arbiter, scheduler = FakeArbiter(3), _schedule._Scheduler()
    arbiter.num_workers = 2  # TTOU: gunicorn TERMs the oldest next
    scheduler.receive(arbiter, [retire(1002, 2)])
    scheduler.spawn_successors(arbiter, max_retiring=1)
    assert len(arbiter.WORKERS) == 3


def test_the_view_hides_only_from_the_thread_that_made_it():
    workers = {1: FakeWorker(1), 2: FakeWorker(2), 3: FakeWorker(3)}
    view = _schedule._Discounted(workers, {2})
    assert len(view) == 2 and sorted(view) == [1, 3] and 2 in view
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(n=len(view), pids=sorted(view)))
    thread.start()
    thread.join()
    assert seen == {"n": 3, "pids": [1, 2, 3]}  # e.g. gunicorn 25+'s control socket
    del view[2]  # a reap through the view reaches the real dict
    assert sorted(workers) == [1, 3] and len(view) == 2


class ReapingDict(dict):
    """WORKERS on gunicorn <= 23, whose SIGCHLD handler reaps: a worker is removed at the
    first lookup after ``reap`` is set, as if the signal came between two bytecodes."""
    reap = None

    def __getitem__(self, pid):
        if self.reap is not None:
            pid_gone, self.reap = self.reap, None
            del self[pid_gone]
        return dict.__getitem__(self, pid)


def test_the_view_survives_a_reap_while_gunicorn_walks_it():
    # gunicorn's manage_workers: sorted(self.WORKERS.items(), key=lambda w: w[1].age);
    # murder_workers: list(self.WORKERS.items()). A reap between listing and looking up
    # raised KeyError out of the arbiter's main loop (19.6.0 soak, 1,252 restarts in).
    workers = ReapingDict({1: FakeWorker(1), 2: FakeWorker(2), 3: FakeWorker(3)})
    view = _schedule._Discounted(workers, {9})
    it = iter(view.items())
    next(it)
    workers.reap = 2
    workers[1]  # the signal handler's reap
    assert [pid for pid, _ in it] == [2, 3]  # the snapshot gunicorn iterates
    assert sorted(view.keys()) == [1, 3] and len(view.values()) == 2
    hiding = _schedule._Discounted(workers, {3})
    assert [pid for pid, _ in sorted(hiding.items())] == [1]


def test_spawn_worker_runs_with_the_real_workers():
    # A forked worker closes the heartbeat file of every sibling it finds in WORKERS.
    class Arbiter(object):
        pass
    arbiter, seen = Arbiter(), []
    real = {1: FakeWorker(1), 2: FakeWorker(2)}
    arbiter.WORKERS = _schedule._Discounted(real, {2})
    _schedule._spawn_worker(lambda self: seen.append(sorted(self.WORKERS.values(),
                                                            key=lambda w: w.age)), arbiter)
    assert [w.age for w in seen[0]] == [1, 2]
    assert isinstance(arbiter.WORKERS, _schedule._Discounted)
    assert _patch.here().siblings is None  # only during the fork


def test_lifetime_is_spread_per_worker():
    lifetimes = [_worker.lifetime_for(age, 1000) for age in range(1, 41)]
    assert all(900 <= value <= 1100 for value in lifetimes)
    assert len(set(round(value) for value in lifetimes)) > 30
    assert _worker.lifetime_for(7, 1000) == _worker.lifetime_for(7, 1000)
    assert _worker.lifetime_for(7, 0) is None


# -- end to end ----------------------------------------------------------------------------
class ProcessSampler(threading.Thread):
    """Samples the arbiter's children every 20 ms: how many there are, and how many have
    booted their app (the app's ready marker, ``SAFE_GTHREAD_APP_READY_DIR``)."""

    def __init__(self, server, ready_dir, workers=None):
        super(ProcessSampler, self).__init__()
        self.daemon = True
        self.server, self.ready_dir, self.workers = server, ready_dir, workers
        self.most = 0
        self.fewest_ready = None
        self.samples = self.short = 0  # samples, and those with fewer than workers booted
        self._halt = threading.Event()

    def ready(self):
        kids = _procs.children(self.server.proc.pid)
        return kids, [pid for pid in kids
                      if os.path.exists(os.path.join(self.ready_dir, str(pid)))]

    def run(self):
        while not self._halt.wait(0.02):
            kids, ready = self.ready()
            self.most = max(self.most, len(kids))
            self.fewest_ready = len(ready) if self.fewest_ready is None else min(
                self.fewest_ready, len(ready))
            self.samples += 1
            self.short += bool(self.workers) and len(ready) < self.workers

    @property
    def short_share(self):
        """The share of the time with fewer than ``workers`` booted workers."""
        return self.short / float(self.samples) if self.samples else 0.0

    def stop(self):
        self._halt.set()
        self.join()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_serving_workers_never_drop_below_workers(gunicorn_server, monkeypatch, tmp_path, worker):
    """A slow-booting app (0.7 s import) whose churn fits ``max_retiring``: serving
    workers never drop below ``workers``, processes never exceed ``workers +
    max_retiring``, and no worker serves past 1.25 x ``max_requests`` + jitter."""
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    monkeypatch.setenv("SAFE_GTHREAD_APP_READY_DIR", str(ready_dir))
    monkeypatch.setenv("SAFE_GTHREAD_APP_BOOT_SLEEP", "0.7")
    monkeypatch.setenv("SAFE_GTHREAD_APP_SLEEP", "0.01")
    monkeypatch.setenv("SAFE_GTHREAD_MAX_RETIRING", "3")  # room for a slow CI machine
    workers, max_requests, jitter = 3, 150, 15
    # Stock 19.6.0 loses its socket at the first restart (test_restarts.py): the guard
    # keeps it, and leaves the stock worker's restarts as they are.
    server = gunicorn_server(worker, workers=workers, threads=2, max_requests=max_requests,
                             max_requests_jitter=jitter, keepalive=5,
                             guard=worker == "stock" and STOCK_WORKERS_UNLINK)
    sampler = ProcessSampler(server, str(ready_dir), workers)
    server.wait_for(lambda: len(sampler.ready()[1]) >= workers, 30, "every worker's app")
    sampler.start()
    try:
        result = _load.run_load(server.sock_path, seconds=90, concurrency=6,
                                keepalive_share=0.5, stop=lambda: server.restarts() >= 6)
    finally:
        sampler.stop()
    print("%s: fewer than %d booted workers %.0f %% of the time" % (
        worker, workers, 100 * sampler.short_share))
    assert server.restarts() >= 6, (result.as_dict(), server.log())
    if worker == "stock":
        # The control: each restart leaves a slot empty while the successor boots.
        assert sampler.fewest_ready < workers, (sampler.fewest_ready, server.log())
        assert sampler.short_share > 0.1, (sampler.short_share, server.log())
        return
    assert result.failed == 0, (result.as_dict(), server.log())
    # Successors are ready when their predecessors stop; on a loaded CI machine a boot
    # can still come late now and then (that worker then stops at max_requests anyway:
    # 12 % of the time once in CI, where stock is short 50 - 60 % of the time).
    assert sampler.short_share <= 0.25, (sampler.short_share, server.errorlog())
    assert sampler.most <= workers + 3, (sampler.most, server.log())
    assert server.tracebacks() == 0, server.log()
    lifetimes = [int(n) for n in re.findall(r"reason: max_requests\): (\d+) requests",
                                            server.errorlog())]
    assert lifetimes, server.log()
    assert max(lifetimes) <= 1.25 * (max_requests + jitter), (lifetimes, server.errorlog())


def _worker_rss(pid):
    try:
        with open("/proc/%d/statm" % pid) as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: The triggers hold for workers forked from the mold too (docs/mold.md).
WITH_AND_WITHOUT_MOLD = pytest.mark.parametrize("mold", [
    False, pytest.param(True, marks=pytest.mark.skipif(
        _mold.unsupported() is not None, reason="the mold is refused here"))],
    ids=["", "mold"])


def _forked_from_mold(server, mold):
    """Successors forked from the mold (its DEBUG line): as many as restarts with it, none
    without."""
    forked = len(re.findall(r"worker \d+ forked from mold \d+", server.errorlog()))
    return forked >= server.restarts() if mold else forked == 0


@WITH_AND_WITHOUT_MOLD
def test_memory_limit_holds_for_a_leaking_app(gunicorn_server, monkeypatch, mold):
    limit = 96 * 1024 * 1024
    monkeypatch.setenv("SAFE_GTHREAD_APP_LEAK", str(256 * 1024))
    monkeypatch.setenv("SAFE_GTHREAD_MAX_WORKER_MEMORY", "96M")
    monkeypatch.setenv("SAFE_GTHREAD_MOLD", "1" if mold else "0")
    server = gunicorn_server("safe", workers=2, threads=4, keepalive=5, loglevel="debug")
    most, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.01):
            for pid in _procs.children(server.proc.pid):
                most[0] = max(most[0], _worker_rss(pid))

    thread = threading.Thread(target=sample)
    thread.daemon = True
    thread.start()
    try:
        result = _load.run_load(server.sock_path, seconds=90, concurrency=8, keepalive_share=0.5,
                                stop=lambda: server.restarts() >= 4)
    finally:
        stop.set()
        thread.join()
    assert server.restarts() >= 4, (result.as_dict(), server.errorlog()[-6000:])
    assert result.failed == 0, (result.as_dict(), server.log())
    print("most RSS %.1f MiB of %.0f" % (most[0] / 1048576.0, limit / 1048576.0))
    assert most[0] <= 1.25 * limit, (most[0] / 1048576.0, server.errorlog())
    assert "reason: max_worker_memory" in server.errorlog(), server.log()
    assert "max_worker_memory=96M" in server.errorlog(), server.log()
    assert _forked_from_mold(server, mold), server.errorlog()


@WITH_AND_WITHOUT_MOLD
def test_lifetime_retires_workers_without_loss(gunicorn_server, monkeypatch, mold):
    monkeypatch.setenv("SAFE_GTHREAD_MAX_WORKER_LIFETIME", "3")
    monkeypatch.setenv("SAFE_GTHREAD_MOLD", "1" if mold else "0")
    server = gunicorn_server("safe", workers=2, threads=2, keepalive=5, loglevel="debug")
    result = _load.run_load(server.sock_path, seconds=90, concurrency=4, keepalive_share=0.5,
                            stop=lambda: server.restarts() >= 3)
    assert server.restarts() >= 3, (result.as_dict(), server.log())
    assert result.failed == 0, (result.as_dict(), server.log())
    assert len(re.findall(r"reason: max_worker_lifetime", server.errorlog())) >= 2, server.log()
    assert len(server.worker_pids()) <= 3
    assert _forked_from_mold(server, mold), server.errorlog()


def test_ttou_is_not_replaced(gunicorn_server):
    server = gunicorn_server("safe", workers=3, max_requests=1000)
    server.signal(signal.SIGTTOU)
    server.wait_for(lambda: len(server.worker_pids()) == 2, 20, "a worker to go after TTOU")
    # The arbiter re-checks its workers every second: through a few of its rounds, and
    # at any sample, there must be no third worker again.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert len(server.worker_pids()) == 2, server.log()
        time.sleep(0.05)
    assert server.serves()


# -- in process: the worker's triggers -----------------------------------------------------
class FakeTmp(object):
    def notify(self):
        pass


@pytest.fixture
def worker(monkeypatch):
    import logging
    sent = []
    monkeypatch.setattr(_schedule, "send",
                        lambda worker, kind, reason="", eta=0.0: sent.append((kind, reason)) or True)
    w = _worker.Worker.__new__(_worker.Worker)
    w.alive, w.nr, w.age, w.ppid, w.tmp = True, 0, 3, os.getpid(), FakeTmp()
    if not isinstance(getattr(type(w), "pid", None), property):
        w.pid = os.getpid()  # gunicorn >= 20 sets it after fork; 19.x has a property
    w.log = logging.getLogger("gunicorn.error")
    w._safe_lock = threading.Lock()
    w._safe_retire_after, w._safe_lifetime_at, w._safe_handoff_wait = 5, None, 30.0
    w.max_requests = 5
    w._safe_reason = w._safe_fallback_at = w._safe_stopped_by = None
    w.sent = sent
    return w


def test_a_due_worker_without_a_successor_retires_itself_after_the_wait(worker, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    worker._safe_retire_after = None
    worker._safe_lifetime_at = clock.now + 5
    worker.notify()
    assert worker.sent == []
    clock.now += 5
    worker.notify()
    worker.notify()
    assert worker.sent == [(_schedule.DUE, "max_worker_lifetime")]
    clock.now += worker._safe_handoff_wait - 0.1
    worker.notify()
    assert worker.alive  # until the arbiter's TERM, or the end of the wait
    clock.now += 0.1
    worker.notify()
    assert not worker.alive and worker._safe_stopped_by == "fallback"


def test_max_requests_asks_ahead_by_the_handoff_time_at_its_rate(worker, monkeypatch):
    """100 requests a second, a 0.4 s handoff (x LEAD_FACTOR, + LEAD_SLACK): the worker
    asks about 85 requests before its limit of 300, saying when it will get there, then
    says DUE at the limit."""
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    sent = []
    monkeypatch.setattr(_schedule, "send", lambda worker, kind, reason="", eta=0.0:
                        sent.append((kind, reason, round(eta, 2), worker.nr)) or True)
    worker._safe_retire_after = 300
    worker._safe_lead_seconds = _worker.LEAD_FACTOR * 0.4 + _worker.LEAD_SLACK
    lead = 100 * worker._safe_lead_seconds
    for nr in range(1, 301):
        clock.now += 0.01
        worker.nr = nr
        worker.notify()
    (kind, reason, eta, asked_at), due = sent
    assert (kind, reason) == (_schedule.RETIRE, "max_requests")
    assert 300 - lead - 6 <= asked_at <= 300 - lead + 1, (asked_at, lead)  # looks: 5 apart
    assert eta == pytest.approx((300 - asked_at) / 100.0, abs=0.02)
    assert due[:3] == (_schedule.DUE, "max_requests", 0.0)
    assert worker.alive


def test_max_requests_looks_at_the_clock_at_most_every_look_every(worker, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    worker._safe_retire_after, worker._safe_lead_seconds = 1000, 0.5
    worker.nr = 1
    worker.notify()  # the first request starts the clock
    assert worker._safe_rate_mark == (1, clock.now)
    for nr in range(2, 50):
        worker.nr = nr
        worker.notify()  # no time has passed: no look
    assert worker._safe_rate_mark == (1, clock.now) and worker._safe_rate is None
    clock.now += _worker.LOOK_EVERY
    worker.notify()
    assert worker._safe_rate == pytest.approx(48 / _worker.LOOK_EVERY)
    assert worker.sent == []


def test_a_burst_makes_the_worker_ask_at_once(worker, monkeypatch):
    """A moving average of 100/s, then a window at 1,000/s: the lead follows the burst."""
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    worker._safe_retire_after, worker._safe_lead_seconds = 1000, 0.5
    worker._safe_rate, worker._safe_rate_mark = 100.0, (500, clock.now)
    clock.now += 0.1
    worker.nr = 600  # 1,000/s in the last window: lead 500 >= 400 left
    worker.notify()
    assert worker.sent == [(_schedule.RETIRE, "max_requests")]


def test_gunicorns_own_check_stops_the_worker_at_its_limit(worker):
    """``max_requests`` keeps its meaning: gunicorn's own check stops the worker at its
    limit; the worker tells the arbiter it is LEAVING (its slot is free)."""
    worker.nr = 5
    worker._stop_keeping_alive()  # what gunicorn's check turning alive False calls
    assert worker._safe_stopped_by == "max_requests" and worker._safe_requested_at
    assert worker.sent == [(_schedule.LEAVING, "max_requests")]
    worker.cfg = type("Cfg", (), {"statsd_host": None})()
    worker._safe_born = time.monotonic()
    worker._safe_drain_started = time.monotonic()
    worker._log_retirement()  # every figure of the line is known: no TypeError


def test_a_term_below_the_limit_is_not_the_limit(worker):
    worker.nr = 4
    worker._stop_keeping_alive()
    assert worker._safe_stopped_by is None and worker.sent == []


def test_lifetime_asks_for_a_successor(worker):
    worker._safe_retire_after = None
    worker._safe_lifetime_at = time.monotonic() - 1
    worker.notify()
    assert worker.sent == [(_schedule.DUE, "max_worker_lifetime")] and worker.alive


def test_memory_limit_stops_accepting_at_once(worker):
    worker._retire("max_worker_memory", due=True)
    worker._retire("max_worker_memory", now_=True)
    assert worker.sent == [(_schedule.DUE, "max_worker_memory"),
                           (_schedule.LEAVING, "max_worker_memory")]
    assert not worker.alive and worker._safe_stopped_by == "limit"


def test_memory_limit_is_checked_before_every_request(worker, monkeypatch):
    """The request path stops the worker at the limit, however late the sampler wakes;
    under it, or with the limit off, a request changes nothing."""
    served = []
    monkeypatch.setattr(_worker.ThreadWorker, "handle_request",
                        lambda self, *args, **kwargs: served.append(args) or "response",
                        raising=False)
    rss = {"peak": 50 << 20, "now": 50 << 20}
    monkeypatch.setattr(_worker, "peak_rss", lambda: rss["peak"])
    monkeypatch.setattr(_worker, "read_rss", lambda: rss["now"])

    # Without the limit the worker's handle_request is gunicorn's own: nothing added.
    assert _worker.Worker.handle_request is _worker.ThreadWorker.handle_request
    assert worker._handle_request_checked("req", "conn") == "response"  # limit off
    worker._safe_memory_limit = 64 << 20
    worker.handle_request = worker._handle_request_checked  # as the sampler binds it
    assert worker.handle_request("req", "conn") == "response"
    rss["peak"] = 62 << 20  # within the margin, now under the limit
    assert worker.handle_request("req", "conn") == "response"
    rss["peak"] = 80 << 20  # an import peaked above the limit, now back under it
    assert worker.handle_request("req", "conn") == "response"
    assert worker.alive and worker.sent == []
    rss["now"] = 64 << 20
    assert worker.handle_request("req", "conn") == "response"  # still served, then it stops
    assert not worker.alive and worker._safe_stopped_by == "limit"
    assert worker.sent == [(_schedule.LEAVING, "max_worker_memory")]
    assert served == [("req", "conn")] * 5


def test_peak_rss_is_at_least_the_current_rss_within_its_margin():
    leak = bytearray(32 << 20)  # grow by 32 MiB, touched: the peak follows
    leak[::4096] = b"\x01" * len(leak[::4096])
    assert _worker.peak_rss() >= _worker.PEAK_RSS_SHARE * _worker.read_rss() > 0


def test_no_scheduler_means_the_stock_way(worker, monkeypatch):
    monkeypatch.setattr(_schedule, "send", lambda worker, kind, reason="", eta=0.0: False)
    worker.nr = 5
    worker.notify()
    assert not worker.alive


def test_statsd_gets_counters_and_timers(gunicorn_server):
    import socket
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    # Read while the load runs: gunicorn sends three datagrams per request, and a socket
    # read only afterwards overflows and drops ours (seen in CI on 21.2.0).
    received, done = [], threading.Event()

    def receive():
        while not done.is_set():
            try:
                received.append(udp.recv(65536))
            except socket.timeout:
                pass
    reader = threading.Thread(target=receive)
    reader.daemon = True
    reader.start()
    try:
        server = gunicorn_server("safe", workers=2, threads=2, max_requests=20,
                                 statsd_host="127.0.0.1:%d" % udp.getsockname()[1])
        result = _load.run_load(server.sock_path, seconds=30, concurrency=4,
                                stop=lambda: server.restarts() >= 2)
        assert result.failed == 0, result.as_dict()
        seen, deadline = b"", time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                name in seen for name in (b"safe_gthread.retirements.max_requests:1|c",
                                          b"safe_gthread.handoff_wait:",
                                          b"safe_gthread.drain:")):
            time.sleep(0.1)
            seen = b"\n".join(list(received))
        seen = b"\n".join(line for line in seen.split(b"\n") if b"safe_gthread" in line)
        assert b"safe_gthread.retirements.max_requests:1|c" in seen, (
            "%d datagrams, ours: %r" % (len(received), seen[-2000:]))
        # Timers: "|ms" (gunicorn's "timer" type from 25.x or so, "histogram" before).
        assert re.search(rb"safe_gthread\.handoff_wait:[\d.]+\|ms", seen), seen[-2000:]
        assert re.search(rb"safe_gthread\.drain:[\d.]+\|ms", seen), seen[-2000:]
    finally:
        done.set()
        reader.join()
        udp.close()


def test_notify_looks_only_when_something_is_due(worker, monkeypatch):
    """The loop calls notify() every turn: between the rate looks (every LOOK_EVERY) and
    short of the limit it compares a count and a clock and returns."""
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    looks = []
    look = worker._safe_look
    monkeypatch.setattr(worker, "_safe_look", lambda: looks.append(worker.nr) or look())
    worker._safe_retire_after, worker._safe_lead_seconds = 300, 1.0
    for nr in range(1, 51):
        worker.nr = nr
        worker.notify()
    assert looks == [1]  # the first request starts the rate clock
    clock.now += _worker.LOOK_EVERY
    worker.notify()
    assert looks == [1, 50]
    worker.nr = 300
    worker.notify()
    assert looks == [1, 50, 300] and worker.sent[-1] == (_schedule.DUE, "max_requests")


def test_a_change_from_another_thread_is_never_lost(worker, monkeypatch):
    """The memory sampler (or a request's HOLD look) changes the state while the loop's
    notify() computes when to look next from the old state: the next notify() looks."""
    clock = Clock()
    monkeypatch.setattr(_worker.time, "monotonic", clock)
    worker._safe_retire_after = None
    worker._safe_lifetime_at = clock.now + 3600
    compute = worker._safe_next

    def raced():
        result = compute()  # from the state as it was
        worker._retire("max_worker_lifetime", due=True)  # another thread, meanwhile
        return result
    monkeypatch.setattr(worker, "_safe_next", raced)
    worker.notify()
    monkeypatch.setattr(worker, "_safe_next", compute)
    assert worker.sent == [(_schedule.DUE, "max_worker_lifetime")]
    clock.now += worker._safe_handoff_wait
    worker.notify()
    assert not worker.alive and worker._safe_stopped_by == "fallback"
