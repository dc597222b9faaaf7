"""Every difference between gunicorn versions that safe-gthread cares about.

Each flag is detected once, at import, from the installed gunicorn itself (attributes
and signatures, never version numbers), so a new gunicorn release lands in the right
branch without an edit here. A probe that cannot tell (a renamed method, a vendor fork)
answers "not recognised", and the code that depends on it then changes nothing about
gunicorn and says so in one WARNING line (``warn_unrecognised``): never an exception in
the arbiter. ``tests/test_compat.py`` pins what each matrix cell must detect.
"""
import atexit
import gc
import inspect
import logging
import platform
import sysconfig
import threading

import gunicorn
from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock
from gunicorn.http import body as gunicorn_body
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import gthread

from . import _patch

GUNICORN_VERSION = getattr(gunicorn, "__version__", "(unknown version)")
PYTHON_VERSION = platform.python_version()

_ThreadWorker = gthread.ThreadWorker


def _parameters(function):
    """The parameter names of ``function``, or None when they cannot be read."""
    try:
        return list(inspect.signature(function).parameters)
    except Exception:  # a probe never raises: None is "cannot tell"
        return None


def _names_used(function):
    """The global and attribute names ``function``'s code refers to, or an empty set."""
    code = getattr(function, "__code__", None)
    return frozenset(getattr(code, "co_names", ()))


#: gunicorn <= 19.6.0: ``UnixSocket.close()`` itself unlinks the path, in whichever process
#: closes it, workers included; the first worker to restart deletes the socket file
#: (benoitc/gunicorn#1298). 19.7.0 moved the unlink to the arbiter.
UNIX_CLOSE_UNLINKS = "close" in vars(getattr(gunicorn_sock, "UnixSocket", object))

#: gunicorn >= 19.7.0: the arbiter's ``stop()`` unlinks through
#: ``sock.close_sockets(listeners, unlink)``, looked up on the module at call time.
HAS_CLOSE_SOCKETS = hasattr(gunicorn_sock, "close_sockets")

#: The ThreadWorker method that serves the next request on a kept-alive connection:
#: ``reuse_connection`` up to 20.x, ``on_client_socket_readable`` from 21.0 (which also
#: parks accepted connections in the poller until they are readable).
KEEPALIVE_CALLBACK = ("on_client_socket_readable"
                      if hasattr(_ThreadWorker, "on_client_socket_readable")
                      else "reuse_connection")

#: gunicorn >= 20.0 lets a subclass build the thread pool (``get_thread_pool``).
HAS_GET_THREAD_POOL = hasattr(_ThreadWorker, "get_thread_pool")

#: 25.3 and later: ``handle()`` returns this marker for a connection that sent nothing yet.
GTHREAD_DEFER = getattr(gthread, "_DEFER", None)

def _takes(name, *shapes):
    """True when ``ThreadWorker.name`` exists and its parameters are one of ``shapes``
    exactly: a method our retirement overrides is called by gunicorn with those."""
    return _parameters(getattr(_ThreadWorker, name, None)) in [list(shape) for shape in shapes]


def _generation():
    """Which gthread loop this is, from the methods our retirements override.

    "legacy" (19.x - 23.x): the futures loop, ``finish_request(self, fs)``, kept-alive
    connections in ``_keep``. 24.0 rewrote the loop around ``set_accept_enabled`` and a
    method queue, ``finish_request(self, conn, fs)``: "method-queue" (24.0 - 27.0.0), or
    "graceful" (27.0.1 and later) once a stopping worker keeps its kept-alive connections
    for one more request (``STOP_KEEPALIVE_LINGER``, ``_cap_keepalive``). None: a shape
    we do not know; the worker then keeps gunicorn's own stop path. Every method the
    chosen retirement overrides must exist with exactly the parameters it expects.
    """
    keepalive = _takes(KEEPALIVE_CALLBACK, ("self", "conn", "client"))
    if not hasattr(_ThreadWorker, "set_accept_enabled"):
        legacy = (keepalive and _takes("run", ("self",))
                  and _takes("handle", ("self", "conn"))
                  and _takes("finish_request", ("self", "fs"))
                  and _takes("murder_keepalived", ("self",)))
        return "legacy" if legacy else None
    if not _takes("set_accept_enabled", ("self", "enabled")):
        return None
    if hasattr(gthread, "STOP_KEEPALIVE_LINGER") or hasattr(_ThreadWorker, "_cap_keepalive"):
        return "graceful"  # overrides set_accept_enabled only
    method_queue = (keepalive and hasattr(gthread, "PollableMethodQueue")
                    and _takes("finish_request", ("self", "conn", "fs"))
                    and _takes("wait_for_and_dispatch_events", ("self", "timeout"))
                    and _takes("murder_keepalived", ("self",), ("self", "force")))
    return "method-queue" if method_queue else None


