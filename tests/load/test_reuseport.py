"""reuse_port on TCP: restarts lose nothing queued on a retiring worker's listener.

From gunicorn 24.0 each worker binds its own SO_REUSEPORT listener; when a stock worker
retires its listener closes and the kernel resets every connection queued on it, unless
``net.ipv4.tcp_migrate_req = 1``. The runs here force that sysctl (per network
namespace, restored afterwards even on failure):

- ``tcp_migrate_req = 0`` (the kernel default): the stock worker is the control and must
  fail requests; the safe worker (the arbiter keeps one listener per worker slot) must
  fail none, and keep exactly ``workers`` listeners in the group.
- ``tcp_migrate_req = 1``: the kernel moves a closing listener's queue to another
  listener of the group. The safe worker fails none. Stock is not run there (it would
  assert nothing): on this machine (Linux 6.18) stock 27.0.1 still failed
  hundreds to thousands of requests per run with the sysctl on (while the same kernel
  migrates a plain socket pair's queue: accepted 40 of 40 after the close), and
  24.x - 27.0.0 also lose kept-alive connections on retirement (test_load_restarts.py).

On gunicorn < 24 the arbiter binds the one listener: the safe worker must lose nothing
and there is no listener loss for a control to show.
"""
import os

import pytest

import loadkit
from loadkit import SETTINGS, assert_control_failed, assert_lost_nothing, run_wrk, stop_condition
from safe_gthread.check.proxy import Proxy
from versions import GUNICORN, HAS_REUSE_PORT, REUSE_PORT_BINDS_IN_WORKERS
from conftest import require_tool

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

pytestmark = pytest.mark.skipif(not HAS_REUSE_PORT,
                                reason="gunicorn %s has no reuse_port setting" % (GUNICORN,))

PROXIES = [
    pytest.param("h2o", True, id="h2o"),
    pytest.param("nginx", True, id="nginx-keepalive"),
    pytest.param("nginx", False, id="nginx-plain"),
]


def _cannot(reason):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def migrate_req():
    """``migrate_req(0 or 1)`` sets net.ipv4.tcp_migrate_req for this test; the value it
    had is written back when the test ends, passed or not."""
    try:
        with open(MIGRATE_REQ) as fh:
            saved = fh.read().strip()
    except OSError as exc:
        _cannot("net.ipv4.tcp_migrate_req cannot be read here (Linux < 5.14?): %s" % exc)
    changed = []

    def force(value):
        try:
            with open(MIGRATE_REQ, "w") as fh:
                fh.write("%d\n" % value)
        except OSError as exc:
            _cannot("net.ipv4.tcp_migrate_req cannot be set here (not root, or a read-only "
                    "/proc/sys in this network namespace): %s" % exc)
        changed.append(value)
        with open(MIGRATE_REQ) as fh:
            assert fh.read().strip() == str(value)

    yield force
    if changed:
        with open(MIGRATE_REQ, "w") as fh:
            fh.write(saved + "\n")


def run(gunicorn_server, tmp_path, worker, kind, upstream_keepalive, settings=SETTINGS):
    """One run: gunicorn on 127.0.0.1 with reuse_port, a real proxy, wrk -c200 through it."""
    require_tool(kind)
    server = gunicorn_server(worker, tcp=True, reuse_port=True, **settings)
    proxy = Proxy(kind, tmp_path / ("%s-%s-%d" % (kind, worker, len(os.listdir(str(tmp_path))))),
                  server.address, upstream_keepalive=upstream_keepalive)
    listeners = []
    try:
        proxy.start()
        stop = stop_condition(server, None, worker, lambda: proxy.upstream_failures())

        def watched():
            listeners.append(server.listeners())
            return stop()
        requests, non2xx, errors, seconds, output = run_wrk(
            "http://127.0.0.1:%d/" % proxy.port, watched)
    finally:
        proxy.stop()
    outcome = loadkit.Outcome(
        "%s worker via %s to 127.0.0.1 with reuse_port" % (worker, proxy.label), requests,
        non2xx, errors, proxy.upstream_failures(), server.restarts(), True,
        server.tracebacks(), seconds,
        detail="listeners in the group during the run: %s..%s\n%s\n%s" % (
            min(listeners or [0]), max(listeners or [0]), output, server.log()))
    outcome.listeners = listeners
    outcome.server = server
    return outcome


def assert_group_kept(outcome, workers):
    """The load spreading reuse_port is for: ``workers`` listeners, never fewer; more only
    while a HUP's new workers share with old ones (not here)."""
    seen = [n for n in outcome.listeners if n is not None]
    assert seen, outcome
    assert min(seen) == max(seen) == workers, (seen, outcome)
    if REUSE_PORT_BINDS_IN_WORKERS:
        assert "keeps one listener per worker" in outcome.server.errorlog(), outcome


