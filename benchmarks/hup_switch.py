#!/usr/bin/env python3
"""HUP switch from the stock gthread worker to safe_gthread.Worker behind h2o: the 502s.

Each run starts gunicorn with gunicorn's own gthread worker on a unix socket in a
temporary directory (5 workers x 5 threads, keepalive 2, as examples/config.py), h2o in
front with upstream keep-alive (``proxy.timeout.keepalive: 1000``, as examples/h2o.conf),
and ``--clients`` keep-alive clients sending GET / through h2o as fast as they are
answered, for ``--seconds``. After ``--hup-at`` seconds it rewrites the config file's
worker class to ``"safe_gthread.Worker"`` and sends the master a HUP. It counts the
requests, the 502s, other non-2xx answers and client-side errors (resets, timeouts), and
says what the socket path is at the end: the same inode as at the start, another file, or
gone. The control (``stock -> stock``: the same HUP with the worker class left at
``"gthread"``) runs after each switch; on gunicorn 19.6.0 the old stock workers delete
the path and every request after the reload fails. Run it with the Python of the
gunicorn to switch, from the repository's root (``PYTHONPATH=.`` imports this checkout's
safe_gthread, in the benchmark and in gunicorn):

    PYTHONPATH=. .matrix/gunicorn19.6.0-py3.6/bin/python benchmarks/hup_switch.py --runs 3

It prints a line per run, then a Markdown table. Exit status 0 when every switch kept
the path (same inode); 1 otherwise. Not a test: a figure for docs/rollout.md, and it
moves with the machine's load.
"""
import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import gunicorn

import safe_gthread
from safe_gthread.check import load as _load
from safe_gthread.check.proxy import UPSTREAM_FAILURES, Proxy
from safe_gthread.check.runner import Gunicorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import print_table  # noqa: E402  (benchmarks/run.py, beside this file)

SETTINGS = {"workers": 5, "threads": 5, "keepalive": 2, "graceful_timeout": 10, "timeout": 30}
TARGETS = {"safe": "safe_gthread.Worker", "stock": "gthread"}


class ExampleH2O(Proxy):
    """h2o as in examples/h2o.conf: idle upstream connections closed after 1 s, before
    gunicorn's keepalive of 2 s (the check's Proxy keeps them 2 s)."""

    def _write_config(self):
        super(ExampleH2O, self)._write_config()
        with open(self.config_path) as fh:
            text = fh.read()
        with open(self.config_path, "w") as fh:
            fh.write(text.replace("proxy.timeout.keepalive: 2000",
                                  "proxy.timeout.keepalive: 1000"))


class PathWatch(threading.Thread):
    """Every millisecond or so: is the socket path there? Keeps the stretches without it
    (start, end); a path linked back within a millisecond may be missed, and on a loaded
    machine the thread's own sleeps stretch."""

    def __init__(self, path):
        super(PathWatch, self).__init__()
        self.daemon = True
        self.path = path
        self.halt = threading.Event()
        self.gaps = []
        self.missing_since = None

    def run(self):
        while not self.halt.is_set():
            now = time.monotonic()
            if os.path.lexists(self.path):
                if self.missing_since is not None:
                    self.gaps.append((self.missing_since, now))
                    self.missing_since = None
            elif self.missing_since is None:
                self.missing_since = now
            time.sleep(0.001)
        if self.missing_since is not None:
            self.gaps.append((self.missing_since, time.monotonic()))

    @property
    def longest(self):
        return max([end - start for start, end in self.gaps] or [0.0])

    def during(self, moment, slack=0.01):
        """True when ``moment`` falls in a stretch without the path (give or take
        ``slack`` s: a request that found no path is answered just after)."""
        return any(start - slack <= moment <= end + slack for start, end in self.gaps)


class TimedResult(_load.LoadResult):
    """The load client's result, with the time of each failed request."""

    def __init__(self):
        super(TimedResult, self).__init__()
        self.failed_at = []  # (monotonic time, error); list.append is atomic

    def add(self, error=None, latency=None):
        if error is not None:
            self.failed_at.append((time.monotonic(), error))
        super(TimedResult, self).add(error, latency)


def set_worker_class(config_path, worker_class):
    with open(config_path) as fh:
        text = fh.read()
    text, count = re.subn(r"(?m)^worker_class = .*$", "worker_class = %r" % worker_class, text)
    if count != 1:
        raise RuntimeError("no worker_class line in %s" % config_path)
    with open(config_path, "w") as fh:
        fh.write(text)


def proxy_log(proxy):
    """The proxy's upstream failure lines by kind (h2o does not log every failed request:
    a hint at the causes, not a count)."""
    kinds = {}
    for line in proxy.upstream_failures():
        kind = next(marker for marker in UPSTREAM_FAILURES if marker in line.lower())
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join("%d %s" % (n, kind) for kind, n in sorted(kinds.items())) or "nothing"


def path_state(server, inode):
    now = server.inode()
    if now is None:
        return "gone"
    return "same inode" if now == inode else "another file"


