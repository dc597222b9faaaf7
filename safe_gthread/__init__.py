"""safe-gthread: gunicorn's threaded worker, without losing the unix socket or a request.

Use it with one line in a gunicorn config file::

    worker_class = "safe_gthread.Worker"

or ``gunicorn -k safe_gthread.Worker``. Any other worker class can keep the socket file
with ``import safe_gthread.guard; safe_gthread.guard.install()`` in the config file.
"""
from . import guard
from ._version import __version__
from ._worker import Worker

__all__ = ["Worker", "guard", "__version__"]
