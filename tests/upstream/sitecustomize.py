"""Imported by every Python that tests/test_upstream.py starts (it is on PYTHONPATH):
the pytest run of gunicorn's own tests and the gunicorn servers those tests start.

With ``SAFE_GTHREAD_STANDIN=1``, ``safe_gthread.Worker`` is installed as gunicorn
installs a worker class (``Worker.setup()``), then stands in for
``gunicorn.workers.gthread.ThreadWorker``: every ``gthread.ThreadWorker(...)`` in
gunicorn's tests, and every ``--worker-class gthread`` server they start, runs ours.
"""
import os

if os.environ.get("SAFE_GTHREAD_STANDIN") == "1":
    import standin  # noqa: F401  (the work is done at import)
