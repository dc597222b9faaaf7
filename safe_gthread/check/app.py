"""The bundled WSGI app for ``safe-gthread check``, the tests and the benchmarks: no
framework needed.

``GET`` any path: ``Hello World``. ``POST``: reads the body, answers its length.
``SAFE_GTHREAD_APP_SLEEP`` (seconds, read at import) makes every request wait that long
first, like an app that waits on a database: the benchmarks use it to compare workers
when throughput is bound by worker threads rather than by the CPU.
"""
import os
import time

SLEEP = float(os.environ.get("SAFE_GTHREAD_APP_SLEEP") or 0)


def app(environ, start_response):
    if SLEEP:
        time.sleep(SLEEP)
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = ("%d bytes" % len(environ["wsgi.input"].read(length))).encode()
    else:
        body = b"Hello World"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
