#!/usr/bin/env python3
"""What the mold (``mold=True``, docs/mold.md) buys: issue 21's targets, measured.

Three sides, each with ``max_requests`` churn and without restarts (``max_requests 0``),
in paired runs whose order alternates from one pair to the next (the machine's drift
falls on every side alike):

- ``stock``: gunicorn's own gthread worker;
- ``safe``: ``safe_gthread.Worker`` without the mold;
- ``mold``: ``safe_gthread.Worker`` with ``safe_gthread.configure(mold=True)``;
- ``preload`` (only with ``--sides``): the stock worker with ``preload_app = True``.

Workloads:

- ``report``: the original report's load, CPU-bound: the bundled hello-world app, 5
  workers x 5 threads, ``max_requests 512``, h2o in front (keep-alive upstream),
  ``wrk -t2 -c200 --latency``. Per side: goodput under churn / no-restart goodput (the
  median of the pairs' ratios), CPU seconds per 1,000 successful requests (utime +
  stime of the arbiter, its reaped children and its live children, the mold included,
  from /proc) and its ratio to the no-restart run, p99 latency (wrk) under churn and its
  ratio to the no-restart run.
- ``slow-import``: the app's import takes ``--boot`` seconds (1.5 by default,
  ``SAFE_GTHREAD_APP_BOOT_SLEEP``), 20 ms per request, 4 workers x 4 threads,
  ``max_requests 600`` (+60 jitter), ``wrk -c32``: goodput churn / no-restart, and how
  long after a worker asked to retire its successor was ready (the safe worker's debug
  line "worker N ready X s after worker M asked"; not defined for the stock worker,
  which forks a successor only once the old one has exited).
- ``freeze``: no server. What one full collection of the cyclic garbage collector costs
  in a process forked from a heap of ``--objects`` small lists, with the heap
  ``gc.freeze()``-d before the fork (as the mold does) and without: CPU, page faults,
  and how much of the shared heap it made private.

Every side prints its restarts and requests per restart (like for like: a side that
restarts less often is not cheaper per restart for it), and every run samples its
workers' USS (Private_Clean + Private_Dirty) and PSS from /proc/PID/smaps_rollup near
the end of the load, and the whole server's PSS (arbiter, mold, workers). Where a
restart's CPU goes is measured per worker: hooks in each run's config record the
worker's own CPU (getrusage) at its fork, when ready, after WARM requests, at its limit
and at ``worker_exit``, and the arbiter's ``wait4`` its total when reaped. So the table
splits a worker's CPU by its age: its start, its warm-up (its first WARM requests over
its own rate from there to its limit), that rate, the requests it served after its limit
(while it retires) over that rate, and its exit. Beside it, each side's CPU per restart:
the medians' CPU per request, churn - no restart, x requests per restart.

    python3 benchmarks/mold.py report --venv .matrix/gunicorn27.0.1-py3.13 --pairs 5
    python3 benchmarks/mold.py slow-import --venv .bench/gunicorn27.0.1-py3.13 --pairs 5
    python3 benchmarks/mold.py freeze --venv .matrix/gunicorn27.0.1-py3.13 --pairs 3

``--venv`` runs this tree from an existing venv with gunicorn installed (PYTHONPATH, no
install into it); without it, ``--version`` names a venv under .bench/ that
``benchmarks/run.py``'s helpers build, with this tree installed as a wheel.

Benchmarks are not tests: figures move with the machine's load, ratios less so.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import churn as _churn  # noqa: E402  (cpu_seconds, rate, spread)
import run as _run  # noqa: E402  (venvs, wheel, tables, medians)

SIDES = ("stock", "safe", "mold")
#: Also measurable (``--sides``): ``preload``, the stock worker with ``preload_app = True``
#: (workers forked from the arbiter with the app loaded: no import per restart, but a HUP
#: cannot load new code), the floor the issue quotes.
OPTIONAL_SIDES = ("preload",)
WORKLOADS = {
    "report": {"settings": dict(_churn.CPU), "max_requests": 512, "jitter": 0,
               "connections": 200, "env": {}},
    "slow-import": {"settings": dict(_churn.GOODPUT), "max_requests": 600, "jitter": 60,
                    "connections": 32, "env": {"SAFE_GTHREAD_APP_SLEEP": "0.02"}},
}
#: A fresh worker's first requests cost more than its later ones (cold caches, first
#: touches of pages shared with the process it was forked from): its "warm-up" is its
#: first WARM requests, measured against its own rate from there to its limit.
WARM = 200
#: Appended to every run's config: each worker's own CPU (getrusage) when forked, when
#: ready, after WARM requests, at its limit (``max_requests``) and at ``worker_exit``, and
#: in the arbiter its whole CPU when reaped (``wait4`` in place of ``os.waitpid``): one
#: JSON line each, read into the "stages" table.
_STAGES_CONFIG = '''
import json as _json, os as _os, resource as _resource, sys as _sys, threading as _threading
_STAGES, _WARM = %r, %d


def _stage(name, pid=None, usage=None, requests=None):
    usage = usage or _resource.getrusage(_resource.RUSAGE_SELF)
    with open(_STAGES, "a") as fh:
        fh.write(_json.dumps({"stage": name, "pid": pid or _os.getpid(), "requests": requests,
                              "cpu": usage.ru_utime + usage.ru_stime,
                              "faults": usage.ru_minflt}) + "\\n")


def post_fork(server, worker):
    _stage("forked")


def post_worker_init(worker):
    _stage("ready")


def worker_exit(server, worker):
    _stage("exiting", requests=getattr(worker, "nr", None))


_MARKED, _MARK_LOCK = set(), _threading.Lock()


def post_request(worker, req, environ, resp):
    # Its CPU once it has served _WARM requests ("warm") and once it reaches its limit
    # ("limit"; the safe worker holding past it sets max_requests to sys.maxsize): by age.
    # Runs on every request of every run, no-restart runs included: returns at once there
    # and once both are recorded.
    if len(_MARKED) == 2:
        return
    limit = getattr(worker, "max_requests", 0) or 0
    if limit >= _sys.maxsize:
        limit = worker.cfg.max_requests
    if limit <= _WARM:
        return
    nr = getattr(worker, "nr", 0)
    for name, at in (("warm", _WARM), ("limit", limit)):
        if at <= nr:
            with _MARK_LOCK:
                if name in _MARKED:
                    continue
                _MARKED.add(name)
            _stage(name, requests=nr)


def _reaping(pid, options, _wait4=_os.wait4):
    reaped, status, usage = _wait4(pid, options)
    if reaped:
        _stage("reaped", reaped, usage)
    return reaped, status


_os.waitpid = _reaping
'''
_HANDOFF = re.compile(r"worker \d+ ready ([\d.]+)s after worker \d+ asked \(max_requests\)")
_MOLD_READY = re.compile(r"mold (\d+) ready")


# -- inside the venv ------------------------------------------------------------------------
def smaps(pid):
    """(USS, PSS) of ``pid`` in bytes, from /proc/PID/smaps_rollup (None when gone)."""
    fields = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        return None
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0), fields.get("Pss", 0)


def memory(arbiter, molds):
    """Every worker's (USS, PSS), the mold's, and the server's total PSS, now."""
    from safe_gthread.check import procs as _procs
    workers, mold, total = [], None, 0
    own = smaps(arbiter)
    if own is not None:
        total += own[1]
    for pid in _procs.children(arbiter):
        figures = smaps(pid)
        if figures is None:
            continue
        total += figures[1]
        if pid in molds:
            mold = figures
        else:
            workers.append(figures)
    return {"workers": workers, "mold": mold, "total_pss": total}


