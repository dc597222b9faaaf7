"""A gunicorn whose shape safe-gthread does not recognise: a future 28.x, a
vendor fork. Each test alters the installed gunicorn in a fresh interpreter BEFORE
safe_gthread is imported, the way such a gunicorn would look to ``_compat``, and holds
the contract (DESIGN.md invariant 9): the least intrusive behaviour (gunicorn's own code
where ours does not fit), one WARNING line naming what was left unpatched, and never an
exception in the arbiter.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import safe_gthread
from safe_gthread import _compat
from safe_gthread.check import load as _load
from safe_gthread.check.runner import Gunicorn

#: Where the safe_gthread under test lives: the fresh interpreters import the same one.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(safe_gthread.__file__)))

# -- alterations of gunicorn (source run before safe_gthread is imported) -------------------

_PRELUDE = """
import inspect
from gunicorn import sock as _sock
from gunicorn.workers import gthread as _gthread
_TW = _gthread.ThreadWorker
"""

#: finish_request with its parameters renamed (the retirements override it by name).
FINISH_REQUEST_RENAMED = _PRELUDE + """
_finish = _TW.finish_request
if list(inspect.signature(_finish).parameters) == ["self", "fs"]:
    def finish_request(self, future):
        return _finish(self, future)
else:
    def finish_request(self, connection, future):
        return _finish(self, connection, future)
_TW.finish_request = finish_request
"""

#: Every method a retirement overrides, its parameters renamed: ``finish_request`` and
#: ``set_accept_enabled`` where it exists (the only one 27.0.1's retirement overrides).
LOOP_RENAMED = FINISH_REQUEST_RENAMED + """
if hasattr(_TW, "set_accept_enabled"):
    _toggle = _TW.set_accept_enabled
    def set_accept_enabled(self, accept):
        return _toggle(self, accept)
    _TW.set_accept_enabled = set_accept_enabled
"""

#: finish_request with one more positional parameter (an upstream change).
FINISH_REQUEST_GROWN = _PRELUDE + """
_finish = _TW.finish_request
def finish_request(self, *args):
    return _finish(self, *args[:len(args) - 1])
