"""Deploys that cannot hurt (issue 19): a HUP waits for ready workers, and code that
cannot boot never takes a serving site down.

End to end, against real gunicorn, with the stock worker as the control: a slow import
with HUPs under load (stock stalls for the import), broken code plus a HUP under
``max_requests`` churn (stock halts), a broken successor during churn. In process: the
arbiter's deploy state (``safe_gthread._deploy``) with a fake arbiter.
"""
import os
import signal
import threading
import time

import pytest

from safe_gthread import _deploy, _patch, _schedule, _worker
from safe_gthread.check import load as _load
from versions import STOCK_WORKERS_UNLINK

APP = "safe_gthread.check.app:app"


# -- in process: the deploy state ---------------------------------------------------------
class FakeWorker(object):
    def __init__(self, age, guarded=False):
        self.age = age
        self._safe_guarded_boot = guarded


class FakeArbiter(object):
    def __init__(self, workers=3):
        self.num_workers = workers
        self.worker_age = 0
        self.WORKERS = {}
        self.cfg = None
        self.killed = []
        for _ in range(workers):
            self.spawn_worker()

    def kill_worker(self, pid, sig):
        self.killed.append((pid, sig))

    def spawn_worker(self, guarded=False):
        self.worker_age += 1
        pid = 1000 + self.worker_age
        self.WORKERS[pid] = FakeWorker(self.worker_age, guarded)
        return pid


class Clock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def stock_guard(worker):
    """gunicorn < 19.7's stock workers delete the socket file when they stop (the bug
    this package began with): the stock control gets safe_gthread.guard, so it shows
    what these tests are about and not that."""
    return worker == "stock" and STOCK_WORKERS_UNLINK


def make(workers=3):
    clock, holds = Clock(), []
    deploy = _deploy.Deploys(clock, writer=lambda arbiter, pid, hold: holds.append((pid, hold)))
    arbiter = FakeArbiter(workers)
    for pid, worker in arbiter.WORKERS.items():
        deploy.on_ready(arbiter, pid, worker.age)
    return arbiter, deploy, clock, holds


def test_boots_are_guarded_once_something_has_served():
    deploy = _deploy.Deploys(Clock())
    assert not deploy.guards_boots()  # first start: gunicorn's own halt stays
    arbiter = FakeArbiter(2)
    deploy.on_ready(arbiter, 1001, 1)
    assert deploy.serving() and deploy.guards_boots()
    del arbiter.WORKERS[1001]
    deploy.prune(arbiter)
    # Nothing serves now, but the site did: a broken deploy retries, never halts.
    assert not deploy.serving() and deploy.guards_boots()


def test_a_failed_successor_backs_off_doubling_and_holds_every_serving_worker(caplog):
    arbiter, deploy, clock, holds = make(3)
    backoffs = []
    for attempt in range(8):
        pid = arbiter.spawn_worker(guarded=True)
        deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.SUCCESSOR, 1001)
        deploy.on_boot_failed(arbiter, pid, arbiter.WORKERS[pid].age, "RuntimeError: x")
        assert pid in deploy.hidden()  # until reaped: never counted as a serving worker
        backoffs.append(deploy.retry_at - clock.now)
        assert deploy.backing_off()
        del arbiter.WORKERS[pid]
        deploy.prune(arbiter)
        assert pid not in deploy.hidden() and deploy.failures == attempt + 1  # counted once
        clock.now = deploy.retry_at
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60]
    assert sorted(holds) == [(1001, 1), (1002, 1), (1003, 1)]  # once each
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 8 and "successor of worker 1001" in errors[0].getMessage()
    assert "RuntimeError: x" in errors[0].getMessage()
    # The next boot works: holds are released, the backoff ends.
    pid = arbiter.spawn_worker(guarded=True)
    deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.SUCCESSOR, 1001)
    deploy.on_ready(arbiter, pid, arbiter.WORKERS[pid].age)
    assert not deploy.failing() and not deploy.backing_off()
    assert sorted(holds[3:]) == [(1001, 0), (1002, 0), (1003, 0)]


