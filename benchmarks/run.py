#!/usr/bin/env python3
"""Benchmark safe_gthread.Worker against the stock gthread worker, side by side.

For each gunicorn version (each in its own venv under .bench/, with the package installed
from a wheel built from this tree), each path and each max_requests, it runs stock and
safe back to back (a pair; the order alternates from one repeat to the next) under the
same load: the seed's 5 workers x 5 threads, keep-alive 2, wrk -c200. It reports the
successful requests/s and the client-visible failures per 1,000 worker restarts, and
safe/stock as the median of the pairs' ratios. Versions are interleaved inside each
repeat so that cross-version figures (safe 19.6.0 vs stock 27.0.1) share the machine's
conditions too.

    python3 benchmarks/run.py                                   # everything (long)
    python3 benchmarks/run.py --versions 19.6.0:3.6,27.0.1:3.13 --paths h2o,direct \\
        --max-requests 512,0 --seconds 6 --repeats 3

Paths: h2o (upstream keep-alive), nginx-keepalive, nginx-plain, direct (Python keep-alive
clients on the unix socket; the client, not gunicorn, bounds its rate), tcp (h2o in front
of gunicorn bound to 127.0.0.1, the seed's old workaround). Writes docs/benchmarks.md and
docs/img/benchmarks.png (matplotlib lives only in .bench/plot, never in the package).
Benchmarks are not tests: figures move with the machine's load, ratios less so.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, ".bench")
sys.path.insert(0, os.path.join(ROOT, "tests"))

PATHS = ("h2o", "nginx-keepalive", "nginx-plain", "direct", "tcp")
VERSIONS = "19.6.0:3.6,19.9.0:3.6,20.1.0:3.8,23.0.0:3.12,27.0.1:3.13"
SETTINGS = {"workers": 5, "threads": 5, "keepalive": 2, "graceful_timeout": 10,
            "timeout": 30}
CONNECTIONS = 200
DIRECT_CLIENTS = 32
WARMUP = 1.0


# -- one measurement, run inside a version's venv -------------------------------------------
def measure(spec):
    """Run one pair (stock and safe, in spec["order"]) and return their figures."""
    import tempfile
    from safe_gthread.check.runner import Gunicorn
    from safe_gthread.check.proxy import Proxy, free_port
    from safe_gthread.check import load as _load

    results = {}
    for worker in spec["order"]:
        directory = tempfile.mkdtemp(prefix="bench-", dir=spec["tmp"])
        settings = dict(SETTINGS, max_requests=spec["max_requests"])
        tcp = spec["path"] == "tcp"
        if tcp:
            port = free_port()
            settings["bind"] = "127.0.0.1:%d" % port
        server = Gunicorn(directory, worker, **settings)
        proxy = None
        try:
            if tcp:
                server.start(wait=False)
                server.wait_for(lambda: _serves(_load, ("127.0.0.1", port)), 20, "gunicorn on TCP")
                server.wait_for(lambda: server.booted() >= settings["workers"], 20, "workers")
            else:
                server.start()
            inode = server.inode()
            if spec["path"] != "direct":
                upstream = ("127.0.0.1", port) if tcp else server.sock_path
                kind = "nginx" if spec["path"].startswith("nginx") else "h2o"
                proxy = Proxy(kind, os.path.join(directory, "proxy"), upstream,
                              upstream_keepalive=spec["path"] != "nginx-plain").start()
            _drive(spec, proxy, server, WARMUP, _load)  # fill pools, warm the workers
            before = server.restarts()
            figures = _drive(spec, proxy, server, spec["seconds"], _load)
            figures["restarts"] = server.restarts() - before
            figures["proxy_errors"] = len(proxy.upstream_failures()) if proxy else 0
            figures["socket_kept"] = tcp or server.inode() == inode
            figures["tracebacks"] = server.tracebacks()
            results[worker] = figures
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)
    return results


def _serves(_load, address):
    try:
        return _load.request(address, timeout=2.0)[0] == 200
    except (OSError, EOFError, ValueError):
        return False


def _drive(spec, proxy, server, seconds, _load):
    if proxy is None:
        result = _load.run_load(server.sock_path, seconds=seconds, concurrency=DIRECT_CLIENTS,
                                keepalive_share=1.0)
        return {"ok": result.ok, "failed": result.failed, "seconds": result.seconds}
    cmd = ["wrk", "-t2", "-c%d" % CONNECTIONS, "-d%ds" % max(int(round(seconds)), 1),
           "--timeout", "10s", "http://127.0.0.1:%d/" % proxy.port]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=seconds + 60).stdout
    import re
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if not match:
        raise RuntimeError("wrk printed no summary:\n" + out)
    requests = int(match.group(1))
    elapsed = float(match.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(n) for n in sock.groups()) if sock else 0
    return {"ok": requests - non2xx, "failed": non2xx + errors, "seconds": elapsed}


# -- the driver: venvs, the loop, the report ---------------------------------------------------
def prepare_venv(gunicorn, python, wheel):
    from matrix import find_python, gunicorn_requirements
    venv = os.path.join(BENCH_DIR, "gunicorn%s-py%s" % (gunicorn, python))
    stamp = os.path.join(venv, "pins.txt")
    pins = gunicorn_requirements(gunicorn)
    pin = "\n".join(pins)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
    if not (os.path.exists(stamp) and open(stamp).read() == pin):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([find_python(python), "-m", "venv", venv], check=True)
        subprocess.run(pip + ["--upgrade", "pip<22" if python == "3.6" else "pip"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(pip + pins, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(stamp, "w") as fh:
            fh.write(pin)
    subprocess.run(pip + ["--no-deps", "--force-reinstall", wheel], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return venv


def build_wheel(source):
    dist = os.path.join(BENCH_DIR, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")][0]


def run_pair(venv, spec):
    # gunicorn inherits the environment: the bundled app reads its sleep from there.
    env = dict(os.environ, SAFE_GTHREAD_APP_SLEEP=str(spec.get("app_sleep", 0.0)))
    proc = subprocess.run([os.path.join(venv, "bin", "python"), os.path.abspath(__file__),
                           "--measure", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, cwd=BENCH_DIR,
                          timeout=spec["seconds"] * 4 + 180, env=env)
    if proc.returncode != 0:
        raise RuntimeError("measurement failed: %s\n%s" % (spec, proc.stderr[-4000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rate(fig):
    return fig["ok"] / fig["seconds"] if fig["seconds"] else 0.0


def per_1000(fig):
    if not fig["restarts"]:
        return None if fig["failed"] else 0.0
    return 1000.0 * fig["failed"] / fig["restarts"]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records):
    """{(version, path, mr): {"stock": [...], "safe": [...], "ratios": [...]}}"""
    cells = {}
    for rec in records:
        key = (rec["version"], rec["path"], rec["max_requests"])
        cell = cells.setdefault(key, {"stock": [], "safe": [], "ratios": []})
        cell["stock"].append(rec["stock"])
        cell["safe"].append(rec["safe"])
        if rate(rec["stock"]):
            cell["ratios"].append(rate(rec["safe"]) / rate(rec["stock"]))
    return cells


def _fmt(value, pattern="%.0f", none="-"):
    return none if value is None else pattern % value


def _sum_per_1000(figs):
    if not all(f["socket_kept"] for f in figs):
        # 19.6.0's stock worker: the file is gone after the first restart, then no worker
        # gets a request to restart for; a rate per restart would mean nothing.
        failed = sum(f["failed"] for f in figs)
        return "socket lost: %d of %d failed" % (failed, failed + sum(f["ok"] for f in figs))
    restarts = sum(f["restarts"] for f in figs)
    failed = sum(f["failed"] for f in figs)
    if not restarts:
        return "%d failed, no restarts" % failed if failed else "0"
    return "%.0f" % (1000.0 * failed / restarts)


def markdown(records, args, started, versions):
    cells = summarize(records)
    title = "# Benchmarks: safe_gthread.Worker vs the stock gthread worker"
    if getattr(args, "app_sleep", 0):
        title += ", an I/O-bound app"
    out = [title, "",
           "Produced by `%s` (%s, %s repeats of %ss per worker and cell, paired)." % (
               " ".join(["python3", "benchmarks/run.py"] + args.argv), started, args.repeats,
               args.seconds),
           "The seed's scenario: 5 workers x 5 threads, keep-alive 2 s, wrk -t2 -c200 through "
           "the proxy (`direct`: %d Python keep-alive clients on the unix socket; `tcp`: h2o in "
           "front of gunicorn bound to 127.0.0.1). Req/s counts successful (2xx) responses; "
           "failures are client-visible (non-2xx and socket errors), per 1,000 worker restarts "
           "summed over the repeats. *proxy log* counts upstream resets / I/O errors in the "
           "proxy's error log (nginx retries a GET after most of them, so they need not reach "
           "the client). safe/stock is the median of the pairs' ratios. %d-core machine, "
           "shared with other work: absolute figures move, ratios less so." % (
               DIRECT_CLIENTS, os.cpu_count() or 0), "",
           ("Every request waits %g s in the app (`--app-sleep`), as an app waiting on a "
            "database does: throughput is bound by the worker threads, not the CPU, and a "
            "worker slot left empty during a restart costs requests." % args.app_sleep
            if getattr(args, "app_sleep", 0) else
            "The app answers at once: on this machine throughput is bound by the CPU, which "
            "every restart costs whichever worker class runs; see the [I/O-bound page]"
            "(benchmarks-io.md) for what the successor handoff gives when worker threads "
            "are the bound."), "",
           "" if args.no_plot else "![safe vs stock, successful requests/s](%s)\n" % (
               os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.out)))),
           "| gunicorn | path | max_requests | stock req/s | safe req/s | safe/stock | "
           "stock fails/1k restarts | safe fails/1k restarts | restarts/s stock / safe | "
           "proxy log stock / safe |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate(v for v, _ in versions)}
    for key in sorted(cells, key=lambda k: (args.max_requests.index(k[2]),
                                            PATHS.index(k[1]), order[k[0]])):
        version, path, mr = key
        cell = cells[key]
        rs = lambda figs: median([rate(f) for f in figs])  # noqa: E731
        rps = lambda figs: median([f["restarts"] / f["seconds"] for f in figs])  # noqa: E731
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %d / %d |" % (
            version, path, mr or "0 (none)", _fmt(rs(cell["stock"])), _fmt(rs(cell["safe"])),
            _fmt(median(cell["ratios"]), "%.2f"), _sum_per_1000(cell["stock"]),
            _sum_per_1000(cell["safe"]), _fmt(rps(cell["stock"]), "%.1f"),
            _fmt(rps(cell["safe"]), "%.1f"), sum(f["proxy_errors"] for f in cell["stock"]),
            sum(f["proxy_errors"] for f in cell["safe"])))
    out += ["", "## The issue's targets", ""] + targets(cells, args) + [""]
    idle = [r for (_, _, mr), c in cells.items() if mr == 0 for r in c["ratios"]]
    if idle:
        out += ["The noise: with max_requests=0 no worker retires, so both run the same "
                "request path (the safe worker adds no work until it retires); their %d "
                "pairs' ratios spread from %.2f to %.2f in this run, where 1.00 is the truth. "
                "A target met or missed by less than that spread is not a measured difference: "
                "more and longer repeats (`--repeats`, `--seconds`) narrow it." % (
                    len(idle), min(idle), max(idle)), ""]
    lost = [(k, f) for k, c in cells.items() for f in c["safe"]
            if f["failed"] or f["proxy_errors"] or not f["socket_kept"] or f["tracebacks"]]
    out.append("Safe-worker runs with any failure, proxy-log error, lost socket or traceback: "
               "%d of %d." % (len(lost), sum(len(c["safe"]) for c in cells.values())))
    for (version, path, mr), f in lost:
        out.append("- %s %s max_requests=%s: %s" % (version, path, mr, json.dumps(f)))
    return "\n".join(out) + "\n"


def targets(cells, args):
    lines = []
    newest = max((k[0] for k in cells), key=lambda v: tuple(int(x) for x in v.split(".")))
    for (version, path, mr), cell in sorted(cells.items()):
        ratio = median(cell["ratios"])
        if mr == 0:
            lines.append("- max_requests=0, %s %s: safe/stock %s (target >= 0.99): %s" % (
                version, path, _fmt(ratio, "%.3f"),
                "met" if ratio is not None and ratio >= 0.99 else "NOT met"))
        elif version == newest:
            lines.append("- max_requests=%d, %s %s: safe/stock %s (target >= 1.1): %s" % (
                mr, version, path, _fmt(ratio, "%.2f"),
                "met" if ratio is not None and ratio >= 1.1 else "NOT met"))
    for (version, path, mr), cell in sorted(cells.items()):
        base = cells.get((newest, path, mr))
        if mr == 0 or version == newest or base is None or not version.startswith("19."):
            continue
        safe = median([rate(f) for f in cell["safe"]])
        stock_new = median([rate(f) for f in base["stock"]])
        ratio = safe / stock_new if safe and stock_new else None
        lines.append("- max_requests=%d, %s: safe %s / stock %s = %s (target >= 0.9): %s" % (
            mr, path, version, newest, _fmt(ratio, "%.2f"),
            "met" if ratio is not None and ratio >= 0.9 else "NOT met"))
    return lines


def plot(records_path, png):
    """Runs in .bench/plot's Python: successful req/s per cell, stock vs safe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(records_path) as fh:
        records = json.load(fh)
    cells = summarize(records)
    mrs = sorted({k[2] for k in cells}, key=lambda m: (m == 0, m))
    fig, axes = plt.subplots(1, len(mrs), figsize=(5.5 * len(mrs), 4.8), squeeze=False)
    for ax, mr in zip(axes[0], mrs):
        keys = sorted((k for k in cells if k[2] == mr), key=lambda k: (k[1], k[0]))
        labels = ["%s\n%s" % (k[0], k[1]) for k in keys]
        xs = range(len(keys))
        for offset, worker, color in ((-0.2, "stock", "#bbbbbb"), (0.2, "safe", "#2a7ab9")):
            ys = [median([rate(f) for f in cells[k][worker]]) for k in keys]
            ax.bar([x + offset for x in xs], ys, width=0.4, label=worker, color=color)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title("max_requests = %s" % (mr or "0 (no restarts)"))
        ax.set_ylabel("successful requests/s (median)")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)


