"""Helpers for the load tests: wrk runs that stop on a condition, proxies, and what a run
must show (the version facts the stock control is held to are in tests/versions.py)."""
import importlib.util
import os
import re
import signal
import subprocess
import time

from conftest import require_tool

from safe_gthread.check import load as _load, procs as _procs
from safe_gthread.check.proxy import Proxy

#: The original report's 5 workers x 5 threads, keep-alive 2 s; max_requests scaled from 512 so that a
#: loaded 2-core CI runner still sees RESTARTS restarts within a few seconds.
SETTINGS = {"workers": 5, "threads": 5, "keepalive": 2, "max_requests": 200,
            "graceful_timeout": 10}
HARSH = dict(SETTINGS, max_requests=64, max_requests_jitter=32)

RESTARTS = 50           # the fewest restarts a safe run must see
TARGET_RESTARTS = 60    # a safe run stops once it has seen this many ...
MIN_SECONDS = 4.0       # ... and has run this long
MAX_SECONDS = 60.0      # hard bound of every run (a safe worker serves on while its
                        # successor boots: fewer restarts per request than stock; on a
                        # loaded CI machine 27.0.0 reached 39 - 45 in 40 s)
CONNECTIONS = 200       # wrk -c200, as in the original report
WRK_THREADS = 2         # one per core here
DIRECT_CLIENTS = 32     # Python keep-alive clients straight on the socket
POST_BODY = 4096        # bytes: nginx holds it in memory (client_body_buffer_size 8k/16k)

#: The original report's app: a bottle "Hello World" (examples/web.py). The proxy runs serve
#: it where bottle is installed (every cell of tests/matrix.py); elsewhere, and for the
#: POST runs (its one route answers GET only), the bundled app.
WEB_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "examples", "web.py")
BOTTLE = importlib.util.find_spec("bottle") is not None


class Outcome(object):
    """What one run saw: counts from the client, the proxy's log and the server's."""

    def __init__(self, label, requests, non2xx, socket_errors, upstream_failures, restarts,
                 inode_kept, tracebacks, seconds, detail="", lifetimes=()):
        self.label = label
        self.requests = requests
        self.non2xx = non2xx
        self.socket_errors = socket_errors
        self.upstream_failures = upstream_failures
        self.restarts = restarts
        self.inode_kept = inode_kept
        self.tracebacks = tracebacks
        self.seconds = seconds
        self.detail = detail
        self.lifetimes = list(lifetimes)  # requests per retired safe worker (its log line)

    @classmethod
    def combined(cls, outcomes):
        """One outcome for several runs of the same worker."""
        first = outcomes[0]
        errors = {}
        for outcome in outcomes:
            for name, count in outcome.socket_errors.items():
                errors[name] = errors.get(name, 0) + count
        return cls(first.label, sum(o.requests for o in outcomes),
                   sum(o.non2xx for o in outcomes), errors,
                   [line for o in outcomes for line in o.upstream_failures],
                   sum(o.restarts for o in outcomes), all(o.inode_kept for o in outcomes),
                   sum(o.tracebacks for o in outcomes), sum(o.seconds for o in outcomes),
                   detail="\n".join(o.detail for o in outcomes),
                   lifetimes=[n for o in outcomes for n in o.lifetimes])

    @property
    def ok(self):
        return self.requests - self.non2xx - sum(self.socket_errors.values())

    @property
    def per_restart(self):
        """Successful requests per restart: beside any throughput, like for like."""
        return self.ok / float(self.restarts) if self.restarts else None

    @property
    def failures(self):
        """Every sign of a lost request; the control must show at least one."""
        return (self.non2xx + sum(self.socket_errors.values()) + len(self.upstream_failures)
                + (0 if self.inode_kept else 1))

    def headline(self):
        return repr(self).split("\n", 1)[0]

    def __repr__(self):
        return ("%s: %d requests in %.1fs, %d non-2xx, socket errors %s, %d upstream failures "
                "in the proxy's log %s, %d restarts, socket file %s, %d tracebacks\n%s" % (
                    self.label, self.requests, self.seconds, self.non2xx,
                    self.socket_errors or "none", len(self.upstream_failures),
                    self.upstream_failures[:3], self.restarts,
                    "kept" if self.inode_kept else "LOST/REPLACED", self.tracebacks,
                    self.detail))


def stop_condition(server, inode, worker, live_failures):
    """When a run has seen enough: the safe worker after TARGET_RESTARTS restarts; the
    control as soon as it visibly fails (19.6.0: the file is gone), else like the safe one."""
    started = time.monotonic()

    def enough():
        elapsed = time.monotonic() - started
        if worker == "stock":
            if elapsed >= 2.0 and (server.inode() != inode or live_failures()):
                return True
        return elapsed >= MIN_SECONDS and server.restarts() >= TARGET_RESTARTS
    return enough


_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(url, stop, max_seconds=MAX_SECONDS, connections=CONNECTIONS, threads=WRK_THREADS,
            script=None):
    """wrk for up to ``max_seconds``, interrupted (SIGINT: it still prints its summary) once
    ``stop()`` is true. Returns (requests, non2xx, socket_errors dict, seconds, output)."""
    cmd = [require_tool("wrk"), "-t%d" % threads, "-c%d" % connections, "-d%ds" % int(max_seconds),
           "--timeout", "10s"]  # not wrk's 2 s: a slow answer on a busy runner is no loss
    if script:
        cmd += ["-s", script]
    proc = subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    try:
        deadline = time.monotonic() + max_seconds + 15
        while proc.poll() is None and time.monotonic() < deadline:
            if stop():
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    match = _WRK_REQUESTS.search(output)
    assert match, "wrk printed no summary:\n" + output
    requests = int(match.group(1))
    seconds = float(match.group(2)) * _UNITS[match.group(3)]
    non2xx = _WRK_NON2XX.search(output)
    sock = _WRK_SOCKET.search(output)
    errors = {}
    if sock:
        errors = {name: int(value) for name, value in
                  zip(("connect", "read", "write", "timeout"), sock.groups()) if int(value)}
    return requests, int(non2xx.group(1)) if non2xx else 0, errors, seconds, output