def worker_stages(path):
    """Per worker that was forked, got ready, exited and was reaped during the run: CPU
    seconds from its fork to ready, ready to ``worker_exit``, and ``worker_exit`` to
    reaped (the rest of its exit), requests it served, page faults in its exit; and, for
    a worker that reached its limit, its own rate between WARM requests and the limit
    (``rate``, CPU seconds per request), what its first WARM requests cost over that
    rate (``warmup``), and what the requests it served after its limit (``tail``, while
    it retires) cost over it (``tail_cost``)."""
    seen = {}
    try:
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                seen.setdefault(row["pid"], {})[row["stage"]] = row
    except (OSError, ValueError):
        return []
    workers = []
    for s in seen.values():
        if not all(k in s for k in ("ready", "exiting", "reaped")):
            continue
        worker = {"start": s["ready"]["cpu"], "serving": s["exiting"]["cpu"] - s["ready"]["cpu"],
                  "exit": s["reaped"]["cpu"] - s["exiting"]["cpu"],
                  "requests": s["exiting"]["requests"],
                  "exit_faults": s["reaped"]["faults"] - s["exiting"]["faults"]}
        warm, limit = s.get("warm"), s.get("limit")
        if warm and limit and limit["requests"] > warm["requests"]:
            rate = (limit["cpu"] - warm["cpu"]) / (limit["requests"] - warm["requests"])
            tail = s["exiting"]["requests"] - limit["requests"]
            worker.update(rate=rate, tail=tail,
                          warmup=warm["cpu"] - s["ready"]["cpu"] - warm["requests"] * rate,
                          tail_cost=s["exiting"]["cpu"] - limit["cpu"] - tail * rate)
        workers.append(worker)
    return workers


