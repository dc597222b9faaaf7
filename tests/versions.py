"""Version facts for the tests, in one place: what stock gunicorn does per version (the
expectations the controls are held to), and what cannot run on a cell and why."""
import errno
import socket
import sys

import gunicorn

GUNICORN = tuple(gunicorn.version_info)
PYTHON = sys.version_info[:2]

#: gunicorn <= 19.6.0 workers unlink the socket when they exit (benoitc/gunicorn#1298):
#: the stock worker, our control, must lose the socket file there.
STOCK_WORKERS_UNLINK = GUNICORN < (19, 7)

#: gunicorn >= 27.0.1: a retiring stock gthread worker answers one more request on each
#: kept-alive connection and loses nothing (27.0.0 still closes them at once).
STOCK_RETIRES_WITHOUT_LOSS = GUNICORN >= (27, 0, 1)

#: gunicorn >= 27.0.0: stock gthread answers every request of a pipelined batch (several in
#: one write). 19.x - 26.x answer the first only: the rest are already in the parser's
#: buffer, which never wakes the poller, and wait for the keep-alive timeout to close the
#: connection unanswered.
STOCK_ANSWERS_PIPELINED = GUNICORN >= (27, 0, 0)

#: No stock gthread answers a request pipelined behind the response that retires the
#: worker: from that response on it says ``Connection: close`` (27.0.1 included).
STOCK_ANSWERS_PIPELINED_WHILE_RETIRING = False

#: gunicorn 21 - 23: a HUP sends each old worker a SIGTERM at every pass of
#: manage_workers, and one that lands while the worker's interpreter shuts down kills it:
#: "Worker (pid:N) was sent SIGTERM!" at ERROR (benoitc/gunicorn#3050). 19.x - 20.x do
#: the same but log nothing for it; 24.0 sends one SIGTERM per worker.
STOCK_HUP_LOGS_SIGTERM_ERROR = (21,) <= GUNICORN < (24,)

#: The ``reuse_port`` setting exists from 19.8 (19.6.0 ignores the name in a config file).
HAS_REUSE_PORT = GUNICORN >= (19, 8)

#: gunicorn >= 24: with ``reuse_port`` the workers bind, not the arbiter; where the kernel
#: refuses SO_REUSEPORT on AF_UNIX the stock workers crash-loop instead of exiting.
REUSE_PORT_BINDS_IN_WORKERS = GUNICORN >= (24,)

#: gunicorn >= 27: stock binds an abstract name (``unix:\\0name``) but its shutdown calls
#: ``os.unlink`` on it (ValueError: embedded null). Older versions ``os.stat`` it before
#: binding and fail to start with the same ValueError.
STOCK_BINDS_ABSTRACT = GUNICORN >= (27,)

#: Which stock worker classes lose the socket file on a worker restart (HUP), 19.6.0:
#: gthread (``UnixSocket.close`` at the end of ``run``) and eventlet (its accept loop
#: closes the listener); sync and gevent keep it.
STOCK_CLASSES_LOSING_FILE = {"gthread", "eventlet"} if STOCK_WORKERS_UNLINK else set()


def kernel_refuses_unix_reuseport():
    """True where setting SO_REUSEPORT on an AF_UNIX socket fails with an error gunicorn
    does not ignore (Linux >= 6.x: EOPNOTSUPP)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        return exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL)
    finally:
        probe.close()
    return False


KERNEL_REFUSES_UNIX_REUSEPORT = kernel_refuses_unix_reuseport()


# -- the load tests' controls (tests/load/) --------------------------------------------------

#: The stock worker is the control on gunicorn 19.x (the matrix's 19.6.0 and 19.9.0 cells),
#: where it was measured losing requests; newer cells run only the safe worker.
LOAD_CONTROL = GUNICORN < (20,)

#: 19.x accepts a connection straight into its thread pool (20.0 started parking it in the
#: poller until readable), so a retiring 19.7+ worker drops nothing that arrived on a fresh
#: connection: through nginx without upstream keep-alive the control loses nothing there;
#: 19.6.0's loses everything once its first retiring worker has deleted the socket file.
STOCK_LOSES_FRESH = STOCK_WORKERS_UNLINK


# -- what cannot run here ------------------------------------------------------------------

#: The one list of worker classes that cannot boot on a cell, with the reason:
#: ``(worker class, applies here, reason)``. A scenario test may skip a worker class only
#: for one of these; under ``CI`` any other skip of one is a failure.
KNOWN_INCOMPATIBLE = [
    ("gevent", GUNICORN < (19, 8) and PYTHON >= (3, 7),
     "gunicorn < 19.8 imports gunicorn.workers.async, and async is a keyword from Python 3.7"),
    ("eventlet", GUNICORN < (19, 8) and PYTHON >= (3, 7),
     "gunicorn < 19.8 imports gunicorn.workers.async, and async is a keyword from Python 3.7"),
    ("eventlet", GUNICORN >= (26,), "gunicorn 26 removed the eventlet worker"),
]


def incompatibility(worker_class):
    """Why ``worker_class`` cannot run on this cell, or None."""
    for name, applies, reason in KNOWN_INCOMPATIBLE:
        if name == worker_class and applies:
            return reason
    return None
