#!/usr/bin/env python3
"""What restarts cost in capacity, stock vs safe, and a leaking app's RSS.

``goodput``: a slow-booting I/O app (``SAFE_GTHREAD_APP_BOOT_SLEEP`` s import, 20 ms per
request), 4 workers x 4 threads, h2o in front, ``wrk -c32``. Each cell runs the same
server with ``max_requests 600`` (+60 jitter) and with no restarts, stock and safe, in
pairs whose order alternates; it prints goodput under churn / no-restart goodput
(medians of the pairs, with their range), CPU seconds per 1,000 successful requests
(utime + stime of the arbiter, its reaped and its live workers, from /proc), the fewest
booted and the most worker processes seen (sampled every 20 ms), and failed requests.

``cpu``: the original report's CPU-bound hello-world churn (5 workers x 5 threads, max_requests
512, wrk -c200), safe vs stock of the same gunicorn.

``retiring``: the safe worker under the ``goodput`` churn with each of ``--values`` as
``max_retiring``: restarts, how many workers stopped before their successor was ready
(statsd's ``safe_gthread.fallbacks``), goodput, booted workers and processes.

``memory``: an app leaking ``--leak`` bytes per request under ``max_worker_memory``;
writes every worker's RSS over time (CSV, and a PNG where .bench/plot has matplotlib).

    python3 benchmarks/churn.py goodput --versions 27.0.1:3.13,19.6.0:3.6 --boot 1 --pairs 5
    python3 benchmarks/churn.py cpu --versions 27.0.1:3.13 --pairs 5
    python3 benchmarks/churn.py memory --versions 27.0.1:3.13 --limit 256M --leak 1048576
    python3 benchmarks/churn.py retiring --versions 27.0.1:3.13 --boot 1 --values 1,2,4

Benchmarks are not tests: figures move with the machine's load, ratios less so.
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as _run  # noqa: E402  (venvs, wheel, wrk parsing: one copy)

GOODPUT = {"workers": 4, "threads": 4, "keepalive": 2, "graceful_timeout": 10, "timeout": 30}
CPU = {"workers": 5, "threads": 5, "keepalive": 2, "graceful_timeout": 10, "timeout": 30}


# -- inside a version's venv -------------------------------------------------------------
def cpu_seconds(arbiter):
    """utime + stime of the arbiter, its reaped children and its live children, with what
    the live children reaped of their own (the mold's middle processes)."""
    from safe_gthread.check import procs as _procs
    tick = float(os.sysconf("SC_CLK_TCK"))

    def fields(pid):
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()

    total = 0.0
    try:
        own = fields(arbiter)
        total += sum(int(own[i]) for i in (11, 12, 13, 14)) / tick  # utime stime cutime cstime
    except OSError:
        return None
    for pid in _procs.children(arbiter):
        try:
            kid = fields(pid)
            total += sum(int(kid[i]) for i in (11, 12, 13, 14)) / tick
        except (OSError, IndexError):
            pass
    return total


class Watch(threading.Thread):
    """Every 20 ms: worker processes, booted ones (the app's ready markers), their RSS."""

    def __init__(self, arbiter, ready_dir, rss_log=None):
        super(Watch, self).__init__()
        self.daemon = True
        self.arbiter, self.ready_dir, self.rss_log = arbiter, ready_dir, rss_log
        self.most = 0
        self.fewest_ready = None
        self.most_rss = 0
        self.halt = threading.Event()
        self.started_at = time.monotonic()

    def run(self):
        from safe_gthread.check import procs as _procs
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.halt.wait(0.02):
            kids = _procs.children(self.arbiter)
            ready = [p for p in kids if os.path.exists(os.path.join(self.ready_dir, str(p)))]
            self.most = max(self.most, len(kids))
            self.fewest_ready = len(ready) if self.fewest_ready is None else min(
                self.fewest_ready, len(ready))
            for pid in kids:
                try:
                    with open("/proc/%d/statm" % pid) as fh:
                        rss = int(fh.read().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    continue
                self.most_rss = max(self.most_rss, rss)
                if self.rss_log is not None:
                    self.rss_log.append((round(time.monotonic() - self.started_at, 3), pid, rss))


class StatsdCounter(threading.Thread):
    """Counts the datagrams that start with ``prefix`` (gunicorn sends one per metric)."""

    def __init__(self, sock, prefix):
        super(StatsdCounter, self).__init__()
        self.daemon = True
        self.sock, self.prefix, self.count = sock, prefix, 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            self.count += sum(1 for line in data.split(b"\n") if line.startswith(self.prefix))


def measure(spec):
    import tempfile
    from safe_gthread.check.runner import Gunicorn
    from safe_gthread.check.proxy import Proxy

    import socket
    directory = tempfile.mkdtemp(prefix="churn-", dir=spec["tmp"])
    ready_dir = os.path.join(directory, "ready")
    os.makedirs(ready_dir)
    os.environ["SAFE_GTHREAD_APP_READY_DIR"] = ready_dir
    settings = dict(spec["settings"])
    # The safe worker's arbiter counts, in statsd, the workers that stopped at
    # max_requests before their successor was ready (safe_gthread.fallbacks).
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))
    statsd.settimeout(0.2)
    settings["statsd_host"] = "127.0.0.1:%d" % statsd.getsockname()[1]
    fallbacks = StatsdCounter(statsd, b"safe_gthread.fallbacks:")
    server = Gunicorn(directory, spec["worker"], **settings)
    if spec.get("configure"):
        with open(server.config_path, "a") as fh:
            fh.write("import safe_gthread\nsafe_gthread.configure(%s)\n" % spec["configure"])
    proxy = None
    try:
        server.start(timeout=60)
        server.wait_for(lambda: len(os.listdir(ready_dir)) >= settings["workers"], 60,
                        "every worker's app")
        proxy = Proxy("h2o", os.path.join(directory, "proxy"), server.sock_path,
                      upstream_keepalive=True).start()
        _wrk(proxy, 1, spec["connections"])  # warm the proxy's pool
        rss_log = [] if spec.get("rss") else None
        watch = Watch(server.proc.pid, ready_dir, rss_log)
        before_cpu, before = cpu_seconds(server.proc.pid), server.restarts()
        fallbacks.start()
        watch.start()
        figures = _wrk(proxy, spec["seconds"], spec["connections"])
        watch.halt.set()
        watch.join()
        fallbacks.halt.set()
        fallbacks.join()
        cpu = cpu_seconds(server.proc.pid)
        figures.update(restarts=server.restarts() - before, most=watch.most,
                       fewest_ready=watch.fewest_ready, most_rss=watch.most_rss,
                       proxy_errors=len(proxy.upstream_failures()),
                       tracebacks=server.tracebacks(),
                       cpu=None if cpu is None or before_cpu is None else cpu - before_cpu)
        # Requests each retired worker served (safe workers log it); for both workers,
        # requests per restart is the like-for-like figure beside any throughput.
        figures["fallbacks"] = fallbacks.count
        figures["lifetimes"] = [int(n) for n in re.findall(
            r"Worker retired \(pid: \d+, reason: max_requests\): (\d+) requests",
            server.errorlog())]
        if rss_log is not None:
            figures["rss"] = rss_log
            figures["retired"] = re.findall(r"Worker retired \(pid: \d+, reason: (\w+)\)",
                                            server.errorlog())
        return figures
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        statsd.close()
        shutil.rmtree(directory, ignore_errors=True)