def test_during_the_backoff_an_empty_slot_is_not_refilled():
    arbiter, deploy, clock, _ = make(3)
    pid = arbiter.spawn_worker(guarded=True)
    deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
    deploy.on_boot_failed(arbiter, pid, arbiter.WORKERS[pid].age, "ImportError: x")
    del arbiter.WORKERS[pid]
    deploy.prune(arbiter)
    del arbiter.WORKERS[1003]  # and a serving worker left meanwhile
    deploy.prune(arbiter)
    assert deploy.pad(arbiter, visible=2) == 1  # manage_workers sees 3: no spawn
    clock.now = deploy.retry_at
    assert deploy.pad(arbiter, visible=2) == 0  # the retry


def test_a_worker_gone_unseen_is_no_failure_but_one_not_ready_in_time_is(caplog):
    """Under fast max_requests churn a new worker can boot, serve its few requests and
    leave between two looks of the arbiter: that is no failed boot. One that is still
    not ready after gunicorn's timeout is (gunicorn kills it)."""
    arbiter, deploy, clock, _ = make(2)
    arbiter.timeout = 30
    quick = arbiter.spawn_worker(guarded=True)
    deploy.spawned(arbiter, quick, arbiter.WORKERS[quick], _deploy.SUCCESSOR, 1001)
    del arbiter.WORKERS[quick]
    deploy.prune(arbiter)
    assert not deploy.failing() and not deploy.guarded
    stuck = arbiter.spawn_worker(guarded=True)
    deploy.spawned(arbiter, stuck, arbiter.WORKERS[stuck], _deploy.SUCCESSOR, 1001)
    clock.now += 29
    deploy.prune(arbiter)
    assert not deploy.failing()
    clock.now += 2
    deploy.prune(arbiter)
    assert deploy.failing() and stuck in deploy.hidden()
    assert "no READY within gunicorn's timeout (30s)" in caplog.text


def test_the_view_pads_the_count_but_not_what_gunicorn_iterates():
    workers = {1: FakeWorker(1), 2: FakeWorker(2)}
    view = _schedule._Discounted(workers, (), pad=1)
    assert len(view) == 3 and sorted(view) == [1, 2]
    assert len(view.keys()) == 3 and sorted(view.keys()) == [1, 2]  # 19.x: len(keys())
    assert sorted(w.age for w in view.values()) == [1, 2]


def hup(arbiter, deploy, n=None):
    rec = deploy.reload_starts(arbiter, 0)
    new = []
    for _ in range(n or arbiter.num_workers):
        pid = arbiter.spawn_worker(guarded=rec is not None)
        deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
        new.append(pid)
    deploy.reload_ends()
    return rec, new


def test_a_hups_new_workers_are_hidden_until_ready():
    arbiter, deploy, _, _ = make(2)
    rec, new = hup(arbiter, deploy)
    assert deploy.hidden() == set(new)
    assert deploy.pad(arbiter, visible=2) == 2  # gunicorn spawns nothing more either
    deploy.on_ready(arbiter, new[0], arbiter.WORKERS[new[0]].age)
    assert deploy.hidden() == {new[1]}  # one counted: gunicorn TERMs one old worker
    deploy.on_ready(arbiter, new[1], arbiter.WORKERS[new[1]].age)
    assert not deploy.hidden() and not rec.failed


def test_a_failed_reload_logs_one_error_and_keeps_the_previous_generation(caplog):
    arbiter, deploy, _, holds = make(2)
    rec, new = hup(arbiter, deploy)
    for pid in new:
        deploy.on_boot_failed(arbiter, pid, arbiter.WORKERS[pid].age, "ImportError: nope")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["safe-gthread: reload failed: new workers exited with ImportError: "
                      "nope; keeping 2 workers of the previous generation (the next HUP "
                      "tries again)"]
    assert rec.failed and deploy.hidden() == set(new)  # hidden until reaped
    assert sorted(holds) == [(1001, 1), (1002, 1)]
    for pid in new:
        del arbiter.WORKERS[pid]
    deploy.prune(arbiter)
    assert not deploy.hidden() and deploy.pad(arbiter, visible=2) == 0
    # Fixed, HUP again: it works, and the holds are released.
    rec2, new2 = hup(arbiter, deploy)
    for pid in new2:
        deploy.on_ready(arbiter, pid, arbiter.WORKERS[pid].age)
    assert not rec2.failed and not deploy.failing()
    assert sorted(holds[2:]) == [(1001, 0), (1002, 0)]


