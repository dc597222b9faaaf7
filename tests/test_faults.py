"""No fault of ours stops gunicorn (design invariant 10, issue 18).

A test-only hook (``SAFE_GTHREAD_TEST_FAULT=<feature>:<n>``, ``safe_gthread._patch``)
makes the n-th call of one feature's arbiter handler raise, as a bug of ours would,
under ``max_requests`` churn. The feature must turn itself off with one ERROR and its
traceback, and gunicorn must go on as with the stock worker: the arbiter stays up, no
request fails, workers keep restarting. The control lets the same fault through
(``SAFE_GTHREAD_TEST_UNCONTAINED=1``): gunicorn's main loop then stops the server,
which is what every such fault did before containment.
"""
import os
import re
import time

import pytest

from safe_gthread import _patch
from safe_gthread.check import load as _load
from versions import REUSE_PORT_BINDS_IN_WORKERS

#: feature -> (its n-th call raises, server settings). The scheduler and healing are hit
#: once churn has begun (their handlers run on every turn of the arbiter's loop); the
#: guard at its first call, the bind; reuse_port's slots after the first spawns.
FAULTS = {
    "scheduler": (12, {}),
    "heal": (12, {}),
    "guard": (1, {}),
}
if REUSE_PORT_BINDS_IN_WORKERS:
    FAULTS["reuse_port"] = (6, {"tcp": True, "reuse_port": True})  # TCP only

UNHANDLED = "Unhandled exception in main loop"


def _start(gunicorn_server, monkeypatch, feature, uncontained=False):
    nth, settings = FAULTS[feature]
    monkeypatch.setenv(_patch.ENV_TEST_FAULT, "%s:%d" % (feature, nth))
    if uncontained:
        monkeypatch.setenv(_patch.ENV_TEST_UNCONTAINED, "1")
    # timeout 5: a worker that asked the turned-off scheduler for a successor retires
    # the stock way after 5 s instead of 30.
    return gunicorn_server("safe", wait=not uncontained, workers=2, threads=2,
                           max_requests=10, timeout=5, **settings)


@pytest.mark.parametrize("feature", sorted(FAULTS))
def test_a_fault_turns_the_feature_off_and_gunicorn_goes_on(gunicorn_server, monkeypatch,
                                                            feature):
    server = _start(gunicorn_server, monkeypatch, feature)
    line = "safe-gthread: %s failed and is off for this arbiter" % feature
    faulted = []

    def enough():
        if not faulted and line in server.errorlog():
            faulted.append(server.booted())
        return bool(faulted) and server.booted() >= faulted[0] + 4

    result = _load.run_load(server.address, seconds=60, concurrency=4, stop=enough)
    log = server.errorlog()
    assert faulted, ("the fault never came", result.as_dict(), server.log())
    assert server.booted() >= faulted[0] + 4, ("workers stopped restarting",
                                               result.as_dict(), server.log())
    assert server.proc.poll() is None, server.log()
    assert UNHANDLED not in log, server.log()
    assert log.count(line) == 1, server.log()
    after = log[log.index(line):].splitlines()
    assert after[1].startswith("Traceback"), server.log()
    assert "test fault in %s" % feature in log, server.log()
    # Every request, across the fault, and a run of them afterwards. Without the slots
    # reuse_port is gunicorn's own: a worker's exit resets the connections queued on
    # its listener (tcp_migrate_req = 0), and while every worker restarts at once none
    # listens, as with stock: those losses and no other.
    stock_losses = {"ECONNRESET", "ECONNREFUSED"} if feature == "reuse_port" else set()
    runs, deadline = [result], time.monotonic() + 30
    while sum(run.ok for run in runs[1:]) < 50 and time.monotonic() < deadline:
        runs.append(_load.run_load(server.address, max_requests=50, seconds=10,
                                   concurrency=2))
    for run in runs:
        assert set(run.errors) <= stock_losses, (run.as_dict(), server.log())
    assert result.ok >= 50 and sum(run.ok for run in runs[1:]) >= 50, server.log()
    assert server.proc.poll() is None and UNHANDLED not in server.errorlog()
    if feature == "heal":  # its backup link went with it
        assert not [n for n in os.listdir(server.directory) if n.endswith(".sg-backup")]


@pytest.mark.parametrize("feature", ["scheduler", "guard"])
def test_the_control_the_same_fault_uncontained_stops_gunicorn(gunicorn_server, monkeypatch,
                                                               feature):
    server = _start(gunicorn_server, monkeypatch, feature, uncontained=True)
    if feature != "guard":  # the guard's fault is at boot: there is nothing to load yet
        server.wait_for(lambda: server.booted() >= 2 or server.proc.poll() is not None, 20,
                        "workers to boot")
        _load.run_load(server.address, seconds=20, concurrency=4,
                       stop=lambda: server.proc.poll() is not None)
    server.wait_exit(20)
    log = server.errorlog() + server.log()
    assert re.search("test fault in %s" % feature, log), log
    assert not server.serves()