finish_request.__signature__ = inspect.Signature(
    list(inspect.signature(_finish).parameters.values())
    + [inspect.Parameter("deadline", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
_TW.finish_request = finish_request
"""

#: The accept toggle of the other generation: 24.0+ without ``set_accept_enabled``,
#: or a 19.x - 23.x loop that grew one.
ACCEPT_TOGGLE_SWAPPED = _PRELUDE + """
if hasattr(_TW, "set_accept_enabled"):
    del _TW.set_accept_enabled
else:
    _TW.set_accept_enabled = lambda self, enabled: None
"""

#: The keep-alive callback (``reuse_connection`` / ``on_client_socket_readable``) gone.
KEEPALIVE_CALLBACK_GONE = _PRELUDE + """
for _name in ("reuse_connection", "on_client_socket_readable"):
    if _name in vars(_TW):
        delattr(_TW, _name)
"""

#: No way left for the arbiter to unlink: ``sock.close_sockets`` (19.7+) or the
#: unlinking ``UnixSocket.close`` (19.6.0) gone.
CLOSE_PATH_GONE = _PRELUDE + """
if hasattr(_sock, "close_sockets"):
    del _sock.close_sockets
else:
    del _sock.UnixSocket.close
"""

#: ``UnixSocket.bind(self, sock)`` with its parameter renamed.
BIND_RENAMED = _PRELUDE + """
_bind = _sock.UnixSocket.bind
def bind(self, listener):
    return _bind(self, listener)
_sock.UnixSocket.bind = bind
"""

#: ``sock.close_sockets(listeners, unlink=True)`` with its parameters renamed.
CLOSE_SOCKETS_RENAMED = _PRELUDE + """
_close_sockets = _sock.close_sockets
def close_sockets(socks, remove=True):
    return _close_sockets(socks, remove)
_sock.close_sockets = close_sockets
"""

_PROBE = """
import json, logging, traceback
records = []
class _Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
_log = logging.getLogger("gunicorn.error")
_log.addHandler(_Keep())
_log.setLevel(logging.DEBUG)
%s
result = {}
try:
    import safe_gthread
    from safe_gthread import _arbiter, _compat, _patch, guard
    safe_gthread.Worker.setup()
    safe_gthread.Worker.setup()  # a HUP loads the worker class again
    result["generation"] = _compat.GTHREAD_GENERATION
    result["retirement"] = "%%s.%%s" %% (safe_gthread.Worker.__mro__[1].__module__,
                                       safe_gthread.Worker.__mro__[1].__name__)
    result["guarded"] = sorted("%%s.%%s" %% (getattr(o, "__name__", o), n)
                               for o, n in _arbiter.wrapped("guard", "heal"))
    result["installed"] = guard.installed()
    %s
except BaseException:
    result["error"] = traceback.format_exc()
result["records"] = records
print(json.dumps(result))
"""


def probe(alteration, check=""):
    """Alter gunicorn, import safe_gthread, install the worker class (twice); return
    what it detected, what the guard wrapped and every log record."""
    code = _PROBE % (textwrap.dedent(alteration), check)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [PACKAGE_PARENT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in result, result["error"]
    return result


def warnings_of(result):
    return [message for level, message in result["records"] if level == "WARNING"]


def test_the_probe_on_this_gunicorn_as_it_is():
    """The control: unaltered, nothing is unrecognised and nothing is warned."""
    result = probe("")
    assert result["generation"] == _compat.GTHREAD_GENERATION is not None
    assert warnings_of(result) == []
    assert result["installed"]


@pytest.mark.parametrize("alteration,everywhere", [
    (LOOP_RENAMED, True), (ACCEPT_TOGGLE_SWAPPED, True), (FINISH_REQUEST_RENAMED, False),
    (FINISH_REQUEST_GROWN, False), (KEEPALIVE_CALLBACK_GONE, False),
], ids=["loop-renamed", "accept-toggle-swapped", "finish_request-renamed",
        "finish_request-grown", "keepalive-callback-gone"])
def test_unrecognised_gthread_loop_keeps_gunicorns_stop_path(alteration, everywhere):
    result = probe(alteration)
    if not everywhere and _compat.GTHREAD_GENERATION == "graceful":
        # 27.0.1's retirement overrides set_accept_enabled only: the rest may change.
        assert result["generation"] == "graceful"
        assert warnings_of(result) == []
        return
    assert result["generation"] is None
    # No override at all: gunicorn's own stop path, exactly as the stock worker.
    assert result["retirement"] == "safe_gthread._retire.Unrecognised"
    warned = warnings_of(result)
    assert len(warned) == 1, result["records"]
    assert "not recognised" in warned[0] and "stop path" in warned[0], warned
    assert _compat.GUNICORN_VERSION in warned[0]
    # The socket guard does not depend on the gthread loop: it is still whole.
    assert result["installed"] and result["guarded"] == probe("")["guarded"]


@pytest.mark.parametrize("alteration,target", [
    (CLOSE_PATH_GONE, "gunicorn.sock.close_sockets"),
    (BIND_RENAMED, "UnixSocket.bind"),
], ids=["close-path-gone", "bind-renamed"])
def test_guard_leaves_what_it_does_not_recognise(alteration, target):
    result = probe(alteration)
    assert result["generation"] == _compat.GTHREAD_GENERATION  # the loop is unchanged
    assert result["installed"]
    assert target not in result["guarded"]
    assert result["guarded"], "the other targets are still guarded"
    warned = warnings_of(result)
    assert len(warned) == 1, result["records"]
    assert "socket guard" in warned[0] and target in warned[0], warned


@pytest.mark.skipif(not _compat.HAS_CLOSE_SOCKETS, reason="gunicorn < 19.7 has no close_sockets")
def test_guard_passes_a_new_keyword_argument_through():
    """A future arbiter calling ``close_sockets(listeners, unlink, linger=...)`` reaches
    gunicorn's function through the guard: no TypeError in the arbiter."""
    alteration = _PRELUDE + """
seen = []
_close_sockets = _sock.close_sockets
def close_sockets(listeners, unlink=True, linger=0):
    seen.append(linger)
    return _close_sockets(listeners, unlink)
_sock.close_sockets = close_sockets
"""
    result = probe(alteration, check='_sock.close_sockets([], True, linger=7); '
                                     'result["seen"] = seen')
    assert "gunicorn.sock.close_sockets" in result["guarded"]
    assert result["seen"] == [7]
    assert warnings_of(result) == []


# -- end to end: a real gunicorn of an unrecognised shape ----------------------------------

def _server(tmp_path, alteration, **settings):
    """A gunicorn with safe_gthread.Worker whose config file alters gunicorn first (the
    config file runs in the arbiter before the worker class is loaded)."""
    os.makedirs(str(tmp_path / "server"))
    server = Gunicorn(tmp_path / "server", "safe", **settings)
    with open(server.config_path) as fh:
        config = fh.read()
    with open(server.config_path, "w") as fh:
        fh.write(textwrap.dedent(alteration) + "\n" + config)
    return server


def _our_warnings(server):
    # gunicorn's own (e.g. "Worker ... was terminated due to signal 15" for a successor
    # TERMed while it boots) are not ours to count, nor the scheduler's note that this
    # churn (max_requests 5) outpaces the successors' boots.
    return [line for line in server.errorlog().splitlines()
            if "[WARNING]" in line and "safe-gthread" in line
            and "retirements outpace successor boots" not in line]


@pytest.mark.e2e
@pytest.mark.parametrize("alteration,needle", [
    pytest.param(LOOP_RENAMED, "stop path", id="loop-renamed"),
    pytest.param(CLOSE_SOCKETS_RENAMED, "close_sockets", id="close_sockets-renamed",
                 marks=pytest.mark.skipif(not _compat.HAS_CLOSE_SOCKETS,
                                          reason="gunicorn < 19.7 has no close_sockets")),
])
def test_real_gunicorn_of_an_unrecognised_shape(tmp_path, alteration, needle):
    """Altered by its config file, a real gunicorn serves with safe_gthread.Worker,
    restarts workers, logs one WARNING naming what it left as gunicorn has it, and
    stops cleanly: exit 0, no traceback, the socket file removed by its own stop."""
    server = _server(tmp_path, alteration, workers=2, max_requests=5)
    try:
        server.start()
        inode = server.inode()
        result = _load.run_load(server.sock_path, seconds=20, concurrency=4,
                                stop=lambda: server.restarts() >= 2)
        assert server.restarts() >= 2, server.log()
        # No count of failures: on 19.x - 27.0.0 this is the stock stop path, which loses
        # requests on restarts; what matters here is that it serves and never crashes.
        assert result.requests > 0, server.log()
        assert server.inode() == inode, server.log()  # the guard still keeps the file
        server.wait_for(lambda: len(server.worker_pids()) == server.settings["workers"], 20,
                        "the restarts to settle")
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log()
    finally:
        server.stop()
    warned = _our_warnings(server)
    assert len(warned) == 1, server.log()
    assert needle in warned[0], warned
    assert server.tracebacks() == 0, server.log()
    assert server.inode() is None, server.log()  # gunicorn's own clean stop unlinked it