def test_a_rolling_reload_boots_one_batch_at_a_time():
    arbiter, deploy, _, _ = make(4)
    rec = deploy.reload_starts(arbiter, 0, batch=1)
    spawned = []
    for _ in range(4):  # gunicorn's reload asks for 4 new workers
        if deploy.hold_spawn():
            continue
        pid = arbiter.spawn_worker(guarded=True)
        deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
        spawned.append(pid)
    deploy.reload_ends()
    assert len(spawned) == 1 and rec.pending == 3

    def spawn_worker():
        pid = FakeArbiter.spawn_worker(arbiter, guarded=True)
        deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
        spawned.append(pid)
    arbiter.spawn_worker = spawn_worker
    deploy.roll(arbiter)
    assert len(spawned) == 1  # the batch is full
    for n in range(2, 5):
        deploy.on_ready(arbiter, spawned[-1], arbiter.WORKERS[spawned[-1]].age)
        deploy.roll(arbiter)
        assert len(spawned) == n and deploy.hidden() == {spawned[-1]}
    deploy.on_ready(arbiter, spawned[-1], arbiter.WORKERS[spawned[-1]].age)
    deploy.roll(arbiter)
    assert len(spawned) == 4 and not rec.pending and not deploy.hidden()


def test_a_rolling_reload_stops_at_its_first_failure():
    arbiter, deploy, _, _ = make(4)
    rec = deploy.reload_starts(arbiter, 0, batch=2)
    for _ in range(4):
        if not deploy.hold_spawn():
            pid = arbiter.spawn_worker(guarded=True)
            deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
    deploy.reload_ends()
    first = sorted(rec.booting)[0]
    deploy.on_boot_failed(arbiter, first, arbiter.WORKERS[first].age, "ImportError: x")
    assert rec.failed and rec.pending == 0
    deploy.roll(arbiter)  # nothing more forked: the old generation keeps serving
    assert len(arbiter.WORKERS) == 6


def test_a_hup_during_a_hup_supersedes_the_booting_workers():
    arbiter, deploy, _, _ = make(2)
    _, first = hup(arbiter, deploy)
    _, second = hup(arbiter, deploy)
    assert sorted(arbiter.killed) == sorted((pid, signal.SIGTERM) for pid in first)
    assert deploy.hidden() == set(first) | set(second)
    for pid in first:
        deploy.on_ready(arbiter, pid, arbiter.WORKERS[pid].age)  # too late: ignored
        del arbiter.WORKERS[pid]
    deploy.prune(arbiter)
    assert deploy.hidden() == set(second) and not deploy.failing()


def test_a_hup_with_nothing_serving_is_gunicorns_own():
    deploy, arbiter = _deploy.Deploys(Clock()), FakeArbiter(2)
    rec, new = hup(arbiter, deploy)
    assert rec is None and not deploy.hidden()


def test_the_scheduler_turns_a_faulty_deploy_state_off(caplog):
    scheduler = _schedule._Scheduler()

    def boom(*args):
        raise ValueError("bug")
    scheduler.deploy.prune = boom
    arbiter = FakeArbiter(2)
    scheduler.prune(arbiter)  # no exception reaches gunicorn
    assert scheduler.deploy is None
    assert "deploy protection failed" in caplog.text and "ValueError: bug" in caplog.text
    scheduler.prune(arbiter)
    assert scheduler.discounted() == frozenset()


@pytest.mark.parametrize("fault", ["deploy", "scheduler"])
def test_a_fault_releases_the_held_workers(monkeypatch, fault):
    """Held past max_requests by a failed boot, then a fault of ours drops the state
    that would release them: they are released at once (gunicorn's max_requests)."""
    arbiter, deploy, _, holds = make(2)
    pid = arbiter.spawn_worker(guarded=True)
    deploy.spawned(arbiter, pid, arbiter.WORKERS[pid], _deploy.REPLACEMENT)
    deploy.on_boot_failed(arbiter, pid, arbiter.WORKERS[pid].age, "ImportError: x")
    assert sorted(holds) == [(1001, 1), (1002, 1)]
    scheduler = _schedule._Scheduler()
    scheduler.deploy = deploy
    if fault == "deploy":
        monkeypatch.setattr(deploy, "prune", lambda arbiter: 1 / 0)
        scheduler._deploy("prune", arbiter)
        assert scheduler.deploy is None
    else:
        monkeypatch.setattr(_patch.here(), "scheduler", scheduler)
        _schedule.forget()
        assert _patch.here().scheduler is None
    assert sorted(holds[2:]) == [(1001, 0), (1002, 0)] and not deploy.held


