"""Start and stop a real h2o or nginx in front of a gunicorn unix socket, on loopback.

For ``safe-gthread check --proxy``, the load tests and the benchmarks: the failures that
matter (502s, upstream resets) only show through the proxies users run. Each proxy runs
in a new session with a generated config in its own directory, listening on a free
127.0.0.1 port; readiness is a real request through it against a monotonic deadline;
``stop()`` ends its whole process group (SIGTERM, then SIGKILL), never anything by name.
"""
import os
import socket
import subprocess
import time

from . import load as _load, procs as _procs

__all__ = ["Proxy", "ProxyError", "find_binary", "KINDS"]

KINDS = ("h2o", "nginx")

#: What a proxy writes to its error log when the upstream dropped a request (a reset,
#: a broken pipe, a connection closed before the response): no line of these may
#: appear behind a worker that loses nothing. nginx retries a GET on another
#: connection after most of them, so its log shows losses its clients never see.
UPSTREAM_FAILURES = (
    "reset by peer",
    "broken pipe",
    "prematurely closed",
    "connection refused",
    "no such file",
    "no live upstreams",
    "upstream timed out",
    # h2o 2.2 names no cause: "[lib/core/proxy.c] in request:/:I/O error (head)" for a
    # keep-alive connection closed under a request, "connection failure" for a refused one.
    "i/o error",
    "connection failure",
)


class ProxyError(RuntimeError):
    """The proxy did not start or answer; the message ends with its log."""


def find_binary(kind):
    """The path of the ``h2o`` or ``nginx`` executable, or None when it is not installed."""
    if kind not in KINDS:
        raise ValueError("unknown proxy %r; expected one of %s" % (kind, ", ".join(KINDS)))
    return _procs.find_executable(kind)


def free_port():
    """A loopback TCP port that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _upstream_url(upstream):
    if isinstance(upstream, tuple):
        return "%s:%d" % upstream
    return "unix:%s" % upstream


def _h2o_config(directory, port, upstream_sock, upstream_keepalive, threads):
    # user: root, or h2o drops to "nobody" and cannot reach a socket under /tmp/pytest-of-root.
    # proxy.timeout.keepalive 0 closes each upstream connection after its response.
    return "\n".join([
        "user: root",
        "pid-file: %s" % os.path.join(directory, "h2o.pid"),
        "error-log: %s" % os.path.join(directory, "error.log"),
        "num-threads: %d" % threads,
        "listen:",
        "  host: 127.0.0.1",
        "  port: %d" % port,
        "hosts:",
        "  default:",
        "    paths:",
        "      /:",
        '        proxy.reverse.url: "http://%s/"' % (
            "[unix:%s]" % upstream_sock if not isinstance(upstream_sock, tuple)
            else "%s:%d" % upstream_sock),
        "        proxy.timeout.keepalive: %d" % (2000 if upstream_keepalive else 0),
        "",
    ])


def _nginx_config(directory, port, upstream_sock, upstream_keepalive, threads):
    temp = os.path.join(directory, "nginx-temp")
    upstream = ["server %s;" % _upstream_url(upstream_sock)]
    location = ["proxy_pass http://gunicorn;"]
    if upstream_keepalive:
        # The documented way to keep upstream connections: HTTP/1.1 and no "close" header.
        upstream.append("keepalive 32;")
        location += ["proxy_http_version 1.1;", 'proxy_set_header Connection "";']
    paths = "\n".join("    %s_temp_path %s;" % (name, os.path.join(temp, name))
                      for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return """\
