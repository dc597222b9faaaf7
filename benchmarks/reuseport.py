#!/usr/bin/env python3
"""reuse_port on TCP under restart churn: failed requests, stock gthread vs safe_gthread.Worker.

The original report's load (5 workers x 5 threads, keep-alive 2, max_requests 512, wrk -t2 -c200)
through h2o (or nginx) to gunicorn bound to 127.0.0.1 with ``reuse_port = True``. From
gunicorn 24.0 each worker binds its own listener, and a retiring stock worker's close
resets the connections queued on it unless ``net.ipv4.tcp_migrate_req = 1``.
Stock and safe run back to back, in alternating order, ``--repeats`` times; each run
prints its figures, and the end prints one markdown row per worker (sums over the runs):
requests, failed requests, restarts, failures per 1,000 restarts, and the size of the
port's reuseport group (LISTEN sockets in /proc/net/tcp) seen during the run.

Run it with the Python of the environment to measure, e.g.

    .matrix/gunicorn27.0.1-py3.13/bin/python benchmarks/reuseport.py
    .matrix/gunicorn26.2.0-py3.12/bin/python benchmarks/reuseport.py --migrate-req 1

``--migrate-req 0|1`` sets the sysctl for the run (root; per network namespace) and
writes the old value back at the end; the default leaves the kernel as it is. Not a test:
figures move with the machine's load.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gunicorn

from safe_gthread.check import procs as _procs
from safe_gthread.check.proxy import Proxy
from safe_gthread.check.runner import Gunicorn

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
SETTINGS = {"workers": 5, "threads": 5, "keepalive": 2, "max_requests": 512,
            "graceful_timeout": 10, "timeout": 30, "reuse_port": True}


def read_migrate_req():
    try:
        with open(MIGRATE_REQ) as fh:
            return fh.read().strip()
    except OSError:
        return None


def write_migrate_req(value):
    with open(MIGRATE_REQ, "w") as fh:
        fh.write("%s\n" % value)


def wrk(url, seconds, on_tick):
    """wrk -t2 -c200 for ``seconds``; ``on_tick()`` is called about five times a second.
    Returns (requests, failed) where failed counts non-2xx and socket errors."""
    binary = _procs.find_executable("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed")
    proc = subprocess.Popen([binary, "-t2", "-c200", "-d%ds" % seconds, "--timeout", "10s", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    try:
        while proc.poll() is None:
            on_tick()
            time.sleep(0.2)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    match = re.search(r"(\d+) requests in", out)
    if not match:
        raise RuntimeError("wrk printed no summary:\n" + out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(n) for n in sock.groups()) if sock else 0)
    return int(match.group(1)), failed


def one_run(worker, args, root):
    directory = tempfile.mkdtemp(prefix="reuseport-%s-" % worker, dir=root)
    settings = dict(SETTINGS, max_requests=args.max_requests,
                    max_requests_jitter=args.jitter)
    server = Gunicorn(directory, worker, tcp=True, **settings)
    proxy = None
    listeners = []
    try:
        server.start(timeout=60)
        proxy = Proxy(args.proxy, os.path.join(directory, "proxy"), server.address).start()
        before = server.restarts()
        requests, failed = wrk("http://127.0.0.1:%d/" % proxy.port, args.seconds,
                               lambda: listeners.append(server.listeners()))
        figures = {"requests": requests, "failed": failed,
                   "restarts": server.restarts() - before,
                   "proxy_errors": len(proxy.upstream_failures()),
                   "listeners": [n for n in listeners if n is not None]}
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-requests", type=int, default=512)
    parser.add_argument("--jitter", type=int, default=0, help="max_requests_jitter")
    parser.add_argument("--proxy", choices=("h2o", "nginx"), default="h2o")
    parser.add_argument("--migrate-req", choices=("0", "1"),
                        help="set net.ipv4.tcp_migrate_req for the run (default: leave it)")
    args = parser.parse_args(argv)
    saved = read_migrate_req()
    if args.migrate_req is not None:
        if saved is None:
            raise SystemExit("net.ipv4.tcp_migrate_req cannot be read here")
        write_migrate_req(args.migrate_req)
    root = tempfile.mkdtemp(prefix="bench-reuseport-")
    totals = {"stock": [], "safe": []}
    try:
        kernel = read_migrate_req()
        for repeat in range(args.repeats):
            order = ("stock", "safe") if repeat % 2 == 0 else ("safe", "stock")
            for worker in order:
                fig = one_run(worker, args, root)
                totals[worker].append(fig)
                print("run %d %-5s: %d requests, %d failed, %d restarts, %d proxy errors, "
                      "listeners %s..%s" % (repeat + 1, worker, fig["requests"], fig["failed"],
                                            fig["restarts"], fig["proxy_errors"],
                                            min(fig["listeners"] or [0]),
                                            max(fig["listeners"] or [0])))
                sys.stdout.flush()
    finally:
        if args.migrate_req is not None and saved is not None:
            write_migrate_req(saved)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("gunicorn %s, Python %s, reuse_port on 127.0.0.1 via %s, tcp_migrate_req = %s, "
          "%d x %d s, max_requests %d (jitter %d)" % (
              gunicorn.__version__, sys.version.split()[0], args.proxy, kernel, args.repeats,
              args.seconds, args.max_requests, args.jitter))
    print("| gunicorn | worker | requests | failed | restarts | per 1,000 restarts "
          "| listeners (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for worker in ("stock", "safe"):
        figs = totals[worker]
        requests = sum(f["requests"] for f in figs)
        failed = sum(f["failed"] for f in figs)
        restarts = sum(f["restarts"] for f in figs)
        seen = [n for f in figs for n in f["listeners"]]
        print("| %s | %s | %s | %s | %s | %s | %s-%s |" % (
            gunicorn.__version__, worker, "{:,}".format(requests), "{:,}".format(failed),
            "{:,}".format(restarts),
            "{:,.0f}".format(1000.0 * failed / restarts) if restarts else "-",
            min(seen or [0]), max(seen or [0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