def test_the_worker_describes_a_failure_in_one_line():
    try:
        exec(compile("raise ImportError('No module named\\n x')", "web.py", "exec"))
    except ImportError as exc:
        assert _worker.describe_failure(exc) == "ImportError: No module named x (web.py:1)"


def test_boot_failure_and_hold_through_a_real_heartbeat_file(tmp_path, monkeypatch):
    """The worker's message, the cause and the arbiter's bytes share the heartbeat file."""
    from gunicorn.config import Config
    from gunicorn.workers.workertmp import WorkerTmp
    cfg = Config()
    cfg.set("worker_tmp_dir", str(tmp_path))
    tmp = WorkerTmp(cfg)
    worker = FakeWorker(7)
    worker.tmp, worker.ppid = tmp, os.getpid()
    monkeypatch.setattr(_schedule.os, "kill", lambda pid, sig: None)
    arbiter = FakeArbiter(0)
    arbiter.WORKERS[4242] = worker
    acked = []

    def arbiter_side():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            messages = _schedule._read(arbiter.WORKERS)
            if messages:
                acked.append(messages)
                _schedule._write_flag(arbiter, 4242, _schedule.ACK_OFFSET, 1)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=arbiter_side)
    thread.start()
    assert _schedule.send_boot_failure(worker, "RuntimeError: é broken", wait=5)
    thread.join()
    assert acked == [[(_schedule.BOOT_FAILED, 0, 4242, 7, "RuntimeError: é broken")]]
    assert not _schedule.held(worker)
    mtime = os.fstat(tmp.fileno()).st_mtime_ns
    _schedule._write_hold(arbiter, 4242, True)
    assert _schedule.held(worker) and os.fstat(tmp.fileno()).st_mtime_ns == mtime
    _schedule._write_hold(arbiter, 4242, False)
    assert not _schedule.held(worker)
    tmp.close()


def bare_worker():
    w = _worker.Worker.__new__(_worker.Worker)
    w._safe_lock = threading.Lock()  # made in __init__, which this worker skips
    if not isinstance(getattr(type(w), "pid", None), property):
        w.pid = os.getpid()  # gunicorn >= 20 sets it after fork; 19.x has a property
    return w


def test_a_held_worker_serves_past_max_requests(monkeypatch):
    import logging
    w = bare_worker()
    w.alive, w.nr, w.max_requests = True, 10, 12
    w.log = logging.getLogger("gunicorn.error")
    state = {"held": True}
    monkeypatch.setattr(_schedule, "held", lambda worker: state["held"])
    w._look_for_hold(0.0)
    assert w.max_requests > 10 ** 9 and w._safe_held
    w.nr = 20  # past its limit while held
    state["held"] = False
    w._safe_due, w._safe_handoff_wait = True, 30.0
    w._look_for_hold(5.0)
    assert w.max_requests > 10 ** 9 and w._safe_fallback_at == 35.0  # waits as at its limit
    w2 = bare_worker()
    w2.alive, w2.nr, w2.max_requests, w2.log = True, 3, 12, w.log
    state["held"] = True
    w2._look_for_hold(0.0)
    state["held"] = False
    w2._look_for_hold(1.0)
    assert w2.max_requests == 12  # below its limit: gunicorn's own check again


# -- end to end -----------------------------------------------------------------------------
class Load(threading.Thread):
    def __init__(self, server, concurrency=6):
        super(Load, self).__init__()
        self.daemon = True
        self.server, self.concurrency = server, concurrency
        self.halt = threading.Event()
        self.result = self.live = None

    def run(self):
        self.result = _load.run_load(self.server.address, seconds=600,
                                     concurrency=self.concurrency, keepalive_share=0.5,
                                     stop=self.halt.is_set, timeout=30.0,
                                     progress=lambda result, left: setattr(self, "live", result))

    def served(self):
        return self.live.ok if self.live is not None else 0

    def wait_served(self, more, timeout=30.0):
        """Until ``more`` requests more than now have been answered."""
        target = self.served() + more
        self.server.wait_for(lambda: self.served() >= target, timeout,
                             "%d more requests answered" % more)

    def stop(self):
        self.halt.set()
        self.join()
        return self.result