def plot_venv():
    venv = os.path.join(BENCH_DIR, "plot")
    python = os.path.join(venv, "bin", "python")
    if subprocess.run([python, "-c", "import matplotlib"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode if os.path.exists(python) else True:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "matplotlib"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return python


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--plot"]:
        plot(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default=VERSIONS,
                        help="gunicorn:python pairs, comma-separated (default %(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated, of %s" % ", ".join(PATHS))
    parser.add_argument("--max-requests", default="64,512,4096,0")
    parser.add_argument("--seconds", type=float, default=10.0, help="per worker and cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--app-sleep", type=float, default=0.0, metavar="SECONDS",
                        help="each request waits this long in the app (an I/O-bound app: "
                             "throughput bound by worker threads, not the CPU)")
    parser.add_argument("--source", default=ROOT, help="tree to build the wheel from")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "img", "benchmarks.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--from-records", metavar="JSON",
                        help="only rewrite the report from a previous run's records.json")
    args = parser.parse_args(argv)
    args.argv = argv
    versions = [tuple(v.split(":")) for v in args.versions.split(",")]
    paths = args.paths.split(",")
    for path in paths:
        if path not in PATHS:
            parser.error("unknown path %r" % path)
    args.max_requests = [int(m) for m in args.max_requests.split(",")]
    for tool in ["wrk"] + [t for t in ("h2o", "nginx") if any(p.startswith(t) for p in paths)]:
        if not (shutil.which(tool) or os.path.exists("/usr/sbin/" + tool)):
            sys.exit("benchmarks: %s is not installed (apt-get install -y h2o nginx wrk)" % tool)
    if "tcp" in paths and not shutil.which("h2o"):
        sys.exit("benchmarks: the tcp path needs h2o")
    os.makedirs(BENCH_DIR, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    if args.from_records:
        # The report names the command and the date of the run that made the records.
        with open(args.from_records) as fh:
            records = json.load(fh)
        i = argv.index("--from-records") if "--from-records" in argv else None
        args.argv = argv[:i] + argv[i + 2:] if i is not None else [
            a for a in argv if not a.startswith("--from-records")]
        started = records[0].get("started") if records else None
        if not started:  # records written before they carried the start
            started = "finished " + time.strftime("%Y-%m-%d %H:%M", time.localtime(
                os.path.getmtime(args.from_records)))
        text = markdown(records, args, started, versions)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(text)
        return 0
    print("benchmarks: building the wheel and %d venv(s)" % len(versions), flush=True)
    wheel = build_wheel(args.source)
    venvs = {v: prepare_venv(v[0], v[1], wheel) for v in versions}
    tmp = os.path.join(BENCH_DIR, "tmp")
    os.makedirs(tmp, exist_ok=True)
    plan = [(r, mr, path, v) for r in range(args.repeats) for mr in args.max_requests
            for path in paths for v in versions]
    records = []
    records_path = os.path.join(BENCH_DIR, "records.json")
    t0 = time.monotonic()
    for n, (r, mr, path, version) in enumerate(plan, 1):
        order = ["stock", "safe"] if (r + n) % 2 else ["safe", "stock"]
        spec = {"path": path, "max_requests": mr, "seconds": args.seconds, "order": order,
                "tmp": tmp, "app_sleep": args.app_sleep}
        pair = run_pair(venvs[version], spec)
        rec = {"version": version[0], "python": version[1], "path": path, "max_requests": mr,
               "repeat": r, "order": order, "stock": pair["stock"], "safe": pair["safe"],
               "started": started}
        records.append(rec)
        with open(records_path, "w") as fh:
            json.dump(records, fh, indent=1)
        elapsed = time.monotonic() - t0
        print("[%d/%d] gunicorn %s %s max_requests=%s: stock %.0f req/s %d failed %d restarts | "
              "safe %.0f req/s %d failed %d restarts | ratio %.2f | eta %dm%02ds" % (
                  n, len(plan), version[0], path, mr, rate(pair["stock"]),
                  pair["stock"]["failed"], pair["stock"]["restarts"], rate(pair["safe"]),
                  pair["safe"]["failed"], pair["safe"]["restarts"],
                  rate(pair["safe"]) / rate(pair["stock"]) if rate(pair["stock"]) else 0,
                  *divmod(int(elapsed / n * (len(plan) - n)), 60)), flush=True)
    text = markdown(records, args, started, versions)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    if not args.no_plot:
        subprocess.run([plot_venv(), os.path.abspath(__file__), "--plot", records_path, args.png],
                       check=True)
        print("benchmarks: wrote %s and %s" % (args.out, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