# user root: its workers must reach a socket in a root-only directory.
user root;
daemon off;
worker_processes %(threads)d;
pid %(directory)s/nginx.pid;
error_log %(directory)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
%(paths)s
    upstream gunicorn {
        %(upstream)s
    }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            %(location)s
        }
    }
}
""" % {"threads": threads, "directory": directory, "paths": paths, "port": port,
       "upstream": "\n        ".join(upstream), "location": "\n            ".join(location)}


class Proxy(object):
    """``Proxy("nginx", directory, "/path/gunicorn.sock").start()``; ``.address`` is
    ``("127.0.0.1", port)``; ``.stop()`` is safe to call twice. ``upstream_sock`` may also
    be a ``(host, port)`` tuple."""

    def __init__(self, kind, directory, upstream_sock, upstream_keepalive=True, threads=1):
        if kind not in KINDS:
            raise ValueError("unknown proxy %r; expected one of %s" % (kind, ", ".join(KINDS)))
        self.kind = kind
        self.directory = os.path.abspath(str(directory))
        # A unix socket path, or ("127.0.0.1", port) for a TCP upstream (the benchmarks'
        # "TCP bind" path, the original report's workaround).
        self.upstream_sock = (upstream_sock if isinstance(upstream_sock, tuple)
                              else os.path.abspath(str(upstream_sock)))
        self.upstream_keepalive = upstream_keepalive
        self.threads = threads
        self.config_path = os.path.join(self.directory, "%s.conf" % kind)
        self.error_log_path = os.path.join(self.directory, "error.log")
        self.out_path = os.path.join(self.directory, "%s.out" % kind)
        self.port = None
        self.proc = None
        self.pgid = None
        self._out = None

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    @property
    def label(self):
        if self.kind == "nginx":
            return "nginx keepalive" if self.upstream_keepalive else "nginx plain"
        return self.kind

    def _write_config(self):
        os.makedirs(self.directory, exist_ok=True)
        if self.kind == "nginx":
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(self.directory, "nginx-temp", name), exist_ok=True)
        make = _nginx_config if self.kind == "nginx" else _h2o_config
        with open(self.config_path, "w") as fh:
            fh.write(make(self.directory, self.port, self.upstream_sock,
                          self.upstream_keepalive, self.threads))

    def _command(self, binary):
        if self.kind == "nginx":
            # -e: the startup error log too, before the config's error_log applies
            # (nginx >= 1.19.5; otherwise it opens /var/log/nginx/error.log first).
            return [binary, "-p", self.directory, "-e", self.error_log_path,
                    "-c", self.config_path]
        return [binary, "-m", "worker", "-c", self.config_path]

    def start(self, timeout=10.0):
        """Start in a new session and wait until a request through it answers 200."""
        binary = find_binary(self.kind)
        if binary is None:
            raise ProxyError("%s is not installed" % self.kind)
        # The port is free when chosen but could be taken before the proxy binds it:
        # another try with a new port, not a failure.
        for attempt in range(3):
            self.port = free_port()
            self._write_config()
            self._out = open(self.out_path, "ab")
            self.proc = subprocess.Popen(self._command(binary), cwd=self.directory,
                                         stdin=subprocess.DEVNULL, stdout=self._out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            self.pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
            try:
                self._wait_ready(timeout)
                return self
            except ProxyError:
                in_use = "in use" in self.log().lower()
                self.stop()
                if not in_use or attempt == 2:
                    raise
        return self

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProxyError("%s exited with %s\n%s" % (
                    self.kind, self.proc.returncode, self.log()))
            try:
                status = _load.request(self.address, timeout=2.0)[0]
                if status == 200:
                    return
                last = "HTTP %d" % status
            except (OSError, EOFError, ValueError, IndexError) as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise ProxyError("timed out after %ss waiting for %s on %s:%s to answer (last: %s)\n%s"
                         % (timeout, self.kind, self.address[0], self.port, last, self.log()))

    def stop(self):
        """End the proxy's process group: SIGTERM, then SIGKILL. Safe to call twice."""
        if self.proc is not None:
            _procs.stop_group(self.proc, self.pgid, 5.0)
        if self._out is not None:
            self._out.close()
            self._out = None

    # -- what it said -------------------------------------------------------------------
    def error_log(self):
        return _procs.read_text(self.error_log_path)

    def upstream_failures(self):
        """The error log's lines that say the upstream dropped a request."""
        return [line for line in self.error_log().splitlines()
                if any(marker in line.lower() for marker in UPSTREAM_FAILURES)]

    def log(self):
        return _procs.tails([self.config_path, self.error_log_path, self.out_path])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