def assert_stock_halts(server):
    """The control: stock gunicorn halts ("Worker failed to boot" / "App failed to load")."""
    server.wait_for(lambda: not arbiter_alive(server), 30, "stock gunicorn to halt")
    assert server.proc.returncode != 0


def arbiter_alive(server):
    return server.proc.poll() is None


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_hup_with_a_slow_import_under_load(gunicorn_server, monkeypatch, worker):
    """A 2 s import, three HUPs under load: stock TERMs the old workers at once and every
    request waits for the import (the control); the new workers here take over once
    ready, so no request waits anywhere near that long. Nothing fails either way."""
    boot = 2.0
    monkeypatch.setenv("SAFE_GTHREAD_APP_BOOT_SLEEP", str(boot))
    server = gunicorn_server(worker, workers=2, threads=4, timeout=30, graceful_timeout=30,
                             guard=stock_guard(worker))
    load = Load(server)
    load.start()
    try:
        for _ in range(3):
            load.wait_served(100)
            old = set(server.worker_pids())
            booted = server.booted()
            server.signal(signal.SIGHUP)
            server.wait_for(lambda: server.booted() >= booted + 2, 30, "new workers")
            server.wait_for(lambda: not old.intersection(server.worker_pids()), 30,
                            "the old workers to leave")
            server.wait_for(server._workers_listen_to_signals, 30, "signal handlers")
            server.wait_for(lambda: len(server.worker_pids()) == 2, 30, "two workers")
        load.wait_served(100)
    finally:
        result = load.stop()
    print("%s: %d requests, %d failed, slowest %.3fs" % (worker, result.requests,
                                                          result.failed, result.max_latency))
    assert result.failed == 0 or worker == "stock", result.as_dict()
    if worker == "stock":
        assert result.max_latency >= 0.75 * boot, result.as_dict()  # the stall
    else:
        assert result.max_latency < 0.4 * boot, (result.max_latency, server.log())
        assert server.errorlog().count("reload: 2 new workers ready") == 3


def break_app(tmp_path, monkeypatch):
    """An app whose import fails while a file exists, with churn a successor's boot can
    keep up with: 10 ms a request, 2 x 4 threads, a worker lives ~1 s."""
    marker = str(tmp_path / "broken")
    monkeypatch.setenv("SAFE_GTHREAD_APP_FAIL_IF_EXISTS", marker)
    monkeypatch.setenv("SAFE_GTHREAD_APP_SLEEP", "0.01")
    return lambda: open(marker, "w").close(), lambda: os.remove(marker)


CHURN = dict(workers=2, threads=4, max_requests=300, max_requests_jitter=30)


def imported_workers(tmp_path, monkeypatch):
    """A function of a server: its workers alive now that imported the app (the app's
    ready marker), as opposed to a boot that failed or is still importing."""
    ready_dir = tmp_path / "imported"
    ready_dir.mkdir()
    monkeypatch.setenv("SAFE_GTHREAD_APP_READY_DIR", str(ready_dir))
    return lambda server: {pid for pid in server.worker_pids()
                           if (ready_dir / str(pid)).exists()}


