#!/usr/bin/env python3
"""Benchmark safe_gthread.Worker against the stock gthread worker, side by side.

For each gunicorn version (each in its own venv under .bench/, with the package installed
from a wheel built from this tree), each path and each max_requests, it runs stock and
safe back to back (a pair; the order alternates from one repeat to the next) under the
same load: the original report's 5 workers x 5 threads, keep-alive 2, wrk -c200. It reports the
successful requests/s and the client-visible failures per 1,000 worker restarts, and
safe/stock as the median of the pairs' ratios. Versions are interleaved inside each
repeat so that cross-version figures (safe 19.6.0 vs stock 27.0.1) share the machine's
conditions too.

    python3 benchmarks/run.py                                   # everything (long)
    python3 benchmarks/run.py --versions 19.6.0:3.6,27.0.1:3.13 --paths h2o,direct \\
        --max-requests 512,0 --seconds 6 --repeats 3

Paths: h2o (upstream keep-alive), nginx-keepalive, nginx-plain, direct (Python keep-alive
clients on the unix socket; the client, not gunicorn, bounds its rate), tcp (h2o in front
of gunicorn bound to 127.0.0.1, the original report's workaround). Writes docs/benchmarks.md and
docs/img/benchmarks-mr<N>.png, one plot per max_requests (matplotlib lives only in
.bench/plot, never in the package; `--plot-page PAGE PNG` re-plots a page's table).
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


def print_table(columns, rows):
    """A markdown table on stdout: the header, its rule, one line per row."""
    print("| %s |" % " | ".join(columns))
    print("|%s|" % "|".join("---" for _ in columns))
    for row in rows:
        print("| %s |" % " | ".join(str(cell) for cell in row))


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
           "The original bug report's setup: 5 workers x 5 threads, keep-alive 2 s, wrk -t2 -c200 through "
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
           "" if args.no_plot else "".join(
               "![max_requests = %s: successful requests/s, stock vs safe](%s)\n\n" % (
                   mr or "0 (no restarts)",
                   os.path.relpath(png, os.path.dirname(os.path.abspath(args.out))))
               for mr, png in plot_pngs(args.png, sorted(args.max_requests,
                                                         key=lambda m: (m == 0, m)))),
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
    out.append("")
    idle = [r for (_, _, mr), c in cells.items() if mr == 0 for r in c["ratios"]]
    if idle:
        out += ["The noise: with max_requests=0 no worker retires, so both run the same "
                "request path (the safe worker adds no work until it retires); their %d "
                "pairs' ratios spread from %.2f to %.2f in this run, where 1.00 is the truth. "
                "A safe/stock difference smaller than that spread is not a measured difference: "
                "more and longer repeats (`--repeats`, `--seconds`) narrow it." % (
                    len(idle), min(idle), max(idle)), ""]
    lost = [(k, f) for k, c in cells.items() for f in c["safe"]
            if f["failed"] or f["proxy_errors"] or not f["socket_kept"] or f["tracebacks"]]
    out.append("Safe-worker runs with any failure, proxy-log error, lost socket or traceback: "
               "%d of %d." % (len(lost), sum(len(c["safe"]) for c in cells.values())))
    for (version, path, mr), f in lost:
        out.append("- %s %s max_requests=%s: %s" % (version, path, mr, json.dumps(f)))
    return "\n".join(out) + "\n"


PATH_LABELS = {"h2o": "h2o", "nginx-keepalive": "nginx\nkeep-alive", "nginx-plain": "nginx\nplain",
               "direct": "direct", "tcp": "tcp\n(h2o)"}


def plot_pngs(png, max_requests):
    """The plot files for ``--png``: one per max_requests, e.g. benchmarks-mr512.png."""
    stem, ext = os.path.splitext(png)
    return [(mr, "%s-mr%d%s" % (stem, mr, ext or ".png")) for mr in max_requests]


def plot_cells_from_records(records):
    """Per cell, per worker: median, min and max successful req/s over the pairs, and
    whether the socket was lost in any of them."""
    out = {}
    for key, cell in summarize(records).items():
        out[key] = {}
        for worker in ("stock", "safe"):
            rates = [rate(f) for f in cell[worker]]
            out[key][worker] = {"median": median(rates), "min": min(rates), "max": max(rates),
                                "lost": not all(f["socket_kept"] for f in cell[worker]),
                                "pairs": len(rates)}
    return out


def plot_cells_from_page(page):
    """The same from a report page's table (medians only: the page does not keep the
    pairs, so min and max are None)."""
    import re
    out = {}
    with open(page) as fh:
        for line in fh:
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cols) != 10 or not re.match(r"\d+\.\d+\.\d+$", cols[0]):
                continue
            mr = int(cols[2].split()[0])
            key = (cols[0], cols[1], mr)
            out[key] = {
                "stock": {"median": float(cols[3]), "min": None, "max": None,
                          "lost": cols[6].startswith("socket lost"), "pairs": None},
                "safe": {"median": float(cols[4]), "min": None, "max": None,
                         "lost": cols[7].startswith("socket lost"), "pairs": None}}
    return out


def plot(cells, png, note=""):
    """Runs in .bench/plot's Python. One PNG per max_requests (readable at a column's
    width, ~700 px): a row of bars per gunicorn version, all rows on one y scale; stock
    grey, safe blue, a min-max bar over the pairs where the pairs are known, and a stock
    run that lost its unix socket drawn hatched red and labelled so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    versions = sorted({k[0] for k in cells}, key=lambda v: tuple(int(x) for x in v.split(".")))
    paths = [p for p in PATHS if any(k[1] == p for k in cells)]
    mrs = sorted({k[2] for k in cells}, key=lambda m: (m == 0, m))
    written = []
    for mr, path_png in plot_pngs(png, mrs):
        keys = [k for k in cells if k[2] == mr]
        top = max(max(cells[k][w]["max"] or cells[k][w]["median"] for w in ("stock", "safe"))
                  for k in keys) * 1.22
        height = 1.55 + 1.7 * len(versions)  # inches: a header, a row per version, labels
        fig, axes = plt.subplots(len(versions), 1, figsize=(7.0, height),
                                 sharex=True, sharey=True, squeeze=False)
        for ax, version in zip(axes[:, 0], versions):
            xs = list(range(len(paths)))
            for offset, worker, color in ((-0.2, "stock", "#9a9a9a"), (0.2, "safe", "#2a7ab9")):
                for x, path in zip(xs, paths):
                    fig_ = cells.get((version, path, mr), {}).get(worker)
                    if fig_ is None:
                        continue
                    lost = fig_["lost"]
                    ax.bar(x + offset, fig_["median"], width=0.38,
                           color="#f4d4d4" if lost else color,
                           edgecolor="#c0392b" if lost else color,
                           hatch="///" if lost else None, linewidth=1.0)
                    if fig_["min"] is not None and fig_["max"] is not None:
                        ax.errorbar(x + offset, fig_["median"],
                                    yerr=[[fig_["median"] - fig_["min"]],
                                          [fig_["max"] - fig_["median"]]],
                                    fmt="none", ecolor="black", elinewidth=1.0, capsize=3)
                    if lost:
                        ax.text(x + offset, max(fig_["median"], fig_["max"] or 0) + top * 0.03,
                                "socket\nlost", ha="center", va="bottom", fontsize=8,
                                color="#c0392b")
            ax.set_ylim(0, top)
            ax.set_ylabel("req/s", fontsize=9)
            ax.set_title("gunicorn %s" % version, fontsize=10, loc="left")
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
            ax.set_axisbelow(True)
        axes[-1, 0].set_xticks(list(range(len(paths))))
        axes[-1, 0].set_xticklabels([PATH_LABELS.get(p, p) for p in paths], fontsize=9)
        from matplotlib.patches import Patch
        handles = [Patch(color="#9a9a9a", label="stock gthread"),
                   Patch(color="#2a7ab9", label="safe_gthread.Worker"),
                   Patch(facecolor="#f4d4d4", edgecolor="#c0392b", hatch="///",
                         label="stock, socket lost")]
        fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, 1 - 0.45 / height))
        spread = ("bars: median, whiskers: min-max of the pairs" if any(
            cells[k][w]["min"] is not None for k in keys for w in ("stock", "safe"))
            else "bars: median of the pairs (per-pair figures not kept)")
        fig.suptitle("max_requests = %s: successful requests/s\n%s%s" % (
            mr or "0 (no restarts)", spread, note), fontsize=10, y=1 - 0.08 / height,
            va="top")
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.55 / height, top=1 - 1.05 / height,
                            hspace=0.5)
        os.makedirs(os.path.dirname(path_png) or ".", exist_ok=True)
        fig.savefig(path_png, dpi=100)
        plt.close(fig)
        written.append(path_png)
    return written


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
        with open(argv[1]) as fh:
            plot(plot_cells_from_records(json.load(fh)), argv[2])
        return 0
    if argv[:1] == ["--plot-page"]:
        # Re-plot a report page whose records are gone: medians only, no spread.
        #   benchmarks/run.py --plot-page docs/benchmarks.md docs/img/benchmarks.png
        print("\n".join(plot(plot_cells_from_page(argv[1]), argv[2])))
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
