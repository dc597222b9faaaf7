"""What _compat must detect on each gunicorn of the matrix (attrs-style: the flags are
computed from gunicorn itself; these version facts pin them)."""
from gunicorn.workers.gthread import ThreadWorker

import safe_gthread
from safe_gthread import _compat, _retire
from versions import GUNICORN


def test_unix_close_unlinks_only_up_to_19_6():
    assert _compat.UNIX_CLOSE_UNLINKS == (GUNICORN < (19, 7))


def test_close_sockets_from_19_7():
    assert _compat.HAS_CLOSE_SOCKETS == (GUNICORN >= (19, 7))


def test_legacy_loop_up_to_23():
    assert _compat.LEGACY_GTHREAD_LOOP == (GUNICORN < (24,))


def test_keepalive_callback_name():
    expected = "reuse_connection" if GUNICORN < (21,) else "on_client_socket_readable"
    assert _compat.KEEPALIVE_CALLBACK == expected
    if _compat.LEGACY_GTHREAD_LOOP:
        assert callable(getattr(ThreadWorker, _compat.KEEPALIVE_CALLBACK))


def test_get_thread_pool_from_20():
    assert _compat.HAS_GET_THREAD_POOL == (GUNICORN >= (20,))


def test_gthread_generation():
    if GUNICORN < (24,):
        expected = "legacy"
    elif GUNICORN < (27, 0, 1):  # 27.0.0 still has the 24.x stop path
        expected = "method-queue"
    else:
        expected = "graceful"
    assert _compat.GTHREAD_GENERATION == expected


def test_only_27_0_0_closes_kept_alive_connections_at_once_on_stop():
    assert _compat.STOP_CLOSES_KEPT_ALIVE_AT_ONCE == (GUNICORN == (27, 0, 0))


def test_worker_takes_the_branch_for_this_generation():
    assert issubclass(safe_gthread.Worker, ThreadWorker)
    module = {"legacy": "legacy", "method-queue": "method_queue",
              "graceful": "graceful"}[_compat.GTHREAD_GENERATION]
    assert safe_gthread.Worker.__mro__[1].__module__ == "safe_gthread._retire." + module
    assert safe_gthread.Worker.__mro__[1] is _retire.for_generation()


def test_boot_line_once_naming_the_protections(gunicorn_server):
    server = gunicorn_server("safe", max_requests=5)
    from safe_gthread.check import load as _load
    _load.run_load(server.sock_path, seconds=20, concurrency=4, stop=lambda: server.restarts() >= 3)
    assert server.restarts() >= 3, server.log()
    line = "safe-gthread %s on gunicorn %s" % (safe_gthread.__version__, _compat.GUNICORN_VERSION)
    assert server.errorlog().count(line) == 1, server.log()
    for phrase in _compat.protections():
        assert phrase in server.errorlog()
