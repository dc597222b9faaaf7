"""``safe_gthread.Worker``: gunicorn's gthread worker that keeps the socket and every request."""
import logging

from gunicorn.workers.gthread import ThreadWorker

from . import _compat, _handoff, _retire, _reuseport, guard
from ._version import __version__

_announced = []

#: The retirement this gunicorn's gthread loop needs, chosen once (``_retire``).
_Retirement = _retire.for_generation()


class Worker(_Retirement, ThreadWorker):
    """gunicorn's threaded worker (``gthread``) that neither deletes the unix socket nor
    drops a request when it restarts.

    Use it with ``worker_class = "safe_gthread.Worker"`` or ``-k safe_gthread.Worker``;
    every gthread setting (``threads``, ``keepalive``, ``max_requests``,
    ``graceful_timeout``) means what it means for the stock worker.

    - When gunicorn loads the class (in the arbiter, before it binds), it installs
      :mod:`safe_gthread.guard`: only the arbiter that bound the socket removes it,
      at its own stop, and only if the path is still that socket.
    - A worker that retires (``max_requests``, HUP, TERM) stops accepting at once,
      finishes what it accepted and answers one more request on each kept-alive
      connection with ``Connection: close``. gunicorn 27.0.1 and later do this
      themselves; on 19.x - 27.0.0 the worker's own retirement does it.
    - A worker that retires for ``max_requests`` gets its successor forked at once,
      instead of after it has exited.
    """

    @classmethod
    def setup(cls):
        parent = getattr(super(Worker, cls), "setup", None)
        if parent is not None:
            parent()
        log = logging.getLogger("gunicorn.error")
        guard.install(log)
        _handoff.install()
        _reuseport.install()
        if _compat.GTHREAD_GENERATION is None:
            _compat.warn_unrecognised("safe_gthread.Worker's retirement",
                                      ["gthread.ThreadWorker's stop path"], log)
        if not _announced:
            _announced.append(True)
            log.info("safe-gthread %s on gunicorn %s (Python %s): %s.", __version__,
                     _compat.GUNICORN_VERSION, _compat.PYTHON_VERSION,
                     "; ".join(_compat.protections()))
