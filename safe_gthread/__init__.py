"""safe-gthread: gunicorn's threaded worker, without losing the unix socket or a request.

Use it with one line in a gunicorn config file::

    worker_class = "safe_gthread.Worker"

or ``gunicorn -k safe_gthread.Worker``. Any other worker class can keep the socket file
with ``import safe_gthread.guard; safe_gthread.guard.install()`` in the config file.

Its own settings (``max_worker_memory``, ``max_worker_lifetime``, ``max_retiring``,
``heal``) go in the same config file::

    import safe_gthread
    safe_gthread.configure(max_worker_memory="512M", max_worker_lifetime=3600)

or in ``SAFE_GTHREAD_*`` environment variables.
"""
from . import guard
from ._settings import configure
from ._version import __version__
from ._worker import Worker

__all__ = ["Worker", "configure", "guard", "__version__"]
