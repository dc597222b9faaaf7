"""The arbiter extension (``safe_gthread._arbiter``): one table of the gunicorn callables
we touch, each wrapped once, the features' handlers in a stated order, each contained.

In-process, on this gunicorn's own classes and on throwaway rows; the end-to-end fault
tests (a fault of ours never stops a real gunicorn) are in tests/test_faults.py.
"""
import logging

import pytest

from safe_gthread import _arbiter, _patch, _reuseport, _schedule, guard
from test_patch import contained  # noqa: F401 (a fixture: a clean fault state)


@pytest.fixture
def everything():
    """Every feature installed, as ``safe_gthread.Worker.setup()`` does."""
    installed = set(_arbiter._enabled)
    guard.install()
    _schedule.install()
    _reuseport.install()
    yield
    added = set(_arbiter._enabled) - installed
    if "scheduler" in added:
        _schedule.uninstall()
    if "reuse_port" in added:
        _reuseport.uninstall()
    if added & set(guard.FEATURES):
        guard.uninstall()


def test_every_callable_is_wrapped_once(everything):
    rows = _arbiter.table()
    assert len(set((id(owner), name) for owner, name, _ in rows)) == len(rows)
    assert _arbiter.enabled("guard") and _arbiter.enabled("heal") and _arbiter.enabled("scheduler")
    checked = 0
    for owner, name, handlers in rows:
        current = _patch._raw(owner, name)[0]
        layer = getattr(current, "_safe_gthread_layer", None)
        if not any(_arbiter.enabled(entry[0]) for entry in handlers):
            continue
        assert layer is not None, (owner, name)
        # One layer: under it is gunicorn's own callable, not another of ours.
        assert not hasattr(current.__wrapped__, "_safe_gthread_layer"), (owner, name)
        checked += 1
    assert checked >= 9  # the guard's, heal's and the scheduler's rows on every gunicorn


def test_19_6_0s_close_is_the_one_uncontained_handler():
    from safe_gthread import _compat
    uncontained = [(owner.__name__, name) for owner, name, handlers in _arbiter.table()
                   for entry in handlers if _arbiter.UNCONTAINED in entry[2:]]
    assert uncontained == ([("UnixSocket", "close")] if _compat.UNIX_CLOSE_UNLINKS else [])


def test_the_stated_order():
    rows = dict(((owner.__name__, name), [entry[0] for entry in handlers])
                for owner, name, handlers in _arbiter.table())
    assert rows["Arbiter", "manage_workers"] == ["reuse_port", "scheduler", "mold", "heal"]
    assert rows["Arbiter", "spawn_worker"] == ["reuse_port", "scheduler", "mold"]
    assert rows["Arbiter", "stop"] == ["mold", "heal"]
    assert rows["Arbiter", "reload"] == ["scheduler", "guard"]


def _row(log, fail=None):
    def handler(feature):
        def run(original, *args, **kwargs):
            log.append(feature)
            if feature == fail:
                raise RuntimeError("a bug of ours in %s" % feature)
            return original(*args, **kwargs)
        return run
    return [("guard", handler("guard")), ("scheduler", handler("scheduler")),
            ("heal", handler("heal"))]


def test_the_handlers_run_outermost_first(contained, monkeypatch):
    monkeypatch.setattr(_arbiter, "_enabled", {"guard", "scheduler", "heal"})
    log = []
    dispatch = _arbiter._dispatcher(_row(log))
    assert dispatch(lambda value: log.append("gunicorn") or value, 7) == 7
    assert log == ["guard", "scheduler", "heal", "gunicorn"]
    assert contained() == []


def test_a_feature_that_is_off_is_skipped(contained, monkeypatch):
    monkeypatch.setattr(_arbiter, "_enabled", {"guard", "heal"})
    log = []
    _arbiter._dispatcher(_row(log))(lambda: log.append("gunicorn"))
    assert log == ["guard", "heal", "gunicorn"]


def test_a_fault_turns_off_its_feature_only(contained, monkeypatch):
    """The scheduler's handler raises: one ERROR with the traceback, the scheduler off;
    the guard and heal handlers and gunicorn's own still run, then and afterwards."""
    monkeypatch.setattr(_arbiter, "_enabled", {"guard", "scheduler", "heal"})
    log = []
    dispatch = _arbiter._dispatcher(_row(log, fail="scheduler"))
    assert dispatch(lambda: log.append("gunicorn") or "done") == "done"
    assert log == ["guard", "scheduler", "heal", "gunicorn"]
    del log[:]
    assert dispatch(lambda: log.append("gunicorn") or "done") == "done"
    assert log == ["guard", "heal", "gunicorn"]
    errors = contained()
    assert len(errors) == 1 and "scheduler failed" in errors[0].getMessage()
    assert "a bug of ours in scheduler" in str(errors[0].exc_info[1])
    assert _patch.feature_disabled("scheduler") and not _patch.feature_disabled("guard")