def wait_steady(server, read, seconds, timeout, what):
    """``read()`` once it has returned the same value for ``seconds``."""
    last = [None, time.monotonic()]

    def steady():
        value = read()
        if value != last[0]:
            last[:] = [value, time.monotonic()]
        return time.monotonic() - last[1] >= seconds

    server.wait_for(steady, timeout, what)
    return last[0]


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_an_empty_slot_while_the_code_is_broken_is_retried_with_the_backoff(
        gunicorn_server, monkeypatch, tmp_path, worker):
    """The code on disk breaks, then a worker leaves (TERM): its replacement cannot
    import. Stock halts (the control). Here the other worker serves on, and the slot is
    retried after 1, 2, 4 ... s, not refilled at once in a loop of failing boots (what
    gunicorn 19.x did here before the fix: it counts ``len(WORKERS.keys())``)."""
    breaks, _ = break_app(tmp_path, monkeypatch)
    serving = imported_workers(tmp_path, monkeypatch)
    server = gunicorn_server(worker, guard=stock_guard(worker), workers=2, threads=4)
    load = Load(server)
    load.start()
    try:
        load.wait_served(100)
        server.wait_for(lambda: len(serving(server)) == 2, 30, "both workers to import")
        breaks()
        leaving, staying = sorted(serving(server))
        os.kill(leaving, signal.SIGTERM)
        if worker == "stock":
            assert_stock_halts(server)
            assert load.stop().failed > 0
            return
        server.wait_for(lambda: "cannot boot" in server.errorlog(), 30, "the first attempt")
        served = load.served()
        time.sleep(5)  # attempts due 1 s and 3 s after the first
        attempts = server.errorlog().count("cannot boot")
        assert attempts <= 4, server.log()
        assert load.served() > served and serving(server) == {staying}, server.log()
        assert arbiter_alive(server), server.log()
    finally:
        result = load.stop()
    assert result.failed == 0, result.as_dict()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_broken_code_and_hup_under_churn(gunicorn_server, monkeypatch, tmp_path, worker):
    """The code on disk stops importing while the server runs with max_requests churn,
    then a HUP: stock halts ("Worker failed to boot" / "App failed to load") and every
    request fails (the control). Here the previous workers keep serving past their
    max_requests, with no failed request and one ERROR; once the code is fixed, a HUP
    brings the new generation and no worker of the old one is left."""
    breaks, fixes = break_app(tmp_path, monkeypatch)
    serving = imported_workers(tmp_path, monkeypatch)
    server = gunicorn_server(worker, guard=stock_guard(worker), **CHURN)
    load = Load(server)
    load.start()
    try:
        server.wait_for(lambda: server.restarts() >= 2, 30, "max_requests churn")
        breaks()
        server.signal(signal.SIGHUP)
        if worker == "stock":
            assert_stock_halts(server)
            assert load.stop().failed > 0
            return
        server.wait_for(lambda: "reload failed" in server.errorlog(), 30, "the ERROR")
        # The workers that imported the app, once none has come or gone for a second: a
        # worker that reached its max_requests just before the HUP held everyone may
        # still leave, and its slot is then retried with the backoff (a failing attempt
        # is alive now and then, and never imports).
        old = wait_steady(server, lambda: serving(server), 1.0, 30, "the previous workers")
        attempts = server.errorlog().count("cannot boot")
        more = _load.run_load(server.address, max_requests=600, seconds=30, concurrency=4)
        assert more.failed == 0 and more.requests >= 600, server.log()  # past the limits
        assert serving(server) == old and arbiter_alive(server), server.log()
        assert server.errorlog().count("cannot boot") - attempts <= 6, server.log()  # backoff
        fixes()
        server.signal(signal.SIGHUP)
        server.wait_for(lambda: not old.intersection(server.worker_pids()), 30,
                        "the previous generation to leave after the fixed HUP")
        server.wait_for(lambda: len(server.worker_pids()) == 2, 30, "two new workers")
        server.wait_for(lambda: server.restarts() >= 2 + 4, 30, "churn again")
    finally:
        result = load.stop()
    log = server.errorlog()
    assert result.failed == 0, result.as_dict()
    assert log.count("reload failed") == 1, log
    assert "Worker failed to boot" not in log and "App failed to load" not in log
    assert "RuntimeError: broken deploy" in log


#: A post_worker_init hook that fails while the app's break marker exists: a boot that
#: fails after the app has loaded (gunicorn exits such a worker with 3 and halts too).
FAILING_HOOK = (
    "import os",
    "def post_worker_init(worker):",
    "    marker = os.environ.get('SAFE_GTHREAD_APP_FAIL_IF_EXISTS')",
    "    if marker and os.path.exists(marker + '.hook'):",
    "        raise RuntimeError('broken deploy: post_worker_init')",
)