def _wrk(proxy, seconds, connections):
    spec = {"path": "h2o"}
    _run.CONNECTIONS = connections
    return _run._drive(dict(spec, seconds=seconds), proxy, None, seconds, None)


# -- the driver --------------------------------------------------------------------------
def run_one(venv, spec, env):
    proc = subprocess.run([os.path.join(venv, "bin", "python"), os.path.abspath(__file__),
                           "--measure", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          cwd=_run.BENCH_DIR, timeout=spec["seconds"] * 4 + 240,
                          env=dict(os.environ, **env))
    if proc.returncode != 0:
        raise RuntimeError("measurement failed: %s\n%s" % (spec, proc.stderr[-4000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rate(fig):
    return fig["ok"] / fig["seconds"] if fig["seconds"] else 0.0


def requests_per_restart(figs):
    """Successful requests per restart over a list of runs (None without restarts)."""
    restarts = sum(f["restarts"] for f in figs)
    return sum(f["ok"] for f in figs) / float(restarts) if restarts else None


def per_restart(figs):
    """:func:`requests_per_restart` for a table ("-" without restarts)."""
    value = requests_per_restart(figs)
    return "-" if value is None else "%.0f" % value


def most_per_life(figs):
    lifetimes = [n for f in figs for n in f.get("lifetimes", ())]
    return str(max(lifetimes)) if lifetimes else "-"


def cpu_per_1000(fig):
    return None if not fig.get("cpu") or not fig["ok"] else 1000.0 * fig["cpu"] / fig["ok"]


def spread(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    return "%.2f [%.2f-%.2f]" % (_run.median(values), values[0], values[-1])


def goodput(args, versions, wheel):
    rows = []
    for version, python in versions:
        venv = _run.prepare_venv(version, python, wheel)
        workers = ["safe"] if version.startswith("19.6") else ["stock", "safe"]
        for boot in args.boot:
            env = {"SAFE_GTHREAD_APP_BOOT_SLEEP": str(boot), "SAFE_GTHREAD_APP_SLEEP": "0.02"}
            figs = {(w, mr): [] for w in workers for mr in (0, 600)}
            for pair in range(args.pairs):
                order = [(w, mr) for w in workers for mr in (600, 0)]
                if pair % 2:
                    order.reverse()
                for worker, mr in order:
                    settings = dict(GOODPUT, max_requests=mr, max_requests_jitter=60 if mr else 0)
                    spec = {"tmp": args.tmp, "worker": worker, "settings": settings,
                            "seconds": args.seconds, "connections": 32,
                            "configure": args.configure if worker == "safe" else None}
                    fig = run_one(venv, spec, env)
                    figs[(worker, mr)].append(fig)
                    print("  %s boot %ss %s max_requests %d: %.0f req/s, %d failed, "
                          "%d restarts (%d before the successor was ready), workers %s..%d, "
                          "%.3f CPU s/1000" % (
                              version, boot, worker, mr, rate(fig), fig["failed"],
                              fig["restarts"], fig["fallbacks"], fig["fewest_ready"],
                              fig["most"], cpu_per_1000(fig) or 0), flush=True)
            for worker in workers:
                ratios = [rate(c) / rate(n) for c, n in zip(figs[(worker, 600)], figs[(worker, 0)])
                          if rate(n)]
                churn = figs[(worker, 600)]
                rows.append((version, "%ss" % boot, worker, spread(ratios),
                             spread([rate(f) for f in churn]),
                             spread([rate(f) for f in figs[(worker, 0)]]),
                             per_restart(churn), most_per_life(churn),
                             spread([cpu_per_1000(f) for f in churn]),
                             sum(f["failed"] + f["proxy_errors"] for f in churn),
                             sum(f["restarts"] for f in churn),
                             sum(f["fallbacks"] for f in churn) if worker == "safe" else "-",
                             "%s..%s" % (min(f["fewest_ready"] for f in churn),
                                         max(f["most"] for f in churn))))
    print()
    _run.print_table(("gunicorn", "boot", "worker", "churn / no-restart goodput", "req/s churn",
                      "req/s no restart", "requests per restart", "most in one life",
                      "CPU s per 1,000 (churn)", "failed", "restarts",
                      "of which before the successor was ready", "booted..processes"), rows)


def retiring(args, versions, wheel):
    """The safe worker under the goodput churn with each ``--values`` of max_retiring,
    alternating: how many workers stopped before their successor was ready."""
    rows = []
    for version, python in versions:
        venv = _run.prepare_venv(version, python, wheel)
        for boot in args.boot:
            env = {"SAFE_GTHREAD_APP_BOOT_SLEEP": str(boot), "SAFE_GTHREAD_APP_SLEEP": "0.02"}
            figs = {value: [] for value in args.values}
            for pair in range(args.pairs):
                for value in (args.values if pair % 2 == 0 else args.values[::-1]):
                    settings = dict(GOODPUT, max_requests=600, max_requests_jitter=60)
                    spec = {"tmp": args.tmp, "worker": "safe", "settings": settings,
                            "seconds": args.seconds, "connections": 32,
                            "configure": "max_retiring=%d" % value}
                    fig = run_one(venv, spec, env)
                    figs[value].append(fig)
                    print("  %s boot %ss max_retiring %d: %.0f req/s, %d restarts (%d before "
                          "the successor was ready), workers %s..%d" % (
                              version, boot, value, rate(fig), fig["restarts"],
                              fig["fallbacks"], fig["fewest_ready"], fig["most"]), flush=True)
            for value in args.values:
                runs = figs[value]
                rows.append((version, "%ss" % boot, value, sum(f["restarts"] for f in runs),
                             sum(f["fallbacks"] for f in runs),
                             "%.0f" % _run.median([rate(f) for f in runs]),
                             min(f["fewest_ready"] for f in runs), max(f["most"] for f in runs),
                             per_restart(runs), sum(f["failed"] for f in runs)))
    print()
    _run.print_table(("gunicorn", "boot", "max_retiring", "restarts",
                      "stopped before the successor was ready", "req/s (median)",
                      "fewest booted", "processes at most", "requests per restart", "failed"),
                     rows)


def cpu(args, versions, wheel):
    rows = []
    for version, python in versions:
        venv = _run.prepare_venv(version, python, wheel)
        figs = {"stock": [], "safe": []}
        for pair in range(args.pairs):
            for worker in (("stock", "safe") if pair % 2 == 0 else ("safe", "stock")):
                spec = {"tmp": args.tmp, "worker": worker, "connections": 200,
                        "settings": dict(CPU, max_requests=512), "seconds": args.seconds,
                        "configure": args.configure if worker == "safe" else None}
                fig = run_one(venv, spec, {})
                figs[worker].append(fig)
                print("  %s %s: %.0f req/s, %d failed, %d restarts (%s per restart, most "
                      "in one life %s, %d before the successor was ready), %.3f CPU s/1000"
                      % (version, worker, rate(fig), fig["failed"], fig["restarts"],
                         per_restart([fig]), most_per_life([fig]), fig["fallbacks"],
                         cpu_per_1000(fig) or 0), flush=True)
        ratios = [rate(s) / rate(k) for s, k in zip(figs["safe"], figs["stock"]) if rate(k)]
        rows.append((version, spread(ratios), spread([rate(f) for f in figs["stock"]]),
                     spread([rate(f) for f in figs["safe"]]),
                     per_restart(figs["stock"]), per_restart(figs["safe"]),
                     most_per_life(figs["safe"]),
                     spread([cpu_per_1000(f) for f in figs["stock"]]),
                     spread([cpu_per_1000(f) for f in figs["safe"]]),
                     sum(f["failed"] for f in figs["stock"]), sum(f["failed"] for f in figs["safe"])))
    print()
    _run.print_table(("gunicorn", "safe / stock req/s", "stock req/s", "safe req/s",
                      "stock req/restart", "safe req/restart", "safe most in one life",
                      "stock CPU s/1000", "safe CPU s/1000", "stock failed", "safe failed"), rows)


def memory(args, versions, wheel):
    import importlib.util  # _settings alone: the driver's Python has no gunicorn
    loader = importlib.util.spec_from_file_location(
        "_sg_settings", os.path.join(os.path.dirname(HERE), "safe_gthread", "_settings.py"))
    _settings = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(_settings)
    limit = _settings.parse_size("--limit", args.limit)
    for version, python in versions:
        venv = _run.prepare_venv(version, python, wheel)
        env = {"SAFE_GTHREAD_APP_LEAK": str(args.leak), "SAFE_GTHREAD_APP_SLEEP": "0.02",
               "SAFE_GTHREAD_APP_BOOT_SLEEP": "0.2"}
        spec = {"tmp": args.tmp, "worker": "safe", "connections": 32, "rss": True,
                "settings": dict(GOODPUT), "seconds": args.seconds,
                "configure": "max_worker_memory=%d" % limit}
        fig = run_one(venv, spec, env)
        name = os.path.join(args.out, "memory-%s" % version)
        with open(name + ".csv", "w") as fh:
            writer = csv.writer(fh)
            writer.writerow(["seconds", "pid", "rss_bytes"])
            writer.writerows(fig["rss"])
        print("%s: leak %d B/request, max_worker_memory %s: most RSS %.1f MiB (%.2f x limit), "
              "%.0f req/s, %d failed, %d restarts, processes <= %d, retired by reason %s; %s.csv"
              % (version, args.leak, args.limit, fig["most_rss"] / 1048576.0,
                 fig["most_rss"] / float(limit), rate(fig), fig["failed"] + fig["proxy_errors"],
                 fig["restarts"], fig["most"],
                 {r: fig["retired"].count(r) for r in set(fig["retired"])}, name))
        try:
            plotter = _run.plot_venv()
        except (OSError, subprocess.CalledProcessError):
            plotter = None  # no matplotlib here: the CSV is the figure
        if plotter is not None:
            subprocess.run([plotter, os.path.abspath(__file__),
                            "--plot", json.dumps({"csv": name + ".csv", "png": name + ".png",
                                                  "limit": limit, "title": "gunicorn %s" % version})],
                           check=False)


def plot(spec):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    with open(spec["csv"]) as fh:
        for row in csv.DictReader(fh):
            series.setdefault(row["pid"], []).append((float(row["seconds"]),
                                                      int(row["rss_bytes"]) / 1048576.0))
    fig, ax = plt.subplots(figsize=(8, 4))
    for points in series.values():
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.8)
    limit = spec["limit"] / 1048576.0
    ax.axhline(limit, color="black", linestyle="--", label="max_worker_memory")
    ax.axhline(limit * 1.25, color="red", linestyle=":", label="1.25 x limit")
    ax.set_xlabel("seconds")
    ax.set_ylabel("worker RSS (MiB)")
    ax.set_title("Leaking app, %s: one line per worker" % spec["title"])
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(spec["png"], dpi=100)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        plot(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("goodput", "cpu", "memory", "retiring"))
    parser.add_argument("--versions", default="19.6.0:3.6,23.0.0:3.12,27.0.1:3.13")
    parser.add_argument("--boot", default="0.2,1,3",
                        type=lambda text: [float(x) for x in text.split(",")])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--limit", default="256M")
    parser.add_argument("--leak", type=int, default=1048576)
    parser.add_argument("--out", default=os.path.join(_run.BENCH_DIR, "churn"))
    parser.add_argument("--values", default=[1, 2, 4],
                        type=lambda text: [int(x) for x in text.split(",")],
                        help="max_retiring values to compare (retiring)")
    parser.add_argument("--configure", default=None,
                        help="safe_gthread.configure() arguments for the safe worker, "
                             "e.g. 'max_retiring=2'")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    args.tmp = os.path.join(_run.BENCH_DIR, "tmp")
    os.makedirs(args.tmp, exist_ok=True)
    versions = [tuple(item.split(":")) for item in args.versions.split(",")]
    wheel = _run.build_wheel(os.path.dirname(HERE))
    {"goodput": goodput, "cpu": cpu, "memory": memory,
     "retiring": retiring}[args.what](args, versions, wheel)


if __name__ == "__main__":
    main()
