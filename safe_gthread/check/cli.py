"""``safe-gthread check``: is this gunicorn affected, and does ``safe_gthread.Worker`` hold?

Runs the installed gunicorn twice on a unix socket in a fresh temporary directory (or on
a free 127.0.0.1 port with ``--bind tcp``, and ``--reuse-port`` for gunicorn's
``reuse_port``), with
the bundled hello-world app and a small ``max_requests``: first with the stock gthread
worker, then with ``safe_gthread.Worker``. Each run gets the same bounded load (half
keep-alive, half fresh connections) from our own client, or through h2o or nginx with
``--proxy``. Then it compares them: restarts, whether the socket file survived (same
inode), failed requests, tracebacks in the log.

Exit status: 0 the safe worker held (socket kept, no failed request), 1 it did not,
2 bad usage or the check could not run (or was inconclusive: no worker restarted),
128 + the signal number when interrupted (Ctrl-C: 130). Every process it started is
stopped and the temporary directory removed, also when interrupted.

The temporary directory is created in ``$SAFE_GTHREAD_TMPDIR`` when set, else in the
system's temporary directory (``$TMPDIR``, ``/tmp``), named ``safe-gthread-check-*``.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager

from .. import _compat
from . import load as _load, runner as _runner
from .._version import __version__

EXIT_HELD, EXIT_NOT_HELD, EXIT_CANNOT_RUN = 0, 1, 2

TMPDIR_ENV = "SAFE_GTHREAD_TMPDIR"
TMP_PREFIX = "safe-gthread-check-"
#: sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

#: Once the stock worker has deleted the socket nothing more can be learned: stop its
#: load this long after, instead of timing out every remaining request.
AFTER_SOCKET_LOST = 1.0
#: Load clients: two per worker thread, keep-alive and fresh connections half each,
#: bounded so that large --workers/--threads do not turn the check into a load test.
CLIENTS_PER_THREAD = 2
MAX_CLIENTS = 64
#: How long each gunicorn may take to answer, and to stop before it is killed.
START_TIMEOUT = 30.0
STOP_GRACE = 10.0
#: Plain progress lines (stderr not a terminal) come this often.
PROGRESS_EVERY = 3.0

PHASES = (("stock", "stock gthread"), ("safe", "safe_gthread.Worker"))


class CannotRun(Exception):
    """The check could not run; the message says why (exit 2)."""


# -- command line --------------------------------------------------------------------------

def _int_between(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a whole number, got %r" % text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                "expected a whole number from %d to %d, got %d" % (low, high, value))
        return value
    return parse


def _parser():
    parser = argparse.ArgumentParser(
        prog="safe-gthread",
        description="safe-gthread %s: gunicorn's gthread worker without losing the unix "
                    "socket or a request on restart." % __version__)
    parser.add_argument("--version", action="version", version="safe-gthread " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check", help="show whether this gunicorn is affected and that the safe worker holds",
        description="Run the installed gunicorn (%s) with the stock gthread worker, then "
                    "with safe_gthread.Worker, on a temporary unix socket, restarting "
                    "workers under load; compare them and give a verdict. Exit status: "
                    "0 the safe worker held, 1 it did not, 2 bad usage, could not run or "
                    "inconclusive." % _compat.GUNICORN_VERSION,
        epilog="The temporary directory goes in $%s when set (else the system's); it is "
               "removed at the end, also on Ctrl-C." % TMPDIR_ENV)
    check.add_argument("--seconds", type=_int_between(1, 600), default=10, metavar="N",
                       help="seconds of load on each worker class (default: 10)")
    check.add_argument("--max-requests", type=_int_between(1, 1000000), default=200,
                       metavar="N", help="gunicorn max_requests: a worker restarts after "
                       "this many requests (default: 200)")
    check.add_argument("--workers", type=_int_between(1, 32), default=2, metavar="N",
                       help="gunicorn workers (default: 2)")
    check.add_argument("--threads", type=_int_between(1, 64), default=4, metavar="N",
                       help="gunicorn threads per worker (default: 4)")
    check.add_argument("--proxy", choices=("h2o", "nginx"),
                       help="send the load through this proxy (it must be installed)")
    check.add_argument("--bind", choices=("unix", "tcp"), default="unix",
                       help="serve on a unix socket (default) or on a free 127.0.0.1 port")
    check.add_argument("--reuse-port", action="store_true",
                       help="gunicorn reuse_port = True (with --bind tcp): from gunicorn 24 "
                       "each worker binds its own listener, whose queued connections a "
                       "restart resets unless net.ipv4.tcp_migrate_req = 1")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object instead of the table")
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "check":
        parser.print_usage(sys.stderr)
        sys.stderr.write("safe-gthread: error: a command is required: check\n")
        return EXIT_CANNOT_RUN
    if args.reuse_port and args.bind != "tcp":
        # On a unix socket reuse_port is not a load-spreading setting but a crash loop
        # (SO_REUSEPORT on AF_UNIX is refused by current kernels).
        parser.print_usage(sys.stderr)
        sys.stderr.write("safe-gthread: error: --reuse-port needs --bind tcp\n")
        return EXIT_CANNOT_RUN
    return Check(args).run()


# -- interrupts -----------------------------------------------------------------------------

class _Interrupts(object):
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, once: after that, and while
    ``held()`` (between starting gunicorn and recording its pid), they are only noted,
    so the cleanup always runs to the end and never loses track of a process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.armed = True
        self.received = None
        self.pending = False
        self._previous = {}

    def install(self):
        # Signal handlers can only be set from the main thread (e.g. not under a test
        # runner's worker thread); there the default Ctrl-C behaviour must do.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        self.pending = True

    def disarm(self):
        self.armed = False

    @contextmanager
    def held(self):
        was_armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = was_armed
            if was_armed and self.pending:
                self.armed = False
                raise KeyboardInterrupt


# -- progress -------------------------------------------------------------------------------

class _Progress(object):
    """One line rewritten in place on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._shown = False
        self._last = None

    def update(self, text, force=False):
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self._shown = True
        else:
            now = time.monotonic()
            if not force and self._last is not None and now - self._last < PROGRESS_EVERY:
                return
            self._last = now
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text):
        """A line that stays: ends the rewritten line first."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last = None

    def clear(self):
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self._shown = False


class _SocketWatch(threading.Thread):
    """Notes when the socket file stops being the one gunicorn bound, and at which restart:
    polled often, since the first retiring stock 19.6.0 worker deletes it at once."""

    def __init__(self, server, inode, interval=0.02):
        super(_SocketWatch, self).__init__(daemon=True)
        self.server, self.inode, self.interval = server, inode, interval
        self.lost_at = self.lost_at_restart = None
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(self.interval):
            if self.server.inode() != self.inode:
                # A retiring worker deletes it before it logs its exit, and before its
                # successor boots: the first restart shows as 0 in both counts.
                self.lost_at_restart = max(self.server.restarts(), self.server.exited(), 1)
                self.lost_at = time.monotonic()
                return

    def stop(self):
        self._done.set()
        self.join()


# -- the check ------------------------------------------------------------------------------

class Check(object):
    def __init__(self, args):
        self.args = args
        self.clients = min(args.workers * args.threads * CLIENTS_PER_THREAD, MAX_CLIENTS)
        self.progress = _Progress(sys.stderr)
        self.interrupts = _Interrupts()
        self.root = None
        self.servers = []
        self.proxies = []

    def run(self):
        self.interrupts.install()
        try:
            try:
                self._preflight()
                self.root = self._make_root()
                phases = {}
                for name, label in PHASES:
                    phases[name] = self._phase(name, label)
            finally:
                # Never interrupted: a second Ctrl-C must not leave gunicorn running.
                self.interrupts.disarm()
                self.progress.clear()
                if self.interrupts.received:
                    sys.stderr.write("safe-gthread check: interrupted; stopping gunicorn\n")
                    sys.stderr.flush()
                self._cleanup()
        except KeyboardInterrupt:
            signum = self.interrupts.received or signal.SIGINT
            sys.stderr.write("safe-gthread check: interrupted; gunicorn stopped and the "
                             "temporary directory removed\n")
            return 128 + signum
        except (CannotRun, _runner.ServerError) as exc:
            sys.stderr.write("safe-gthread check: could not run: %s\n" % _tail(str(exc)))
            return EXIT_CANNOT_RUN
        except Exception:
            # A bug here is no verdict on the worker: exit 2, not 1.
            traceback.print_exc()
            sys.stderr.write("safe-gthread check: could not run: unexpected error (above)\n")
            return EXIT_CANNOT_RUN
        finally:
            self.interrupts.uninstall()
        report = self._report(phases)
        if self.args.json:
            sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
        else:
            sys.stdout.write(self._table(report))
        sys.stdout.flush()
        return report["exit_status"]

    # -- setup and teardown --------------------------------------------------------------
    def _preflight(self):
        if self.args.proxy:
            try:
                from . import proxy as _proxy
            except ImportError:
                raise CannotRun("--proxy is not available in this version of safe-gthread")
            self._proxy_module = _proxy
            if _proxy.find_binary(self.args.proxy) is None:
                raise CannotRun("--proxy %s: %s is not installed (not on PATH, nor in /usr/sbin, "
                                "/usr/bin or /usr/local)" % (self.args.proxy, self.args.proxy))

    def _make_root(self):
        chosen = os.environ.get(TMPDIR_ENV)
        # A long $TMPDIR (e.g. on macOS) would not fit a socket path: fall back to /tmp.
        for parent in [chosen] if chosen else [tempfile.gettempdir(), "/tmp"]:
            # mkdtemp adds 8 characters; the longest path inside is stock/gunicorn.sock.
            longest = os.path.join(os.path.abspath(parent), TMP_PREFIX + "x" * 8,
                                   "stock", "gunicorn.sock")
            if len(os.fsencode(longest)) <= MAX_SOCKET_PATH:
                break
        else:
            raise CannotRun("no usable socket path: %s is too long for a unix socket "
                            "(%d bytes at most); set %s to a shorter directory"
                            % (longest, MAX_SOCKET_PATH, TMPDIR_ENV))
        try:
            return tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
        except OSError as exc:
            raise CannotRun("cannot create a temporary directory in %s: %s (set %s to a "
                            "writable directory)" % (parent, exc.strerror or exc, TMPDIR_ENV))

    def _cleanup(self):
        for proxy in self.proxies:
            try:
                proxy.stop()
            except Exception as exc:  # keep going: gunicorn and the files must still go
                sys.stderr.write("safe-gthread check: stopping %s: %s\n" % (self.args.proxy, exc))
        for server in self.servers:
            server.stop(grace=STOP_GRACE)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- one worker class ----------------------------------------------------------------
    def _phase(self, name, label):
        args = self.args
        directory = os.path.join(self.root, name)
        os.mkdir(directory)
        extra = {"reuse_port": True} if getattr(args, "reuse_port", False) else {}
        tcp = getattr(args, "bind", "unix") == "tcp"
        server = _runner.Gunicorn(directory, name, tcp=tcp, workers=args.workers,
                                  threads=args.threads, max_requests=args.max_requests, **extra)
        self.progress.update("%s: starting gunicorn %s" % (label, _compat.GUNICORN_VERSION),
                             force=True)
        with self.interrupts.held():
            self.servers.append(server)
            server.start(wait=False)
        server.wait_ready(START_TIMEOUT)
        inode = server.inode()
        address = server.address
        if args.proxy:
            address = self._start_proxy(directory, server.address)

        watch = _SocketWatch(server, inode)
        watch.start()

        def stop():
            lost_at = watch.lost_at
            return lost_at is not None and time.monotonic() - lost_at >= AFTER_SOCKET_LOST

        def progress(result, seconds_left):
            # Most telling first: a narrow terminal cuts the end of the line.
            self.progress.update("%s, %d s left: %s requests sent, %s failed, %s restarts, "
                                 "socket %s" % (label, int(math.ceil(seconds_left)),
                                                _n(result.requests), _n(result.failed),
                                                _n(server.restarts()),
                                                "kept" if watch.lost_at is None else "LOST"))

        try:
            result = _load.run_load(address, seconds=args.seconds, concurrency=self.clients,
                                    keepalive_share=0.5, stop=stop, progress=progress)
        finally:
            watch.stop()
        started = time.monotonic() - result.seconds
        restarts = server.restarts()
        survived = watch.lost_at is None and server.inode() == inode
        upstream_errors = None
        for proxy in self.proxies:
            proxy.stop()
            # nginx retries a failed GET elsewhere: its clients never see what its log shows.
            upstream_errors = len(proxy.upstream_failures())
        del self.proxies[:]
        # Stopped before counting tracebacks: a stock 19.6.0 worker crashes on the way out.
        server.stop(grace=STOP_GRACE)
        phase = {
            "worker_class": _runner.WORKER_CLASSES[name],
            "restarts": restarts,
            "socket_survived": survived,
            "socket_lost_at_restart": watch.lost_at_restart,
            "socket_lost_after_seconds": (None if watch.lost_at is None
                                          else round(max(watch.lost_at - started, 0.0), 1)),
            "requests": result.requests,
            "failed_requests": result.failed,
            "successful_requests_per_second": round(result.ok / result.seconds, 1)
            if result.seconds else 0.0,
            # Beside any throughput: two workers that restart at different rates do not
            # compare like for like.
            "requests_per_restart": round(result.ok / float(restarts), 1) if restarts else None,
            "errors": dict(result.errors),
            "seconds": round(result.seconds, 2),
            "tracebacks": server.tracebacks(),
        }
        if args.proxy:
            phase["proxy_upstream_errors"] = upstream_errors
        self.progress.line("%s: %s requests, %s failed, %s restarts, socket %s"
                           % (label, _n(phase["requests"]), _n(phase["failed_requests"]),
                              _n(restarts), "kept" if survived else "lost"))
        return phase

    def _start_proxy(self, directory, upstream):
        proxy_dir = os.path.join(directory, "proxy")
        os.mkdir(proxy_dir)
        proxy = self._proxy_module.Proxy(self.args.proxy, proxy_dir, upstream,
                                         upstream_keepalive=True)
        self.proxies.append(proxy)  # before it starts: the cleanup stops whatever started
        try:
            proxy.start(START_TIMEOUT)
        except self._proxy_module.ProxyError as exc:
            raise CannotRun("%s did not start: %s" % (self.args.proxy, exc))
        return proxy.address

    # -- the verdict ---------------------------------------------------------------------
    def _report(self, phases):
        stock, safe = phases["stock"], phases["safe"]
        affected = not stock["socket_survived"] or stock["failed_requests"] > 0
        held = safe["socket_survived"] and safe["failed_requests"] == 0
        if not held:
            status = EXIT_NOT_HELD
        elif safe["restarts"] == 0 or (stock["restarts"] == 0 and not affected):
            status = EXIT_CANNOT_RUN  # nothing restarted: nothing was shown
        else:
            status = EXIT_HELD
        report = {
            "gunicorn": _compat.GUNICORN_VERSION,
            "python": _compat.PYTHON_VERSION,
            "safe_gthread": __version__,
            "affected": affected,
            "held": held,
            "exit_status": status,
            "settings": {"seconds": self.args.seconds, "max_requests": self.args.max_requests,
                         "workers": self.args.workers, "threads": self.args.threads,
                         "clients": self.clients, "keepalive_share": 0.5,
                         "proxy": self.args.proxy,
                         "bind": getattr(self.args, "bind", "unix"),
                         "reuse_port": getattr(self.args, "reuse_port", False)},
            "stock": stock,
            "safe": safe,
        }
        report["verdict"] = _verdict(report)
        return report

    def _table(self, report):
        unix = report["settings"]["bind"] == "unix"
        rows = [
            ("restarts", lambda p: _n(p["restarts"])),
            ("socket kept (same inode)",
             lambda p: ("yes" if p["socket_survived"] else "NO") if unix else "n/a (TCP)"),
            ("requests", lambda p: _n(p["requests"])),
            ("failed requests", lambda p: _n(p["failed_requests"])),
            ("requests per restart",
             lambda p: "-" if p["requests_per_restart"] is None
             else _n(int(round(p["requests_per_restart"])))),
            ("successful requests/s",
             lambda p: _n(int(round(p["successful_requests_per_second"])))),
            ("tracebacks in the log", lambda p: _n(p["tracebacks"])),
        ]
        if report["settings"]["proxy"]:
            rows.append(("%s upstream errors" % report["settings"]["proxy"],
                         lambda p: _n(p["proxy_upstream_errors"])))
        s = report["settings"]
        where = "the unix socket" if unix else "127.0.0.1%s" % (
            " with reuse_port" if s["reuse_port"] else "")
        via = ("through %s to %s" % (s["proxy"], where)) if s["proxy"] else "on " + where
        out = ["", "safe-gthread check: gunicorn %s, Python %s; %d workers x %d threads, "
               "max_requests %d; %d s of load each from %d clients (half keep-alive) %s"
               % (report["gunicorn"], report["python"], s["workers"], s["threads"],
                  s["max_requests"], s["seconds"], s["clients"], via), ""]
        heads = [label for _, label in PHASES]
        width = max(len(name) for name, _ in rows)
        out.append("%-*s  %20s  %20s" % (width, "", heads[0], heads[1]))
        for name, cell in rows:
            out.append("%-*s  %20s  %20s" % (width, name, cell(report["stock"]),
                                             cell(report["safe"])))
        for key, label in PHASES:
            errors = report[key]["errors"]
            if errors:
                out.append("%s failures: %s" % (label, ", ".join(
                    "%s %s" % (_n(count), kind)
                    for kind, count in sorted(errors.items(), key=lambda kv: -kv[1]))))
        unequal = _unequal_restarts(report)
        if unequal:
            out += ["", "Note: %s." % unequal]
        out += ["", report["verdict"], ""]
        return "\n".join(out)


#: Restart rates within this factor of each other compare like for like.
LIKE_FOR_LIKE = 1.25


def _unequal_restarts(report):
    """A sentence when the two workers restarted at different rates (requests per
    restart more than ``LIKE_FOR_LIKE`` apart), else None."""
    stock = report["stock"].get("requests_per_restart")
    safe = report["safe"].get("requests_per_restart")
    if not stock or not safe or max(stock, safe) <= LIKE_FOR_LIKE * min(stock, safe):
        return None
    return ("the two workers restarted at different rates (%s vs %s requests per restart), "
            "so their requests/s do not compare like for like"
            % (_n(int(round(stock))), _n(int(round(safe)))))


def _verdict(report):
    stock, safe = report["stock"], report["safe"]
    version = "gunicorn %s" % report["gunicorn"]

    def losses(phase, who):
        parts = []
        if not phase["socket_survived"]:
            at = phase["socket_lost_at_restart"] or 1
            parts.append("lost its unix socket at the first worker restart" if at == 1 else
                         "lost its unix socket after %s worker restarts" % _n(at))
        if phase["failed_requests"]:
            parts.append("failed %s of %s requests" % (_n(phase["failed_requests"]),
                                                        _n(phase["requests"])))
        return "%s %s" % (who, " and ".join(parts))

    clean = ("kept its socket and failed no request across %s"
             if report["settings"]["bind"] == "unix" else "failed no request across %s")
    if report["affected"]:
        first = "%s is affected: %s" % (version, losses(stock, "the stock gthread worker"))
    else:
        first = "%s is not affected: the stock gthread worker %s" % (
            version, clean % _plural(stock["restarts"], "restart"))
    if not report["held"]:
        second = "%s did NOT hold: it %s (please report this output)" % (
            "safe_gthread.Worker", losses(safe, "")[1:])
    elif report["exit_status"] == EXIT_CANNOT_RUN:
        second = ("but the check is inconclusive: a worker never restarted, so use a smaller "
                  "--max-requests or more --seconds")
    else:
        second = "safe_gthread.Worker held%s: it %s" % (
            "" if report["affected"] else " too", clean % _plural(safe["restarts"], "restart"))
        unequal = _unequal_restarts(report)
        if unequal:
            second += " (%s)" % unequal.split(" (")[0]
    return "%s; %s." % (first, second)


# -- small helpers --------------------------------------------------------------------------

def _n(value):
    return "{:,}".format(value)


def _plural(count, word):
    return "%s %s%s" % (_n(count), word, "" if count == 1 else "s")


def _tail(text, limit=3000):
    """gunicorn's errors end with its whole log: keep the message and the log's end."""
    if len(text) <= limit:
        return text
    head, _, rest = text.partition("\n")
    return "%s\n[...]\n%s" % (head, rest[-(limit - len(head)):])