def _wrk(proxy, seconds, connections):
    """wrk through the proxy, with its latency distribution: ok, failed, seconds, p99 (s)."""
    cmd = ["wrk", "-t2", "-c%d" % connections, "-d%ds" % max(int(round(seconds)), 1),
           "--timeout", "10s", "--latency", "http://127.0.0.1:%d/" % proxy.port]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=seconds + 60).stdout
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if not match:
        raise RuntimeError("wrk printed no summary:\n" + out)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
    requests = int(match.group(1))
    elapsed = float(match.group(2)) * scale[match.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(n) for n in sock.groups()) if sock else 0
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    return {"ok": requests - non2xx, "failed": non2xx + errors, "seconds": elapsed,
            "p99": float(p99.group(1)) * scale[p99.group(2)] if p99 else None}


def measure(spec):
    import tempfile
    from safe_gthread.check.runner import Gunicorn
    from safe_gthread.check.proxy import Proxy

    directory = tempfile.mkdtemp(prefix="mold-", dir=spec["tmp"])
    settings = dict(spec["settings"])
    if spec["side"] == "preload":
        settings["preload_app"] = True  # the floor the issue quotes: no import per restart
    server = Gunicorn(directory, "stock" if spec["side"] in ("stock", "preload") else "safe",
                      **settings)
    stages = os.path.join(directory, "stages.jsonl")
    with open(server.config_path, "a") as fh:
        if spec["side"] == "mold":
            fh.write("import safe_gthread\nsafe_gthread.configure(mold=True)\n")
        fh.write(_STAGES_CONFIG % (stages, WARM))
    proxy = None
    try:
        server.start(timeout=90)
        proxy = Proxy("h2o", os.path.join(directory, "proxy"), server.sock_path,
                      upstream_keepalive=True).start()
        _wrk(proxy, 1, spec["connections"])  # warm the proxy's pool and the workers
        molds = set(int(pid) for pid in _MOLD_READY.findall(server.errorlog()))
        before_cpu, before = _churn.cpu_seconds(server.proc.pid), server.restarts()
        sample = {}

        def sampler():
            # Near the end of the load: the workers have served, the copy-on-write pages
            # they touch are private by then.
            time.sleep(max(spec["seconds"] - 2.0, 0.5))
            sample.update(memory(server.proc.pid, molds | set(
                int(pid) for pid in _MOLD_READY.findall(server.errorlog()))))
        thread = threading.Thread(target=sampler)
        thread.daemon = True
        thread.start()
        figures = _wrk(proxy, spec["seconds"], spec["connections"])
        thread.join(5)
        cpu = _churn.cpu_seconds(server.proc.pid)
        log = server.errorlog()
        figures.update(
            restarts=server.restarts() - before,
            cpu=None if cpu is None or before_cpu is None else cpu - before_cpu,
            proxy_errors=len(proxy.upstream_failures()), tracebacks=server.tracebacks(),
            errors=len(re.findall(r"\[ERROR\]", log)),
            handoffs=[float(x) for x in _HANDOFF.findall(log)],
            forked=len(re.findall(r"forked from mold", log)),
            memory=sample, stages=worker_stages(stages))
        return figures
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def full_collection_in_a_fork(objects, freeze):
    """A heap of ``objects`` small lists (an app's modules, models and caches, in miniature),
    collected, optionally ``gc.freeze()``-d as the mold does before each fork; then, in a
    forked child, one full collection: its CPU, its page faults and how much of the shared
    heap it made private (USS before and after)."""
    import gc
    import resource
    if freeze and not hasattr(gc, "freeze"):
        raise SystemExit("gc.freeze() is Python >= 3.7; this is %s" % sys.version.split()[0])
    heap = [[i, str(i)] for i in range(objects)]
    gc.collect()
    if freeze:
        gc.freeze()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = smaps(os.getpid())[0]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.process_time()
        gc.collect()
        took = time.process_time() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt
        os.write(write_end, json.dumps({"cpu": took, "faults": faults,
                                        "private": smaps(os.getpid())[0] - before}).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        figures = json.loads(fh.read())
    os.waitpid(pid, 0)
    del heap  # alive until the child has collected
    return figures


def bench_freeze(args, python, env):
    """``freeze``: what one full collection in a worker costs, with and without the mold's
    ``gc.freeze()``, in paired runs (alternating order)."""
    figs = {True: [], False: []}
    for pair in range(args.pairs):
        for freeze in ((True, False) if pair % 2 == 0 else (False, True)):
            fig = run_one(python, {"tmp": args.tmp, "objects": args.objects, "freeze": freeze},
                          env, "--freeze", timeout=600)
            figs[freeze].append(fig)
            print("  pair %d %s: full collection %.1f ms CPU, %d page faults, %.1f MiB made "
                  "private" % (pair + 1, "frozen" if freeze else "not frozen",
                               1000 * fig["cpu"], fig["faults"], fig["private"] / 1048576.0),
                  flush=True)
    print()
    print("One full collection in a process forked from a heap of %d small lists, %d pairs:"
          % (args.objects, args.pairs))
    print()
    _run.print_table(
        ("heap before the fork", "collection CPU, ms", "page faults", "MiB made private"),
        [("gc.freeze() (the mold)" if freeze else "not frozen",
          _churn.spread([1000 * f["cpu"] for f in figs[freeze]]),
          _whole(f["faults"] for f in figs[freeze]),
          _mib([f["private"] for f in figs[freeze]])) for freeze in (True, False)])


# -- the driver -------------------------------------------------------------------------------
def run_one(python, spec, env, what="--measure", timeout=None):
    """This file in the venv's Python (``--measure`` a server run, ``--freeze`` a
    collection): the JSON line it prints last."""
    proc = subprocess.run([python, os.path.abspath(__file__), what, json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=spec["tmp"],
                          timeout=timeout or spec["seconds"] * 4 + 240,
                          env=dict(os.environ, **env))
    if proc.returncode != 0:
        raise RuntimeError("measurement failed: %s\n%s" % (spec, proc.stderr[-4000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ms(value):
    return None if value is None else 1000.0 * value


def _mib(values):
    return _churn.spread([v / 1048576.0 for v in values if v is not None])


def _cpu(fig):
    return _churn.cpu_per_1000(fig)


def _whole(values):
    """Counts: median [min-max]."""
    values = sorted(values)
    return "%d [%d-%d]" % (_run.median(values), values[0], values[-1]) if values else "-"


def _per_restart_ms(churn, cpu_churn, cpu_steady):
    """What a restart adds to the server's CPU: the medians' difference in CPU per 1,000
    requests (churn - no restart) x requests per restart, in ms."""
    per_restart = _churn.requests_per_restart(churn)
    if per_restart is None or cpu_churn is None or cpu_steady is None:
        return "-"
    return "%.0f" % ((cpu_churn - cpu_steady) * per_restart)  # s per 1,000 x requests = ms


def _ratios(churn, steady, key):
    return [key(c) / key(s) for c, s in zip(churn, steady)
            if key(c) is not None and key(s)]


def bench(args, python, env):
    workload = WORKLOADS[args.what]
    env = dict(env, **workload["env"])
    if args.what == "slow-import":
        env["SAFE_GTHREAD_APP_BOOT_SLEEP"] = str(args.boot)
    runs = [(side, mr) for side in args.sides for mr in (workload["max_requests"], 0)]
    figs = dict((run, []) for run in runs)
    for pair in range(args.pairs):
        order = runs if pair % 2 == 0 else runs[::-1]
        for side, mr in order:
            settings = dict(workload["settings"], max_requests=mr,
                            max_requests_jitter=workload["jitter"] if mr else 0,
                            loglevel="debug")
            spec = {"tmp": args.tmp, "side": side, "settings": settings,
                    "seconds": args.seconds, "connections": workload["connections"]}
            fig = run_one(python, spec, env)
            figs[(side, mr)].append(fig)
            mem = fig["memory"]
            uss = [w[0] for w in mem.get("workers", ())]
            print("  pair %d %s max_requests %d: %.0f req/s, %d failed, %d restarts (%s "
                  "per restart), p99 %.1f ms, %.3f CPU s/1000, worker USS %s MiB, "
                  "server PSS %.1f MiB, %d ERROR lines" % (
                      pair + 1, side, mr, _churn.rate(fig), fig["failed"], fig["restarts"],
                      _churn.per_restart([fig]), _ms(fig["p99"]) or 0, _cpu(fig) or 0,
                      _mib(uss), mem.get("total_pss", 0) / 1048576.0, fig["errors"]),
                  flush=True)
    mr = workload["max_requests"]
    rows, memory_rows, stage_rows = [], [], []
    for side in args.sides:
        churn, steady = figs[(side, mr)], figs[(side, 0)]
        cpu_churn, cpu_steady = (_run.median([_cpu(f) for f in runs]) for runs in (churn, steady))
        handoffs = [1000.0 * h for f in churn for h in f["handoffs"]]
        handoffs.sort()
        rows.append((
            side, _churn.spread(_ratios(churn, steady, _churn.rate)),
            "%.0f / %.0f" % (_run.median([_churn.rate(f) for f in churn]),
                             _run.median([_churn.rate(f) for f in steady])),
            sum(f["restarts"] for f in churn), _churn.per_restart(churn),
            _churn.spread(_ratios(churn, steady, _cpu)),
            "%.3f / %.3f" % (cpu_churn or 0, cpu_steady or 0),
            _per_restart_ms(churn, cpu_churn, cpu_steady),
            _churn.spread(_ratios(churn, steady, lambda f: f["p99"])),
            "%.0f / %.0f" % (_ms(_run.median([f["p99"] for f in churn])) or 0,
                             _ms(_run.median([f["p99"] for f in steady])) or 0),
            ("%.0f, p90 %.0f [%.0f-%.0f] (%d)" % (
                _run.median(handoffs), handoffs[int(0.9 * (len(handoffs) - 1))], handoffs[0],
                handoffs[-1], len(handoffs)) if handoffs else "-"),
            sum(f["failed"] + f["proxy_errors"] for f in churn + steady)))
        workers = [w for f in churn for w in f.get("stages", ())]
        if workers:
            def ms(key):
                return _churn.spread([1000.0 * w[key] for w in workers if key in w])
            stage_rows.append((
                side, len(workers), ms("start"), ms("warmup"),
                _churn.spread([1e6 * w["rate"] for w in workers if "rate" in w]),
                _whole(w["tail"] for w in workers if "tail" in w), ms("tail_cost"),
                ms("exit"), _whole(w["exit_faults"] for w in workers)))
        for label, runs_ in (("churn", churn), ("no restart", steady)):
            workers = [w for f in runs_ for w in f["memory"].get("workers", ())]
            molds = [f["memory"]["mold"] for f in runs_ if f["memory"].get("mold")]
            memory_rows.append((
                side, label, _mib([w[0] for w in workers]), _mib([w[1] for w in workers]),
                _mib([m[1] for m in molds]) if molds else "-",
                _mib([f["memory"].get("total_pss") for f in runs_])))
    print()
    print("%s, %d pairs of %gs runs, max_requests %d vs 0:" % (
        args.what if args.what != "slow-import" else "slow-import (%gs import)" % args.boot,
        args.pairs, args.seconds, mr))
    print()
    _run.print_table(("side", "goodput churn / no-restart", "req/s churn / no-restart",
                      "restarts (churn, all pairs)", "requests per restart",
                      "CPU s/1,000 churn / no-restart", "CPU s/1,000 churn / no-restart (medians)",
                      "CPU per restart, ms",
                      "p99 churn / no-restart", "p99 ms churn / no-restart (medians)",
                      "successor ready after its request, ms: median, p90 [range] (count)",
                      "failed"), rows)
    print()
    _run.print_table(("side", "run", "worker USS MiB", "worker PSS MiB", "mold PSS MiB",
                      "server PSS MiB (arbiter + mold + workers)"), memory_rows)
    if stage_rows:
        print()
        print("Each worker's own CPU under churn (getrusage at its hooks; wait4 when reaped):")
        print()
        _run.print_table(("side", "workers", "fork to ready, ms",
                          "first %d requests over its rate, ms" % WARM,
                          "its rate from %d requests to its limit, us per request" % WARM,
                          "requests after its limit", "those over its rate, ms",
                          "worker_exit to reaped, ms", "page faults in that exit"),
                         stage_rows)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--freeze":
        spec = json.loads(sys.argv[2])
        print(json.dumps(full_collection_in_a_fork(spec["objects"], spec["freeze"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=sorted(WORKLOADS) + ["freeze"])
    parser.add_argument("--venv", default=None,
                        help="an existing venv with gunicorn: runs this tree (PYTHONPATH)")
    parser.add_argument("--version", default="27.0.1:3.13",
                        help="gunicorn:python of a .bench/ venv (without --venv)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        type=lambda text: [s for s in text.split(",") if s])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--boot", type=float, default=1.5, help="slow-import: import seconds")
    parser.add_argument("--objects", type=int, default=300000,
                        help="freeze: the heap's small lists (about 150 bytes each)")
    args = parser.parse_args()
    args.tmp = os.path.join(_run.BENCH_DIR, "tmp")
    os.makedirs(args.tmp, exist_ok=True)
    if args.venv:
        python, env = os.path.join(args.venv, "bin", "python"), {"PYTHONPATH": ROOT}
    else:
        version, py = args.version.split(":")
        venv = _run.prepare_venv(version, py, _run.build_wheel(ROOT))
        python, env = os.path.join(venv, "bin", "python"), {}
    print("python3 benchmarks/mold.py %s (%s, %s)" % (" ".join(sys.argv[1:]), python,
                                                      time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime())))
    (bench_freeze if args.what == "freeze" else bench)(args, python, env)


if __name__ == "__main__":
    main()