def one_run(target, args):
    directory = tempfile.mkdtemp(prefix="hup-switch-")
    server = Gunicorn(directory, "stock", **SETTINGS)
    proxy = None
    try:
        server.start()
        inode = server.inode()
        proxy = ExampleH2O(args.proxy, os.path.join(directory, "proxy"), server.sock_path,
                           upstream_keepalive=True).start()
        booted = server.booted()
        watch = PathWatch(server.sock_path)
        watch.start()
        hup = []

        def progress(result, left):
            if not hup and args.seconds - left >= args.hup_at:
                set_worker_class(server.config_path, TARGETS[target])
                server.signal(signal.SIGHUP)
                hup.append(result.requests)

        result = _load.run_load(proxy.address, seconds=args.seconds, concurrency=args.clients,
                                keepalive_share=1.0, progress=progress, result=TimedResult())
        watch.halt.set()
        watch.join()
        log = server.errorlog()
        errors = result.errors
        figures = {
            "target": target,
            "requests": result.requests,
            "before_hup": hup[0] if hup else None,
            "502": errors.get("HTTP 502", 0),
            "other_non2xx": sum(n for kind, n in errors.items()
                                if kind.startswith("HTTP ") and kind != "HTTP 502"),
            "client_errors": sum(n for kind, n in errors.items() if not kind.startswith("HTTP ")),
            "errors": dict(errors),
            "path": path_state(server, inode),
            "gaps": len(watch.gaps),
            "longest_gap": watch.longest,
            "502_path_missing": sum(1 for moment, error in result.failed_at
                                    if error == "HTTP 502" and watch.during(moment)),
            "new_workers": server.booted() - booted,
            "adopted": "Adopted unix:" in log,
            "relinked": log.count("was removed by another process"),
            "version_line": next((line.split("[INFO] ", 1)[1] for line in log.splitlines()
                                  if "[INFO] safe-gthread " in line), None),
            "proxy_log": proxy_log(proxy),
            "tracebacks": server.tracebacks(),
            "seconds": result.seconds,
        }
        return figures
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        if args.keep:
            sys.stderr.write("    logs kept in %s\n" % directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def label(target):
    return "stock -> %s" % ("safe" if target == "safe" else "stock (control)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each switch")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per run")
    parser.add_argument("--hup-at", type=float, default=2.0, help="seconds into the load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--proxy", choices=("h2o", "nginx"), default="h2o")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the stock -> stock control runs")
    parser.add_argument("--keep", action="store_true",
                        help="keep each run's directory (gunicorn's and h2o's logs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.clients < 1 or not 0 < args.hup_at < args.seconds:
        parser.error("--runs and --clients must be at least 1, --hup-at within --seconds")

    sys.stderr.write("hup_switch: gunicorn %s, Python %s, safe-gthread %s from %s; %d runs "
                     "of %gs, %d clients through %s, HUP at %gs\n"
                     % (gunicorn.__version__, sys.version.split()[0], safe_gthread.__version__,
                        os.path.dirname(os.path.abspath(safe_gthread.__file__)), args.runs,
                        args.seconds, args.clients, args.proxy, args.hup_at))
    targets = ["safe"] if args.no_control else ["safe", "stock"]
    rows = []
    for run in range(1, args.runs + 1):
        for target in targets:
            figures = one_run(target, args)
            figures["run"] = run
            rows.append(figures)
            sys.stderr.write(
                "run %d/%d, %s: %d requests in %.1fs (%s before the HUP), %d 502s, "
                "%d other non-2xx, %d client errors %s; path afterwards: %s (missing %d "
                "times seen, longest %.3fs; %s 502s then); %d new workers, adopted: %s, "
                "relinked %d times; "
                "proxy error log: %s; tracebacks %d\n"
                % (run, args.runs, label(target), figures["requests"], figures["seconds"],
                   figures["before_hup"], figures["502"], figures["other_non2xx"],
                   figures["client_errors"], figures["errors"] or "", figures["path"],
                   figures["gaps"], figures["longest_gap"], figures["502_path_missing"],
                   figures["new_workers"],
                   "yes" if figures["adopted"] else "no", figures["relinked"],
                   figures["proxy_log"], figures["tracebacks"]))
            if figures["version_line"]:
                sys.stderr.write("    %s\n" % figures["version_line"][:90])
            sys.stderr.flush()

    print("gunicorn %s, Python %s, safe-gthread %s; %d clients through %s, %gs per run, "
          "HUP at %gs" % (gunicorn.__version__, sys.version.split()[0],
                          safe_gthread.__version__, args.clients, args.proxy, args.seconds,
                          args.hup_at))
    print("")
    print_table(("switch", "run", "requests", "502s", "of them while the path was missing",
                 "other non-2xx", "client errors", "the path afterwards"),
                [(label(row["target"]), row["run"], "{:,}".format(row["requests"]),
                  "{:,}".format(row["502"]), "{:,}".format(row["502_path_missing"]),
                  row["other_non2xx"], row["client_errors"], row["path"]) for row in rows])
    ok = all(row["path"] == "same inode" for row in rows if row["target"] == "safe")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