#: "legacy", "method-queue", "graceful", or None for a gthread loop we do not recognise;
#: ``safe_gthread.Worker`` picks its retirement by it (``safe_gthread._retire``).
GTHREAD_GENERATION = _generation()

#: gunicorn 19.x - 23.x: the futures-based gthread loop (kept for readers of the flags).
LEGACY_GTHREAD_LOOP = GTHREAD_GENERATION == "legacy"

#: gunicorn >= 27.0.1: a stopping gthread worker keeps its kept-alive connections for one
#: more request. 24.0 - 27.0.0 close a connection whose response had just promised
#: keep-alive, and wait for idle ones until ``graceful_timeout`` without closing them.
GTHREAD_LINGERS_ON_STOP = GTHREAD_GENERATION == "graceful"

#: gunicorn 27.0.0 only: its stop loop leaves as soon as nothing but kept-alive
#: connections is left, then closes them all at once (``murder_keepalived(force=True)``),
#: though a proxy may already have sent a request on one; 27.0.1 lingers first.
STOP_CLOSES_KEPT_ALIVE_AT_ONCE = (
    GTHREAD_GENERATION == "method-queue"
    and "force" in (_parameters(getattr(_ThreadWorker, "murder_keepalived", None)) or []))

#: gunicorn >= 24.0: with ``reuse_port`` each worker binds its own listeners
#: (``sock.create_sockets`` called from ``Arbiter.spawn_worker``) and the arbiter binds
#: none. A worker that cannot bind must exit with the arbiter's ``WORKER_BOOT_ERROR``,
#: which halts the arbiter; any other status only makes it spawn the next worker.
REUSE_PORT_BINDS_IN_WORKERS = (
    "create_sockets" in _names_used(getattr(gunicorn_arbiter.Arbiter, "spawn_worker", None)))

#: gunicorn >= 19.7: ``sock.create_sockets(conf, log, fds=None)`` wraps listeners that are
#: already bound (gunicorn closes each fd it is given); ``_reuseport`` hands a worker its
#: slot's listeners through it.
CREATE_SOCKETS_TAKES_FDS = "fds" in (
    _parameters(getattr(gunicorn_sock, "create_sockets", None)) or [])

#: How the arbiter's main loop waits between two rounds of ``manage_workers``: gunicorn
#: <= 23 ``sleep()`` (a 1 s ``select`` on its self-pipe, woken by signals), gunicorn >= 24
#: ``wait_for_signals(timeout=1.0)`` (a signal queue). None: neither (the socket healing
#: then checks only when the loop comes round on its own).
ARBITER_WAIT = ("wait_for_signals" if hasattr(gunicorn_arbiter.Arbiter, "wait_for_signals")
                else "sleep" if hasattr(gunicorn_arbiter.Arbiter, "sleep") else None)

#: The status gunicorn's arbiter takes for "Worker failed to boot." (it then halts).
WORKER_BOOT_ERROR = getattr(gunicorn_arbiter.Arbiter, "WORKER_BOOT_ERROR", 3)

#: The body readers whose unread length is known (``LengthReader.length``, the bytes of a
#: Content-Length body not read yet; a ``ChunkedReader`` whose ``parser`` is None has read
#: its last chunk). Same names and attributes on 19.6.0 - 27.0.1.
_LENGTH_READER = getattr(gunicorn_body, "LengthReader", None)
_CHUNKED_READER = getattr(gunicorn_body, "ChunkedReader", None)