@pytest.mark.parametrize("kind,upstream_keepalive", PROXIES)
def test_default_kernel_stock_fails_safe_does_not(gunicorn_server, tmp_path, migrate_req,
                                                  kind, upstream_keepalive):
    migrate_req(0)
    safe = run(gunicorn_server, tmp_path, "safe", kind, upstream_keepalive)
    assert_lost_nothing(safe)
    if REUSE_PORT_BINDS_IN_WORKERS:
        assert_group_kept(safe, SETTINGS["workers"])
        stock = run(gunicorn_server, tmp_path, "stock", kind, upstream_keepalive)
        assert_control_failed(stock)


@pytest.mark.parametrize("kind,upstream_keepalive", PROXIES[:2])
def test_with_tcp_migrate_req_safe_loses_nothing(gunicorn_server, tmp_path, migrate_req, kind,
                                                 upstream_keepalive):
    """With the kernel's own remedy on, the slots still hold. No stock run here: on this
    kernel stock still fails with the sysctl on (see the module docstring and
    docs/reuse-port.md), so it would be a run that asserts nothing."""
    if not REUSE_PORT_BINDS_IN_WORKERS:
        pytest.skip("gunicorn %s binds one listener in the arbiter: nothing to migrate"
                    % (GUNICORN,))
    migrate_req(1)
    safe = run(gunicorn_server, tmp_path, "safe", kind, upstream_keepalive)
    assert_lost_nothing(safe)
    assert_group_kept(safe, SETTINGS["workers"])


def test_hup_keeps_the_group_and_loses_nothing(gunicorn_server, tmp_path, migrate_req):
    """Two HUPs under load (every worker replaced at once; each new worker shares a
    listener with one old worker until it leaves), kernel default: nothing fails and the
    group is back to ``workers`` listeners."""
    import threading
    if not REUSE_PORT_BINDS_IN_WORKERS:
        pytest.skip("gunicorn %s binds one listener in the arbiter" % (GUNICORN,))
    migrate_req(0)
    require_tool("h2o")
    settings = dict(SETTINGS, max_requests=0)
    server = gunicorn_server("safe", tcp=True, reuse_port=True, **settings)
    proxy = Proxy("h2o", tmp_path / "h2o-hup", server.address).start()
    done = threading.Event()
    errors = []

    def reload_twice():
        try:
            for _ in range(2):
                server.reload(timeout=60)
        except Exception as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            done.set()
    thread = threading.Thread(target=reload_twice)
    try:
        thread.start()
        requests, non2xx, sock_errors, seconds, output = run_wrk(
            "http://127.0.0.1:%d/" % proxy.port, done.is_set, max_seconds=120)
        thread.join()
    finally:
        proxy.stop()
    assert not errors, errors
    print("HUP x2: %d requests, %d non-2xx, %s" % (requests, non2xx, sock_errors))
    assert non2xx == 0 and not sock_errors, (output, server.log())
    assert not proxy.upstream_failures(), proxy.upstream_failures()
    server.wait_for(lambda: server.listeners() == settings["workers"], 30,
                    "the group back at %d listeners" % settings["workers"])


def test_check_command_shows_it(migrate_req):
    """``safe-gthread check --bind tcp --reuse-port``: what a user runs to see it."""
    import json
    import subprocess
    import sys
    if not REUSE_PORT_BINDS_IN_WORKERS:
        pytest.skip("gunicorn %s binds one listener in the arbiter" % (GUNICORN,))
    migrate_req(0)
    # The check's own max_requests (200): a worker lives a fraction of a second here, so
    # many stop at their limit before their successor is ready and slots wait for boots.
    out = subprocess.run([sys.executable, "-m", "safe_gthread", "check", "--bind", "tcp",
                          "--reuse-port", "--json", "--seconds", "8", "--workers", "5",
                          "--threads", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    report = json.loads(out.stdout)
    print(report["verdict"])
    assert report["settings"]["bind"] == "tcp" and report["settings"]["reuse_port"]
    assert report["stock"]["failed_requests"] > 0, report
    assert report["safe"]["failed_requests"] == 0, (report["verdict"], report["safe"],
                                                    out.stderr[-3000:])
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])


def test_check_refuses_reuse_port_on_a_unix_socket():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "safe_gthread", "check", "--reuse-port"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    assert out.returncode == 2
    assert "--reuse-port needs --bind tcp" in out.stderr
