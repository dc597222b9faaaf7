"""Every difference between gunicorn versions that safe-gthread cares about.

Each flag is detected once, at import, from the installed gunicorn itself (attributes
and signatures, never version numbers), so a new gunicorn release lands in the right
branch without an edit here. ``tests/test_compat.py`` pins what each matrix cell must
detect.
"""
import platform

import gunicorn
from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock
from gunicorn.workers import gthread

GUNICORN_VERSION = gunicorn.__version__
PYTHON_VERSION = platform.python_version()

#: gunicorn <= 19.6.0: ``UnixSocket.close()`` itself unlinks the path, in whichever process
#: closes it, workers included; the first worker to restart deletes the socket file
#: (benoitc/gunicorn#1298). 19.7.0 moved the unlink to the arbiter.
UNIX_CLOSE_UNLINKS = "close" in vars(gunicorn_sock.UnixSocket)

#: gunicorn >= 19.7.0: the arbiter's ``stop()`` unlinks through
#: ``sock.close_sockets(listeners, unlink)``, looked up on the module at call time.
HAS_CLOSE_SOCKETS = hasattr(gunicorn_sock, "close_sockets")

#: gunicorn 19.x - 23.x: the futures-based gthread loop. When it stops it drops the
#: requests a client already sent on its kept-alive (and, from 21.0, parked)
#: connections. 24.0 rewrote the loop around ``set_accept_enabled`` and a method queue.
LEGACY_GTHREAD_LOOP = not hasattr(gthread.ThreadWorker, "set_accept_enabled")

#: gunicorn >= 27.0.1: a stopping gthread worker keeps its kept-alive connections for one
#: more request (``_cap_keepalive``, STOP_KEEPALIVE_LINGER). 24.0 - 27.0.0 close a
#: connection whose response had just promised keep-alive, and wait for idle ones
#: until ``graceful_timeout`` without closing them.
GTHREAD_LINGERS_ON_STOP = hasattr(gthread.ThreadWorker, "_cap_keepalive")

#: Which gthread loop this is: "legacy" (19.x - 23.x), "method-queue" (24.0 - 27.0.0) or
#: "graceful" (27.0.1 and later; 27.0.0 is still "method-queue");
#: ``safe_gthread.Worker`` picks its retirement by it.
if LEGACY_GTHREAD_LOOP:
    GTHREAD_GENERATION = "legacy"
elif GTHREAD_LINGERS_ON_STOP:
    GTHREAD_GENERATION = "graceful"
else:
    GTHREAD_GENERATION = "method-queue"

#: gunicorn 27.0.0 only: its stop loop leaves as soon as nothing but kept-alive
#: connections is left, then closes them all at once (``murder_keepalived(force=True)``),
#: though a proxy may already have sent a request on one; 27.0.1 lingers first.
STOP_CLOSES_KEPT_ALIVE_AT_ONCE = (
    "force" in gthread.ThreadWorker.murder_keepalived.__code__.co_varnames
    and not GTHREAD_LINGERS_ON_STOP)

#: 25.3 and later: ``handle()`` returns this marker for a connection that sent nothing yet.
GTHREAD_DEFER = getattr(gthread, "_DEFER", None)

#: The ThreadWorker method that serves the next request on a kept-alive connection:
#: ``reuse_connection`` up to 20.x, ``on_client_socket_readable`` from 21.0 (which also
#: parks accepted connections in the poller until they are readable).
KEEPALIVE_CALLBACK = ("on_client_socket_readable"
                      if hasattr(gthread.ThreadWorker, "on_client_socket_readable")
                      else "reuse_connection")

#: gunicorn >= 20.0 lets a subclass build the thread pool (``get_thread_pool``).
HAS_GET_THREAD_POOL = hasattr(gthread.ThreadWorker, "get_thread_pool")


#: gunicorn >= 24.0: with ``reuse_port`` each worker binds its own listeners
#: (``sock.create_sockets`` called from ``Arbiter.spawn_worker``) and the arbiter binds
#: none. A worker that cannot bind must exit with the arbiter's ``WORKER_BOOT_ERROR``,
#: which halts the arbiter; any other status only makes it spawn the next worker.
REUSE_PORT_BINDS_IN_WORKERS = (
    "create_sockets" in gunicorn_arbiter.Arbiter.spawn_worker.__code__.co_names)

#: The status gunicorn's arbiter takes for "Worker failed to boot." (it then halts).
WORKER_BOOT_ERROR = gunicorn_arbiter.Arbiter.WORKER_BOOT_ERROR


def protections():
    """The protections active on this gunicorn, as short phrases for the boot log line."""
    active = []
    if UNIX_CLOSE_UNLINKS:
        active.append("workers never unlink the socket")
    active.append("the arbiter unlinks only the socket it bound")
    active.append("nothing but a dead socket is replaced at bind")
    if GTHREAD_GENERATION != "graceful":
        active.append("retiring workers finish kept-alive connections")
    active.append("successor boots while its predecessor drains")
    return active
