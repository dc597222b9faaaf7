"""The ``safe-gthread check`` command and the test rig it is built on.

Nothing here runs inside a production gunicorn: ``import safe_gthread`` (what
``-k safe_gthread.Worker`` does) never imports this package. The tests and the
benchmarks use these modules as a supported rig:

- ``runner``: start, signal and stop a real gunicorn on a unix socket (``Gunicorn``);
- ``proxy``: h2o or nginx in front of it (``Proxy``);
- ``load``: a bounded HTTP client for unix and TCP sockets (``run_load``, ``request``);
- ``procs``: process groups, never anything by name;
- ``app``: the bundled WSGI app;
- ``cli``: the command itself.
"""
