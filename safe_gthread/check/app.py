"""The bundled WSGI app for ``safe-gthread check``, the tests and the benchmarks: no
framework needed.

``GET`` any path: ``Hello World``. ``POST``: reads the body, answers its length.
Environment variables, read at import:

- ``SAFE_GTHREAD_APP_SLEEP`` (seconds): every request waits that long first, like an app
  that waits on a database: throughput bound by worker threads rather than the CPU.
- ``SAFE_GTHREAD_APP_BOOT_SLEEP`` (seconds): importing the app takes that long, like an
  app that loads a framework and its models: what a restart costs in capacity.
- ``SAFE_GTHREAD_APP_LEAK`` (bytes): every request keeps that many bytes forever (a
  leak), for the ``max_worker_memory`` tests and benchmarks.
- ``SAFE_GTHREAD_APP_READY_DIR`` (a directory): once imported, the app creates an empty
  file named after its pid there, so a test can tell a booted worker from a booting one.
- ``SAFE_GTHREAD_APP_FAIL_IF_EXISTS`` (a path): importing the app raises while that file
  exists, like broken code on disk; a test breaks and fixes it while the server runs.
"""
import os
import time

SLEEP = float(os.environ.get("SAFE_GTHREAD_APP_SLEEP") or 0)
BOOT_SLEEP = float(os.environ.get("SAFE_GTHREAD_APP_BOOT_SLEEP") or 0)
LEAK = int(os.environ.get("SAFE_GTHREAD_APP_LEAK") or 0)

_leaked = []

if BOOT_SLEEP:
    time.sleep(BOOT_SLEEP)

_FAIL_IF = os.environ.get("SAFE_GTHREAD_APP_FAIL_IF_EXISTS")
if _FAIL_IF and os.path.exists(_FAIL_IF):
    raise RuntimeError("broken deploy: %s exists" % _FAIL_IF)

if os.environ.get("SAFE_GTHREAD_APP_READY_DIR"):
    open(os.path.join(os.environ["SAFE_GTHREAD_APP_READY_DIR"], str(os.getpid())), "w").close()


def app(environ, start_response):
    if SLEEP:
        time.sleep(SLEEP)
    if LEAK:
        _leaked.append(b"\x01" * LEAK)  # written, so resident, not just reserved
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = ("%d bytes" % len(environ["wsgi.input"].read(length))).encode()
    else:
        body = b"Hello World"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
