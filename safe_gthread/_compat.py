"""Every difference between gunicorn versions that safe-gthread cares about.

Each flag is detected once, at import, from the installed gunicorn itself (attributes
and signatures, never version numbers), so a new gunicorn release lands in the right
branch without an edit here. A probe that cannot tell (a renamed method, a vendor fork)
answers "not recognised", and the code that depends on it then changes nothing about
gunicorn and says so in one WARNING line (``warn_unrecognised``): never an exception in
the arbiter. ``tests/test_compat.py`` pins what each matrix cell must detect.
"""
import inspect
import logging
import platform

import gunicorn
from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock
from gunicorn.workers import gthread

GUNICORN_VERSION = gunicorn.__version__
PYTHON_VERSION = platform.python_version()

_ThreadWorker = gthread.ThreadWorker


def _parameters(function):
    """The parameter names of ``function``, or None when they cannot be read."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _names_used(function):
    """The global and attribute names ``function``'s code refers to, or an empty set."""
    code = getattr(function, "__code__", None)
    return frozenset(getattr(code, "co_names", ()))


#: gunicorn <= 19.6.0: ``UnixSocket.close()`` itself unlinks the path, in whichever process
#: closes it, workers included; the first worker to restart deletes the socket file
#: (benoitc/gunicorn#1298). 19.7.0 moved the unlink to the arbiter.
UNIX_CLOSE_UNLINKS = "close" in vars(gunicorn_sock.UnixSocket)

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

_FINISH_REQUEST = _parameters(getattr(_ThreadWorker, "finish_request", None)) or []


def _generation():
    """Which gthread loop this is, from the methods our retirements override.

    "legacy" (19.x - 23.x): the futures loop, ``finish_request(self, fs)``, kept-alive
    connections in ``_keep``. 24.0 rewrote the loop around ``set_accept_enabled`` and a
    method queue, ``finish_request(self, conn, fs)``: "method-queue" (24.0 - 27.0.0), or
    "graceful" (27.0.1 and later) once a stopping worker keeps its kept-alive connections
    for one more request (``_cap_keepalive``, ``STOP_KEEPALIVE_LINGER``). None: a shape
    we do not know; the worker then keeps gunicorn's own stop path.
    """
    legacy = (not hasattr(_ThreadWorker, "set_accept_enabled")
              and _FINISH_REQUEST == ["self", "fs"]
              and hasattr(_ThreadWorker, KEEPALIVE_CALLBACK)
              and hasattr(_ThreadWorker, "murder_keepalived"))
    if legacy:
        return "legacy"
    method_queue = (hasattr(_ThreadWorker, "set_accept_enabled")
                    and _FINISH_REQUEST[:3] == ["self", "conn", "fs"]
                    and hasattr(_ThreadWorker, "on_client_socket_readable")
                    and hasattr(_ThreadWorker, "murder_keepalived")
                    and hasattr(_ThreadWorker, "wait_for_and_dispatch_events"))
    if method_queue and hasattr(gthread, "STOP_KEEPALIVE_LINGER"):
        return "graceful"
    if method_queue and not hasattr(_ThreadWorker, "_cap_keepalive"):
        return "method-queue"
    if hasattr(_ThreadWorker, "set_accept_enabled") and hasattr(_ThreadWorker, "_cap_keepalive"):
        return "graceful"
    return None


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

#: The status gunicorn's arbiter takes for "Worker failed to boot." (it then halts).
WORKER_BOOT_ERROR = getattr(gunicorn_arbiter.Arbiter, "WORKER_BOOT_ERROR", 3)

def _statsd_timer_type():
    try:
        from gunicorn.instrument import statsd
    except Exception:  # an optional module of gunicorn's; never fail the import for it
        return "histogram"
    return getattr(statsd, "TIMER_TYPE", "histogram")


#: The ``mtype`` gunicorn's statsd logger sends as a timer ("|ms"): "timer" where it has
#: one (it then sends "histogram" as "|h"), "histogram" before (sent as "|ms").
STATSD_TIMER_TYPE = _statsd_timer_type()

_warned = set()


def warn_unrecognised(what, missing, log=None):
    """Say once, at WARNING, that ``what`` left ``missing`` (names) unpatched."""
    key = (what, tuple(missing))
    if key in _warned:
        return
    _warned.add(key)
    (log or logging.getLogger("gunicorn.error")).warning(
        "safe-gthread: gunicorn %s has a shape not recognised by %s; left as gunicorn "
        "has it: %s.", GUNICORN_VERSION, what, ", ".join(missing))


def protections():
    """The protections active on this gunicorn, as short phrases for the boot log line."""
    active = []
    if UNIX_CLOSE_UNLINKS:
        active.append("workers never unlink the socket")
    active.append("the arbiter unlinks only the socket it bound")
    active.append("nothing but a dead socket is replaced at bind")
    if GTHREAD_GENERATION in ("legacy", "method-queue"):
        active.append("retiring workers finish kept-alive connections")
    active.append("a retiring worker serves until its successor is ready")
    return active
