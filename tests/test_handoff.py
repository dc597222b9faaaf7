"""Successor handoff: a worker retiring for max_requests gets its successor at once.

The stock worker is the control: its successor is forked only after it has exited, so
no more than ``workers`` workers are ever alive. With safe_gthread.Worker the successor
boots while the old worker drains (one extra per retirement), and nothing else changes
how many workers gunicorn keeps: TTOU still removes one, HUP still replaces them all.
"""
import re
import signal
import time

import pytest

from safe_gthread.check import load as _load
from versions import STOCK_WORKERS_UNLINK

_EVENT = re.compile(r"(Booting worker with pid|Worker exiting \(pid): (\d+)")


def most_alive_at_once(server):
    alive, most = set(), 0
    for kind, pid in _EVENT.findall(server.errorlog()):
        if kind.startswith("Booting"):
            alive.add(pid)
        else:
            alive.discard(pid)
        most = max(most, len(alive))
    return most


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_successor_boots_while_predecessor_drains(gunicorn_server, monkeypatch, worker):
    if worker == "stock" and STOCK_WORKERS_UNLINK:
        pytest.skip("stock gunicorn 19.6.0 loses its socket at the first restart "
                    "(the control of test_restarts.py)")
    # Requests that take a little while, as real ones do: on a bare hello-world app a
    # worker lives for a few milliseconds, so the worker of the other slot has often
    # already left when a draining worker's successor boots, and no overlap shows.
    monkeypatch.setenv("SAFE_GTHREAD_APP_SLEEP", "0.01")
    server = gunicorn_server(worker, workers=2, threads=2, max_requests=30, keepalive=5)
    # A few restarts first: the steady state, not the arbiter's own start-up.
    warmup = _load.run_load(server.sock_path, seconds=30, concurrency=8, keepalive_share=1.0,
                            stop=lambda: server.restarts() >= 4)
    # Idle kept-alive connections keep a retiring worker draining for a while (as a
    # proxy's upstream pool does); that is when the successor must already be there.
    idle = [_load.idle_keepalive(server.sock_path) for _ in range(4)]
    try:
        result = _load.run_load(server.sock_path, seconds=30, concurrency=8, keepalive_share=1.0,
                                stop=lambda: server.restarts() >= 20)
    finally:
        for sock in idle:
            sock.close()
    assert server.restarts() >= 20, server.log()
    assert warmup.failed == 0 or worker == "stock", (warmup.as_dict(), server.log())
    most = most_alive_at_once(server)
    if worker == "stock":
        assert most == 2, server.log()
    else:
        assert result.failed == 0, (result.as_dict(), server.log())
        # Successors overlap their predecessors, at most one extra worker per slot.
        assert 2 < most <= 4, (most, server.log())


def live_workers(server):
    return len(server.worker_pids())


def test_ttou_is_not_replaced(gunicorn_server):
    server = gunicorn_server("safe", workers=3, max_requests=1000)
    server.signal(signal.SIGTTOU)
    server.wait_for(lambda: live_workers(server) == 2, 20, "a worker to go after TTOU")
    # The arbiter re-checks its workers every second: give it a few rounds.
    time.sleep(3)
    assert live_workers(server) == 2, server.log()
    assert server.serves()