def post_script(directory, size=POST_BODY):
    path = os.path.join(str(directory), "post.lua")
    with open(path, "w") as fh:
        fh.write('wrk.method = "POST"\n'
                 'wrk.body = string.rep("x", %d)\n'
                 'wrk.headers["Content-Type"] = "application/octet-stream"\n' % size)
    return path


#: A gunicorn server hook: every worker, stock or safe, logs how many requests it served.
COUNT_REQUESTS = (
    "def worker_exit(server, worker):",
    "    if worker.nr:  # 0: the arbiter's own bookkeeping call for a worker gone already",
    "        server.log.info('worker %s served %s requests', worker.pid, worker.nr)",
)
_LIFETIME = re.compile(r"worker \d+ served (\d+) requests")


def through_proxy(gunicorn_server, tmp_path, worker, kind, upstream_keepalive, settings,
                  post=False, seconds=None, guard=False, bundled_app=False, config=(),
                  during=None):
    """One run: gunicorn with ``worker`` behind a real proxy, wrk -c200 through it, serving
    the report's bottle app (GET) or the bundled one (POST, ``bundled_app``, or no bottle
    installed); for ``seconds`` exactly when given (runs that compare goodput), else until
    enough restarts. Every worker's request count is logged at its exit (``lifetimes``).
    ``config``: more lines for the config file; ``during(server)``: called every 0.2 s
    while wrk runs (to act on the server under load)."""
    require_tool(kind)
    if BOTTLE and not post and not bundled_app:
        settings = dict(settings, files=[WEB_PY], app="web:app")
    server = gunicorn_server(worker, guard=guard, config=COUNT_REQUESTS + tuple(config),
                             **settings)
    inode = server.inode()
    proxy = Proxy(kind, tmp_path / ("%s-%s-%s" % (kind, worker, os.path.basename(
        server.directory))), server.sock_path, upstream_keepalive=upstream_keepalive)
    try:
        proxy.start()
        script = post_script(proxy.directory) if post else None
        if seconds:
            stop, max_seconds = (lambda: False), seconds
        else:
            stop = stop_condition(server, inode, worker, lambda: proxy.upstream_failures())
            max_seconds = MAX_SECONDS
        if during is not None:
            stop = _acting(stop, server, during)
        requests, non2xx, errors, took, output = run_wrk(
            "http://127.0.0.1:%d/" % proxy.port, stop, max_seconds=max_seconds, script=script)
    finally:
        proxy.stop()
    tracebacks = server.tracebacks()
    return Outcome("%s worker via %s%s, %s" % (worker, proxy.label, " (POST)" if post else "",
                                               server.app),
                   requests, non2xx, errors, proxy.upstream_failures(), server.restarts(),
                   server.inode() == inode, tracebacks, took,
                   detail=(traceback_blocks(server) if tracebacks else "") + output + "\n"
                   + server.log(),
                   lifetimes=[int(n) for n in _LIFETIME.findall(server.errorlog())])


def _acting(stop, server, during):
    def check():
        during(server)
        return stop()
    return check


_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|\S.*Error.*\n)*",
                        re.M)


def traceback_blocks(server):
    """Every traceback in the server's logs, whole, first in a failure's message: a
    long log's tail may not hold them."""
    text = "".join(_procs.read_text(os.path.join(server.directory, name))
                   for name in ("gunicorn.log", "gunicorn.out"))
    return "--- tracebacks ---\n%s\n" % "\n".join(_TRACEBACK.findall(text))


def direct(gunicorn_server, worker, settings):
    """One run: Python keep-alive clients straight on the unix socket, as a proxy's pool."""
    server = gunicorn_server(worker, **settings)
    inode = server.inode()
    seen = {}

    def progress(result, _left):
        seen["failed"] = result.failed

    stop = stop_condition(server, inode, worker, lambda: seen.get("failed", 0))
    result = _load.run_load(server.sock_path, seconds=MAX_SECONDS, concurrency=DIRECT_CLIENTS,
                            keepalive_share=1.0, stop=stop, progress=progress)
    http = sum(n for name, n in result.errors.items() if name.startswith("HTTP"))
    sock_errors = {name: n for name, n in result.errors.items() if not name.startswith("HTTP")}
    return Outcome("%s worker, direct keep-alive clients" % worker, result.requests, http,
                   sock_errors, [], server.restarts(), server.inode() == inode,
                   server.tracebacks(), result.seconds, detail=server.log())


def assert_lost_nothing(outcome):
    print(outcome.headline())  # shown with -s or -rP, and with every failure
    assert outcome.non2xx == 0, outcome
    assert not outcome.socket_errors, outcome
    assert not outcome.upstream_failures, outcome
    assert outcome.inode_kept, outcome
    assert outcome.tracebacks == 0, outcome
    assert outcome.restarts >= RESTARTS, outcome


def assert_control_failed(outcome):
    print(outcome.headline())
    assert outcome.failures > 0, (
        "the stock control lost nothing, so this test proves nothing here: %r" % outcome)