def test_an_all_or_nothing_feature_needs_every_target(contained, monkeypatch, caplog):
    """A gunicorn without one of the scheduler's targets keeps its own behaviour for all
    of them, said in one WARNING; what the guard recognises stays guarded."""
    class Arbiter(object):
        def manage_workers(self):
            return "managed"

    def table():
        return [(Arbiter, "manage_workers", [("scheduler", _schedule._manage_workers)]),
                (Arbiter, "spawn_worker", [("scheduler", _schedule._spawn_worker)])]
    monkeypatch.setattr(_arbiter, "table", table)
    monkeypatch.setattr(_arbiter, "_enabled", set())
    caplog.set_level(logging.WARNING, logger="gunicorn.error")
    assert _arbiter.install(["scheduler"]) == []
    assert not _arbiter.enabled("scheduler")
    assert not _patch.is_wrapped(Arbiter, "manage_workers")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "Arbiter.spawn_worker" in warned[0], warned


def test_install_and_uninstall_are_idempotent(monkeypatch):
    class Arbiter(object):
        def stop(self):
            return "stopped"
    stop = Arbiter.stop
    monkeypatch.setattr(_arbiter, "table", lambda: [
        (Arbiter, "stop", [("heal", lambda original, self: ("healed", original(self)))])])
    monkeypatch.setattr(_arbiter, "_enabled", set())
    assert _arbiter.install(["heal"]) == ["heal"]
    assert _arbiter.install(["heal"]) == []
    assert Arbiter().stop() == ("healed", "stopped")
    assert _arbiter.uninstall(["heal"]) is True
    assert _arbiter.uninstall(["heal"]) is False
    assert Arbiter.stop is stop


def test_a_forked_child_starts_with_its_own_state(everything):
    """Per-process state: a child forked from the arbiter sees none of its scheduler or
    slots as its own, only as its parent's at the fork."""
    from test_heal import in_forked_child
    mine = _patch.here()
    assert mine.scheduler is not None

    def in_child():
        here = _patch.here()
        return (here is not mine and here.scheduler is None and here.slots == []
                and here.parent is mine)
    assert in_forked_child(in_child)
    assert _patch.here() is mine


def test_an_uncontained_handler_runs_after_its_features_fault(contained, monkeypatch):
    """gunicorn 19.6.0's own UnixSocket.close unlinks the socket in every restarting
    worker: the guard's handler for it never turns into a pass-through."""
    monkeypatch.setattr(_arbiter, "_enabled", {"guard"})
    with _patch.contain("guard"):
        raise RuntimeError("a fault elsewhere in the guard")
    log = []
    row = [("guard", lambda original: log.append("guard") or "kept", _arbiter.UNCONTAINED)]
    assert _arbiter._dispatcher(row)(lambda: log.append("unlinked")) == "kept"
    assert log == ["guard"]


def test_a_scheduler_fault_forgets_its_state(everything, monkeypatch, caplog):
    """After a fault the scheduler's state is gone: new workers' boots are not guarded
    (gunicorn's own halt), and no hint reaches reuse_port."""
    mine = _patch.here()
    assert mine.scheduler is not None
    monkeypatch.setattr(mine, "off", set())
    monkeypatch.setattr(mine, "scheduler", mine.scheduler)  # back for the next tests
    caplog.set_level(logging.ERROR, logger="gunicorn.error")
    with _patch.contain("scheduler"):
        raise RuntimeError("a bug of ours")
    assert _patch.here().scheduler is None
    assert not _schedule.serving() and _schedule.retiring_pids() == set()
    assert not _schedule.installed()


def test_a_feature_turned_off_during_a_call_is_skipped_in_it(contained, monkeypatch):
    monkeypatch.setattr(_arbiter, "_enabled", {"guard", "heal"})
    log = []

    def outer(original):
        log.append("guard")
        with _patch.contain("heal"):
            raise RuntimeError("heal's fault, in code the guard called")
        return original()
    row = [("guard", outer), ("heal", lambda original: log.append("heal") or original())]
    _arbiter._dispatcher(row)(lambda: log.append("gunicorn"))
    assert log == ["guard", "gunicorn"]
