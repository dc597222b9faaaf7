"""Restarts lose no request under load, behind real h2o and nginx and without a proxy.

The original report's scenario (its bottle app, examples/web.py, 5 workers x 5 threads,
keep-alive 2, wrk -c200) scaled to CI: each run lasts until the server has restarted
TARGET_RESTARTS workers (at most MAX_SECONDS). The POST runs and the direct clients use the
bundled app (the report's app answers GET only).
The safe worker must lose nothing: no non-2xx, no socket error, no upstream failure in
the proxy's log, >= 50 restarts, the same socket file. On 19.x the stock gthread worker
runs in the same test as the control and must fail (19.6.0 deletes the socket; 19.9.0
drops requests sent on kept-alive connections), or the test proves nothing. With the
mold on (opt-in), the same load through h2o while the mold is killed mid-run.
"""
import os
import re
import signal
import time

import pytest

import loadkit
from loadkit import HARSH, SETTINGS, assert_control_failed, assert_lost_nothing
from safe_gthread import _mold
from versions import LOAD_CONTROL as CONTROL, STOCK_LOSES_FRESH, STOCK_WORKERS_UNLINK

PROXIES = [
    pytest.param("h2o", True, id="h2o"),
    pytest.param("nginx", True, id="nginx-keepalive"),
    pytest.param("nginx", False, id="nginx-plain"),
]


@pytest.mark.parametrize("kind,upstream_keepalive", PROXIES)
def test_wrk_through_proxy(gunicorn_server, tmp_path, kind, upstream_keepalive):
    safe = loadkit.through_proxy(gunicorn_server, tmp_path, "safe", kind, upstream_keepalive,
                                 SETTINGS)
    assert_lost_nothing(safe)
    # Without upstream keep-alive every request has a fresh connection, which 19.7+
    # loses nothing on: there the control could only pass, so it does not run.
    if CONTROL and (upstream_keepalive or STOCK_LOSES_FRESH):
        stock = loadkit.through_proxy(gunicorn_server, tmp_path, "stock", kind,
                                      upstream_keepalive, SETTINGS)
        assert_control_failed(stock)


def test_direct_keepalive_clients(gunicorn_server):
    safe = loadkit.direct(gunicorn_server, "safe", SETTINGS)
    assert_lost_nothing(safe)
    if CONTROL:
        assert_control_failed(loadkit.direct(gunicorn_server, "stock", SETTINGS))


def test_harsh_churn_through_h2o(gunicorn_server, tmp_path):
    """max_requests 64 with jitter: restarts overlap and retiring workers are never alone."""
    safe = loadkit.through_proxy(gunicorn_server, tmp_path, "safe", "h2o", True, HARSH)
    assert_lost_nothing(safe)
    if CONTROL:
        assert_control_failed(
            loadkit.through_proxy(gunicorn_server, tmp_path, "stock", "h2o", True, HARSH))


def test_post_through_nginx_keepalive(gunicorn_server, tmp_path):
    """nginx retries a failed GET on another connection but never a POST: every loss shows."""
    safe = loadkit.through_proxy(gunicorn_server, tmp_path, "safe", "nginx", True, SETTINGS,
                                 post=True)
    assert_lost_nothing(safe)
    if CONTROL:
        stock = loadkit.through_proxy(gunicorn_server, tmp_path, "stock", "nginx", True,
                                      SETTINGS, post=True)
        assert_control_failed(stock)
        if not STOCK_WORKERS_UNLINK:
            # What the POST run is for: the client itself saw the loss, not only the log.
            assert stock.non2xx > 0, stock


_MOLD_READY = re.compile(r"mold (\d+) ready")


@pytest.mark.skipif(_mold.unsupported() is not None,
                    reason="the mold is refused here: %s" % _mold.unsupported())
def test_mold_killed_under_wrk_through_h2o(gunicorn_server, tmp_path):
    """The mold (``mold=True``) under the report's load behind h2o: every restart forks
    from it, then it is killed (SIGKILL) mid-run. Workers boot the normal way until a new
    mold is ready; no request is lost either way. (No stock control: stock gunicorn has
    no mold to lose.)"""
    killed, servers = [], []

    def kill_the_mold_once(server):
        servers[:] = [server]
        molds = _MOLD_READY.findall(server.errorlog())
        if not killed and molds and server.restarts() >= 10:
            killed.append(int(molds[0]))
            os.kill(killed[0], signal.SIGKILL)

    started = time.monotonic()
    safe = loadkit.through_proxy(gunicorn_server, tmp_path, "safe", "h2o", True, SETTINGS,
                                 config=["import safe_gthread",
                                         "safe_gthread.configure(mold=True)"],
                                 during=kill_the_mold_once)
    assert killed, "the run ended before the mold was killed (%.1fs)\n%r" % (
        time.monotonic() - started, safe)
    assert_lost_nothing(safe)
    log = servers[0].errorlog()
    molds = [int(pid) for pid in _MOLD_READY.findall(log)]
    assert molds[-1] != killed[0], safe  # a new mold, ready after the kill
    errors = re.findall(r"\[ERROR\] (safe-gthread: .*)", log)
    assert len(errors) == 1 and "mold %d failed: " % killed[0] in errors[0], errors