@pytest.mark.parametrize("where", ["import", "post_worker_init"])
@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_broken_successor_during_churn(gunicorn_server, monkeypatch, tmp_path, worker, where):
    """No HUP: the code on disk breaks while max_requests churns (the app's import, or a
    post_worker_init hook). Stock halts at the first replacement; here the old workers
    keep serving (backoff, ERRORs with the cause), then the fix boots the successors
    again."""
    breaks, fixes = break_app(tmp_path, monkeypatch)
    if where == "post_worker_init":
        marker = os.environ["SAFE_GTHREAD_APP_FAIL_IF_EXISTS"] + ".hook"
        breaks = lambda: open(marker, "w").close()  # noqa: E731
        fixes = lambda: os.remove(marker)  # noqa: E731
    server = gunicorn_server(worker, guard=stock_guard(worker), config=FAILING_HOOK,
                             **CHURN)
    load = Load(server)
    load.start()
    try:
        server.wait_for(lambda: server.restarts() >= 2, 30, "max_requests churn")
        breaks()
        if worker == "stock":
            assert_stock_halts(server)
            return
        server.wait_for(lambda: server.errorlog().count("cannot boot") >= 2, 30,
                        "two failed attempts")
        assert arbiter_alive(server)
        booted = server.booted()
        fixes()
        server.wait_for(lambda: server.booted() >= booted + 3, 90, "successors again")
        server.wait_for(lambda: "boot again after" in server.errorlog(), 30, "recovery")
    finally:
        result = load.stop()
    log = server.errorlog()
    if worker == "stock":
        assert result.failed > 0
        return
    assert result.failed == 0, result.as_dict()
    assert "RuntimeError: broken deploy" in log and "Worker failed to boot" not in log
    assert "serves on past max_requests" in log, log
    if where == "post_worker_init":
        assert "cannot boot: RuntimeError: broken deploy: post_worker_init" in log, log


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_a_config_file_that_fails_to_load_on_hup(gunicorn_server, worker):
    """Stock gunicorn (19.6.0 - 27.0.1) exits with status 1 inside the reload and leaves
    its workers orphaned: the site is down (the control). Here the running configuration
    and workers stay, with one ERROR; the fixed file's HUP then reloads."""
    server = gunicorn_server(worker, guard=worker == "stock")
    with open(server.config_path) as fh:
        good = fh.read()
    with open(server.config_path, "a") as fh:
        fh.write("this is not python\n")
    old = set(server.worker_pids())
    server.signal(signal.SIGHUP)
    if worker == "stock":
        server.wait_for(lambda: not arbiter_alive(server), 30, "stock gunicorn to exit")
        assert server.proc.returncode != 0
        return
    server.wait_for(lambda: "the configuration did not load" in server.errorlog(), 30,
                    "the ERROR")
    assert arbiter_alive(server) and server.serves() and set(server.worker_pids()) == old
    with open(server.config_path, "w") as fh:
        fh.write(good)
    server.reload()
    assert not old.intersection(server.worker_pids()) and server.serves()
    assert server.errorlog().count("reload failed") == 1


@pytest.mark.parametrize("batch", [0, 1])
def test_reload_batch_bounds_the_workers_booting_at_once(gunicorn_server, monkeypatch,
                                                         tmp_path, batch):
    """reload_batch = 1: a HUP boots one new worker at a time, and every old one is
    replaced all the same; the default (0, the control) boots all four at once."""
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    monkeypatch.setenv("SAFE_GTHREAD_APP_READY_DIR", str(ready_dir))
    monkeypatch.setenv("SAFE_GTHREAD_APP_BOOT_SLEEP", "0.5")
    monkeypatch.setenv("SAFE_GTHREAD_RELOAD_BATCH", str(batch))
    server = gunicorn_server("safe", workers=4, threads=2)
    old = set(server.worker_pids())
    server.wait_for(lambda: all((ready_dir / str(pid)).exists() for pid in old), 30,
                    "the first workers to finish booting")
    most, halt = [0], threading.Event()

    def sample():
        from safe_gthread.check import procs
        while not halt.wait(0.02):
            kids = procs.children(server.proc.pid)
            booting = [pid for pid in kids if not (ready_dir / str(pid)).exists()]
            most[0] = max(most[0], len(booting))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        server.reload(timeout=60)
    finally:
        halt.set()
        sampler.join()
    assert not old.intersection(server.worker_pids()) and len(server.worker_pids()) == 4
    assert server.serves()
    if batch:
        assert most[0] <= batch, server.log()
    else:
        assert most[0] >= 3  # all at once (a sample may miss one)