#: The HTTP/1.x response class whose ``start_response`` every gthread ``handle_request``
#: passes to the app; ``must_close`` is the flag ``force_close()`` sets. (27.x's HTTP/2
#: responses are a subclass: never touched.)
HTTP1_RESPONSE = getattr(gunicorn_wsgi, "Response", None)


def request_buffered(unreader, message):
    """True when ``unreader`` already holds bytes past ``message``'s unread body: the next
    pipelined request (or its start), read from the socket together with ``message``.

    Those bytes never make the socket readable again, so a loop that waits on its poller
    for them waits for the keep-alive timeout: gunicorn 19.x - 26.x answer only the first
    of pipelined requests (27.0.0 checks ``unreader.buf`` in ``finish_request``). Every
    version keeps them in ``unreader.buf`` (a BytesIO). A body of unknown remaining length
    (chunked, not read to its end) answers False: wait on the poller, as gunicorn does.
    """
    buf = getattr(unreader, "buf", None)
    getvalue = getattr(buf, "getvalue", None)
    if getvalue is None:
        return False
    try:
        buffered = len(getvalue())
    except ValueError:  # a closed buffer
        return False
    if not buffered:
        return False
    if message is None:
        return True  # nothing parsed yet: whatever is buffered is a request
    reader = getattr(getattr(message, "body", None), "reader", None)
    if _LENGTH_READER is not None and isinstance(reader, _LENGTH_READER):
        return buffered > reader.length
    if _CHUNKED_READER is not None and isinstance(reader, _CHUNKED_READER):
        return getattr(reader, "parser", True) is None
    return False


def conn_request_buffered(conn):
    """``request_buffered`` for a gthread ``TConn``: False before its parser exists."""
    parser = getattr(conn, "parser", None)
    if parser is None:
        return False
    return request_buffered(getattr(parser, "unreader", None), getattr(parser, "mesg", None))


def _statsd_timer_type():
    try:
        from gunicorn.instrument import statsd
    except Exception:  # an optional module of gunicorn's; never fail the import for it
        return "histogram"
    return getattr(statsd, "TIMER_TYPE", "histogram")


#: The ``mtype`` gunicorn's statsd logger sends as a timer ("|ms"): "timer" where it has
#: one (it then sends "histogram" as "|h"), "histogram" before (sent as "|ms").
STATSD_TIMER_TYPE = _statsd_timer_type()

#: Python's own exit steps before its teardown, as functions we can call (CPython 3.6 to
#: 3.13): ``threading._shutdown`` (threading's atexit calls, then join the non-daemon
#: threads) and ``atexit._run_exitfuncs``. Without them a worker forked from the mold
#: exits through the interpreter's full teardown.
EXIT_STEPS = (getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None))
EXIT_WITHOUT_TEARDOWN = all(callable(step) for step in EXIT_STEPS)

#: ``gc.freeze()`` (Python >= 3.7): the objects alive now move to a generation the cyclic
#: collector no longer visits, so a forked worker's collections leave the pages it shares
#: with the mold unwritten. None before 3.7, and on a free-threaded build (3.13t), whose
#: freeze and collections visit the whole heap: the mold would pay that at every spawn.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
GC_FREEZE = None if FREE_THREADED else getattr(gc, "freeze", None)

_warned = _patch.Once()


def warn_unrecognised(what, missing, log=None):
    """Say once, at WARNING, that ``what`` left ``missing`` (names) unpatched."""
    _warned.say(log or logging.getLogger("gunicorn.error"), (what, tuple(missing)),
                "safe-gthread: gunicorn %s has a shape not recognised by %s; left as "
                "gunicorn has it: %s.", GUNICORN_VERSION, what, ", ".join(missing))


def protections():
    """The protections active on this gunicorn, as short phrases for the boot log line."""
    active = []
    if UNIX_CLOSE_UNLINKS:
        active.append("workers never unlink the socket")
    active.append("the arbiter unlinks only the socket it bound")
    active.append("nothing but a dead socket is replaced at bind")
    from . import _heal  # not at import: this module is the leaf every other one reads
    if _heal.enabled():
        active.append("a removed socket path is linked back to the listener")
    if GTHREAD_GENERATION in ("legacy", "method-queue"):
        active.append("retiring workers finish kept-alive connections")
    active.append("successors boot before the workers they replace stop")
    return active
