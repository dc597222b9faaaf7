"""A small HTTP/1.1 load client over a unix socket or TCP: bounded, threaded, strict.

Used by ``safe-gthread check`` and by the tests. Each client thread either reuses one
keep-alive connection for as long as the server keeps it open (as a proxy's upstream
pool does) or opens a fresh connection per request. Anything but a complete 2xx
response counts as a failed request: a refused or missing socket, a reset, a
connection closed before the response was complete. A keep-alive connection closed
by the server between two responses is not a failure; one closed after the next
request was sent is, since a proxy would have answered that request with 502.
"""
import collections
import socket
import threading
import time

__all__ = ["LoadResult", "run_load", "request", "idle_keepalive"]

REQUEST_TIMEOUT = 10.0


class LoadResult(object):
    def __init__(self):
        self.requests = 0
        self.failed = 0
        self.errors = collections.Counter()
        self.seconds = 0.0
        self.max_latency = 0.0  # seconds, the slowest complete response
        self._lock = threading.Lock()

    def add(self, error=None, latency=None):
        with self._lock:
            self.requests += 1
            if latency is not None and error is None and latency > self.max_latency:
                self.max_latency = latency
            if error is not None:
                self.failed += 1
                self.errors[error] += 1

    @property
    def ok(self):
        return self.requests - self.failed

    def as_dict(self):
        return {"requests": self.requests, "failed_requests": self.failed,
                "errors": dict(self.errors), "seconds": round(self.seconds, 3)}


def _connect(address, timeout):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _build(method, path, body, keepalive):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: localhost"]
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
        lines.append("Content-Type: application/octet-stream")
    if not keepalive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


class _Reader(object):
    """Reads one response; ``buf`` carries bytes across responses on one connection."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def request(address, method="GET", path="/", body=None, timeout=REQUEST_TIMEOUT):
    """One request on a fresh connection; returns ``(status, headers, body)``."""
    sock = _connect(address, timeout)
    try:
        sock.sendall(_build(method, path, body, keepalive=False))
        return _Reader(sock).response()
    finally:
        sock.close()


def idle_keepalive(address, timeout=REQUEST_TIMEOUT, attempts=20):
    """A connection that has carried one request and now sits idle, kept alive: what a
    proxy's upstream pool holds between bursts. The caller closes it. A response with
    ``Connection: close`` (a worker that was retiring) is retried on a new connection."""
    for _ in range(attempts):
        sock = _connect(address, timeout)
        try:
            sock.sendall(_build("GET", "/", None, keepalive=True))
            status, headers, _ = _Reader(sock).response()
        except BaseException:
            sock.close()
            raise
        if status == 200 and headers.get("connection", "").lower() != "close":
            return sock
        sock.close()
    raise ValueError("the server did not keep a connection alive in %d attempts" % attempts)


def _classify(exc):
    if isinstance(exc, EOFError):
        return "closed before the response"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def _client(address, keepalive, method, body, result, should_stop, timeout):
    sock = reader = None
    payload = _build(method, "/", body, keepalive)
    while not should_stop():
        sent = time.monotonic()  # connecting included: a stalled server queues there too
        try:
            if sock is None:
                sock = _connect(address, timeout)
                reader = _Reader(sock)
            sock.sendall(payload)
            status, headers, _ = reader.response()
        except (OSError, EOFError, ValueError, IndexError) as exc:
            result.add(_classify(exc))
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.01)  # a dead socket fails fast: do not spin
            continue
        result.add(None if 200 <= status < 300 else "HTTP %d" % status,
                   time.monotonic() - sent)
        if not keepalive or headers.get("connection", "").lower() == "close":
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def run_load(address, seconds=10.0, max_requests=None, concurrency=8, keepalive_share=0.5,
             method="GET", body=None, stop=None, progress=None, timeout=REQUEST_TIMEOUT,
             result=None):
    """Drive ``concurrency`` clients at ``address`` until ``seconds`` pass, ``max_requests``
    are sent, or ``stop()`` returns true; ``progress(result, seconds_left)`` is called
    about twice a second. Returns ``result`` (a :class:`LoadResult`, or a subclass that
    records more), filled; a new one when not given."""
    if result is None:
        result = LoadResult()
    started = time.monotonic()
    deadline = started + seconds
    done = threading.Event()

    def should_stop():
        return (done.is_set() or time.monotonic() >= deadline
                or (max_requests is not None and result.requests >= max_requests))

    keepalive_clients = int(round(concurrency * keepalive_share))
    threads = [threading.Thread(target=_client, daemon=True,
                                args=(address, i < keepalive_clients, method, body,
                                      result, should_stop, timeout))
               for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            if stop is not None and stop():
                done.set()
            if progress is not None:
                progress(result, max(deadline - time.monotonic(), 0.0))
            for thread in threads:
                thread.join(0.5 / len(threads))
    finally:
        done.set()
        for thread in threads:
            thread.join()
        result.seconds = time.monotonic() - started
    return result
