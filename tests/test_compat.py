"""What _compat must detect on each gunicorn of the matrix (attrs-style: the flags are
computed from gunicorn itself; these version facts pin them)."""
import atexit
import sys
import threading

import pytest
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


def test_python_exit_steps_callable_on_every_cell():
    # CPython 3.6 - 3.13 have both: the mold's workers exit through them (no teardown).
    assert _compat.EXIT_WITHOUT_TEARDOWN
    assert _compat.EXIT_STEPS == (threading._shutdown, atexit._run_exitfuncs)


def test_gc_freeze_from_python_3_7():
    # The mold freezes the app's objects before each fork where Python can (3.7+).
    import gc
    assert not _compat.FREE_THREADED  # no cell runs a free-threaded build
    if sys.version_info >= (3, 7):
        assert _compat.GC_FREEZE is gc.freeze
    else:
        assert _compat.GC_FREEZE is None


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


# -- what each matrix cell detects, pinned row by row ----------------------------------------

_FLAGS = ("UNIX_CLOSE_UNLINKS", "HAS_CLOSE_SOCKETS", "KEEPALIVE_CALLBACK", "HAS_GET_THREAD_POOL",
          "GTHREAD_GENERATION", "HAS_DEFER", "STOP_CLOSES_KEPT_ALIVE_AT_ONCE",
          "GTHREAD_LINGERS_ON_STOP", "REUSE_PORT_BINDS_IN_WORKERS")
_R, _O = "reuse_connection", "on_client_socket_readable"

#: gunicorn -> the flags above, for every gunicorn of tests/matrix.py's CELLS.
DETECTED = {
    (19, 6, 0): (True, False, _R, False, "legacy", False, False, False, False),
    (19, 9, 0): (False, True, _R, False, "legacy", False, False, False, False),
    (20, 1, 0): (False, True, _R, True, "legacy", False, False, False, False),
    (21, 2, 0): (False, True, _O, True, "legacy", False, False, False, False),
    (23, 0, 0): (False, True, _O, True, "legacy", False, False, False, False),
    (24, 1, 1): (False, True, _O, True, "method-queue", False, False, False, True),
    (25, 1, 0): (False, True, _O, True, "method-queue", False, False, False, True),
    (26, 0, 0): (False, True, _O, True, "method-queue", True, False, False, True),
    (26, 2, 0): (False, True, _O, True, "method-queue", True, False, False, True),
    (27, 0, 0): (False, True, _O, True, "method-queue", True, True, False, True),
    (27, 0, 1): (False, True, _O, True, "graceful", True, False, True, True),
}


def _detected():
    values = dict((name, getattr(_compat, name, None)) for name in _FLAGS)
    values["HAS_DEFER"] = _compat.GTHREAD_DEFER is not None
    return tuple(values[name] for name in _FLAGS)


def test_matrix_cells_are_all_pinned():
    import matrix
    pinned = set(".".join(map(str, version)) for version in DETECTED)
    assert set(gunicorn for gunicorn, _ in matrix.CELLS) <= pinned


def test_this_cell_detects_exactly_its_row():
    if GUNICORN not in DETECTED:
        pytest.skip("gunicorn %s is not a matrix cell; the rules above still hold"
                    % ".".join(map(str, GUNICORN)))
    assert dict(zip(_FLAGS, _detected())) == dict(zip(_FLAGS, DETECTED[GUNICORN]))


def test_every_override_takes_gunicorns_parameters():
    """A retirement method gunicorn calls must take exactly what gunicorn passes: the
    generation probe checks these, and this holds every retirement to it."""
    import inspect
    retirement = _retire.for_generation()
    for klass in retirement.__mro__[:-1]:
        for name, value in vars(klass).items():
            stock = getattr(ThreadWorker, name, None)
            if not callable(value) or stock is None or name.startswith("__"):
                continue
            assert (list(inspect.signature(value).parameters)
                    == list(inspect.signature(stock).parameters)), (klass, name)


def test_probes_never_raise_on_odd_objects():
    broken = type("Broken", (), {"__call__": lambda self: None,
                                 "__signature__": property(lambda self: 1 / 0)})
    for odd in (None, 3, object(), broken()):
        assert _compat._parameters(odd) is None
        assert _compat._names_used(odd) == frozenset()


def test_every_patch_fits_this_gunicorn():
    # On every supported gunicorn the worker's setup installs all its layers: a wrapper
    # whose parameters stopped matching gunicorn's would be left out, with a WARNING
    # that only an unknown gunicorn may log (tests/test_shapes.py).
    import subprocess
    import sys
    code = "\n".join([
        "import logging, io",
        "stream = io.StringIO()",
        "handler = logging.StreamHandler(stream)",
        "logging.getLogger('gunicorn.error').addHandler(handler)",
        "logging.getLogger('gunicorn.error').setLevel(logging.DEBUG)",
        "import safe_gthread",
        "safe_gthread.Worker.setup()",
        "print(stream.getvalue())",
    ])
    out = subprocess.check_output([sys.executable, "-c", code], cwd="/").decode()
    assert "not recognised" not in out, out
    assert "safe-gthread %s on gunicorn" % safe_gthread.__version__ in out, out
