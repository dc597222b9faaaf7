#!/usr/bin/env python3
"""Soak: many worker restarts, HUPs mixed in; the arbiter must not grow.

Runs safe_gthread.Worker (the bundled app, a unix socket in a temporary directory) with
a small max_requests under keep-alive load until ``--restarts`` workers have restarted,
sending the arbiter a HUP every ``--hup-every`` restarts. It compares the arbiter's open
file descriptors and resident memory after a warm-up with the same at the end, and
counts failed requests; the RSS is also printed every ``--sample-every`` restarts, so a
leak (a line that keeps rising) can be told from warm-up (a step, then flat). Run it with
the Python of the environment to soak, e.g.

    .matrix/gunicorn19.6.0-py3.6/bin/python benchmarks/soak.py
    .matrix/gunicorn27.0.1-py3.13/bin/python benchmarks/soak.py --restarts 2000
    .matrix/gunicorn27.0.1-py3.13/bin/python benchmarks/soak.py --worker stock  # the control

``--worker stock`` soaks gunicorn's own gthread worker, the control for the arbiter's
growth; on gunicorn versions whose worker deletes the socket it fails at the first restart.

``--reuse-port`` binds 127.0.0.1 with gunicorn's ``reuse_port`` instead: it
also counts the listeners in the port's reuseport group (LISTEN sockets in
/proc/net/tcp) all through the run, and the workers' open fds, which must stay bounded:
the safe worker's arbiter keeps exactly ``--workers`` listeners (a HUP's new workers
share them with the old ones), and each worker holds its own slot's listener only.

    .matrix/gunicorn27.0.1-py3.13/bin/python benchmarks/soak.py --reuse-port --restarts 10000

Exit status 0 when the fds are the same, RSS grew less than ``--rss-slack`` KiB and no
request failed; 1 otherwise. Not a test: it takes minutes.
"""
import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import gunicorn

from safe_gthread.check import load as _load, procs as _procs
from safe_gthread.check.runner import Gunicorn


def arbiter_state(pid):
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return fds, int(_procs.status_field(pid, "VmRSS")[0])


def settled_state(pid, workers, timeout=30.0):
    """The arbiter's state once exactly ``workers`` children are left: a retiring worker's
    heartbeat file is open in the arbiter until it has been reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_procs.children(pid)) == workers:
            time.sleep(0.5)  # and reaped (a zombie is not a live process, but holds its slot)
            return arbiter_state(pid)
        time.sleep(0.1)
    return arbiter_state(pid)


def workers_fds(server):
    """The open fds of each live worker, sorted."""
    counts = []
    for pid in server.worker_pids():
        try:
            counts.append(len(os.listdir("/proc/%d/fd" % pid)))
        except OSError:
            pass  # it just exited
    return sorted(counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("safe", "stock"), default="safe")
    parser.add_argument("--restarts", type=int, default=10000)
    parser.add_argument("--hup-every", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=200, help="restarts before the first reading")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=5)
    parser.add_argument("--rss-slack", type=int, default=1024, help="KiB")
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--sample-every", type=int, default=1000, help="restarts")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind 127.0.0.1 with reuse_port; count the group's listeners")
    args = parser.parse_args(argv)
    for name in ("restarts", "hup_every", "workers", "max_requests", "sample_every"):
        if getattr(args, name) < 1:
            parser.error("--%s must be at least 1" % name.replace("_", "-"))

    directory = tempfile.mkdtemp(prefix="soak-")
    # Restarts are counted from the log's "Booting worker" lines: loglevel info.
    extra = {"tcp": True, "reuse_port": True} if args.reuse_port else {}
    server = Gunicorn(directory, args.worker, workers=args.workers, threads=2,
                      max_requests=args.max_requests, keepalive=2, **extra)
    listeners = []  # the group's size, read about twice a second (reuse_port)
    worker_fds = []  # (restarts, fds of each worker) at each sample
    hups = []
    samples = []  # (restarts, RSS KiB), read on the fly: fds vary with retiring workers
    try:
        server.start()
        pid = server.proc.pid
        _load.run_load(server.address, seconds=args.max_seconds, concurrency=8,
                       stop=lambda: server.restarts() >= args.warmup)
        before = settled_state(pid, args.workers)
        started = time.monotonic()
        first = server.restarts()
        target = first + args.restarts

        def progress(result, left):
            done = server.restarts()
            if (done - first) // args.sample_every > len(samples):
                samples.append((done - first, arbiter_state(pid)[1]))
                worker_fds.append((done - first, workers_fds(server)))
            if args.reuse_port:
                listeners.append(server.listeners())
            if done // args.hup_every > len(hups):
                hups.append(done)
                server.signal(signal.SIGHUP)
            sys.stderr.write("\rsoak: %d/%d restarts, %d HUPs, %d requests, %d failed, %ds   "
                             % (done - first, args.restarts, len(hups),
                                result.requests, result.failed, time.monotonic() - started))
            sys.stderr.flush()

        result = _load.run_load(server.address, seconds=args.max_seconds, concurrency=8,
                                stop=lambda: server.restarts() >= target, progress=progress)
        sys.stderr.write("\n")
        after = settled_state(pid, args.workers)
        restarts = server.restarts() - first
        settled_listeners = server.listeners()
        settled_fds = workers_fds(server)
    finally:
        server.stop()
    print("worker %s, gunicorn %s, Python %s" % (args.worker, gunicorn.__version__,
                                                 sys.version.split()[0]))
    print("restarts %d, HUPs %d, requests %d, failed %d, %.0f s"
          % (restarts, len(hups), result.requests, result.failed, result.seconds))
    print("arbiter RSS KiB by restarts: 0: %d, %s"
          % (before[1], ", ".join("%d: %d" % sample for sample in samples)))
    print("arbiter fds: %d -> %d; RSS: %d KiB -> %d KiB (%+d KiB)"
          % (before[0], after[0], before[1], after[1], after[1] - before[1]))
    ok = (after[0] == before[0] and after[1] - before[1] < args.rss_slack
          and result.failed == 0 and restarts >= args.restarts)
    print("worker fds by restarts: %s; at the end: %s" % (
        ", ".join("%d: %s" % (n, fds) for n, fds in worker_fds) or "-", settled_fds))
    if args.reuse_port:
        seen = [n for n in listeners if n is not None]
        print("listeners on the port during the run: min %s, max %s (%d readings); "
              "at the end: %s (workers %d)" % (min(seen or [0]), max(seen or [0]), len(seen),
                                                settled_listeners, args.workers))
        # A HUP's new workers share the old ones' listeners, so the group never grows;
        # the stock worker's group only shrinks and regrows with each restart.
        if args.worker == "safe":
            ok = ok and settled_listeners == args.workers and max(seen or [0]) == args.workers
    if result.failed:
        print("failures: %s" % dict(result.errors))
    print("soak: %s" % ("held" if ok else "FAILED"))
    if ok:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        print("log kept in %s" % directory)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
